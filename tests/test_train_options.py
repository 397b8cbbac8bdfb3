"""The --ecg-* options and the refused open_clip flags, through `open-clip-ecg train` on tiny runs:
reduced-lead towers, every target mode, validation crop, normalisation, amplitude scaling, initial
SigLIP scale/bias, train/val vocabularies that differ, and every flag in REJECTED_FLAGS."""
import ast
import json
import re

import numpy as np
import pytest
import torch

from open_clip_ecg import LEAD_SETS
from open_clip_ecg.cli import main as cli
from open_clip_ecg.towers.resnet1d import ResNet1d
from open_clip_ecg.training.options import REJECTED_FLAGS


def train_args(shards, logs, name, *extra, model="ECG-RN18-CLIPText"):
    """Two optimizer steps of 8 pairs (16 samples), fp32, one process."""
    return ["--model", model, "--train-data", str(shards / "train-*.tar"), "--val-data", str(shards / "val-*.tar"),
            "--batch-size", "8", "--train-num-samples", "16", "--epochs", "1", "--workers", "0", "--lr", "1e-3",
            "--warmup", "1", "--logs", str(logs), "--name", name, "--seed", "0", "--ecg-seconds", "2.5", *extra]


def ecg_options_logged(run_dir):
    """The --ecg-* options as open_clip_train recorded them in params.txt (its `ecg: Namespace(...)` line)."""
    line = next(line for line in (run_dir / "params.txt").read_text().splitlines() if line.startswith("ecg: "))
    return {k: ast.literal_eval(v) for k, v in re.findall(r"(\w+)=((?:\[[^\]]*\]|\([^)]*\)|'[^']*'|[^,)]+))", line)}


def checkpoint(run_dir):
    return torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=True)


def test_one_lead_tower_with_exact_targets_and_every_preprocessing_option(synthetic_shards, tmp_path, monkeypatch):
    """One run carries the options whose effect the checkpoint records (lead set, validation crop,
    normalisation, initial logit scale and bias) and those only the run's parameters show (targets,
    amplitude scaling); the tower sees 2.5 s crops in training and 4 s ones in validation and zero-shot."""
    seen = set()  # (training?, channels, samples) of every ECG batch the tower saw
    forward = ResNet1d.forward
    monkeypatch.setattr(ResNet1d, "forward", lambda self, x: seen.add((self.training, *x.shape[1:])) or forward(self, x))
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "one-lead", "--ecg-leads", "1", "--ecg-targets",
                                     "exact", "--ecg-eval-seconds", "4", "--ecg-normalize", "zscore",
                                     "--ecg-amplitude-scale", "0.8", "1.2", "--ecg-init-logit-scale", "5",
                                     "--ecg-init-logit-bias", "-3", "--zeroshot-frequency", "1",
                                     model="ECG-RN18-1Lead-CLIPText")]) == 0
    run = tmp_path / "one-lead"
    saved = checkpoint(run)
    preprocess = saved["ecg_preprocess"]
    assert preprocess["leads"] == LEAD_SETS["1"] == ["I"]
    assert (preprocess["eval_seconds"], preprocess["seconds"], preprocess["normalize"]) == (4.0, 2.5, "zscore")
    # two AdamW steps of lr 1e-3 move the logit scale/bias by ~2e-3 from where the flags put them
    assert float(saved["state_dict"]["logit_scale"]) == pytest.approx(np.log(5.0), abs=0.01)
    assert float(saved["state_dict"]["logit_bias"]) == pytest.approx(-3.0, abs=0.01)
    assert saved["state_dict"]["visual.trunk.conv1.weight"].shape[1] == 1  # the 1-lead tower was trained
    options = ecg_options_logged(run)
    assert options["ecg_targets"] == "exact" and tuple(options["ecg_amplitude_scale"]) == (0.8, 1.2)
    results = [json.loads(line) for line in (run / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert results[-1]["zeroshot-labels-scored"] >= 1 and "clip_val_loss" in results[-1]
    assert seen == {(True, 1, 250), (False, 1, 400)}


def test_six_lead_tower_with_identity_targets_and_no_normalisation(synthetic_shards, tmp_path):
    """The lead set comes from the tower when --ecg-leads is not given; identity targets (plain SigLIP)."""
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "six-lead", "--ecg-targets", "identity",
                                     "--ecg-normalize", "none", "--val-frequency", "0", "--zeroshot-frequency", "0",
                                     model="ECG-RN18-6Lead-CLIPText")]) == 0
    run = tmp_path / "six-lead"
    preprocess = checkpoint(run)["ecg_preprocess"]
    assert preprocess["leads"] == LEAD_SETS["6"] and preprocess["normalize"] == "none"
    assert preprocess["eval_seconds"] == 10.0  # default: the whole stored record
    assert ecg_options_logged(run)["ecg_targets"] == "identity"


