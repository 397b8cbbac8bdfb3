"""The files a shard folder holds beside its shards: ``manifest.json``, open_clip's ``sizes.json``
and ``vocabulary.json`` (:mod:`.vocabulary`). Built here for the writer, read here for every reader.

``manifest.json`` (written last: its presence means the shard set is complete) records the format
version (:data:`.shard_format.MANIFEST_VERSION`), the source, the options that determine the
output, the job's fingerprint, counts per split, every skipped record with its reason, a sha256 per shard, the brace
pattern of each split and the vocabulary. Readers take the sampling rate and record length from
it and refuse a folder whose manifest declares another format version.

Readers find these files beside the shards, locally or through the opener that reads remote
shards (:mod:`.locations`): a ``pipe:``, ``http(s)://`` or other webdataset url of a shard leads to
the url of its folder's files.
"""
from __future__ import annotations

import functools
import math
import os
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from ..atomic import write_json_atomic
from ..leads import STANDARD_LEADS
from .locations import ShardReadError, beside, is_remote, read_beside, shard_file_name, shard_folder
from .shard_format import (
    MANIFEST_VERSION,
    MAX_FOLDER_JSON_BYTES,
    SPLITS,
    SampleSchema,
    check_manifest_version,
    jsonable,
    load_json,
    shard_pattern,
)
from .vocabulary import VOCABULARY_FILE, build_vocabulary, check_vocabulary

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

def read_folder_file(shard: str, name: str, required: bool = True):
    """The parsed JSON file `name` of the folder of `shard`, local or remote (:mod:`.locations`);
    None when an optional local file is absent. Anything unreadable is a ValueError naming it."""
    where = beside(shard, name)
    try:
        data = read_beside(shard, name, MAX_FOLDER_JSON_BYTES)
    except FileNotFoundError:
        if not required:
            return None
        raise ValueError(f"{where} is missing: shards must come from `open-clip-ecg shards`, which writes "
                         f"{name} beside them") from None
    except ShardReadError as e:
        raise ShardReadError(f"the shard folder of {shard}: {e}") from None
    return load_json(data, where, name, MAX_FOLDER_JSON_BYTES)


# What every folder of one shard spec must agree on (shard_format.SampleSchema and the crop depend on them)
AGREED = ("shard format version", "sampling rate", "record length", "vocabulary")


def read_shard_info(shards: Sequence[str]) -> Dict:
    """What the folder(s) of `shards` declare: their vocabulary and sampling rate.

    Returns ``{"vocabulary": [{"id", "code", "name", ...}], "sampling_rate": float,
    "n_samples": int (stored record length), "directory": str (the first folder), "text": the text
    mode, "beats": the beat detector whose beats the samples carry, or None}``. A missing or
    inconsistent file, or a manifest of another format version, is a ValueError naming it. Shards
    of several folders (a ``::`` list) must agree on :data:`AGREED`, or the error names the two
    folders that differ; remote shards must be listed in their folder's manifest (locally,
    :func:`.pipeline.expand_shards` checks that they exist).
    """
    first_of_folder: Dict[str, str] = {}
    for shard in shards:
        first_of_folder.setdefault(shard_folder(shard), shard)
    infos = []
    for shard in first_of_folder.values():
        infos.append(_folder_info(shard, infos[0] if infos else None))
    listed = {info["directory"]: info["shards"] for info in infos}
    unlisted = [s for s in shards if is_remote(s) and shard_file_name(s) not in listed[shard_folder(s)]]
    if unlisted:
        example = unlisted[0]
        raise ValueError(f"{len(unlisted)} shard(s) are not in their folder's {MANIFEST_FILE}, e.g. {example} "
                         f"({beside(example, MANIFEST_FILE)} lists {len(listed[shard_folder(example)])} shards)")
    return {k: v for k, v in infos[0].items() if k != "shards"}


