"""Zero-shot evaluation: tasks, prompts, honest thresholds, reports, bad input, the evaluate and embed
CLIs, and an end-to-end run on the real PTB-XL / CinC samples in ../shared/data (skipped when absent,
failed with --require-data)."""
import ast
import csv
import io
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.pipeline import expand_shards, iterate_samples, make_eval_loader
from open_clip_ecg.embed import embed_shards
import open_clip_ecg.evaluate as evaluate_module
from open_clip_ecg.evaluate import choose_on_validation, evaluate_zeroshot
from open_clip_ecg.factory import load_model
from open_clip_ecg.loss import MultiLabelSigLipLoss
from open_clip_ecg.prompts import task_prompts
from open_clip_ecg.reporting import write_report
from open_clip_ecg.scoring import ScoringRules
from open_clip_ecg.tasks import get_task

MODEL = "ECG-RN18-CLIPText"


def run_cli(*args):
    return subprocess.run([shutil.which("open-clip-ecg") or "open-clip-ecg", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def save_open_clip_checkpoint(model, path):
    """The layout open_clip_train writes (epoch_N.pt), with DDP's 'module.' prefix."""
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "name": "test-run", "state_dict": state}, path)


def save_random_checkpoint(path, seed: int = 0):
    """A randomly initialised MODEL as an open_clip_train checkpoint at `path`."""
    torch.manual_seed(seed)
    model = open_clip.create_model(MODEL)
    with torch.no_grad():  # probabilities away from 0 so thresholds matter
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-1.0)
    save_open_clip_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "epoch_1.pt")


@pytest.fixture(scope="module")
def model_and_tokenizer(checkpoint):
    return load_model(MODEL, str(checkpoint))


def copy_shards_with_shuffled_labels(source: Path, split: str, target: Path, seed: int = 0):
    """The shards of `split` with the same ECGs, their labels.json / meta.json permuted across records."""
    target.mkdir()
    for name in ("vocabulary.json", "manifest.json", "sizes.json"):
        shutil.copy(source / name, target / name)
    shards = {}
    for path in expand_shards(str(source), split=split):
        with tarfile.open(path) as tar:
            shards[path] = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    labels = {}  # key -> {extension: bytes}
    for members in shards.values():
        for info, data in members:
            key, extension = info.name.split(".", 1)
            if extension in ("labels.json", "meta.json"):
                labels.setdefault(key, {})[extension] = data
    keys = sorted(labels)
    donor = dict(zip(keys, np.random.default_rng(seed).permutation(keys)))
    for path, members in shards.items():
        with tarfile.open(target / Path(path).name, "w") as out:
            for info, data in members:
                key, extension = info.name.split(".", 1)
                if extension in labels[key]:
                    data = labels[donor[key]][extension]
                    info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return target


# ------------------------------------------------------------------------------------------------
# Tasks and prompts
# ------------------------------------------------------------------------------------------------

def test_ptbxl_tasks_follow_the_benchmark_levels():
    sizes = {name: len(get_task(name).labels) for name in
             ("ptbxl-all", "ptbxl-diag", "ptbxl-form", "ptbxl-rhythm", "ptbxl-sub", "ptbxl-super")}
    assert sizes == {"ptbxl-all": 71, "ptbxl-diag": 44, "ptbxl-form": 19, "ptbxl-rhythm": 12, "ptbxl-sub": 23,
                     "ptbxl-super": 5}
    task = get_task("ptbxl-super")
    assert task.codes == ["CD", "HYP", "MI", "NORM", "STTC"]
    metas = [{"scp_codes": {"IMI": 15.0, "SR": 0.0}}, {"scp_codes": {"NORM": 100.0, "SR": 0.0}},
             {"scp_codes": {"SR": 0.0}}, {"scp_codes": {"CLBBB": 100.0, "LVH": 50.0}}]
    y, keep = task.targets([[]] * 4, metas)
    assert y.astype(int).tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert keep.tolist() == [True, True, False, True]  # no superclass statement: not evaluated
    rhythm_y, rhythm_keep = get_task("ptbxl-rhythm").targets([[]] * 4, metas)
    assert rhythm_keep.tolist() == [True, True, True, False]


