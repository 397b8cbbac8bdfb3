"""Decoder-only LLM text towers (live and through the text-embedding cache), on random tiny models."""
import json
import shutil
import subprocess
import sys
import tarfile

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import open_clip_ecg
import open_clip_ecg.train as ecg_train
from open_clip_ecg.training.label_passing import enable_label_passing
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.pipeline import expand_shards, pack_text_and_labels
from open_clip_ecg.decoder_lm import PAD, DecoderLM, DecoderLMTokenizer
from open_clip_ecg.text_cache import LMEmbedder, TextEmbeddingCache, build_text_cache
from open_clip_ecg.text_towers import CachedTextTower, DecoderLMTextTower
from open_clip_ecg.zeroshot import build_zeroshot_classifier, prompt_texts

BASE = "ECG-RN18-CLIPText"
TEXTS = ["sinus rhythm.", "an ECG showing atrial fibrillation with rapid ventricular response and st depression",
         "left axis deviation.", ""]


def text_cache_cli(*args):
    return subprocess.run([sys.executable, "-m", "open_clip_ecg.cli", "text-cache", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def text_cache(tiny_qwen3, synthetic_shards, tmp_path_factory):
    """The CLI run on the synthetic shards, as a user would."""
    out = tmp_path_factory.mktemp("cache") / "qwen3-cache"
    result = text_cache_cli("--text-model", tiny_qwen3, "--shards", synthetic_shards, "--out", out,
                            "--batch-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.parametrize("family", ["qwen3", "llama", "mistral", "gemma3_text"])
def test_decoder_folder_pairs_with_an_ecg_tower_through_open_clip(random_decoder_lm, family):
    folder = random_decoder_lm(family, model_type=family)
    name = open_clip_ecg.register_ecg_text_model(f"{BASE}+{family}", folder, base_model=BASE)
    model, tokenizer = open_clip.create_model(name), open_clip.get_tokenizer(name)
    assert isinstance(model.text, DecoderLMTextTower) and isinstance(tokenizer, DecoderLMTokenizer)
    ids = tokenizer(TEXTS)
    lengths = (ids != PAD).sum(1)
    eos = tokenizer.eos_id
    assert all(ids[i, lengths[i] - 1] == eos for i in range(len(TEXTS)))  # EOS last, then padding
    assert bool((ids[0, lengths[0]:] == PAD).all())
    assert model.encode_text(ids, normalize=True).shape == (len(TEXTS), 256)
    assert model(torch.randn(2, 12, 500), ids[:2])[0].shape == (2, 256)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooling_a_padded_batch_equals_pooling_each_text_alone(tiny_qwen3, pooling):
    tokenizer, lm = DecoderLMTokenizer(tiny_qwen3, 64), DecoderLM(tiny_qwen3, pooling).eval()
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        batch = lm(ids)
        alone = torch.cat([lm(tokenizer([t])) for t in TEXTS])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_a_truncated_text_keeps_its_eos(tiny_qwen3):
    tokenizer = DecoderLMTokenizer(tiny_qwen3, context_length=8)
    ids = tokenizer([TEXTS[1]])
    assert ids.shape == (1, 8) and int(ids[0, -1]) == tokenizer.eos_id and bool((ids != PAD).all())


@pytest.mark.parametrize("kwargs, config_edit, message", [
    ({"eos_token": None}, {}, "has no EOS token"),
    ({}, {"eos_token_id": 0}, "is not the model's EOS"),  # config's EOS is the pad token
    ({}, {"pad_token_id": 100000}, "outside the model's vocabulary"),
])
def test_missing_or_wrong_special_tokens_are_refused(random_decoder_lm, kwargs, config_edit, message):
    folder = random_decoder_lm("bad", **kwargs)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_edit}))
    with pytest.raises(ValueError, match=message):
        open_clip_ecg.register_ecg_text_model("ECG-bad-special-tokens", folder)


