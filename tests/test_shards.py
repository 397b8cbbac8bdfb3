"""Shard writer: sample format, manifest, vocabulary, splits, determinism, resuming, bad records, CLI,
and the real PTB-XL / CinC samples in ../shared/data (skipped when absent)."""
import csv
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import wfdb
from braceexpand import braceexpand

from open_clip_ecg.data import shard_writer
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.readers.csv import CSVReader
from open_clip_ecg.data.record import RecordEntry, RecordError
from open_clip_ecg.data.shard_format import sample_key, shard_pattern
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.data.splits import assign_splits
from open_clip_ecg.data.synthetic import FINDINGS, write_synthetic_dataset
from open_clip_ecg.data.text import compose_label_text, make_text
from open_clip_ecg.data.vocabulary import labels_to_multi_hot, load_vocabulary
from open_clip_ecg.leads import STANDARD_LEADS

OPTIONS = dict(shard_size=6, split_by="patient", val_fraction=0.2, test_fraction=0.2, progress=False)


def dir_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir())}


def tar_samples(path):
    """{key: {extension: bytes}} in file order, checking the fixed member fields."""
    samples = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (0, 0, 0, "", "", 0o444)
            key, extension = info.name.split(".", 1)
            samples.setdefault(key, {})[extension] = tar.extractfile(info).read()
    return samples


