"""Costs that grow linearly: shard writing, training and evaluation on generated MIMIC-IV-ECG data.

Generates records in the MIMIC-IV-ECG release layout (``record_list.csv``,
``machine_measurements.csv`` with ``report_0..17``, ``files/p1000/p1000NNNN/sNNNNNNNN/NNNNNNNN.{hea,dat}``,
12 leads, 500 Hz, 10 s; signals from :mod:`open_clip_ecg.data.synthetic`) at two sizes into a
temporary folder (deleted at the end), and measures in fresh processes (wall and CPU time: user +
system of the process and its workers; reading and writing run in ``--rounds`` interleaved rounds,
every step at both sizes in each, the best of each step kept, so a shared machine's load falls on
both sizes alike):

* ``shards`` (the writer, 500 Hz, 10 s, default options: no stored beats) with 1 and 2 workers:
  seconds per record and peak RSS (the main process; the largest worker), and with ``--beats``
  at 1 worker;
* raw ``wfdb.rdsamp`` of every record in one process: the writer's reference;
* one epoch of ``train`` with ``--dataset-resampled`` (a fixed ``--train-num-samples``, so its time
  should not depend on the collection) and ``evaluate`` of the larger set's test split.

Ratios (aims): ``shards_time_per_record_large_vs_small_{1,2}_workers`` <= 1.2 (wall; ``shards_cpu_...``
in CPU time), ``shards_peak_rss_large_vs_small_{1,2}_workers`` <= 1.2, ``writer_vs_raw_wfdb_1_worker``
>= 0.8 (records/s of the writer over records/s of reading alone; ``..._cpu`` per CPU second).

    python scripts/benchmarks/bench_scale.py [--sizes 2000 20000] [--rounds 3] [--quick] [--keep DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from open_clip_ecg.data.readers.mimic_iv_ecg import MEASUREMENT_COLUMNS, REPORT_COLUMNS
from open_clip_ecg.data.synthetic import generate_record
from open_clip_ecg.leads import STANDARD_LEADS

MIMIC_LEADS = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]  # the release's order
STATEMENTS = ["Sinus rhythm", "Normal ECG", "Sinus bradycardia", "Sinus tachycardia", "Atrial fibrillation",
              "Left axis deviation", "Low QRS voltages in limb leads", "Borderline ECG", "Abnormal ECG",
              "Inferior infarct - age undetermined", "Nonspecific T wave abnormality", "Left ventricular hypertrophy",
              "RBBB", "Prolonged QT interval", "Poor R wave progression - probable normal variant"]
TEMPLATES = 32  # distinct synthetic signals, each shifted and rescaled per record (generation stays cheap)


# --------------------------------------------------------------------------------------------
# Data in the MIMIC-IV-ECG layout
# --------------------------------------------------------------------------------------------

def write_mimic_layout(root: Path, n: int, seed: int = 0) -> Path:
    """`n` records in the MIMIC-IV-ECG release layout under `root`; returns `root`."""
    rng = np.random.default_rng(seed)
    order = [STANDARD_LEADS.index(name) for name in MIMIC_LEADS]
    templates = [generate_record(i, seed=seed, sampling_rate=500, seconds=10).signal[order] for i in range(TEMPLATES)]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "record_list.csv", "w", newline="") as records, \
            open(root / "machine_measurements.csv", "w", newline="") as measurements:
        record_rows = csv.writer(records)
        record_rows.writerow(["subject_id", "study_id", "file_name", "ecg_time", "path"])
        measurement_rows = csv.writer(measurements)
        measurement_rows.writerow(["subject_id", "study_id", *MEASUREMENT_COLUMNS[:1], "ecg_time", *REPORT_COLUMNS,
                                   *MEASUREMENT_COLUMNS[1:]])
        for i in range(n):
            subject, study = 10000000 + i // 3, 40000000 + i
            folder = Path("files") / f"p{str(subject)[:4]}" / f"p{subject}" / f"s{study}"
            (root / folder).mkdir(parents=True, exist_ok=True)
            signal = np.roll(templates[i % TEMPLATES], int(rng.integers(0, 5000)), axis=1)
            signal = signal * rng.uniform(0.8, 1.2) + rng.normal(0, 0.01, size=signal.shape)
            _write_wfdb(root / folder, str(study), np.clip(np.rint(signal * 200), -32767, 32767).astype(np.int16))
            time_of = f"2180-01-{1 + i % 28:02d} 10:{i % 60:02d}:00"
            record_rows.writerow([subject, study, f"{folder}/{study}", time_of, f"{folder}/{study}"])
            chosen = list(rng.choice(STATEMENTS, size=int(rng.integers(1, 5)), replace=False))
            values = [str(rng.integers(100, 999)) for _ in MEASUREMENT_COLUMNS[1:]]
            measurement_rows.writerow([subject, study, "6848", time_of, *chosen,
                                       *[""] * (len(REPORT_COLUMNS) - len(chosen)), *values])
    return root


def _write_wfdb(folder: Path, name: str, digital: np.ndarray) -> None:
    """A format-16 WFDB record as the release writes it (``wfdb.wrsamp`` costs more than the
    benchmark it feeds): header with gain 200/mV, init values and checksums; ``digital`` is
    ``[12, T]`` int16."""
    checksums = (digital.astype(np.int64).sum(axis=1) + 32768) % 65536 - 32768
    lines = [f"{name} 12 500 {digital.shape[1]}"]
    lines += [f"{name}.dat 16 200/mV 16 0 {digital[i, 0]} {checksums[i]} 0 {lead}" for i, lead in enumerate(MIMIC_LEADS)]
    (folder / f"{name}.hea").write_text("\n".join(lines) + "\n")
    digital.T.astype("<i2").tofile(folder / f"{name}.dat")  # interleaved frames


# --------------------------------------------------------------------------------------------
# Measurements, each in a fresh process (its own peak RSS)
# --------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys, time
    def cpu():  # user + system seconds of this process and its finished workers
        return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                            resource.RUSAGE_CHILDREN)))
    job = json.loads(sys.argv[1])
    start = time.perf_counter()
    {body}
    seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": own,
                      "peak_rss_worker_mb": children, **result}}))
""")

