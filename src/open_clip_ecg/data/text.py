"""The text paired with each ECG in the shards (``--text report|labels|both``).

- ``report``: the record's free-text report as written. Sources differ in language: PTB-XL
  reports are mostly German (some English and Swedish), MIMIC-IV-ECG machine reports and the
  synthetic reports are English. A record without a report is skipped with reason
  ``'no_report'``.
- ``labels``: one deterministic English sentence built from the English names of the record's
  label codes, e.g. ``"ECG with first degree AV block and sinus bradycardia."`` (names sorted
  case-insensitively, no randomness, so the same label set always gives the same text). A record
  without labels is skipped with reason ``'no_labels'``.
- ``both``: the report followed by the label sentence; either part may be missing, a record with
  neither is skipped with reason ``'no_report'``.
"""
from __future__ import annotations

from typing import Iterable, Mapping

from .record import RecordEntry, RecordError

TEXT_MODES = ("report", "labels", "both")


def compose_label_text(names: Iterable[str]) -> str:
    """``"ECG with a, b and c."`` from English label names (sorted, duplicates removed)."""
    cleaned = sorted({name.strip().rstrip(".") for name in names if name.strip()}, key=lambda n: (n.casefold(), n))
    if not cleaned:
        raise ValueError("cannot compose a label text from an empty label set")
    if len(cleaned) == 1:
        findings = cleaned[0]
    else:
        findings = ", ".join(cleaned[:-1]) + " and " + cleaned[-1]
    return f"ECG with {findings}."


def make_text(entry: RecordEntry, label_names: Mapping[str, str], mode: str) -> str:
    """The shard text of one record for ``mode``; RecordError when the mode's text is missing.

    ``label_names`` maps codes to English names; codes without a name stand for themselves.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {mode!r}; expected one of {TEXT_MODES}")
    report = (entry.report or "").strip()
    label_text = compose_label_text(label_names.get(code, code) for code in entry.labels) if entry.labels else ""
    if mode == "report" and not report:
        raise RecordError("no_report", entry.path, "--text report needs a report and the record has none",
                          entry.record_id)
    if mode == "labels" and not label_text:
        raise RecordError("no_labels", entry.path, "--text labels needs labels and the record has none",
                          entry.record_id)
    if mode == "both" and not (report or label_text):
        raise RecordError("no_report", entry.path, "--text both needs a report or labels and the record has neither",
                          entry.record_id)
    parts = {"report": [report], "labels": [label_text], "both": [report, label_text]}[mode]
    return " ".join(part for part in parts if part)
