"""Records -> a shard folder: deterministic, atomic, resumable, never silently lossy.

:func:`write_shards` lists a reader's records, assigns splits (:mod:`.splits`), fixes label ids
(:mod:`.vocabulary`), loads and preprocesses each record (:mod:`.preprocess`), encodes it
(:func:`.shard_format.encode_sample`) and writes ``{split}-NNNNNN.tar`` shards, then the folder
files (:mod:`.manifest`): ``vocabulary.json``, ``sizes.json`` and, last, ``manifest.json``.

Determinism: records are written in the reader's order, split by split; tar members have fixed
mtime/uid/gid/names/mode; JSON is written with sorted keys. Loading and preprocessing run in a
``multiprocessing`` pool (``imap``, ordered) and only the main process writes, so the bytes do not
depend on ``workers``. Memory: signals are streamed, at most ``4 * workers * 4`` encoded records
are in flight; what grows with the collection is the list of record entries (ids, reports, labels,
metadata: about 1 KB per record), read once so that splits and the vocabulary are known up front.

One writer at a time: the folder is locked (:mod:`open_clip_ecg.folder_lock`) while a job writes
it; a second ``shards`` run on it fails naming the holder.

Atomicity and resuming: each shard is written to ``NAME.tar.tmpPID`` then renamed. After every
completed shard, ``progress.json`` records the shard's sha256, sample count, skipped records and
label counts, under a fingerprint of the job (source, options, every listed record). A re-run
with the same job keeps every recorded shard whose file still has its checksum and continues
after the last one; anything else is rewritten. Resuming trusts that signal files did not change
in between (delete the output folder to start over). Shard files of the ``{split}-NNNNNN.tar``
form that the finished job did not produce are deleted, so globs never pick up stale shards.
A re-run of a job that already finished (``manifest.json`` holds its fingerprint and every
shard still has its checksum) returns that manifest and touches nothing, so a training reading
the folder meanwhile is safe.

A folder that holds the complete shards of another job (its ``manifest.json``) keeps them until
the new job is complete: the new shards are written (and resumed) in ``FOLDER/.next/``, then moved
in by renames, which need no space, so a full disk or a crash midway leaves the previous set whole.

Bad records (see ``record.SKIP_REASONS``) are skipped, listed in the manifest and summarised by
the ``shards`` command; with ``strict`` the first one raises :class:`RecordError` naming its path
and reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import threading
from collections import Counter
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
from tqdm import tqdm

from ..atomic import remove_stale_temps, temp_path
from ..folder_lock import folder_lock
from ..leads import STANDARD_LEADS
from .manifest import MANIFEST_FILE, SIZES_FILE, build_manifest, write_folder_json
from .preprocess import MISSING_LEAD_POLICIES, preprocess_record, sampling_rate_problem
from .readers import Reader
from .rhythm import BEAT_DETECTOR, detect_beats
from .record import RecordEntry, RecordError
from .shard_format import (
    MANIFEST_VERSION,
    SHARD_NAME,
    SPLITS,
    encode_sample,
    json_bytes,
    sample_key,
    shard_name,
)
from .splits import SPLIT_METHODS, assign_splits, resolve_split_method
from .text import TEXT_MODES, make_text
from .vocabulary import VOCABULARY_FILE, label_ids

PROGRESS_FILE = "progress.json"
NEXT_DIR = ".next"  # the next job's shards while the folder holds another job's complete set
_CHUNK = 4  # records per worker task


@dataclass
class ShardOptions:
    """What to write. ``workers``, ``strict`` and ``progress`` change how, never what."""

    sampling_rate: float = 500.0
    seconds: float = 10.0
    min_seconds: Optional[float] = None      # None: records must be at least `seconds` long
    missing_leads: str = "error"             # see preprocess.MISSING_LEAD_POLICIES
    split_by: Optional[str] = None           # None: fold / column / patient, see .splits
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    val_folds: Sequence[int] = (9,)
    test_folds: Sequence[int] = (10,)
    text: str = "report"
    shard_size: int = 1000
    beats: bool = False                      # store each record's beats (rhythm.BEAT_DETECTOR) for the RR channels
    workers: int = 1
    strict: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.sampling_rate <= 0 or self.seconds <= 0:
            raise ValueError(f"sampling rate and seconds must be positive, got {self.sampling_rate}, {self.seconds}")
        if sampling_rate_problem(self.sampling_rate):
            raise ValueError(f"sampling rate {sampling_rate_problem(self.sampling_rate)}")
        if self.split_by is not None and self.split_by not in SPLIT_METHODS:
            raise ValueError(f"unknown split method {self.split_by!r}; expected one of {SPLIT_METHODS}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"need 0 <= val/test fractions with val + test < 1, got "
                             f"{self.val_fraction} + {self.test_fraction}")
        if self.text not in TEXT_MODES:
            raise ValueError(f"unknown text mode {self.text!r}; expected one of {TEXT_MODES}")
        if self.missing_leads not in MISSING_LEAD_POLICIES:
            raise ValueError(f"unknown missing-lead policy {self.missing_leads!r}; expected one of "
                             f"{MISSING_LEAD_POLICIES}")
        if self.shard_size <= 0 or self.workers <= 0:
            raise ValueError(f"shard size and workers must be positive, got {self.shard_size}, {self.workers}")

    def output_options(self) -> dict:
        """The options that determine the output (recorded in the manifest and the fingerprint)."""
        options = dataclasses.asdict(self)
        for execution_only in ("workers", "strict", "progress"):
            options.pop(execution_only)
        options["val_folds"], options["test_folds"] = list(self.val_folds), list(self.test_folds)
        options["beats"] = BEAT_DETECTOR if self.beats else None  # readers compare it with their detector
        return options


# --------------------------------------------------------------------------------------------
# Encoding one record (runs in the workers)
# --------------------------------------------------------------------------------------------

@dataclass
class SampleEncoder:
    """Entry -> ('sample', key, members, codes) or ('skip', skip record). Picklable."""

    reader: Reader
    options: ShardOptions
    label_names: Dict[str, str]
    ids: Dict[str, int]
    root: Optional[str]

    def __call__(self, item: Tuple[RecordEntry, str]):
        entry, split = item
        if entry.defect is not None:
            reason, detail = entry.defect
            return "skip", _skip_record(entry, split, reason, entry.path, detail)
        try:
            text = make_text(entry, self.label_names, self.options.text)
            record = self.reader.load(entry)
            ecg = preprocess_record(record, self.options.sampling_rate, self.options.seconds,
                                    missing_leads=self.options.missing_leads, min_seconds=self.options.min_seconds)
        except RecordError as err:
            return "skip", _skip_record(entry, split, err.reason, err.path, err.detail)
        except Exception as err:  # a reader/library failure on one file must not end a long run
            return "skip", _skip_record(entry, split, "unreadable", entry.path, f"{type(err).__name__}: {err}")
        codes = sorted(set(entry.labels), key=lambda code: self.ids[code])
        meta = dict(entry.metadata)  # made JSON-safe once, by json_bytes in encode_sample
        meta.update(record_id=entry.record_id, patient_id=entry.patient_id, source_path=self._relative(entry.path),
                    sampling_rate=self.options.sampling_rate, original_sampling_rate=record.sampling_rate,
                    leads=list(STANDARD_LEADS), split=split, fold=entry.fold, report=entry.report,
                    age=meta.get("age"), sex=meta.get("sex"))
        # the beats of exactly what a reader decodes (float16 -> float32), so stored and read-time beats agree
        beats = detect_beats(ecg.astype(np.float32), self.options.sampling_rate) if self.options.beats else None
        members = encode_sample(ecg, text, [self.ids[c] for c in codes], codes, meta, beats)
        return "sample", sample_key(entry.record_id), members, codes

    def _relative(self, path: str) -> str:
        """Source path relative to the reader's root when inside it (portable, location-free)."""
        if self.root:
            relative = os.path.relpath(os.path.abspath(path), self.root)
            if not relative.startswith(".."):
                return Path(relative).as_posix()
        return path


