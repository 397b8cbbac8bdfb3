"""Issue 24, training and shard writing: resume with another recipe or model, non-finite training,
two `shards` runs on one folder, a full disk. Each case as a careless user meets it, through the CLI."""
import csv
import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_args
from open_clip_ecg import cli
from open_clip_ecg.data import shard_writer
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
from open_clip_ecg.data.synthetic import write_synthetic_dataset
from open_clip_ecg.training import seams


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("open-clip-ecg ")]


def files(directory):
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Training: logit scale, non-finite loss (item 7)
# ---------------------------------------------------------------------------------------------

def train_args(shards, logs, name, *extra):
    """Two optimizer steps of 8 pairs, fp32, one process."""
    return ["--model", "ECG-RN18-CLIPText", "--train-data", str(shards / "train-*.tar"),
            "--batch-size", "8", "--train-num-samples", "16", "--epochs", "1", "--workers", "0", "--lr", "1e-3",
            "--warmup", "1", "--logs", str(logs), "--name", name, "--seed", "0", "--ecg-seconds", "2.5", *extra]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_non_positive_initial_logit_scale_is_refused(synthetic_shards, tmp_path, capsys, value):
    assert cli.main(["train", *train_args(synthetic_shards, tmp_path, "scale"), f"--ecg-init-logit-scale={value}"]) == 2
    assert error_lines(capsys) == [f"open-clip-ecg train: error: --ecg-init-logit-scale must be a positive number, "
                                   f"got {float(value)}"]
    assert not list(tmp_path.glob("scale/checkpoints/*.pt"))


class _NaNFromStep2(seams.MultiLabelSigLipLoss):
    """The real loss, NaN from its second call on (a diverged step)."""
    calls = 0

    def forward(self, *args, **kwargs):
        losses = super().forward(*args, **kwargs)
        type(self).calls += 1
        return {k: v * float("nan") for k, v in losses.items()} if type(self).calls >= 2 else losses


