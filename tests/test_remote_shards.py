"""Shards read through webdataset's openers (a real local HTTP server, ``pipe:cat``, ``file://``)
give the same samples, folder information, training and evaluation as the same shards read
locally; what cannot be read is one line naming the url."""
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import open_clip_ecg.train as ecg_train
from open_clip_ecg import cli
from open_clip_ecg.data.manifest import count_samples, read_shard_info
from open_clip_ecg.data.pipeline import ECGSamplePreparer, expand_shards, iterate_samples, make_train_loader
from open_clip_ecg.text_cache import _shard_texts

MODEL = "ECG-RN18-CLIPText"
OPENERS = ("local", "pipe", "file", "http")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def http_root(synthetic_shards):
    """`python -m http.server` serving the folder above `synthetic_shards` on a free local port;
    yields its url (``http://127.0.0.1:PORT``), stopped after the module's tests."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(synthetic_shards.parent)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the test's HTTP server did not start")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def spec(opener: str, shards: Path, pattern: str, http_root: str = "") -> str:
    """The shards `pattern` of the folder `shards`, as `opener` reads them."""
    return {"local": f"{shards}/{pattern}", "pipe": f"pipe:cat {shards}/{pattern}",
            "file": f"file://{shards}/{pattern}", "http": f"{http_root}/{shards.name}/{pattern}"}[opener]


def checkpoint_of_random_model(path: Path) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    with torch.no_grad():
        model.logit_bias.fill_(-1.0)
    torch.save({"epoch": 1, "state_dict": model.state_dict()}, path)
    return path


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opener", OPENERS[1:])
def test_every_opener_reads_the_samples_and_folder_information_the_local_shards_hold(
        opener, synthetic_shards, http_root):
    local = expand_shards(spec("local", synthetic_shards, "val-{000000..000001}.tar"))
    remote = expand_shards(spec(opener, synthetic_shards, "val-{000000..000001}.tar", http_root))
    assert len(remote) == 2
    local_info, remote_info = read_shard_info(local), read_shard_info(remote)
    for key in ("vocabulary", "sampling_rate", "n_samples", "text"):
        assert remote_info[key] == local_info[key]
    assert count_samples(remote) == count_samples(local) == 18
    expected, got = list(iterate_samples(local)), list(iterate_samples(remote))
    assert [s["key"] for s in got] == [s["key"] for s in expected]
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["ecg"], b["ecg"])
        assert (a["text"], a["label_ids"], a["meta"]) == (b["text"], b["label_ids"], b["meta"])


def test_a_file_url_works_as_a_glob_and_as_a_folder_with_a_split(synthetic_shards):
    local = expand_shards(str(synthetic_shards), split="val")
    assert expand_shards(f"file://{synthetic_shards}/val-*.tar") == local
    assert expand_shards(f"file://{synthetic_shards}", split="val") == local


@pytest.mark.parametrize("resampled, workers", [(False, 0), (True, 0), (False, 2)])
def test_training_batches_from_a_remote_list_equal_the_local_ones(synthetic_shards, http_root, resampled, workers):
    """open_clip's '::' list of several openers, with or without --dataset-resampled, in this
    process or in loader workers: the same batches in the same order for the same seed (the sample
    shuffle is seeded, not clock-seeded)."""
    tokenizer = open_clip.get_tokenizer(MODEL)

    def batches(train_data):
        info = read_shard_info(expand_shards(train_data))
        preparer = ECGSamplePreparer(250, len(info["vocabulary"]), train=True, sampling_rate=info["sampling_rate"])
        torch.manual_seed(0)  # the random crops
        data = make_train_loader(train_data, tokenizer=tokenizer, preparer=preparer, batch_size=8, workers=workers,
                                 seed=3, resampled=resampled, num_samples=32)
        return list(data.dataloader)

    local = batches(spec("local", synthetic_shards, "train-{000000..000004}.tar"))
    remote = batches(spec("http", synthetic_shards, "train-{000000..000002}.tar", http_root) + "::"
                     + spec("pipe", synthetic_shards, "train-{000003..000004}.tar"))
    assert len(local) == len(remote) == 4
    for (ecg_a, text_a), (ecg_b, text_b) in zip(local, remote):
        assert torch.equal(ecg_a, ecg_b) and torch.equal(text_a, text_b)


def test_text_cache_reads_the_same_texts_and_prompts_over_http(synthetic_shards, http_root):
    assert _shard_texts([spec("http", synthetic_shards, "train-{000000..000004}.tar", http_root)]) == \
        _shard_texts([spec("local", synthetic_shards, "train-{000000..000004}.tar")])


def test_embed_reads_remote_shards_as_a_user_runs_it(synthetic_shards, http_root, tmp_path, capsys):
    """`open-clip-ecg embed` over HTTP in a subprocess, over pipe:cat and locally in this process."""
    checkpoint = checkpoint_of_random_model(tmp_path / "epoch_1.pt")
    command = ["embed", "--model", MODEL, "--pretrained", str(checkpoint), "--device", "cpu"]
    result = subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", *command, "--out", str(tmp_path / "http"),
                             "--data", spec("http", synthetic_shards, "test-000000.tar", http_root)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for opener in ("local", "pipe"):
        assert cli.main([*command, "--out", str(tmp_path / opener),
                         "--data", spec(opener, synthetic_shards, "test-000000.tar")]) == 0
    for opener in ("http", "pipe"):
        np.testing.assert_array_equal(np.load(tmp_path / opener / "embeddings.npy"),
                                      np.load(tmp_path / "local" / "embeddings.npy"))
        assert (tmp_path / opener / "index.csv").read_text() == (tmp_path / "local" / "index.csv").read_text()


# ---------------------------------------------------------------------------------------------
# Training and evaluating from remote shards
# ---------------------------------------------------------------------------------------------

def _train(logs: Path, name: str, train_data: str, val_data: str):
    args = ["--model", MODEL, "--train-data", train_data, "--val-data", val_data, "--dataset-resampled",
            "--train-num-samples", "16", "--batch-size", "8", "--epochs", "1", "--workers", "0", "--lr", "1e-3",
            "--warmup", "1", "--logs", str(logs), "--name", name, "--seed", "0", "--report-to", "",
            "--zeroshot-frequency", "1", "--ecg-seconds", "2.5", "--ecg-eval-seconds", "2.5"]
    assert ecg_train.main(args) == 0
    run = logs / name / "checkpoints"
    results = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    return run / "epoch_1.pt", results


def _metrics(folder: Path) -> dict:
    metrics = json.loads((folder / "metrics.json").read_text())
    return {"headline": metrics["headline"], "per_label": metrics["per_label"],
            "thresholds": metrics["thresholds"]["per_label"]}


def _evaluate(checkpoint: Path, data: str, val_data: str, out: Path) -> dict:
    assert cli.main(["evaluate", "--model", MODEL, "--pretrained", str(checkpoint), "--data", data,
                     "--val-data", val_data, "--out", str(out), "--bootstrap", "20", "--device", "cpu"]) == 0
    return _metrics(out)


@pytest.mark.slow
def test_training_and_evaluating_from_http_and_pipe_equal_the_local_run(synthetic_shards, http_root, tmp_path):
    """One epoch (--dataset-resampled, --train-num-samples, a '::' list of an HTTP and a pipe:cat
    pattern; validation and zero-shot through file://), then `evaluate` over HTTP: the checkpoint,
    the logged validation and the evaluation equal those of the same shards read locally."""
    local_ckpt, local_results = _train(tmp_path / "logs", "local", spec("local", synthetic_shards, "train-*.tar"),
                                       spec("local", synthetic_shards, "val-000000.tar"))
    remote_ckpt, remote_results = _train(
        tmp_path / "logs", "remote",
        spec("http", synthetic_shards, "train-{000000..000002}.tar", http_root) + "::"
        + spec("pipe", synthetic_shards, "train-{000003..000004}.tar"),
        spec("file", synthetic_shards, "val-000000.tar"))
    assert remote_results == local_results and "zeroshot-macro-auroc" in remote_results[-1]
    local_state = torch.load(local_ckpt, weights_only=True)["state_dict"]
    remote_state = torch.load(remote_ckpt, weights_only=True)["state_dict"]
    assert local_state.keys() == remote_state.keys()
    assert all(torch.equal(local_state[k], remote_state[k]) for k in local_state)

    local = _evaluate(local_ckpt, spec("local", synthetic_shards, "test-000000.tar"),
                      spec("local", synthetic_shards, "val-*.tar"), tmp_path / "eval-local")
    remote = _evaluate(remote_ckpt, spec("http", synthetic_shards, "test-000000.tar", http_root),
                       spec("pipe", synthetic_shards, "val-{000000..000001}.tar"), tmp_path / "eval-remote")
    assert remote == local


@pytest.mark.slow
def test_train_supervised_and_probe_over_http_equal_the_local_runs(synthetic_shards, http_root, tmp_path):
    """The supervised baseline (one epoch) and the linear probe, every split read over HTTP or
    pipe:cat: the same metrics as from the local shards."""
    checkpoint = checkpoint_of_random_model(tmp_path / "epoch_1.pt")
    for where in ("local", "remote"):
        train, val, test = (spec("local", synthetic_shards, f"{split}-*.tar") if where == "local" else
                            spec("http" if split != "val" else "pipe", synthetic_shards, pattern, http_root)
                            for split, pattern in (("train", "train-{000000..000004}.tar"),
                                                   ("val", "val-{000000..000001}.tar"), ("test", "test-000000.tar")))
        data = ["--train-data", train, "--val-data", val, "--data", test, "--bootstrap", "20", "--device", "cpu"]
        assert cli.main(["train-supervised", *data, "--epochs", "1", "--seconds", "2.5", "--batch-size", "16",
                         "--out", str(tmp_path / where / "supervised")]) == 0
        assert cli.main(["probe", *data, "--model", MODEL, "--pretrained", str(checkpoint), "--fractions", "1",
                         "--out", str(tmp_path / where / "probe")]) == 0
    assert _metrics(tmp_path / "remote" / "supervised") == _metrics(tmp_path / "local" / "supervised")
    assert _metrics(tmp_path / "remote" / "probe" / "fraction_100pct") == \
        _metrics(tmp_path / "local" / "probe" / "fraction_100pct")


# ---------------------------------------------------------------------------------------------
# What cannot be read: one line naming the url
# ---------------------------------------------------------------------------------------------

def _last_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_an_unreachable_server_is_one_line_naming_the_url(synthetic_shards, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}/shards/test-000000.tar"  # nothing listens there
    checkpoint = checkpoint_of_random_model(tmp_path / "epoch_1.pt")
    assert cli.main(["evaluate", "--model", MODEL, "--pretrained", str(checkpoint), "--data", url,
                     "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 2
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith(f"open-clip-ecg evaluate: error: the shard folder of {url}: cannot read 'http://127.0.0.1:")
    assert "could not connect" in line


def test_train_from_an_unreachable_server_stops_before_training_with_one_line(capsys, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/ecg/train-{{000000..000003}}.tar"
    assert cli.main(["train", "--model", MODEL, "--train-data", url, "--logs", str(tmp_path)]) == 2
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith("open-clip-ecg train: error: the shard folder of http://127.0.0.1:")
    assert "/ecg/train-000000.tar: cannot read 'http://127.0.0.1:" in line and "/ecg/vocabulary.json': curl" in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["not in the manifest", "gone from the server", "a failing command"])
def test_shards_that_cannot_be_read_are_one_line_naming_the_shard(case, synthetic_shards, http_root, tmp_path,
                                                                   capsys):
    served = Path(synthetic_shards.parent / f"served-{case.replace(' ', '-')}")
    shutil.copytree(synthetic_shards, served)
    data, named = {
        "not in the manifest": (f"{http_root}/{served.name}/test-{{000000..000001}}.tar", "test-000001.tar"),
        "gone from the server": (f"{http_root}/{served.name}/val-{{000000..000001}}.tar", "val-000001.tar"),
        "a failing command": (f"pipe:cat {served}/val-{{000000..000001}}.tar", "val-000001.tar"),
    }[case]
    (served / "val-000001.tar").unlink()
    checkpoint = checkpoint_of_random_model(tmp_path / "epoch_1.pt")
    assert cli.main(["embed", "--model", MODEL, "--pretrained", str(checkpoint), "--data", data,
                     "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = _last_error_line(capsys.readouterr().err)
    assert line.startswith("open-clip-ecg embed: error: ") and named in line
    if case == "not in the manifest":
        assert "shard(s) are not in their folder's manifest.json" in line
    elif case == "gone from the server":
        assert "cannot read shard" in line and "curl exited with status 22" in line
    else:
        assert "cannot read shard pipe:cat" in line and "exited with status 1" in line


def test_a_remote_folder_with_a_split_asks_for_a_pattern(http_root):
    with pytest.raises(ValueError, match=r"a split \('test'\) picks the shards of a local folder, and "
                                         r"'http://127.0.0.1:\d+/shards/' is remote: name remote shards with a "
                                         r"pattern, e.g. 'http://127.0.0.1:\d+/shards/test-\{000000..000003\}.tar'"):
        expand_shards(f"{http_root}/shards/", split="test")
