"""Evaluation tasks: which findings are scored, and which of a record's codes make each one positive.

Tasks (``get_task(name, vocabulary)``):

- ``labels``: the shards' own vocabulary (``vocabulary.json``); a record's positives are its
  ``label_codes``; the prompts are the vocabulary's English names (a user prompt file still
  overrides them by code).
- ``ptbxl-all`` / ``-diag`` / ``-form`` / ``-rhythm`` / ``-sub`` / ``-super``: the PTB-XL benchmark
  label sets of Strodthoff et al. (IEEE JBHI 2021; arXiv 2020): 71 statements, 44 diagnostic, 19 form, 12 rhythm
  statements, 23 diagnostic subclasses, 5 diagnostic superclasses. Labels are derived from the raw
  ``meta['scp_codes']`` every PTB-XL shard sample keeps, with the statement table shipped in
  ``resources/ptbxl_scp_statements.csv`` (so the shards' own label level does not matter) and
  :func:`open_clip_ecg.data.readers.ptbxl.scp_codes_at_level`. As in the benchmark, every code
  counts whatever its likelihood, and records with no label of the task are not evaluated
  (``drop_unlabelled``; e.g. the rhythm task scores only records with a rhythm statement).
- ``cinc`` / ``cinc2020``: the scored SNOMED CT findings of the PhysioNet/CinC Challenge 2021 (30
  codes) / 2020 (27 codes), with the Challenges' equivalent codes merged into one label (RBBB =
  CRBBB, PAC = SVPB, PVC = VPB, and in 2021 LBBB = CLBBB): 26 / 24 labels. All records count.
- ``ptbxl-cinc-shared``: cross-institution. The findings both label systems name, from the table
  ``resources/scp_snomed_map.csv`` (one row per finding: its SCP statements, its SNOMED codes, and
  whether the match is ``exact``, ``grouped`` (one side is a union of narrower codes) or
  ``approximate``). A record's positives come from its SCP codes when it has
  ``meta['scp_codes']`` (PTB-XL) and from its SNOMED ``label_codes`` otherwise (Challenge data),
  so a model trained on PTB-XL can take thresholds from PTB-XL validation shards
  (``--val-data``) and be evaluated on Challenge shards (``--data``), finding for finding. Not
  shared, hence absent: the axis deviations (PTB-XL keeps them outside the SCP statements) and
  PTB-XL's NORM (no Challenge code means "normal ECG"; sinus rhythm is not the same finding).
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .data.readers.ptbxl import load_scp_statements, scp_codes_at_level, scp_label_names
from .prompts import SNOMED_PROMPTS, load_prompt_file

RESOURCES = Path(__file__).resolve().parent / "resources"
SCP_STATEMENTS_CSV = RESOURCES / "ptbxl_scp_statements.csv"
SCP_SNOMED_MAP_CSV = RESOURCES / "scp_snomed_map.csv"

# task name -> PTB-XL label level (data.readers.ptbxl.LABEL_LEVELS)
PTBXL_TASK_LEVELS = {
    "ptbxl-all": "all",
    "ptbxl-diag": "diagnostic",
    "ptbxl-form": "form",
    "ptbxl-rhythm": "rhythm",
    "ptbxl-sub": "subclass",
    "ptbxl-super": "superclass",
}

# Challenge-scored SNOMED CT codes; a tuple is one class of codes the Challenge scores as equivalent.
# (code abbreviation, codes) from the Challenges' dx mapping tables and scoring equivalences.
CINC2021_SCORED: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("AF", ("164889003",)), ("AFL", ("164890007",)), ("BBB", ("6374002",)), ("Brady", ("426627000",)),
    ("CLBBB", ("733534002", "164909002")), ("CRBBB", ("713427006", "59118001")), ("IAVB", ("270492004",)),
    ("IRBBB", ("713426002",)), ("LAD", ("39732003",)), ("LAnFB", ("445118002",)), ("LPR", ("164947007",)),
    ("LQRSV", ("251146004",)), ("LQT", ("111975006",)), ("NSIVCB", ("698252002",)), ("NSR", ("426783006",)),
    ("PAC", ("284470004", "63593006")), ("PR", ("10370003",)), ("PRWP", ("365413008",)),
    ("PVC", ("427172004", "17338001")), ("QAb", ("164917005",)), ("RAD", ("47665007",)), ("SA", ("427393009",)),
    ("SB", ("426177001",)), ("STach", ("427084000",)), ("TAb", ("164934002",)), ("TInv", ("59931005",)),
)
CINC2020_SCORED: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("AF", ("164889003",)), ("AFL", ("164890007",)), ("Brady", ("426627000",)),
    ("CRBBB", ("713427006", "59118001")), ("IAVB", ("270492004",)), ("IRBBB", ("713426002",)),
    ("LAD", ("39732003",)), ("LAnFB", ("445118002",)), ("LBBB", ("164909002",)), ("LPR", ("164947007",)),
    ("LQRSV", ("251146004",)), ("LQT", ("111975006",)), ("NSIVCB", ("698252002",)), ("NSR", ("426783006",)),
    ("PAC", ("284470004", "63593006")), ("PR", ("10370003",)), ("PVC", ("427172004", "17338001")),
    ("QAb", ("164917005",)), ("RAD", ("47665007",)), ("SA", ("427393009",)), ("SB", ("426177001",)),
    ("STach", ("427084000",)), ("TAb", ("164934002",)), ("TInv", ("59931005",)),
)

TASKS = ("labels", *PTBXL_TASK_LEVELS, "cinc", "cinc2020", "ptbxl-cinc-shared")

# Code systems a record's findings can be read in.
SCP, SNOMED, VOCABULARY = "scp", "snomed", "vocabulary"


@dataclass(frozen=True)
class TaskLabel:
    """One scored finding: positive when a record has any of ``members[system]`` in that system."""

    code: str
    name: str
    members: Mapping[str, FrozenSet[str]]
    prompt_keys: Tuple[str, ...] = ()  # keys into the prompt tables (open_clip_ecg.prompts)


@dataclass(frozen=True)
class Task:
    name: str
    labels: Tuple[TaskLabel, ...]
    systems: Tuple[str, ...]  # code systems the task reads, in order of preference
    drop_unlabelled: bool
    description: str
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def codes(self) -> List[str]:
        return [label.code for label in self.labels]

    def multi_hot(self, label_codes: Sequence[Sequence[str]], metas: Sequence[Mapping],
                  keys: Optional[Sequence[str]] = None, where: str = "the data") -> Tuple[np.ndarray, np.ndarray]:
        """Multi-hot ``[N, n_labels]`` (bool) and the mask of records the task evaluates.

        Raises ValueError when a record's codes are in no system this task reads (e.g. a PTB-XL
        task on Challenge shards), listing the label codes the data does contain.
        """
        y = np.zeros((len(label_codes), len(self.labels)), dtype=bool)
        incompatible = []
        for i, (codes, meta) in enumerate(zip(label_codes, metas)):
            system, record_codes = _record_codes(codes, meta, self.systems)
            if system is None:
                incompatible.append(i)
                continue
            for j, label in enumerate(self.labels):
                y[i, j] = not record_codes.isdisjoint(label.members.get(system, ()))
        if incompatible:
            i = incompatible[0]
            example = keys[i] if keys is not None else f"record #{i}"
            raise ValueError(
                f"task {self.name!r} reads {' or '.join(_SYSTEM_NAMES[s] for s in self.systems)}, but "
                f"{len(incompatible)} of {len(label_codes)} records of {where} have neither (e.g. {example} "
                f"with label codes {list(label_codes[i])[:8]}); the data's label codes are: "
                f"{_code_summary(label_codes)}")
        keep = y.any(1) if self.drop_unlabelled else np.ones(len(y), dtype=bool)
        return y, keep

    def targets(self, label_codes: Sequence[Sequence[str]], metas: Sequence[Mapping],
                keys: Optional[Sequence[str]] = None, where: str = "the data") -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`multi_hot` for a whole data set, which must contain at least one task label:
        otherwise a ValueError lists the codes the data does have."""
        y, keep = self.multi_hot(label_codes, metas, keys, where)
        if not y[keep].any():
            raise ValueError(
                f"none of the {len(self.labels)} labels of task {self.name!r} ({', '.join(self.codes[:12])}"
                f"{', ...' if len(self.labels) > 12 else ''}) occurs in {where} ({len(label_codes)} records); "
                f"its label codes are: {_code_summary(label_codes)}")
        return y, keep