def test_a_non_finite_loss_stops_training_naming_the_step_and_saves_no_checkpoint(synthetic_shards, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.setattr(seams, "MultiLabelSigLipLoss", _NaNFromStep2)
    _NaNFromStep2.calls = 0
    assert cli.main(["train", *train_args(synthetic_shards, tmp_path, "nan", "--save-frequency", "1")]) == 2
    [line] = error_lines(capsys)
    assert line.startswith("open-clip-ecg train: error: the training loss became nan at optimizer step 2 of this run")
    assert _NaNFromStep2.calls == 2  # stopped at once
    assert not list((tmp_path / "nan" / "checkpoints").iterdir())


# ---------------------------------------------------------------------------------------------
# --resume latest with another recipe (item 4) or another model (item 13)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_shards(synthetic_shards, tmp_path_factory):
    """The synthetic records as the tiny run's shards would be with another rate, or without one label."""
    source = Path(json.loads((synthetic_shards / "manifest.json").read_text())["source"]["input"])
    options = dict(seconds=10, split_by="random", val_fraction=0.2, test_fraction=0.1, shard_size=16,
                   text="report", progress=False)
    root = tmp_path_factory.mktemp("other-shards")
    write_shards(get_reader("csv", source / "records.csv"), root / "50hz", ShardOptions(sampling_rate=50, **options))
    with open(source / "records.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["labels"] = ";".join(code for code in row["labels"].split(";") if code != "STE")
    without_ste = source / "records-without-ste.csv"
    with open(without_ste, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_shards(get_reader("csv", without_ste), root / "no-ste", ShardOptions(sampling_rate=100, **options))
    return root


def resume_tiny(tiny_training_run, synthetic_shards, tmp_path, capsys, *flags):
    """`open-clip-ecg train` continuing a copy of the tiny run for a second epoch: (status, error lines)."""
    shutil.copytree(tiny_training_run, tmp_path / "tiny")
    capsys.readouterr()
    status = cli.main(["train", *tiny_run_args(synthetic_shards, tmp_path, "--epochs", "2", "--resume", "latest",
                                               "--val-frequency", "0", "--zeroshot-frequency", "0", *flags)])
    return status, error_lines(capsys)


@pytest.mark.slow
@pytest.mark.parametrize("flags, change", [
    (["--ecg-seconds", "2"], "--ecg-seconds: checkpoint 2.5, this run 2"),
    (["--ecg-normalize", "center"], "--ecg-normalize: checkpoint zscore, this run center"),
    (["--ecg-targets", "identity"], "--ecg-targets: checkpoint jaccard, this run identity"),
    ("50hz", "the training shards' sampling rate: checkpoint 100 Hz, this run 50 Hz"),
    ("no-ste", "the training shards' vocabulary: checkpoint 13 labels (1AVB, AFIB, BBB, INVT, ...), "
               "this run 12 labels (1AVB, AFIB, BBB, INVT, ...)"),
])
def test_resume_with_a_changed_recipe_is_refused_naming_the_change(tiny_training_run, synthetic_shards, other_shards,
                                                                    tmp_path, capsys, flags, change):
    if isinstance(flags, str):
        flags = ["--train-data", str(other_shards / flags / "train-*.tar"),
                 "--val-data", str(other_shards / flags / "val-*.tar")]
    status, lines = resume_tiny(tiny_training_run, synthetic_shards, tmp_path, capsys, *flags)
    checkpoint = tmp_path / "tiny" / "checkpoints" / "epoch_1.pt"
    assert status == 2 and lines == [
        f"open-clip-ecg train: error: --resume {checkpoint}: the training recipe changed: {change}. Resume with the "
        "checkpoint's settings, or pass --ecg-allow-recipe-change to continue with the new ones (recorded in the "
        "next checkpoints)"]
    assert not (tmp_path / "tiny" / "checkpoints" / "epoch_2.pt").exists()


@pytest.mark.slow
def test_an_allowed_recipe_change_is_recorded_in_the_next_checkpoints(tiny_training_run, synthetic_shards, tmp_path,
                                                                     capsys):
    status, lines = resume_tiny(tiny_training_run, synthetic_shards, tmp_path, capsys, "--ecg-seconds", "2",
                                "--ecg-allow-recipe-change")
    assert status == 0 and lines == []
    checkpoints = tmp_path / "tiny" / "checkpoints"
    saved = torch.load(checkpoints / "epoch_2.pt", map_location="cpu", weights_only=True)
    assert saved["ecg_preprocess"]["seconds"] == 2.0
    assert saved["ecg_training"] == {"targets": "jaccard", "recipe_changes": [
        {"resumed_from": str(checkpoints / "epoch_1.pt"), "epoch": 1, "changes": ["--ecg-seconds: checkpoint 2.5, this run 2"]}]}


@pytest.mark.slow
def test_resume_with_another_model_names_the_checkpoint_and_both_models(tiny_training_run, synthetic_shards, tmp_path,
                                                                        capsys):
    status, lines = resume_tiny(tiny_training_run, synthetic_shards, tmp_path, capsys, "--model", "ECG-RN34-CLIPText")
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"open-clip-ecg train: error: --resume {tmp_path / 'tiny' / 'checkpoints' / 'epoch_1.pt'}: "
                               "the checkpoint was trained as model 'ECG-RN18-CLIPText', this run asks for "
                               "'ECG-RN34-CLIPText' (")


@pytest.mark.slow
def test_resume_with_a_text_cache_added_names_the_checkpoint_and_both_models(tiny_training_run, synthetic_shards,
                                                                            tiny_qwen3, tmp_path, capsys):
    cache = tmp_path / "tc1"
    assert cli.main(["text-cache", "--text-model", str(tiny_qwen3), "--shards", str(synthetic_shards),
                     "--out", str(cache)]) == 0
    status, lines = resume_tiny(tiny_training_run, synthetic_shards, tmp_path, capsys, "--ecg-text-cache", str(cache))
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"open-clip-ecg train: error: --resume {tmp_path / 'tiny' / 'checkpoints' / 'epoch_1.pt'}: "
                               "the checkpoint was trained as model 'ECG-RN18-CLIPText', this run asks for "
                               "'ECG-RN18-CLIPText+tc1' (")


# ---------------------------------------------------------------------------------------------
# `shards`: one writer per folder (item 8), a full disk (item 15)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synth_csv(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("synth"), 30, seed=0, progress=False)


def shards_args(csv_path, out, *extra):
    return ["shards", "--format", "csv", "--input", str(csv_path), "--output", str(out), "--sampling-rate", "100",
            "--split-by", "patient", "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-progress", *extra]


def test_a_second_shards_run_on_a_folder_being_written_fails_naming_the_holder(synth_csv, tmp_path):
    from open_clip_ecg.folder_lock import folder_lock

    out = tmp_path / "out"
    with folder_lock(out, "the first run"):
        second = subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", *shards_args(synth_csv, out)],
                                capture_output=True, text=True, timeout=600)
    assert second.returncode == 2
    assert second.stderr.strip().splitlines() == [
        f"open-clip-ecg shards: error: {out} is being written by the first run (pid {os.getpid()} on "
        f"{socket.gethostname()}): wait for it to finish, or write to another folder"]
    assert sorted(p.name for p in out.iterdir()) == []  # nothing written, the lock released


