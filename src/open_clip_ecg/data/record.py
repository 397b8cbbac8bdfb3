"""The one record type every reader yields, and the error a bad record raises.

Readers work in two steps so that splitting and parallel loading stay cheap:
``entries()`` lists :class:`RecordEntry` objects (ids, patient, labels, report, where the signal
lives) without touching signal files; ``load(entry)`` reads the signal into an :class:`ECGRecord`
or raises :class:`RecordError` with the record's path and a short reason code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

# Reason codes for skipped records; manifest.json counts skips per reason.
SKIP_REASONS = (
    "unreadable",      # file missing or not parseable
    "truncated",       # fewer samples on disk than the header promises
    "lead_count",      # signal lead count differs from the header / expected leads
    "missing_leads",   # a required lead is absent and the policy does not allow filling it
    "too_short",       # shorter than the minimum duration
    "flat",            # (near-)constant signal on every lead
    "non_finite",      # NaN/inf beyond what the policy repairs
    "no_report",       # text is required but the record has none
    "no_labels",       # labels are required but the record has none
    "sampling_rate",   # rate outside preprocess.SAMPLING_RATE_RANGE (checked before resampling)
    "bad_encoding",    # the index row is not valid text in the index's encoding
)


class RecordError(Exception):
    """A record that cannot be used: carries the record id, its path and a reason code."""

    def __init__(self, reason: str, path: str, detail: str, record_id: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; expected one of {SKIP_REASONS}")
        self.reason = reason
        self.path = str(path)
        self.detail = detail
        self.record_id = record_id
        super().__init__(f"{self.path} (record {record_id or '?'}): {reason}: {detail}")


@dataclass
class RecordEntry:
    """What a reader knows about a record before reading its signal."""

    record_id: str                      # unique, stable; becomes the shard sample's __key__
    path: str                           # the signal file / WFDB record path (for errors)
    patient_id: str                     # splits never put one patient on two sides
    report: str = ""                    # free-text report as written ("" if none)
    labels: List[str] = field(default_factory=list)  # label codes (SCP, SNOMED CT, ...)
    split: Optional[str] = None         # a split the source dictates (e.g. CSV `split`)
    fold: Optional[int] = None          # a source fold (PTB-XL strat_fold)
    metadata: Dict[str, Any] = field(default_factory=dict)  # JSON-serialisable extras
    defect: Optional[Tuple[str, str]] = None  # (skip reason, detail) found while listing: never loaded


@dataclass
class ECGRecord:
    """A loaded record: the signal in millivolts with its lead names and rate."""

    entry: RecordEntry
    signal: np.ndarray                  # [leads, samples] float32, millivolts
    sampling_rate: float
    lead_names: List[str]

    @property
    def record_id(self) -> str:
        return self.entry.record_id