def test_train_and_val_shards_with_different_vocabularies_are_refused(synthetic_shards, tmp_path, capsys):
    """Labels are ids into the training vocabulary: val shards written in another run cannot be scored."""
    assert cli(["synth", "--output", str(tmp_path / "other"), "--n", "6", "--seed", "7", "--sampling-rate", "100",
                "--workers", "1"]) == 0
    assert cli(["shards", "--format", "csv", "--input", str(tmp_path / "other" / "records.csv"), "--output",
                str(tmp_path / "other-shards"), "--sampling-rate", "100", "--split-by", "random",
                "--val-fraction", "0.5", "--test-fraction", "0", "--no-progress"]) == 0
    codes = [[v["code"] for v in json.loads((folder / "vocabulary.json").read_text())]
             for folder in (synthetic_shards, tmp_path / "other-shards")]
    assert codes[0] != codes[1]  # the premise: two different vocabularies
    args = train_args(synthetic_shards, tmp_path, "mismatch")
    args[args.index("--val-data") + 1] = str(tmp_path / "other-shards" / "val-*.tar")
    capsys.readouterr()
    assert cli(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "label vocabularies" in err and "differ" in err and "one `open-clip-ecg shards` run" in err
    assert not (tmp_path / "mismatch" / "checkpoints" / "epoch_1.pt").exists()


@pytest.mark.parametrize("flag, seconds", [("--ecg-seconds", "0"), ("--ecg-seconds", "11"),
                                           ("--ecg-eval-seconds", "0")])
def test_a_crop_of_no_samples_or_longer_than_the_records_is_refused_naming_the_flag(synthetic_shards, tmp_path,
                                                                                   capsys, flag, seconds):
    capsys.readouterr()
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "crop"), flag, seconds]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (f"open-clip-ecg train: error: {flag} {float(seconds)} is outside the records stored in "
                     f"{synthetic_shards} (10 s at 100 Hz)")


# A value for each flag open_clip_train accepts but ECG training refuses; a flag added to REJECTED_FLAGS
# without one here fails test_every_rejected_flag_has_a_test_value.
REJECTED_FLAG_VALUES = {
    "imagenet_val": ["/x"], "imagenet_v2": ["/x"], "horovod": [], "force_patch_dropout": ["0.5"],
    "distill_model": ["RN50"], "trace": [], "torchscript": [], "pretrained_image": [], "local_loss": [],
    "gather_with_grad": [], "aug_cfg": ["scale=(0.9,1.0)"], "force_image_size": ["224"],
    "image_mean": ["0.5", "0.5", "0.5"], "image_std": ["0.5", "0.5", "0.5"],
}


def test_every_rejected_flag_has_a_test_value():
    assert set(REJECTED_FLAG_VALUES) == set(REJECTED_FLAGS)


@pytest.mark.parametrize("flag", sorted(REJECTED_FLAGS))
def test_every_rejected_flag_fails_in_one_line_with_its_advice(synthetic_shards, tmp_path, capsys, flag):
    option = "--" + flag.replace("_", "-")
    status = cli(["train", *train_args(synthetic_shards, tmp_path, "rejected"), option,
                  *REJECTED_FLAG_VALUES.get(flag, [])])
    err = capsys.readouterr().err
    assert status == 2, err[-2000:]
    assert f"{option}: {REJECTED_FLAGS[flag]}" in err
    assert "Traceback" not in err and not (tmp_path / "rejected").exists()  # refused before open_clip starts


@pytest.mark.parametrize("finding_texts, extra", [("jaccard", ["--accum-freq", "2"]),
                                                   ("contains", ["--ecg-finding-prior", "--ecg-finding-weight", "4"])])
def test_finding_texts_add_their_loss_term_and_train_the_text_tower_on_them(synthetic_shards, tmp_path,
                                                                           finding_texts, extra):
    """--ecg-finding-texts: every step embeds one text per vocabulary finding and the loss gains a
    finding_text_loss term (also with --accum-freq, which concatenates each micro-batch's copy)."""
    run = tmp_path / finding_texts
    assert cli(["train", *train_args(synthetic_shards, tmp_path, finding_texts, "--ecg-finding-texts", finding_texts,
                                     "--log-every-n-steps", "1", "--val-frequency", "0", "--zeroshot-frequency",
                                     "0", *extra)]) == 0
    log = (run / "out.log").read_text()
    n_findings = len(json.loads((synthetic_shards / "vocabulary.json").read_text()))
    weight = extra[-1] if "--ecg-finding-weight" in extra else "1"
    assert f"meets {n_findings} finding texts per step (0 of them groups), {finding_texts} targets, weight {weight}" in log
    losses = [float(v) for v in re.findall(r"Finding_text_loss: ([\d.]+)", log)]
    assert losses and all(np.isfinite(losses)) and min(losses) > 0
    assert ecg_options_logged(run)["ecg_finding_texts"] == finding_texts
    prior = "--ecg-finding-prior" in extra
    assert ("log-odds offsets (--ecg-finding-prior)" in log) == prior
    assert ecg_options_logged(run)["ecg_finding_prior"] == prior


