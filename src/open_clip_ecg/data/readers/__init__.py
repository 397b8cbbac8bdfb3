"""ECG collection readers: each lists a collection's records and loads them, for the shard writer.

:class:`Reader` is what every reader provides (``ptbxl``, ``cinc``, ``mimic-iv-ecg``, ``csv``);
readers need not inherit from it. A reader class takes ``(path, **options)``.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Protocol

from ..record import ECGRecord, RecordEntry

# --format name -> "module:Class"; imported lazily so one broken optional reader cannot
# break the others.
READERS = {
    "ptbxl": "open_clip_ecg.data.readers.ptbxl:PTBXLReader",
    "cinc": "open_clip_ecg.data.readers.cinc:CinCReader",
    "mimic-iv-ecg": "open_clip_ecg.data.readers.mimic_iv_ecg:MIMICIVECGReader",
    "csv": "open_clip_ecg.data.readers.csv:CSVReader",
}


class Reader(Protocol):
    """An ECG collection as the shard writer reads it. Must be picklable: the writer's worker
    processes call :meth:`load`."""

    root: Optional[Path]
    """The folder record paths are relative to; the manifest records it and each sample's
    ``meta.json`` stores its source path relative to it (None: paths are kept as they are)."""

    def entries(self) -> Iterable[RecordEntry]:
        """Every record of the collection, in a stable order, without reading any signal file (ids,
        patient, labels, report, where the signal lives). A record found defective while listing
        carries ``defect`` and is skipped, never loaded."""

    def load(self, entry: RecordEntry) -> ECGRecord:
        """The signal of one listed record in millivolts with its lead names and rate; raises
        :class:`~open_clip_ecg.data.record.RecordError` (path and reason) when it cannot be used."""

    def label_names(self) -> Dict[str, str]:
        """Label code -> English name, for the vocabulary and label sentences (a code without a
        name is named by itself)."""


def get_reader(fmt: str, path, **options) -> Reader:
    """Instantiate the reader for `fmt` on `path`."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(READERS)}")
    module_name, class_name = READERS[fmt].split(":")
    return getattr(importlib.import_module(module_name), class_name)(path, **options)
