"""Training throughput: open_clip's loop vs a bare PyTorch loop; data pipeline vs training.

Ratios, all measured in this one run:
* ``open_clip_loop_vs_bare``: samples/s of ``open_clip_train.train.train_one_epoch`` (with the
  plugin's label-carrying forward and loss adapter) over a bare loop with the same model, loss,
  batch and in-memory data (aim >= 0.9);
* ``pipeline_vs_training``: samples/s the shard pipeline delivers alone (default workers) over what
  training consumes (aim >= 3);
* ``pipeline_per_core``: decode + crop + tokenise samples/s with no workers (one core).

    python scripts/benchmarks/bench_training.py [--quick] [--device cuda]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from types import SimpleNamespace

import open_clip
import torch

import open_clip_ecg
from open_clip_ecg.data.pipeline import (
    ECGSamplePreparer,
    make_train_loader,
    pack_text_and_labels,
)
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.training.label_passing import enable_label_passing

MODEL = "ECG-RN18-CLIPText"


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


def _fresh(device, precision):
    torch.manual_seed(0)
    model = enable_label_passing(open_clip.create_model(
        MODEL, output_dict=True, device=device, precision=precision, init_logit_bias=-10))
    loss = open_clip_ecg.MultiLabelSigLipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, loss, optimizer


def bare_loop_rate(batches, device, precision) -> float:
    from open_clip_train.precision import get_autocast

    model, loss, optimizer = _fresh(device, precision)
    autocast = get_autocast(precision, device_type=torch.device(device).type)
    model.train()
    start = None
    for i, (ecg, packed) in enumerate(batches):
        if i == 1:  # first step is warm-up
            _sync(device)
            start = time.perf_counter()
        optimizer.zero_grad()
        with autocast():
            total = sum(loss(**model(ecg, packed), output_dict=True).values())
        total.backward()
        optimizer.step()
    _sync(device)
    return (len(batches) - 1) * len(batches[0][0]) / (time.perf_counter() - start)


def open_clip_loop_rate(batches, device, precision) -> float:
    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    model, loss, optimizer = _fresh(device, precision)
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


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(quick: bool = False, device: str = "cpu") -> dict:
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
        from open_clip_ecg.data.pipeline import expand_shards

        shards = expand_shards(shards_dir, split="train")
        per_core = pipeline_rate(shards, tokenizer, batch_size, 0, n_batches)
        with_workers = pipeline_rate(shards, tokenizer, batch_size, workers, n_batches)
    return {
        "name": "training",
        "figures": {
            "device": device, "precision": precision, "batch_size": batch_size,
            "input": f"{batch_size} x 12 x {n_samples}",
            "bare_loop_samples_per_s": bare, "open_clip_loop_samples_per_s": looped,
            "pipeline_samples_per_s_0_workers": per_core,
            f"pipeline_samples_per_s_{workers}_workers": with_workers,
        },
        "ratios": {
            "open_clip_loop_vs_bare": looped / bare,
            "pipeline_vs_training": with_workers / looped,
            "pipeline_per_core_vs_training": per_core / looped,
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    cli = parser.parse_args()
    print(json.dumps(run(cli.quick, cli.device), indent=2))