def test_cinc_and_shared_tasks_read_their_code_systems():
    cinc = get_task("cinc")
    assert len(cinc.labels) == 26  # 30 scored codes, 4 equivalence pairs merged
    y, keep = cinc.targets([["59118001", "164889003"], ["713427006"], []], [{}, {}, {}])
    assert keep.all()
    assert {cinc.codes[j] for j in np.flatnonzero(y[0])} == {"CRBBB", "AF"}
    assert {cinc.codes[j] for j in np.flatnonzero(y[1])} == {"CRBBB"} and not y[2].any()
    assert len(get_task("cinc2020").labels) == 24

    shared = get_task("ptbxl-cinc-shared")
    ptbxl_record = (["NORM"], {"scp_codes": {"AFIB": 0.0, "ILMI": 100.0}})
    challenge_record = (["164889003", "164867002"], {"age": 60})
    y, _ = shared.targets([ptbxl_record[0], challenge_record[0]], [ptbxl_record[1], challenge_record[1]])
    assert {shared.codes[j] for j in np.flatnonzero(y[0])} == {"AFIB", "MI"}
    assert {shared.codes[j] for j in np.flatnonzero(y[1])} == {"AFIB", "MI"}
    assert shared.notes["MI"].startswith("grouped")


def test_tasks_refuse_data_in_another_code_system_and_data_without_their_labels():
    with pytest.raises(ValueError, match=r"task 'ptbxl-super' reads PTB-XL SCP codes.*164889003 \(1\)"):
        get_task("ptbxl-super").targets([["164889003"]], [{}], keys=["cinc_Q1"], where="shards 'x'")
    with pytest.raises(ValueError, match=r"none of the 26 labels of task 'cinc'.*164867002 \(2\)"):
        get_task("cinc").targets([["164867002"], ["164867002"]], [{}, {}])
    with pytest.raises(ValueError, match="unknown task 'ptbxl-superclass'"):
        get_task("ptbxl-superclass")


def test_prompts_user_file_overrides_shipped_names_and_templates(tmp_path):
    labels = get_task("ptbxl-super").labels
    names, templates, sources = task_prompts(labels)
    assert names["MI"][0] == "myocardial infarction" and templates is None and set(sources.values()) == {"shipped"}
    user = tmp_path / "prompts.json"
    user.write_text(json.dumps({"templates": ["ECG with {}."], "findings": {
        "MI": ["infarct", "old infarct"], "superclass:CD": {"name": "conduction defect", "synonyms": []}}}))
    names, templates, sources = task_prompts(labels, user)
    assert names["MI"] == ["infarct", "old infarct"] and names["CD"] == ["conduction defect"]
    assert templates == ["ECG with {}."] and sources["MI"] == "user file (MI)"
    assert sources["NORM"] == "shipped"
    user.write_text(json.dumps({"templates": ["no placeholder"]}))
    with pytest.raises(ValueError, match="exactly one"):
        task_prompts(labels, user)


# ------------------------------------------------------------------------------------------------
# Evaluation on synthetic shards (random model)
# ------------------------------------------------------------------------------------------------

def test_thresholds_come_from_validation_and_ignore_shuffled_test_labels(synthetic_shards, model_and_tokenizer,
                                                                         tmp_path):
    model, tokenizer = model_and_tokenizer
    kwargs = dict(split="test", val_data=str(synthetic_shards), val_split="val", seconds=2.5, n_bootstrap=20)
    original = evaluate_zeroshot(model, tokenizer, str(synthetic_shards), "labels", **kwargs)
    shuffled_dir = copy_shards_with_shuffled_labels(synthetic_shards, "test", tmp_path / "shuffled")
    shuffled = evaluate_zeroshot(model, tokenizer, str(shuffled_dir), "labels", **{**kwargs,
                                                                                  "val_data": str(synthetic_shards)})
    assert original.metrics["thresholds"]["source"] == "validation max-F1"
    assert np.array_equal(original.thresholds, shuffled.thresholds)
    assert original.metrics["thresholds"]["per_label"] == shuffled.metrics["thresholds"]["per_label"]
    assert not np.array_equal(original.scores.y_true, shuffled.scores.y_true)  # the labels did move
    np.testing.assert_array_equal(original.scores.y_score, shuffled.scores.y_score)
    # ... and the reported numbers are scikit-learn's on these scores and thresholds
    y, s, t = original.scores.y_true, original.scores.y_score, original.thresholds
    ok = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]
    assert original.metrics["headline"]["macro_auroc"] == pytest.approx(roc_auc_score(y[:, ok], s[:, ok]))
    assert original.metrics["headline"]["micro_f1"] == pytest.approx(f1_score(y, s >= t, average="micro"))
    assert original.metrics["labels_auroc_undefined"]["count"] == y.shape[1] - len(ok)


