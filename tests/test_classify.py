"""`open-clip-ecg classify`: a user's own ECG files -> findings, as a user runs it."""
import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
import wfdb

import open_clip_ecg
from open_clip_ecg.classify import DECISIONS_FILE, decisions_on_validation, write_decisions
from open_clip_ecg.cli import main as cli_main
from open_clip_ecg.export import export_model
from open_clip_ecg.factory import load_model
from open_clip_ecg.model_preprocess import ECG_PREPROCESS_KEY
from open_clip_ecg.scoring import ScoringRules

VOCABULARY = [{"id": 0, "code": "NORM", "name": "normal ECG"}, {"id": 1, "code": "AFIB", "name": "atrial fibrillation"},
              {"id": 2, "code": "LVH", "name": "left ventricular hypertrophy"}]
PNG = b"\x89PNG\r\n\x1a\n"


def classify_cli(*args):
    return subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", "classify", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """An exported ECG-RN18-CLIPText of random weights (100 Hz, 5 s training crop, 10 s evaluation)."""
    root = tmp_path_factory.mktemp("random-model")
    torch.manual_seed(0)
    model = open_clip.create_model("ECG-RN18-CLIPText", init_logit_bias=-4)
    cfg = {"model": "ECG-RN18-CLIPText", "sampling_rate": 100.0, "seconds": 5.0, "eval_seconds": 10.0,
           "leads": open_clip_ecg.STANDARD_LEADS, "normalize": "center", "text": "report", "vocabulary": VOCABULARY}
    torch.save({"epoch": 1, "state_dict": model.state_dict(), ECG_PREPROCESS_KEY: cfg}, root / "epoch_1.pt")
    return export_model("ECG-RN18-CLIPText", str(root / "epoch_1.pt"), root / "model")


def write_record(folder, name, signal, fs=100, leads=open_clip_ecg.STANDARD_LEADS):
    folder.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=np.asarray(signal, float).T,
                fmt=["16"] * len(leads), adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads),
                write_dir=str(folder))
    return folder / f"{name}.hea"


def ecg(seconds=10.0, fs=100, seed=0):
    t = np.arange(int(seconds * fs)) / fs
    rng = np.random.default_rng(seed)
    beats = np.exp(-((t % 0.8) - 0.4) ** 2 / 0.0008)
    return np.stack([beats * rng.uniform(0.3, 1.5) + 0.02 * rng.standard_normal(t.size) for _ in range(12)])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_arrays_wfdb_and_an_index_of_the_same_ecg_give_the_same_probabilities(random_model, tmp_path, capsys):
    """Leads found by name in any spelling and order, resampled from 500 Hz, either array orientation."""
    signal = ecg()
    write_record(tmp_path / "wfdb", "rec", signal)
    at_500 = ecg(fs=500)
    write_record(tmp_path / "wfdb", "rec500", at_500, fs=500)
    order = [11, 0, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    spelled = ["v6", "lead_I", "AVR", "II", "III", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5"]
    np.save(tmp_path / "arr.npy", signal[order].T.astype(np.float32))  # [samples, leads]
    np.savez(tmp_path / "many.npz", first=signal[order], both=np.stack([signal[order], signal[order]]))
    (tmp_path / "index.csv").write_text("path,report,labels\nwfdb/rec,,\n")
    out = tmp_path / "out"
    assert cli_main(["classify", "--model", f"local-dir:{random_model}", "--out", str(out), "--sampling-rate", "100",
                     "--leads", ",".join(spelled), str(tmp_path / "wfdb"), str(tmp_path / "arr.npy"), str(tmp_path / "many.npz"),
                     str(tmp_path / "index.csv")]) == 0
    rows = {r["record"]: r for r in read_csv(out / "predictions.csv")}
    assert set(rows) == {"rec", "rec500", "arr", "many:first", "many:both[0]", "many:both[1]", "wfdb/rec"}
    probs = {k: np.array([float(r[c]) for c in ("NORM", "AFIB", "LVH")]) for k, r in rows.items()}
    for key in ("arr", "many:first", "many:both[0]", "many:both[1]", "wfdb/rec"):
        np.testing.assert_allclose(probs[key], probs["rec"], atol=1e-4)
    assert np.abs(probs["rec500"] - probs["rec"]).max() < 0.05  # resampled from 500 Hz: close, not identical
    stdout = capsys.readouterr().out
    assert "rec: NORM" in stdout or "rec: AFIB" in stdout or "rec: LVH" in stdout
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["thresholds"]["source"] == "fixed" and "0.5 for every finding" in saved["thresholds"]["note"]
    assert "decisions at 0.5" in stdout.splitlines()[-1]


def test_findings_by_name_and_no_readable_record(random_model, tmp_path, capsys):
    write_record(tmp_path / "in", "short", ecg(seconds=3))
    out = tmp_path / "out"
    status = cli_main(["classify", "--model", f"local-dir:{random_model}", "--out", str(out),
                       "--findings", "atrial fibrillation", "sinus bradycardia", "--", str(tmp_path / "in")])
    assert status == 1
    err = capsys.readouterr().err
    assert "short (record short): too_short: 3 s, shorter than the 5 s the model was trained on" in err
    assert "no readable record in" in err
    write_record(tmp_path / "in", "ok", ecg())
    assert cli_main(["classify", "--model", f"local-dir:{random_model}", "--out", str(out), str(tmp_path / "in"),
                     "--findings", "atrial fibrillation", "sinus bradycardia"]) == 0
    assert list(read_csv(out / "predictions.csv")[0]) == ["record", "path", "positive", "atrial fibrillation",
                                                          "sinus bradycardia"]


def test_arrays_need_their_rate_and_leads(random_model, tmp_path, capsys):
    np.save(tmp_path / "x.npy", ecg())
    assert cli_main(["classify", "--model", f"local-dir:{random_model}", "--out", str(tmp_path / "o"),
                     str(tmp_path / "x.npy")]) == 2
    assert "give --sampling-rate and --leads" in capsys.readouterr().err


def test_stored_validation_thresholds_decide_and_are_reported(random_model, tmp_path, capsys):
    model = shutil.copytree(random_model, tmp_path / "model")
    write_decisions(model, {"labels": {"rules": {"names": "name", "aggregate": "noisy-or", "scoring": "sigmoid"},
                                       "thresholds": {"NORM": 0.0, "AFIB": 1.0, "LVH": 1.0},
                                       "threshold_source": "validation max-F1", "val_data": "shards (split val)"}},
                    {"note": "test"})
    write_record(tmp_path / "in", "ok", ecg())
    out = tmp_path / "out"
    assert cli_main(["classify", "--model", f"local-dir:{model}", "--out", str(out), str(tmp_path / "in")]) == 0
    assert read_csv(out / "predictions.csv")[0]["positive"] == "NORM"
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["thresholds"]["source"] == "validation max-F1"
    assert [f["threshold"] for f in saved["findings"]] == [0.0, 1.0, 1.0]
    assert "thresholds chosen on validation data (shards (split val))" in capsys.readouterr().out
    # other prompts than the thresholds were chosen with: 0.5, and said so
    assert cli_main(["classify", "--model", f"local-dir:{model}", "--out", str(out), str(tmp_path / "in"),
                     "--findings", "normal ECG"]) == 0
    assert json.loads((out / "predictions.json").read_text())["thresholds"]["source"] == "fixed"


def bad_records(folder):
    """One record of each kind classify must skip, count and name."""
    write_record(folder, "short", ecg(seconds=2))
    write_record(folder, "six_leads", ecg()[:6], leads=open_clip_ecg.STANDARD_LEADS[:6])
    gap = ecg()
    gap[3, 100:400] = np.nan
    write_record(folder, "gap", gap)
    (folder / "broken.hea").write_text("this is not a WFDB header\n")
    return {"too_short": "short", "missing_leads": "six_leads", "non_finite": "gap", "unreadable": "broken"}


@pytest.mark.slow
def test_classify_real_ptbxl_records_with_a_trained_exported_model_equals_evaluate(
        ptbxl_dir, tiny_training_run, synthetic_shards, tmp_path):
    """Done-when of issue 23: the CLI on a folder of real PTB-XL WFDB records (bad ones among them) writes
    the CSV, JSON and plots, and its probabilities are evaluate's for the same records."""
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_format import sample_key
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.evaluate import evaluate_zeroshot
    from open_clip_ecg.tasks import get_task

    checkpoint = tiny_training_run / "checkpoints" / "epoch_1.pt"
    model_dir = export_model("ECG-RN18-CLIPText", str(checkpoint), tmp_path / "model")
    trained, tokenizer = load_model(f"local-dir:{model_dir}")
    rules = ScoringRules()
    write_decisions(model_dir, decisions_on_validation(trained, tokenizer, synthetic_shards, "val", {"labels": rules}),
                    {"note": "test"})
    folder = tmp_path / "ecgs"
    headers = sorted((ptbxl_dir / "records100").rglob("*.hea"))[:12]
    for i, header in enumerate(headers):  # two sub-folders: found recursively
        target = folder / f"part{i % 2}"
        target.mkdir(parents=True, exist_ok=True)
        for f in header.parent.glob(header.stem + ".*"):
            shutil.copy(f, target)
    skips = bad_records(folder / "bad")
    out = tmp_path / "findings"
    result = classify_cli("--model", f"local-dir:{model_dir}", "--out", out, "--plot", "--batch-size", "5", folder)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = read_csv(out / "predictions.csv")
    ids = sorted(f"part{i % 2}/{h.stem}" for i, h in enumerate(headers))
    assert sorted(r["record"] for r in rows) == ids
    saved = json.loads((out / "predictions.json").read_text())
    codes = [f["code"] for f in saved["findings"]]
    assert codes == [v["code"] for v in trained.ecg_preprocess["vocabulary"]] and list(rows[0])[3:] == codes
    for row, record in zip(rows, saved["records"]):  # the JSON holds what the CSV holds
        assert row["record"] == record["record"] and row["positive"] == ";".join(record["positive"])
        np.testing.assert_allclose([float(row[c]) for c in codes], [record["probabilities"][c] for c in codes], atol=1e-6)
    assert saved["thresholds"]["source"] == "validation max-F1"
    assert saved["counts"] == {"records": 16, "classified": 12, "skipped": 4,
                               "skipped_by_reason": {reason: 1 for reason in skips}}
    skipped_lines = [line for line in result.stderr.splitlines() if line.startswith("skipped ")]
    assert len(skipped_lines) == 4
    for reason, name in skips.items():
        assert any(f"(record bad/{name}): {reason}:" in line for line in skipped_lines), (reason, skipped_lines)
    summary = [line for line in result.stdout.splitlines() if line.split(":")[0] in ids]
    assert len(summary) == 12
    assert "12 record(s) classified, 4 skipped" in result.stdout
    for record_id in ids:
        assert (out / (record_id.replace("/", "_") + ".png")).read_bytes()[:8] == PNG

    # evaluate's probabilities: the same records written as shards (a CSV index of them, split test), with
    # the model's vocabulary and its names (scoring rules may prompt the shards' names for the codes)
    index = tmp_path / "index.csv"
    index.write_text("id,path,report,labels,split\n" + "".join(
        f"{i},{folder / i},an ECG,{';'.join(codes)},test\n" for i in ids))
    (tmp_path / "label_names.json").write_text(json.dumps({f["code"]: f["name"] for f in saved["findings"]}))
    shards = tmp_path / "shards"
    write_shards(get_reader("csv", index), shards, ShardOptions(sampling_rate=100, seconds=10, split_by="column",
                                                                shard_size=8, text="report", progress=False))
    evaluated = evaluate_zeroshot(trained, tokenizer, str(shards), get_task("labels", trained.ecg_preprocess["vocabulary"]),
                                  split="test", n_bootstrap=0, rules=rules)
    by_key = dict(zip(evaluated.scores.keys, evaluated.scores.y_score))
    classified = {r["record"]: np.array([float(r[c]) for c in codes]) for r in rows}
    for key in ids:  # the same inputs, bit for bit; batches of other sizes may differ in the last float bits
        np.testing.assert_allclose(classified[key], by_key[sample_key(key)], atol=1e-5)


