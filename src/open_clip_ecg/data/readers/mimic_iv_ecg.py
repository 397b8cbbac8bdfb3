"""MIMIC-IV-ECG reader (Gow et al., PhysioNet 2023), mirroring the release layout::

    record_list.csv           subject_id, study_id, file_name, ecg_time, path
    machine_measurements.csv  subject_id, study_id, cart_id, ecg_time, report_0 .. report_17,
                              bandwidth, filtering, rr_interval, p_onset, p_end, qrs_onset,
                              qrs_end, t_end, p_axis, qrs_axis, t_axis
    files/p1000/p10000032/s40689238/40689238.{hea,dat}   (``path`` column, no extension)

Records are 12-lead, 10 s, 500 Hz WFDB files with leads ``I II III aVR aVF aVL V1..V6`` (note
aVF before aVL; preprocessing reorders).

- ``report``: the machine-generated statements ``report_0..report_17`` in column order, each
  stripped, empty ones dropped, joined with ``report_separator`` (default ``". "``; a statement
  already ending in ``.`` gets no second one). The cardiologist notes live in MIMIC-IV-Note and
  are not read here.
- ``labels``: MIMIC-IV-ECG has no label codes. ``labels="statements"`` (default) uses each
  distinct machine statement, normalised (lower case, whitespace collapsed, trailing ``.``
  dropped), as its own code, named by itself; ``labels="none"`` yields no labels.
- ``patient_id`` is ``subject_id``; record ids are ``mimic_{study_id}``.
- A study without a row in `machine_measurements.csv` gets an empty report and no labels.
- Memory: `machine_measurements.csv` is indexed by study id with interned strings (statements and
  measurement values repeat heavily), about 0.3-0.4 GB for the full 800k-study release; signals
  are never held.
"""
from __future__ import annotations

import csv
import os
import re
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ..record import ECGRecord, RecordEntry
from .encoding import bad_encoding_defect, readable, undecodable_column
from .wfdb_io import read_wfdb

REPORT_COLUMNS = [f"report_{i}" for i in range(18)]
MEASUREMENT_COLUMNS = ["cart_id", "bandwidth", "filtering", "rr_interval", "p_onset", "p_end",
                       "qrs_onset", "qrs_end", "t_end", "p_axis", "qrs_axis", "t_axis"]
LABEL_MODES = ("statements", "none")
_RECORD_LIST_COLUMNS = {"subject_id", "study_id", "path"}


def normalise_statement(statement: str) -> str:
    """Statement -> label code: lower case, single spaces, no trailing full stop."""
    return re.sub(r"\s+", " ", statement).strip().rstrip(".").strip().lower()


def join_statements(statements: List[str], separator: str = ". ") -> str:
    """Machine statements -> one report; no doubled full stop when a statement ends in one."""
    out = ""
    for statement in statements:
        if out:
            out += separator[1:] if out.endswith(".") and separator.startswith(".") else separator
        out += statement
    return out


def _number(value: str):
    try:
        number = float(value)
    except ValueError:
        return value or None
    return int(number) if number.is_integer() else number


def _read_csv(path: Path, required) -> Iterator[Tuple[int, Dict[str, str]]]:
    """(line number, row) pairs; bytes that are not UTF-8 survive as surrogates (see .encoding)."""
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        rows = csv.DictReader(handle)
        missing = set(required) - set(rows.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing MIMIC-IV-ECG columns {sorted(missing)}")
        for row in rows:
            yield rows.line_num, row


class MIMICIVECGReader:
    """MIMIC-IV-ECG release folder; machine reports as text, statements as labels."""

    def __init__(self, path, labels: str = "statements", report_separator: str = ". "):
        self.root = Path(path)
        if labels not in LABEL_MODES:
            raise ValueError(f"unknown MIMIC-IV-ECG labels mode {labels!r}; expected one of {LABEL_MODES}")
        for name in ("record_list.csv", "machine_measurements.csv"):
            if not (self.root / name).is_file():
                raise ValueError(f"{self.root}: not a MIMIC-IV-ECG folder ({name} not found)")
        self.labels = labels
        self.report_separator = report_separator
        self.statement_names: Dict[str, str] = {}

    def _machine_measurements(self) -> Tuple[Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]], Dict[str, tuple]]:
        """(study_id -> (statements, measurement values), strings interned to keep the index small;
        study_id -> bad_encoding defect of rows that are not UTF-8)."""
        index, defects = {}, {}
        path = self.root / "machine_measurements.csv"
        for line_no, row in _read_csv(path, {"study_id", *REPORT_COLUMNS}):
            undecodable = undecodable_column(row)
            if undecodable is not None:
                defects[readable(row["study_id"])] = bad_encoding_defect(f"{path}:{line_no}", *undecodable, "UTF-8")
                continue
            statements = tuple(sys.intern(s.strip()) for s in (row.get(c) or "" for c in REPORT_COLUMNS)
                               if s.strip())
            values = tuple(sys.intern(row.get(c) or "") for c in MEASUREMENT_COLUMNS)
            index[row["study_id"].strip()] = (statements, values)
        return index, defects

    def entries(self) -> Iterator[RecordEntry]:
        measurements, defects = self._machine_measurements()
        self.statement_names = {}
        for line_no, row in _read_csv(self.root / "record_list.csv", _RECORD_LIST_COLUMNS):
            study_id = readable(row["study_id"])
            defect = defects.get(study_id)
            undecodable = undecodable_column(row)
            if undecodable is not None:
                defect = bad_encoding_defect(f"{self.root / 'record_list.csv'}:{line_no}", *undecodable, "UTF-8")
            if defect is not None:
                yield RecordEntry(record_id=f"mimic_{study_id}", patient_id=readable(row["subject_id"]),
                                  path=os.path.join(str(self.root), readable(row["path"])), defect=defect)
                continue
            statements, values = measurements.get(study_id, ((), ()))
            labels = []
            if self.labels == "statements":
                labels = list(dict.fromkeys(c for c in map(normalise_statement, statements) if c))
                self.statement_names.update((c, c) for c in labels)
            metadata = {"subject_id": row["subject_id"].strip(), "study_id": study_id,
                        "ecg_time": row.get("ecg_time") or None,
                        "machine_statements": list(statements)}
            metadata.update(zip(MEASUREMENT_COLUMNS, map(_number, values)))
            yield RecordEntry(
                record_id=f"mimic_{study_id}",
                path=os.path.join(str(self.root), row["path"].strip()),
                patient_id=row["subject_id"].strip(),
                report=join_statements(list(statements), self.report_separator),
                labels=labels,
                metadata=metadata,
            )

    def load(self, entry: RecordEntry) -> ECGRecord:
        signal, fs, lead_names = read_wfdb(entry.path, entry.record_id)
        return ECGRecord(entry=entry, signal=signal, sampling_rate=fs, lead_names=lead_names)

    def label_names(self) -> Dict[str, str]:
        """Statement codes seen by `entries()` -> themselves (they are English already)."""
        return dict(sorted(self.statement_names.items()))
