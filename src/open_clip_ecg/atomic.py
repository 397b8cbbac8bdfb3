"""Atomic file writes: write to a temporary sibling, then rename, so a crash never leaves half a file.

The one home of file writing for every module and script: :func:`write_atomic` for writers that
take a path (plots, ``torch.save``, safetensors), :func:`write_text_atomic`,
:func:`write_json_atomic` and :func:`write_csv_atomic` for text, JSON and CSV.

Temporaries are named ``NAME.tmpPID`` (PID of the writing process). A process killed between write
and rename leaves one behind; :func:`remove_stale_temps` deletes those whose process is gone, so
re-runs and resumes leave a folder equal to that of an uninterrupted run.

Every file gets the permissions the user's umask gives a new file (``0o666 & ~umask``), whatever
the writer used: safetensors creates its files ``0o600``, which would hide exported weights from
the user's group.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Sequence

TEMP_SUFFIX = re.compile(r"^(?P<name>.+)\.tmp(?P<pid>\d+)$")


def temp_path(path) -> str:
    """The temporary sibling this process writes `path` through."""
    return f"{os.fspath(path)}.tmp{os.getpid()}"


def current_umask() -> int:
    """This process's umask, read without changing it (Linux reports it in /proc/self/status;
    elsewhere it is set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path, write: Callable[[str], object]) -> None:
    """Write through ``write(tmp_path)``, then move into place (os.replace is atomic on POSIX).

    The temporary is fsynced before the rename: otherwise a power loss soon after could leave the
    name pointing at a file whose data never reached the disk."""
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:  # `write` has closed its own file: fsync through a new descriptor
            os.fsync(f.fileno())
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


def write_csv_atomic(path, columns: Sequence[str], rows: Iterable[Mapping]) -> None:
    """Atomically write `rows` (dicts with the keys `columns`) as CSV under a `columns` header."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def write_json_atomic(path, value, *, final_newline: bool = False, **dump_kwargs) -> None:
    """Atomically write `value` as UTF-8 JSON, ``json.dumps(value, **dump_kwargs)`` (plus ``\\n``
    with `final_newline`), so each caller keeps its file's exact bytes."""
    write_text_atomic(path, json.dumps(value, **dump_kwargs) + ("\n" if final_newline else ""))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(directory) -> List[str]:
    """Delete ``NAME.tmpPID`` files in `directory` (written by :func:`write_atomic`) whose process is
    no longer running; returns their names. Temporaries of live processes are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for path in sorted(directory.iterdir()):
        match = TEMP_SUFFIX.match(path.name)
        if match and path.is_file() and not _process_alive(int(match.group("pid"))):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed
