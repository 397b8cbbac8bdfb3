"""Training throughput: open_clip's loop vs a bare PyTorch loop; data pipeline vs training.

Ratios, all measured in this one run:
* ``open_clip_loop_vs_bare``: samples/s of ``open_clip_train.train.train_one_epoch`` (with the
  plugin's label-carrying forward and loss adapter) over a bare loop with the same model, loss,
  batch and in-memory data (aim >= 0.9);
* ``pipeline_vs_training``: samples/s the shard pipeline delivers alone (default workers) over what
  training consumes (aim >= 3);
* ``pipeline_per_core``: decode + crop + tokenise samples/s with no workers (one core).

The PTB-XL recipe the quickstart trains (``ECG-RN18-RR-CLIPText``: 12 leads + RR channels at
100 Hz, 5 s crops, texts sampled per step; on the PTB-XL records of ``--ptbxl`` when present,
else synthetic records), per core (samples per CPU second of one process, one thread, no
workers), interleaved rounds, best round of each:

* ``rr_recipe_vs_plain_per_core``: samples/s of the recipe's loader over the plain 12-lead
  preparer's (stored text; aim >= 0.8);
* ``rr_recipe_vs_today_per_core``: over today's recipe path (shards without stored beats, the
  band-pass designed per record, no token cache, torch's median, numpy's header parse per sample:
  what this code did before the pipeline work; aim >= 3);
* ``rr_recipe_older_shards_vs_plain_per_core``: shards written before beats were stored (detected
  at read time with today's code);
* ``loader_per_worker_vs_tower_step``: the recipe loader's samples/s per worker over what the
  RR tower's forward+backward consumes on this device; the figures add FLOPs per sample, from
  which a GPU's consumption is estimated (``gpu_samples_per_s_at_10pct_of_<peak>``);
* ``recipe_step_open_clip_text_vs_unpadded``: a training step of the recipe model on one batch of
  its loader (its own text lengths) with open_clip's ``encode_text`` (all 77 positions), over
  the same step with the text encoded without its padding (``open_clip_ecg.unpadded_text``, what
  training uses): the speed-up, interleaved rounds, best of each;
* ``recipe_step_eager_vs_compiled`` (with ``--compile``): the same training step on several loader
  batches, eager over ``torch.compile`` (inductor unless named: what ``--torchcompile`` runs),
  after a pass over other batches that compiles; with the graphs compiled in that pass and in the
  timed one (0: new text lengths do not recompile).

    python scripts/benchmarks/bench_training.py [--quick] [--device cuda] [--ptbxl DIR] [--compile [BACKEND]]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from types import SimpleNamespace
from unittest import mock

import open_clip
import torch
import webdataset as wds

from open_clip_ecg.data.pipeline import (
    ContrastivePair,
    ECGSamplePreparer,
    decode,
    expand_shards,
    make_train_loader,
    read_tar,
    pack_text_and_labels,
    unpack_text_and_labels,
)
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.text import TrainingTextSampler
from open_clip_ecg.leads import LEAD_SETS
from open_clip_ecg.training.synthetic_step import synthetic_training_step, training_parts
from open_clip_ecg.unpadded_text import bucket_lengths, pooled_lengths

MODEL = "ECG-RN18-CLIPText"
RECIPE_MODEL = "ECG-RN18-RR-CLIPText"  # the quickstart's PTB-XL model
RECIPE_RATE, RECIPE_CROP_SECONDS = 100, 5.0  # the quickstart's PTB-XL shards and --ecg-seconds
PTBXL_ENV = "OPEN_CLIP_ECG_PTBXL"  # a PTB-XL folder for the recipe benchmark when --ptbxl is not given
BF16_PEAK_FLOPS = 989e12  # an H100 SXM's dense bf16 peak: the estimate's reference GPU


def _in_memory_batches(tokenizer, n_batches, batch_size, n_samples, n_labels, device):
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ecg = torch.randn(batch_size, 12, n_samples, generator=gen)
        labels = (torch.rand(batch_size, n_labels, generator=gen) < 0.2).float()
        tokens = tokenizer([f"ecg report {i}" for i in range(batch_size)])
        packed = torch.stack([pack_text_and_labels(t, l) for t, l in zip(tokens, labels)])
        batches.append((ecg.to(device), packed.to(device)))
    return batches


def bare_loop_rate(batches, device, precision) -> float:
    torch.manual_seed(0)
    step = training_parts(MODEL, device, precision, init_logit_bias=-10).step
    start = None
    for i, (ecg, packed) in enumerate(batches):
        if i == 1:  # first step is warm-up
            _sync(device)
            start = time.perf_counter()
        step(ecg, packed)
    _sync(device)
    return (len(batches) - 1) * len(batches[0][0]) / (time.perf_counter() - start)


def open_clip_loop_rate(batches, device, precision) -> float:
    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    torch.manual_seed(0)
    model, loss, optimizer, _ = training_parts(MODEL, device, precision, init_logit_bias=-10)
    batch_size = len(batches[0][0])
    args = SimpleNamespace(
        device=device, precision=precision, accum_freq=1, distill=False, skip_scheduler=True,
        grad_clip_norm=None, horovod=False, log_every_n_steps=10**9, batch_size=batch_size,
        world_size=1, rank=0, local_rank=0, wandb=False, distributed=False)
    warmup = _Loader(batches[:1])
    train_one_epoch(model, {"train": DataInfo(warmup)}, loss, 0, optimizer, None, None, None, args)
    timed = _Loader(batches[1:])
    _sync(device)
    start = time.perf_counter()
    train_one_epoch(model, {"train": DataInfo(timed)}, loss, 0, optimizer, None, None, None, args)
    _sync(device)
    return timed.num_samples / (time.perf_counter() - start)


class _Loader(list):
    """An in-memory 'dataloader' with the attributes open_clip's loop reads."""

    def __init__(self, batches):
        super().__init__(batches)
        self.num_batches = len(batches)
        self.num_samples = sum(len(b[0]) for b in batches)


