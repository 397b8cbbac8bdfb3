"""The shard sample schema, checked once where every reader decodes a sample
(:func:`open_clip_ecg.data.pipeline.decode_sample`): training, validation, evaluation, probes and
embeddings all see either a sample that follows it or one :class:`ShardFormatError` naming the
shard and the sample key.

A sample (see :mod:`open_clip_ecg.data.shards`) holds:

- ``ecg.npy``: float16 ``[12, n_samples]`` with ``n_samples = round(rate * seconds)`` from the
  shard folder's ``manifest.json``. The ``.npy`` header is read and compared with that *before*
  the array is allocated, so a header declaring terabytes costs nothing;
- ``labels.json``: ``{"ids": [int, ...], "codes": [str, ...]}``, ids in range of
  ``vocabulary.json`` and each id naming its code there (no string read as a list of characters,
  no float truncated to an id);
- ``meta.json`` (optional): a JSON object; ``txt``: UTF-8 text.

JSON members are bounded in size (``MAX_JSON_BYTES``) and nesting (``MAX_JSON_DEPTH``).
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
from numpy.lib import format as npy_format

MAX_JSON_BYTES = 1 << 20
MAX_JSON_DEPTH = 32
ECG_DTYPE = np.dtype("<f2")


class ShardFormatError(ValueError):
    """A shard sample that does not follow the open_clip_ecg sample format."""


@dataclass(frozen=True)
class SampleSchema:
    """What a shard folder declares about its samples (manifest + vocabulary)."""

    n_leads: int
    n_samples: int
    codes: Tuple[str, ...]  # vocabulary codes by id

    @classmethod
    def from_shard_info(cls, info: dict, n_leads: int) -> "SampleSchema":
        return cls(n_leads, int(info["n_samples"]), tuple(str(v["code"]) for v in info["vocabulary"]))


def load_ecg(data: bytes, schema: SampleSchema, where: str) -> np.ndarray:
    """The float32 ``[leads, samples]`` ECG of an ``ecg.npy`` member, its header checked first."""
    expected = (schema.n_leads, schema.n_samples)
    buffer = io.BytesIO(data)
    try:
        version = npy_format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran_order, dtype = npy_format.read_array_header_1_0(buffer)
        else:
            shape, fortran_order, dtype = npy_format.read_array_header_2_0(buffer)
    except (ValueError, SyntaxError) as err:
        raise ShardFormatError(f"{where}: ecg.npy is not a readable .npy: {err}") from None
    if tuple(shape) != expected or dtype != ECG_DTYPE:
        raise ShardFormatError(f"{where}: ecg.npy declares {dtype} {tuple(shape)}; the shard folder's manifest "
                               f"declares float16 {expected}")
    n_bytes = ECG_DTYPE.itemsize * expected[0] * expected[1]
    if len(data) - buffer.tell() != n_bytes:
        raise ShardFormatError(f"{where}: ecg.npy holds {len(data) - buffer.tell()} data bytes, its header "
                               f"promises {n_bytes}")
    ecg = np.frombuffer(data, dtype=ECG_DTYPE, offset=buffer.tell())
    ecg = ecg.reshape(expected[::-1]).T if fortran_order else ecg.reshape(expected)
    if not np.isfinite(ecg).all():
        raise ShardFormatError(f"{where}: ecg.npy holds non-finite values")
    return ecg.astype(np.float32)


def load_json(data: bytes, where: str, member: str):
    """A JSON member, bounded in size and nesting."""
    if len(data) > MAX_JSON_BYTES:
        raise ShardFormatError(f"{where}: {member} is {len(data)} bytes (limit {MAX_JSON_BYTES})")
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as err:  # RecursionError: nesting deeper than Python's stack
        raise ShardFormatError(f"{where}: {member} is not valid JSON: {type(err).__name__}: {err}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise ShardFormatError(f"{where}: {member} is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


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
        raise ShardFormatError(f"{where}: labels.json must be an object with lists 'ids' and 'codes', got "
                               f"{_excerpt(labels)}")
    ids, codes = labels["ids"], labels["codes"]
    bad_ids = [i for i in ids if type(i) is not int or not 0 <= i < len(schema.codes)]
    if bad_ids:
        raise ShardFormatError(f"{where}: labels.json ids {_excerpt(bad_ids)} are not integers in "
                               f"0..{len(schema.codes) - 1} (the vocabulary's ids)")
    if len(set(ids)) != len(ids):
        raise ShardFormatError(f"{where}: labels.json repeats ids {_excerpt(ids)}")
    if len(codes) != len(ids) or any(not isinstance(c, str) for c in codes):
        raise ShardFormatError(f"{where}: labels.json codes {_excerpt(codes)} are not one string per id")
    wrong = [f"{i}->{c!r} (vocabulary: {schema.codes[i]!r})" for i, c in zip(ids, codes) if schema.codes[i] != c]
    if wrong:
        raise ShardFormatError(f"{where}: labels.json ids and codes disagree with vocabulary.json: "
                               f"{', '.join(wrong[:3])}")
    return list(ids), list(codes)


def check_meta(meta, where: str) -> dict:
    if not isinstance(meta, dict):
        raise ShardFormatError(f"{where}: meta.json must be a JSON object, got {_excerpt(meta)}")
    return meta


def _excerpt(value, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."
