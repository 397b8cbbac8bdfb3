"""Shards -> batches, each loader a readable list of named webdataset stages.

Every loader is assembled from the same stages and picks its own tail::

    shard list -> read tar -> [shuffle] -> decode (+ schema check) -> prepare -> batch

- :func:`shard_list`: which shards each worker on each node reads, in which order;
- :func:`read_tar`: tar members grouped into raw samples (webdataset's end-of-shard markers dropped);
- :class:`ShuffleSamples`: a seeded sample shuffle buffer (training only);
- :func:`decode`: :func:`.shard_format.decode_sample` against what the shard's folder declares
  (array header before allocation, labels against the vocabulary); anything else is one
  :class:`ShardFormatError` naming the shard and the key (no silent skips, no silent repairs);
- a *prepare* stage, the consumer's choice: :class:`ContrastivePair` (training and validation:
  ``(ecg, packed text)`` 2-tuples, because open_clip's loop does ``images, texts = batch``; the label
  multi-hot of each sample travels *inside* the packed text (:func:`pack_text_and_labels`), so it
  stays aligned with its sample through batching, device moves and gradient-accumulation caches),
  :class:`EvalRecord` (evaluation, embed and the probe: dicts with keys and meta), or the
  supervised baseline's own stage (``(ecg, targets, mask)``, :mod:`open_clip_ecg.baselines`);
- :func:`batch`.

Loaders: :func:`make_train_loader` (contrastive training) and :func:`make_epoch_loader` (any
training stage, e.g. the supervised baseline's), :func:`make_val_loader`, :func:`make_eval_loader`,
and :func:`iterate_samples` (decoded samples in this process). Works with webdataset 0.2.x and 1.x.
"""
from __future__ import annotations

import glob
import math
import os
import random
import tarfile
from collections import OrderedDict
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer

from ..compat import (  # open_clip_train's, reused as-is: epoch sync and deterministic shard shuffling
    DataInfo,
    ResampledShards2,
    SharedEpoch,
    detshuffle2,
    expand_urls,
)
from ..leads import RR_CHANNELS, STANDARD_LEADS, lead_indices
from .locations import ShardReadError, is_remote, local_path, why_unreadable
from .manifest import count_samples, shard_schema
from .rhythm import BEAT_DETECTOR, split_channels
from .shard_format import SampleSchema, ShardFormatError, decode_sample, shard_glob
from .text import TrainingTextSampler
from .transforms import Compose, build_ecg_transform
from .vocabulary import labels_to_multi_hot

SHARD_SHUFFLE_SIZE = 2000
SHARD_SHUFFLE_INITIAL = 500
SAMPLE_SHUFFLE_SIZE = 2000
SAMPLE_SHUFFLE_INITIAL = 500


def expand_shards(spec, split: Optional[str] = None) -> List[str]:
    """Shard urls from a brace pattern, a glob, a '::'-joined list, or a directory (+ split).

    ``expand_shards('out')`` with ``split='val'`` gives ``out/val-*.tar`` sorted. Besides local
    paths, anything webdataset opens (``pipe:CMD``, ``http(s)://``, ... :mod:`.locations`) is kept
    as it is, brace patterns expanded; ``file:`` urls become local paths, so globs and folders work
    for them too. Raises ValueError naming the spec when nothing matches or a local shard is missing
    (remote shards are checked against their folder's manifest when it is read,
    :func:`.manifest.read_shard_info`).
    """
    if isinstance(spec, (list, tuple)):
        paths = [str(p) for p in spec]
    elif split and is_remote(spec):
        raise ValueError(f"a split ({split!r}) picks the shards of a local folder, and {spec!r} is remote: name "
                         f"remote shards with a pattern, e.g. '{spec.rstrip('/')}/{split}-{{000000..000003}}.tar' "
                         "(the folder's manifest.json lists each split's pattern)")
    elif not is_remote(spec) and os.path.isdir(local_path(spec)):
        pattern = os.path.join(local_path(spec), shard_glob(split) if split else "*.tar")
        paths = sorted(glob.glob(pattern))
    else:
        paths = []
        for part in str(spec).split("::"):
            if is_remote(part):
                paths.extend(expand_urls(part)[0])
            elif any(c in part for c in "*?["):
                paths.extend(sorted(glob.glob(local_path(part))))
            else:
                paths.extend(map(local_path, expand_urls(part)[0]))
    if not paths:
        raise ValueError(f"no shards match {spec!r}" + (f" (split {split!r})" if split else ""))
    missing = [p for p in paths if not is_remote(p) and not os.path.exists(local_path(p))]
    if missing:
        raise ValueError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]}")
    return paths


