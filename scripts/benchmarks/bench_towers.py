"""1D-ResNet-18 tower: forward+backward throughput and peak memory at 10 s and 2 s of 12-lead ECG.

Figures: samples/s (wall clock, and on CPU per CPU-second) and peak memory of ``ecg_resnet1d18`` (the trunk open_clip wraps) training
steps (forward, backward, SGD step) at batch x 12 x 5000 (10 s at 500 Hz) and batch x 12 x 1000, and
the same at 5000 with gradient checkpointing. Ratios, all from this one run:

* ``rate_5000_vs_1000``: samples/s at 5000 over samples/s at 1000 (0.2 if cost is linear in length);
* ``signal_throughput_5000_vs_1000``: ECG samples/s at 5000 over at 1000 (1.0 = linear, < 1 worse);
* ``peak_memory_5000_vs_1000``;
* ``grad_ckpt_rate_vs_plain`` / ``grad_ckpt_peak_memory_vs_plain`` at 5000.

Utilisation (figures): FLOPs per sample of a forward+backward (``torch.utils.flop_counter``, see
``utilization.py``), the achieved TFLOP/s at the wall-clock rate, and on CUDA the fraction of the
GPU's dense bf16 peak (from the GPU's name, or ``--peak-tflops``).

Peak memory is what the steps add on top of model and input (activations, gradients, workspace): on
CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the first step; on CPU each
setting runs in a fresh subprocess and reports the growth of ``ru_maxrss`` (peak resident set) over
its steps (tracemalloc cannot see torch's allocator). Rates use the median step time.
On CUDA the steps run under bf16 autocast (open_clip_train's ``amp_bf16``). On CPU they run in fp32
on one thread, and the CPU ratios use process CPU time (``samples_per_cpu_s``): on a CPU shared with
other jobs, wall-clock rates of multi-threaded convolutions varied more than 10x between identical
runs, single-thread CPU time by a few percent.

    python scripts/benchmarks/bench_towers.py [--quick] [--device cuda] [--peak-tflops 989]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from utilization import bf16_peak_tflops, fraction_of_peak, training_step_flops  # noqa: E402

MODEL = "ecg_resnet1d18"


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(samples: int, batch_size: int, steps: int, device: str = "cpu", grad_ckpt: bool = False) -> dict:
    """Time `steps` training steps after one warm-up step; samples/s from the median step time
    (robust to other processes sharing the CPU) and peak memory (MiB) above model + input."""
    import timm

    import open_clip_ecg  # noqa: F401  (registers the towers)

    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(MODEL).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    ecg = torch.randn(batch_size, 12, samples, device=device)
    cuda = torch.device(device).type == "cuda"
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda)
    model.set_grad_checkpointing(grad_ckpt)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            features = model(ecg)
        features.float().square().mean().backward()
        optimizer.step()

    if cuda:
        base = torch.cuda.memory_allocated()  # model + input
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step()  # warm-up: allocator, cuDNN/oneDNN algorithm choice, grads allocated
    step_times, cpu_times = [], []
    for _ in range(steps):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        _sync(device)
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    model.set_grad_checkpointing(False)  # counted after the peak: the model's FLOPs, without recomputation
    with autocast:
        flops = training_step_flops(model, ecg)
    return {"samples_per_s": batch_size / statistics.median(step_times),
            "samples_per_cpu_s": batch_size / statistics.median(cpu_times),
            "peak_memory_mib": peak / 2 ** 20, "gflop_per_sample": flops / batch_size / 1e9}


def _measure_isolated(samples: int, batch_size: int, steps: int, device: str, grad_ckpt: bool) -> dict:
    """On CPU the peak-RSS high-water mark is per process, so each setting gets a fresh one."""
    if torch.device(device).type == "cuda":
        return measure(samples, batch_size, steps, device, grad_ckpt)
    args = json.dumps([samples, batch_size, steps, device, grad_ckpt])
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def utilisation(results: dict, device: str, peak_tflops: float = None) -> dict:
    """Achieved TFLOP/s of each setting and, where the peak is known, the fraction of the bf16 peak."""
    figures = {}
    if torch.device(device).type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
        peak_tflops = peak_tflops or bf16_peak_tflops(figures["gpu"])
    figures["bf16_peak_tflops"] = peak_tflops
    for key, res in results.items():
        figures[f"achieved_tflops_{key}"] = res["gflop_per_sample"] * res["samples_per_s"] / 1e3
        if peak_tflops:
            figures[f"fraction_of_bf16_peak_{key}"] = fraction_of_peak(
                res["gflop_per_sample"] * 1e9, 1 / res["samples_per_s"], peak_tflops)
    return figures


def run(quick: bool = False, device: str = "cpu", peak_tflops: float = None) -> dict:
    batch_size = 8 if quick else 64
    steps = 3 if quick else 5
    results = {
        "5000": _measure_isolated(5000, batch_size, steps, device, False),
        "1000": _measure_isolated(1000, batch_size, steps, device, False),
        "5000_grad_ckpt": _measure_isolated(5000, batch_size, steps, device, True),
    }
    cuda = torch.device(device).type == "cuda"
    figures = {"model": MODEL, "device": device,
               "precision": "amp_bf16" if cuda else "fp32",
               "batch_size": batch_size, "timed_steps": steps, "cpu_threads": None if cuda else 1}
    for key, res in results.items():
        for figure, value in res.items():
            figures[f"{figure}_{key}"] = value
    figures.update(utilisation(results, device, peak_tflops))
    plain, short, ckpt = results["5000"], results["1000"], results["5000_grad_ckpt"]
    rate = "samples_per_s" if cuda else "samples_per_cpu_s"
    return {
        "name": "towers",
        "figures": figures,
        "ratios": {
            "rate_5000_vs_1000": plain[rate] / short[rate],
            "signal_throughput_5000_vs_1000": 5 * plain[rate] / short[rate],
            "peak_memory_5000_vs_1000": plain["peak_memory_mib"] / max(short["peak_memory_mib"], 1e-9),
            "grad_ckpt_rate_vs_plain": ckpt[rate] / plain[rate],
            "grad_ckpt_peak_memory_vs_plain": ckpt["peak_memory_mib"] / max(plain["peak_memory_mib"], 1e-9),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 timed steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, for GPUs not in utilization.BF16_PEAK_TFLOPS")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one isolated setting, JSON args
    cli = parser.parse_args()
    if cli.measure:
        print(json.dumps(measure(*json.loads(cli.measure))))
    else:
        print(json.dumps(run(cli.quick, cli.device, cli.peak_tflops), indent=2))