_RAW_WFDB = """
import glob, wfdb
from open_clip_ecg.data.readers.mimic_iv_ecg import MIMICIVECGReader
paths = [e.path for e in MIMICIVECGReader(job["root"]).entries()]
start, cpu_start = time.perf_counter(), cpu()  # after the imports; the tables are the writer's job
for path in paths:
    wfdb.rdsamp(path)
result = {"records": len(paths)}
"""

_SHARDS = """
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.readers.mimic_iv_ecg import MIMICIVECGReader  # imported by get_reader; as _RAW_WFDB does
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
start, cpu_start = time.perf_counter(), cpu()  # after the imports
manifest = write_shards(get_reader("mimic-iv-ecg", job["root"]), job["out"], ShardOptions(
    sampling_rate=500, seconds=10, shard_size=1000, workers=job["workers"], beats=job["beats"], progress=False))
result = {"records": manifest["records"]["listed"], "written": manifest["records"]["written"]}
"""

_TRAIN = """
import open_clip_ecg.train as train
start, cpu_start = time.perf_counter(), cpu()  # after the imports
assert train.main(job["argv"]) == 0
result = {}
"""

_EVALUATE = """
from open_clip_ecg.cli import main
start, cpu_start = time.perf_counter(), cpu()  # after the imports
assert main(job["argv"]) == 0
result = {}
"""