# --------------------------------------------------------------------------------------------
# The stages
# --------------------------------------------------------------------------------------------

def shard_list(shards: Sequence[str], *, train: bool, resampled: bool = False, seed: int = 0,
               shared_epoch: Optional[SharedEpoch] = None) -> List:
    """Which shards each worker on each node reads, in which order."""
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


def _is_sample(sample: Dict) -> bool:
    """False for webdataset's end-of-shard markers, which carry no members."""
    return any(not k.startswith("__") for k in sample)


def name_unreadable_shards(samples: Iterator[Dict]) -> Iterator[Dict]:
    """Raw samples as they come; a shard that cannot be opened or is not a whole tar becomes one
    :class:`.locations.ShardReadError` naming its url (webdataset appends the url to the error's
    args) and why. Nothing is skipped."""
    samples = iter(samples)
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except (OSError, tarfile.TarError, ValueError) as error:
            if isinstance(error, ShardReadError):
                raise
            url = _url_of(error)
            raise ShardReadError(f"cannot read shard {url}: {why_unreadable(error, url)}") from error
        yield sample


def _url_of(error: Exception) -> str:
    return next((a for a in reversed(error.args) if isinstance(a, str)), "?")


def read_tar() -> List:
    """Shard urls -> raw samples (member name -> bytes); a shard that cannot be read raises, it is never skipped."""
    return [wds.tarfile_to_samples(handler=wds.reraise_exception), name_unreadable_shards, wds.select(_is_sample)]


class ShuffleSamples:
    """A sample shuffle buffer whose order follows from the seed, the epoch, the rank and the loader
    worker, so a run is repeatable and reads the same samples in the same order wherever the shards
    are (webdataset's default seeds it from the clock). A class so loader workers can pickle it."""

    def __init__(self, seed: int, epoch: Optional[SharedEpoch] = None):
        self.seed, self.epoch = seed, epoch

    def __call__(self, samples: Iterator[Dict]) -> Iterator[Dict]:
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        epoch = self.epoch.get_value() if self.epoch is not None else 0
        rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker}")
        return wds.shuffle(bufsize=SAMPLE_SHUFFLE_SIZE, initial=SAMPLE_SHUFFLE_INITIAL, rng=rng)(samples)


class DecodeChecked:
    """Raw sample -> decoded sample, checked against what its shard folder declares.

    The declaration is looked up once per shard url: :func:`.manifest.shard_schema` stats the
    folder's files, too slow for every sample, and a folder does not change under a loader reading
    it. :func:`decode` builds a new stage for every loader, so the next loader sees a rewritten
    folder. A class so loader workers can pickle it."""

    def __init__(self):
        self.schemas: Dict[str, SampleSchema] = {}

    def schema(self, url: str) -> SampleSchema:
        if url not in self.schemas:
            self.schemas[url] = shard_schema(url)
        return self.schemas[url]

    def __call__(self, sample: Dict) -> Dict:
        return decode_sample(sample, self.schema)


def decode():
    return wds.map(DecodeChecked())


def batch(batch_size: int, collate: Callable, partial: bool):
    return wds.batched(batch_size, collation_fn=collate, partial=partial)


# --------------------------------------------------------------------------------------------
# The packed (text, labels) layout of contrastive training
# --------------------------------------------------------------------------------------------

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
# Prepare stages: decoded sample -> what a consumer batches
# --------------------------------------------------------------------------------------------

