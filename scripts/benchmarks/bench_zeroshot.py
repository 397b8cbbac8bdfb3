"""Zero-shot classification throughput: ECGs/s from shards to per-finding probabilities, against the
raw ECG tower's forward rate measured in the same run.

Setup (not timed): synthetic 12-lead records (500 Hz, 10 s) written as shards, a randomly
initialised ``ECG-RN18-CLIPText`` and its zero-shot classifier for the 13 synthetic findings.
Timed, on the same records and batch size:

* ``zeroshot``: the evaluation path, :func:`open_clip_ecg.embed.embed_shards` (read and decode
  the shards, centre-crop and normalise, ECG tower + projection) followed by
  :func:`open_clip_ecg.zeroshot.predict_proba_from_embeddings`;
* ``tower``: ``model.visual.trunk`` (the 1D-ResNet-18 alone) on ready float32 tensors of the same
  shape, in eval mode without gradients.

Ratio ``zeroshot_vs_tower``: zero-shot ECGs/s over tower ECGs/s (1.0 = the data path and the
projection cost nothing). Also reported: building the classifier (text tower over every prompt),
and the bootstrap (1000 resamples) of the metrics for these records. On CPU everything runs on one
thread and rates use process CPU time, which stays stable on a CPU shared with other jobs (wall
clock does not); on CUDA, wall clock with synchronisation.

    python scripts/benchmarks/bench_zeroshot.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

MODEL = "ECG-RN18-CLIPText"


class _Clock:
    """CPU time on CPU (one thread), synchronised wall time on CUDA."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return time.perf_counter()
        return time.process_time()


def _write_shards(root: Path, n: int) -> Path:
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import write_synthetic_dataset

    csv_path = write_synthetic_dataset(root / "records", n=n, seed=0, progress=False)
    write_shards(get_reader("csv", csv_path), root / "shards",
                 ShardOptions(sampling_rate=500, seconds=10, split_by="random", val_fraction=0.0,
                              test_fraction=0.999, shard_size=64, text="labels", progress=False))
    return root / "shards"


def run(quick: bool = False, device: str = "cpu") -> dict:
    import open_clip

    from open_clip_ecg.data.pipeline import expand_shards
    from open_clip_ecg.data.synthetic import FINDINGS
    from open_clip_ecg.embed import embed_shards
    from open_clip_ecg.metrics import bootstrap_intervals
    from open_clip_ecg.tasks import get_task
    from open_clip_ecg.zeroshot import build_zeroshot_classifier, predict_proba_from_embeddings

    clock = _Clock(device)
    if not clock.cuda:
        torch.set_num_threads(1)
    n_records, batch_size = (32, 16) if quick else (256, 64)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, device=device).eval()
    tokenizer = open_clip.get_tokenizer(MODEL)
    with tempfile.TemporaryDirectory() as tmp:
        shards = expand_shards(str(_write_shards(Path(tmp), n_records)), split="test")

        start = clock()
        classifier = build_zeroshot_classifier(model, tokenizer, {code: [name] for code, name in FINDINGS.items()})
        classifier_s = clock() - start

        embed_shards(model, shards[:1], batch_size=batch_size)  # warm-up: allocator, oneDNN kernels
        start = clock()
        embedded = embed_shards(model, shards, batch_size=batch_size)
        with torch.no_grad():
            probabilities = predict_proba_from_embeddings(
                torch.from_numpy(embedded.embeddings).to(device), classifier, model.logit_scale.exp(),
                model.logit_bias).cpu().numpy()
        zeroshot_s = clock() - start
        n = len(embedded.records.keys)

    trunk = model.visual.trunk
    ecg = torch.randn(batch_size, 12, embedded.n_samples, device=device)
    with torch.no_grad():
        trunk(ecg)  # warm-up
        start = clock()
        for first in range(0, n, batch_size):
            trunk(ecg[:min(batch_size, n - first)])
        tower_s = clock() - start

    labels = get_task("labels", vocabulary=[{"id": i, "code": c, "name": c} for i, c in enumerate(FINDINGS)])
    y, _ = labels.multi_hot(embedded.records.label_codes, embedded.records.metas)
    start = time.process_time()
    bootstrap_intervals(y, probabilities, np.full(y.shape[1], 0.5), n_bootstrap=1000, seed=0)
    bootstrap_s = time.process_time() - start

    zeroshot_rate, tower_rate = n / zeroshot_s, n / tower_s
    timing = "wall clock (CUDA synchronised)" if clock.cuda else "process CPU time, 1 thread"
    return {
        "name": "zeroshot",
        "figures": {
            "model": MODEL, "device": device, "timing": timing, "records": n, "batch_size": batch_size,
            "samples_per_ecg": int(embedded.n_samples), "findings": len(FINDINGS),
            "zeroshot_ecgs_per_s": zeroshot_rate, "tower_ecgs_per_s": tower_rate,
            "classifier_build_s": classifier_s, "bootstrap_1000_cpu_s": bootstrap_s,
        },
        "ratios": {"zeroshot_vs_tower": zeroshot_rate / tower_rate},
    }


def run_from_command_line(run_fn, doc: str) -> None:
    """The command line of a benchmark over 256 records (`--quick`: 32) on one `--device`; prints its JSON."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 records instead of 256")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(json.dumps(run_fn(quick=args.quick, device=args.device), indent=2))


def main() -> None:
    run_from_command_line(run, __doc__)


if __name__ == "__main__":
    main()
