"""Index rows that are not valid text: read with ``errors="surrogateescape"`` so one bad byte does
not end a run, found per row, and turned into a ``bad_encoding`` skip that names file, line, record
and column (:class:`..record.RecordEntry` ``defect``)."""
from __future__ import annotations

import re
from typing import Mapping, Optional, Tuple

_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes kept by errors="surrogateescape"


def readable(value) -> str:
    """Text with undecodable bytes shown as U+FFFD (for ids and messages)."""
    text = str(value or "").strip()
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def undecodable_column(row: Mapping) -> Optional[Tuple[str, int]]:
    """(column, first bad byte) of the first value (a string or a list of strings) holding
    undecodable bytes, or None."""
    for column, value in row.items():
        for text in (value if isinstance(value, list) else [value]):
            match = _UNDECODABLE.search(text) if isinstance(text, str) else None
            if match:
                return str(column), ord(match.group()) - 0xDC00
    return None


def bad_encoding_defect(where: str, column: str, byte: int, encoding: str) -> Tuple[str, str]:
    """The (reason, detail) of a row that is not valid `encoding`."""
    return ("bad_encoding", f"{where}: column {column!r} is not valid {encoding} (byte 0x{byte:02x}); if the whole "
                            "file uses another encoding, re-encode it (csv: pass --encoding, e.g. latin-1)")
