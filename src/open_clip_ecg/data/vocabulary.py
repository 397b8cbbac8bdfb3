"""The label vocabulary written beside the shards, and how training reads it back.

``vocabulary.json`` is a list of ``{"id", "code", "name", "count": {split: n}}``; ids are
positions in the list, assigned by sorting codes (so the same code set always gives the same
ids). Shards are written as a stream, so ids are fixed from the label codes of every listed
record before any signal is read; ``count`` then counts the records actually written. A code
that only occurs on skipped records therefore keeps its id with zero counts, rather than
shifting the ids of samples already written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Sequence

import numpy as np
import torch

from .shard_format import load_folder_json

VOCABULARY_FILE = "vocabulary.json"


def label_ids(codes: Iterable[str]) -> Dict[str, int]:
    """code -> id: codes sorted, ids 0..n-1."""
    return {code: i for i, code in enumerate(sorted(set(codes)))}


def build_vocabulary(ids: Mapping[str, int], label_names: Mapping[str, str],
                     counts: Mapping[str, Mapping[str, int]], splits: Sequence[str]) -> List[dict]:
    """Vocabulary entries ordered by id; ``counts`` is ``{split: {code: n}}`` over written records,
    reported for every split in ``splits`` (zeros included)."""
    return [
        {
            "id": i,
            "code": code,
            "name": label_names.get(code, code),
            "count": {split: int(counts.get(split, {}).get(code, 0)) for split in splits},
        }
        for code, i in sorted(ids.items(), key=lambda item: item[1])
    ]


def load_vocabulary(shard_dir) -> List[dict]:
    """Read ``vocabulary.json`` from a local shard folder (or the file itself); ValueError if it is
    missing or not a vocabulary (:func:`check_vocabulary`)."""
    path = Path(shard_dir)
    if path.is_dir():
        path = path / VOCABULARY_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no label vocabulary; shard folders written by `open-clip-ecg shards` "
                         f"contain {VOCABULARY_FILE}")
    return check_vocabulary(load_folder_json(path), path)


def check_vocabulary(vocabulary, where) -> List[dict]:
    """The parsed vocabulary read from `where`; ValueError naming it unless it is a list of objects
    with 'id', 'code' and 'name' whose ids are 0..n-1 in order."""
    if not isinstance(vocabulary, list) or not all(isinstance(e, dict) and {"id", "code", "name"} <= e.keys()
                                                    for e in vocabulary):
        raise ValueError(f"{where}: expected a list of objects with 'id', 'code' and 'name'")
    if [entry["id"] for entry in vocabulary] != list(range(len(vocabulary))):
        raise ValueError(f"{where}: label ids must be 0..{len(vocabulary) - 1} in order")
    return vocabulary


def labels_to_multi_hot(ids: Sequence[int], n: int) -> torch.Tensor:
    """A float32 ``[n]`` multi-hot vector from label ids; ValueError on an id outside ``0..n-1``."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < n]
    if bad:
        raise ValueError(f"label ids {bad} out of range for a vocabulary of {n} labels")
    target = np.zeros(n, dtype=np.float32)  # numpy: a sixth of torch's cost on a vector this small
    target[ids] = 1.0
    return torch.from_numpy(target)
