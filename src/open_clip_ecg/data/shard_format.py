"""The shard format, defined once: what a sample of a ``{split}-NNNNNN.tar`` shard holds, how it is
encoded (:func:`encode_sample`, used by :mod:`.shard_writer`) and decoded and checked
(:func:`decode_sample`, the one decoder of every reader: training, validation, evaluation, embed,
probe and the baselines all go through :mod:`.pipeline`). A reader sees either a sample that
follows the format or one :class:`ShardFormatError` naming the shard and the sample key.

A shard folder holds ``{split}-NNNNNN.tar`` shards (:data:`SHARD_NAME`), ``vocabulary.json``,
``sizes.json`` and ``manifest.json`` (:mod:`.manifest`); the manifest declares
:data:`MANIFEST_VERSION`, and readers refuse a folder that declares another. A sample holds, in
this order (:data:`MEMBERS`):

- ``__key__``: the record id with '.', '/' and whitespace replaced by '_' (:func:`sample_key`);
- ``ecg.npy``: float16 ``[12, n_samples]`` in mV, leads in ``STANDARD_LEADS`` order, with
  ``n_samples = round(rate * seconds)`` from the folder's ``manifest.json``. The ``.npy`` header is
  read and compared with that *before* the array is allocated, so a header declaring terabytes
  costs nothing; nothing is unpickled;
- ``txt``: UTF-8 text (see :mod:`.text`);
- ``labels.json``: ``{"ids": [int, ...], "codes": [str, ...]}``, ids in range of
  ``vocabulary.json`` and each id naming its code there (no string read as a list of characters,
  no float truncated to an id);
- ``meta.json`` (optional for readers): a JSON object (record id, patient, source path, rates,
  leads, split, fold, report, age, sex and the reader's metadata);
- ``beats.json`` (when the manifest's ``options.beats`` names a beat detector): the sample indices
  of the record's QRS complexes, found once by the writer on the stored signal
  (:data:`.rhythm.BEAT_DETECTOR`); increasing integers in ``[0, n_samples)``. Readers use them
  for the RR channels when the manifest names the detector they would run, and detect at read
  time otherwise (older shards, another detector version).

Members are written as sorted-key, non-ASCII-preserving JSON; JSON members are read bounded in
size (``MAX_JSON_BYTES``) and nesting (``MAX_JSON_DEPTH``), the folder's JSON files by
:func:`load_folder_json`.
"""
from __future__ import annotations

import functools
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from numpy.lib import format as npy_format

from .rhythm import BEAT_DETECTOR

MANIFEST_VERSION = 1  # bump when the bytes of a sample or the folder files change meaning
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"^(train|val|test)-(\d{6})\.tar$")

ECG_MEMBER = "ecg.npy"
TEXT_MEMBER = "txt"
LABELS_MEMBER = "labels.json"
META_MEMBER = "meta.json"
BEATS_MEMBER = "beats.json"
MEMBERS = (ECG_MEMBER, TEXT_MEMBER, LABELS_MEMBER, META_MEMBER, BEATS_MEMBER)  # in the order they are written
REQUIRED_MEMBERS = (ECG_MEMBER, TEXT_MEMBER, LABELS_MEMBER)      # what a reader needs

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
# The folder's JSON files are the writer's own and grow with the job (the manifest lists every
# skipped record, ~220 bytes each): MAX_JSON_BYTES, meant for members of untrusted samples, would
# make a large MIMIC-IV-ECG folder unreadable.
MAX_FOLDER_JSON_BYTES = 256 << 20
ECG_DTYPE = np.dtype("<f2")


class ShardFormatError(ValueError):
    """A shard sample that does not follow the open_clip_ecg sample format."""


@dataclass(frozen=True)
class SampleSchema:
    """What a shard folder declares about its samples (manifest + vocabulary)."""

    n_leads: int
    n_samples: int
    codes: Tuple[str, ...]  # vocabulary codes by id
    beats: bool = False  # samples carry beats of the detector this code runs (BEATS_MEMBER)

    @classmethod
    def from_shard_info(cls, info: dict, n_leads: int) -> "SampleSchema":
        return cls(n_leads, int(info["n_samples"]), tuple(str(v["code"]) for v in info["vocabulary"]),
                   beats=info.get("beats") == BEAT_DETECTOR)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