def pipeline_rate(shards, tokenizer, batch_size, workers, n_batches) -> float:
    info = read_shard_info(shards)
    preparer = ECGSamplePreparer(info["n_samples"] // 2, len(info["vocabulary"]), train=True)
    loader = make_train_loader(shards, tokenizer=tokenizer, preparer=preparer, batch_size=batch_size,
                               workers=workers, num_samples=batch_size * n_batches * max(1, workers))
    iterator = iter(loader.dataloader)
    next(iterator)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for ecg, _ in iterator:
        n += len(ecg)
        if n >= batch_size * n_batches:
            break
    return n / (time.perf_counter() - start)


def _write_synthetic_shards(out_dir, n_records, n_shards):
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.synthetic import write_synthetic_dataset

    csv_path = write_synthetic_dataset(f"{out_dir}/synth", n=n_records, seed=0)
    write_shards(get_reader("csv", csv_path), f"{out_dir}/shards",
                 ShardOptions(sampling_rate=500, seconds=10, split_by="random", val_fraction=0.0,
                              test_fraction=0.0, shard_size=max(1, n_records // n_shards), text="both"))
    return f"{out_dir}/shards"


# --------------------------------------------------------------------------------------------
# The PTB-XL recipe: preparer per core, loader per worker, the tower's consumption
# --------------------------------------------------------------------------------------------

def _write_recipe_shards(out_dir, ptbxl, n_records, beats: bool) -> str:
    """The quickstart's PTB-XL shards (100 Hz, 10 s, text 'both'), from `ptbxl` or synthetic records."""
    from open_clip_ecg.data.readers import get_reader
    from open_clip_ecg.data.shard_writer import ShardOptions, write_shards
    from open_clip_ecg.data.synthetic import write_synthetic_dataset

    if ptbxl:
        reader = get_reader("ptbxl", ptbxl, label_level="all", sampling_rate=RECIPE_RATE)
    else:
        csv_path = f"{out_dir}/synth.csv"
        if not os.path.exists(csv_path):
            csv_path = write_synthetic_dataset(f"{out_dir}/synth", n=n_records, seed=0, progress=False)
        reader = get_reader("csv", csv_path)
    folder = f"{out_dir}/shards-{'beats' if beats else 'older'}"
    write_shards(reader, folder, ShardOptions(sampling_rate=RECIPE_RATE, seconds=10, split_by="random",
                                              val_fraction=0.0, test_fraction=0.0, shard_size=128, text="both",
                                              beats=beats, progress=False))
    return folder


@contextlib.contextmanager
def _todays_path():
    """The recipe's sample preparation as it was before the pipeline work, for the reference:
    the band-pass designed for every record, no token cache, torch's median, numpy's .npy header
    parse and a full JSON depth walk for every sample (used with shards that store no beats)."""
    from open_clip_ecg.data import pipeline, rhythm, shard_format, transforms

    class Uncached:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __call__(self, text):
            return self.tokenizer(text)[0]

        def joined(self, parts):
            return self(" ".join(parts))

    with mock.patch.object(rhythm, "qrs_filter", rhythm.qrs_filter.__wrapped__), \
            mock.patch.object(pipeline, "CachedTokenizer", Uncached), \
            mock.patch.object(transforms, "_lower_median", lambda x: x.median(dim=-1, keepdim=True).values), \
            mock.patch.object(shard_format, "_npy_header", shard_format._npy_header.__wrapped__), \
            mock.patch.object(shard_format, "_too_deep",
                              lambda data, value: shard_format._depth(value) > shard_format.MAX_JSON_DEPTH):
        yield


def _recipe_parts(shards, recipe: bool) -> tuple:
    """(preparer, tokenizer, text sampler) of the recipe (RR model, sampled text) or of the plain
    12-lead model (stored text), as ``train.get_ecg_dataset`` builds them."""
    info = read_shard_info(shards)
    names = [v["name"] for v in info["vocabulary"]]
    preparer = ECGSamplePreparer(int(RECIPE_RATE * RECIPE_CROP_SECONDS), len(names), train=True,
                                 leads=LEAD_SETS["12+rr" if recipe else "12"], sampling_rate=info["sampling_rate"])
    tokenizer = open_clip.get_tokenizer(RECIPE_MODEL if recipe else MODEL)
    return preparer, tokenizer, TrainingTextSampler(names) if recipe else None


def _prepare_rates(shards, recipe: bool, epochs: int) -> list:
    """Samples per CPU second of reading, decoding and preparing every sample of `shards` in this
    process, per epoch (one prepare stage across epochs, as a loader worker keeps it). CPU time,
    not wall time: "per core" is what one core's work delivers, and on a shared machine wall time
    also counts the time other processes held the core."""
    pair = ContrastivePair(*_recipe_parts(shards, recipe))
    rates = []
    for _ in range(epochs):
        start, n = time.process_time(), 0
        for _ in wds.DataPipeline(wds.SimpleShardList(shards), read_tar(), decode(), wds.map(pair)):
            n += 1
        rates.append(n / (time.process_time() - start))
    return rates


def _loader_rate(shards, batch_size, workers, n_batches) -> float:
    """Samples/s of the recipe's training loader (shuffle, prepare, batches) with `workers`."""
    preparer, tokenizer, text_sampler = _recipe_parts(shards, True)
    loader = make_train_loader(shards, tokenizer=tokenizer, preparer=preparer, text_sampler=text_sampler,
                               batch_size=batch_size, workers=workers, resampled=True,
                               num_samples=batch_size * (n_batches + 1) * max(1, workers)).dataloader
    iterator = iter(loader)
    next(iterator)  # start-up (workers, first shard) is not throughput
    start, n = time.perf_counter(), 0
    for ecg, _ in iterator:
        n += len(ecg)
        if n >= batch_size * n_batches:
            break
    return n / (time.perf_counter() - start)


def recipe_pipeline_rates(shards_with_beats, older_shards, rounds) -> dict:
    """Per-core samples per CPU second (no workers, one thread) of the plain preparer, today's recipe path, the
    recipe on older shards and the recipe, in a first epoch and a second one (the token cache
    warm, as in every epoch after the first); interleaved rounds, the best of each (a shared
    machine slows some rounds, never speeds one up)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    variants = {
        "plain_12_lead": lambda: _prepare_rates(shards_with_beats, False, 2),
        "rr_recipe_today": lambda: _today(older_shards),
        "rr_recipe_older_shards": lambda: _prepare_rates(older_shards, True, 2),
        "rr_recipe": lambda: _prepare_rates(shards_with_beats, True, 2),
    }
    best = {}
    try:
        for _ in range(rounds):
            for name, measure in variants.items():
                for epoch, rate in zip(("first_epoch", "later_epochs"), measure()):
                    key = f"{name}_{epoch}"
                    best[key] = max(best.get(key, 0.0), rate)
    finally:
        torch.set_num_threads(threads)
    return best


def _today(shards) -> list:
    with _todays_path():
        return _prepare_rates(shards, True, 2)


def tower_consumption(device, precision, batch_size) -> dict:
    """Samples/s of the recipe model's forward+backward (one optimiser step each) on `device`, and
    the FLOPs per sample of forward+backward (torch's FLOP counter) for a GPU estimate."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    _, step = synthetic_training_step(RECIPE_MODEL, batch_size, int(RECIPE_RATE * RECIPE_CROP_SECONDS), device=device,
                                      precision=precision, init_logit_bias=-10)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    _sync(device)
    start, steps = time.perf_counter(), 3
    for _ in range(steps):
        step()
    _sync(device)
    return {"tower_step_samples_per_s": steps * batch_size / (time.perf_counter() - start),
            "flops_per_sample_fwd_bwd": counter.get_total_flops() / batch_size}


def text_padding_steps(shards, device, precision, batch_size, rounds) -> dict:
    """Seconds of one recipe training step on one loader batch, with open_clip's ``encode_text``
    and with the padding-skipping one training installs; the batch's text lengths beside them."""
    preparer, tokenizer, text_sampler = _recipe_parts(shards, True)
    loader = make_train_loader(shards, tokenizer=tokenizer, preparer=preparer, text_sampler=text_sampler,
                               batch_size=batch_size, workers=0, resampled=True, num_samples=batch_size).dataloader
    ecg, packed = (t.to(device) for t in next(iter(loader)))
    steps = {}
    for name in ("open_clip_text", "unpadded_text"):
        torch.manual_seed(0)
        parts = training_parts(RECIPE_MODEL, device, precision, init_logit_bias=-10)
        if name == "open_clip_text":
            del vars(parts.model)["encode_text"]  # back to open_clip's CLIP.encode_text
        parts.step(ecg, packed)  # warm-up
        steps[name] = parts.step
    seconds = {name: float("inf") for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step(ecg, packed)
            _sync(device)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    tokens = unpack_text_and_labels(packed).tokens
    lengths = pooled_lengths(tokens, "argmax")
    encoded = bucket_lengths(lengths, tokens.shape[1])
    return {**{f"recipe_step_s_{name}": s for name, s in seconds.items()},
            "recipe_text_tokens_mean": float(lengths.float().mean()),
            "recipe_text_positions_encoded_mean": float(encoded.float().mean()),
            "recipe_text_context_length": tokens.shape[1]}


def compiled_steps(shards, device, precision, batch_size, n_batches, backend="inductor") -> dict:
    """Seconds of the recipe's training step, eager and compiled (with `backend`), over `n_batches`
    loader batches after a first pass over `n_batches` others (where compiling happens); graphs
    dynamo compiled in each pass (in the timed one, any is a recompile for new text lengths)."""
    from torch._dynamo.utils import counters

    preparer, tokenizer, text_sampler = _recipe_parts(shards, True)
    loader = make_train_loader(shards, tokenizer=tokenizer, preparer=preparer, text_sampler=text_sampler,
                               batch_size=batch_size, workers=0, resampled=True,
                               num_samples=2 * batch_size * n_batches).dataloader
    torch.manual_seed(0)  # the sampled texts (and with them the bucket mixes) are the same in every run
    batches = [tuple(t.to(device) for t in batch) for batch in loader]
    passes = {"first": batches[:n_batches], "timed": batches[n_batches:]}
    torch._dynamo.reset()
    figures = {}
    for name, compile_backend in (("eager", None), ("compiled", backend)):
        torch.manual_seed(0)
        parts = training_parts(RECIPE_MODEL, device, precision, compile_backend=compile_backend,
                               init_logit_bias=-10)
        for pass_name, pass_batches in passes.items():
            graphs, start = counters["stats"]["unique_graphs"], time.perf_counter()
            for ecg, packed in pass_batches:
                parts.step(ecg, packed)
            _sync(device)
            seconds = (time.perf_counter() - start) / n_batches
            if compile_backend:
                figures[f"compile_graphs_{pass_name}_pass"] = counters["stats"]["unique_graphs"] - graphs
        figures[f"recipe_step_s_{name}"] = seconds  # the timed pass's
    return {**figures, "compile_backend": backend, "compile_batches": n_batches}


def recipe_figures(quick, device, precision, ptbxl, compile_backend=None) -> tuple:
    batch_size = 16 if quick else 64
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        n_records = 48 if quick else 1024
        with_beats = expand_shards(_write_recipe_shards(tmp, ptbxl, n_records, beats=True), split="train")
        older = expand_shards(_write_recipe_shards(tmp, ptbxl, n_records, beats=False), split="train")
        per_core = recipe_pipeline_rates(with_beats, older, rounds)
        per_worker = {w: _loader_rate(with_beats, batch_size, w, 3 if quick else 12) / w for w in (1, 2)}
        padding = text_padding_steps(with_beats, device, precision, batch_size, rounds)
        compiled = (compiled_steps(with_beats, device, precision, batch_size, 6, compile_backend)
                    if compile_backend else {})
    tower = tower_consumption(device, precision, batch_size)
    gpu = 0.1 * BF16_PEAK_FLOPS / tower["flops_per_sample_fwd_bwd"]
    figures = {
        "recipe": f"{RECIPE_MODEL}, {RECIPE_RATE} Hz, {RECIPE_CROP_SECONDS:g} s crops, sampled text, batch {batch_size}",
        "recipe_data": ptbxl or "synthetic records",
        **{f"per_core_samples_per_s_{k}": v for k, v in per_core.items()},
        **{f"loader_samples_per_s_per_worker_{w}_workers": v for w, v in per_worker.items()},
        **tower,
        **padding,
        **compiled,
        f"gpu_samples_per_s_at_10pct_of_{BF16_PEAK_FLOPS / 1e12:g}_tflops": gpu,
    }
    ratios = {}
    for epoch in ("first_epoch", "later_epochs"):
        rr, plain = per_core[f"rr_recipe_{epoch}"], per_core[f"plain_12_lead_{epoch}"]
        ratios[f"rr_recipe_vs_plain_per_core_{epoch}"] = rr / plain
        ratios[f"rr_recipe_vs_today_per_core_{epoch}"] = rr / per_core[f"rr_recipe_today_{epoch}"]
        ratios[f"rr_recipe_older_shards_vs_plain_per_core_{epoch}"] = per_core[f"rr_recipe_older_shards_{epoch}"] / plain
    ratios["loader_per_worker_vs_tower_step"] = per_worker[1] / tower["tower_step_samples_per_s"]
    ratios["recipe_step_open_clip_text_vs_unpadded"] = (padding["recipe_step_s_open_clip_text"]
                                                       / padding["recipe_step_s_unpadded_text"])
    if compiled:
        ratios["recipe_step_eager_vs_compiled"] = compiled["recipe_step_s_eager"] / compiled["recipe_step_s_compiled"]
    return figures, ratios


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(quick: bool = False, device: str = "cpu", ptbxl: str = None, compile_backend: str = None) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    precision = "amp_bf16" if torch.device(device).type == "cuda" else "fp32"
    batch_size = 16 if quick else 64
    n_batches = 4 if quick else 12
    n_samples = 2500  # a 5 s crop at 500 Hz, the default training crop
    tokenizer = open_clip.get_tokenizer(MODEL)
    batches = _in_memory_batches(tokenizer, n_batches + 1, batch_size, n_samples, 20, device)
    bare = bare_loop_rate(batches, device, precision)
    looped = open_clip_loop_rate(batches, device, precision)
    workers = 2
    with tempfile.TemporaryDirectory() as tmp:
        shards_dir = _write_synthetic_shards(tmp, 64 if quick else 256, 4)
        shards = expand_shards(shards_dir, split="train")
        per_core = pipeline_rate(shards, tokenizer, batch_size, 0, n_batches)
        with_workers = pipeline_rate(shards, tokenizer, batch_size, workers, n_batches)
    ptbxl = ptbxl or os.environ.get(PTBXL_ENV)
    ptbxl = ptbxl if ptbxl and os.path.isdir(ptbxl) else None
    recipe, recipe_ratios = recipe_figures(quick, device, precision, ptbxl, compile_backend)
    return {
        "name": "training",
        "figures": {
            "device": device, "precision": precision, "batch_size": batch_size,
            "input": f"{batch_size} x 12 x {n_samples}",
            "bare_loop_samples_per_s": bare, "open_clip_loop_samples_per_s": looped,
            "pipeline_samples_per_s_0_workers": per_core,
            f"pipeline_samples_per_s_{workers}_workers": with_workers,
            **recipe,
        },
        "ratios": {
            "open_clip_loop_vs_bare": looped / bare,
            "pipeline_vs_training": with_workers / looped,
            "pipeline_per_core_vs_training": per_core / looped,
            **recipe_ratios,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ptbxl", default=None,
                        help=f"PTB-XL folder for the recipe benchmark (default: ${PTBXL_ENV}, else synthetic records)")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="also time the recipe step under torch.compile (default backend inductor, as "
                             "--torchcompile: minutes of compiling on a CPU)")
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, cli.device, cli.ptbxl, cli.compile), indent=2))