def test_validation_data_overlapping_the_evaluated_data_is_refused(synthetic_shards, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="same shard"):
        evaluate_zeroshot(model, tokenizer, str(synthetic_shards), "labels", split="test",
                          val_data=str(synthetic_shards), val_split="test", seconds=2.5, n_bootstrap=0)


def test_choice_on_validation_is_the_first_best_candidate_and_embeds_each_checkpoint_once(
        synthetic_shards, checkpoint, tmp_path, monkeypatch):
    calls = Counter()

    def counted(name):
        original = getattr(evaluate_module, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(evaluate_module, name, call)

    counted("load_model")
    counted("embed_shards")
    checkpoints = [str(checkpoint), str(save_random_checkpoint(tmp_path / "epoch_2.pt", seed=1))]
    # the labels task's labels are their own only statement: noisy-or ties with prompt, which comes later
    grid = [ScoringRules("name", "noisy-or", "sigmoid"), ScoringRules("name", "prompt", "sigmoid"),
            ScoringRules("shipped", "prompt", "contrast")]
    choices, candidates = choose_on_validation(MODEL, checkpoints, str(synthetic_shards), "val", ["labels"], grid)
    assert calls == {"load_model": 2, "embed_shards": 2}
    assert [(row["checkpoint"], row["aggregate"], row["names"]) for row in candidates] == [
        (c, rules.aggregate, rules.names) for c in checkpoints for rules in grid]
    for first in (0, 3):
        assert candidates[first]["val_macro_auroc"] == candidates[first + 1]["val_macro_auroc"]
    best = max(candidates, key=lambda row: row["val_macro_auroc"])
    choice = choices["labels"]
    assert (choice.checkpoint, choice.rules, choice.val_macro_auroc) == (
        best["checkpoint"], ScoringRules(best["names"], best["aggregate"], best["scoring"]), best["val_macro_auroc"])
    assert choice.rules != grid[1]  # the tie went to the earlier rules
    assert choice.describe() == {"chosen_on": "val", "checkpoint": best["checkpoint"],
                                 "rules": {"names": best["names"], "aggregate": best["aggregate"],
                                           "scoring": best["scoring"]}, "val_macro_auroc": best["val_macro_auroc"]}
    # the AUROC it was chosen by is the macro AUROC the evaluation reports on the val split
    model, tokenizer = load_model(MODEL, choice.checkpoint)
    on_val = evaluate_zeroshot(model, tokenizer, str(synthetic_shards), "labels", split="val", rules=choice.rules,
                               n_bootstrap=0)
    assert on_val.metrics["headline"]["macro_auroc"] == pytest.approx(choice.val_macro_auroc)


def test_choice_on_validation_falls_back_to_the_last_checkpoint_when_no_auroc_is_defined(
        synthetic_shards, checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_module.M, "macro_auroc", lambda y_true, y_score: None)
    fallback = ScoringRules("shipped", "prompt", "contrast")
    last = str(save_random_checkpoint(tmp_path / "epoch_2.pt", seed=1))
    choices, candidates = choose_on_validation(MODEL, [str(checkpoint), last], str(synthetic_shards), "val",
                                               ["labels"], [ScoringRules()], fallback_rules=fallback)
    assert [row["val_macro_auroc"] for row in candidates] == [None, None]
    choice = choices["labels"]
    assert (choice.checkpoint, choice.rules, choice.val_macro_auroc, choice.chosen_on) == (last, fallback, None, None)
    assert "no label of labels has both positives and negatives" in choice.describe()["note"]


def test_load_model_restores_an_open_clip_train_checkpoint(checkpoint, model_and_tokenizer):
    saved = torch.load(checkpoint, weights_only=True)["state_dict"]
    loaded = model_and_tokenizer[0].state_dict()
    assert set(loaded) == {k.removeprefix("module.") for k in saved}
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[f"module.{key}"])
    assert not model_and_tokenizer[0].training


