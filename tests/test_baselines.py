"""Baselines: label-fraction subsampling, the linear probe, the supervised BCE tower, and both CLIs."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from sklearn.metrics import roc_auc_score

from open_clip_ecg.baselines import load_supervised, predict_probabilities
from open_clip_ecg.data.pipeline import expand_shards, make_eval_loader
from open_clip_ecg.probe import LinearProbe, subsample


def run_cli(*args):
    return subprocess.run([shutil.which("open-clip-ecg") or "open-clip-ecg", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_subsample_keeps_rare_labels_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.random((500, 6)) < np.array([0.5, 0.2, 0.05, 0.01, 0.004, 0.0])
    for fraction in (0.01, 0.1):
        index = subsample(y, fraction, seed=3)
        assert np.array_equal(index, subsample(y, fraction, seed=3))
        assert len(index) >= int(np.ceil(fraction * 500)) and len(np.unique(index)) == len(index)
        for j in range(5):  # every label that has positives keeps one, and one negative
            assert y[index, j].any() and (~y[index, j]).any()
    assert len(subsample(y, 0.1, seed=3)) == 50  # the guarantee fits inside 10%: exact size
    assert not np.array_equal(subsample(y, 0.1, seed=3), subsample(y, 0.1, seed=4))
    assert np.array_equal(subsample(y, 1.0), np.arange(500))
    with pytest.raises(ValueError, match="fractions"):
        subsample(y, 0.0)


def test_linear_probe_fits_informative_labels_and_keeps_constants():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    y = np.stack([x[:, 0] > 0, x[:, 1] + 0.3 * rng.normal(size=200) > 0.5, np.zeros(200, bool)], axis=1)
    probe = LinearProbe(C=1.0).fit(x, y)
    p = probe.predict_proba(x)
    assert p.shape == (200, 3) and probe.constant_labels == [2]
    assert np.all(p[:, 2] == 0.0)
    assert ((p[:, 0] > 0.5) == y[:, 0]).mean() > 0.95


def test_train_supervised_cli_checkpoint_and_report(synthetic_shards, tmp_path):
    out = tmp_path / "supervised"
    result = run_cli("train-supervised", "--task", "labels", "--train-data", synthetic_shards, "--train-split", "train",
                     "--data", synthetic_shards, "--split", "test", "--val-data", synthetic_shards, "--val-split", "val",
                     "--out", out, "--epochs", "1", "--seconds", "2.5", "--batch-size", "32", "--bootstrap", "20")
    assert result.returncode == 0, result.stderr
    assert "epoch 1/1: train BCE" in result.stdout and "supervised labels: macro_auroc" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "supervised" and metrics["thresholds"]["source"] == "validation max-F1"
    assert metrics["training"]["selected_on"].startswith("validation macro AUROC")
    model, checkpoint = load_supervised(str(out / "supervised.pt"))  # weights_only=True inside
    assert checkpoint["codes"] == metrics["task"]["codes"] and checkpoint["arch"] == "ecg_resnet1d18"
    assert model.fc.out_features == len(checkpoint["codes"])
    batch = next(iter(make_eval_loader(expand_shards(str(synthetic_shards), split="test"), n_samples=250,
                                       batch_size=1000)))  # the whole test split
    probabilities = predict_probabilities(model, batch["ecg"]).numpy()
    per_label = {row["code"]: row for row in metrics["per_label"]}  # the report's AUROC is the saved model's
    codes = checkpoint["codes"]
    y = np.array([[code in record for code in codes] for record in batch["label_codes"]])
    assert len(y) == metrics["data"]["records_evaluated"] and y.any(axis=1).mean() > 0.5  # real labels, not zeros
    scored = [j for j, code in enumerate(codes) if per_label[code]["auroc"] is not None]
    assert len(scored) >= 3 and all(0 < y[:, j].sum() < len(y) for j in scored)
    for j in scored:
        code = codes[j]
        assert per_label[code]["auroc"] == pytest.approx(roc_auc_score(y[:, j], probabilities[:, j]), abs=1e-6)
        assert per_label[code]["n_positive"] == int(y[:, j].sum())
    for name in ("per_label.csv", "per_label.png", "roc_curves.png", "report.md"):
        assert (out / name).stat().st_size > 0


def test_train_supervised_cli_on_the_rr_tower(synthetic_shards, tmp_path):
    """`--arch ecg_resnet1d18_rr`: the baseline on the tower with RR channels, fed them in training,
    validation and the test report (the fair comparison for ECG-RN18-RR-CLIPText)."""
    out = tmp_path / "supervised-rr"
    result = run_cli("train-supervised", "--task", "labels", "--train-data", synthetic_shards, "--train-split", "train",
                     "--data", synthetic_shards, "--split", "test", "--val-data", synthetic_shards, "--val-split", "val",
                     "--out", out, "--epochs", "1", "--seconds", "2.5", "--batch-size", "32", "--bootstrap", "20",
                     "--arch", "ecg_resnet1d18_rr")
    assert result.returncode == 0, result.stderr
    model, checkpoint = load_supervised(str(out / "supervised.pt"))
    assert checkpoint["arch"] == "ecg_resnet1d18_rr" and model.conv1.in_channels == 14
    assert json.loads((out / "metrics.json").read_text())["data"]["records_evaluated"] > 0


def test_probe_cli_reports_each_label_fraction(synthetic_shards, tmp_path):
    torch.manual_seed(0)
    model = open_clip.create_model("ECG-RN18-CLIPText")
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "probe-test", "state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "probe"
    result = run_cli("probe", "--model", "ECG-RN18-CLIPText", "--pretrained", checkpoint, "--task", "labels",
                     "--train-data", synthetic_shards, "--train-split", "train", "--data", synthetic_shards,
                     "--split", "test", "--val-data", synthetic_shards, "--val-split", "val", "--out", out,
                     "--fractions", "0.1", "1.0", "--seconds", "2.5", "--bootstrap", "20")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "probe.json").read_text())
    assert list(summary) == ["0.1", "1"]
    assert summary["0.1"]["train_records"] < summary["1"]["train_records"] == summary["1"]["train_records_available"]
    assert summary["1"]["C"] in (0.01, 0.1, 1.0, 10.0) and summary["1"]["C_selection"].startswith("validation")
    for entry in summary.values():
        metrics = json.loads((Path(entry["folder"]) / "metrics.json").read_text())
        assert metrics["method"] == "linear probe" and metrics["probe"]["label_fraction"] == entry["label_fraction"]
        assert metrics["thresholds"]["source"] == "validation max-F1"
    assert "| 0.1 |" in (out / "probe.md").read_text()


def test_supervised_loader_yields_ecg_targets_and_mask(synthetic_shards):
    """The supervised baseline's own stage: (ecg, task targets, evaluated mask), no text channel."""
    from open_clip_ecg.baselines import TaskTargets, _collate_examples
    from open_clip_ecg.data.pipeline import ECGSamplePreparer, iterate_samples, make_epoch_loader
    from open_clip_ecg.tasks import get_task

    shards = expand_shards(str(synthetic_shards), split="train")
    task = get_task("labels", vocabulary=json.loads((synthetic_shards / "vocabulary.json").read_text()))
    preparer = ECGSamplePreparer(250, len(task.labels), train=True)
    data = make_epoch_loader(shards, TaskTargets(task, preparer), _collate_examples, batch_size=8, workers=0)
    ecg, targets, evaluated = next(iter(data.dataloader))
    assert ecg.shape == (8, 12, 250) and targets.shape == (8, len(task.labels)) and evaluated.shape == (8,)
    assert targets.dtype == evaluated.dtype == torch.float32 and targets.sum() > 0
    expected = {}
    for sample in iterate_samples(shards):
        y, keep = task.multi_hot([sample["label_codes"]], [sample["meta"]], [sample["key"]])
        expected[tuple(y[0].astype(np.float32))] = float(keep[0])
    assert all(expected.get(tuple(row.tolist())) == float(mask) for row, mask in zip(targets, evaluated))


