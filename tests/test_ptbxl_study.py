"""The PTB-XL zero-shot study script end to end on the small real PTB-XL sample (--quick)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_study_runs_end_to_end_on_a_tiny_budget(ptbxl_dir, tmp_path):
    """Every stage runs and reports a figure for every task (fold 7 of the sample has positives of
    each); a re-run trains nothing and leaves every checkpoint as it was."""
    out = tmp_path / "study"
    command = [sys.executable, str(REPO / "scripts" / "ptbxl_zeroshot_study.py"), "--ptbxl", str(ptbxl_dir),
               "--out", str(out), "--quick"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Start epoch" in done.stderr + done.stdout  # the first run trained
    result = json.loads((out / "study.json").read_text())
    best = result["selection_best"]
    assert best["setting"] in ("stored-text", "sampled-text")
    assert set(best["fold7_macro_auroc"]) == {"ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form"}
    assert all(v is not None and 0 <= v <= 1 for v in best["fold7_macro_auroc"].values()), best
    # both training lengths were compared on fold 7, and every task took its own best epoch and rule
    own = [row for row in json.loads((out / "scores" / f"selection-{best['setting']}.json").read_text())]
    assert {row["epoch"] for row in own} == {1, 2}
    for task, choice in result["choices"].items():
        assert choice["fold7_macro_auroc"] is not None, task
        assert choice["fold7_macro_auroc"] == max(row["fold7_macro_auroc"][task] or 0 for row in own), task
    assert (out / "logs" / f"{best['setting']}-jaccard-seed0" / "checkpoints" / "epoch_1.pt").exists()
    assert {run["targets"] for run in result["runs"].values()} == {"jaccard", "identity"}
    for run in result["runs"].values():
        assert set(run["tasks"]) == {"ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form"}
    assert set(result["supervised"]["0"]) == {"ptbxl-super", "ptbxl-rhythm"}  # per seed, per task
    generalist = result["generalist"]["0"]  # one model for every statement, answering every task
    assert set(generalist) == set(run["tasks"]) and (out / "supervised" / "ptbxl-all-seed0.pt").exists()
    assert result["supervised_tower"] == "ecg_resnet1d18"  # the winner's tower
    assert generalist["ptbxl-super"]["aggregate"] in ("noisy-or", "max", "mean")
    differences = result["paired_differences"]
    assert set(differences["jaccard − identity"]) == set(run["tasks"])
    assert set(differences["jaccard zero-shot − supervised"]) == {"ptbxl-super", "ptbxl-rhythm"}
    assert set(differences["jaccard zero-shot − supervised, one model for ptbxl-all"]) == set(run["tasks"])
    for what, by_task in differences.items():
        for task, difference in by_task.items():
            low, high = difference["interval"]
            assert low <= high and -1 <= difference["difference"] <= 1, (what, task)
    table = (out / "study.md").read_text()
    assert "Selection on fold 7" in table and "| supervised BCE (ecg_resnet1d18), one model per task, 1 seed(s) |" in table
    assert "| supervised BCE (ecg_resnet1d18), one model for ptbxl-all, 1 seed(s) |" in table
    assert all(f"### {task}\n" in table for task in run["tasks"])  # per-label tables for every task
    assert "Paired difference jaccard − identity" in table and "Paired difference jaccard zero-shot − supervised" in table
    curve = result["learning_curve"]  # the first training shard, then all of them
    assert [row["n_shards"] for row in curve] == sorted(row["n_shards"] for row in curve) and len(curve) == 2
    assert curve[0]["n_records"] < curve[1]["n_records"]
    assert set(curve[0]["supervised"]) == {"ptbxl-super", "ptbxl-rhythm"} and "Learning curve" in table
    norm = [row["per_label"]["supervised"]["ptbxl-super"]["NORM"] for row in curve]  # per label, both sizes
    assert all(n["n_positive"] > 0 and 0 <= n["auroc"] <= 1 for n in norm)
    assert set(curve[1]["per_label"]["zero-shot"]) == set(curve[1]["zero-shot"])
    assert "### ptbxl-rhythm per label against training records" in table
    # the finding diagnosis runs on a checkpoint the study trained (ECG side vs text side, fold 7)
    checkpoint = out / "logs" / f"{best['setting']}-jaccard-seed0" / "checkpoints" / "epoch_1.pt"
    diagnosis = tmp_path / "diagnosis.json"
    for split in ("val", "train"):  # the ECG side on fold 7, or on the training ECGs
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "ptbxl_finding_diagnosis.py"), "--checkpoint",
                               str(checkpoint), "--shards", str(out / "shards"), "--codes", "NORM", "SR",
                               "--ecg-split", split, "--out", str(diagnosis)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = {row["code"]: row for row in json.loads(diagnosis.read_text())}
        assert rows["NORM"]["ecg_split"] == split and rows["NORM"]["ecg_positives"] > 0
        assert rows["NORM"]["train_positives"] > 0 and f"n+ {split} (ECG side)" in done.stdout
        assert 0 <= rows["NORM"]["text_auroc"] <= 1 and "| NORM | normal ECG |" in done.stdout
    # on the training split both sides read the same records
    assert rows["NORM"]["ecg_positives"] == rows["NORM"]["train_positives"]
    # a re-run reuses every checkpoint and score: nothing is trained again
    checkpoints = {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")}
    assert len(checkpoints) >= 4  # both targets' epochs and the supervised models
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "Start epoch" not in again.stderr + again.stdout
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.pt")} == checkpoints


@pytest.mark.slow
def test_rr_feature_script_ranks_rate_findings_from_beats_alone(ptbxl2k_dir, tmp_path):
    """scripts/ptbxl_rr_features.py on the real records: the mean RR interval separates sinus
    bradycardia and tachycardia almost perfectly (a check on the beats behind the RR channels)."""
    out = tmp_path / "rr.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "ptbxl_rr_features.py"), "--ptbxl", str(ptbxl2k_dir),
                             "--codes", "SBRAD", "STACH", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = json.loads(out.read_text())["groups"]["training folds 1-6"]
    assert table["SBRAD"]["auroc"]["mean RR"] > 0.9 and table["STACH"]["auroc"]["mean RR"] < 0.1
    assert "| fold 7 | SBRAD |" in result.stdout
