"""Run every benchmark in one process and write benchmark.json plus a markdown table of ratios.

    python scripts/benchmark.py [--out DIR] [--quick] [--device cuda] [--only towers loss ...]

Each ``scripts/benchmarks/bench_<area>.py`` exposes ``run(quick, device) -> {"name", "figures",
"ratios"}``; every ratio compares two things measured in the same run, so the figures mean
something on a loaded or unknown machine.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from open_clip_ecg.atomic import write_json_atomic, write_text_atomic

BENCH_DIR = Path(__file__).resolve().parent / "benchmarks"
AREAS = ("towers", "loss", "shards", "training", "zeroshot", "hardening", "text_cache", "rr_channels", "classify")


def load_benchmark(area: str):
    path = BENCH_DIR / f"bench_{area}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{area}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def markdown_table(results) -> str:
    lines = ["| benchmark | ratio | value |", "|---|---|---|"]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['name']} | failed | {result['error']} |")
            continue
        for key, value in result["ratios"].items():
            lines.append(f"| {result['name']} | {key} | {value:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmark", help="folder for benchmark.json and benchmark.md")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--only", nargs="+", choices=AREAS, default=list(AREAS))
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is available")

    results = []
    for area in args.only:
        print(f"benchmark {area} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = load_benchmark(area).run(quick=args.quick, device=args.device)
        except Exception as e:  # one failing benchmark is reported, the others still run
            traceback.print_exc()
            result = {"name": area, "error": f"{type(e).__name__}: {e}"}
        result["seconds"] = time.perf_counter() - start
        results.append(result)

    os.makedirs(args.out, exist_ok=True)
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu_threads": torch.get_num_threads(), "device": args.device,
                          "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
              "quick": args.quick, "results": results}
    write_json_atomic(os.path.join(args.out, "benchmark.json"), report, indent=2)
    write_text_atomic(os.path.join(args.out, "benchmark.md"), markdown_table(results))
    print(markdown_table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
