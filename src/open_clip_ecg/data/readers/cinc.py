"""PhysioNet/Computing in Cardiology Challenge 2020/2021 reader: `NAME.hea` + `NAME.mat` pairs
anywhere under a folder (the 2021 release nests them per source), labels from ``#Dx:``.

- Labels are the SNOMED CT codes of ``#Dx`` in header order, named with the table shipped in
  ``open_clip_ecg/resources/snomed_ct_dx.csv`` (the Challenge 2020 + 2021 mappings). A code
  missing from the table keeps the code itself as its name and is counted in
  :attr:`CinCReader.unknown_dx_codes` and logged once per pass; it is never dropped.
- The Challenge has no patient ids: ``patient_id`` is the record name, so splits are per record
  (PTB-XL-derived ``HR*`` records may share patients without that being visible).
- The Challenge has no report text: ``report`` is ``""`` (the shard writer composes text from the
  labels).
- The four Georgia records of the 2020 release whose header names ``E00009.mat`` in the record
  line load through the header repair in :func:`wfdb_io.read_header`.
- A header that cannot be parsed does not stop the listing: its entry is yielded with no labels
  and ``load`` raises ``RecordError('unreadable')``, so the writer counts it.
"""
from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, Optional

from ..record import ECGRecord, RecordEntry, RecordError
from .wfdb_io import header_comments, read_header, read_wfdb

_LOGGER = logging.getLogger(__name__)

SNOMED_CT_TABLE = Path(__file__).resolve().parents[2] / "resources" / "snomed_ct_dx.csv"

_SEX = {"male": "male", "m": "male", "female": "female", "f": "female"}


def load_snomed_ct_names(path=SNOMED_CT_TABLE) -> Dict[str, str]:
    """SNOMED CT code -> diagnosis name from a Challenge mapping table ('#' lines are comments)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {row["snomed_code"].strip(): row["dx_name"].strip() for row in rows}


def _age(value: Optional[str]) -> Optional[float]:
    try:
        age = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(age) or age < 0 else age


class CinCReader:
    """Challenge 2020/2021 records under `path`; record ids ``cinc_{NAME}``."""

    def __init__(self, path):
        self.root = Path(path)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: not a folder of Challenge .hea/.mat records")
        self.dx_names = load_snomed_ct_names()
        self.unknown_dx_codes: Counter = Counter()

    def entries(self) -> Iterator[RecordEntry]:
        self.unknown_dx_codes = Counter()
        headers = sorted(self.root.rglob("*.hea"))
        for hea in headers:
            base = str(hea.with_suffix(""))
            name = hea.stem
            record_id = f"cinc_{name}"
            try:
                comments = header_comments(read_header(base, record_id))
            except RecordError as err:
                yield RecordEntry(record_id=record_id, path=base, patient_id=name,
                                  metadata={"header_error": err.detail})
                continue
            codes = [c.strip() for c in comments.get("Dx", "").split(",") if c.strip()]
            self.unknown_dx_codes.update(c for c in codes if c not in self.dx_names)
            yield RecordEntry(
                record_id=record_id,
                path=base,
                patient_id=name,
                report="",
                labels=list(dict.fromkeys(codes)),  # header order, duplicates removed
                metadata={
                    "age": _age(comments.get("Age")),
                    "sex": _SEX.get(comments.get("Sex", "").strip().lower()),
                    "source_folder": os.path.relpath(hea.parent, self.root),
                },
            )
        if self.unknown_dx_codes:
            _LOGGER.warning("%s: %d #Dx codes not in %s kept with the code as name: %s", self.root,
                            sum(self.unknown_dx_codes.values()), SNOMED_CT_TABLE.name,
                            dict(self.unknown_dx_codes))

    def load(self, entry: RecordEntry) -> ECGRecord:
        if "header_error" in entry.metadata:
            raise RecordError("unreadable", entry.path + ".hea", entry.metadata["header_error"],
                              entry.record_id)
        signal, fs, lead_names = read_wfdb(entry.path, entry.record_id)
        return ECGRecord(entry=entry, signal=signal, sampling_rate=fs, lead_names=lead_names)

    def label_names(self) -> Dict[str, str]:
        """The shipped table plus every unknown code seen by `entries()` (named by its code)."""
        names = dict(self.dx_names)
        names.update({code: code for code in self.unknown_dx_codes})
        return names
