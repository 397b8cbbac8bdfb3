"""PTB-XL reader (Wagner et al., Scientific Data 2020): `ptbxl_database.csv`, `scp_statements.csv`
and the WFDB records under `records100/` (100 Hz) or `records500/` (500 Hz).

Labels are SCP-ECG statement codes at one of six levels, as in the PTB-XL benchmark
(Strodthoff et al. 2021): ``all`` statements, ``diagnostic``, ``form`` and ``rhythm`` statements,
and the diagnostic ``subclass`` (23) and ``superclass`` (5) aggregations. The raw ``scp_codes``
dict is kept in ``RecordEntry.metadata['scp_codes']`` so that evaluation can derive any level
later with :func:`scp_codes_at_level`.

Likelihoods: PTB-XL gives each statement a likelihood in percent (15, 35, 50, 80, 100) for
diagnostic statements; ``0`` means *unknown* (always the case for form and rhythm statements).
``likelihood_threshold`` therefore only filters statements with a known likelihood: a code is
kept when its likelihood is 0 (unknown) or >= the threshold. The default 0 keeps every code.

Reports are returned as written: mostly German, some English and Swedish (PTB-XL's ``report``).
Metadata: every other database column (NaN -> None), ``sex`` as "male"/"female" (PTB-XL: 0/1),
``age`` with PTB-XL's privacy code 300 (older than 89) reported as 90.
"""
from __future__ import annotations

import ast
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Mapping, Optional

import pandas as pd

from ..record import ECGRecord, RecordEntry
from .wfdb_io import read_wfdb

LABEL_LEVELS = ("all", "diagnostic", "subclass", "superclass", "form", "rhythm")

# Readable names for the 5 diagnostic superclasses.
SUPERCLASS_NAMES = {
    "NORM": "normal ECG",
    "MI": "myocardial infarction",
    "STTC": "ST/T change",
    "CD": "conduction disturbance",
    "HYP": "hypertrophy",
}

# Diagnostic subclasses that are not themselves SCP statements (the others, e.g. IMI or LVH,
# take their statement's description).
_SUBCLASS_ONLY_NAMES = {
    "STTC": "ST/T change",
    "ISCA": "ischemic in anterior or lateral leads",
    "ISCI": "ischemic in inferior or inferolateral leads",
    "LAFB/LPFB": "left anterior or posterior fascicular block",
    "_AVB": "atrioventricular block",
}

# PTB-XL codes ages above 89 as 300 (HIPAA); reported as 90 ("90 or older").
_PTBXL_AGE_OVER_89 = 300
_PTBXL_SEX = {0: "male", 1: "female"}
# Columns that become RecordEntry fields rather than metadata.
_ENTRY_COLUMNS = ("ecg_id", "patient_id", "report", "scp_codes", "strat_fold", "filename_lr", "filename_hr")


@dataclass(frozen=True)
class ScpStatement:
    """One row of `scp_statements.csv`."""

    code: str
    description: str
    diagnostic: bool
    form: bool
    rhythm: bool
    diagnostic_class: Optional[str]
    diagnostic_subclass: Optional[str]


