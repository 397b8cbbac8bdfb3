"""Shards -> batches, as a readable list of webdataset stages.

Two consumers read the shards written by :mod:`open_clip_ecg.data.shards`:

* training (``make_train_loader`` / ``make_val_loader``) yields ``(ecg, packed_text)`` 2-tuples,
  because open_clip's loop does ``images, texts = batch``. The label multi-hot of each sample
  travels *inside* ``packed_text`` (see :func:`pack_text_and_labels`), so it stays aligned with its
  sample through batching, device moves and gradient-accumulation caches;
* evaluation (``make_eval_loader`` / ``iterate_samples``) yields dict batches with keys and meta.

Both share one decoder (:func:`decode_sample`), which checks every sample against what its shard
folder declares (:mod:`.schema`: array header before allocation, labels against the vocabulary) and
raises :class:`ShardFormatError` naming the shard and the key (no silent skips, no silent repairs).
Works with webdataset 0.2.x and 1.x.
"""
from __future__ import annotations

import functools
import glob
import math
import os
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import webdataset as wds

from ..compat import (  # open_clip_train's, reused as-is: epoch sync and deterministic shard shuffling
    DataInfo,
    ResampledShards2,
    SharedEpoch,
    detshuffle2,
    expand_urls,
)
from ..leads import STANDARD_LEADS, lead_indices
from .schema import SampleSchema, ShardFormatError, check_labels, check_meta, load_ecg, load_json
from .text import TrainingTextSampler
from .transforms import build_ecg_transform
from .vocabulary import labels_to_multi_hot, load_vocabulary

SHARD_SHUFFLE_SIZE = 2000
SHARD_SHUFFLE_INITIAL = 500
SAMPLE_SHUFFLE_SIZE = 2000
SAMPLE_SHUFFLE_INITIAL = 500
REQUIRED_MEMBERS = ("ecg.npy", "txt", "labels.json")


# --------------------------------------------------------------------------------------------
# Shard discovery and the information written beside the shards
# --------------------------------------------------------------------------------------------

def expand_shards(spec, split: Optional[str] = None) -> List[str]:
    """Shard paths from a brace pattern, a glob, a '::'-joined list, or a directory (+ split).

    ``expand_shards('out')`` with ``split='val'`` gives ``out/val-*.tar`` sorted.
    Raises ValueError naming the spec when nothing matches or a listed shard is missing.
    """
    if isinstance(spec, (list, tuple)):
        paths = [str(p) for p in spec]
    elif os.path.isdir(spec):
        pattern = os.path.join(spec, f"{split}-*.tar" if split else "*.tar")
        paths = sorted(glob.glob(pattern))
    else:
        paths = []
        for part in str(spec).split("::"):
            if any(c in part for c in "*?["):
                paths.extend(sorted(glob.glob(part)))
            else:
                paths.extend(expand_urls(part)[0])
    if not paths:
        raise ValueError(f"no shards match {spec!r}" + (f" (split {split!r})" if split else ""))
    missing = [p for p in paths if "://" not in p and not os.path.exists(p)]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    return paths