def read_rows(csv_path):
    with open(csv_path, newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def run_cli(*args):
    return subprocess.run([shutil.which("open-clip-ecg") or "open-clip-ecg", *map(str, args)], capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 30, seed=0, progress=False)


@pytest.fixture(scope="module")
def reference(synth_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    manifest = write_shards(CSVReader(synth_csv), out, ShardOptions(**OPTIONS))
    return out, manifest


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

def test_samples_sizes_manifest_and_vocabulary(synth_csv, reference):
    out, manifest = reference
    rows = read_rows(synth_csv)
    vocabulary = load_vocabulary(out)
    assert [v["code"] for v in vocabulary] == sorted(FINDINGS)
    assert all(v["name"] == FINDINGS[v["code"]] for v in vocabulary)
    sizes = json.loads((out / "sizes.json").read_text())
    names = sorted(p.name for p in out.glob("*.tar"))
    assert sorted(sizes) == names == sorted(s["name"] for s in manifest["shards"])
    assert manifest["counts"]["train"] > 6 and all(manifest["counts"][s] > 0 for s in ("val", "test"))
    assert manifest["records"] == {"listed": 30, "written": 30, "skipped": 0}
    assert manifest["skipped"] == [] and manifest["skip_counts"] == {}
    assert manifest["options"]["sampling_rate"] == 500 and manifest["options"]["seconds"] == 10
    assert manifest["vocabulary"] == vocabulary
    assert json.loads((out / "manifest.json").read_text()) == manifest

    label_counts = {split: Counter() for split in ("train", "val", "test")}
    seen = set()
    for shard in manifest["shards"]:
        path = out / shard["name"]
        assert shard_writer._sha256(path) == shard["sha256"]
        samples = tar_samples(path)
        assert len(samples) == sizes[shard["name"]] == shard["samples"] <= 6
        for key, members in samples.items():
            assert list(members) == ["ecg.npy", "txt", "labels.json", "meta.json"]
            row = rows[key]
            ecg = np.load(io.BytesIO(members["ecg.npy"]), allow_pickle=False)
            assert ecg.dtype == np.float16 and ecg.shape == (12, 5000) and 0.2 < np.abs(ecg).max() < 30
            assert members["txt"].decode() == row["report"]
            labels = json.loads(members["labels.json"])
            assert labels["codes"] == sorted(row["labels"].split(";"))
            assert [vocabulary[i]["code"] for i in labels["ids"]] == labels["codes"]
            meta = json.loads(members["meta.json"])
            assert meta["record_id"] == key and meta["patient_id"] == row["patient"]
            assert meta["source_path"] == row["path"] and meta["split"] == shard["split"]
            assert meta["leads"] == STANDARD_LEADS and meta["sampling_rate"] == 500
            assert meta["report"] == row["report"] and meta["age"] == row["age"] and meta["sex"] == row["sex"]
            label_counts[shard["split"]].update(labels["codes"])
            seen.add(key)
    assert seen == set(rows)
    for entry in vocabulary:
        assert entry["count"] == {split: label_counts[split][entry["code"]] for split in label_counts}
    assert manifest["patterns"]["train"] == shard_pattern([s["name"] for s in manifest["shards"]
                                                           if s["split"] == "train"])

    # webdataset groups the members of each sample under its key
    first = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
    assert {"__key__", "ecg.npy", "txt", "labels.json", "meta.json"} <= set(first)


def test_keys_patterns_and_multi_hot():
    assert sample_key("records500/00000/00001_hr.v2 x") == "records500_00000_00001_hr_v2_x"
    assert shard_pattern(["train-000000.tar"]) == "train-000000.tar"
    assert shard_pattern(["val-000000.tar", "val-000001.tar", "val-000002.tar"]) == "val-{000000..000002}.tar"
    assert labels_to_multi_hot([0, 3], 5).tolist() == [1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match=r"label ids \[7\] out of range"):
        labels_to_multi_hot([7], 5)


def test_text_modes():
    entry = RecordEntry("r1", "/data/r1", "p1", report="sinusbradykardie", labels=["SBRAD", "1AVB"])
    names = {"SBRAD": "sinus bradycardia", "1AVB": "first degree AV block"}
    assert make_text(entry, names, "report") == "sinusbradykardie"
    assert make_text(entry, names, "labels") == "ECG with first degree AV block and sinus bradycardia."
    # the finding sentence first: a text tower's context limit can only cut the report
    assert make_text(entry, names, "both") == "ECG with first degree AV block and sinus bradycardia. sinusbradykardie"
    assert compose_label_text(["b", "A", "c", "b"]) == "ECG with A, b and c."
    assert make_text(RecordEntry("r2", "p", "p", labels=["X"]), {}, "labels") == "ECG with X."
    for mode, reason in (("report", "no_report"), ("labels", "no_labels"), ("both", "no_report")):
        with pytest.raises(RecordError) as err:
            make_text(RecordEntry("r3", "/data/r3", "p"), names, mode)
        assert err.value.reason == reason and err.value.path == "/data/r3"


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["patient", "random"])
def test_no_patient_in_two_splits(method):
    entries = [RecordEntry(f"r{i}", f"r{i}", f"p{i % 37}") for i in range(200)]
    splits = assign_splits(entries, ShardOptions(split_by=method, val_fraction=0.2, test_fraction=0.1, seed=3))
    sides = {}
    for entry, split in zip(entries, splits):
        sides.setdefault(entry.patient_id, set()).add(split)
    assert all(len(s) == 1 for s in sides.values())
    per_split = Counter(next(iter(s)) for s in sides.values())
    assert set(per_split) == {"train", "val", "test"}
    if method == "random":
        assert (per_split["test"], per_split["val"]) == (round(0.1 * 37), round(0.2 * 37))
    # the record order does not matter: `random` permutes the sorted patient ids with the seed
    options = ShardOptions(split_by=method, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert assign_splits(entries[::-1], options)[::-1] == splits
    if method == "patient":  # a patient's side depends only on the patient and the seed, not on the others
        few = [(entry, split) for entry, split in zip(entries, splits) if int(entry.patient_id[1:]) < 10]
        assert assign_splits([entry for entry, _ in few], options) == [split for _, split in few]


def test_reference_shards_have_no_patient_leakage(reference):
    out, manifest = reference
    patients = {}
    for shard in manifest["shards"]:
        for members in tar_samples(out / shard["name"]).values():
            patients.setdefault(json.loads(members["meta.json"])["patient_id"], set()).add(shard["split"])
    assert len(patients) == 24 and all(len(s) == 1 for s in patients.values())


def test_column_and_fold_splits_are_checked(tmp_path):
    entries = [RecordEntry("a", "a", "p1", split="train"), RecordEntry("b", "b", "p1", split="test")]
    with pytest.raises(ValueError, match=r"1 patient\(s\) would appear in two splits: 'p1'"):
        assign_splits(entries, ShardOptions())
    folds = [RecordEntry(f"r{f}", "x", f"p{f}", fold=f) for f in range(1, 11)]
    assert assign_splits(folds, ShardOptions()) == ["train"] * 8 + ["val", "test"]
    with pytest.raises(ValueError, match="record\\(s\\) have no fold"):
        assign_splits(folds + [RecordEntry("z", "z", "z")], ShardOptions(split_by="fold"))


# ---------------------------------------------------------------------------------------------
# Determinism, atomicity, resuming
# ---------------------------------------------------------------------------------------------

def test_same_bytes_across_runs_and_worker_counts(synth_csv, reference, tmp_path):
    out, _ = reference
    write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS, workers=2))
    assert dir_bytes(tmp_path) == dir_bytes(out)