class ECGSamplePreparer:
    """Decoded sample -> model-ready ECG (selected leads, crop, normalisation, RR channels when the
    model takes them; they need the shards' `sampling_rate`) and label multi-hot.

    The RR channels come from the sample's stored beats when it carries them (:mod:`.rhythm`) and
    the model's leads are the ones they were found on; otherwise the beats are detected here."""

    def __init__(self, n_samples: int, n_labels: int, train: bool, leads: Sequence[str] = STANDARD_LEADS,
                 normalize: str = "center", amplitude_scale=None, lead_dropout: float = 0.0,
                 sampling_rate: Optional[float] = None):
        leads, with_rr = split_channels(leads)
        if with_rr and sampling_rate is None:
            raise ValueError(f"the model takes the RR channels {RR_CHANNELS}: the ECGs' sampling_rate is needed")
        self.lead_index = lead_indices(STANDARD_LEADS, leads)
        self.n_labels = n_labels
        self.transform = build_ecg_transform(train=train, n_samples=n_samples, normalize=normalize,
                                             amplitude_scale=amplitude_scale, lead_dropout=lead_dropout,
                                             rr_sampling_rate=sampling_rate if with_rr else None)
        self.stored_beats_fit = with_rr and list(leads) == BEAT_DETECTOR["leads"]
        if self.stored_beats_fit:  # build_ecg_transform's first steps: append RR, normalise the leads
            append_rr, normalize_leads, *after = self.transform.transforms
            # with stored beats the leads are normalised first, then the channels appended: the
            # same values without splitting and re-joining the channels
            self.append_rr, self.normalize_leads, self.after_rr = append_rr, normalize_leads.transform, Compose(after)

    def ecg(self, sample: Dict) -> torch.Tensor:
        signal = torch.from_numpy(sample["ecg"][self.lead_index])
        if self.stored_beats_fit and "beats" in sample:
            leads = self.normalize_leads(signal)
            return torch.as_tensor(self.after_rr(self.append_rr(leads, sample["beats"])), dtype=torch.float32)
        return torch.as_tensor(self.transform(signal), dtype=torch.float32)

    def multi_hot(self, sample: Dict) -> torch.Tensor:
        try:
            return labels_to_multi_hot(sample["label_ids"], self.n_labels)
        except ValueError as e:
            raise ShardFormatError(f"sample {sample['key']}: {e}") from e


class CachedTokenizer:
    """A tokenizer that keeps the tokens of the last `size` distinct texts: training texts repeat
    (every stored text each epoch, the short finding sentences many times per epoch) and
    tokenising is a third of preparing a sample. A class so workers can pickle it.

    :meth:`joined` tokenises a text given as parts joined by one space (a sampled text: findings
    phrase in a random order and template, then the report, a combination that rarely repeats)
    from cached encodings of its words, when that is exactly what tokenising the joined text
    gives: with open_clip's BPE tokenizer (no reduction), a space ends every word and cleaning
    (ftfy, HTML entities, whitespace, lower case) acts within a word of printable ASCII without
    ``&``. Such parts are encoded word by word; another part is encoded whole, and only as the last
    one (ftfy's encoding repair then sees only its characters). Otherwise the joined text is
    tokenised as one."""

    def __init__(self, tokenizer: Callable, size: int = 32768):
        self.tokenizer, self.size = tokenizer, size
        self.cache: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.encodings: Dict[str, List[int]] = {}  # word (or whole last part) -> BPE ids
        self.composable = isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None

    def __call__(self, text: str) -> torch.Tensor:
        """The ``[context]`` tokens of one text."""
        return self._cached(self.cache, text, lambda: self.tokenizer(text)[0])

    def joined(self, parts: Sequence[str]) -> torch.Tensor:
        """The tokens of ``" ".join(parts)``, equal to ``self(" ".join(parts))``."""
        by_word = [_plain_words(part) for part in parts]
        if not self.composable or not all(by_word[:-1]):
            return self(" ".join(parts))
        if len(parts) == 1:  # a text on its own repeats (a report, a short findings phrase)
            return self._cached(self.cache, parts[0], lambda: self._composed(parts, by_word))
        return self._composed(parts, by_word)

    def _composed(self, parts: Sequence[str], by_word: Sequence[bool]) -> torch.Tensor:
        tok, words = self.tokenizer, self.encodings
        ids = [tok.sot_token_id]
        for part, plain in zip(parts, by_word):
            for piece in (part.split(" ") if plain else (part,)):
                encoded = words.get(piece)
                if encoded is None:
                    if len(words) >= self.size:  # words rarely outgrow it; start afresh if they do
                        words.clear()
                    encoded = words[piece] = tok.encode(piece)
                ids += encoded
        ids.append(tok.eot_token_id)
        if len(ids) > tok.context_length:  # open_clip's truncation: cut, then end with EOT
            ids = ids[:tok.context_length]
            ids[-1] = tok.eot_token_id
        tokens = np.zeros(tok.context_length, dtype=np.int64)  # numpy: a third of torch.tensor's cost
        tokens[:len(ids)] = ids
        return torch.from_numpy(tokens)

    def _cached(self, cache: OrderedDict, key: str, compute: Callable):
        value = cache.get(key)
        if value is None:
            value = cache[key] = compute()
            if len(cache) > self.size:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return value


