"""ECG embeddings of shards: the step zero-shot evaluation, the linear probe and `open-clip-ecg embed`
share (shards -> model-ready ECGs -> L2-normalised ECG-tower embeddings, each row with its record).

ECGs are prepared as for validation during training: the selected leads, a centre crop of
``seconds`` and the same normalisation (:func:`open_clip_ecg.data.pipeline.make_eval_loader`).
A checkpoint that records its preprocessing (:mod:`open_clip_ecg.model_preprocess`) sets the
defaults (its validation crop and normalisation) and refuses shards at another sampling rate;
older checkpoints use the whole stored record and ``center`` normalisation.

CLI::

    open-clip-ecg embed --model ECG-RN18-MiniLM --pretrained epoch_10.pt --data shards/ --split test --out emb/

writes ``emb/embeddings.npy`` (float32 ``[N, embed_dim]``), ``emb/index.csv`` (row, key, label codes
of each row; rows in shard order with the default ``--workers 0``) and ``emb/embed.json`` (model, checkpoint, data, crop, shape).
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from .atomic import write_atomic, write_json_atomic
from .data.manifest import read_shard_info
from .data.pipeline import expand_shards, make_eval_loader
from .factory import add_model_arguments, load_model_from_args
from .leads import STANDARD_LEADS
from .model_preprocess import check_shards_fit
from .zeroshot import encode_ecg


@dataclass
class ShardRecords:
    """What evaluation needs of each record, in shard order, next to its embedding or scores."""

    keys: List[str]
    label_codes: List[List[str]]
    metas: List[Dict]


@dataclass
class EmbeddedShards:
    embeddings: np.ndarray  # float32 [N, embed_dim]
    records: ShardRecords
    n_samples: int
    sampling_rate: float
    shards: List[str]


def resolve_shards(spec, split: Optional[str] = None) -> List[str]:
    """Shard paths of `spec`; a folder needs `split`, so a folder's train shards are never evaluated
    by accident. ValueError naming the spec when nothing matches."""
    if isinstance(spec, str) and os.path.isdir(spec) and not split:
        raise ValueError(f"{spec!r} is a folder of shards: give a split (train, val or test) or a shard pattern "
                         f"such as '{spec.rstrip('/')}/test-{{000000..000001}}.tar'")
    return expand_shards(spec, split=split)


def model_leads(model) -> List[str]:
    """The leads an open_clip ECG model's tower (or a bare tower) takes, in order (12 unless it says otherwise)."""
    tower = getattr(model, "visual", model)
    tower = getattr(tower, "trunk", tower)
    return list(getattr(tower, "lead_names", None) or STANDARD_LEADS)


def crop_length(info: Dict, seconds: Optional[float] = None, flag: str = "--seconds") -> int:
    """Samples per ECG: `seconds` (given as `flag`) at the rate of the shards `info` describes
    (:func:`read_shard_info`), default the stored length; a crop of no samples or longer than the
    stored records is a ValueError."""
    if seconds is None:
        return info["n_samples"]
    n_samples = int(round(seconds * info["sampling_rate"]))
    if not 0 < n_samples <= info["n_samples"]:
        raise ValueError(f"{flag} {seconds} is outside the records stored in {info['directory']} "
                         f"({info['n_samples'] / info['sampling_rate']:g} s at {info['sampling_rate']:g} Hz)")
    return n_samples


def map_shards(fn: Callable[[torch.Tensor], torch.Tensor], shards: Sequence[str], n_samples: int,
               leads: Sequence[str], batch_size: int = 64, workers: int = 0, desc: str = "ECGs",
               normalize: str = "center", sampling_rate: Optional[float] = None):
    """``fn(ecg batch)`` over every record of `shards`: (outputs [N, ...] numpy, records in the same order).
    `sampling_rate` (the shards') is needed when `leads` include the RR channels.

    The order is the shards' with ``workers=0``; more workers interleave shards (records stay aligned)."""
    chunks, records = [], ShardRecords([], [], [])
    loader = make_eval_loader(shards, n_samples=n_samples, batch_size=batch_size, workers=workers, leads=leads,
                              normalize=normalize, sampling_rate=sampling_rate)
    for batch in tqdm(loader, desc=desc, unit="batch", disable=None):  # bar on terminals only
        chunks.append(fn(batch["ecg"]).detach().cpu().float().numpy())
        records.keys.extend(batch["keys"])
        records.label_codes.extend(batch["label_codes"])
        records.metas.extend(batch["meta"])
    if not chunks:
        raise ValueError(f"the shards {shards[0]}{' ...' if len(shards) > 1 else ''} hold no samples")
    return np.concatenate(chunks), records


def embed_shards(model, shards, *, seconds: Optional[float] = None, batch_size: int = 64,
                 workers: int = 0, normalize: bool = True) -> EmbeddedShards:
    """ECG embeddings of every record of `shards` (paths or a spec), with keys, codes and meta, prepared
    as the model's recorded preprocessing says (module docstring)."""
    shards = expand_shards(shards)
    trained, info = getattr(model, "ecg_preprocess", None), read_shard_info(shards)
    check_shards_fit(trained, info)
    if seconds is None and trained is not None:  # the validation crop, or all of shorter records
        seconds = min(float(trained["eval_seconds"]), info["n_samples"] / info["sampling_rate"])
    n_samples = crop_length(info, seconds)
    embeddings, records = map_shards(
        lambda ecg: encode_ecg(model, ecg, batch_size=batch_size, normalize=normalize),
        shards, n_samples, model_leads(model), batch_size, workers, desc="embed",
        normalize=trained["normalize"] if trained is not None else "center", sampling_rate=info["sampling_rate"])
    return EmbeddedShards(embeddings.astype(np.float32), records, n_samples, info["sampling_rate"], list(shards))


def write_embeddings(embedded: EmbeddedShards, out_dir: str, about: Dict) -> Dict[str, str]:
    """embeddings.npy, index.csv and embed.json in `out_dir` (each written atomically)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("embeddings.npy", "index.csv", "embed.json")}

    def save_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, embedded.embeddings, allow_pickle=False)

    def save_index(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "key", "label_codes"])
            for row, (key, codes) in enumerate(zip(embedded.records.keys, embedded.records.label_codes)):
                writer.writerow([row, key, " ".join(codes)])

    write_atomic(paths["embeddings.npy"], save_npy)
    write_atomic(paths["index.csv"], save_index)
    write_json_atomic(paths["embed.json"], {**about, "shape": list(embedded.embeddings.shape),
                                            "n_samples": embedded.n_samples, "sampling_rate": embedded.sampling_rate,
                                            "shards": embedded.shards}, indent=2)
    return paths


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="shards: brace pattern, glob, '::' list, or folder + --split")
    parser.add_argument("--split", default=None, help="split to read when --data is a folder (train/val/test)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seconds", type=float, default=None, help="centre crop length (default: whole record)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-normalize", action="store_true", help="keep the raw (unnormalised) projections")


def run(args) -> int:
    model, _ = load_model_from_args(args, device=args.device)
    embedded = embed_shards(model, resolve_shards(args.data, args.split), seconds=args.seconds,
                            batch_size=args.batch_size, workers=args.workers, normalize=not args.no_normalize)
    paths = write_embeddings(embedded, args.out, {"model": args.model, "pretrained": args.pretrained,
                                                  "data": args.data, "split": args.split,
                                                  "normalized": not args.no_normalize})
    print(f"wrote {embedded.embeddings.shape[0]} embeddings of dim {embedded.embeddings.shape[1]} to "
          f"{paths['embeddings.npy']}")
    return 0
