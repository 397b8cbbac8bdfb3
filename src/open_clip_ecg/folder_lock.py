"""One writer per output folder: ``with folder_lock(folder, "shards"): ...``.

The lock is an ``fcntl.flock`` on ``FOLDER/.lock``, taken without waiting: a second writer fails at
once with :class:`FolderLockedError` naming the holder (pid, host, command) that the first one
wrote into the file. The kernel drops a flock when its process dies, so the lock of a killed run
never blocks the next one; the file itself is removed on release. flock is per host on most
network file systems: two hosts writing one NFS folder are not excluded.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = ".lock"


class FolderLockedError(ValueError):
    """Another live process is writing the folder."""


@contextlib.contextmanager
def folder_lock(directory, command: str) -> Iterator[None]:
    """Hold the write lock of `directory` (created if missing) for the ``with`` block."""
    path = Path(directory) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 1024, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FolderLockedError(f"{directory} is being written by {holder}: wait for it to finish, or write "
                                    "to another folder") from None
        try:  # the holder we waited on may have removed the file: lock the file that is there now
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{command} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # while still held, so no one locks a file about to vanish
        os.close(fd)