def _skip_record(entry: RecordEntry, split: str, reason: str, path: str, detail: str) -> dict:
    return {"record_id": entry.record_id, "path": str(path), "reason": reason, "detail": detail, "split": split}


_WORKER_ENCODER: Optional[SampleEncoder] = None


def _init_worker(encoder: SampleEncoder) -> None:
    global _WORKER_ENCODER
    _WORKER_ENCODER = encoder


def _encode_in_worker(item):
    return _WORKER_ENCODER(item)


class _BoundedFeed:
    """Feeds items to ``Pool.imap`` with at most ``limit`` unconsumed results in flight."""

    def __init__(self, items: Iterable, limit: int):
        self.items, self.slots, self.stopped = items, threading.Semaphore(limit), threading.Event()

    def __iter__(self):
        for item in self.items:
            while not self.slots.acquire(timeout=0.1):
                if self.stopped.is_set():
                    return
            yield item

    def consumed(self) -> None:
        self.slots.release()


def _encoded(encoder: SampleEncoder, items: List, pool, workers: int) -> Iterator:
    """Encoder results in item order, from the worker pool when there is one."""
    if pool is None:
        yield from map(encoder, items)
        return
    feed = _BoundedFeed(items, 4 * workers * _CHUNK)
    try:
        for result in pool.imap(_encode_in_worker, feed, chunksize=_CHUNK):
            feed.consumed()
            yield result
    finally:
        feed.stopped.set()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