def _folder_info(shard: str, first: Optional[Dict] = None) -> Dict:
    """:func:`read_shard_info` of one folder, compared with the `first` folder's when given."""
    manifest_path = beside(shard, MANIFEST_FILE)
    vocabulary = check_vocabulary(read_folder_file(shard, VOCABULARY_FILE), beside(shard, VOCABULARY_FILE))
    manifest = read_folder_file(shard, MANIFEST_FILE)
    directory = shard_folder(shard)
    version = manifest.get("version") if isinstance(manifest, dict) else None
    if first is not None and version != first["version"]:
        _differ(first, directory, "shard format version", first["version"], version)
    if isinstance(manifest, dict):
        check_manifest_version(manifest, manifest_path)
    options = manifest.get("options") if isinstance(manifest, dict) else None
    try:
        rate, seconds = float(options["sampling_rate"]), float(options["seconds"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{manifest_path} lacks numeric options.sampling_rate / options.seconds") from None
    if not (math.isfinite(rate) and math.isfinite(seconds) and rate > 0 and seconds > 0):
        raise ValueError(f"{manifest_path} declares sampling rate {rate} and seconds {seconds}")
    info = {"vocabulary": vocabulary, "sampling_rate": rate, "n_samples": int(round(rate * seconds)),
            "directory": directory, "text": options.get("text"), "version": version,
            "beats": options.get("beats"),
            "shards": {s.get("name") for s in manifest.get("shards", []) if isinstance(s, dict)}}
    if first is not None:
        for what, key in (("sampling rate", "sampling_rate"), ("record length", "n_samples")):
            if info[key] != first[key]:
                _differ(first, directory, what, first[key], info[key])
        difference = vocabulary_difference(first["vocabulary"], vocabulary)
        if difference:
            _differ(first, directory, "vocabulary", *difference)
    return info


def _differ(first: Dict, directory: str, what: str, theirs, ours) -> None:
    raise ValueError(f"the shard folders {first['directory']} and {directory} differ in their {what} "
                     f"({theirs} against {ours}): the shards of one spec must agree on {', '.join(AGREED)}; "
                     "write them in one `open-clip-ecg shards` run")


def vocabulary_difference(a: Sequence[Dict], b: Sequence[Dict]) -> Optional[Tuple[str, str]]:
    """How two vocabularies differ (label ids, codes and names; counts may differ), or None."""
    for entry_a, entry_b in zip(a, b):
        if (entry_a["code"], entry_a["name"]) != (entry_b["code"], entry_b["name"]):
            return (f"label {entry_a['id']} = {entry_a['code']!r} ({entry_a['name']})",
                    f"{entry_b['code']!r} ({entry_b['name']})")
    if len(a) != len(b):
        return f"{len(a)} labels", f"{len(b)}"
    return None


def check_validation_shards(train: Dict, val: Dict) -> None:
    """ValueError unless validation shards (their :func:`read_shard_info`) fit the training ones: the
    same vocabulary, and ECGs at the training rate (a model validated on ECGs at another rate than it
    learns from would report figures of inputs it never sees; resampling shards is the writer's job)."""
    difference = vocabulary_difference(train["vocabulary"], val["vocabulary"])
    if difference:
        raise ValueError(f"the label vocabularies of the training shards in {train['directory']} and the validation "
                         f"shards in {val['directory']} differ ({difference[0]} against {difference[1]}): write "
                         "train and val shards in one `open-clip-ecg shards` run")
    if val["sampling_rate"] != train["sampling_rate"]:
        raise ValueError(f"the validation shards in {val['directory']} hold {val['sampling_rate']:g} Hz ECGs, the "
                         f"training shards in {train['directory']} {train['sampling_rate']:g} Hz: validation must "
                         f"read ECGs at the training rate; write them with `open-clip-ecg shards --sampling-rate "
                         f"{train['sampling_rate']:g}`")


@functools.lru_cache(maxsize=64)
def _folder_schema(shard: str, stamp: tuple) -> SampleSchema:
    return SampleSchema.from_shard_info(_folder_info(shard), len(STANDARD_LEADS))


def shard_schema(shard: str) -> SampleSchema:
    """What the folder of `shard` declares about its samples (cached per folder: locally while its
    files are unchanged, remotely for the process, as remote folder files are read once)."""
    representative = beside(shard, "x.tar")  # one cache entry per folder
    if is_remote(shard):
        return _folder_schema(representative, ())
    paths = [beside(shard, name) for name in (MANIFEST_FILE, VOCABULARY_FILE)]
    return _folder_schema(representative, tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else None
                                                for p in paths))


def count_samples(shards: Sequence[str]) -> Optional[int]:
    """Total samples of `shards` from the sizes.json of their folders (None when a local one is absent)."""
    total = 0
    for names in _names_by_folder(shards).values():
        sizes_path = beside(names[0][0], SIZES_FILE)
        sizes = read_folder_file(names[0][0], SIZES_FILE, required=False)
        if sizes is None:
            return None
        if not isinstance(sizes, dict):
            raise ValueError(f"{sizes_path} must map shard names to sample counts")
        try:
            total += sum(int(sizes[name]) for _, name in names)
        except KeyError as e:
            raise ValueError(f"{sizes_path} has no entry for shard {e}") from e
        except (TypeError, ValueError) as e:
            raise ValueError(f"{sizes_path} holds a sample count that is not an integer: {e}") from e
    return total


def _names_by_folder(shards: Sequence[str]) -> Dict[str, List[Tuple[str, str]]]:
    """{folder: [(shard, its file name), ...]} in the order of `shards`."""
    folders: Dict[str, List[Tuple[str, str]]] = {}
    for shard in shards:
        folders.setdefault(shard_folder(shard), []).append((shard, shard_file_name(shard)))
    return folders
