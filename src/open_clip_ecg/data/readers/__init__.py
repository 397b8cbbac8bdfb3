"""ECG collection readers. Each yields RecordEntry objects and loads them into ECGRecords.

A reader class takes ``(path, **options)`` and provides ``entries()``, ``load(entry)`` and
``label_names()`` (code -> English name); it must be picklable so shard workers can use it.
"""
from __future__ import annotations

import importlib

# --format name -> "module:Class"; imported lazily so one broken optional reader cannot
# break the others.
READERS = {
    "ptbxl": "open_clip_ecg.data.readers.ptbxl:PTBXLReader",
    "cinc": "open_clip_ecg.data.readers.cinc:CinCReader",
    "mimic-iv-ecg": "open_clip_ecg.data.readers.mimic_iv_ecg:MIMICIVECGReader",
    "csv": "open_clip_ecg.data.readers.csv:CSVReader",
}


def get_reader(fmt: str, path, **options):
    """Instantiate the reader for `fmt` on `path`."""
    if fmt not in READERS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(READERS)}")
    module_name, class_name = READERS[fmt].split(":")
    return getattr(importlib.import_module(module_name), class_name)(path, **options)
