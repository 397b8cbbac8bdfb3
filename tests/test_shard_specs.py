"""What a shard spec may combine: every folder of a '::' list agrees on vocabulary, sampling rate,
record length and format version (or the error names the two folders that differ), and training
refuses validation shards at another rate or with another vocabulary than its training shards."""
import json
import shutil

import pytest

from open_clip_ecg import cli
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.pipeline import expand_shards, iterate_samples

MODEL = "ECG-RN18-CLIPText"


def _edit_json(path, edit):
    value = json.loads(path.read_text())
    edit(value)
    path.write_text(json.dumps(value))


def _rename_first_label(vocabulary):
    vocabulary[0]["name"] = "a finding by another name"


def _drop_last_label(vocabulary):
    vocabulary.pop()


def _rate(rate, seconds):
    def edit(manifest):  # the stored 1,000 samples per record, declared as another rate
        manifest["options"].update(sampling_rate=rate, seconds=seconds)
    return edit


def _version(manifest):
    manifest["version"] = 2


# change -> (file edited, edit, what the error says differs, the two values it names)
CHANGES = {
    "vocabulary names": ("vocabulary.json", _rename_first_label, "vocabulary", "a finding by another name"),
    "vocabulary size": ("vocabulary.json", _drop_last_label, "vocabulary", "labels against"),
    "sampling rate": ("manifest.json", _rate(50, 20), "sampling rate", "(100.0 against 50.0)"),
    "record length": ("manifest.json", _rate(100, 5), "record length", "(1000 against 500)"),
    "format version": ("manifest.json", _version, "shard format version", "(1 against 2)"),
}


def changed_copy(source, target, change):
    """`source`'s shard folder copied to `target` with one declaration changed."""
    shutil.copytree(source, target)
    name, edit = CHANGES[change][:2]
    _edit_json(target / name, edit)
    return target


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_list_mixing_folders_that_differ_names_both_folders(synthetic_shards, tmp_path, change):
    other = changed_copy(synthetic_shards, tmp_path / "other", change)
    what, values = CHANGES[change][2:]
    spec = f"{synthetic_shards}/train-000000.tar::{other}/train-{{000000..000001}}.tar"
    with pytest.raises(ValueError) as err:
        read_shard_info(expand_shards(spec))
    message = str(err.value)
    assert message.startswith(f"the shard folders {synthetic_shards} and {other} differ in their {what} ")
    assert values in message


def test_a_list_of_folders_that_agree_reads_every_folder(synthetic_shards, tmp_path):
    shutil.copytree(synthetic_shards, tmp_path / "copy")
    shards = expand_shards(f"{synthetic_shards}/val-000000.tar::{tmp_path / 'copy'}/val-000001.tar")
    assert read_shard_info(shards) == read_shard_info(expand_shards(str(synthetic_shards), split="val"))
    assert len(list(iterate_samples(shards))) == 18


def test_evaluate_on_a_mixed_list_is_one_line_naming_both_folders(synthetic_shards, tmp_path, capsys):
    import open_clip
    import torch

    torch.save({"state_dict": open_clip.create_model(MODEL).state_dict()}, tmp_path / "m.pt")
    other = changed_copy(synthetic_shards, tmp_path / "other", "sampling rate")
    assert cli.main(["evaluate", "--model", MODEL, "--pretrained", str(tmp_path / "m.pt"), "--device", "cpu",
                     "--data", f"{synthetic_shards}/test-000000.tar::{other}/test-000000.tar",
                     "--out", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"open-clip-ecg evaluate: error: the shard folders "
                                                   f"{synthetic_shards} and {other} differ in their sampling rate")


@pytest.mark.parametrize("change, message", [
    ("sampling rate", "hold 50 Hz ECGs, the training shards in {train} 100 Hz: validation must read ECGs at the "
                      "training rate; write them with `open-clip-ecg shards --sampling-rate 100`"),
    ("vocabulary names", "differ (label 0 = "),
])
def test_train_refuses_validation_shards_that_do_not_fit_before_it_starts(synthetic_shards, tmp_path, capsys,
                                                                          change, message):
    val = changed_copy(synthetic_shards, tmp_path / "val", change)
    logs = tmp_path / "logs"
    assert cli.main(["train", "--model", MODEL, "--train-data", f"{synthetic_shards}/train-*.tar",
                     "--val-data", f"{val}/val-*.tar", "--batch-size", "8", "--epochs", "1", "--workers", "0",
                     "--logs", str(logs), "--ecg-seconds", "2.5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("open-clip-ecg train: error: ")
    assert f"shards in {val}" in error[0] and message.format(train=synthetic_shards) in error[0]
    assert not logs.exists()  # refused before open_clip_train started a run
