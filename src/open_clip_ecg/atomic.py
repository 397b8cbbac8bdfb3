"""Atomic file writes: write to a temporary sibling, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import os
from typing import Callable


def write_atomic(path, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)``, then move into place (os.replace is atomic on POSIX)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text: str) -> None:
    """Atomically write UTF-8 text."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    write_atomic(path, write)