class Crash(Exception):
    pass


def crash_on_call(monkeypatch, owner, name, at, exception=Crash):
    original = getattr(owner, name)
    calls = Counter()

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise exception(f"simulated interruption in {name}")
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("owner, name, at, workers", [
    (shard_writer._ShardFile, "finish", 3, 1),      # the third shard is complete but not renamed
    (shard_writer._ShardFile, "add", 10, 1),        # in the middle of the second shard
    (shard_writer._ShardFile, "add", 26, 2),        # in the val/test splits, with a worker pool
    (shard_writer, "write_folder_json", None, 1),   # every shard done, manifest not yet written
])
def test_interrupted_run_completes_identically(synth_csv, reference, tmp_path, monkeypatch, owner, name, at, workers):
    out, manifest = reference
    if at is None:  # the progress file is written once per shard; the summaries come after
        at = len(manifest["shards"]) + 1
    with monkeypatch.context() as patch:
        crash_on_call(patch, owner, name, at, KeyboardInterrupt if workers > 1 else Crash)
        with pytest.raises((Crash, KeyboardInterrupt)):
            write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS, workers=workers))
    assert not (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("*.tmp*"))  # NAME.tar.tmp, NAME.tmpPID
    assert (tmp_path / "progress.json").exists()
    write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS))
    assert dir_bytes(tmp_path) == dir_bytes(out)


def test_resume_skips_verified_shards_and_redoes_damaged_ones(synth_csv, reference, tmp_path, monkeypatch):
    out, _ = reference
    with monkeypatch.context() as patch:
        crash_on_call(patch, shard_writer._ShardFile, "add", 22)  # after three train shards
        with pytest.raises(Crash):
            write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS))
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert [s["name"] for s in progress["shards"]["train"]] == ["train-000000.tar", "train-000001.tar",
                                                                "train-000002.tar"]
    # as if killed: a stray temp file, and a later shard damaged on disk
    (tmp_path / "train-000003.tar.tmp").write_bytes(b"partial")
    with open(tmp_path / "train-000001.tar", "r+b") as f:
        f.truncate(1000)
    encoded = Counter()
    call = shard_writer.SampleEncoder.__call__
    monkeypatch.setattr(shard_writer.SampleEncoder, "__call__", lambda self, item: encoded.update([1]) or call(self, item))
    write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS))
    assert encoded[1] == 30 - 6  # shard 0 kept; shard 1 failed its checksum, so it and the rest are redone
    assert dir_bytes(tmp_path) == dir_bytes(out)


def test_rerunning_a_finished_job_touches_nothing(synth_csv, reference, tmp_path, monkeypatch):
    """A training may be reading the folder: a re-run of the same job must not delete or rewrite it."""
    out, manifest = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    encoded = Counter()
    call = shard_writer.SampleEncoder.__call__
    monkeypatch.setattr(shard_writer.SampleEncoder, "__call__", lambda self, item: encoded.update([1]) or call(self, item))
    assert write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS)) == manifest
    assert encoded[1] == 0 and {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # a damaged shard, or a manifest without this job's fingerprint, means the job is redone
    with open(tmp_path / "val-000000.tar", "r+b") as f:
        f.truncate(1000)
    write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS))
    assert encoded[1] == 30 and dir_bytes(tmp_path) == dir_bytes(out)
    stale = dict(manifest, fingerprint="another job")
    (tmp_path / "manifest.json").write_text(json.dumps(stale))
    write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**OPTIONS))
    assert encoded[1] == 60 and dir_bytes(tmp_path) == dir_bytes(out)