def test_a_raw_record_reaches_the_model_exactly_as_its_shard_does(tmp_path):
    """Lead order and spelling, resampling from 500 Hz, float16 storage, normalisation, RR channels, crop."""
    from open_clip_ecg.data.pipeline import expand_shards, make_eval_loader
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.readers.wfdb_io import read_wfdb
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.model_preprocess import ECGPreprocess

    leads = ["V6", "lead_I", "AVR", "II", "III", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5"]
    order = [11, 0, 3, 1, 2, 4, 5, 6, 7, 8, 9, 10]
    for i in range(2):
        write_record(tmp_path / "in", f"r{i}", 3.0 * ecg(fs=500, seed=i)[order], fs=500, leads=leads)
    (tmp_path / "index.csv").write_text("id,path,report,labels,split\n" + "".join(
        f"r{i},in/r{i},an ECG,NORM,test\n" for i in range(2)))
    write_shards(get_reader("csv", tmp_path / "index.csv"), tmp_path / "shards",
                 ShardOptions(sampling_rate=100, seconds=10, split_by="column", text="report", progress=False))
    channels = open_clip_ecg.LEAD_SETS["12+rr"]
    for normalize in ("zscore", "center"):
        preprocess = ECGPreprocess({"sampling_rate": 100.0, "seconds": 5.0, "eval_seconds": 8.0, "leads": channels,
                                    "normalize": normalize})
        batch = next(iter(make_eval_loader(expand_shards(str(tmp_path / "shards"), split="test"), n_samples=800,
                                           batch_size=2, leads=channels, normalize=normalize, sampling_rate=100)))
        for key, stored in zip(batch["keys"], batch["ecg"]):
            assert torch.equal(preprocess(*read_wfdb(str(tmp_path / "in" / key), key)), stored), (normalize, key)