def shard_name(split: str, index: int) -> str:
    """File name of shard `index` of `split`: ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def shard_glob(split: str) -> str:
    """Glob of the shards of `split` in a shard folder."""
    return f"{split}-*.tar"


def shard_pattern(names: Sequence[str]) -> str:
    """Brace pattern for consecutive shard names: ``train-{000000..000003}.tar``."""
    matches = [SHARD_NAME.match(n) for n in names]
    if not names or not all(matches) or len({m.group(1) for m in matches}) != 1:
        raise ValueError(f"expected shard names of one split, got {list(names)[:3]}...")
    split, first, last = matches[0].group(1), matches[0].group(2), matches[-1].group(2)
    return f"{split}-{first}.tar" if first == last else f"{split}-{{{first}..{last}}}.tar"


def sample_key(record_id: str) -> str:
    """webdataset key of a record: '.', '/' and whitespace become '_' (webdataset splits the
    extension at the first dot of a member name)."""
    return re.sub(r"[./\s]", "_", record_id)


def sample_location(sample: Mapping) -> str:
    """'SHARD (key KEY)': how every error about a sample names it."""
    return f"{sample.get('__url__', '?')} (key {sample.get('__key__', '?')})"


# --------------------------------------------------------------------------------------------
# Encoding (the writer)
# --------------------------------------------------------------------------------------------

def jsonable(value):
    """JSON-safe copy: numpy scalars unwrapped, NaN/inf -> None, unknown types -> str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def json_bytes(value) -> bytes:
    """Canonical JSON bytes (sorted keys, UTF-8): the same value always gives the same bytes."""
    return json.dumps(jsonable(value), sort_keys=True, ensure_ascii=False, allow_nan=False).encode("utf-8")


def encode_sample(ecg: np.ndarray, text: str, label_ids: Sequence[int], label_codes: Sequence[str],
                  meta: Mapping, beats: Optional[np.ndarray] = None) -> Dict[str, bytes]:
    """The members of one sample (without its key), in :data:`MEMBERS` order; ``beats`` only
    when the folder stores them."""
    buffer = io.BytesIO()
    np.save(buffer, ecg, allow_pickle=False)
    members = {
        ECG_MEMBER: buffer.getvalue(),
        TEXT_MEMBER: text.encode("utf-8"),
        LABELS_MEMBER: json_bytes({"ids": list(label_ids), "codes": list(label_codes)}),
        META_MEMBER: json_bytes(meta),
    }
    if beats is not None:
        members[BEATS_MEMBER] = json_bytes([int(b) for b in beats])
    return members


# --------------------------------------------------------------------------------------------
# Decoding and the schema check (every reader)
# --------------------------------------------------------------------------------------------

def decode_sample(sample: Dict, schema_for: Callable[[str], SampleSchema]) -> Dict:
    """Raw tar members -> {key, ecg float32 [12, T], text, label_ids, label_codes, meta}, checked
    against the schema ``schema_for(shard url)`` returns (its shard folder's declarations)."""
    where = sample_location(sample)
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise ShardFormatError(f"{where}: sample lacks {missing}; has {sorted(sample)}")
    try:
        schema = schema_for(sample["__url__"])
    except (KeyError, ValueError) as e:
        raise ShardFormatError(f"{where}: no shard folder declares this sample's format: {e}") from e
    ecg = load_ecg(sample[ECG_MEMBER], schema, where)
    label_ids, label_codes = check_labels(load_json(sample[LABELS_MEMBER], where, LABELS_MEMBER), schema, where)
    meta = check_meta(load_json(sample[META_MEMBER], where, META_MEMBER), where) if META_MEMBER in sample else {}
    try:
        text = sample[TEXT_MEMBER].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ShardFormatError(f"{where}: {TEXT_MEMBER} is not UTF-8: {e}") from e
    decoded = {"key": sample["__key__"], "ecg": ecg, "text": text, "label_ids": label_ids,
               "label_codes": label_codes, "meta": meta}
    if schema.beats:
        if BEATS_MEMBER not in sample:
            raise ShardFormatError(f"{where}: sample lacks {BEATS_MEMBER}, which the shard folder's manifest declares")
        decoded["beats"] = check_beats(load_json(sample[BEATS_MEMBER], where, BEATS_MEMBER), schema, where)
    return decoded


def check_manifest_version(manifest: Mapping, path) -> None:
    """ValueError naming `path` when the manifest declares another format version than this code reads."""
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        declared = "no shard format version" if version is None else f"shard format version {version!r}"
        raise ValueError(f"{path} declares {declared}; this open_clip_ecg reads version {MANIFEST_VERSION}: "
                         "write the shards again with `open-clip-ecg shards`")


def load_ecg(data: bytes, schema: SampleSchema, where: str) -> np.ndarray:
    """The float32 ``[leads, samples]`` ECG of an ``ecg.npy`` member, its header checked first."""
    expected = (schema.n_leads, schema.n_samples)
    try:
        shape, fortran_order, dtype, offset = _npy_header(bytes(data[:_npy_header_length(data)]))
    except (ValueError, SyntaxError) as err:
        raise ShardFormatError(f"{where}: {ECG_MEMBER} is not a readable .npy: {err}") from None
    if tuple(shape) != expected or dtype != ECG_DTYPE:
        raise ShardFormatError(f"{where}: {ECG_MEMBER} declares {dtype} {tuple(shape)}; the shard folder's manifest "
                               f"declares float16 {expected}")
    n_bytes = ECG_DTYPE.itemsize * expected[0] * expected[1]
    if len(data) - offset != n_bytes:
        raise ShardFormatError(f"{where}: {ECG_MEMBER} holds {len(data) - offset} data bytes, its header "
                               f"promises {n_bytes}")
    ecg = np.frombuffer(data, dtype=ECG_DTYPE, offset=offset)
    ecg = ecg.reshape(expected[::-1]).T if fortran_order else ecg.reshape(expected)
    if not np.isfinite(ecg).all():
        raise ShardFormatError(f"{where}: {ECG_MEMBER} holds non-finite values")
    return ecg.astype(np.float32)