def test_stale_shards_of_another_job_are_removed(synth_csv, reference, tmp_path):
    out, manifest = reference
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / "notes.txt").write_text("kept")
    new = write_shards(CSVReader(synth_csv), tmp_path, ShardOptions(**dict(OPTIONS, shard_size=100)))
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert new["counts"] == manifest["counts"] and (tmp_path / "notes.txt").exists()


# ---------------------------------------------------------------------------------------------
# Bad records
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corrupt_csv(tmp_path_factory):
    """Two good records and one record per skip reason, in a CSV for the generic reader."""
    root = tmp_path_factory.mktemp("corrupt")
    rows = list(read_rows(write_synthetic_dataset(root, 3, seed=9, progress=False)).values())
    good, spare = rows[:2], rows[2]
    record_dir = root / "records" / "00000"
    digital = wfdb.rdrecord(str(root / spare["path"]), physical=False).d_signal  # [5000, 12] int16

    def write(name, d_signal):
        wfdb.wrsamp(name, fs=500, units=["mV"] * 12, sig_name=list(STANDARD_LEADS), d_signal=d_signal,
                    fmt=["16"] * 12, adc_gain=[1000.0] * 12, baseline=[0] * 12, write_dir=str(record_dir))

    for name in ("truncated", "eleven"):
        write(name, digital)
    with open(record_dir / "truncated.dat", "r+b") as f:
        f.truncate(os.path.getsize(record_dir / "truncated.dat") // 2 + 100)  # not a whole number of frames
    digital[:, :11].astype("<i2").tofile(record_dir / "eleven.dat")  # header: 12 leads, data: 11
    with_nan = digital.copy()
    with_nan[1000:2000, 3] = -32768  # WFDB's invalid sample: NaN in 20% of aVR
    write("nan", with_nan)
    write("flat", np.zeros_like(digital))
    write("short", digital[:1500])
    bad = [("truncated", "truncated"), ("eleven", "lead_count"), ("nan", "non_finite"), ("flat", "flat"),
           ("short", "too_short"), ("missing", "unreadable")]
    table = [{"id": r["id"], "path": r["path"], "report": r["report"], "labels": r["labels"],
              "patient": r["patient"]} for r in good]
    table += [{"id": name, "path": f"records/00000/{name}", "report": "some report", "labels": "NORM",
               "patient": name} for name, _ in bad]
    table.append({"id": "noreport", "path": spare["path"], "report": "", "labels": spare["labels"],
                  "patient": "noreport"})
    csv_path = root / "corrupt.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    expected = dict(bad, noreport="no_report")
    return csv_path, expected


def test_bad_records_are_skipped_and_counted_per_reason(corrupt_csv, tmp_path):
    csv_path, expected = corrupt_csv
    manifest = write_shards(CSVReader(csv_path), tmp_path, ShardOptions(progress=False, split_by="patient",
                                                                         val_fraction=0, test_fraction=0))
    assert manifest["records"] == {"listed": 9, "written": 2, "skipped": 7}
    assert manifest["skip_counts"] == dict(sorted(Counter(expected.values()).items()))
    assert {s["record_id"]: s["reason"] for s in manifest["skipped"]} == expected
    for skip in manifest["skipped"]:
        assert skip["record_id"] in skip["path"] or skip["record_id"] == "noreport"
        assert skip["detail"]
    assert len(tar_samples(tmp_path / "train-000000.tar")) == 2


def test_cli_reports_skips_on_stderr_and_strict_stops_at_the_first(corrupt_csv, tmp_path):
    csv_path, _ = corrupt_csv
    result = run_cli("shards", "--format", "csv", "--input", csv_path, "--output", tmp_path / "lenient",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "skipped 7 of 9 records: flat=1, lead_count=1, no_report=1, non_finite=1, too_short=1, " \
           "truncated=1, unreadable=1" in result.stderr
    assert "eleven.dat (record eleven): lead_count: header lists 12 signals" in result.stderr

    result = run_cli("shards", "--format", "csv", "--input", csv_path, "--output", tmp_path / "strict", "--strict",
                     "--val-fraction", 0, "--test-fraction", 0)  # one split: records in file order
    assert result.returncode == 1
    assert "records/00000/truncated.dat (record truncated): truncated:" in result.stderr
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_cli_synth_then_shards_as_a_user_would(tmp_path):
    result = run_cli("synth", "--output", tmp_path / "data", "--n", 12, "--seed", 4, "--workers", 2)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "records.csv").exists() and (tmp_path / "data" / "label_names.csv").exists()
    result = run_cli("shards", "--format", "csv", "--input", tmp_path / "data" / "records.csv", "--output",
                     tmp_path / "shards", "--shard-size", 4, "--workers", 2, "--text", "labels",
                     "--split-by", "random", "--val-fraction", 0.2, "--test-fraction", 0.2)
    assert result.returncode == 0, result.stderr
    assert "no records skipped (12 listed)" in result.stderr
    flag = next(line for line in result.stdout.splitlines() if line.startswith("train with:"))
    train_pattern = flag.split("--train-data '")[1].split("'")[0]
    val_pattern = flag.split("--val-data '")[1].split("'")[0]
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert train_pattern == str(tmp_path / "shards" / "train-{000000..000001}.tar")
    assert sum(manifest["counts"].values()) == 12 and manifest["options"]["text"] == "labels"
    for pattern in (train_pattern, val_pattern):
        assert all(os.path.exists(p) for p in braceexpand(pattern))
    text = next(iter(tar_samples(tmp_path / "shards" / "train-000000.tar").values()))["txt"].decode()
    assert text.startswith("ECG with ") and text.endswith(".")
    # the same command again: the folder is complete, nothing is rewritten, the summary is the same
    again = run_cli("shards", "--format", "csv", "--input", tmp_path / "data" / "records.csv", "--output",
                    tmp_path / "shards", "--shard-size", 4, "--text", "labels",
                    "--split-by", "random", "--val-fraction", 0.2, "--test-fraction", 0.2)
    assert again.returncode == 0 and "already complete for this job" in again.stderr, again.stderr
    assert again.stdout == result.stdout
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text()) == manifest

    result = run_cli("shards", "--format", "csv", "--input", tmp_path / "data" / "records.csv", "--output",
                     tmp_path / "x", "--label-level", "superclass")
    assert result.returncode == 2 and "--label-level do(es) not apply to --format csv" in result.stderr


