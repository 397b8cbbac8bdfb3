"""Generic reader: a CSV or JSONL index of WFDB records with reports and label codes.

Columns (CSV header or JSONL keys):

- ``path`` (required): WFDB record path, with or without ``.hea``/``.dat``/``.mat``; relative
  paths are relative to the index file's folder.
- ``report`` (required, may be empty): the free-text report.
- ``labels`` (required, may be empty): label codes separated by ``;`` (JSONL may use a list).
- ``patient`` (optional): patient id; without it every record is its own patient, so a patient
  split becomes a per-record split.
- ``split`` (optional): ``train``/``val``/``test``, used by ``--split-by column``.
- ``fold`` (optional): an integer fold, used by ``--split-by fold``.
- ``id`` (optional): record id; defaults to ``path`` as written. Ids must be unique.

Any other column is kept as record metadata (e.g. ``age``, ``sex``).

English label names come from the ``label_names`` option (a mapping, or a ``.json`` file holding
``{code: name}``, or a ``.csv`` file with ``code`` and ``name`` columns); without the option, a
``label_names.csv`` or ``label_names.json`` beside the index file is used if present (the
synthetic generator writes one). Codes without a name stand for themselves.

The index is read as ``encoding`` (default UTF-8, with or without BOM). A row holding bytes that
are not valid in it (e.g. a Latin-1 ``\xfc`` in a UTF-8 file) is listed with a ``bad_encoding``
defect naming the file, line, record and column, so the shard writer skips and counts it instead
of the whole run failing on one report.
"""
from __future__ import annotations

import codecs
import csv
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional, Union

from ..record import ECGRecord, RecordEntry
from .encoding import bad_encoding_defect, readable, undecodable_column
from .wfdb_io import read_wfdb

REQUIRED_COLUMNS = ("path", "report", "labels")
OPTIONAL_COLUMNS = ("patient", "split", "fold", "id")
SPLITS = ("train", "val", "test")
LABEL_NAMES_FILES = ("label_names.csv", "label_names.json")


def read_label_names(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """``{code: name}`` from a ``.json`` object or a ``.csv`` with ``code`` and ``name`` columns."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: label names file not found")
    try:
        return _read_label_names(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8") from None


def _read_label_names(path: Path) -> Dict[str, str]:
    if path.suffix.lower() == ".json":
        names = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(names, dict):
            raise ValueError(f"{path}: expected a JSON object mapping label codes to names")
        return {str(code): str(name) for code, name in names.items()}
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = csv.DictReader(f)
        missing = [c for c in ("code", "name") if c not in (rows.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: label names file lacks column(s) {missing}; has {rows.fieldnames}")
        return {row["code"].strip(): row["name"].strip() for row in rows if row["code"].strip()}


class CSVReader:
    """Records listed in a CSV/JSONL index (see the module docstring for the columns)."""

    def __init__(self, path, label_names: Optional[Union[str, os.PathLike, Mapping[str, str]]] = None,
                 encoding: str = "utf-8-sig"):
        self.path = Path(path).absolute()
        try:
            self.encoding = codecs.lookup(encoding).name if encoding != "utf-8-sig" else encoding
        except LookupError:
            raise ValueError(f"unknown text encoding {encoding!r} for {self.path}") from None
        self.root = self.path.parent  # relative record paths resolve here
        if not self.path.is_file():
            raise ValueError(f"{self.path}: index file not found")
        if self.path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
            raise ValueError(f"{self.path}: expected a .csv or .jsonl index, got {self.path.suffix!r}")
        if label_names is None:
            sibling = next((self.path.parent / n for n in LABEL_NAMES_FILES if (self.path.parent / n).is_file()), None)
            self._label_names = read_label_names(sibling) if sibling else {}
        elif isinstance(label_names, Mapping):
            self._label_names = {str(code): str(name) for code, name in label_names.items()}
        else:
            self._label_names = read_label_names(label_names)

    def label_names(self) -> Dict[str, str]:
        return dict(self._label_names)

    def _rows(self) -> Iterator[tuple]:
        """(line number, row dict) pairs; ValueError naming the file when required columns are absent."""
        if self.path.suffix.lower() == ".csv":
            with self.path.open(newline="", encoding=self.encoding, errors="surrogateescape") as f:
                reader = csv.DictReader(f)
                self._check_columns(reader.fieldnames or [])
                for row in reader:
                    yield reader.line_num, row
            return
        with self.path.open(encoding=self.encoding, errors="surrogateescape") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{line_no}: invalid JSON: {err}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{self.path}:{line_no}: expected a JSON object per line")
                self._check_columns(row.keys(), line_no)
                yield line_no, row

    def _check_columns(self, columns, line_no: Optional[int] = None) -> None:
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            where = f"{self.path}:{line_no}" if line_no else str(self.path)
            raise ValueError(f"{where}: missing required column(s) {missing} (required: {list(REQUIRED_COLUMNS)}; "
                             f"found: {sorted(columns)})")

    def entries(self) -> Iterator[RecordEntry]:
        """One entry per row, in file order; ValueError on a bad row or a duplicate id."""
        seen: Dict[str, int] = {}
        for line_no, row in self._rows():
            where = f"{self.path}:{line_no}"
            undecodable = undecodable_column(row)
            if undecodable is not None:
                yield self._undecodable_entry(row, where, *undecodable)
                continue
            raw_path = str(row["path"] or "").strip()
            if not raw_path:
                raise ValueError(f"{where}: empty 'path'")
            record_id = str(row.get("id") or "").strip() or raw_path
            if record_id in seen:
                raise ValueError(f"{where}: duplicate record id {record_id!r} (first on line {seen[record_id]})")
            seen[record_id] = line_no
            split = str(row.get("split") or "").strip().lower() or None
            if split is not None and split not in SPLITS:
                raise ValueError(f"{where}: split {row['split']!r} is not one of {list(SPLITS)}")
            fold = str(row.get("fold") if row.get("fold") is not None else "").strip()
            if fold and not fold.lstrip("-").isdigit():
                raise ValueError(f"{where}: fold {row['fold']!r} is not an integer")
            yield RecordEntry(
                record_id=record_id,
                path=str(self.root / raw_path),
                patient_id=str(row.get("patient") or "").strip() or record_id,
                report=str(row["report"] or "").strip(),
                labels=_parse_labels(row["labels"]),
                split=split,
                fold=int(fold) if fold else None,
                metadata={k: v for k, v in row.items()
                          if k is not None and k not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS},
            )

    def _undecodable_entry(self, row: dict, where: str, column: str, byte: int) -> RecordEntry:
        """A row with bytes invalid in the index's encoding: listed (so it is counted), never loaded."""
        raw_path = readable(row.get("path"))
        record_id = readable(row.get("id")) or raw_path or where
        return RecordEntry(record_id=record_id, path=str(self.root / raw_path) if raw_path else str(self.path),
                           patient_id=record_id, defect=bad_encoding_defect(where, column, byte, self.encoding))

    def load(self, entry: RecordEntry) -> ECGRecord:
        signal, fs, lead_names = read_wfdb(entry.path, entry.record_id)
        return ECGRecord(entry=entry, signal=signal, sampling_rate=fs, lead_names=lead_names)


def _parse_labels(value) -> List[str]:
    """Codes from ``'A;B'`` (or a JSON list), stripped, empties and repeats dropped, order kept."""
    items = value if isinstance(value, list) else str(value or "").split(";")
    return list(dict.fromkeys(str(code).strip() for code in items if str(code).strip()))

