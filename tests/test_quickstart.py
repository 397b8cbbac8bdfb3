"""The quickstart end to end, in a reduced mode (fewer records and steps, same code path)."""
import csv
import json
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from open_clip_ecg.scoring import ALL_SCORING_RULES, ScoringRules


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_writes_a_report(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "open_clip_ecg.cli", "quickstart", "--out", str(out), "--n", "160",
           "--epochs", "2", "--batch-size", "16", "--bootstrap", "20", "--workers", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for stage in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert stage in result.stderr
    assert "zero-shot labels: macro_auroc" in result.stdout

    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["thresholds"]["source"].startswith("validation")
    # no learning bound at this budget: 1 epoch on 160 synthetic records measured macro AUROC 0.443 (chance);
    # learning is asserted by test_train.py::test_loss_decreases_over_epochs
    with open(report / "per_label.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(json.loads((out / "shards" / "vocabulary.json").read_text()))
    # the headline is the mean of the per-label AUROCs it reports, and the printed line says the same
    defined = [float(r["auroc"]) for r in rows if r["auroc"] not in ("", "None", "nan")]
    assert defined and metrics["headline"]["macro_auroc"] == pytest.approx(sum(defined) / len(defined), abs=1e-6)
    assert f"macro_auroc {metrics['headline']['macro_auroc']:.3f}" in result.stdout
    for name in ("per_label.png", "roc_curves.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macro" in (report / "report.md").read_text().lower()
    assert {p.name for p in (out / "logs" / "quickstart" / "checkpoints").glob("*.pt")} == {"epoch_1.pt", "epoch_2.pt"}
    # the epoch and scoring rules were chosen on val: the best of the candidate table, and said so
    choice = metrics["choice"]
    assert choice["chosen_on"] == "val" and choice["epoch"] in (1, 2) and metrics["pretrained"] == choice["checkpoint"]
    assert metrics["zeroshot"]["names"] == choice["rules"]["names"]
    with open(report / "choice_on_val.csv") as f:
        candidates = list(csv.DictReader(f))
    assert len(candidates) == 2 * len(ALL_SCORING_RULES)
    assert choice["val_macro_auroc"] == pytest.approx(max(float(row["val_macro_auroc"]) for row in candidates))
    rules = ", ".join(f"{what} {value}" for what, value in choice["rules"].items())
    auroc = f"{choice['val_macro_auroc']:.3f}"
    assert f"labels: epoch {choice['epoch']}, {rules} (val macro AUROC {auroc})" in result.stderr
    # every path printed at the end exists
    printed = [line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith(" ") and ": " in line]
    assert printed and all((tmp_path / p).exists() or __import__("os").path.exists(p) for p in printed)

    # the model is handed over: classify on the exported folder reproduces the test-split probabilities
    assert_classify_reproduces_the_quickstart(out, metrics, result.stdout, tmp_path)

    # --choose last on the finished run: nothing retrained, the last epoch with the default rules
    result = subprocess.run(cmd + ["--choose", "last"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Train Epoch" not in result.stderr
    choice = json.loads((report / "metrics.json").read_text())["choice"]
    assert (choice["chosen_on"], choice["epoch"], choice["rules"]) == (None, 2, asdict(ScoringRules()))
    assert not (report / "choice_on_val.csv").exists()


def assert_classify_reproduces_the_quickstart(out, metrics, stdout, tmp_path):
    """`classify`, run as printed on the exported OUT/model, gives the report's test probabilities and
    decides with its validation thresholds."""
    import numpy as np

    from open_clip_ecg.data.shard_format import sample_key
    from open_clip_ecg.evaluate import evaluate_zeroshot
    from open_clip_ecg.factory import load_model

    decisions = json.loads((out / "model" / "classify.json").read_text())
    assert decisions["epoch"] == metrics["choice"]["epoch"]  # one task: its chosen epoch is exported
    assert decisions["tasks"]["labels"]["rules"] == metrics["choice"]["rules"]
    command = next(line.strip() for line in stdout.splitlines() if line.strip().startswith("open-clip-ecg classify"))
    args = command.split()[2:]
    assert args[:2] == ["--model", f"local-dir:{out / 'model'}"]
    result = subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", "classify", *args], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "findings" / "predictions.json").read_text())
    report_thresholds = {row["code"]: row["threshold"] for row in
                         csv.DictReader(open(out / "report" / "per_label.csv"))}
    assert saved["thresholds"]["source"] == "validation max-F1"
    assert {f["code"]: f["threshold"] for f in saved["findings"]} == pytest.approx(
        {code: float(t) for code, t in report_thresholds.items()})
    classified = {sample_key(r["record"]): r["probabilities"] for r in saved["records"]}
    trained, tokenizer = load_model(metrics["model"], metrics["pretrained"])
    evaluated = evaluate_zeroshot(trained, tokenizer, str(out / "shards"), "labels", split="test", n_bootstrap=0,
                                  rules=ScoringRules(**metrics["choice"]["rules"]))
    codes = evaluated.task.codes
    assert len(evaluated.scores.keys) > 10
    for key, scores in zip(evaluated.scores.keys, evaluated.scores.y_score):
        np.testing.assert_allclose([classified[key][c] for c in codes], scores, atol=1e-5)


def test_quickstart_rejects_a_bad_data_spec(tmp_path):
    result = subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", "quickstart", "--out", str(tmp_path),
                             "--data", "nosuchformat:/x"], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "expected ptbxl:PATH, cinc:PATH or csv:PATH" in result.stderr



@pytest.mark.slow
def test_quickstart_on_real_ptbxl_trains_the_fold7_winner(ptbxl_dir, tmp_path):
    """`--data ptbxl:PATH` uses the PTB-XL recipe: the RR tower, its training flags, the four tasks."""
    out = tmp_path / "qs-ptbxl"
    cmd = [sys.executable, "-m", "open_clip_ecg.cli", "quickstart", "--out", str(out), "--data", f"ptbxl:{ptbxl_dir}",
           "--epochs", "1", "--batch-size", "32", "--bootstrap", "20", "--workers", "1", "--choose", "last"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training ECG-RN18-RR-CLIPText for 1 epoch(s)" in result.stderr
    saved = torch.load(out / "logs" / "quickstart" / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)
    assert saved["ecg_preprocess"]["leads"][-2:] == ["RR-ratio", "HR"]
    assert saved["state_dict"]["visual.trunk.conv1.weight"].shape[1] == 14
    for task in ("ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form"):
        assert f"zero-shot {task}: macro_auroc" in result.stdout


def test_the_exported_epoch_is_the_best_mean_over_tasks_and_each_task_keeps_its_best_rules_for_it():
    from open_clip_ecg.quickstart import exported_checkpoint, rules_for_checkpoint

    def row(task, checkpoint, auroc, scoring="sigmoid"):
        return {"task": task, "checkpoint": checkpoint, "names": "name", "aggregate": "prompt", "scoring": scoring,
                "val_macro_auroc": auroc}

    candidates = [row("super", "e1", 0.90), row("super", "e1", 0.70, "contrast"), row("rhythm", "e1", 0.60),
                  row("super", "e2", 0.80), row("rhythm", "e2", 0.65, "contrast"), row("rhythm", "e2", None),
                  row("form", "e1", None), row("form", "e2", None)]
    # super chose e1 (0.90 > 0.80), rhythm e2; the means: e1 0.75, e2 0.725
    assert exported_checkpoint(candidates, last="e2") == "e1"
    candidates[3]["val_macro_auroc"] = 0.85  # e2 mean 0.75: a tie goes to the later epoch
    assert exported_checkpoint(candidates, last="e2") == "e2"
    assert exported_checkpoint([row("form", "e1", None)], last="e2") == "e2"  # nothing defined: the last
    assert rules_for_checkpoint(candidates, "e2", "rhythm", ScoringRules()) == ScoringRules("name", "prompt", "contrast")
    assert rules_for_checkpoint(candidates, "e2", "form", ScoringRules()) == ScoringRules()
