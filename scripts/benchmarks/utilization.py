"""How well a GPU is used: the FLOPs of a training step, the fraction of the GPU's bf16 peak they
reach, and the share of each training step spent waiting for data.

Used by ``bench_towers.py`` (fraction of peak) and ``scripts/gpu_check.sh`` (both); everything here
runs on CPU too, so the accounting is tested without a GPU (tests/test_gpu_check.py).

* FLOPs are counted by ``torch.utils.flop_counter`` over one forward and backward (the convention
  of "model FLOPs utilisation": recomputation under gradient checkpointing is not counted).
* Peaks are the vendors' dense (no sparsity) bf16 tensor-core figures for a few common GPUs,
  matched on ``torch.cuda.get_device_name()``; any other GPU needs ``--peak-tflops``.
* The data wait comes from open_clip_train's own log lines (``Data (t): D Batch (t): B``, averages
  over each logging interval): ``D / B`` is the share of a step the loop spent in ``next(loader)``.

    python scripts/benchmarks/utilization.py data-wait logs/RUN/out.log
"""
from __future__ import annotations

import argparse
import re
import statistics
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

# (pattern on the device name, dense bf16 TFLOP/s); the first match wins, so the specific come first
BF16_PEAK_TFLOPS: Tuple[Tuple[str, float], ...] = (
    (r"B200", 2250.0),
    (r"H200", 989.0),          # also GH200
    (r"H100.*NVL", 835.0),
    (r"H100.*PCIe", 756.0),
    (r"H100", 989.0),          # SXM5 (HBM3)
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"L40\b", 181.0),
    (r"\bL4\b", 121.0),
    (r"\bA10\b", 125.0),
)

_LOG_LINE = re.compile(r"Train Epoch: (?P<epoch>\d+) .*?Data \(t\): (?P<data>[\d.]+) Batch \(t\): (?P<batch>[\d.]+)")


def bf16_peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU named `device_name` (TFLOP/s), or None when not in the table."""
    for pattern, peak in BF16_PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return peak
    return None


def training_step_flops(model: torch.nn.Module, batch: torch.Tensor,
                        loss: Callable[[torch.Tensor], torch.Tensor] = lambda out: out.float().square().mean()) -> int:
    """FLOPs of one forward and backward of `model` on `batch` (``torch.utils.flop_counter``);
    gradients are left on the parameters as a training step would."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss(model(batch)).backward()
    return int(counter.get_total_flops())


def fraction_of_peak(flops_per_step: float, seconds_per_step: float, peak_tflops: float) -> float:
    """Achieved FLOP/s over the peak: ``flops / seconds / (peak * 1e12)``."""
    if seconds_per_step <= 0 or peak_tflops <= 0:
        raise ValueError(f"seconds per step ({seconds_per_step}) and peak ({peak_tflops} TFLOP/s) must be > 0")
    return flops_per_step / seconds_per_step / (peak_tflops * 1e12)


def data_wait_shares(log_text: str) -> Dict[str, object]:
    """The share of each training step spent waiting for data, from open_clip_train's log.

    Each ``Train Epoch`` line gives the interval's mean data time and mean step time; an epoch's
    first line (the first step: workers starting, kernels being chosen) is left out when the epoch
    has others. Returns the per-interval shares, their median and the time-weighted share."""
    by_epoch: Dict[int, list] = {}
    for match in _LOG_LINE.finditer(log_text):
        by_epoch.setdefault(int(match["epoch"]), []).append((float(match["data"]), float(match["batch"])))
    intervals = [pair for lines in by_epoch.values() for pair in (lines[1:] if len(lines) > 1 else lines)]
    intervals = [(data, batch) for data, batch in intervals if batch > 0]
    if not intervals:
        raise ValueError("no 'Train Epoch ... Data (t): ... Batch (t): ...' lines with a step time in the log")
    shares = [data / batch for data, batch in intervals]
    return {"intervals": len(shares), "shares": shares, "median_share": statistics.median(shares),
            "weighted_share": sum(d for d, _ in intervals) / sum(b for _, b in intervals)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("data-wait", help="share of each step spent waiting for data, from an out.log")
    wait.add_argument("log", help="open_clip_train's out.log")
    args = parser.parse_args(argv)
    with open(args.log, encoding="utf-8") as f:
        figures = data_wait_shares(f.read())
    print(f"data wait: {100 * figures['median_share']:.1f}% of each step (median over {figures['intervals']} "
          f"logging intervals; {100 * figures['weighted_share']:.1f}% of all step time)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