def test_a_decoder_without_pad_token_is_fine(random_decoder_lm):
    """A tokenizer without pad token (Llama's): padding is marked PAD in the ids, and pooling a
    padded batch equals pooling each text alone (padding never reaches the pooled token)."""
    folder = random_decoder_lm("nopad", pad_token=None)
    tokenizer, lm = DecoderLMTokenizer(folder, 64), DecoderLM(folder, "last").eval()
    ids = tokenizer(TEXTS)
    assert ids[0, -1] == PAD
    with torch.no_grad():
        torch.testing.assert_close(lm(ids), torch.cat([lm(tokenizer([t])) for t in TEXTS]), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_text_cache_cli_embeds_each_distinct_text_once_and_resumes(text_cache, tiny_qwen3, synthetic_shards):
    """The first run embeds each distinct text of the shards (reports read from the tars here, plus
    the vocabulary's prompts) once, under its own key, as the LLM pools it; a re-run embeds none."""
    out, first = text_cache
    reports = []
    for shard in sorted(synthetic_shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            reports += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    names = [v["name"] for v in json.loads((synthetic_shards / "vocabulary.json").read_text())]
    distinct = list(dict.fromkeys(reports + prompt_texts(names)[0]))
    assert len(reports) == 96 and len(distinct) < len(reports) + len(prompt_texts(names)[0])  # texts repeat
    n = len(distinct)
    assert f": {n} distinct texts " in first and f", {n} embedded now, {n} rows in total" in first, first
    cache = TextEmbeddingCache.open(out)
    n_rows = len(cache)  # later tests of this module add prompts to the shared cache
    assert cache.model["folder"] == str(tiny_qwen3) and cache.embeddings.shape[1] == 64
    tokenizer, lm = DecoderLMTokenizer(tiny_qwen3, 128), DecoderLM(tiny_qwen3, "last").eval()
    with torch.no_grad():
        expected = torch.cat([lm(tokenizer(distinct[i:i + 16])) for i in range(0, len(distinct), 16)])
    rows = [cache.row(cache.key(t)) for t in distinct]
    torch.testing.assert_close(cache.embeddings[rows].float(), expected, atol=1e-5, rtol=1e-5)
    again = text_cache_cli("--text-model", tiny_qwen3, "--shards", synthetic_shards, "--out", out)
    assert again.returncode == 0 and " 0 embedded now" in again.stdout, again.stdout + again.stderr
    cache.refresh()
    assert len(cache) == n_rows


def test_a_second_build_does_not_call_the_llm(tiny_qwen3, tmp_path, monkeypatch):
    embedder = LMEmbedder(tiny_qwen3)
    assert build_text_cache(TEXTS + TEXTS, embedder, tmp_path / "c", progress=False) == \
        {"distinct": 4, "embedded": 4, "rows": 4}
    monkeypatch.setattr(LMEmbedder, "embed", lambda *a: pytest.fail("the LLM ran for cached texts"))
    assert build_text_cache(TEXTS, embedder, tmp_path / "c", progress=False)["embedded"] == 0


def test_an_interrupted_build_resumes_with_the_missing_texts(tiny_qwen3, tmp_path, monkeypatch):
    embedder = LMEmbedder(tiny_qwen3)
    calls = []
    real_append = TextEmbeddingCache.append

    def crash_after_first_part(self, keys, embeddings):
        if calls:
            raise KeyboardInterrupt
        calls.append(len(keys))
        real_append(self, keys, embeddings)

    monkeypatch.setattr(TextEmbeddingCache, "append", crash_after_first_part)
    with pytest.raises(KeyboardInterrupt):
        build_text_cache(TEXTS, embedder, tmp_path / "c", part_size=2, progress=False)
    monkeypatch.setattr(TextEmbeddingCache, "append", real_append)
    assert build_text_cache(TEXTS, embedder, tmp_path / "c", part_size=2, progress=False) == \
        {"distinct": 4, "embedded": 2, "rows": 4}
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if "part" in p.name) == \
        ["part-00000.safetensors", "part-00001.safetensors"]


def test_a_cache_of_another_model_is_refused(tiny_qwen3, random_decoder_lm, tmp_path):
    build_text_cache(TEXTS[:1], LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    other = random_decoder_lm("other", seed=1)
    with pytest.raises(ValueError, match="caches another text model"):
        build_text_cache(TEXTS[:1], LMEmbedder(other), tmp_path / "c", progress=False)


def _packed_batch(tokenizer, texts, n_labels=5):
    labels = (torch.arange(len(texts) * n_labels).reshape(len(texts), n_labels) % 3 == 0).float()
    tokens = tokenizer(texts)
    return torch.stack([pack_text_and_labels(t, l) for t, l in zip(tokens, labels)])


def test_cached_and_live_frozen_towers_give_the_same_loss(tiny_qwen3, tmp_path):
    texts = TEXTS[:3]
    build_text_cache(texts, LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    live = open_clip_ecg.register_ecg_text_model("ECG-live-qwen3", tiny_qwen3, base_model=BASE)
    cached = open_clip_ecg.register_ecg_text_model("ECG-cached-qwen3", None, base_model=BASE,
                                                   text_cache=tmp_path / "c")
    torch.manual_seed(0)
    live_model = open_clip.create_model(live, output_dict=True, init_logit_bias=-10)
    cached_model = open_clip.create_model(cached, output_dict=True, init_logit_bias=-10)
    assert isinstance(cached_model.text, CachedTextTower)
    keys = cached_model.load_state_dict(live_model.state_dict(), strict=False)
    assert not keys.missing_keys and all(k.startswith("text.lm.") for k in keys.unexpected_keys)
    ecg = torch.randn(3, 12, 500)
    loss = open_clip_ecg.MultiLabelSigLipLoss()
    losses = []
    for name, model in ((live, live_model), (cached, cached_model)):
        enable_label_passing(model.eval())
        with torch.no_grad():
            losses.append(loss(**model(ecg, _packed_batch(open_clip.get_tokenizer(name), texts)),
                               output_dict=True)["contrastive_loss"])
    assert abs(float(losses[0]) - float(losses[1])) < 1e-5


def test_frozen_live_tower_trains_only_its_head_and_can_unfreeze_last_blocks(tiny_qwen3):
    name = open_clip_ecg.register_ecg_text_model("ECG-live-qwen3", tiny_qwen3, base_model=BASE)
    model = open_clip.create_model(name)
    model.lock_text_tower(0)
    assert not any(p.requires_grad for p in model.text.lm.parameters())
    model.text(open_clip.get_tokenizer(name)(TEXTS)).sum().backward()
    assert model.text.proj[0].weight.grad is not None
    model.lock_text_tower(1)
    trainable = {n.split(".")[1] for n, p in model.text.lm.named_parameters() if p.requires_grad}
    assert trainable == {"layers", "norm"}
    assert not any(p.requires_grad for p in model.text.lm.transformer.layers[0].parameters())


def _train_args(shards, logs, name, *extra):
    return ["--model", BASE, "--train-data", str(shards / "train-*.tar"), "--val-data", str(shards / "val-*.tar"),
            "--batch-size", "8", "--epochs", "1", "--workers", "0", "--lr", "1e-3", "--warmup", "1",
            "--logs", str(logs), "--name", name, "--seed", "0", "--report-to", "tensorboard",
            "--zeroshot-frequency", "1", "--ecg-seconds", "2.5", "--train-num-samples", "32", *extra]


@pytest.mark.slow
def test_one_epoch_with_the_live_frozen_llm(tiny_qwen3, synthetic_shards, tmp_path):
    assert ecg_train.main(_train_args(synthetic_shards, tmp_path, "live", "--ecg-text-model", str(tiny_qwen3),
                                      "--lock-text")) == 0
    results = (tmp_path / "live" / "checkpoints" / "results.jsonl").read_text()
    assert "zeroshot-macro-auroc" in results
    model = open_clip.create_model(f"{BASE}+{tiny_qwen3.name}",
                                   pretrained=str(tmp_path / "live" / "checkpoints" / "epoch_1.pt"))
    assert isinstance(model.text, DecoderLMTextTower)


@pytest.mark.slow
def test_one_epoch_with_the_cache_never_runs_the_llm_and_its_checkpoint_does_zero_shot(
        text_cache, tiny_qwen3, synthetic_shards, tmp_path, monkeypatch):
    out, _ = text_cache
    monkeypatch.setattr(DecoderLM, "forward", lambda *a: pytest.fail("the LLM ran during cached training"))
    assert ecg_train.main(_train_args(synthetic_shards, tmp_path, "cached", "--ecg-text-cache", str(out))) == 0
    assert "zeroshot-macro-auroc" in (tmp_path / "cached" / "checkpoints" / "results.jsonl").read_text()
    checkpoint = tmp_path / "cached" / "checkpoints" / "epoch_1.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(".lm." in k for k in state) and any(k.startswith("text.proj.") for k in state)
    name = f"{BASE}+{out.name}"
    model = open_clip.create_model(name, pretrained=str(checkpoint))
    names = [v["name"] for v in read_shard_info(expand_shards(str(synthetic_shards), "val"))["vocabulary"]]
    classifier = build_zeroshot_classifier(model, open_clip.get_tokenizer(name), names)  # prompts were cached
    assert classifier.shape == (len(names), 256)
    monkeypatch.undo()
    # a prompt the cache lacks goes through the LLM once and is cached too
    fresh = build_zeroshot_classifier(model, open_clip.get_tokenizer(name), ["a finding never seen before"])
    assert fresh.shape == (1, 256)
    assert len(TextEmbeddingCache.open(out)) > len(load_file(str(out / "part-00000.safetensors"))["keys"])


def test_zero_shot_from_a_cached_model_without_its_llm_folder_says_the_folder_is_needed(
        tiny_qwen3, tmp_path):
    llm = shutil.copytree(tiny_qwen3, tmp_path / "llm")
    build_text_cache(["sinus rhythm"], LMEmbedder(llm), tmp_path / "c", progress=False)
    shutil.rmtree(llm)
    name = open_clip_ecg.register_ecg_text_model("ECG-cached-gone", None, base_model=BASE,
                                                 text_cache=tmp_path / "c")
    model, tokenizer = open_clip.create_model(name), open_clip.get_tokenizer(name)
    assert model.encode_text(tokenizer(["sinus rhythm"])).shape == (1, 256)  # cached: no LLM needed
    with pytest.raises(ValueError, match=r"LLM folder .*llm is missing: it is needed to embed"):
        build_zeroshot_classifier(model, tokenizer, ["atrial fibrillation"])


def test_cached_tower_refuses_unlocked_llm_layers(tiny_qwen3, tmp_path):
    build_text_cache(TEXTS, LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    name = open_clip_ecg.register_ecg_text_model("ECG-cached-lock", None, base_model=BASE, text_cache=tmp_path / "c")
    with pytest.raises(ValueError, match="needs the live LLM"):
        open_clip.create_model(name).lock_text_tower(2)


def test_bad_text_cache_and_llm_folders_are_clear_errors(tiny_qwen3, tmp_path, capsys):
    from open_clip_ecg.cli import main as cli_main

    with pytest.raises(ValueError, match="is not a text cache"):
        open_clip_ecg.register_ecg_text_model("ECG-no-cache", None, base_model=BASE, text_cache=tmp_path)
    assert cli_main(["text-cache", "--text-model", str(tmp_path / "nowhere"), "--shards", str(tmp_path),
                     "--out", str(tmp_path / "c")]) == 2
    assert "nowhere does not exist or has no config.json" in capsys.readouterr().err


class _Texts(torch.utils.data.Dataset):
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return self.tokenizer(["a report the cache has never seen"])[0]


def test_dataloader_workers_refuse_texts_missing_from_the_cache(tiny_qwen3, tmp_path):
    """Workers must not each load the LLM: training texts belong in the cache beforehand."""
    build_text_cache(TEXTS, LMEmbedder(tiny_qwen3), tmp_path / "c", progress=False)
    name = open_clip_ecg.register_ecg_text_model("ECG-cached-workers", None, base_model=BASE,
                                                 text_cache=tmp_path / "c")
    loader = torch.utils.data.DataLoader(_Texts(open_clip.get_tokenizer(name)), num_workers=1)
    with pytest.raises(ValueError, match="not in the text cache .* run `open-clip-ecg text-cache"):
        next(iter(loader))


def test_evaluate_embed_and_probe_take_a_model_paired_with_a_text_cache(text_cache, synthetic_shards, tmp_path,
                                                                       capsys):
    """--ecg-text-cache on evaluate/embed/probe pairs the tower as `train` did, so its checkpoint loads."""
    from types import SimpleNamespace

    from open_clip_ecg.cli import main as cli_main
    from open_clip_ecg.model_preprocess import ECG_PREPROCESS_KEY, training_preprocess_cfg

    out, _ = text_cache
    name = open_clip_ecg.register_ecg_text_model(f"{BASE}+{out.name}", None, base_model=BASE, text_cache=out)
    model = open_clip.create_model(name, init_logit_bias=-4)
    options = SimpleNamespace(ecg_seconds=2.5, ecg_eval_seconds=None, ecg_leads="12", ecg_normalize="center")
    checkpoint = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "cached", "state_dict": model.state_dict(),
                ECG_PREPROCESS_KEY: training_preprocess_cfg(name, options,
                                                            read_shard_info(expand_shards(str(synthetic_shards),
                                                                                          "train")))}, checkpoint)
    given = ["--model", BASE, "--pretrained", checkpoint, "--ecg-text-cache", out]
    shards = ["--data", synthetic_shards, "--split", "test"]
    assert cli_main(list(map(str, ["evaluate", *given, *shards, "--val-data", synthetic_shards, "--val-split", "val",
                                   "--bootstrap", "0", "--out", tmp_path / "eval"]))) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["thresholds"]["source"].startswith("valid")
    assert cli_main(list(map(str, ["embed", *given, *shards, "--out", tmp_path / "emb"]))) == 0
    assert (tmp_path / "emb" / "embeddings.npy").is_file()
    assert cli_main(list(map(str, ["probe", *given, *shards, "--train-data", synthetic_shards, "--train-split",
                                   "train", "--fractions", "1", "--bootstrap", "0", "--out", tmp_path / "probe"]))) == 0
    assert (tmp_path / "probe" / "probe.json").is_file()
    capsys.readouterr()
    # without the cache the checkpoint belongs to another model: one clear line, not a traceback
    assert cli_main(list(map(str, ["embed", *given[:4], *shards, "--out", tmp_path / "emb2"]))) == 2
    assert "does not match model" in capsys.readouterr().err