def read_shard_info(shards: Sequence[str]) -> Dict:
    """The vocabulary and sampling rate written beside the first shard.

    Returns ``{"vocabulary": [{"id", "code", "name", ...}], "sampling_rate": float,
    "n_samples": int (stored record length), "directory": str, "text": the text mode}``; a missing
    or inconsistent file is a ValueError naming it.
    """
    directory = os.path.dirname(os.path.abspath(shards[0]))
    vocabulary = load_vocabulary(directory)
    manifest_path = os.path.join(directory, "manifest.json")
    if not os.path.exists(manifest_path):
        raise ValueError(f"{manifest_path} is missing: shards must come from `open-clip-ecg shards`")
    with open(manifest_path, "rb") as f:
        manifest = load_json(f.read(), manifest_path, "manifest.json")
    options = manifest.get("options") if isinstance(manifest, dict) else None
    try:
        rate, seconds = float(options["sampling_rate"]), float(options["seconds"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{manifest_path} lacks numeric options.sampling_rate / options.seconds") from None
    if not (math.isfinite(rate) and math.isfinite(seconds) and rate > 0 and seconds > 0):
        raise ValueError(f"{manifest_path} declares sampling rate {rate} and seconds {seconds}")
    return {"vocabulary": vocabulary, "sampling_rate": rate,
            "n_samples": int(round(rate * seconds)), "directory": directory, "text": options.get("text")}


@functools.lru_cache(maxsize=64)
def _folder_schema(directory: str, stamp: tuple) -> SampleSchema:
    return SampleSchema.from_shard_info(read_shard_info([os.path.join(directory, "x.tar")]), len(STANDARD_LEADS))


def shard_schema(shard: str) -> SampleSchema:
    """What the folder of `shard` declares about its samples (cached while its files are unchanged)."""
    directory = os.path.dirname(os.path.abspath(shard))
    paths = [os.path.join(directory, name) for name in ("manifest.json", "vocabulary.json")]
    return _folder_schema(directory, tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in paths))


# --------------------------------------------------------------------------------------------
# Sample decoding and the packed (text, labels) layout
# --------------------------------------------------------------------------------------------

def decode_sample(sample: Dict) -> Dict:
    """Raw tar members -> {key, ecg float32 [12, T], text, label_ids, label_codes, meta}, checked
    against the shard folder's manifest and vocabulary (:mod:`.schema`)."""
    where = f"{sample.get('__url__', '?')} (key {sample.get('__key__', '?')})"
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise ShardFormatError(f"{where}: sample lacks {missing}; has {sorted(sample)}")
    try:
        schema = shard_schema(sample["__url__"])
    except (KeyError, ValueError) as e:
        raise ShardFormatError(f"{where}: no shard folder declares this sample's format: {e}") from e
    ecg = load_ecg(sample["ecg.npy"], schema, where)
    label_ids, label_codes = check_labels(load_json(sample["labels.json"], where, "labels.json"), schema, where)
    meta = check_meta(load_json(sample["meta.json"], where, "meta.json"), where) if "meta.json" in sample else {}
    try:
        text = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardFormatError(f"{where}: txt is not UTF-8: {e}") from e
    return {"key": sample["__key__"], "ecg": ecg, "text": text, "label_ids": label_ids,
            "label_codes": label_codes, "meta": meta}


def _is_sample(sample: Dict) -> bool:
    """False for webdataset's end-of-shard markers, which carry no members."""
    return any(not k.startswith("__") for k in sample)


# Fixed pseudo-random weights of the label/text fingerprint (see `fingerprint`).
_FINGERPRINT_WEIGHTS = torch.from_numpy(
    np.random.default_rng(20260101).integers(1, 2**20, size=4096, dtype=np.int64))
_FINGERPRINT_MODULUS = 2**31 - 1


def fingerprint(tokens: torch.Tensor, multi_hot: torch.Tensor, text_multi_hot: torch.Tensor) -> torch.Tensor:
    """A cheap hash of (text tokens, ECG labels, text labels) per row -> [...] int64.

    Computed once per sample when it is read and again on the batch the model receives; if the
    two differ, labels were paired with the wrong text (the label-alignment contract check).
    """
    values = torch.cat([multi_hot.long(), text_multi_hot.long(), tokens.long()], dim=-1)
    if values.shape[-1] > len(_FINGERPRINT_WEIGHTS):
        raise ValueError(f"fingerprint supports up to {len(_FINGERPRINT_WEIGHTS)} tokens+labels")
    w = _FINGERPRINT_WEIGHTS.to(tokens.device)
    return (values * w[:values.shape[-1]]).sum(-1) % _FINGERPRINT_MODULUS


class PackedText(NamedTuple):
    """A batch of packed text rows, unpacked."""

    tokens: torch.Tensor  # [B, ctx]
    labels: torch.Tensor  # [B, L] float multi-hot: the ECG's findings
    text_labels: torch.Tensor  # [B, L] float multi-hot: the findings the text states
    fingerprint: torch.Tensor  # [B]


def pack_text_and_labels(tokens: torch.Tensor, multi_hot: torch.Tensor,
                         text_multi_hot: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One sample's tokens [ctx], ECG labels [L] and text labels [L] (default: the ECG's) -> int64
    row [2 + 2L + ctx].

    Layout: ``[L, fingerprint, labels..., text labels..., tokens...]``: self-describing, so the
    model can split it without knowing the vocabulary size in advance.
    """
    text_multi_hot = multi_hot if text_multi_hot is None else text_multi_hot
    n_labels = multi_hot.shape[-1]
    head = torch.tensor([n_labels, int(fingerprint(tokens, multi_hot, text_multi_hot))], dtype=torch.long)
    return torch.cat([head, multi_hot.long(), text_multi_hot.long(), tokens.long()])


def unpack_text_and_labels(packed: torch.Tensor) -> PackedText:
    """Batch [B, 2 + 2L + ctx] -> :class:`PackedText`."""
    n = int(packed[0, 0])
    return PackedText(packed[:, 2 + 2 * n:], packed[:, 2:2 + n].float(), packed[:, 2 + n:2 + 2 * n].float(),
                      packed[:, 1])


# --------------------------------------------------------------------------------------------
# Per-sample preparation shared by training, validation and evaluation
# --------------------------------------------------------------------------------------------

class ECGSamplePreparer:
    """Decoded sample -> model-ready ECG (selected leads, crop, normalisation) and label multi-hot."""

    def __init__(self, n_samples: int, n_labels: int, train: bool, leads: Sequence[str] = STANDARD_LEADS,
                 normalize: str = "center", amplitude_scale=None, lead_dropout: float = 0.0):
        self.lead_index = lead_indices(STANDARD_LEADS, leads)
        self.n_labels = n_labels
        self.transform = build_ecg_transform(train=train, n_samples=n_samples, normalize=normalize,
                                             amplitude_scale=amplitude_scale, lead_dropout=lead_dropout)

    def ecg(self, sample: Dict) -> torch.Tensor:
        signal = torch.from_numpy(sample["ecg"][self.lead_index])
        return torch.as_tensor(self.transform(signal), dtype=torch.float32)

    def multi_hot(self, sample: Dict) -> torch.Tensor:
        try:
            return labels_to_multi_hot(sample["label_ids"], self.n_labels)
        except ValueError as e:
            raise ShardFormatError(f"sample {sample['key']}: {e}") from e


class _TrainingSample:
    """decoded sample -> (ecg [leads, T], packed text row); a class so workers can pickle it.

    With a `text_sampler` (:class:`~open_clip_ecg.data.text.TrainingTextSampler`) the text is
    composed afresh each time from the report and finding names; otherwise the stored text is used.
    """

    def __init__(self, preparer: ECGSamplePreparer, tokenizer: Callable,
                 text_sampler: Optional[TrainingTextSampler] = None):
        self.preparer = preparer
        self.tokenizer = tokenizer
        self.text_sampler = text_sampler

    def __call__(self, sample: Dict):
        labels = self.preparer.multi_hot(sample)
        if self.text_sampler is None:
            text, text_labels = sample["text"], labels
        else:
            text, stated = self.text_sampler(sample["text"], sample["meta"].get("report"), sample["label_ids"])
            text_labels = labels_to_multi_hot(stated, len(labels))
        tokens = self.tokenizer(text)[0]
        return self.preparer.ecg(sample), pack_text_and_labels(tokens, labels, text_labels)


def _collate_pairs(samples):
    ecgs, texts = zip(*samples)
    return torch.stack(ecgs), torch.stack(texts)


def _shard_source(shards, train, resampled, seed, shared_epoch):
    """The first stages: which shards each worker on each node reads, in which order."""
    if resampled:
        # open_clip's resampler takes a '::'-joined spec, not a list
        return [ResampledShards2("::".join(shards), deterministic=True, epoch=shared_epoch)]
    if train:
        return [wds.SimpleShardList(shards),
                detshuffle2(bufsize=SHARD_SHUFFLE_SIZE, initial=SHARD_SHUFFLE_INITIAL, seed=seed,
                            epoch=shared_epoch),
                wds.split_by_node,
                wds.split_by_worker]
    # evaluation runs on one process: every worker reads its own subset of all shards
    return [wds.SimpleShardList(shards), wds.split_by_worker]


def _count_samples(shards: Sequence[str]) -> Optional[int]:
    """Total samples of `shards` from sizes.json beside them (None when absent)."""
    sizes_path = os.path.join(os.path.dirname(os.path.abspath(shards[0])), "sizes.json")
    if not os.path.exists(sizes_path):
        return None
    with open(sizes_path, "rb") as f:
        sizes = load_json(f.read(), sizes_path, "sizes.json")
    if not isinstance(sizes, dict):
        raise ValueError(f"{sizes_path} must map shard names to sample counts")
    try:
        return sum(int(sizes[os.path.basename(s)]) for s in shards)
    except KeyError as e:
        raise ValueError(f"{sizes_path} has no entry for shard {e}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{sizes_path} holds a sample count that is not an integer: {e}") from e


def make_train_loader(shards, *, tokenizer: Callable, preparer: ECGSamplePreparer, batch_size: int,
                      workers: int, world_size: int = 1, seed: int = 0, epoch: int = 0,
                      resampled: bool = False, num_samples: Optional[int] = None,
                      text_sampler: Optional[TrainingTextSampler] = None) -> DataInfo:
    """Training loader in open_clip's DataInfo: shuffled shards and samples, fixed batches/epoch.

    Every worker of every rank yields the same number of batches (webdataset's ``with_epoch``
    repeats the pipeline), so DDP ranks never wait on each other at an epoch's end.
    """
    shards = expand_shards(shards)
    num_samples = num_samples or _count_samples(shards)
    if not num_samples:
        raise ValueError(f"no sizes.json beside {shards[0]}: pass --train-num-samples")
    if not resampled and len(shards) < max(1, workers) * world_size:
        raise ValueError(
            f"{len(shards)} training shard(s) cannot feed {max(1, workers)} worker(s) x {world_size} "
            "rank(s): write more shards (smaller --shard-size), lower --workers, or use "
            "--dataset-resampled")
    shared_epoch = SharedEpoch(epoch=epoch)
    pipeline = wds.DataPipeline(
        *_shard_source(shards, True, resampled, seed, shared_epoch),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(_is_sample),
        wds.shuffle(bufsize=SAMPLE_SHUFFLE_SIZE, initial=SAMPLE_SHUFFLE_INITIAL),
        wds.map(decode_sample),
        wds.map(_TrainingSample(preparer, tokenizer, text_sampler)),
        wds.batched(batch_size, collation_fn=_collate_pairs, partial=False),
    )
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    worker_batches = math.ceil(num_batches / max(1, workers))
    pipeline = pipeline.with_epoch(worker_batches)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    loader.num_batches = worker_batches * max(1, workers)
    loader.num_samples = loader.num_batches * batch_size * world_size
    return DataInfo(dataloader=loader, shared_epoch=shared_epoch)


def make_val_loader(shards, *, tokenizer: Callable, preparer: ECGSamplePreparer, batch_size: int,
                    workers: int) -> DataInfo:
    """Validation loader in open_clip's DataInfo: every sample once, in shard order per worker."""
    shards = expand_shards(shards)
    pipeline = wds.DataPipeline(
        *_shard_source(shards, False, False, 0, None),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(_is_sample),
        wds.map(decode_sample),
        wds.map(_TrainingSample(preparer, tokenizer)),
        wds.batched(batch_size, collation_fn=_collate_pairs, partial=True),
    )
    workers = min(workers, len(shards))
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers)
    loader.num_samples = _count_samples(shards) or 0
    loader.num_batches = math.ceil(loader.num_samples / batch_size)
    return DataInfo(dataloader=loader)