@pytest.fixture(scope="module")
def ptbxl_coded_shards(tmp_path_factory):
    """Synthetic records whose bundle branch block is coded CLBBB, so the PTB-XL superclass
    "conduction disturbance" groups two vocabulary findings (1AVB and CLBBB)."""
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("ptbxl-coded")
    csv_path = write_synthetic_dataset(root / "records", n=48, seed=1, progress=False)
    for path in (csv_path, csv_path.parent / "label_names.csv"):
        path.write_text(re.sub(r"\bBBB\b", "CLBBB", path.read_text()))
    write_shards(get_reader("csv", csv_path), root / "shards",
                 ShardOptions(sampling_rate=100, seconds=10, split_by="random", val_fraction=0.2,
                              test_fraction=0.1, shard_size=16, text="report", progress=False))
    return root / "shards"


def test_finding_groups_add_one_text_per_multi_finding_label(ptbxl_coded_shards, tmp_path):
    """--ecg-finding-groups ptbxl-super: "conduction disturbance" (1AVB or CLBBB) is trained as one more
    finding text; labels naming one finding already in the vocabulary, or none, are listed as left out."""
    run = tmp_path / "groups"
    assert cli(["train", *train_args(ptbxl_coded_shards, tmp_path, "groups", "--ecg-finding-texts", "contains",
                                     "--ecg-finding-groups", "ptbxl-super", "--log-every-n-steps", "1",
                                     "--val-frequency", "0", "--zeroshot-frequency", "0")]) == 0
    log = (run / "out.log").read_text()
    n_findings = len(json.loads((ptbxl_coded_shards / "vocabulary.json").read_text()))
    assert f"meets {n_findings + 1} finding texts per step (1 of them groups), contains targets" in log
    assert "no text for 'hypertrophy': names the same findings as 'left ventricular hypertrophy'" in log
    assert "no text for 'myocardial infarction': no member finding in the vocabulary" in log
    losses = [float(v) for v in re.findall(r"Finding_text_loss: ([\d.]+)", log)]
    assert losses and all(np.isfinite(losses)) and min(losses) > 0
    assert ecg_options_logged(run)["ecg_finding_groups"] == ["ptbxl-super"]


def test_finding_groups_need_finding_texts(synthetic_shards, tmp_path, capsys):
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "groups-alone",
                                     "--ecg-finding-groups", "ptbxl-super")]) == 2
    assert "--ecg-finding-groups adds finding texts: use it with --ecg-finding-texts" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--ecg-finding-weight", "4"], "--ecg-finding-weight weighs the finding texts: use it with --ecg-finding-texts"),
    (["--ecg-finding-texts", "contains", "--ecg-finding-weight", "0"], "--ecg-finding-weight must be > 0, got 0.0"),
    (["--ecg-finding-prior"], "--ecg-finding-prior offsets the finding texts' logits: use it with --ecg-finding-texts"),
])
def test_finding_weight_needs_finding_texts_and_a_positive_value(synthetic_shards, tmp_path, capsys, flags, message):
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "weight", *flags)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_finding_texts_cannot_come_from_a_text_cache(synthetic_shards, tmp_path, capsys):
    assert cli(["train", *train_args(synthetic_shards, tmp_path, "cached", "--ecg-finding-texts", "jaccard",
                                     "--ecg-text-cache", str(tmp_path / "no-cache"))]) == 2
    assert "--ecg-finding-texts composes new texts every step" in capsys.readouterr().err


def test_rr_tower_trains_records_its_channels_and_embeds_raw_signals(synthetic_shards, tmp_path):
    """ECG-RN18-RR-CLIPText: the lead set "12+rr" comes from the tower, the checkpoint records it, and
    every consumer (zero-shot validation in training, embed_shards, the raw-signal preprocess)
    appends the RR channels the tower takes."""
    from open_clip_ecg import create_model_and_transforms
    from open_clip_ecg.embed import embed_shards

    assert cli(["train", *train_args(synthetic_shards, tmp_path, "rr", "--zeroshot-frequency", "1",
                                     model="ECG-RN18-RR-CLIPText")]) == 0
    run = tmp_path / "rr"
    saved = checkpoint(run)
    assert saved["ecg_preprocess"]["leads"] == LEAD_SETS["12+rr"]
    assert saved["state_dict"]["visual.trunk.conv1.weight"].shape[1] == 14
    model, _, preprocess = create_model_and_transforms("ECG-RN18-RR-CLIPText", str(run / "checkpoints" / "epoch_1.pt"))
    embedded = embed_shards(model, str(synthetic_shards / "val-*.tar"))
    assert embedded.embeddings.shape[1] == 256 and np.isfinite(embedded.embeddings).all()
    raw = np.random.default_rng(0).standard_normal((12, 5000)).astype(np.float32)  # 500 Hz, 10 s
    assert preprocess(raw, 500, LEAD_SETS["12"]).shape == (14, 1000)