def test_supervised_models_refuse_shards_at_another_rate(synthetic_shards, tmp_path):
    """A 100 Hz model meets a folder declaring 500 Hz: a ValueError naming the folder and both rates,
    in evaluation and, before the first epoch, in training's validation."""
    from open_clip_ecg.baselines import create_supervised_model, evaluate_supervised, train_supervised
    from open_clip_ecg.scoring import resolve_task

    other = tmp_path / "500hz"
    shutil.copytree(synthetic_shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["options"].update(sampling_rate=500, seconds=2)  # the same 1,000 stored samples
    (other / "manifest.json").write_text(json.dumps(manifest))
    message = f"trained on 100 Hz ECGs but the shards in {other} are 500 Hz"
    task = resolve_task("labels", expand_shards(str(synthetic_shards), split="train"))
    about = {"arch": "ecg_resnet1d18", "task": "labels", "codes": task.codes, "n_samples": 250, "sampling_rate": 100.0}
    with pytest.raises(ValueError, match=message):
        evaluate_supervised(create_supervised_model(about["arch"], len(task.codes)), about, str(other), split="test")
    with pytest.raises(ValueError, match=message):
        train_supervised("labels", str(synthetic_shards), train_split="train", val_data=str(other), val_split="val",
                         epochs=1, seconds=2.5)


@pytest.mark.parametrize("overlap, message", [
    ("train", "--train-data {spec} and --data {spec} share {n} record(s) (e.g. {key}): the probes must be fitted "
              "on other records"),
    ("val", "--val-data {spec} and --data {spec} share {n} record(s) (e.g. {key}): thresholds must come from other "
            "records"),
])
def test_probe_refuses_training_or_validation_records_that_are_evaluated(synthetic_shards, overlap, message):
    """Each overlap is blamed on the flag that brought it: a probe fitted (or thresholds chosen) on the
    evaluated records would leak into the figures."""
    from open_clip_ecg.data.pipeline import iterate_samples
    from open_clip_ecg.probe import run_probe

    keys = sorted(sample["key"] for sample in iterate_samples(expand_shards(str(synthetic_shards), split="test")))
    splits = {"train_split": "train", "val_split": "val", f"{overlap}_split": "test"}
    with pytest.raises(ValueError) as err:
        run_probe(open_clip.create_model("ECG-RN18-CLIPText"), "labels", str(synthetic_shards), str(synthetic_shards),
                  split="test", val_data=str(synthetic_shards), seconds=2.5, **splits)
    spec = repr(f"{synthetic_shards} (split test)")
    assert str(err.value) == message.format(spec=spec, n=len(keys), key=keys[0])


def test_statement_model_answers_a_coarser_task_from_member_statements():
    """A supervised model on every statement (ptbxl-all) scores superclasses like zero-shot does:
    noisy-OR / max / mean of the member statements' probabilities, by hand."""
    from open_clip_ecg.baselines import answer_from_statements
    from open_clip_ecg.embed import ShardRecords
    from open_clip_ecg.tasks import get_task

    task = get_task("ptbxl-super")
    codes = ["NORM", "1AVB", "CLBBB", "IMI", "NDT", "LVH"]
    p = np.array([[0.9, 0.1, 0.2, 0.0, 0.3, 0.5],
                  [0.1, 0.5, 0.4, 0.8, 0.0, 0.0]])
    records = ShardRecords(keys=["a", "b"], label_codes=[["NORM"], ["1AVB", "IMI"]],
                           metas=[{"scp_codes": {"NORM": 100.0}}, {"scp_codes": {"1AVB": 100.0, "IMI": 100.0}}])
    col = {code: i for i, code in enumerate(task.codes)}
    noisy_or = answer_from_statements(task, codes, p, records, "two records", "noisy-or")
    assert noisy_or.y_score[0, col["CD"]] == pytest.approx(1 - 0.9 * 0.8)
    assert noisy_or.y_score[1, col["CD"]] == pytest.approx(1 - 0.5 * 0.6)
    assert noisy_or.y_score[1, col["MI"]] == pytest.approx(0.8)
    assert noisy_or.y_score[0, col["HYP"]] == pytest.approx(0.5)
    assert noisy_or.y_true[1].tolist() == [task.codes[j] in ("CD", "MI") for j in range(len(task.codes))]
    assert answer_from_statements(task, codes, p, records, "two records", "max").y_score[1, col["CD"]] == pytest.approx(0.5)
    assert answer_from_statements(task, codes, p, records, "two records", "mean").y_score[0, col["CD"]] == pytest.approx(0.15)
    with pytest.raises(ValueError, match=r"\['HYP'\] have no member among the model's 5 labels"):
        answer_from_statements(task, codes[:-1], p[:, :-1], records, "two records")