# --------------------------------------------------------------------------------------------
# Evaluation: every sample once, with its key and metadata
# --------------------------------------------------------------------------------------------

def iterate_samples(shards) -> Iterator[Dict]:
    """Decoded samples of `shards`, in order, in this process (for analyses and tests)."""
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(expand_shards(shards)),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(_is_sample),
        wds.map(decode_sample),
    )
    yield from pipeline


class _EvalSample:
    def __init__(self, preparer: ECGSamplePreparer, with_labels: bool, tokenizer: Optional[Callable]):
        self.preparer, self.with_labels, self.tokenizer = preparer, with_labels, tokenizer

    def __call__(self, sample: Dict) -> Dict:
        out = {"ecg": self.preparer.ecg(sample), "key": sample["key"],
               "label_codes": sample["label_codes"], "meta": sample["meta"], "text": sample["text"]}
        if self.with_labels:
            out["labels"] = self.preparer.multi_hot(sample)
        if self.tokenizer is not None:
            out["tokens"] = self.tokenizer(sample["text"])[0]
        return out


def _collate_dicts(samples: List[Dict]) -> Dict:
    batch = {k: [s[k] for s in samples] for k in samples[0]}
    for k in ("ecg", "labels", "tokens"):
        if k in batch:
            batch[k] = torch.stack(batch[k])
    batch["keys"] = batch.pop("key")
    return batch


def make_eval_loader(shards, n_samples: int, batch_size: int, workers: int = 0,
                     vocab_size: Optional[int] = None, tokenizer: Optional[Callable] = None,
                     leads: Sequence[str] = STANDARD_LEADS, normalize: str = "center"):
    """DataLoader of dict batches: ecg [B, leads, n_samples] centre-cropped, labels (multi-hot,
    when `vocab_size` is given), tokens (when `tokenizer` is given), keys, label_codes, meta, text."""
    shards = expand_shards(shards)
    preparer = ECGSamplePreparer(n_samples, vocab_size or 0, train=False, leads=leads, normalize=normalize)
    pipeline = wds.DataPipeline(
        *_shard_source(shards, False, False, 0, None),
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.select(_is_sample),
        wds.map(decode_sample),
        wds.map(_EvalSample(preparer, vocab_size is not None, tokenizer)),
        wds.batched(batch_size, collation_fn=_collate_dicts, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=min(workers, len(shards)))