_COPY_BUFFER = 1 << 20  # a member in one copy (tarfile copies 16 KiB at a time by default)


class _ShardFile:
    """One tar being written to ``NAME.tar.tmpPID``; :meth:`finish` fsyncs and renames it.

    Hand-written rather than ``webdataset.TarWriter`` (1.0.2): TarWriter writes a sample's members
    in sorted name order and ignores its ``format`` argument (POSIX headers instead of GNU), so
    adopting it would change the bytes and sha256 of every shard against existing shard folders and
    their resume checksums; this writes members in :data:`.shard_format.MEMBERS` order, GNU format,
    with fixed mtime, owner and mode.
    """

    def __init__(self, path: Path):
        self.path, self.tmp = path, Path(temp_path(path))
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.GNU_FORMAT,
                                copybufsize=_COPY_BUFFER)
        self.n = 0

    def add(self, key: str, members: Dict[str, bytes]) -> None:
        with self._naming_errors():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size, info.mtime, info.mode = len(data), 0, 0o444
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                self.tar.addfile(info, io.BytesIO(data))
        self.n += 1

    def finish(self) -> str:
        with self._naming_errors():
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return _sha256(self.path)

    @contextmanager
    def _naming_errors(self):
        """Write errors (a full disk: ENOSPC) name the file being written."""
        try:
            yield
        except OSError as err:
            if err.filename is None:
                err.filename = str(self.tmp)
            raise

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fingerprint(source: dict, options: dict, entries: Sequence[RecordEntry], splits: Sequence[str]) -> str:
    digest = hashlib.sha256(json_bytes({"version": MANIFEST_VERSION, "source": source, "options": options}))
    for entry, split in zip(entries, splits):
        # fields one level deep (asdict's deep copies cost more than the hashing; the bytes are the same)
        digest.update(json_bytes([{f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}, split]))
    return digest.hexdigest()


def _resumable_shards(output_dir: Path, fingerprint: str) -> Dict[str, List[dict]]:
    """Completed shards of an interrupted run of the same job that still verify, per split."""
    path = output_dir / PROGRESS_FILE
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(progress, dict) or progress.get("fingerprint") != fingerprint:
        return {}
    kept = {}
    for split in SPLITS:
        kept[split] = []
        for shard in progress.get("shards", {}).get(split, []):
            file = output_dir / shard["name"]
            if not file.is_file() or _sha256(file) != shard["sha256"]:
                break
            kept[split].append(shard)
    return kept


