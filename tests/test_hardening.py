"""What broke when the tools were attacked as a hostile but realistic user would (issue 11): bad
encodings, absurd sampling rates, hostile shards and checkpoints, runs that write nothing, kills
between write and rename, training on nothing. One test (at least) per case."""
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_run_args
from open_clip_ecg.data import preprocess
from open_clip_ecg.data.manifest import count_samples, read_shard_info
from open_clip_ecg.data.pipeline import expand_shards, iterate_samples
from open_clip_ecg.data.shard_format import MAX_JSON_BYTES, ShardFormatError
from open_clip_ecg.data.readers.csv import CSVReader
from open_clip_ecg.data.record import ECGRecord, RecordEntry, RecordError
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.data.synthetic import write_synthetic_dataset

OPTIONS = dict(shard_size=4, split_by="patient", val_fraction=0.2, test_fraction=0.2, progress=False)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args, env=None):
    return subprocess.run([shutil.which("open-clip-ecg") or "open-clip-ecg", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 12, seed=3, progress=False)


# ---------------------------------------------------------------------------------------------
# 1. Reports that are not valid UTF-8
# ---------------------------------------------------------------------------------------------

def latin1_index(synth_csv: Path, target: Path, suffix: str) -> Path:
    """The synthetic index as CSV or JSONL, with row 3's report in Latin-1 bytes."""
    with open(synth_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows[2]["report"] = "Sinusrhythmus \u00fcberall"
    for row in rows:
        row["path"] = str(synth_csv.parent / row["path"])
    if suffix == ".csv":
        lines = [",".join(rows[0])] + [",".join(f'"{v}"' for v in row.values()) for row in rows]
    else:
        lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    data = b"".join((line + "\n").encode("latin-1" if "\u00fc" in line else "utf-8") for line in lines)
    path = target / f"index{suffix}"
    path.write_bytes(data)
    return path, rows[2]["id"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_latin1_row_is_skipped_and_counted_naming_file_line_and_record(synth_csv, tmp_path, suffix):
    index, bad_id = latin1_index(synth_csv, tmp_path, suffix)
    manifest = write_shards(CSVReader(index), tmp_path / "out", ShardOptions(**OPTIONS))
    assert manifest["records"] == {"listed": 12, "written": 11, "skipped": 1}
    assert manifest["skip_counts"] == {"bad_encoding": 1}
    skip = manifest["skipped"][0]
    assert skip["record_id"] == bad_id
    line = 4 if suffix == ".csv" else 3  # the CSV has a header line
    assert f"{index}:{line}: column 'report' is not valid" in skip["detail"] and "0xfc" in skip["detail"]


@pytest.mark.slow
def test_the_cli_honours_encoding_and_reports_the_skip_otherwise(synth_csv, tmp_path):
    index, bad_id = latin1_index(synth_csv, tmp_path, ".csv")
    result = run_cli("shards", "--format", "csv", "--input", index, "--output", tmp_path / "utf8", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "bad_encoding=1" in result.stderr and f"(record {bad_id}): bad_encoding: {index}:4:" in result.stderr
    result = run_cli("shards", "--format", "csv", "--input", index, "--output", tmp_path / "latin1", "--no-progress",
                     "--encoding", "latin-1")  # the other rows are ASCII: valid Latin-1 too
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "latin1" / "manifest.json").read_text())
    assert manifest["records"]["written"] == 12 and "no records skipped" in result.stderr
    result = run_cli("shards", "--format", "csv", "--input", index, "--output", tmp_path / "x", "--encoding", "klingon")
    assert result.returncode == 2 and "unknown text encoding 'klingon'" in result.stderr


def test_a_label_names_file_that_is_not_utf8_is_named(tmp_path):
    names = tmp_path / "names.csv"
    names.write_bytes("code,name\nSR,Sinusrhythmus \u00fcberall\n".encode("latin-1"))
    (tmp_path / "index.csv").write_text("path,report,labels\n")
    with pytest.raises(ValueError, match=r"names\.csv: not valid UTF-8"):
        CSVReader(tmp_path / "index.csv", label_names=names)


# ---------------------------------------------------------------------------------------------
# 2. Absurd sampling rates
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.01, 0.1, 1.0, 20000.0])
def test_rates_outside_the_range_are_skipped_before_any_resampling(rate, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("resampled a record whose rate is out of range")

    monkeypatch.setattr(preprocess, "resample", refuse)
    entry = RecordEntry("r1", "/data/r1", "p1")
    record = ECGRecord(entry, np.random.default_rng(0).standard_normal((12, 2000)).astype(np.float32),
                       rate, list(preprocess.STANDARD_LEADS))
    with pytest.raises(RecordError) as err:
        preprocess.preprocess_record(record, 500, 10, min_seconds=0.0001)
    assert err.value.reason == "sampling_rate" and "outside the supported 50-10000 Hz" in str(err.value)


def test_a_1hz_wfdb_record_becomes_a_counted_skip(synth_csv, tmp_path):
    import wfdb

    with open(synth_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    record = wfdb.rdrecord(str(synth_csv.parent / rows[0]["path"]))
    wfdb.wrsamp("slow", fs=1, units=record.units, sig_name=record.sig_name, p_signal=record.p_signal[:1000],
                fmt=record.fmt, write_dir=str(tmp_path))
    rows[0]["path"] = str(tmp_path / "slow")
    for row in rows[1:]:
        row["path"] = str(synth_csv.parent / row["path"])
    index = tmp_path / "index.csv"
    with open(index, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    manifest = write_shards(CSVReader(index), tmp_path / "out", ShardOptions(**OPTIONS))
    assert manifest["skip_counts"] == {"sampling_rate": 1} and manifest["records"]["written"] == 11


@pytest.mark.parametrize("rate", [1.0, 20000.0])
def test_target_rates_outside_the_range_are_refused(rate):
    with pytest.raises(ValueError, match="outside the supported"):
        ShardOptions(sampling_rate=rate).validate()


# ---------------------------------------------------------------------------------------------
# 4. A run that writes nothing fails
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_run_that_writes_nothing_exits_non_zero_with_the_dominant_reason(synth_csv, tmp_path):
    with open(synth_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["labels"], row["path"] = "", str(synth_csv.parent / row["path"])
    index = tmp_path / "nolabels.csv"
    with open(index, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run_cli("shards", "--format", "csv", "--input", index, "--output", tmp_path / "out", "--text", "labels",
                     "--no-progress")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: wrote 0 samples: all 12 records were skipped, most as no_labels (12)")
    assert "wrong --format" in last


@pytest.mark.slow
def test_cinc_format_on_a_ptbxl_folder_fails(ptbxl_dir, tmp_path):
    result = run_cli("shards", "--format", "cinc", "--input", ptbxl_dir, "--output", tmp_path, "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "error: wrote 0 samples" in result.stderr and "--format cinc" in result.stderr


# ---------------------------------------------------------------------------------------------
# 6. Temporaries of killed processes
# ---------------------------------------------------------------------------------------------

KILL_BETWEEN_WRITE_AND_RENAME = """
import os, sys
import open_clip_ecg.atomic as atomic
from open_clip_ecg.data.readers.csv import CSVReader
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
target, index, out = sys.argv[1:4]
replace = os.replace
def killed(src, dst):
    if os.path.basename(dst) == target:
        os.kill(os.getpid(), 9)  # killed after the temporary is written, before the rename
    replace(src, dst)
atomic.os = type(os)("os_overlay")
atomic.os.__dict__.update(os.__dict__, replace=killed)
write_shards(CSVReader(index), out, ShardOptions(shard_size=4, split_by="patient", val_fraction=0.2,
                                                  test_fraction=0.2, progress=False))
"""


@pytest.mark.slow
@pytest.mark.parametrize("target", ["progress.json", "manifest.json"])
def test_a_kill_between_write_and_rename_leaves_nothing_after_the_rerun(synth_csv, tmp_path, target):
    reference = tmp_path / "reference"
    write_shards(CSVReader(synth_csv), reference, ShardOptions(**OPTIONS))
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=SRC)
    result = subprocess.run([sys.executable, "-c", KILL_BETWEEN_WRITE_AND_RENAME, target, str(synth_csv), str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == -9, result.stderr
    assert [p.name for p in out.glob(f"{target}.tmp*")]  # the kill left its temporary
    write_shards(CSVReader(synth_csv), out, ShardOptions(**OPTIONS))
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert all((out / p.name).read_bytes() == p.read_bytes() for p in reference.iterdir())


def test_atomic_writes_fsync_the_written_file_before_the_rename(tmp_path, monkeypatch):
    """Checkpoints, manifests and progress files go through write_atomic: their data reach the disk
    before the name points at them."""
    from open_clip_ecg.atomic import write_atomic

    calls = []
    fsync, replace = os.fsync, os.replace

    def recorded_fsync(fd):
        calls.append(("fsync", os.fstat(fd).st_ino, os.fstat(fd).st_size))
        fsync(fd)

    def recorded_replace(src, dst):
        calls.append(("replace", os.stat(src).st_ino, dst))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    write_atomic(tmp_path / "epoch_1.pt", lambda tmp: Path(tmp).write_bytes(b"checkpoint"))
    inode = (tmp_path / "epoch_1.pt").stat().st_ino
    assert calls == [("fsync", inode, len(b"checkpoint")), ("replace", inode, str(tmp_path / "epoch_1.pt"))]
    assert (tmp_path / "epoch_1.pt").read_bytes() == b"checkpoint"


def test_temporaries_of_live_processes_are_left_alone(tmp_path):
    from open_clip_ecg.atomic import remove_stale_temps

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f"epoch_1.pt.tmp{int(dead.stdout)}").write_bytes(b"partial")
    (tmp_path / f"epoch_2.pt.tmp{os.getpid()}").write_bytes(b"being written")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert remove_stale_temps(tmp_path) == [f"epoch_1.pt.tmp{int(dead.stdout)}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.tmp", f"epoch_2.pt.tmp{os.getpid()}"])


# ---------------------------------------------------------------------------------------------
# 3. Hostile or malformed shards: one schema check, one error type naming shard and key
# ---------------------------------------------------------------------------------------------

def npy_header(shape, dtype="<f2") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def hostile_copy(source: Path, target: Path, member: str, data: bytes):
    """`source`'s shard folder with `member` of the first val sample replaced by `data`; returns
    (the damaged shard, its first key)."""
    shutil.copytree(source, target)
    shard = sorted(target.glob("val-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as out:
        for info, payload in members:
            if info.name == f"{key}.{member}":
                payload = data
                info.size = len(data)
            out.addfile(info, io.BytesIO(payload))
    return shard, key


def hostile_cases(vocabulary):
    code0, code1 = vocabulary[0]["code"], vocabulary[1]["code"]
    return {
        "labels-list": ("labels.json", b"[1, 2]", "must be an object with lists"),
        "ids-null": ("labels.json", b'{"ids": null, "codes": []}', "must be an object with lists"),
        "ids-string": ("labels.json", b'{"ids": "12", "codes": ["a", "b"]}', "must be an object with lists"),
        "ids-float": ("labels.json", json.dumps({"ids": [1.9], "codes": [code1]}).encode(), "not integers"),
        "ids-bool": ("labels.json", json.dumps({"ids": [True], "codes": [code1]}).encode(), "not integers"),
        "ids-out-of-range": ("labels.json", json.dumps({"ids": [len(vocabulary)], "codes": ["X"]}).encode(),
                             "not integers in 0.."),
        "codes-string": ("labels.json", json.dumps({"ids": [0], "codes": code0}).encode(), "must be an object"),
        "codes-disagree": ("labels.json", json.dumps({"ids": [0], "codes": [code1]}).encode(),
                           "disagree with vocabulary.json"),
        "deep-json": ("meta.json", b"[" * 100000 + b"]" * 100000, "meta.json is not valid JSON: RecursionError"),
        "nested-json": ("meta.json", b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper than 32"),
        "meta-list": ("meta.json", b"[]", "meta.json must be a JSON object"),
        "npy-21TiB": ("ecg.npy", npy_header((12, 1_000_000_000_000)), "declares float16 (12, 1000000000000)"),
        "npy-float64": ("ecg.npy", npy_header((12, 1000), "<f8") + bytes(8 * 12000), "declares float64"),
        "npy-short-data": ("ecg.npy", npy_header((12, 1000)) + bytes(100), "data bytes"),
        "npy-pickle": ("ecg.npy", npy_header((12, 1000), "|O"), "declares object"),
        "npy-garbage": ("ecg.npy", b"\x93NUMPY garbage", "not a readable .npy"),
    }


@pytest.fixture(scope="module")
def vocabulary(synthetic_shards):
    return json.loads((synthetic_shards / "vocabulary.json").read_text())


@pytest.mark.parametrize("case", sorted(hostile_cases([{"code": "A"}, {"code": "B"}])))
def test_hostile_samples_raise_one_error_naming_shard_and_key(synthetic_shards, vocabulary, tmp_path, case):
    member, data, message = hostile_cases(vocabulary)[case]
    shard, key = hostile_copy(synthetic_shards, tmp_path / "shards", member, data)
    with pytest.raises(ShardFormatError) as err:
        list(iterate_samples([str(shard)]))
    assert f"{shard} (key {key})" in str(err.value) and message in str(err.value)


def test_the_untouched_shards_pass_the_schema(synthetic_shards):
    samples = list(iterate_samples(expand_shards(str(synthetic_shards), split="val")))
    assert samples and all(s["ecg"].shape == (12, 1000) and s["ecg"].dtype == np.float32 for s in samples)


def test_a_loader_looks_up_the_schema_once_per_shard_and_the_next_sees_a_rewritten_folder(
        synthetic_shards, tmp_path, monkeypatch):
    from open_clip_ecg.data import pipeline

    shutil.copytree(synthetic_shards, tmp_path / "shards")
    shards = expand_shards(str(tmp_path / "shards"), split="train")
    looked_up, shard_schema = [], pipeline.shard_schema

    def counted(url):
        looked_up.append(url)
        return shard_schema(url)

    monkeypatch.setattr(pipeline, "shard_schema", counted)
    assert len(list(iterate_samples(shards))) > len(shards) > 1 and looked_up == shards
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["options"]["seconds"] = 5  # records of 500 samples, not the 1,000 stored
    path.write_text(json.dumps(manifest))
    with pytest.raises(ShardFormatError, match="ecg.npy declares float16 \\(12, 1000\\)"):
        next(iterate_samples(shards))


@pytest.mark.slow
def test_evaluate_on_a_hostile_shard_is_one_line_naming_shard_and_key(synthetic_shards, vocabulary, tmp_path):
    import open_clip
    import torch

    torch.save({"state_dict": open_clip.create_model("ECG-RN18-CLIPText").state_dict()}, tmp_path / "m.pt")
    shard, key = hostile_copy(synthetic_shards, tmp_path / "shards", "labels.json", b'{"ids": "12", "codes": []}')
    result = run_cli("evaluate", "--model", "ECG-RN18-CLIPText", "--pretrained", tmp_path / "m.pt",
                     "--data", tmp_path / "shards", "--split", "val", "--task", "labels", "--out", tmp_path / "eval")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{shard} (key {key}): labels.json must be an object" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_train_on_a_hostile_shard_stops_with_an_error_naming_shard_and_key(synthetic_shards, tmp_path, capsys):
    from open_clip_ecg.cli import main as cli_main

    shard, key = hostile_copy(synthetic_shards, tmp_path / "shards", "ecg.npy", npy_header((12, 10 ** 12)))
    args = ["--model", "ECG-RN18-CLIPText", "--train-data", str(tmp_path / "shards" / "train-*.tar"),
            "--val-data", str(shard), "--batch-size", "8", "--epochs", "1", "--workers", "0", "--logs",
            str(tmp_path / "logs"), "--zeroshot-frequency", "0", "--ecg-seconds", "2.5"]
    assert cli_main(["train", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"open-clip-ecg train: error: {shard} (key {key}): ecg.npy declares float16")


def test_a_manifest_that_is_not_an_object_is_named(synthetic_shards, tmp_path):
    shutil.copytree(synthetic_shards, tmp_path / "shards")
    (tmp_path / "shards" / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="manifest.json lacks numeric options.sampling_rate"):
        read_shard_info(expand_shards(str(tmp_path / "shards"), split="val"))


def test_a_manifest_listing_thousands_of_skipped_records_is_read(synthetic_shards, tmp_path):
    """A large job's manifest passes the 1 MiB bound of sample members: readers still accept it."""
    shutil.copytree(synthetic_shards, tmp_path / "shards")
    path = tmp_path / "shards" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["skipped"] = [{"record_id": f"mimic/files/p1000/s{i:08d}", "path": f"/data/mimic-iv-ecg/files/p1000/"
                            f"s{i:08d}/{i:08d}.hea", "reason": "flat", "detail": "lead V3 is constant",
                            "split": "train"} for i in range(6000)]
    path.write_text(json.dumps(manifest, indent=1))
    assert path.stat().st_size > MAX_JSON_BYTES
    shards = expand_shards(str(tmp_path / "shards"), split="val")
    assert read_shard_info(shards)["n_samples"] == 1000
    assert len(list(iterate_samples(shards))) == count_samples(shards)


# ---------------------------------------------------------------------------------------------
# 5, 7. Training refuses a wrong checkpoint and missing shards in one line, before open_clip starts
# ---------------------------------------------------------------------------------------------

def train_args(shards, logs, name, *extra):
    return ["--model", "ECG-RN18-CLIPText", "--train-data", str(shards / "train-*.tar"),
            "--val-data", str(shards / "val-*.tar"), "--batch-size", "8", "--epochs", "1", "--workers", "0",
            "--lr", "1e-3", "--warmup", "1", "--logs", str(logs), "--name", name, "--seed", "0",
            "--zeroshot-frequency", "0", "--ecg-seconds", "2.5", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["other-model", "not-a-checkpoint"])
def test_train_pretrained_of_another_model_is_one_line_exit_2(synthetic_shards, tmp_path, checkpoint):
    import open_clip
    import torch

    path = tmp_path / "ckpt.pt"
    if checkpoint == "other-model":
        torch.save({"state_dict": open_clip.create_model("ECG-RN18-6Lead-CLIPText").state_dict()}, path)
    else:
        path.write_bytes(b"this is not a checkpoint")
    result = run_cli("train", *train_args(synthetic_shards, tmp_path, "x", "--pretrained", path))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    expected = "does not match model 'ECG-RN18-CLIPText'" if checkpoint == "other-model" else "cannot read checkpoint"
    assert last.startswith("open-clip-ecg train: error: ") and expected in last


@pytest.mark.slow
def test_train_on_an_empty_folder_fails_before_open_clip_starts(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("train", *train_args(tmp_path / "empty", tmp_path, "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"open-clip-ecg train: error: no shards match '{tmp_path / 'empty' / 'train-*.tar'}'"]
    assert result.stdout == "" and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# Models carry their own preprocessing
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checkpoints_record_the_ecg_preprocessing(tiny_training_run, synthetic_shards):
    import torch

    checkpoint = torch.load(tiny_training_run / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    cfg = checkpoint["ecg_preprocess"]
    vocabulary = json.loads((synthetic_shards / "vocabulary.json").read_text())
    assert cfg == {"model": "ECG-RN18-CLIPText", "sampling_rate": 100.0, "seconds": 2.5, "eval_seconds": 8.0,
                   "leads": list(preprocess.STANDARD_LEADS), "normalize": "zscore", "text": "report",
                   "vocabulary": [{k: v[k] for k in ("id", "code", "name")} for v in vocabulary]}


@pytest.mark.slow
def test_a_killed_checkpoint_save_leaves_nothing_after_resume(tiny_training_run, synthetic_shards, tmp_path):
    import open_clip_ecg.train as ecg_train

    run = tmp_path / "tiny"
    shutil.copytree(tiny_training_run, run)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / "checkpoints" / f"epoch_2.pt.tmp{int(dead.stdout)}").write_bytes(b"half a checkpoint")
    assert ecg_train.main(tiny_run_args(synthetic_shards, tmp_path, "--epochs", "2", "--resume", "latest",
                                        "--val-frequency", "0")) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("epoch_*")) == ["epoch_1.pt", "epoch_2.pt"]


def ecg_cfg(vocabulary, rate=100.0, normalize="center", model="ECG-RN18-CLIPText"):
    return {"model": model, "sampling_rate": rate, "seconds": 2.5, "eval_seconds": 10.0,
            "leads": list(preprocess.STANDARD_LEADS), "normalize": normalize, "text": "report",
            "vocabulary": [{k: v[k] for k in ("id", "code", "name")} for v in vocabulary]}


def save_checkpoint(path, model_name, cfg=None, seed=0):
    """open_clip_train's checkpoint layout, with the ECG preprocessing when `cfg` is given."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    state = {f"module.{k}": v for k, v in open_clip.create_model(model_name).state_dict().items()}
    torch.save({"epoch": 1, "name": "run", "state_dict": state, **({"ecg_preprocess": cfg} if cfg else {})}, path)
    return path


@pytest.mark.slow
def test_export_round_trip_through_local_dir_gives_identical_embeddings(vocabulary, tmp_path):
    import open_clip
    import torch

    from open_clip_ecg.factory import load_model

    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", "ECG-RN18-CLIPText", ecg_cfg(vocabulary, normalize="zscore"))
    result = run_cli("export", "--model", "ECG-RN18-CLIPText", "--pretrained", checkpoint, "--out", tmp_path / "dir")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["open_clip_config.json",
                                                                     "open_clip_model.safetensors"]
    config = json.loads((tmp_path / "dir" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == "ecg_resnet1d18"
    assert config["preprocess_cfg"]["ecg"]["normalize"] == "zscore"

    reference, reference_tokenizer = load_model("ECG-RN18-CLIPText", str(checkpoint))
    exported = open_clip.create_model(f"local-dir:{tmp_path / 'dir'}").eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'dir'}")
    ecg = torch.randn(2, 12, 1000, generator=torch.Generator().manual_seed(0))
    texts = ["sinus rhythm", "atrial fibrillation"]
    assert torch.equal(tokenizer(texts), reference_tokenizer(texts))
    with torch.no_grad():
        for a, b in zip(exported(ecg, tokenizer(texts)), reference(ecg, reference_tokenizer(texts))):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_export_of_an_hf_text_tower_loads_from_local_dir_and_hf_hub(vocabulary, tmp_path, monkeypatch):
    import open_clip
    import open_clip.factory
    import torch

    import open_clip_ecg
    from open_clip_ecg.factory import load_model
    from open_clip_ecg.export import export_model

    name = "ECG-RN18-MiniLM"
    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", name, ecg_cfg(vocabulary, model=name))
    out = export_model(name, str(checkpoint), tmp_path / "dir")
    assert {"tokenizer_config.json", "config.json", "open_clip_model.safetensors"} <= {p.name for p in out.iterdir()}
    reference, reference_tokenizer = load_model(name, str(checkpoint))
    texts = ["sinus rhythm", "left bundle branch block"]
    with torch.no_grad():
        expected = reference.encode_text(reference_tokenizer(texts))
        local = open_clip.create_model(f"local-dir:{out}").eval()
        assert torch.equal(local.encode_text(open_clip.get_tokenizer(f"local-dir:{out}")(texts)), expected)

        # the Hub serves the same files: open_clip's two download seams answer from the folder, and
        # the text model's path in the config (relative to the folder) resolves to the downloaded files
        served = json.loads((out / "open_clip_config.json").read_text())
        served["model_cfg"]["text_cfg"].update(hf_model_name=str(out), hf_tokenizer_name=str(out))
        monkeypatch.setattr(open_clip.factory, "_get_hf_config", lambda model_id, cache_dir=None: served)
        monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf",
                            lambda model_id, *a, **k: str(out / "open_clip_model.safetensors"))
        hub, _, preprocess_val = open_clip_ecg.create_model_and_transforms("hf-hub:someone/ecg-model")
        assert torch.equal(hub.encode_text(reference_tokenizer(texts)), expected)
        assert preprocess_val.cfg == ecg_cfg(vocabulary, model=name)


def test_create_model_and_transforms_preprocess_resamples_and_reorders(vocabulary, tmp_path):
    import torch
    from scipy.signal import resample_poly

    import open_clip_ecg
    from open_clip_ecg.data.transforms import build_ecg_transform
    from open_clip_ecg.export import export_model

    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", "ECG-RN18-CLIPText", ecg_cfg(vocabulary))
    export_model("ECG-RN18-CLIPText", str(checkpoint), tmp_path / "dir")
    model, preprocess_train, preprocess_val = open_clip_ecg.create_model_and_transforms(f"local-dir:{tmp_path / 'dir'}")
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((12, 5000)).astype(np.float32)  # 10 s at 500 Hz, leads in reversed order
    names = [n.lower() for n in reversed(preprocess.STANDARD_LEADS)]
    expected = build_ecg_transform(train=False, n_samples=1000)(
        torch.from_numpy(resample_poly(raw[::-1], 1, 5, axis=-1).astype(np.float16).astype(np.float32)))  # as shards store
    assert torch.allclose(preprocess_val(raw, 500, names), expected, atol=1e-5)
    assert preprocess_train(torch.from_numpy(raw), 500, names).shape == (12, 250)
    with torch.no_grad():
        assert model.encode_image(preprocess_val(raw, 500, names)[None]).shape == (1, 256)
    with pytest.raises(ValueError, match="outside the supported"):
        preprocess_val(raw, 0.1, names)


@pytest.mark.slow
def test_a_model_trained_at_another_rate_is_refused_by_embed_and_evaluate(synthetic_shards, vocabulary, tmp_path):
    checkpoint = save_checkpoint(tmp_path / "epoch_1.pt", "ECG-RN18-CLIPText", ecg_cfg(vocabulary, rate=500.0))
    for command in (["embed"], ["evaluate", "--task", "labels"]):
        result = run_cli(*command, "--model", "ECG-RN18-CLIPText", "--pretrained", checkpoint,
                         "--data", synthetic_shards, "--split", "test", "--out", tmp_path / command[0])
        assert result.returncode == 2, result.stderr
        assert (f"the model was trained on 500 Hz ECGs but the shards in {synthetic_shards} are 100 Hz: write them "
                "with `open-clip-ecg shards --sampling-rate 500`") in result.stderr.strip().splitlines()[-1]


def test_the_recorded_crop_and_normalisation_are_applied(synthetic_shards, vocabulary, tmp_path):
    import torch

    from open_clip_ecg.data.pipeline import make_eval_loader
    from open_clip_ecg.embed import embed_shards
    from open_clip_ecg.factory import load_model
    from open_clip_ecg.zeroshot import encode_ecg

    cfg = dict(ecg_cfg(vocabulary, normalize="zscore"), eval_seconds=4.0)
    model, _ = load_model("ECG-RN18-CLIPText", str(save_checkpoint(tmp_path / "e.pt", "ECG-RN18-CLIPText", cfg)))
    shards = expand_shards(str(synthetic_shards), split="test")
    embedded = embed_shards(model, shards)
    assert embedded.n_samples == 400
    batch = next(iter(make_eval_loader(shards, n_samples=400, batch_size=1000, normalize="zscore")))
    with torch.no_grad():
        np.testing.assert_allclose(embedded.embeddings, encode_ecg(model, batch["ecg"]).numpy(), atol=1e-5)


def test_a_mimic_report_that_is_not_utf8_is_a_counted_skip(tmp_path):
    from test_readers import write_mimic_fixture

    from open_clip_ecg.data.readers import get_reader

    write_mimic_fixture(tmp_path / "mimic")
    path = tmp_path / "mimic" / "machine_measurements.csv"
    path.write_bytes(path.read_bytes().replace(b"Normal ECG", b"Sinusrhythmus \xfcberall"))
    manifest = write_shards(get_reader("mimic-iv-ecg", tmp_path / "mimic"), tmp_path / "out",
                            ShardOptions(progress=False, split_by="patient", val_fraction=0, test_fraction=0))
    assert manifest["skip_counts"] == {"bad_encoding": 1, "no_report": 1}  # one study has no measurements
    skip = next(s for s in manifest["skipped"] if s["reason"] == "bad_encoding")
    assert skip["record_id"] == "mimic_44458630" and manifest["records"]["written"] == 1
    assert f"{path}:3: column 'report_1' is not valid UTF-8 (byte 0xfc)" in skip["detail"]