def _npy_header_length(data: bytes) -> int:
    """Bytes of an ``.npy`` header (magic, length field, header), read from its length field;
    unrecognised input gives all of `data`, for :func:`_npy_header` to reject."""
    if len(data) >= 12 and data[:6] == b"\x93NUMPY":
        return 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    return len(data)


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes):
    """(shape, fortran order, dtype, data offset) of an ``.npy`` header, parsed once per distinct
    header (every sample of a folder has the same one; numpy's parser costs a tenth of a decode)."""
    buffer = io.BytesIO(header)
    version = npy_format.read_magic(buffer)
    if version == (1, 0):
        shape, fortran_order, dtype = npy_format.read_array_header_1_0(buffer)
    else:
        shape, fortran_order, dtype = npy_format.read_array_header_2_0(buffer)
    return shape, fortran_order, dtype, buffer.tell()


def load_json(data: bytes, where: str, member: str, max_bytes: int = MAX_JSON_BYTES):
    """A JSON member, bounded in size (`max_bytes`) and nesting."""
    if len(data) > max_bytes:
        raise ShardFormatError(f"{where}: {member} is {len(data)} bytes (limit {max_bytes})")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than Python's stack
        raise ShardFormatError(f"{where}: {member} is not valid JSON: {type(err).__name__}: {err}") from None
    if _too_deep(data, value):
        raise ShardFormatError(f"{where}: {member} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def load_folder_json(path):
    """A JSON file of a shard folder (manifest, sizes, vocabulary), bounded by MAX_FOLDER_JSON_BYTES."""
    with open(path, "rb") as f:
        return load_json(f.read(), os.fspath(path), os.path.basename(path), MAX_FOLDER_JSON_BYTES)


def _too_deep(data: bytes, value) -> bool:
    """Whether parsed JSON nests deeper than MAX_JSON_DEPTH. Each level needs an opening bracket:
    counting them in the bytes is far cheaper than walking the value, which only few need."""
    return data.count(b"[") + data.count(b"{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH


def _depth(value) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_labels(labels, schema: SampleSchema, where: str) -> Tuple[List[int], List[str]]:
    """(ids, codes) of a parsed ``labels.json``: ids in-range ints naming their codes in the vocabulary."""
    if not isinstance(labels, dict) or not isinstance(labels.get("ids"), list) \
            or not isinstance(labels.get("codes"), list):
        raise ShardFormatError(f"{where}: {LABELS_MEMBER} must be an object with lists 'ids' and 'codes', got "
                               f"{_excerpt(labels)}")
    ids, codes = labels["ids"], labels["codes"]
    bad_ids = [i for i in ids if type(i) is not int or not 0 <= i < len(schema.codes)]
    if bad_ids:
        raise ShardFormatError(f"{where}: {LABELS_MEMBER} ids {_excerpt(bad_ids)} are not integers in "
                               f"0..{len(schema.codes) - 1} (the vocabulary's ids)")
    if len(set(ids)) != len(ids):
        raise ShardFormatError(f"{where}: {LABELS_MEMBER} repeats ids {_excerpt(ids)}")
    if len(codes) != len(ids) or any(not isinstance(c, str) for c in codes):
        raise ShardFormatError(f"{where}: {LABELS_MEMBER} codes {_excerpt(codes)} are not one string per id")
    wrong = [f"{i}->{c!r} (vocabulary: {schema.codes[i]!r})" for i, c in zip(ids, codes) if schema.codes[i] != c]
    if wrong:
        raise ShardFormatError(f"{where}: {LABELS_MEMBER} ids and codes disagree with vocabulary.json: "
                               f"{', '.join(wrong[:3])}")
    return list(ids), list(codes)


def check_beats(beats, schema: SampleSchema, where: str) -> np.ndarray:
    """The int64 sample indices of a parsed ``beats.json``: increasing integers inside the record."""
    if not isinstance(beats, list) or any(type(b) is not int for b in beats):
        raise ShardFormatError(f"{where}: {BEATS_MEMBER} must be a list of integers, got {_excerpt(beats)}")
    array = np.asarray(beats, dtype=np.int64)
    if len(array) and (array[0] < 0 or array[-1] >= schema.n_samples or (np.diff(array) <= 0).any()):
        raise ShardFormatError(f"{where}: {BEATS_MEMBER} {_excerpt(beats)} are not increasing sample indices in "
                               f"0..{schema.n_samples - 1}")
    return array


def check_meta(meta, where: str) -> dict:
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: {META_MEMBER} must be a JSON object, got {_excerpt(meta)}")
    return meta


def _excerpt(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