def _plain_words(text: str) -> bool:
    """Printable ASCII without ``&``: open_clip's cleaning cannot act across its spaces."""
    return text.isascii() and text.isprintable() and "&" not in text


class ContrastivePair:
    """Decoded sample -> (ecg [leads, T], packed text row); a class so workers can pickle it.

    With a `text_sampler` (:class:`~open_clip_ecg.data.text.TrainingTextSampler`) the text is
    composed afresh each time from the report and finding names; otherwise the stored text is used.
    """

    def __init__(self, preparer: ECGSamplePreparer, tokenizer: Callable,
                 text_sampler: Optional[TrainingTextSampler] = None):
        self.preparer = preparer
        self.tokens = CachedTokenizer(tokenizer)
        self.text_sampler = text_sampler

    def __call__(self, sample: Dict):
        labels = self.preparer.multi_hot(sample)
        if self.text_sampler is None:
            tokens, text_labels = self.tokens(sample["text"]), labels
        else:
            parts, stated = self.text_sampler.parts(sample["text"], sample["meta"].get("report"), sample["label_ids"])
            # a text stating all the ECG's findings (three kinds of four) shares its multi-hot
            all_stated = len(stated) == len(set(sample["label_ids"]))
            text_labels = labels if all_stated else labels_to_multi_hot(stated, len(labels))
            tokens = self.tokens.joined(parts)
        return self.preparer.ecg(sample), pack_text_and_labels(tokens, labels, text_labels)


def _collate_pairs(samples):
    ecgs, texts = zip(*samples)
    return torch.stack(ecgs), torch.stack(texts)


class EvalRecord:
    """Decoded sample -> dict with the model-ready ECG, key, label codes, meta and text (plus the
    label multi-hot and tokens when asked)."""

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
    stacked = {k: [s[k] for s in samples] for k in samples[0]}
    for k in ("ecg", "labels", "tokens"):
        if k in stacked:
            stacked[k] = torch.stack(stacked[k])
    stacked["keys"] = stacked.pop("key")
    return stacked


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

