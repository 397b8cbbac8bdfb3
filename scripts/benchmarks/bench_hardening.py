"""What the issue-11 hardening costs: the per-sample schema check when shards are read, and the
memory a record with an absurd sampling rate can take.

Setup (not timed): synthetic 12-lead records (500 Hz, 10 s) written as shards; their raw tar
members read into memory.

* ``checked_decode_vs_unchecked``: samples/s of :class:`open_clip_ecg.data.pipeline.DecodeChecked`
  (npy header compared with the manifest before allocation, labels against the vocabulary, JSON
  bounded) over samples/s of the unchecked decode it replaced (``np.load`` + ``json.loads``), on
  the same members, CPU time of one thread (1.0 = the check is free).
* ``absurd_rate_peak_memory_vs_normal``: peak traced memory of ``preprocess_record`` on a record
  whose header claims 0.01 Hz (refused as ``sampling_rate`` before resampling; before the check it
  asked for an 11 GiB array) over the same on a normal 500 Hz record (<= 1: bounded).

    python scripts/benchmarks/bench_hardening.py [--quick]
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np


def _members(shards):
    samples = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            current = {}
            for info in tar.getmembers():
                key, extension = info.name.split(".", 1)
                if current and current["__key__"] != key:
                    samples.append(current)
                    current = {}
                current.update({"__key__": key, "__url__": str(shard), extension: tar.extractfile(info).read()})
            samples.append(current)
    return samples


def _unchecked(sample):
    from open_clip_ecg.data.shard_format import ECG_MEMBER, LABELS_MEMBER, META_MEMBER, TEXT_MEMBER

    return (np.load(io.BytesIO(sample[ECG_MEMBER]), allow_pickle=False).astype(np.float32),
            json.loads(sample[LABELS_MEMBER]), json.loads(sample[META_MEMBER]), sample[TEXT_MEMBER].decode("utf-8"))


def _rate(fn, samples, repeats):
    start = time.process_time()
    for _ in range(repeats):
        for sample in samples:
            fn(sample)
    return repeats * len(samples) / (time.process_time() - start)


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
    except Exception:  # the refusal is the point
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def run(quick: bool = False, device: str = "cpu") -> dict:
    import torch

    from open_clip_ecg.data.pipeline import DecodeChecked, expand_shards
    from open_clip_ecg.data.preprocess import preprocess_record
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.record import ECGRecord, RecordEntry
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import write_synthetic_dataset
    from open_clip_ecg.leads import STANDARD_LEADS

    torch.set_num_threads(1)
    n, repeats = (32, 2) if quick else (128, 5)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = write_synthetic_dataset(Path(tmp) / "records", n=n, seed=0, progress=False)
        write_shards(get_reader("csv", csv_path), Path(tmp) / "shards",
                     ShardOptions(split_by="random", val_fraction=0, test_fraction=0, shard_size=64, progress=False))
        samples = _members(expand_shards(str(Path(tmp) / "shards"), split="train"))
        decode_checked = DecodeChecked()
        decode_checked(samples[0])  # the folder's schema is read once, then cached
        checked, unchecked = _rate(decode_checked, samples, repeats), _rate(_unchecked, samples, repeats)

    signal = np.random.default_rng(0).standard_normal((12, 5000)).astype(np.float32)
    entry = RecordEntry("r", "r", "p")
    normal = _peak_bytes(lambda: preprocess_record(ECGRecord(entry, signal, 500.0, list(STANDARD_LEADS)), 500, 10))
    absurd = _peak_bytes(lambda: preprocess_record(ECGRecord(entry, signal, 0.01, list(STANDARD_LEADS)), 500, 10))
    return {
        "name": "hardening",
        "figures": {"records": len(samples), "checked_decode_samples_per_s": checked,
                    "unchecked_decode_samples_per_s": unchecked, "normal_record_peak_bytes": normal,
                    "absurd_rate_record_peak_bytes": absurd},
        "ratios": {"checked_decode_vs_unchecked": checked / unchecked,
                   "absurd_rate_peak_memory_vs_normal": absurd / normal},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 records instead of 128")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick), indent=2))


if __name__ == "__main__":
    main()
