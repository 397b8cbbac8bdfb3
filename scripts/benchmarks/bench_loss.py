"""Loss cost: MultiLabelSigLipLoss (Jaccard / exact targets) relative to open_clip's SigLipLoss.

Forward + backward (gradients w.r.t. both feature matrices, logit scale and bias) at batch 1024,
embed dim 256 and 50 findings (~3 per ECG, as in PTB-XL), single process. The multi-label loss
adds one [B, n_labels] x [n_labels, B] matmul for the intersections and a soft-target BCE; the
aim is <= 1.5x SigLipLoss. Losses are timed interleaved (A, B, C, A, B, C, ...) and compared by
median, so load from other processes on a shared machine hits all of them alike. On CPU they run
on one thread (restored afterwards): with several, an op waits for whichever thread another process
has descheduled, which measures the machine's load rather than the loss.

    python scripts/benchmarks/bench_loss.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from open_clip_ecg.loss import MultiLabelSigLipLoss

BATCH, DIM, N_LABELS, FINDINGS_PER_ECG = 1024, 256, 50, 3


def _inputs(device, dtype):
    generator = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    text = F.normalize(torch.randn(BATCH, DIM, generator=generator), dim=-1)
    labels = torch.rand(BATCH, N_LABELS, generator=generator) < FINDINGS_PER_ECG / N_LABELS
    features = [t.to(device, dtype).requires_grad_(True) for t in (image, text)]
    scale_and_bias = [torch.tensor(v, device=device, dtype=dtype, requires_grad=True) for v in (10.0, -10.0)]
    return features + scale_and_bias, labels.to(device)


def _step(loss_fn, inputs, labels):
    """One forward + backward; returns its wall time in seconds."""
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss = loss_fn(*inputs) if labels is None else loss_fn(*inputs, labels=labels)
    torch.autograd.grad(loss, inputs)
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _time_interleaved(candidates, inputs, labels, repeats, warmup):
    times = {name: [] for name in candidates}
    for i in range(warmup + repeats):
        for name, (loss_fn, needs_labels) in candidates.items():
            elapsed = _step(loss_fn, inputs, labels if needs_labels else None)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


def run(quick: bool = False, device: str = "cpu") -> dict:
    candidates = {
        "siglip": (SigLipLoss(), False),
        "jaccard": (MultiLabelSigLipLoss(targets="jaccard"), True),
        "exact": (MultiLabelSigLipLoss(targets="exact"), True),
    }
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.device(device).type == "cuda" else [])
    repeats, warmup = (5, 2) if quick else (40, 5)
    figures, ratios = {"batch": BATCH, "embed_dim": DIM, "n_labels": N_LABELS, "repeats": repeats}, {}
    threads = torch.get_num_threads()
    for dtype in dtypes:
        inputs, labels = _inputs(device, dtype)
        try:
            if not inputs[0].is_cuda:
                torch.set_num_threads(1)
            medians = _time_interleaved(candidates, inputs, labels, repeats, warmup)
        finally:
            torch.set_num_threads(threads)
        suffix = str(dtype).removeprefix("torch.")
        for name, seconds in medians.items():
            figures[f"{name}_fwd_bwd_ms_{suffix}"] = round(seconds * 1e3, 3)
        for name in ("jaccard", "exact"):
            ratios[f"{name}_vs_siglip_{suffix}"] = round(medians[name] / medians["siglip"], 3)
    return {"name": "loss", "device": device, "figures": figures, "ratios": ratios}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick, device=args.device), indent=2))


if __name__ == "__main__":
    main()
