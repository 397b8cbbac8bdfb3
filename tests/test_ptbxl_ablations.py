"""The PTB-XL study's ablations (issue 25): embedding dimension, crops, loss targets x batch size."""
import argparse
import importlib.util
import json
import subprocess
import sys

import open_clip
import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "scripts" / "ptbxl_zeroshot_study.py"


@pytest.fixture(scope="module")
def study_module():
    spec = importlib.util.spec_from_file_location("ptbxl_zeroshot_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _study(module, tmp_path, **options):
    args = argparse.Namespace(out=str(tmp_path), reference=module.REFERENCE, loss_recipes=[module.REFERENCE, "sampled-text"],
                              batch_size=64, large_batch=256, large_batch_lr_scaling=["sqrt", "none"],
                              large_batch_finding_weight=["kept", "scaled"], lr=1e-3, warmup=20, crop_seconds=5.0,
                              targets=list(module.TARGETS), ablation_variants=None, **options)
    return module.Study(args)


def test_ablation_variants_share_the_runs_out(study_module, tmp_path, monkeypatch):
    """--ablation-variants trains only the named variants (by setting name or suffix)."""
    study = _study(study_module, tmp_path, ablations=["embed-dim", "loss"])
    trained = []
    monkeypatch.setattr(study, "setting_rows",
                        lambda name, setting, targets="jaccard": trained.append((name, targets)) or [{"fold7_mean": 0.5}])
    monkeypatch.setattr(study, "choose", lambda rows: {})
    monkeypatch.setattr(study, "seeds", lambda best, choices, targets, scores_suffix="": {})
    study.args.ablation_variants = ["dim512", "sampled-text+batch256"]
    results = study.ablations()
    # a large-batch loss variant: each learning-rate candidate's fold-7 rows (a tie keeps the first),
    # then the chosen one's jaccard rows and every other target's own rows
    assert trained == [(f"{study_module.REFERENCE}+dim512", "jaccard"), ("sampled-text+batch256", "jaccard"),
                       ("sampled-text+batch256+lr-none", "jaccard")] + [
        ("sampled-text+batch256", t) for t in ("jaccard", "identity", "exact")]
    assert set(results["loss"][0]["own_choices"]) == {"identity", "exact"}
    study.args.ablation_variants, trained[:] = None, []
    study.ablations()
    assert len(trained) == 3 + 4 * 3 + 2 + 4  # batch 256: 2 learning rates, x 2 finding weights with finding texts


def test_a_run_scored_under_its_own_choices_keeps_its_scores_under_jaccards(study_module, tmp_path, monkeypatch):
    """seeds() caches scores per choices and suffix: scoring identity with its own fold-7 choices
    writes RUN-own-choices.* beside RUN.*, and re-running either reuses its file."""
    import numpy as np

    m = study_module
    study = _study(m, tmp_path, seeds=[0], bootstrap=10)
    scored = []

    def task_scores(name, setting, targets, seed, choices, splits):
        scored.append((name, choices["ptbxl-super"]["epoch"]))
        for task_name in m.TASKS:
            yield argparse.Namespace(name=task_name), {"test": argparse.Namespace(
                y_true=np.eye(2), y_score=np.full((2, 2), choices["ptbxl-super"]["epoch"]))}, argparse.Namespace(
                describe=dict)

    monkeypatch.setattr(study, "task_scores", task_scores)
    monkeypatch.setattr(study, "report", lambda task, scores, method, about: {
        "headline": {"macro_auroc": float(scores["test"].y_score[0, 0])}, "per_label": []})
    best = {"setting": "r", **m.BASE}
    jaccards, own = ({t: {"epoch": e} for t in m.TASKS} for e in (12, 24))
    first = study.seeds(best, jaccards, ["identity"])
    second = study.seeds(best, own, ["identity"], scores_suffix=m.OWN_CHOICES)
    assert list(first) == ["r-identity-seed0"] and list(second) == ["r-identity-seed0-own-choices"]
    assert np.load(tmp_path / "scores" / "r-identity-seed0.npz")["ptbxl-super/y_score"][0, 0] == 12
    assert np.load(tmp_path / "scores" / "r-identity-seed0-own-choices.npz")["ptbxl-super/y_score"][0, 0] == 24
    study.seeds(best, jaccards, ["identity"])
    study.seeds(best, own, ["identity"], scores_suffix=m.OWN_CHOICES)
    assert scored == [("r-identity-seed0", 12), ("r-identity-seed0", 24)]  # both cached: nothing scored again


def test_same_set_pairs_counts_pairs_of_equal_finding_sets(study_module):
    sets = [frozenset(s) for s in ({1}, {1}, {1, 2}, {2}, set(), set())]  # 15 pairs: 2 same-set, 4 sharing
    counts = study_module.same_set_pairs(sets, [4, 6])
    assert counts[4] == pytest.approx({"same_set_pairs": 6 * 2 / 15, "sharing_pairs": 6 * 4 / 15, "pairs": 6})
    assert counts[6]["same_set_pairs"] == pytest.approx(2.0)  # the whole set: exactly its two pairs


def test_each_variant_changes_one_thing_of_the_reference(study_module, tmp_path):
    m = study_module
    study = _study(m, tmp_path)
    reference = {**m.BASE, **m.SELECTION[m.REFERENCE]}
    dims = study.variants("embed-dim")
    assert [v["name"] for v in dims] == [m.REFERENCE, f"{m.REFERENCE}+dim128", f"{m.REFERENCE}+dim512"]
    assert dims[0]["label"] == "256 (reference)" and dims[0]["setting"] == reference
    for v in dims[1:]:
        changed = {k for k in reference if v["setting"][k] != reference[k]}
        assert changed == {"embed_dim"} and v["targets"] == ["jaccard"]
    crops = study.variants("crop")
    assert [study.value(v["setting"], "crop_seconds") for v in crops] == [5.0, 10.0, 2.5]
    assert [v["name"] for v in crops[1:]] == [f"{m.REFERENCE}+crop10", f"{m.REFERENCE}+crop2.5"]
    # a variant equal to the reference (here the reference crops 2.5 s) is not trained twice
    short = _study(m, tmp_path)
    short.args.crop_seconds = 2.5
    assert [v["name"] for v in short.variants("crop")] == [m.REFERENCE, f"{m.REFERENCE}+crop10"]


def test_the_loss_ablation_scales_lr_by_the_square_root_and_keeps_warmup_in_samples(study_module, tmp_path):
    m = study_module
    variants = _study(m, tmp_path).variants("loss")
    assert [(v["recipe"], v["batch"]) for v in variants] == [(m.REFERENCE, 64), (m.REFERENCE, 256),
                                                            ("sampled-text", 64), ("sampled-text", 256)]
    small, large = variants[2], variants[3]
    assert small["name"] == "sampled-text" and small["setting"]["batch_size"] is None  # the study's own run
    assert large["name"] == "sampled-text+batch256"
    assert large["setting"]["lr"] == pytest.approx(2e-3) and large["setting"]["warmup"] == 5
    assert large["setting"]["batch_size"] == 256 and all(v["targets"] == list(m.TARGETS) for v in variants)
    # the large batch's learning rate: a candidate per scaling rule, the first one the variant's until fold 7 chooses
    assert [(c["name"], c["setting"]["lr"], c["setting"]["warmup"]) for c in large["lr_candidates"]] == [
        ("sampled-text+batch256", pytest.approx(2e-3), 5), ("sampled-text+batch256+lr-none", pytest.approx(1e-3), 5)]
    assert "lr_candidates" not in small
    # with finding texts, each learning rate also with the finding-text weight x 4 (the pair term's growth)
    assert [(c["scaling"], c["name"], c["setting"]["lr"], c["setting"]["finding_weight"])
            for c in variants[1]["lr_candidates"]] == [
        ("sqrt", f"{m.REFERENCE}+batch256", pytest.approx(2e-3), 4),
        ("none", f"{m.REFERENCE}+batch256+lr-none", pytest.approx(1e-3), 4),
        ("sqrt, weight scaled", f"{m.REFERENCE}+batch256+weight-scaled", pytest.approx(2e-3), 16),
        ("none, weight scaled", f"{m.REFERENCE}+batch256+lr-none+weight-scaled", pytest.approx(1e-3), 16)]


def test_fold_7_chooses_the_large_batchs_learning_rate(study_module, tmp_path, monkeypatch):
    """Each candidate's selection rows are computed (trained once); the best fold-7 mean wins and
    the variant trains its seeds under that name and setting."""
    m = study_module
    study = _study(m, tmp_path, ablations=["loss"])
    study.args.loss_recipes, study.args.ablation_variants = ["sampled-text"], ["sampled-text+batch256"]
    fold7 = {"sampled-text": 0.8, "sampled-text+batch256": 0.6, "sampled-text+batch256+lr-none": 0.7}
    rows = []
    monkeypatch.setattr(study, "setting_rows", lambda name, setting, targets="jaccard": rows.append(
        (name, targets)) or [{"fold7_mean": fold7[name] - 0.1}, {"fold7_mean": fold7[name]}])
    monkeypatch.setattr(study, "choose", lambda rows: {})
    seeded = []
    monkeypatch.setattr(study, "seeds", lambda best, choices, targets, scores_suffix="": seeded.append(
        (best["setting"], best["lr"], scores_suffix)) or {})
    (variant,) = study.ablations()["loss"]
    assert variant["name"] == "sampled-text+batch256+lr-none" and variant["lr_scaling"] == "none"
    assert variant["lr_fold7_mean"] == {"sqrt": 0.6, "none": 0.7}
    assert rows[:3] == [("sampled-text+batch256", "jaccard"), ("sampled-text+batch256+lr-none", "jaccard"),
                        ("sampled-text+batch256+lr-none", "jaccard")]
    assert [s[:2] for s in seeded] == [("sampled-text+batch256+lr-none", pytest.approx(1e-3))] * 3


def test_an_embed_dim_variant_resizes_both_projections(study_module, tmp_path):
    study = _study(study_module, tmp_path)
    name = study.model_name({**study_module.BASE, "model": "ECG-RN18-CLIPText", "embed_dim": 96})
    assert name == "ECG-RN18-CLIPText-D96"
    saved = json.loads((tmp_path / "model_configs" / f"{name}.json").read_text())
    assert saved["embed_dim"] == 96 and saved["vision_cfg"] == open_clip.get_model_config("ECG-RN18-CLIPText")["vision_cfg"]
    model = open_clip.create_model(name)
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 12, 500)).shape == (2, 96)
        assert model.encode_text(open_clip.get_tokenizer(name)(["sinus rhythm", "a"])).shape == (2, 96)
    costs = study_module.model_costs({"96": name, "256": "ECG-RN18-CLIPText"}, batch_size=4, seconds=1.0, rounds=1, steps=1)
    assert costs["96"]["parameters"] < costs["256"]["parameters"]
    assert all(c["step_seconds"] > 0 for c in costs.values())