def load_scp_statements(path) -> Dict[str, ScpStatement]:
    """Read `scp_statements.csv` (the file or the PTB-XL folder holding it): code -> statement."""
    path = Path(path)
    if path.is_dir():
        path = path / "scp_statements.csv"
    table = pd.read_csv(path, index_col=0)
    missing = {"description", "diagnostic", "form", "rhythm", "diagnostic_class",
               "diagnostic_subclass"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: not a PTB-XL scp_statements.csv, missing columns {sorted(missing)}")

    def text(value) -> Optional[str]:
        return None if pd.isna(value) else str(value)

    return {
        str(code): ScpStatement(
            code=str(code),
            description=str(row.description),
            diagnostic=row.diagnostic == 1,
            form=row.form == 1,
            rhythm=row.rhythm == 1,
            diagnostic_class=text(row.diagnostic_class),
            diagnostic_subclass=text(row.diagnostic_subclass),
        )
        for code, row in table.iterrows()
    }


def _check_level(level: str) -> None:
    if level not in LABEL_LEVELS:
        raise ValueError(f"unknown PTB-XL label level {level!r}; expected one of {LABEL_LEVELS}")


def scp_codes_at_level(scp_codes: Mapping[str, float], statements: Mapping[str, ScpStatement],
                       level: str = "all", threshold: float = 0.0) -> List[str]:
    """Label codes at `level` for one record's ``scp_codes`` {code: likelihood}, sorted.

    A code counts when its likelihood is 0 (unknown, see module docstring) or >= `threshold`.
    Codes absent from `statements` are ignored (PTB-XL 1.0.x has none).
    """
    _check_level(level)
    out = set()
    for code, likelihood in scp_codes.items():
        statement = statements.get(code)
        if statement is None or (likelihood and likelihood < threshold):
            continue
        if level == "all":
            out.add(code)
        elif level in ("diagnostic", "form", "rhythm"):
            if getattr(statement, level):
                out.add(code)
        elif statement.diagnostic:
            group = statement.diagnostic_subclass if level == "subclass" else statement.diagnostic_class
            if group:
                out.add(group)
    return sorted(out)


def scp_label_names(statements: Mapping[str, ScpStatement], level: str = "all") -> Dict[str, str]:
    """Every code possible at `level` -> English name (statement descriptions, readable groups)."""
    _check_level(level)
    if level == "superclass":
        classes = {s.diagnostic_class for s in statements.values() if s.diagnostic and s.diagnostic_class}
        return {c: SUPERCLASS_NAMES.get(c, c) for c in sorted(classes)}
    if level == "subclass":
        subclasses = {s.diagnostic_subclass for s in statements.values()
                      if s.diagnostic and s.diagnostic_subclass}
        return {c: _SUBCLASS_ONLY_NAMES.get(c) or (statements[c].description if c in statements else c)
                for c in sorted(subclasses)}
    return {code: s.description for code, s in sorted(statements.items())
            if level == "all" or getattr(s, level)}


def _json_value(value):
    """pandas cell -> JSON-serialisable Python value (NaN -> None)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _patient_id(value) -> str:
    """PTB-XL stores patient ids as floats ('15709.0')."""
    value = _json_value(value)
    if value is None:
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


class PTBXLReader:
    """PTB-XL at 100 or 500 Hz with SCP labels at a chosen level; record ids ``ptbxl_{ecg_id:05d}``."""

    def __init__(self, path, sampling_rate: int = 500, label_level: str = "all",
                 likelihood_threshold: float = 0.0):
        self.root = Path(path)
        if int(sampling_rate) not in (100, 500):
            raise ValueError(f"PTB-XL is stored at 100 or 500 Hz, not {sampling_rate!r}")
        _check_level(label_level)
        self.sampling_rate = int(sampling_rate)
        self.label_level = label_level
        self.likelihood_threshold = float(likelihood_threshold)
        for name in ("ptbxl_database.csv", "scp_statements.csv"):
            if not (self.root / name).is_file():
                raise ValueError(f"{self.root}: not a PTB-XL folder ({name} not found)")
        self.statements = load_scp_statements(self.root / "scp_statements.csv")

    def entries(self) -> Iterator[RecordEntry]:
        database = self.root / "ptbxl_database.csv"
        table = pd.read_csv(database)
        missing = set(_ENTRY_COLUMNS) - set(table.columns)
        if missing:
            raise ValueError(f"{database}: missing PTB-XL columns {sorted(missing)}")
        filename_column = "filename_hr" if self.sampling_rate == 500 else "filename_lr"
        for row in table.to_dict("records"):
            ecg_id = int(row["ecg_id"])
            scp_codes = {str(k): float(v) for k, v in ast.literal_eval(row["scp_codes"]).items()}
            metadata = {k: _json_value(v) for k, v in row.items() if k not in _ENTRY_COLUMNS}
            metadata["ecg_id"] = ecg_id
            metadata["scp_codes"] = scp_codes
            metadata["sex"] = _PTBXL_SEX.get(metadata.get("sex"))
            if metadata.get("age") == _PTBXL_AGE_OVER_89:
                metadata["age"] = 90.0
            report = _json_value(row["report"])
            yield RecordEntry(
                record_id=f"ptbxl_{ecg_id:05d}",
                path=os.path.join(str(self.root), row[filename_column]),
                patient_id=_patient_id(row["patient_id"]),
                report=str(report).strip() if report is not None else "",
                labels=scp_codes_at_level(scp_codes, self.statements, self.label_level,
                                          self.likelihood_threshold),
                fold=int(row["strat_fold"]),
                metadata=metadata,
            )

    def load(self, entry: RecordEntry) -> ECGRecord:
        signal, fs, lead_names = read_wfdb(entry.path, entry.record_id)
        return ECGRecord(entry=entry, signal=signal, sampling_rate=fs, lead_names=lead_names)

    def label_names(self) -> Dict[str, str]:
        return scp_label_names(self.statements, self.label_level)