_SYSTEM_NAMES = {SCP: "PTB-XL SCP codes (meta['scp_codes'])", SNOMED: "SNOMED CT label codes",
                 VOCABULARY: "the shards' label codes"}


def _record_codes(codes: Sequence[str], meta: Mapping, systems: Sequence[str]):
    """(system, codes) of one record in the first of `systems` it has codes in; (None, None) if none.

    A record with no label codes at all (and no SCP dict) reads as an empty set in any system.
    """
    available = {VOCABULARY: set(codes)}
    if isinstance(meta.get("scp_codes"), Mapping):
        available[SCP] = set(meta["scp_codes"])
    elif all(str(c).isdigit() for c in codes):
        available[SNOMED] = set(codes)
    for system in systems:
        if system in available:
            return system, available[system]
    return (systems[0], set()) if not codes else (None, None)


def _code_summary(label_codes: Sequence[Sequence[str]], limit: int = 20) -> str:
    counts = Counter(code for codes in label_codes for code in codes)
    if not counts:
        return "none (no record has a label code)"
    shown = ", ".join(f"{code} ({n})" for code, n in counts.most_common(limit))
    return shown + (f", ... ({len(counts)} distinct)" if len(counts) > limit else "")


def _ptbxl_task(name: str) -> Task:
    level = PTBXL_TASK_LEVELS[name]
    statements = load_scp_statements(SCP_STATEMENTS_CSV)
    names = scp_label_names(statements, level)
    members: Dict[str, set] = {code: set() for code in names}
    for code in statements:  # which statements make each label of this level positive
        for label in scp_codes_at_level({code: 0.0}, statements, level):
            members[label].add(code)
    prefix = {"subclass": "subclass:", "superclass": "superclass:"}.get(level, "")
    labels = tuple(
        TaskLabel(code, names[code], {SCP: frozenset(members[code])}, (prefix + code,))
        for code in sorted(names))
    return Task(name, labels, systems=(SCP,), drop_unlabelled=True,
                description=f"PTB-XL benchmark '{level}' labels (Strodthoff et al. 2021), {len(labels)} labels; "
                            "records without a label of this level are not evaluated")


