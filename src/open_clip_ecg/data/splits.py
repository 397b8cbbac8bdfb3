"""Which split (train/val/test) each record goes to; one patient is never on two sides.

- ``fold``: source folds (PTB-XL ``strat_fold``): ``--val-folds`` -> val, ``--test-folds`` -> test,
  the rest -> train (default when every record has a fold).
- ``column``: the source's own split (CSV ``split`` column; default when every record has one).
- ``patient`` (default otherwise): a patient goes to test when ``u < test_fraction``, to val
  when ``u < test_fraction + val_fraction``, else train, with ``u`` the first 8 bytes of
  ``sha256(f"{seed}:{patient_id}")`` read as a fraction of 2**64. A patient's split never
  depends on the other records, so adding records never moves anyone; fractions are met in
  expectation.
- ``random``: patients (sorted) are permuted with ``numpy.random.default_rng(seed)`` and the
  first ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)`` to val:
  exact fractions of patients.

Every method's result is checked, and a patient found on two sides is a ValueError.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Optional, Protocol, Sequence

import numpy as np

from .record import RecordEntry

SPLIT_METHODS = ("fold", "patient", "random", "column")


class SplitSettings(Protocol):
    """The settings :func:`assign_splits` reads (``shard_writer.ShardOptions`` has them)."""

    split_by: Optional[str]
    val_fraction: float
    test_fraction: float
    seed: int
    val_folds: Sequence[int]
    test_folds: Sequence[int]


def patient_split(patient_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Stable hash split of one patient (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def resolve_split_method(entries: Sequence[RecordEntry], split_by: Optional[str]) -> str:
    """`split_by`, or the default for these entries: fold, else column, else patient."""
    if split_by:
        return split_by
    if all(e.fold is not None for e in entries):
        return "fold"
    if all(e.split is not None for e in entries):
        return "column"
    return "patient"


def assign_splits(entries: Sequence[RecordEntry], options: SplitSettings) -> List[str]:
    """One split per entry; ValueError when the method cannot apply or a patient would leak."""
    method = resolve_split_method(entries, options.split_by)
    if method == "fold":
        without = [e.record_id for e in entries if e.fold is None]
        if without:
            raise ValueError(f"--split-by fold: {len(without)} record(s) have no fold, e.g. {without[0]!r}")
        overlap = set(options.val_folds) & set(options.test_folds)
        if overlap:
            raise ValueError(f"folds {sorted(overlap)} are both validation and test folds")
        splits = ["val" if e.fold in options.val_folds else "test" if e.fold in options.test_folds else "train"
                  for e in entries]
    elif method == "column":
        without = [e.record_id for e in entries if e.split is None]
        if without:
            raise ValueError(f"--split-by column: {len(without)} record(s) have no split, e.g. {without[0]!r}")
        splits = [e.split for e in entries]
    elif method == "patient":
        splits = [patient_split(e.patient_id, options.seed, options.val_fraction, options.test_fraction)
                  for e in entries]
    else:
        patients = sorted({e.patient_id for e in entries})
        order = np.random.default_rng(options.seed).permutation(len(patients))
        n_test = round(options.test_fraction * len(patients))
        n_val = round(options.val_fraction * len(patients))
        side = {}
        for rank, index in enumerate(order):
            side[patients[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        splits = [side[e.patient_id] for e in entries]
    check_patient_leakage(entries, splits)
    return splits


def check_patient_leakage(entries: Sequence[RecordEntry], splits: Sequence[str]) -> None:
    """ValueError naming patients that appear in more than one split."""
    sides: Dict[str, set] = {}
    for entry, split in zip(entries, splits):
        sides.setdefault(entry.patient_id, set()).add(split)
    leaking = sorted(p for p, s in sides.items() if len(s) > 1)
    if leaking:
        examples = ", ".join(f"{p!r} in {sorted(sides[p])}" for p in leaking[:5])
        raise ValueError(f"{len(leaking)} patient(s) would appear in two splits: {examples}")