def test_the_lock_of_a_killed_run_does_not_block_the_next(synth_csv, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom open_clip_ecg.folder_lock import folder_lock\n"
         "with folder_lock(sys.argv[1], 'killed'):\n    print('locked', flush=True)\n    time.sleep(600)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    holder.kill()
    holder.wait()
    assert "killed" in (out / ".lock").read_text()  # left behind, but no longer locked
    assert cli.main(shards_args(synth_csv, out)) == 0
    assert (out / "manifest.json").exists() and not (out / ".lock").exists()


def test_shard_temporaries_are_named_per_process(synth_csv, tmp_path, monkeypatch):
    temporaries = []
    finish = shard_writer._ShardFile.finish

    def remember(self):
        temporaries.append((self.path.name, self.tmp.name, self.tmp.exists()))
        return finish(self)

    monkeypatch.setattr(shard_writer._ShardFile, "finish", remember)
    write_shards(get_reader("csv", synth_csv), tmp_path, ShardOptions(sampling_rate=100, shard_size=6, progress=False))
    assert temporaries and all(tmp == f"{name}.tmp{os.getpid()}" and exists for name, tmp, exists in temporaries)


def test_a_full_disk_keeps_the_previous_shard_set_and_is_one_line(synth_csv, tmp_path, monkeypatch, capsys):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    assert cli.main(shards_args(synth_csv, out, "--shard-size", "6")) == 0
    previous = files(out)
    addfile, members = tarfile.TarFile.addfile, Counter()

    def fill_the_disk(self, tarinfo, fileobj=None):
        members[1] += 1
        if members[1] > 40:  # inside the fourth shard of the new job
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return addfile(self, tarinfo, fileobj)

    monkeypatch.setattr(tarfile.TarFile, "addfile", fill_the_disk)
    capsys.readouterr()
    assert cli.main(shards_args(synth_csv, out, "--shard-size", "4")) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"open-clip-ecg shards: error: No space left on device (errno 28) writing {out}")
    assert ".tar.tmp" in line and line.endswith("free some space and run the command again (completed output is kept)")
    assert files(out) == previous  # the previous complete set, untouched
    monkeypatch.undo()
    assert cli.main(shards_args(synth_csv, out, "--shard-size", "4")) == 0  # resumes, then replaces the set
    assert cli.main(shards_args(synth_csv, fresh, "--shard-size", "4")) == 0
    assert files(out) == files(fresh) and sorted(p.name for p in out.iterdir()) == sorted(files(fresh))


def test_a_full_disk_during_text_cache_is_one_line(tiny_qwen3, synthetic_shards, tmp_path, monkeypatch, capsys):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the atomic writers' last step before the rename
    capsys.readouterr()
    status = cli.main(["text-cache", "--text-model", str(tiny_qwen3), "--shards", str(synthetic_shards),
                       "--out", str(tmp_path / "cache")])
    assert status == 2
    assert error_lines(capsys) == ["open-clip-ecg text-cache: error: No space left on device (errno 28): free some "
                                   "space and run the command again (completed output is kept)"]