def _cinc_task(name: str) -> Task:
    scored = CINC2021_SCORED if name == "cinc" else CINC2020_SCORED
    names = _snomed_names()
    labels = tuple(TaskLabel(abbreviation, names.get(codes[0], abbreviation), {SNOMED: frozenset(codes)}, codes)
                   for abbreviation, codes in scored)
    year = "2021" if name == "cinc" else "2020"
    return Task(name, labels, systems=(SNOMED,), drop_unlabelled=False,
                description=f"PhysioNet/CinC Challenge {year} scored SNOMED CT findings, equivalent codes merged, "
                            f"{len(labels)} labels")


def load_scp_snomed_map(path=SCP_SNOMED_MAP_CSV) -> List[Dict]:
    """Rows of the SCP <-> SNOMED table: finding, name, match, scp_codes, snomed_codes (lists), note."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    required = {"finding", "name", "match", "scp_codes", "snomed_codes", "note"}
    if not rows or not required <= set(rows[0]):
        raise ValueError(f"{path}: expected columns {sorted(required)}")
    for row in rows:
        row["scp_codes"] = row["scp_codes"].split()
        row["snomed_codes"] = row["snomed_codes"].split()
        if not row["scp_codes"] or not row["snomed_codes"]:
            raise ValueError(f"{path}: finding {row['finding']!r} needs SCP and SNOMED codes")
    return rows


def _shared_task(path=SCP_SNOMED_MAP_CSV) -> Task:
    rows = load_scp_snomed_map(path)
    labels = tuple(
        TaskLabel(row["finding"], row["name"],
                  {SCP: frozenset(row["scp_codes"]), SNOMED: frozenset(row["snomed_codes"])},
                  tuple(row["snomed_codes"]) + (tuple(row["scp_codes"]) if row["match"] == "exact" else ()))
        for row in rows)  # prompts of a grouped / approximate match: the (broader) SNOMED names only
    return Task("ptbxl-cinc-shared", labels, systems=(SCP, SNOMED), drop_unlabelled=False,
                description=f"findings shared by PTB-XL SCP statements and Challenge SNOMED CT codes "
                            f"({len(labels)}, {Path(path).name}); SCP codes read where a record has them, "
                            "SNOMED codes otherwise",
                notes={row["finding"]: f"{row['match']}: {row['note']}".rstrip(": ") for row in rows})


def _vocabulary_task(vocabulary: Sequence[Mapping]) -> Task:
    # No prompt keys: the shards name their own labels, and those names are the prompts. Codes
    # that look like SCP/SNOMED codes (the synthetic set's do) must not pull in another system's
    # synonyms; the ptbxl-*/cinc tasks use the shipped prompt tables.
    labels = tuple(TaskLabel(str(entry["code"]), str(entry.get("name") or entry["code"]),
                             {VOCABULARY: frozenset([str(entry["code"])])}, ())
                   for entry in vocabulary)
    if not labels:
        raise ValueError("the shards' vocabulary.json is empty: task 'labels' has nothing to score")
    return Task("labels", labels, systems=(VOCABULARY,), drop_unlabelled=False,
                description=f"the shards' own label vocabulary, {len(labels)} labels")


def _snomed_names() -> Dict[str, str]:
    return {code: entry["name"] for code, entry in load_prompt_file(SNOMED_PROMPTS)["findings"].items()}


def finding_groups(task_names: Sequence[str], vocabulary_codes: Sequence[str]) -> List[Tuple[str, List[int]]]:
    """``(label name, vocabulary ids of its member codes)`` for every label of the named tasks, in
    task order: e.g. ``ptbxl-super`` gives "conduction disturbance" with the ids of 1AVB, CLBBB, ...
    (``--ecg-finding-groups``). Members are read in every code system the task names (SCP
    statements for PTB-XL shards, SNOMED codes for Challenge shards); a label with no member in the
    vocabulary gets no ids (the caller reports it)."""
    groups = []
    for task_name in task_names:
        if task_name == "labels":
            raise ValueError("finding groups come from a task with its own label hierarchy (ptbxl-super, "
                             "ptbxl-sub, cinc, ...); 'labels' is the vocabulary itself")
        task = get_task(task_name)
        groups += [(label.name, ids) for label, ids in zip(task.labels, member_indices(task, vocabulary_codes))]
    return groups


def member_indices(task: Task, codes: Sequence[str]) -> List[List[int]]:
    """Per label of `task`, the positions in `codes` of its member codes, read in every code system
    the task names (e.g. the statements of a superclass among a statement-level model's outputs)."""
    index = {str(code): i for i, code in enumerate(codes)}
    return [sorted(index[code] for code in set().union(*label.members.values()) if code in index)
            for label in task.labels]


def get_task(name: str, vocabulary: Optional[Sequence[Mapping]] = None) -> Task:
    """The task called `name`; ``labels`` needs the shards' `vocabulary` (``vocabulary.json``)."""
    if name == "labels":
        if vocabulary is None:
            raise ValueError("task 'labels' needs the shards' vocabulary (vocabulary.json)")
        return _vocabulary_task(vocabulary)
    if name in PTBXL_TASK_LEVELS:
        return _ptbxl_task(name)
    if name in ("cinc", "cinc2020"):
        return _cinc_task(name)
    if name == "ptbxl-cinc-shared":
        return _shared_task()
    raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
