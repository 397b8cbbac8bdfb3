"""Shard writing: records/s written against the raw ``wfdb.rdsamp`` read rate of the same records,
with 1 and 2 workers, and peak memory as the number of records grows.

Ratios, all measured in this one run:
* ``write_1_worker_vs_rdsamp`` / ``write_2_workers_vs_rdsamp``: records/s of ``write_shards``
  (read + resample/validate + float16 + tar + sha256 + manifest) over records/s of a bare
  ``wfdb.rdsamp`` loop on the same records (page cache warmed first, so both read from memory).
  1.0 would mean the writer adds nothing to reading.
* ``write_2_workers_vs_1``: parallel speed-up (bounded by the cores actually free).
* ``peak_memory_4n_vs_n``: tracemalloc peak of ``write_shards`` (1 worker) on 4N synthetic records
  over N records; ~1 means memory stays flat (records are streamed, never all held).

Data: PTB-XL at 500 Hz from ``../shared/data/ptbxl`` (or ``$OPEN_CLIP_ECG_SHARED_DATA``); the
synthetic generator when it is absent.

    python scripts/benchmarks/bench_shards.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import wfdb

from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.readers.wfdb_io import record_base
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.data.synthetic import write_synthetic_dataset

SHARED = Path(os.environ.get("OPEN_CLIP_ECG_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


class FirstRecords:
    """The first ``n`` entries of another reader (a picklable wrapper for worker processes)."""

    def __init__(self, reader, n: int):
        self.reader, self.n, self.root = reader, n, getattr(reader, "root", None)

    def entries(self):
        entries = self.reader.entries()
        return [next(entries) for _ in range(self.n)]

    def load(self, entry):
        return self.reader.load(entry)

    def label_names(self):
        return self.reader.label_names()


def _source(quick: bool, tmp: Path):
    """(reader, description) for the rate comparison: PTB-XL 500 Hz, else synthetic records."""
    n = 100 if quick else 353
    if (SHARED / "ptbxl" / "ptbxl_database.csv").is_file():
        return FirstRecords(get_reader("ptbxl", SHARED / "ptbxl", sampling_rate=500), n), f"PTB-XL 500 Hz, {n} records"
    csv_path = write_synthetic_dataset(tmp / "rate", n, seed=0, workers=2, progress=False)
    return get_reader("csv", csv_path), f"synthetic 500 Hz, {n} records (PTB-XL sample absent)"


def rdsamp_rate(paths) -> float:
    start = time.perf_counter()
    for path in paths:
        wfdb.rdsamp(record_base(path))
    return len(paths) / (time.perf_counter() - start)


def write_rate(reader, out: Path, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = write_shards(reader, out, ShardOptions(text="labels", workers=workers, progress=False))
    return manifest["records"]["listed"] / (time.perf_counter() - start)


def peak_memory(reader, out: Path) -> int:
    tracemalloc.start()
    write_shards(reader, out, ShardOptions(text="labels", shard_size=50, progress=False))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Measure; ``device`` is accepted for the common benchmark interface (this is CPU/IO work)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reader, description = _source(quick, tmp)
        paths = [entry.path for entry in reader.entries()]
        rdsamp_rate(paths)  # warm the page cache for both contenders
        raw = rdsamp_rate(paths)
        one = write_rate(reader, tmp / "w1", workers=1)
        two = write_rate(reader, tmp / "w2", workers=2)

        n = 40 if quick else 150
        csv_path = write_synthetic_dataset(tmp / "memory", 4 * n, seed=1, workers=2, progress=False)
        synthetic = get_reader("csv", csv_path)
        peak_n = peak_memory(FirstRecords(synthetic, n), tmp / "m1")
        peak_4n = peak_memory(FirstRecords(synthetic, 4 * n), tmp / "m4")
    return {
        "name": "shards",
        "figures": {
            "data": description,
            "rdsamp_records_per_s": round(raw, 1),
            "write_1_worker_records_per_s": round(one, 1),
            "write_2_workers_records_per_s": round(two, 1),
            "cpu_count": os.cpu_count(),
            f"peak_traced_mb_{n}_records": round(peak_n / 2 ** 20, 2),
            f"peak_traced_mb_{4 * n}_records": round(peak_4n / 2 ** 20, 2),
        },
        "ratios": {
            "write_1_worker_vs_rdsamp": round(one / raw, 3),
            "write_2_workers_vs_rdsamp": round(two / raw, 3),
            "write_2_workers_vs_1": round(two / one, 3),
            "peak_memory_4n_vs_n": round(peak_4n / peak_n, 3),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer records")
    parser.add_argument("--device", default="cpu", help="unused: shard writing runs on CPUs")
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, cli.device), indent=2))
