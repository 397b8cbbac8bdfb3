"""MultiLabelSigLipLoss under torch.distributed (gloo, CPU) equals the single-process loss.

Relation verified. Rank r holds rows R_r (local batch B) of a global batch of W * B; SigLipLoss
normalises by the local batch, so rank r's loss is -1/B * sum over i in R_r and all j of the pair
terms, and summing over ranks gives

    sum_r loss_r = W * L_full,    L_full = the world_size=1 loss on the concatenated batch.

Gradients: rank r's image features appear only in loss_r, and its text features reach the other
ranks' losses through the exchange's backward, so after each rank calls loss_r.backward() the
local feature gradients are the matching rows of d(sum_r loss_r)/d(features) = W * dL_full/d(...).
logit_scale/bias are per-rank replicas: their gradients summed over ranks (what DDP all-reduces)
equal W * dL_full/d(scale, bias).

Finding texts (``finding_targets``) are encoded on every rank and paired with the local ECGs only;
the same relation holds for them, their gradients summed over ranks like scale/bias.

One spawn per world size runs every dist_impl x target mode. At W = 2 bidir is only its one-way
remainder hop; W = 3 runs its two-way hop and a two-hop shift, so both together cover every branch.
"""
import datetime
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip_ecg.loss import MultiLabelSigLipLoss

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
TARGET_MODES = ("jaccard", "exact", "identity")
FINDINGS = "jaccard+finding-texts"  # jaccard pairs plus the per-rank finding-text term
LOCAL_BATCH, DIM, N_LABELS = 3, 8, 4
SCALE, BIAS = 6.0, -2.0
TIMEOUT_S = 180


def global_batch(world_size):
    """Float64 features and labels where every rank shares finding sets with every other rank."""
    generator = torch.Generator().manual_seed(world_size)
    n = world_size * LOCAL_BATCH
    image = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, DIM, generator=generator, dtype=torch.float64), dim=-1)
    labels = (torch.rand(n, N_LABELS, generator=generator) < 0.5).to(torch.float64)
    for r in range(world_size):
        labels[r * LOCAL_BATCH] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # same set on every rank
        labels[r * LOCAL_BATCH + 1] = 0.0  # empty on every rank: Jaccard 1 across ranks too
    return image, text, labels


def finding_features():
    """One embedded finding text per label, the same on every rank (each rank encodes them itself)."""
    generator = torch.Generator().manual_seed(99)
    return F.normalize(torch.randn(N_LABELS, DIM, generator=generator, dtype=torch.float64), dim=-1)


def compute_loss_and_grads(image, text, labels, loss_fn):
    image, text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    findings = finding_features().requires_grad_(True) if loss_fn.finding_targets else None
    loss = loss_fn(image, text, scale, bias, labels=labels, finding_features=findings)
    loss.backward()
    grads = {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad, "bias": bias.grad}
    if findings is not None:  # replicas, like scale/bias: DDP sums the text tower's gradients over ranks
        grads["findings"] = findings.grad
    return grads


def _worker(rank, world_size, init_file, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        image, text, labels = global_batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for impl in DIST_IMPLS:
            for mode in TARGET_MODES:
                loss_fn = MultiLabelSigLipLoss(rank=rank, world_size=world_size, dist_impl=impl, targets=mode)
                results[f"{impl}/{mode}"] = compute_loss_and_grads(image[rows], text[rows], labels[rows], loss_fn)
            loss_fn = MultiLabelSigLipLoss(rank=rank, world_size=world_size, dist_impl=impl, finding_targets="jaccard")
            results[f"{impl}/{FINDINGS}"] = compute_loss_and_grads(image[rows], text[rows], labels[rows], loss_fn)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_workers(world_size, tmp_path):
    context = mp.start_processes(
        _worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)), nprocs=world_size,
        join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S + 60
    try:
        # join() returns False each time one worker ends while others still run.
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S + 60} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, 3])
def test_every_dist_impl_and_target_mode_matches_single_process(world_size, tmp_path):
    image, text, labels = global_batch(world_size)
    per_rank = run_workers(world_size, tmp_path)
    for mode in (*TARGET_MODES, FINDINGS):
        loss_fn = (MultiLabelSigLipLoss(finding_targets="jaccard") if mode == FINDINGS
                   else MultiLabelSigLipLoss(targets=mode))
        full = compute_loss_and_grads(image, text, labels, loss_fn)
        for impl in DIST_IMPLS:
            ranks = [results[f"{impl}/{mode}"] for results in per_rank]
            where = f"dist_impl={impl}, targets={mode}, world_size={world_size}"
            torch.testing.assert_close(
                sum(r["loss"] for r in ranks), world_size * full["loss"], msg=lambda m: f"loss sum, {where}: {m}")
            for key in ("image", "text"):
                torch.testing.assert_close(
                    torch.cat([r[key] for r in ranks]), world_size * full[key], msg=lambda m: f"{key} grad, {where}: {m}")
            for key in ("scale", "bias", "findings")[:3 if mode == FINDINGS else 2]:
                torch.testing.assert_close(
                    sum(r[key] for r in ranks), world_size * full[key], msg=lambda m: f"{key} grad, {where}: {m}")


def test_cross_rank_pairs_carry_label_targets():
    """The data above is not vacuous: multi-label targets differ from SigLIP's across ranks."""
    image, text, labels = global_batch(2)
    scale, bias = torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64)
    jaccard = MultiLabelSigLipLoss(targets="jaccard")(image, text, scale, bias, labels=labels)
    identity = MultiLabelSigLipLoss(targets="identity")(image, text, scale, bias)
    cross_rank_targets = MultiLabelSigLipLoss().get_targets(labels[:LOCAL_BATCH], labels[LOCAL_BATCH:])
    assert cross_rank_targets.max() == 1.0
    assert not torch.isclose(jaccard, identity)