def make_epoch_loader(shards, prepare: Callable, collate: Callable, *, batch_size: int, workers: int,
                      world_size: int = 1, seed: int = 0, epoch: int = 0, resampled: bool = False,
                      num_samples: Optional[int] = None) -> DataInfo:
    """Training loader in open_clip's DataInfo: shuffled shards and samples, `prepare` per sample,
    fixed batches per epoch.

    Every worker of every rank yields the same number of batches (webdataset's ``with_epoch``
    repeats the pipeline), so DDP ranks never wait on each other at an epoch's end.
    """
    shards = expand_shards(shards)
    num_samples = num_samples or count_samples(shards)
    if not num_samples:
        raise ValueError(f"no sizes.json beside {shards[0]}: pass --train-num-samples")
    if not resampled and len(shards) < max(1, workers) * world_size:
        raise ValueError(
            f"{len(shards)} training shard(s) cannot feed {max(1, workers)} worker(s) x {world_size} "
            "rank(s): write more shards (smaller --shard-size), lower --workers, or use "
            "--dataset-resampled")
    shared_epoch = SharedEpoch(epoch=epoch)
    pipeline = wds.DataPipeline(
        shard_list(shards, train=True, resampled=resampled, seed=seed, shared_epoch=shared_epoch),
        read_tar(),
        ShuffleSamples(seed, shared_epoch),
        decode(),
        wds.map(prepare),
        batch(batch_size, collate, partial=False),
    )
    num_batches = math.ceil(num_samples / (batch_size * world_size))
    worker_batches = math.ceil(num_batches / max(1, workers))
    pipeline = pipeline.with_epoch(worker_batches)
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    loader.num_batches = worker_batches * max(1, workers)
    loader.num_samples = loader.num_batches * batch_size * world_size
    return DataInfo(dataloader=loader, shared_epoch=shared_epoch)


def make_train_loader(shards, *, tokenizer: Callable, preparer: ECGSamplePreparer, batch_size: int,
                      workers: int, world_size: int = 1, seed: int = 0, epoch: int = 0,
                      resampled: bool = False, num_samples: Optional[int] = None,
                      text_sampler: Optional[TrainingTextSampler] = None) -> DataInfo:
    """Contrastive training loader: (ecg, packed text) batches (:func:`make_epoch_loader`)."""
    return make_epoch_loader(shards, ContrastivePair(preparer, tokenizer, text_sampler), _collate_pairs,
                             batch_size=batch_size, workers=workers, world_size=world_size, seed=seed, epoch=epoch,
                             resampled=resampled, num_samples=num_samples)


def make_val_loader(shards, *, tokenizer: Callable, preparer: ECGSamplePreparer, batch_size: int,
                    workers: int) -> DataInfo:
    """Validation loader in open_clip's DataInfo: every sample once, in shard order per worker."""
    shards = expand_shards(shards)
    pipeline = wds.DataPipeline(
        shard_list(shards, train=False),
        read_tar(),
        decode(),
        wds.map(ContrastivePair(preparer, tokenizer)),
        batch(batch_size, _collate_pairs, partial=True),
    )
    workers = min(workers, len(shards))
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers)
    loader.num_samples = count_samples(shards) or 0
    loader.num_batches = math.ceil(loader.num_samples / batch_size)
    return DataInfo(dataloader=loader)


def make_eval_loader(shards, n_samples: int, batch_size: int, workers: int = 0,
                     vocab_size: Optional[int] = None, tokenizer: Optional[Callable] = None,
                     leads: Sequence[str] = STANDARD_LEADS, normalize: str = "center",
                     sampling_rate: Optional[float] = None):
    """DataLoader of dict batches: ecg [B, leads, n_samples] centre-cropped, labels (multi-hot,
    when `vocab_size` is given), tokens (when `tokenizer` is given), keys, label_codes, meta, text.
    `sampling_rate` (the shards') is needed when `leads` include the RR channels."""
    shards = expand_shards(shards)
    preparer = ECGSamplePreparer(n_samples, vocab_size or 0, train=False, leads=leads, normalize=normalize,
                                 sampling_rate=sampling_rate)
    pipeline = wds.DataPipeline(
        shard_list(shards, train=False),
        read_tar(),
        decode(),
        wds.map(EvalRecord(preparer, vocab_size is not None, tokenizer)),
        batch(batch_size, _collate_dicts, partial=True),
    )
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=min(workers, len(shards)))


def iterate_samples(shards) -> Iterator[Dict]:
    """Decoded samples of `shards`, in order, in this process (for analyses and tests)."""
    yield from wds.DataPipeline(wds.SimpleShardList(expand_shards(shards)), read_tar(), decode())