def test_bad_input_errors_name_the_problem(synthetic_shards, checkpoint, model_and_tokenizer):
    with pytest.raises(ValueError, match=r"checkpoint .*epoch_1\.pt.* does not match model 'ECG-RN34-CLIPText'.*"
                                         r"(missing|unexpected)"):
        load_model("ECG-RN34-CLIPText", str(checkpoint))
    with pytest.raises(ValueError, match="unknown model 'ECG-RN99'"):
        load_model("ECG-RN99", str(checkpoint))
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match=r"shard\(s\) of .*nothing-\{000000\.\.000003\}\.tar' do not exist"):
        evaluate_zeroshot(model, tokenizer, f"{synthetic_shards}/nothing-{{000000..000003}}.tar", "labels")
    with pytest.raises(ValueError, match=r"no shards match .*/nothing-\*\.tar"):
        evaluate_zeroshot(model, tokenizer, f"{synthetic_shards}/nothing-*.tar", "labels")
    with pytest.raises(ValueError, match="is a folder of shards: give a split"):
        evaluate_zeroshot(model, tokenizer, str(synthetic_shards), "labels")
    with pytest.raises(ValueError, match=r"task 'cinc' reads SNOMED CT label codes.*NORM"):
        evaluate_zeroshot(model, tokenizer, str(synthetic_shards), "cinc", split="test", seconds=2.5)


