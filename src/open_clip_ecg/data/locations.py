"""Where a shard is, and how the files of its folder are found and read: on this machine or
through whatever webdataset opens the shard with.

A shard url is a local path, a ``file:`` url (webdataset's reading: the url's path is a local
path), or anything else webdataset's ``gopen`` opens: ``pipe:CMD`` (the command's standard output),
``http(s)://`` (curl), ``gs://``, ``hf://``, ``ais://``, ...

The folder files (``manifest.json``, ``vocabulary.json``, ``sizes.json``; :mod:`.manifest`) of a
remote shard are read through the same opener: the url of ``manifest.json`` beside
``pipe:aws s3 cp s3://bucket/ecg/train-000007.tar -`` is that url with the shard's file name
(its last ``NAME.tar``) replaced, ``pipe:aws s3 cp s3://bucket/ecg/manifest.json -``. So whatever
reaches the shards (credentials, a proxy, ``GOPEN_REWRITE``) reaches their folder's declarations,
with no local copy and no extra option. Remote folder files are read once per process: a shard
folder does not change under a run reading it. What cannot be read is one :class:`ShardReadError`
naming the url and why.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.gopen import gopen, rewrite_url

# A shard's file name inside a url or command: the last `NAME.tar` not followed by more of a name.
SHARD_FILE = re.compile(r"[^/\s'\"=]+\.tar(?=$|[\s'\"?#;|&)])")
# curl's exit statuses (webdataset opens http(s), sftp, ftps and scp with `curl -f -s`, which prints nothing)
CURL_STATUS = {6: "could not resolve the host", 7: "could not connect", 22: "the server answered with an "
               "HTTP error such as 404", 28: "timed out", 35: "TLS handshake failed", 56: "the connection broke"}


class ShardReadError(ValueError):
    """A shard, or a file of its folder, that cannot be read (missing, unreachable, refused)."""


def is_remote(url: str) -> bool:
    """True when webdataset opens `url` with something else than a local ``open``."""
    return urlparse(str(url)).scheme not in ("", "file")


def local_path(url: str) -> str:
    """The local path of a local shard url (a ``file:`` url as webdataset reads it, or a path)."""
    url = str(url)
    parsed = urlparse(url)
    return url2pathname(parsed.path) if parsed.scheme == "file" else url


def _shard_file_span(url: str):
    matches = list(SHARD_FILE.finditer(url))
    if not matches:
        raise ShardReadError(f"cannot find the shard's file name (NAME.tar) in {url!r}: the files of its "
                             "folder (manifest.json, vocabulary.json, sizes.json) are found by replacing it")
    return matches[-1].span()


def shard_file_name(url: str) -> str:
    """The file name of a shard: ``train-000007.tar`` for a path or a url that reads it."""
    if not is_remote(url):
        return os.path.basename(local_path(url))
    start, end = _shard_file_span(url)
    return url[start:end]


def beside(url: str, name: str) -> str:
    """Where the file `name` of the folder of shard `url` is, for the same opener."""
    if not is_remote(url):
        return os.path.join(os.path.dirname(os.path.abspath(local_path(url))), name)
    start, end = _shard_file_span(url)
    return url[:start] + name + url[end:]


def shard_folder(url: str) -> str:
    """The folder of shard `url`, as errors name it and as shards are grouped by folder: a local
    folder's absolute path, or the url without the shard's file name (``http://host/ecg/``,
    ``pipe:aws s3 cp s3://bucket/ecg/ -``)."""
    return os.path.dirname(beside(url, "x")) if not is_remote(url) else beside(url, "")


def read_beside(url: str, name: str, limit: int) -> bytes:
    """The bytes of the folder file `name` beside shard `url` (at most `limit`, else an error).
    A missing local file is a FileNotFoundError; a remote one that cannot be read, a ShardReadError."""
    where = beside(url, name)
    if not is_remote(url):
        with open(where, "rb") as f:
            data = f.read(limit + 1)
    else:
        data = read_remote(where, limit)
    if len(data) > limit:
        raise ShardReadError(f"{where} is larger than {limit} bytes")
    return data


@functools.lru_cache(maxsize=256)
def read_remote(url: str, limit: int) -> bytes:
    """A remote file's bytes (up to ``limit + 1``), opened as webdataset opens shards. ``pipe:``
    commands run in the shell as webdataset runs them, with their error output kept for the message."""
    url = rewrite_url(url)
    if urlparse(url).scheme == "pipe":
        try:
            done = subprocess.run(url[len("pipe:"):], shell=True, stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise ShardReadError(f"cannot run {url!r}: {e}") from None
        if done.returncode != 0:
            said = done.stderr.decode("utf-8", "replace").strip().splitlines()
            raise ShardReadError(f"cannot read {url!r}: the command exited with status {done.returncode}"
                                 + (f" ({said[-1].strip()})" if said else ""))
        return done.stdout[:limit + 1]
    try:
        with gopen(url, "rb") as stream:
            return stream.read(limit + 1)
    except (OSError, ValueError) as e:
        raise ShardReadError(f"cannot read {url!r}: {why_unreadable(e, url)}") from None


def why_unreadable(error: Exception, url: str) -> str:
    """One line saying why webdataset's opener could not read `url` (its errors carry the command
    line and the stream's repr; curl, which webdataset runs silently, only has exit statuses)."""
    text = str(error.args[0]) if error.args else type(error).__name__
    if isinstance(error, OSError) and error.strerror:
        text = error.strerror
    if isinstance(error, FileNotFoundError) and error.filename in ("curl", "gsutil", "ais"):
        return f"{error.filename} is not installed (webdataset opens {urlparse(url).scheme}: urls with it)"
    if "no gopen handler defined" in text:
        return (f"webdataset has no opener for {urlparse(url).scheme}: urls; read it through a command, "
                "e.g. 'pipe:aws s3 cp s3://bucket/ecg/train-000000.tar -'")
    status = re.search(r": exit (\d+) \(", text)  # webdataset's Pipe: "(([curl, ...],), {...}): exit 22 (read) {}"
    code = int(status.group(1)) if status else None
    pipe = next((a for a in error.args if hasattr(a, "proc")), None)  # a shard's stream, when the tar broke
    if code is None and pipe is not None:
        try:
            code = pipe.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        code = None if code in (0, 141) else code  # 141: the reader closed the pipe early
    if code is not None:
        if urlparse(url).scheme == "pipe":
            return f"the command exited with status {code}"
        program = {"gs": "gsutil", "ais": "ais"}.get(urlparse(url).scheme, "curl")
        return (f"{program} exited with status {code}"
                + (f": {CURL_STATUS[code]}" if program == "curl" and code in CURL_STATUS else ""))
    return text.split(" @ <")[0].splitlines()[0]