# ---------------------------------------------------------------------------------------------
# Real data (../shared/data)
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # 353 real records per rate
@pytest.mark.parametrize("rate, length", [(500, 5000), (100, 1000)])
def test_ptbxl_shards(ptbxl_dir, tmp_path, rate, length):
    reader = get_reader("ptbxl", ptbxl_dir, sampling_rate=rate)
    options = ShardOptions(sampling_rate=rate, val_folds=(7,), test_folds=(8,), shard_size=200, workers=2,
                           progress=False)
    manifest = write_shards(reader, tmp_path, options)
    assert manifest["records"]["listed"] == 353
    # the one documented skip: ecg_id 443 has an empty report (text defaults to the report)
    assert [(s["record_id"], s["reason"]) for s in manifest["skipped"]] == [("ptbxl_00443", "no_report")]
    assert manifest["records"]["written"] == sum(manifest["counts"].values()) == 352
    assert manifest["options"]["split_by"] == "fold" and all(manifest["counts"][s] > 0 for s in manifest["counts"])
    patients = {}
    for shard in manifest["shards"]:
        for key, members in tar_samples(tmp_path / shard["name"]).items():
            ecg = np.load(io.BytesIO(members["ecg.npy"]), allow_pickle=False)
            assert ecg.shape == (12, length) and ecg.dtype == np.float16 and np.isfinite(ecg).all()
            meta = json.loads(members["meta.json"])
            assert meta["fold"] in {"val": {7}, "test": {8}}.get(shard["split"], set(range(1, 7)))
            assert meta["original_sampling_rate"] == rate and members["txt"].decode() == meta["report"]
            patients.setdefault(meta["patient_id"], set()).add(shard["split"])
    assert all(len(s) == 1 for s in patients.values())
    assert any(v["code"] == "NORM" and v["name"] for v in manifest["vocabulary"])