def test_evaluate_cli_writes_the_report(synthetic_shards, checkpoint, tmp_path):
    out = tmp_path / "report"
    result = run_cli("evaluate", "--model", MODEL, "--pretrained", checkpoint, "--data", synthetic_shards,
                     "--split", "test", "--val-data", synthetic_shards, "--val-split", "val", "--task", "labels",
                     "--out", out, "--bootstrap", "30", "--seconds", "2.5", "--batch-size", "16")
    assert result.returncode == 0, result.stderr
    assert "zero-shot labels: macro_auroc" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "zero-shot" and metrics["model"] == MODEL
    assert metrics["thresholds"]["source"] == "validation max-F1"
    assert set(metrics["confidence_intervals"]["intervals"]) == set(metrics["headline"])
    with open(out / "per_label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["code"] for r in rows] == metrics["task"]["codes"]
    assert sum(r["auroc"] == "" for r in rows) == metrics["labels_auroc_undefined"]["count"]
    for png in ("per_label.png", "roc_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| macro_auroc |" in report and "validation max-F1" in report


def test_evaluate_cli_rejects_a_checkpoint_of_another_model(synthetic_shards, checkpoint, tmp_path):
    result = run_cli("evaluate", "--model", "ECG-RN18-MiniLM", "--pretrained", checkpoint, "--data",
                     synthetic_shards, "--split", "test", "--out", tmp_path / "x")
    assert result.returncode != 0
    assert "does not match model 'ECG-RN18-MiniLM'" in result.stderr and "epoch_1.pt" in result.stderr


def test_embed_cli_writes_normalised_embeddings_in_shard_order(synthetic_shards, checkpoint, model_and_tokenizer,
                                                               tmp_path):
    out = tmp_path / "emb"
    result = run_cli("embed", "--model", MODEL, "--pretrained", checkpoint, "--data", synthetic_shards,
                     "--split", "val", "--out", out, "--seconds", "2.5")
    assert result.returncode == 0, result.stderr
    embeddings = np.load(out / "embeddings.npy", allow_pickle=False)
    with open(out / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    samples = list(iterate_samples(expand_shards(str(synthetic_shards), split="val")))
    assert [r["key"] for r in index] == [s["key"] for s in samples]
    assert [r["label_codes"].split() for r in index] == [s["label_codes"] for s in samples]
    assert embeddings.shape == (len(samples), 256) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    direct = embed_shards(model_and_tokenizer[0], expand_shards(str(synthetic_shards), split="val"), seconds=2.5)
    np.testing.assert_allclose(embeddings, direct.embeddings, atol=1e-5)
    about = json.loads((out / "embed.json").read_text())
    assert about["shape"] == [len(samples), 256] and about["n_samples"] == 250


# ------------------------------------------------------------------------------------------------
# End to end on real PTB-XL and CinC records (briefly trained model)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ptbxl_run(ptbxl_dir, tmp_path_factory):
    """PTB-XL shards (100 Hz; train folds 1-6, val 8, test 7) and a model after a few SigLIP steps."""
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards

    root = tmp_path_factory.mktemp("ptbxl")
    write_shards(get_reader("ptbxl", ptbxl_dir, sampling_rate=100), root,
                 ShardOptions(sampling_rate=100, val_folds=(8,), test_folds=(7,), text="labels", shard_size=400,
                              workers=2, progress=False))
    torch.manual_seed(0)
    model, tokenizer = open_clip.create_model(MODEL), open_clip.get_tokenizer(MODEL)
    loss_fn = MultiLabelSigLipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocabulary = read_shard_info(expand_shards(str(root), split="train"))["vocabulary"]
    model.train()
    loader = make_eval_loader(expand_shards(str(root), split="train"), n_samples=250, batch_size=48,
                              vocab_size=len(vocabulary), tokenizer=tokenizer)
    for step, batch in zip(range(4), loader):
        image, text, scale, bias = model(batch["ecg"], batch["tokens"])
        loss = loss_fn(image, text, scale, bias, labels=batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = root / "epoch_1.pt"
    save_open_clip_checkpoint(model, path)
    return root, path


def superclass_counts(ptbxl_dir, folds):
    """Superclass positives per label on PTB-XL folds, straight from the CSVs (independent of tasks.py)."""
    database = pd.read_csv(ptbxl_dir / "ptbxl_database.csv")
    statements = pd.read_csv(ptbxl_dir / "scp_statements.csv", index_col=0)
    classes = statements[statements.diagnostic == 1].diagnostic_class
    counts, n_records = Counter(), 0
    for row in database[database.strat_fold.isin(folds)].itertuples():
        labels = {classes[c] for c in ast.literal_eval(row.scp_codes) if c in classes.index}
        counts.update(labels)
        n_records += bool(labels)
    return counts, n_records


@pytest.mark.slow
def test_end_to_end_ptbxl(ptbxl_run, ptbxl_dir, tmp_path):
    root, checkpoint = ptbxl_run
    model, tokenizer = load_model(MODEL, str(checkpoint))
    result = evaluate_zeroshot(model, tokenizer, str(root), "ptbxl-super", split="test", val_data=str(root),
                               val_split="val", seconds=2.5, n_bootstrap=100)
    counts, n_records = superclass_counts(ptbxl_dir, [7])
    assert result.metrics["data"]["records_evaluated"] == n_records
    assert {r["code"]: r["n_positive"] for r in result.metrics["per_label"]} == {c: counts[c] for c in result.task.codes}
    assert result.metrics["thresholds"]["val_records"] == superclass_counts(ptbxl_dir, [8])[1]
    y, s = result.scores.y_true, result.scores.y_score
    assert result.metrics["headline"]["micro_auroc"] == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))
    assert ((s > 0) & (s < 1)).all()
    paths = write_report(result, tmp_path / "super")
    assert all(Path(p).stat().st_size > 0 for p in paths.values())


@pytest.mark.slow
def test_cross_institution_thresholds_from_ptbxl_applied_to_cinc(ptbxl_run, cinc_dir, tmp_path):
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards

    root, checkpoint = ptbxl_run
    model, tokenizer = load_model(MODEL, str(checkpoint))
    cinc = tmp_path / "cinc"
    write_shards(get_reader("cinc", cinc_dir), cinc,
                 ShardOptions(sampling_rate=100, split_by="random", val_fraction=0.0, test_fraction=0.999,
                              text="labels", progress=False))
    cross = evaluate_zeroshot(model, tokenizer, str(cinc), "ptbxl-cinc-shared", split="test", val_data=str(root),
                              val_split="val", seconds=2.5, n_bootstrap=50)
    test_keys = {s["key"] for s in iterate_samples(expand_shards(str(cinc), split="test"))}
    assert cross.metrics["data"]["records_evaluated"] == len(test_keys)
    af = next(r for r in cross.metrics["per_label"] if r["code"] == "AFIB")
    dx = {p.stem: p.read_text() for p in cinc_dir.glob("*.hea")}
    assert af["n_positive"] == sum("164889003" in dx[k.removeprefix("cinc_")] for k in test_keys)
    assert cross.metrics["thresholds"]["val_data"].endswith("(split val)")  # chosen on PTB-XL, applied to CinC


def test_labels_task_prompts_are_the_shards_own_names_even_for_scp_like_codes(tmp_path):
    vocabulary = [{"id": 0, "code": "AFIB", "name": "atrial fibrillation"},
                  {"id": 1, "code": "PVC", "name": "premature ventricular complexes"}]
    names, templates, sources = task_prompts(get_task("labels", vocabulary).labels)
    assert names == {"AFIB": ["atrial fibrillation"], "PVC": ["premature ventricular complexes"]}
    assert set(sources.values()) == {"label name"} and templates is None
    user = tmp_path / "prompts.json"
    user.write_text(json.dumps({"findings": {"PVC": ["ventricular extrasystole"]}}))
    assert task_prompts(get_task("labels", vocabulary).labels, user)[0]["PVC"] == ["ventricular extrasystole"]