def test_training_flags_carry_each_variants_change(study_module, tmp_path, monkeypatch):
    m = study_module
    study = _study(m, tmp_path, epochs=4, select_epochs=[2, 4], workers=0, train_shards=None)
    calls = []
    monkeypatch.setattr(m, "train_main", lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(study, "train_shards", lambda n_shards=None: ["train-000000.tar"])

    def flags(variant):
        calls.clear()
        study.train("run", variant["setting"], "identity", 1)
        argv = calls[0]
        return {key: argv[argv.index(key) + 1] for key in ("--model", "--batch-size", "--lr", "--warmup",
                                                          "--ecg-seconds", "--ecg-targets", "--seed",
                                                          "--ecg-finding-weight") if key in argv}

    reference, large = study.variants("loss")[:2]
    assert flags(reference) == {"--model": "ECG-RN18-RR-CLIPText", "--batch-size": "64", "--lr": "0.001",
                                "--warmup": "20", "--ecg-seconds": "5.0", "--ecg-targets": "identity", "--seed": "1",
                                "--ecg-finding-weight": "4"}
    assert flags(large) | {"--model": None} == {"--model": None, "--batch-size": "256", "--lr": "0.002",
                                                "--warmup": "5", "--ecg-seconds": "5.0", "--ecg-targets": "identity",
                                                "--seed": "1", "--ecg-finding-weight": "4"}
    scaled = large["lr_candidates"][3]
    assert {k: flags(scaled)[k] for k in ("--lr", "--ecg-finding-weight")} == {"--lr": "0.001", "--ecg-finding-weight": "16.0"}
    assert flags(study.variants("crop")[1])["--ecg-seconds"] == "10.0"
    assert flags(study.variants("embed-dim")[2])["--model"] == "ECG-RN18-RR-CLIPText-D512"


def _fabricated_variants(m, out, names, targets_noise):
    """Variants with fold-8 score files written under `out`: each target's scores are the truth
    plus uniform noise of its amplitude (less noise, higher AUROC)."""
    import numpy as np

    rng = np.random.default_rng(0)
    y_true = (rng.random((40, 3)) < 0.4).astype(np.float32)
    (out / "scores").mkdir(exist_ok=True)
    variants = []
    for label, name, extra in names:
        runs = {}
        for targets, noise in targets_noise[name].items():
            run = m.run_name(name, targets, 0)
            np.savez(out / "scores" / f"{run}.npz", **{key: value for task in m.TASKS for key, value in (
                (f"{task}/y_true", y_true), (f"{task}/y_score", y_true + noise * rng.random(y_true.shape)))})
            headline = {"macro_auroc": 0.5, "micro_f1": 0.5, "jaccard_samples": 0.5}
            runs[run] = {"targets": targets, "seed": 0, "tasks": {t: {"headline": headline} for t in m.TASKS}}
        variants.append({"label": label, "name": name, "targets": list(targets_noise[name]), "runs": runs, **extra})
    return variants


def _cells(m, row):
    return [float(cell.split()[0]) for cell in row.split("|")[-1 - len(m.TASKS):-1]]


def test_the_loss_table_pairs_targets_within_each_batch_size(study_module, tmp_path):
    """Rendered from fabricated fold-8 scores: jaccard beats identity on every task by construction."""
    m = study_module
    noise = {"jaccard": 0.3, "identity": 3.0}
    variants = _fabricated_variants(m, tmp_path, [(f"r, batch {b}", f"r+batch{b}", {"batch": b}) for b in (64, 256)],
                                    {"r+batch64": noise, "r+batch256": noise})
    pairs = m.same_set_pairs([frozenset({1}), frozenset({1}), frozenset({2})], [64, 256])
    lines = m.ablation_tables(str(tmp_path), {"loss": variants}, argparse.Namespace(seeds=[0], bootstrap=50),
                              {"same_set_pairs": pairs})
    rows = [line for line in lines if "jaccard − identity" in line and line.startswith("| r, batch")]
    assert len(rows) == 2 and f"{pairs[256]['same_set_pairs']:.1f} (of 32640)" in rows[1]
    assert all(d > 0.1 for d in _cells(m, rows[0])), rows[0]
    assert not any(line.startswith("Each target with its own") for line in lines)  # none scored that way
    assert not any(line.startswith("Learning rate at") for line in lines)
    variants[1].update(lr_fold7_mean={"sqrt": 0.6, "none": 0.7}, lr_scaling="none", setting={"lr": 1e-3})
    lines = m.ablation_tables(str(tmp_path), {"loss": variants}, argparse.Namespace(seeds=[0], bootstrap=50), {})
    assert "Learning rate at r, batch 256, chosen on fold 7 (best mean macro AUROC, jaccard, first seed): " \
           "sqrt 0.600, none 0.700 → none (lr 0.001)." in lines


def test_the_loss_table_also_compares_targets_under_their_own_choices(study_module, tmp_path):
    """The second loss table: identity scored under its own fold-7 choices (fabricated: far noisier
    than jaccard, so jaccard − identity is large and positive), with the epochs it chose."""
    m = study_module
    variants = _fabricated_variants(m, tmp_path, [("r, batch 64", "r", {"batch": 64}), ("own", "r-own", {})],
                                    {"r": {"jaccard": 0.3}, "r-own": {"identity": 3.0}})
    own_runs = variants.pop()["runs"]
    for run in own_runs.values():
        run["choices"] = {t: {"epoch": 8 + 4 * i} for i, t in enumerate(m.TASKS)}
    variants[0]["own_choices"] = {"identity": own_runs}
    lines = m.ablation_tables(str(tmp_path), {"loss": variants}, argparse.Namespace(seeds=[0], bootstrap=50), {})
    start = next(i for i, line in enumerate(lines) if line.startswith("Each target with its own"))
    row = lines[start + 4]
    assert row.startswith("| r, batch 64 | jaccard − identity |") and row.endswith("| 8/12/16/20 |")
    differences = [float(cell.split()[0]) for cell in row.split("|")[3:3 + len(m.TASKS)]]
    assert all(d > 0.1 for d in differences), row


def test_the_embed_dim_table_compares_with_the_reference_and_its_cost(study_module, tmp_path):
    m = study_module
    variants = _fabricated_variants(m, tmp_path, [("256 (reference)", "ref", {}), ("128", "ref+dim128", {})],
                                    {"ref": {"jaccard": 3.0}, "ref+dim128": {"jaccard": 0.3}})
    costs = {"256 (reference)": {"parameters": 1000, "step_seconds": 2.0}, "128": {"parameters": 900, "step_seconds": 1.5}}
    lines = m.ablation_tables(str(tmp_path), {"embed-dim": variants}, argparse.Namespace(seeds=[0], bootstrap=50),
                              {"model_costs": costs})
    difference = next(line for line in lines if line.startswith("| 128 − reference |"))
    assert all(d > 0.1 for d in _cells(m, difference)), difference
    assert "| 128 | 900 | 0.9000 | 0.750 |" in lines


@pytest.mark.slow
def test_ablations_run_end_to_end_on_a_tiny_budget(ptbxl_dir, cinc_dir, tmp_path):
    """The crop ablation trains its variants (one epoch on one shard), chooses on fold 7, scores
    fold 8 and the other institutions' records, and reports differences with intervals (the other
    ablations share this path; their flags, configs and tables are checked above without training)."""
    out = tmp_path / "study"
    command = [sys.executable, str(SCRIPT), "--ptbxl", str(ptbxl_dir), "--out", str(out), "--quick",
               "--epochs", "1", "--select-epochs", "1", "--train-shards", "1", "--stages", "ablations",
               "--ablations", "crop", "--cinc", str(cinc_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "ablations.json").read_text())
    tasks = {"ptbxl-super", "ptbxl-sub", "ptbxl-rhythm", "ptbxl-form"}
    crops = result["results"]["crop"]  # --quick crops 2.5 s: the 2.5 s variant is the reference
    assert [v["label"] for v in crops] == ["2.5 s random crops (reference)", "none (the whole 10 s record)"]
    trained = torch.load(out / "logs" / f"{crops[1]['name']}-jaccard-seed0" / "checkpoints" / "epoch_1.pt",
                         map_location="cpu", weights_only=True)
    assert trained["ecg_preprocess"]["seconds"] == 10.0
    for v in crops:
        assert set(v["choices"]) == tasks and [r["seed"] for r in v["runs"].values()] == [0]
        assert v["cinc"]["n_records"] == 26  # the 28 records less the two from PTB-XL
        assert all(0 <= a <= 1 for a in v["cinc"]["macro_auroc"].values())

    table = (out / "ablations.md").read_text()
    for heading in ("## Ablation: crop", "Other institutions (26 Challenge records",
                    "| none (the whole 10 s record) − reference |"):
        assert heading in table, heading