def _child(body: str, job: dict) -> dict:
    code = _CHILD.format(body=textwrap.dedent(body))
    out = subprocess.run([sys.executable, "-c", code, json.dumps(job)], capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
    if out.returncode != 0:
        raise RuntimeError(f"benchmark step failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best(runs: list) -> dict:
    """One figure from repeated runs of a step: the least wall and CPU time (a shared machine slows
    some runs, never speeds one up) and the largest peak memory."""
    best = dict(runs[0])
    for run in runs[1:]:
        for key in ("seconds", "cpu_seconds"):
            best[key] = min(best[key], run[key])
        for key in ("peak_rss_mb", "peak_rss_worker_mb"):
            best[key] = max(best[key], run[key])
    return best


WRITER_RUNS = ((1, False), (1, True), (2, False))  # (workers, --beats); the default (no beats) is trained on


def measure_writing(work: Path, roots: dict, rounds: int) -> dict:
    """{size: {step: figures}} for raw wfdb reading and the writer runs: `rounds` rounds, each
    running every step at every size in turn (interleaved), the best of each step kept."""
    runs = {n: {} for n in roots}
    for _ in range(rounds):
        for n, root in roots.items():
            runs[n].setdefault("raw_wfdb", []).append(_child(_RAW_WFDB, {"root": str(root)}))
            for workers, beats in WRITER_RUNS:
                out = work / f"shards-{n}-{workers}{'-beats' if beats else ''}"
                shutil.rmtree(out, ignore_errors=True)
                name = f"shards_{workers}_workers" + ("_beats" if beats else "")
                runs[n].setdefault(name, []).append(
                    _child(_SHARDS, {"root": str(root), "out": str(out), "workers": workers, "beats": beats}))
    return {n: {step: _best(r) for step, r in steps.items()} for n, steps in runs.items()}


def measure_training(work: Path, n: int, train_samples: int, batch_size: int) -> dict:
    """One epoch of ``--dataset-resampled`` training on the size-`n` shards."""
    logs = work / f"logs-{n}"
    figures = _child(_TRAIN, {"argv": [
        "--model", "ECG-RN18-CLIPText", "--train-data", str(work / f"shards-{n}-1" / "train-*.tar"),
        "--dataset-resampled", "--train-num-samples", str(train_samples), "--batch-size", str(batch_size),
        "--epochs", "1", "--workers", "1", "--lr", "1e-3", "--warmup", "1", "--logs", str(logs), "--name", "scale",
        "--seed", "0", "--ecg-seconds", "2.5", "--save-frequency", "1", "--log-every-n-steps", "1000"]})
    return {**figures, "samples": train_samples, "checkpoint": str(logs / "scale" / "checkpoints" / "epoch_1.pt")}


def run(quick: bool = False, device: str = "cpu", sizes=None, keep=None, rounds: int = 3) -> dict:
    sizes = sorted(sizes or ((40, 400) if quick else (2000, 20000)))
    small, large = sizes[0], sizes[-1]
    train_samples, batch_size = (16, 8) if quick else (64, 16)
    rounds = 1 if quick else rounds
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    try:
        roots = {n: write_mimic_layout(work / f"mimic-{n}", n) for n in (small, large)}
        per_size = measure_writing(work, roots, rounds)
        for n in (small, large):
            per_size[n]["train_resampled_epoch"] = measure_training(work, n, train_samples, batch_size)
        test = work / f"shards-{large}-1"
        evaluation = _child(_EVALUATE, {"argv": [
            "evaluate", "--model", "ECG-RN18-CLIPText", "--pretrained", per_size[large]["train_resampled_epoch"]["checkpoint"],
            "--data", str(test), "--split", "test", "--task", "labels", "--batch-size", "64",
            "--bootstrap", "0", "--out", str(work / "eval")]})
        test_records = json.loads((test / "manifest.json").read_text())["counts"]["test"]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    figures = {"sizes": [small, large], "device": device, "rounds": rounds}
    for n, f in per_size.items():
        figures[f"raw_wfdb_records_per_s_{n}"] = f["raw_wfdb"]["records"] / f["raw_wfdb"]["seconds"]
        figures[f"raw_wfdb_records_per_cpu_s_{n}"] = f["raw_wfdb"]["records"] / f["raw_wfdb"]["cpu_seconds"]
        for workers, beats in WRITER_RUNS:
            step = f"{workers}_workers" + ("_beats" if beats else "")
            s = f[f"shards_{step}"]
            figures[f"shards_ms_per_record_{n}_{step}"] = 1000 * s["seconds"] / s["records"]
            figures[f"shards_cpu_ms_per_record_{n}_{step}"] = 1000 * s["cpu_seconds"] / s["records"]
            figures[f"shards_peak_rss_mb_{n}_{step}"] = s["peak_rss_mb"]
            figures[f"shards_peak_rss_worker_mb_{n}_{step}"] = s["peak_rss_worker_mb"]
        t = f["train_resampled_epoch"]
        figures[f"train_resampled_epoch_s_{n}"] = t["seconds"]
        figures[f"train_resampled_peak_rss_mb_{n}"] = t["peak_rss_mb"]
    figures["train_resampled_samples"] = train_samples
    figures[f"evaluate_test_records_{large}"] = test_records
    figures[f"evaluate_s_{large}"] = evaluation["seconds"]
    figures[f"evaluate_peak_rss_mb_{large}"] = evaluation["peak_rss_mb"]

    def per_record(n, w, kind="ms"):
        return figures[f"shards_{kind}_per_record_{n}_{w}_workers"]

    ratios = {}
    for w in (1, 2):
        ratios[f"shards_time_per_record_large_vs_small_{w}_workers"] = per_record(large, w) / per_record(small, w)
        ratios[f"shards_cpu_time_per_record_large_vs_small_{w}_workers"] = (per_record(large, w, "cpu_ms")
                                                                             / per_record(small, w, "cpu_ms"))
        ratios[f"shards_peak_rss_large_vs_small_{w}_workers"] = (figures[f"shards_peak_rss_mb_{large}_{w}_workers"]
                                                                  / figures[f"shards_peak_rss_mb_{small}_{w}_workers"])
    for n in (small, large):
        ratios[f"writer_vs_raw_wfdb_1_worker_{n}"] = (1000 / per_record(n, 1)) / figures[f"raw_wfdb_records_per_s_{n}"]
        ratios[f"writer_vs_raw_wfdb_1_worker_cpu_{n}"] = ((1000 / per_record(n, 1, "cpu_ms"))
                                                          / figures[f"raw_wfdb_records_per_cpu_s_{n}"])
        ratios[f"writer_with_beats_vs_raw_wfdb_1_worker_{n}"] = (
            (1000 / figures[f"shards_ms_per_record_{n}_1_workers_beats"]) / figures[f"raw_wfdb_records_per_s_{n}"])
    ratios["train_resampled_epoch_time_large_vs_small"] = (figures[f"train_resampled_epoch_s_{large}"]
                                                           / figures[f"train_resampled_epoch_s_{small}"])
    ratios["train_resampled_peak_rss_large_vs_small"] = (figures[f"train_resampled_peak_rss_mb_{large}"]
                                                         / figures[f"train_resampled_peak_rss_mb_{small}"])
    return {"name": "scale", "figures": figures, "ratios": ratios}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 and 400 records: a smoke run")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, help="the two collection sizes (default 2000 20000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the reading and writing steps")
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, cli.device, cli.sizes, cli.keep, cli.rounds), indent=2))
