"""On CUDA: the loss and the towers give the CPU's results, bf16 autocast trains with finite values
close to fp32, and the loss's cross-rank exchange works over NCCL. Marked `gpu`: they skip without
CUDA (fail with --require-gpu); scripts/gpu_check.sh runs them (docs/gpu.md)."""
import datetime

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from open_clip_ecg.loss import MultiLabelSigLipLoss
from test_loss_distributed import DIST_IMPLS, LOCAL_BATCH, compute_loss_and_grads, global_batch

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
MODEL = "ECG-RN18-RR-CLIPText"  # the PTB-XL recipe's model (quickstart)
TOWERS = ("ECG-RN18-RR-CLIPText", "ECG-ViT1D-CLIPText")


@pytest.fixture(autouse=True)
def full_fp32():
    """TF32 convolutions and matmuls would differ from the CPU's fp32 by about 1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch(model_name, model, n=6, seed=0):
    """ECGs shaped for the model's input channels (5 s at 100 Hz), texts and multi-hot labels."""
    generator = torch.Generator().manual_seed(seed)
    ecg = torch.randn(n, model.visual.trunk.in_chans, 500, generator=generator)
    texts = open_clip.get_tokenizer(model_name)([f"sinus rhythm with finding {i}" for i in range(n)])
    labels = (torch.rand(n, 5, generator=generator) < 0.4).float()
    return ecg, texts, labels


def train_step(model, ecg, texts, labels, device, autocast=False):
    """One forward/backward of the model and the multi-label loss; (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        image, text, scale, bias = model(ecg.to(device), texts.to(device))
        loss = MultiLabelSigLipLoss()(image.float(), text.float(), scale, bias, labels=labels.to(device))
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                                 if p.grad is not None}


def test_loss_and_its_gradients_on_cuda_equal_the_cpus():
    image, text, labels = global_batch(4)  # float64, shared and empty finding sets
    for loss_fn in (MultiLabelSigLipLoss(targets="jaccard"), MultiLabelSigLipLoss(targets="exact"),
                    MultiLabelSigLipLoss(finding_targets="jaccard")):
        on_cpu = compute_loss_and_grads(image, text, labels, loss_fn)
        on_gpu = compute_loss_and_grads(image.to(DEVICE), text.to(DEVICE), labels.to(DEVICE), _on(loss_fn))
        assert on_gpu.keys() == on_cpu.keys()
        for key, value in on_cpu.items():
            torch.testing.assert_close(on_gpu[key].cpu(), value, msg=lambda m: f"{key}: {m}")


def _on(loss_fn):
    """compute_loss_and_grads makes its scale, bias and finding features as float64 CPU tensors:
    move them to the batch's device and dtype (differentiably, so their gradients still arrive)."""
    def call(image, text, scale, bias, labels, finding_features=None):
        like = dict(device=image.device, dtype=image.dtype)
        moved = finding_features.to(**like) if finding_features is not None else None
        return loss_fn(image, text, scale.to(**like), bias.to(**like), labels=labels, finding_features=moved)
    call.finding_targets = loss_fn.finding_targets
    return call


@pytest.mark.parametrize("model_name", TOWERS)
def test_towers_on_cuda_give_the_cpus_embeddings_and_gradients(model_name):
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, init_logit_bias=-5)
    ecg, texts, labels = batch(model_name, model)
    model.eval()
    with torch.no_grad():
        expected = model.encode_image(ecg), model.encode_text(texts)
        model.to(DEVICE)
        got = model.encode_image(ecg.to(DEVICE)).cpu(), model.encode_text(texts.to(DEVICE)).cpu()
    for name, a, b in zip(("ECG", "text"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} embedding: {m}")
    model.train()
    gpu_loss, gpu_grads = train_step(model, ecg, texts, labels, DEVICE)
    cpu_loss, cpu_grads = train_step(model.cpu(), ecg, texts, labels, "cpu")
    torch.testing.assert_close(gpu_loss, cpu_loss, rtol=1e-4, atol=1e-5)
    assert gpu_grads.keys() == cpu_grads.keys() and len(cpu_grads) > 10
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(gpu_grads[name], grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_bf16_autocast_forward_backward_is_finite_and_close_to_fp32():
    """open_clip_train's amp_bf16 on the recipe's model: finite loss and gradients, within bf16's
    precision of the fp32 step."""
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, init_logit_bias=-5).to(DEVICE).train()
    ecg, texts, labels = batch(MODEL, model, n=32)
    fp32_loss, fp32_grads = train_step(model, ecg, texts, labels, DEVICE)
    bf16_loss, bf16_grads = train_step(model, ecg, texts, labels, DEVICE, autocast=True)
    assert torch.isfinite(bf16_loss) and all(bool(torch.isfinite(g).all()) for g in bf16_grads.values())
    torch.testing.assert_close(bf16_loss, fp32_loss, rtol=0.05, atol=0.05)
    a = torch.cat([g.flatten() for g in bf16_grads.values()])
    b = torch.cat([fp32_grads[n].flatten() for n in bf16_grads])
    assert F.cosine_similarity(a, b, dim=0) > 0.95  # the same descent direction


def _nccl_worker(rank, world_size, init_file, out_dir):
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.cuda.set_device(rank)
        image, text, labels = global_batch(world_size)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for impl in DIST_IMPLS:
            loss_fn = MultiLabelSigLipLoss(rank=rank, world_size=world_size, dist_impl=impl)
            grads = compute_loss_and_grads(image[rows].cuda(), text[rows].cuda(), labels[rows].cuda(), _on(loss_fn))
            results[impl] = {key: value.cpu() for key, value in grads.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_loss_exchanges_features_and_labels_over_nccl(tmp_path):
    """Every dist_impl over NCCL, one rank per GPU: the ranks' losses sum to world_size x the
    single-process loss (the relation test_loss_distributed.py checks over gloo)."""
    world_size = torch.cuda.device_count()
    if world_size < 2:
        pytest.skip("NCCL between ranks needs two GPUs (one rank per GPU)")
    mp.start_processes(_nccl_worker, args=(world_size, str(tmp_path / "store"), str(tmp_path)),
                       nprocs=world_size, start_method="spawn").join()
    per_rank = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    image, text, labels = global_batch(world_size)
    full = compute_loss_and_grads(image, text, labels, MultiLabelSigLipLoss())
    for impl in DIST_IMPLS:
        torch.testing.assert_close(sum(r[impl]["loss"] for r in per_rank), world_size * full["loss"])
        torch.testing.assert_close(torch.cat([r[impl]["image"] for r in per_rank]), world_size * full["image"])
