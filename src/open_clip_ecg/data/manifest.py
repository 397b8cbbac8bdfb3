"""The files a shard folder holds beside its shards: ``manifest.json``, open_clip's ``sizes.json``
and ``vocabulary.json`` (:mod:`.vocabulary`). Built here for the writer, read here for every reader.

``manifest.json`` (written last: its presence means the shard set is complete) records the format
version (:data:`.shard_format.MANIFEST_VERSION`), the source, the options that determine the
output, the job's fingerprint, counts per split, every skipped record with its reason, a sha256 per shard, the brace
pattern of each split and the vocabulary. Readers take the sampling rate and record length from
it and refuse a folder whose manifest declares another format version.
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..atomic import write_json_atomic
from ..leads import STANDARD_LEADS
from .shard_format import (
    MANIFEST_VERSION,
    SPLITS,
    SampleSchema,
    check_manifest_version,
    jsonable,
    load_folder_json,
    shard_pattern,
)
from .vocabulary import VOCABULARY_FILE, build_vocabulary, load_vocabulary

MANIFEST_FILE = "manifest.json"
SIZES_FILE = "sizes.json"


def write_folder_json(path: Path, value) -> None:
    """A folder file (manifest, sizes, vocabulary, the writer's progress), atomically, in its one layout."""
    write_json_atomic(path, jsonable(value), final_newline=True, indent=1, sort_keys=True, ensure_ascii=False)


# --------------------------------------------------------------------------------------------
# Building (the writer)
# --------------------------------------------------------------------------------------------

def build_manifest(source: dict, options: dict, listed: int, shards: Mapping[str, List[dict]],
                   trailing_skips: Mapping[str, List[dict]], ids: Mapping[str, int],
                   label_names: Mapping[str, str], fingerprint: str) -> dict:
    """The manifest of a finished job. ``shards`` lists per split the completed shards (name, split,
    samples, sha256, skipped records with their index, label counts); ``trailing_skips`` the records
    skipped after each split's last shard; ``fingerprint`` identifies the job (a re-run of the same
    job returns this manifest instead of writing again)."""
    written = [shard for split in SPLITS for shard in shards[split]]
    skipped = [skip for shard in written for skip in shard["skipped"]]
    skipped += [skip for split in SPLITS for skip in trailing_skips[split]]
    skipped = [{k: v for k, v in skip.items() if k != "index"}
               for skip in sorted(skipped, key=lambda skip: (SPLITS.index(skip["split"]), skip["index"]))]
    label_counts = {split: Counter() for split in SPLITS}
    for shard in written:
        label_counts[shard["split"]].update(shard["label_counts"])
    counts = {split: sum(s["samples"] for s in shards[split]) for split in SPLITS}
    return {
        "version": MANIFEST_VERSION,
        "source": source,
        "options": options,
        "fingerprint": fingerprint,
        "counts": counts,
        "records": {"listed": listed, "written": sum(counts.values()), "skipped": len(skipped)},
        "skip_counts": dict(sorted(Counter(skip["reason"] for skip in skipped).items())),
        "skipped": skipped,
        "shards": [{"name": s["name"], "split": s["split"], "samples": s["samples"], "sha256": s["sha256"]}
                   for s in written],
        "patterns": {split: shard_pattern([s["name"] for s in shards[split]]) for split in SPLITS if shards[split]},
        "vocabulary": build_vocabulary(ids, label_names, label_counts, SPLITS),
    }


# --------------------------------------------------------------------------------------------
# Reading (every reader)
# --------------------------------------------------------------------------------------------

def read_shard_info(shards: Sequence[str]) -> Dict:
    """The vocabulary and sampling rate written beside the first shard.

    Returns ``{"vocabulary": [{"id", "code", "name", ...}], "sampling_rate": float,
    "n_samples": int (stored record length), "directory": str, "text": the text mode}``; a missing
    or inconsistent file, or a manifest of another format version, is a ValueError naming it.
    """
    directory = os.path.dirname(os.path.abspath(shards[0]))
    vocabulary = load_vocabulary(directory)
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(manifest_path):
        raise ValueError(f"{manifest_path} is missing: shards must come from `open-clip-ecg shards`")
    manifest = load_folder_json(manifest_path)
    if isinstance(manifest, dict):
        check_manifest_version(manifest, manifest_path)
    options = manifest.get("options") if isinstance(manifest, dict) else None
    try:
        rate, seconds = float(options["sampling_rate"]), float(options["seconds"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{manifest_path} lacks numeric options.sampling_rate / options.seconds") from None
    if not (math.isfinite(rate) and math.isfinite(seconds) and rate > 0 and seconds > 0):
        raise ValueError(f"{manifest_path} declares sampling rate {rate} and seconds {seconds}")
    return {"vocabulary": vocabulary, "sampling_rate": rate,
            "n_samples": int(round(rate * seconds)), "directory": directory, "text": options.get("text")}


@functools.lru_cache(maxsize=64)
def _folder_schema(directory: str, stamp: tuple) -> SampleSchema:
    return SampleSchema.from_shard_info(read_shard_info([os.path.join(directory, "x.tar")]), len(STANDARD_LEADS))


def shard_schema(shard: str) -> SampleSchema:
    """What the folder of `shard` declares about its samples (cached while its files are unchanged)."""
    directory = os.path.dirname(os.path.abspath(shard))
    paths = [os.path.join(directory, name) for name in (MANIFEST_FILE, VOCABULARY_FILE)]
    return _folder_schema(directory, tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None for p in paths))


def count_samples(shards: Sequence[str]) -> Optional[int]:
    """Total samples of `shards` from sizes.json beside them (None when absent)."""
    sizes_path = os.path.join(os.path.dirname(os.path.abspath(shards[0])), SIZES_FILE)
    if not os.path.exists(sizes_path):
        return None
    sizes = load_folder_json(sizes_path)
    if not isinstance(sizes, dict):
        raise ValueError(f"{sizes_path} must map shard names to sample counts")
    try:
        return sum(int(sizes[os.path.basename(s)]) for s in shards)
    except KeyError as e:
        raise ValueError(f"{sizes_path} has no entry for shard {e}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{sizes_path} holds a sample count that is not an integer: {e}") from e
