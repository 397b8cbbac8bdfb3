"""The one-time check of the GPU path (run through ``scripts/gpu_check.sh``; docs/gpu.md).

On a CUDA machine, in under 8 minutes on one GPU:

1. the tests marked ``gpu`` (``pytest -m gpu --require-gpu``: the loss and towers on CUDA against
   the CPU, bf16 autocast, the loss over NCCL with two GPUs or more);
2. a short bf16 (``amp_bf16``) training of the PTB-XL recipe (the quickstart's model and flags) on
   synthetic shards, ``torchrun --nproc_per_node=<GPUs>`` over NCCL, with validation and zero-shot;
3. the benchmarks with ``--device cuda`` (``--compile``: the training step under torch.compile too).

It prints the ECG tower's achieved fraction of the GPU's dense bf16 peak and the share of each
training step spent waiting for data, and writes everything to ``OUT/gpu_check.json``. Without
CUDA it refuses (exit 1) before doing anything: a skipped check must never read as a passed one.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "scripts" / "benchmarks")]  # this checkout's code, as the steps run it

N_RECORDS = 2048   # synthetic records (100 Hz, 10 s), 10 % of them for validation
EPOCHS = 2
BATCH_SIZE = 64    # per GPU


class CheckFailed(Exception):
    """One step failed: its message is the one line the user sees."""


def require_cuda():
    """(number of GPUs, name of the first); raises CheckFailed without CUDA or NCCL."""
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise CheckFailed(f"CUDA is not available (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                          "this script checks the GPU path and must run on a machine with an NVIDIA GPU. "
                          "Nothing was checked.")
    if not dist.is_nccl_available():
        raise CheckFailed(f"this torch {torch.__version__} has no NCCL: multi-GPU training cannot run")
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def recipe_train_args(shards: Path, logs: Path, name: str, workers: int, precision: str = "amp_bf16"):
    """`open_clip_ecg.train` flags of the quickstart's PTB-XL recipe (its model, crop and training
    flags), shortened to EPOCHS epochs with validation and zero-shot at the end."""
    from open_clip_ecg.quickstart import SOURCES

    recipe = SOURCES["ptbxl"]
    return ["--model", recipe.model, "--train-data", str(shards / "train-*.tar"),
            "--val-data", str(shards / "val-*.tar"), "--batch-size", str(BATCH_SIZE), "--epochs", str(EPOCHS),
            "--lr", "1e-3", "--precision", precision, "--warmup", "10", "--wd", "0.05", "--workers", str(workers),
            "--logs", str(logs), "--name", name, "--seed", "0", "--save-frequency", str(EPOCHS),
            "--zeroshot-frequency", str(EPOCHS), "--val-frequency", str(EPOCHS), "--report-to", "tensorboard",
            "--log-every-n-steps", "5", "--ecg-init-logit-bias", "-4", "--ecg-seconds", str(recipe.crop_seconds),
            *recipe.train_flags]


def run(step: str, command, log: Path, timeout: int, **kwargs) -> str:
    """Run one step, its output to `log` and echoed; CheckFailed naming the step and log on failure."""
    print(f"\n== gpu_check: {step}\n   $ {' '.join(map(str, command))}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                              cwd=REPO, **kwargs)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{step}: no result after {timeout} s") from None
    log.write_text(done.stdout + done.stderr)
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
    print(tail, flush=True)
    if done.returncode != 0:
        raise CheckFailed(f"{step}: exit status {done.returncode} (full output: {log})")
    print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    return done.stdout


def check_training(run_dir: Path, n_gpus: int) -> dict:
    """The training wrote its checkpoint, validated to finite figures, ran bf16 on every GPU."""
    import math

    from utilization import data_wait_shares

    log = (run_dir / "out.log").read_text()
    results = [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    problems = []
    if not (run_dir / "checkpoints" / f"epoch_{EPOCHS}.pt").exists():
        problems.append(f"no epoch_{EPOCHS}.pt")
    if "precision: amp_bf16" not in log:
        problems.append("the run did not train in amp_bf16")
    if n_gpus > 1 and f"world_size: {n_gpus}" not in log:
        problems.append(f"the run did not use {n_gpus} processes")
    last = results[-1] if results else {}
    for key in ("clip_val_loss", "zeroshot-macro-auroc"):
        if not isinstance(last.get(key), (int, float)) or not math.isfinite(last[key]):
            problems.append(f"{key} is {last.get(key)!r}")
    if problems:
        raise CheckFailed(f"bf16 training: {'; '.join(problems)} ({run_dir / 'out.log'})")
    wait = data_wait_shares(log)
    return {"clip_val_loss": last["clip_val_loss"], "zeroshot_macro_auroc": last["zeroshot-macro-auroc"],
            "data_wait_median_share": wait["median_share"], "data_wait_weighted_share": wait["weighted_share"],
            "logging_intervals": wait["intervals"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="work folder (default: a new temporary folder, kept)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak, if its name is not in utilization.BF16_PEAK_TFLOPS")
    parser.add_argument("--compile", action="store_true",
                        help="also time the training step under torch.compile (--torchcompile; adds minutes)")
    args = parser.parse_args(argv)
    try:
        n_gpus, gpu = require_cuda()
        out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check-")).resolve()
        out.mkdir(parents=True, exist_ok=True)
        print(f"gpu_check: {n_gpus} x {gpu}; work folder {out}", flush=True)
        python, summary = sys.executable, {"gpus": n_gpus, "gpu": gpu}
        cpus = os.cpu_count() or 4
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                        os.environ.get("PYTHONPATH")])))

        run("1/3 tests marked gpu", [python, "-m", "pytest", "-q", "-m", "gpu", "--require-gpu", "-p",
                                     "no:cacheprovider", "tests"], out / "tests.log", 300, env=env)
        summary["gpu_tests"] = "passed"

        shards = out / "shards"
        if not (shards / "manifest.json").exists():
            run("2/3 synthetic records", [python, "-m", "open_clip_ecg.cli", "synth", "--output", out / "records",
                                          "--n", N_RECORDS, "--sampling-rate", 100, "--workers", min(8, cpus)],
                out / "synth.log", 300, env=env)
            run("2/3 synthetic shards", [python, "-m", "open_clip_ecg.cli", "shards", "--format", "csv", "--input",
                                         out / "records" / "records.csv", "--output", shards, "--sampling-rate", 100,
                                         "--split-by", "random", "--val-fraction", 0.1, "--test-fraction", 0,
                                         "--text", "both", "--shard-size", 32, "--workers", min(8, cpus),
                                         "--no-progress"], out / "shards.log", 300, env=env)
        n_train_shards = len(list(shards.glob("train-*.tar")))
        workers = max(1, min(4, cpus // n_gpus - 1, n_train_shards // n_gpus))
        name = f"ptbxl-recipe-bf16-{int(time.time())}"
        run(f"2/3 bf16 training of the PTB-XL recipe, torchrun x {n_gpus} (NCCL)",
            [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_gpus}",
             "-m", "open_clip_ecg.train", "--", *recipe_train_args(shards, out / "logs", name, workers)],
            out / "train.log", 360, env=dict(env, OMP_NUM_THREADS="4"))
        summary["training"] = check_training(out / "logs" / name, n_gpus)

        peak = ["--peak-tflops", args.peak_tflops] if args.peak_tflops else []
        towers = json.loads(run("3/3 benchmark: towers", [python, "scripts/benchmarks/bench_towers.py", "--device",
                                                          "cuda", *peak], out / "bench_towers.log", 300, env=env))
        training = json.loads(run("3/3 benchmark: training", [python, "scripts/benchmarks/bench_training.py",
                                                              "--device", "cuda", *(["--compile"] if args.compile else [])],
                                  out / "bench_training.log", 600 if args.compile else 300, env=env))
        summary["benchmarks"] = {"towers": towers, "training": training}
    except CheckFailed as failure:
        print(f"\ngpu_check: FAILED: {failure}", file=sys.stderr)
        return 1
    figures = towers["figures"]
    print("\n== gpu_check: PASSED")
    for length in ("5000", "1000"):
        fraction = figures.get(f"fraction_of_bf16_peak_{length}")
        print(f"   ECG tower (12 x {length}, bf16, batch {figures['batch_size']}): "
              f"{figures[f'achieved_tflops_{length}']:.1f} TFLOP/s"
              + (f" = {100 * fraction:.1f}% of the {figures['bf16_peak_tflops']:g} TFLOP/s bf16 peak" if fraction
                 else " (peak unknown for this GPU: pass --peak-tflops)"))
    trained = summary["training"]
    print(f"   data wait: {100 * trained['data_wait_median_share']:.1f}% of each training step (median over "
          f"{trained['logging_intervals']} logging intervals; {100 * trained['data_wait_weighted_share']:.1f}% "
          "of all step time)")
    print(f"   bf16 training: clip_val_loss {trained['clip_val_loss']:.4f}, zero-shot macro AUROC "
          f"{trained['zeroshot_macro_auroc']:.3f}; summary in {out / 'gpu_check.json'}")
    from open_clip_ecg.atomic import write_json_atomic

    write_json_atomic(out / "gpu_check.json", summary, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