def _finished_job(output_dir: Path, fingerprint: str) -> Optional[dict]:
    """The manifest of a finished run of the same job whose folder is intact, else None."""
    try:
        manifest = json.loads((output_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return None
    if not all((output_dir / name).is_file() for name in (SIZES_FILE, VOCABULARY_FILE)):
        return None
    for shard in manifest.get("shards", []):
        file = output_dir / shard["name"]
        if not file.is_file() or _sha256(file) != shard["sha256"]:
            return None
    return manifest


def write_shards(reader: Reader, output_dir, options: Optional[ShardOptions] = None,
                 source: Optional[dict] = None) -> dict:
    """Write the shards, vocabulary, sizes and manifest of ``reader``'s records; returns the manifest.

    ``reader`` follows :class:`.readers.Reader`; ``source`` describes it in the manifest (default:
    its class and root).
    """
    options = options or ShardOptions()
    options.validate()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    root = getattr(reader, "root", None)
    root = os.path.abspath(root) if root is not None else None
    source = source or {"reader": f"{type(reader).__module__}.{type(reader).__qualname__}", "input": root}

    entries = list(reader.entries())
    if not entries:
        raise ValueError(f"{source.get('input')}: the reader lists no records")
    keys = Counter(sample_key(e.record_id) for e in entries)
    clashes = [k for k, n in keys.items() if n > 1]
    if clashes:
        raise ValueError(f"record ids are not unique as sample keys (after replacing '.', '/' and spaces): "
                         f"{clashes[:5]}")
    splits = assign_splits(entries, options)
    output_options = dict(options.output_options(), split_by=resolve_split_method(entries, options.split_by))
    ids = label_ids(code for e in entries for code in e.labels)
    label_names = reader.label_names()
    fingerprint = _fingerprint(source, output_options, entries, splits)
    job = _Job(reader, options, source, entries, splits, output_options, ids, label_names, root, fingerprint)
    with folder_lock(output_dir, "open-clip-ecg shards"):
        finished = _finished_job(output_dir, fingerprint)
        if finished is not None:
            if options.progress:
                print(f"{output_dir}: already complete for this job (fingerprint and shard checksums match); "
                      "nothing rewritten", file=sys.stderr)
            return finished
        remove_stale_temps(output_dir)  # temporaries of killed runs
        next_dir = output_dir / NEXT_DIR
        if not _holds_another_job(output_dir, fingerprint):
            shutil.rmtree(next_dir, ignore_errors=True)  # the next set of a job that is not this one
            return _write_folder(output_dir, job)
        manifest = _finished_job(next_dir, fingerprint) or _write_folder(next_dir, job)  # complete, not moved in
        _move_in(next_dir, output_dir, manifest)
        return manifest


@dataclass
class _Job:
    """What :func:`write_shards` writes, resolved from the reader and the options."""

    reader: Reader
    options: ShardOptions
    source: dict
    entries: List[RecordEntry]
    splits: List[str]
    output_options: dict
    ids: Dict[str, int]
    label_names: Dict[str, str]
    root: Optional[str]
    fingerprint: str


def _holds_another_job(output_dir: Path, fingerprint: str) -> bool:
    """Whether the folder holds another job's manifest (a set to keep until this job is complete)."""
    try:
        manifest = json.loads((output_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint


def _move_in(next_dir: Path, output_dir: Path, manifest: dict) -> None:
    """Replace the folder's shard set by the complete one in `next_dir` (renames only)."""
    (output_dir / MANIFEST_FILE).unlink(missing_ok=True)  # from here the folder is incomplete until the end
    produced = {shard["name"] for shard in manifest["shards"]}
    for name in sorted(produced):
        os.replace(next_dir / name, output_dir / name)
    _remove_other_shards(output_dir, produced)
    (output_dir / PROGRESS_FILE).unlink(missing_ok=True)
    for name in (VOCABULARY_FILE, SIZES_FILE, MANIFEST_FILE):  # the manifest last: it marks a complete folder
        os.replace(next_dir / name, output_dir / name)
    shutil.rmtree(next_dir)


def _remove_other_shards(output_dir: Path, produced: Set[str]) -> None:
    """Delete ``{split}-NNNNNN.tar`` files the job did not produce, so globs never pick up stale shards."""
    for path in output_dir.iterdir():
        if SHARD_NAME.match(path.name) and path.name not in produced:
            path.unlink()


def _write_folder(output_dir: Path, job: _Job) -> dict:
    """Write (or resume) `job` into `output_dir`: shards, then vocabulary, sizes and manifest."""
    reader, options, source, entries, splits, fingerprint = (job.reader, job.options, job.source, job.entries,
                                                             job.splits, job.fingerprint)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [MANIFEST_FILE, SIZES_FILE, VOCABULARY_FILE] + [p.name for p in output_dir.glob("*.tar.tmp")]:
        (output_dir / stale).unlink(missing_ok=True)
    remove_stale_temps(output_dir)  # progress/manifest temporaries of a killed run
    done = _resumable_shards(output_dir, fingerprint)
    progress = {"fingerprint": fingerprint, "shards": {split: list(done.get(split, [])) for split in SPLITS}}
    encoder = SampleEncoder(reader, options, job.label_names, job.ids, job.root)
    trailing_skips: Dict[str, List[dict]] = {}

    with ExitStack() as stack:
        pool = None
        if options.workers > 1:  # one pool for all splits; terminated on exit
            pool = stack.enter_context(multiprocessing.Pool(options.workers, _init_worker, (encoder,)))
        bar = stack.enter_context(tqdm(total=len(entries), desc="shards", unit="rec", disable=not options.progress,
                                       file=sys.stderr))
        bar.skipped = 0
        for split in SPLITS:
            items = [(e, s) for e, s in zip(entries, splits) if s == split]
            written = progress["shards"][split]
            start = written[-1]["end"] if written else 0
            bar.update(start)
            trailing_skips[split] = _write_split(output_dir, split, items, start, len(written), encoder, pool,
                                                 options, progress, bar)

    produced = {shard["name"] for split in SPLITS for shard in progress["shards"][split]}
    _remove_other_shards(output_dir, produced)

    manifest = build_manifest(source, job.output_options, len(entries), progress["shards"], trailing_skips, job.ids,
                              job.label_names, fingerprint)
    write_folder_json(output_dir / VOCABULARY_FILE, manifest["vocabulary"])
    write_folder_json(output_dir / SIZES_FILE, {s["name"]: s["samples"] for s in manifest["shards"]})
    write_folder_json(output_dir / MANIFEST_FILE, manifest)  # last: its presence marks a complete folder
    (output_dir / PROGRESS_FILE).unlink(missing_ok=True)
    return manifest


def _write_split(output_dir: Path, split: str, items: List, start: int, shard_index: int,
                 encoder: SampleEncoder, pool, options: ShardOptions, progress: dict, bar) -> List[dict]:
    """Write ``items[start:]`` of one split; completed shards go into ``progress`` (saved after each).
    Returns the skipped records after the last completed shard."""
    shard: Optional[_ShardFile] = None
    skips: List[dict] = []
    codes: Counter = Counter()
    try:
        with closing(_encoded(encoder, items[start:], pool, options.workers)) as results:
            for index, result in enumerate(results, start=start):
                bar.update(1)
                if result[0] == "skip":
                    skip = result[1]
                    if options.strict:
                        raise RecordError(skip["reason"], skip["path"], skip["detail"], skip["record_id"])
                    skips.append(dict(skip, index=index))
                    bar.skipped += 1
                    bar.set_postfix(skipped=bar.skipped)
                    continue
                _, key, members, sample_codes = result
                if shard is None:
                    shard = _ShardFile(output_dir / shard_name(split, shard_index))
                shard.add(key, members)
                codes.update(sample_codes)
                if shard.n == options.shard_size:
                    _complete(shard, split, index + 1, skips, codes, progress, output_dir)
                    shard, skips, codes, shard_index = None, [], Counter(), shard_index + 1
    except BaseException:
        if shard is not None:
            shard.abort()
        raise
    if shard is not None:  # the last samples, and any skipped records after them
        _complete(shard, split, len(items), skips, codes, progress, output_dir)
        skips = []
    return skips


def _complete(shard: _ShardFile, split: str, end: int, skips: List[dict], codes: Counter, progress: dict,
              output_dir: Path) -> None:
    progress["shards"][split].append({"name": shard.path.name, "split": split, "samples": shard.n,
                                      "sha256": shard.finish(), "end": end, "skipped": skips,
                                      "label_counts": dict(sorted(codes.items()))})
    write_folder_json(output_dir / PROGRESS_FILE, progress)