def test_cinc_shards_include_every_record(cinc_dir, tmp_path):
    result_manifest = write_shards(get_reader("cinc", cinc_dir), tmp_path,
                                   ShardOptions(text="labels", split_by="patient", progress=False))
    assert result_manifest["records"] == {"listed": 28, "written": 28, "skipped": 0}
    keys = {key for shard in result_manifest["shards"] for key in tar_samples(tmp_path / shard["name"])}
    assert {"cinc_E00009", "cinc_E00015", "cinc_E00018", "cinc_E00793"} <= keys  # the Georgia header quirk
    for shard in result_manifest["shards"]:
        for members in tar_samples(tmp_path / shard["name"]).values():
            assert np.load(io.BytesIO(members["ecg.npy"]), allow_pickle=False).shape == (12, 5000)
            assert members["txt"].decode().startswith("ECG with ")


# ---------------------------------------------------------------------------------------------
# One format module: the writer and every reader take the format from open_clip_ecg.data.shard_format
# ---------------------------------------------------------------------------------------------

SOURCE = Path(__file__).resolve().parents[1] / "src" / "open_clip_ecg"


def test_no_member_name_literal_outside_the_format_module():
    import ast

    from open_clip_ecg.data import shard_format

    names = set(shard_format.MEMBERS)
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "shard_format.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(SOURCE)}:{node.lineno} {node.value!r}")
    assert not found, f"member names written outside shard_format.py: {found}"


def test_writer_and_reader_take_member_names_from_the_format_module(synth_csv, tmp_path, monkeypatch):
    from open_clip_ecg.data import shard_format
    from open_clip_ecg.data.pipeline import iterate_samples

    renamed = {"ECG_MEMBER": "signal.npy", "TEXT_MEMBER": "text", "LABELS_MEMBER": "findings.json",
               "META_MEMBER": "about.json"}
    for name, value in renamed.items():
        monkeypatch.setattr(shard_format, name, value)
    monkeypatch.setattr(shard_format, "MEMBERS", tuple(renamed.values()))
    monkeypatch.setattr(shard_format, "REQUIRED_MEMBERS", tuple(renamed.values())[:3])
    rows = [dict(row, path=str(synth_csv.parent / row["path"])) for row in list(read_rows(synth_csv).values())[:4]]
    index = tmp_path / "four.csv"
    with open(index, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_shards(CSVReader(index), tmp_path / "out", ShardOptions(sampling_rate=100, split_by="patient",
                                                                  val_fraction=0, test_fraction=0, progress=False))
    samples = tar_samples(tmp_path / "out" / "train-000000.tar")
    assert [list(members) for members in samples.values()] == [list(renamed.values())] * 4
    decoded = list(iterate_samples(str(tmp_path / "out" / "train-000000.tar")))
    assert [s["key"] for s in decoded] == list(samples)
    assert [s["text"] for s in decoded] == [row["report"] for row in rows]
    assert decoded[0]["ecg"].shape == (12, 1000) and decoded[0]["meta"]["record_id"] == rows[0]["id"]


@pytest.mark.parametrize("version, declared", [(2, "shard format version 2"), (None, "no shard format version")])
def test_a_manifest_of_another_format_version_is_refused_naming_it(reference, tmp_path, version, declared):
    from open_clip_ecg.data.manifest import read_shard_info
    from open_clip_ecg.data.pipeline import iterate_samples
    from open_clip_ecg.data.shard_format import MANIFEST_VERSION, ShardFormatError

    out, manifest = reference
    shutil.copytree(out, tmp_path / "shards")
    path = tmp_path / "shards" / "manifest.json"
    changed = {k: v for k, v in manifest.items() if k != "version"}
    if version is not None:
        changed["version"] = version
    path.write_text(json.dumps(changed))
    message = (f"{path} declares {declared}; this open_clip_ecg reads version {MANIFEST_VERSION}: "
               "write the shards again with `open-clip-ecg shards`")
    with pytest.raises(ValueError) as err:
        read_shard_info([str(tmp_path / "shards" / "val-000000.tar")])
    assert str(err.value) == message
    with pytest.raises(ShardFormatError, match="no shard folder declares this sample's format") as err:
        list(iterate_samples(str(tmp_path / "shards" / "val-000000.tar")))
    assert message in str(err.value)
