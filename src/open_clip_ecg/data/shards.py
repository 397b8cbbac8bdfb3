"""ECG collection -> webdataset shards: deterministic, atomic, resumable, never silently lossy.

``open-clip-ecg shards --format {ptbxl,cinc,mimic-iv-ecg,csv} --input PATH --output DIR`` (or
:func:`write_shards` from Python) writes, in DIR:

- ``{split}-{NNNNNN}.tar`` for split in train/val/test; each sample holds ``__key__`` (record id
  with '.', '/' and whitespace replaced by '_'), ``ecg.npy`` (float16 ``[12, T]`` mV, leads in
  ``STANDARD_LEADS`` order), ``txt`` (see :mod:`.text`), ``labels.json`` (``{"ids", "codes"}``)
  and ``meta.json``;
- ``vocabulary.json`` (:mod:`.vocabulary`), open_clip's ``sizes.json`` and ``manifest.json``
  (source, options, counts, vocabulary, every skipped record with its reason, sha256 per shard).
  ``manifest.json`` is written last: its presence means the shard set is complete.

Splits never put one patient on two sides:

- ``fold``: source folds (PTB-XL ``strat_fold``): ``--val-folds`` -> val, ``--test-folds`` -> test,
  the rest -> train (default when every record has a fold).
- ``column``: the source's own split (CSV ``split`` column; default when every record has one).
- ``patient`` (default otherwise): a patient goes to test when ``u < test_fraction``, to val
  when ``u < test_fraction + val_fraction``, else train, with ``u`` the first 8 bytes of
  ``sha256(f"{seed}:{patient_id}")`` read as a fraction of 2**64. A patient's split never
  depends on the other records, so adding records never moves anyone; fractions are met in
  expectation.
- ``random``: patients (sorted) are permuted with ``numpy.random.default_rng(seed)`` and the
  first ``round(test_fraction * n)`` go to test, the next ``round(val_fraction * n)`` to val:
  exact fractions of patients.
``fold`` and ``column`` splits are checked and a patient found on two sides is a ValueError.

Determinism: records are written in the reader's order, split by split; tar members have fixed
mtime/uid/gid/names/mode; JSON is written with sorted keys. Loading and preprocessing run in a
``multiprocessing`` pool (``imap``, ordered) and only the main process writes, so the bytes do not
depend on ``--workers``. Memory: signals are streamed, at most ``4 * workers * 4`` encoded records
are in flight; what grows with the collection is the list of record entries (ids, reports, labels,
metadata: about 1 KB per record), read once so that splits and the vocabulary are known up front.

Atomicity and resuming: each shard is written to ``NAME.tar.tmp`` then renamed. After every
completed shard, ``progress.json`` records the shard's sha256, sample count, skipped records and
label counts, under a fingerprint of the job (source, options, every listed record). A re-run
with the same job keeps every recorded shard whose file still has its checksum and continues
after the last one; anything else is rewritten. Resuming trusts that signal files did not change
in between (delete the output folder to start over). Shard files of the ``{split}-NNNNNN.tar``
form that the finished job did not produce are deleted, so globs never pick up stale shards.

Bad records (see ``record.SKIP_REASONS``) are skipped, listed in the manifest and summarised on
stderr; with ``strict`` the first one raises :class:`RecordError` naming its path and reason.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import tarfile
import threading
from collections import Counter
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ..atomic import remove_stale_temps, write_json_atomic
from ..leads import STANDARD_LEADS
from .preprocess import MISSING_LEAD_POLICIES, SAMPLING_RATE_RANGE, preprocess_record, sampling_rate_problem
from .readers import READERS, get_reader
from .record import RecordEntry, RecordError
from .text import TEXT_MODES, make_text
from .vocabulary import VOCABULARY_FILE, build_vocabulary, label_ids

SPLITS = ("train", "val", "test")
SPLIT_METHODS = ("fold", "patient", "random", "column")
MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"
PROGRESS_FILE = "progress.json"
SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")
MANIFEST_VERSION = 1
_CHUNK = 4  # records per worker task


@dataclass
class ShardOptions:
    """What to write. ``workers``, ``strict`` and ``progress`` change how, never what."""

    sampling_rate: float = 500.0
    seconds: float = 10.0
    min_seconds: Optional[float] = None      # None: records must be at least `seconds` long
    missing_leads: str = "error"             # see preprocess.MISSING_LEAD_POLICIES
    split_by: Optional[str] = None           # None: fold / column / patient, see module docstring
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0
    val_folds: Sequence[int] = (9,)
    test_folds: Sequence[int] = (10,)
    text: str = "report"
    shard_size: int = 1000
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
        return options


# --------------------------------------------------------------------------------------------
# Keys, JSON and hashing
# --------------------------------------------------------------------------------------------

def sample_key(record_id: str) -> str:
    """webdataset key of a record: '.', '/' and whitespace become '_' (webdataset splits the
    extension at the first dot of a member name)."""
    return re.sub(r"[./\s]", "_", record_id)


def _jsonable(value):
    """JSON-safe copy: numpy scalars unwrapped, NaN/inf -> None, unknown types -> str."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _json_bytes(value) -> bytes:
    return json.dumps(_jsonable(value), sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json_atomic(path: Path, value) -> None:
    write_json_atomic(path, _jsonable(value), final_newline=True, indent=1, sort_keys=True, ensure_ascii=False)


def shard_pattern(names: Sequence[str]) -> str:
    """Brace pattern for consecutive shard names: ``train-{000000..000003}.tar``."""
    matches = [SHARD_NAME.match(n) for n in names]
    if not names or not all(matches) or len({m.group(1) for m in matches}) != 1:
        raise ValueError(f"expected shard names of one split, got {list(names)[:3]}...")
    split, first, last = matches[0].group(1), matches[0].group(2), matches[-1].group(2)
    return f"{split}-{first}.tar" if first == last else f"{split}-{{{first}..{last}}}.tar"


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def patient_split(patient_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Stable hash split of one patient (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2 ** 64
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def resolve_split_method(entries: Sequence[RecordEntry], split_by: Optional[str]) -> str:
    if split_by:
        return split_by
    if all(e.fold is not None for e in entries):
        return "fold"
    if all(e.split is not None for e in entries):
        return "column"
    return "patient"


def assign_splits(entries: Sequence[RecordEntry], options: ShardOptions) -> List[str]:
    """One split per entry; ValueError when the method cannot apply or a patient would leak."""
    method = resolve_split_method(entries, options.split_by)
    if method == "fold":
        without = [e.record_id for e in entries if e.fold is None]
        if without:
            raise ValueError(f"--split-by fold: {len(without)} record(s) have no fold, e.g. {without[0]!r}")
        overlap = set(options.val_folds) & set(options.test_folds)
        if overlap:
            raise ValueError(f"folds {sorted(overlap)} are both validation and test folds")
        splits = ["val" if e.fold in options.val_folds else "test" if e.fold in options.test_folds else "train"
                  for e in entries]
    elif method == "column":
        without = [e.record_id for e in entries if e.split is None]
        if without:
            raise ValueError(f"--split-by column: {len(without)} record(s) have no split, e.g. {without[0]!r}")
        splits = [e.split for e in entries]
    elif method == "patient":
        splits = [patient_split(e.patient_id, options.seed, options.val_fraction, options.test_fraction)
                  for e in entries]
    else:
        patients = sorted({e.patient_id for e in entries})
        order = np.random.default_rng(options.seed).permutation(len(patients))
        n_test = round(options.test_fraction * len(patients))
        n_val = round(options.val_fraction * len(patients))
        side = {}
        for rank, index in enumerate(order):
            side[patients[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
        splits = [side[e.patient_id] for e in entries]
    check_patient_leakage(entries, splits)
    return splits


def check_patient_leakage(entries: Sequence[RecordEntry], splits: Sequence[str]) -> None:
    """ValueError naming patients that appear in more than one split."""
    sides: Dict[str, set] = {}
    for entry, split in zip(entries, splits):
        sides.setdefault(entry.patient_id, set()).add(split)
    leaking = sorted(p for p, s in sides.items() if len(s) > 1)
    if leaking:
        examples = ", ".join(f"{p!r} in {sorted(sides[p])}" for p in leaking[:5])
        raise ValueError(f"{len(leaking)} patient(s) would appear in two splits: {examples}")


# --------------------------------------------------------------------------------------------
# Encoding one record (runs in the workers)
# --------------------------------------------------------------------------------------------

@dataclass
class SampleEncoder:
    """Entry -> ('sample', key, members, codes) or ('skip', skip record). Picklable."""

    reader: object
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
        buffer = io.BytesIO()
        np.save(buffer, ecg, allow_pickle=False)
        meta = dict(_jsonable(entry.metadata))
        meta.update(record_id=entry.record_id, patient_id=entry.patient_id, source_path=self._relative(entry.path),
                    sampling_rate=self.options.sampling_rate, original_sampling_rate=record.sampling_rate,
                    leads=list(STANDARD_LEADS), split=split, fold=entry.fold, report=entry.report,
                    age=meta.get("age"), sex=meta.get("sex"))
        members = {
            "ecg.npy": buffer.getvalue(),
            "txt": text.encode("utf-8"),
            "labels.json": _json_bytes({"ids": [self.ids[c] for c in codes], "codes": codes}),
            "meta.json": _json_bytes(meta),
        }
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

class _ShardFile:
    """One tar being written to ``NAME.tar.tmp``; :meth:`finish` fsyncs and renames it."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.GNU_FORMAT)
        self.n = 0

    def add(self, key: str, members: Dict[str, bytes]) -> None:
        for extension, data in members.items():
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.n += 1

    def finish(self) -> str:
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return _sha256(self.path)

    def abort(self) -> None:
        self.tar.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _fingerprint(source: dict, options: dict, entries: Sequence[RecordEntry], splits: Sequence[str]) -> str:
    digest = hashlib.sha256(_json_bytes({"version": MANIFEST_VERSION, "source": source, "options": options}))
    for entry, split in zip(entries, splits):
        digest.update(_json_bytes([dataclasses.asdict(entry), split]))
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


def write_shards(reader, output_dir, options: Optional[ShardOptions] = None, source: Optional[dict] = None) -> dict:
    """Write the shards, vocabulary, sizes and manifest of ``reader``'s records; returns the manifest.

    ``reader`` is any object with ``entries()``, ``load(entry)`` and ``label_names()`` (see
    :mod:`.readers`); ``source`` describes it in the manifest (default: its class and root).
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

    for stale in [MANIFEST_FILE, SIZES_FILE, VOCABULARY_FILE] + [p.name for p in output_dir.glob("*.tar.tmp")]:
        (output_dir / stale).unlink(missing_ok=True)
    remove_stale_temps(output_dir)  # progress/manifest temporaries of a killed run
    done = _resumable_shards(output_dir, fingerprint)
    progress = {"fingerprint": fingerprint, "shards": {split: list(done.get(split, [])) for split in SPLITS}}
    encoder = SampleEncoder(reader, options, label_names, ids, root)
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

    shards = [shard for split in SPLITS for shard in progress["shards"][split]]
    produced = {shard["name"] for shard in shards}
    for path in output_dir.iterdir():
        if SHARD_NAME.match(path.name) and path.name not in produced:
            path.unlink()

    skipped = [skip for split in SPLITS for shard in progress["shards"][split] for skip in shard["skipped"]]
    skipped += [skip for split in SPLITS for skip in trailing_skips[split]]
    skipped = [{k: v for k, v in skip.items() if k != "index"}
               for skip in sorted(skipped, key=lambda skip: (SPLITS.index(skip["split"]), skip["index"]))]
    label_counts = {split: Counter() for split in SPLITS}
    for shard in shards:
        label_counts[shard["split"]].update(shard["label_counts"])
    vocabulary = build_vocabulary(ids, label_names, label_counts, SPLITS)
    counts = {split: sum(s["samples"] for s in progress["shards"][split]) for split in SPLITS}
    manifest = {
        "version": MANIFEST_VERSION,
        "source": source,
        "options": output_options,
        "counts": counts,
        "records": {"listed": len(entries), "written": sum(counts.values()), "skipped": len(skipped)},
        "skip_counts": dict(sorted(Counter(skip["reason"] for skip in skipped).items())),
        "skipped": skipped,
        "shards": [{"name": s["name"], "split": s["split"], "samples": s["samples"], "sha256": s["sha256"]}
                   for s in shards],
        "patterns": {split: shard_pattern([s["name"] for s in progress["shards"][split]])
                     for split in SPLITS if progress["shards"][split]},
        "vocabulary": vocabulary,
    }
    _write_json_atomic(output_dir / VOCABULARY_FILE, vocabulary)
    _write_json_atomic(output_dir / SIZES_FILE, {s["name"]: s["samples"] for s in shards})
    _write_json_atomic(output_dir / MANIFEST_FILE, manifest)
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
                    shard = _ShardFile(output_dir / f"{split}-{shard_index:06d}.tar")
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
    _write_json_atomic(output_dir / PROGRESS_FILE, progress)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--format", required=True, choices=sorted(READERS), help="layout of --input")
    parser.add_argument("--input", required=True,
                        help="PTB-XL folder, CinC folder, MIMIC-IV-ECG folder, or a CSV/JSONL index (csv)")
    parser.add_argument("--output", required=True,
                        help="shard folder; `{split}-NNNNNN.tar` files there that this job does not produce are deleted")
    parser.add_argument("--sampling-rate", type=float, default=500.0, help="target rate in Hz (default 500)")
    parser.add_argument("--seconds", type=float, default=10.0, help="stored length in seconds (default 10)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="shorter records are skipped as too_short, longer ones up to --seconds are "
                             "zero-padded (default: --seconds)")
    parser.add_argument("--missing-leads", choices=MISSING_LEAD_POLICIES, default="error",
                        help="records lacking leads: skip (error), derive limb leads from I and II, or zero-fill")
    parser.add_argument("--split-by", choices=SPLIT_METHODS, default=None,
                        help="default: fold if every record has one (PTB-XL), column if the CSV has a split "
                             "column, else patient")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="patient/random splits (default 0.1)")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="patient/random splits (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient/random split")
    parser.add_argument("--val-folds", type=int, nargs="+", default=[9], help="folds for val (--split-by fold)")
    parser.add_argument("--test-folds", type=int, nargs="+", default=[10], help="folds for test (--split-by fold)")
    parser.add_argument("--text", choices=TEXT_MODES, default=None,
                        help="report as written (PTB-XL: mostly German), a sentence from the labels' English "
                             "names, or both (default: report; labels for cinc, which has no reports)")
    parser.add_argument("--label-level", default=None,
                        help="ptbxl: all, diagnostic, subclass, superclass, form or rhythm (default all)")
    parser.add_argument("--likelihood-threshold", type=float, default=None,
                        help="ptbxl: drop statements whose known likelihood is below this (default 0)")
    parser.add_argument("--label-names", default=None,
                        help="csv: label names file (.csv with code,name or .json); default label_names.csv/.json "
                             "beside the index")
    parser.add_argument("--encoding", default=None,
                        help="csv: text encoding of the index (default UTF-8); rows not valid in it are skipped "
                             "as bad_encoding")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--workers", type=int, default=1, help="loading/preprocessing processes (default 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad record (exit status 1)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _reader_options(args) -> dict:
    """Format-specific reader options; an option given for another format is an error."""
    given = {flag: value for flag, value in (("--label-level", args.label_level),
                                             ("--likelihood-threshold", args.likelihood_threshold),
                                             ("--label-names", args.label_names),
                                             ("--encoding", args.encoding)) if value is not None}
    allowed = {"ptbxl": {"--label-level", "--likelihood-threshold"},
               "csv": {"--label-names", "--encoding"}}.get(args.format, set())
    wrong = sorted(set(given) - allowed)
    if wrong:
        raise ValueError(f"{', '.join(wrong)} do(es) not apply to --format {args.format}")
    if args.format == "ptbxl":
        # PTB-XL is stored at 100 and 500 Hz: read the 100 Hz files when they suffice.
        options = {"sampling_rate": 100 if args.sampling_rate <= 100 else 500}
        if args.label_level is not None:
            options["label_level"] = args.label_level
        if args.likelihood_threshold is not None:
            options["likelihood_threshold"] = args.likelihood_threshold
        return options
    return {key: value for key, value in (("label_names", args.label_names), ("encoding", args.encoding)) if value}


def summarize_skips(manifest: dict, limit: int = 20) -> str:
    """Skipped records per reason and the first ``limit`` of them (for stderr)."""
    skipped = manifest["skipped"]
    if not skipped:
        return f"no records skipped ({manifest['records']['listed']} listed)"
    reasons = ", ".join(f"{reason}={n}" for reason, n in manifest["skip_counts"].items())
    lines = [f"skipped {len(skipped)} of {manifest['records']['listed']} records: {reasons}"]
    lines += [f"  {s['path']} (record {s['record_id']}): {s['reason']}: {s['detail']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    lines.append(f"every skipped record is listed in {MANIFEST_FILE}")
    return "\n".join(lines)


# What the dominant skip reason of a run that wrote nothing usually means.
EMPTY_RUN_HINTS = {
    "no_labels": "wrong --format for this input, or --text labels on records without labels?",
    "no_report": "the records have no reports: use --text labels or both",
    "unreadable": "wrong --format or --input (signal files not where the index says)?",
    "missing_leads": "try --missing-leads derive or zero",
    "too_short": "lower --seconds or set --min-seconds",
    "sampling_rate": f"sampling rates must lie in {SAMPLING_RATE_RANGE[0]:g}-{SAMPLING_RATE_RANGE[1]:g} Hz",
    "bad_encoding": "pass the index's encoding with --encoding (e.g. latin-1)",
}


def empty_run_message(manifest: dict, fmt: str) -> str:
    """One line for a run that wrote no sample: the dominant skip reason and what to check."""
    listed = manifest["records"]["listed"]
    if not manifest["skip_counts"]:
        return f"wrote 0 samples of {listed} listed records"
    reason, n = max(manifest["skip_counts"].items(), key=lambda item: item[1])
    hint = EMPTY_RUN_HINTS.get(reason, f"see the skipped records in {MANIFEST_FILE}")
    return (f"wrote 0 samples: all {listed} records were skipped, most as {reason} ({n}) "
            f"with --format {fmt}; {hint}")


def training_flags(manifest: dict, output_dir) -> str:
    """The --train-data/--val-data flags (open_clip brace patterns) for the written shards."""
    patterns = {split: os.path.join(str(output_dir), p) for split, p in manifest["patterns"].items()}
    flags = [f"--{split}-data '{patterns[split]}'" for split in ("train", "val") if split in patterns]
    lines = ["train with: " + " ".join(flags)] if flags else []
    if "test" in patterns:
        lines.append(f"test shards: '{patterns['test']}'")
    return "\n".join(lines)


def run(args) -> int:
    text = args.text or ("labels" if args.format == "cinc" else "report")
    options = ShardOptions(sampling_rate=args.sampling_rate, seconds=args.seconds, min_seconds=args.min_seconds,
                           missing_leads=args.missing_leads, split_by=args.split_by, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction, seed=args.seed, val_folds=tuple(args.val_folds),
                           test_folds=tuple(args.test_folds), text=text, shard_size=args.shard_size,
                           workers=args.workers, strict=args.strict, progress=args.progress)
    try:
        reader_options = _reader_options(args)
        reader = get_reader(args.format, args.input, **reader_options)
        source = {"format": args.format, "input": os.path.abspath(args.input),
                  "reader_options": {k: str(v) for k, v in reader_options.items()}}
        manifest = write_shards(reader, args.output, options, source=source)
    except RecordError as err:
        print(f"error (--strict): {err}", file=sys.stderr)
        return 1
    print(summarize_skips(manifest), file=sys.stderr)
    if manifest["records"]["written"] == 0:
        print(f"error: {empty_run_message(manifest, args.format)}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())
    print(f"wrote {manifest['records']['written']} samples ({counts}) in {len(manifest['shards'])} shard(s) "
          f"to {args.output}")
    print(training_flags(manifest, args.output))
    return 0
