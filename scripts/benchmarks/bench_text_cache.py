"""LLM text towers: a training step with cached text vs the live frozen LLM vs MiniLM trained.

Ratios, all measured in this one run, at the same batch and ECG input, for the full training step
(``_step``) and for its text side alone (``_text_step``: encode_text, backward, optimizer step;
the ECG tower dominates a full CPU step and hides the text tower's cost):
* ``live_frozen_vs_cached``: step time with the frozen LLM run live over reading its cached
  embeddings, for a tiny random Qwen3 (hidden 64, 2 layers) and a larger one (``_large``);
* ``cached_large_vs_cached_tiny``: the cached step for the larger LLM over the tiny one
  (aim ~1: a cached step does not depend on the LLM's size, only its width enters the head);
* ``minilm_trained_vs_cached``: MiniLM trained end to end (the shipped ECG-RN18-MiniLM) over
  the tiny cached LLM;
* ``cache_build_vs_minilm_encode``: texts/s of ``text-cache``'s embedding (tiny LLM) over MiniLM's
  text tower in inference, without its padding as ``load_model`` gives it (what embedding each
  text once with MiniLM would cost).

Random weights throughout (timing only). With ``--device cuda`` the larger LLM has Qwen3-8B's
shape (hidden 4096, 36 layers; 16 GB in bfloat16).

    python scripts/benchmarks/bench_text_cache.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import open_clip
import torch

import open_clip_ecg
from open_clip_ecg.data.pipeline import pack_text_and_labels
from open_clip_ecg.random_lm import write_random_decoder_lm
from open_clip_ecg.text_cache import LMEmbedder, build_text_cache
from open_clip_ecg.training.label_passing import enable_label_passing
from open_clip_ecg.unpadded_text import enable_unpadded_text

BASE, MINILM = "ECG-RN18-CLIPText", "ECG-RN18-MiniLM"
FINDINGS = ("sinus rhythm", "atrial fibrillation", "left axis deviation", "first degree av block",
            "left bundle branch block", "st depression", "t wave inversion", "sinus tachycardia",
            "inferior myocardial infarction", "left ventricular hypertrophy")
QWEN3_8B_SHAPE = dict(hidden_size=4096, layers=36, heads=32, kv_heads=8, intermediate_size=12288,
                      dtype=torch.bfloat16)


def report_texts(n: int):
    """`n` distinct report-like texts of 2-4 findings."""
    texts = []
    for i in range(n):
        picks = [FINDINGS[(i * k + k) % len(FINDINGS)] for k in (1, 3, 7, 9)[:2 + i % 3]]
        texts.append(f"{'. '.join(picks)}. report {i}.")
    return texts


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def step_seconds(name, texts, device, n_steps, n_samples, lock_text=False):
    """Median seconds of (full training step, text-side step) for model `name` on one batch.

    The text-side step (encode_text, backward, optimizer step) is the part the text tower
    changes; the full step adds the ECG tower and the loss. First steps are warm-up.
    """
    torch.manual_seed(0)
    model = open_clip.create_model(name, output_dict=True, device=device, init_logit_bias=-10)
    if lock_text:
        model.lock_text_tower(0)
    model = enable_label_passing(model.train())
    labels = (torch.rand(len(texts), len(FINDINGS)) < 0.3).float()
    tokens = open_clip.get_tokenizer(name)(texts)
    packed = torch.stack([pack_text_and_labels(t, l) for t, l in zip(tokens, labels)]).to(device)
    tokens = tokens.to(device)
    ecg = torch.randn(len(texts), 12, n_samples, device=device)
    loss = open_clip_ecg.MultiLabelSigLipLoss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    steps = {
        "full": lambda: sum(loss(**model(ecg, packed), output_dict=True).values()),
        "text": lambda: model.encode_text(tokens, normalize=True).sum(),
    }
    medians = []
    for objective in steps.values():
        times = []
        for _ in range(n_steps + 1):
            _sync(device)
            start = time.perf_counter()
            optimizer.zero_grad()
            with autocast:
                total = objective()
            total.backward()
            optimizer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
        medians.append(sorted(times[1:])[len(times[1:]) // 2])
    return tuple(medians)


def cache_build_rate(folder, texts, out, device) -> float:
    embedder = LMEmbedder(folder, device=device, batch_size=16)
    embedder.embed(texts[:2])  # load the LLM: not throughput
    start = time.perf_counter()
    build_text_cache(texts, embedder, out, progress=False)
    return len(texts) / (time.perf_counter() - start)


@torch.inference_mode()
def minilm_encode_rate(texts, device) -> float:
    model = enable_unpadded_text(open_clip.create_model(MINILM, device=device).eval())  # as load_model's
    tokenizer = open_clip.get_tokenizer(MINILM)
    model.encode_text(tokenizer(texts[:2]).to(device))
    _sync(device)
    start = time.perf_counter()
    for i in range(0, len(texts), 16):
        model.encode_text(tokenizer(texts[i:i + 16]).to(device))
    _sync(device)
    return len(texts) / (time.perf_counter() - start)


def run(quick: bool = False, device: str = "cpu") -> dict:
    batch_size, n_steps = (4, 1) if quick else (32, 5)
    n_samples = 500 if quick else 1000  # 5 s / 10 s at 100 Hz
    n_cache_texts = 24 if quick else 512
    cuda = device.startswith("cuda")
    large = QWEN3_8B_SHAPE if cuda else (dict(hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=512)
                                          if quick else dict(hidden_size=768, layers=12, heads=12, kv_heads=4,
                                                             intermediate_size=2048))
    texts = report_texts(batch_size)
    steps, figures = {}, {"device": device, "batch_size": batch_size, "ecg_input": f"12 x {n_samples}",
                          "large_llm": large}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size, shape in (("tiny", {}), ("large", large)):
            folder = write_random_decoder_lm(tmp / size, **shape)
            build_text_cache(texts, LMEmbedder(folder, device=device), tmp / f"{size}-cache", progress=False)
            live = open_clip_ecg.register_ecg_text_model(f"bench-live-{size}", folder, base_model=BASE)
            cached = open_clip_ecg.register_ecg_text_model(f"bench-cached-{size}", None, base_model=BASE,
                                                           text_cache=tmp / f"{size}-cache")
            steps[f"cached_{size}"] = step_seconds(cached, texts, device, n_steps, n_samples)
            steps[f"live_frozen_{size}"] = step_seconds(live, texts, device, n_steps, n_samples, lock_text=True)
        steps["minilm_trained"] = step_seconds(MINILM, texts, device, n_steps, n_samples)
        build_texts = report_texts(n_cache_texts)
        cache_rate = cache_build_rate(tmp / "tiny", build_texts, tmp / "rate-cache", device)
    minilm_rate = minilm_encode_rate(build_texts, device)
    for key, (full, text) in steps.items():
        figures[f"step_s_{key}"], figures[f"text_step_s_{key}"] = full, text
    figures.update({"cache_build_texts_per_s_tiny": cache_rate, "minilm_encode_texts_per_s": minilm_rate})
    ratios = {}
    for part, index in (("step", 0), ("text_step", 1)):
        ratios.update({
            f"live_frozen_vs_cached_{part}_tiny": steps["live_frozen_tiny"][index] / steps["cached_tiny"][index],
            f"live_frozen_vs_cached_{part}_large": steps["live_frozen_large"][index] / steps["cached_large"][index],
            f"cached_large_vs_cached_tiny_{part}": steps["cached_large"][index] / steps["cached_tiny"][index],
            f"minilm_trained_vs_cached_{part}": steps["minilm_trained"][index] / steps["cached_tiny"][index],
        })
    ratios["cache_build_vs_minilm_encode"] = cache_rate / minilm_rate
    return {"name": "text_cache", "figures": figures, "ratios": ratios}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, cli.device), indent=2))
