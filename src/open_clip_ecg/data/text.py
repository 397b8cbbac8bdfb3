"""The text paired with each ECG in the shards (``--text report|labels|both``).

- ``report``: the record's free-text report as written. Sources differ in language: PTB-XL
  reports are mostly German (some English and Swedish), MIMIC-IV-ECG machine reports and the
  synthetic reports are English. A record without a report is skipped with reason
  ``'no_report'``.
- ``labels``: one deterministic English sentence built from the English names of the record's
  label codes, e.g. ``"ECG with first degree AV block and sinus bradycardia."`` (names sorted
  case-insensitively, no randomness, so the same label set always gives the same text). A record
  without labels is skipped with reason ``'no_labels'``.
- ``both``: the label sentence followed by the report; either part may be missing, a record with
  neither is skipped with reason ``'no_report'``. The sentence comes first so that a text tower's
  context limit (77 tokens for CLIP's BPE) can only ever cut the report, never the findings that
  zero-shot prompts must match (long German PTB-XL reports used to push it out).

At training time :class:`TrainingTextSampler` can compose a fresh text per step from the report and
the English finding names instead of using the stored text (``--ecg-text sampled``).
"""
from __future__ import annotations

import itertools
import os
import random
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from .record import RecordEntry, RecordError

TEXT_MODES = ("report", "labels", "both")

# Phrasings of a finding list, shared with zero-shot prompts (open_clip_ecg.zeroshot): training
# texts that look like prompts teach the text tower what a prompt means. None names a lead count,
# so they suit reduced-lead models too; "ECG with {}." is the sentence the shard writer composes.
FINDING_TEMPLATES = (
    "{}",
    "{}.",
    "an ECG showing {}.",
    "an electrocardiogram with {}.",
    "ECG: {}.",
    "the ECG demonstrates {}.",
    "ECG with {}.",
)


def _finding_name(name: str) -> str:
    """A label name as it goes inside a sentence: no surrounding spaces, no final full stop."""
    return name.strip().rstrip(".")


def _clean_names(names: Iterable[str]) -> List[str]:
    return sorted({_finding_name(name) for name in names if name.strip()}, key=lambda n: (n.casefold(), n))


def join_findings(names: Sequence[str]) -> str:
    """``"a, b and c"``, in the order given."""
    if not names:
        raise ValueError("cannot compose a label text from an empty label set")
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def compose_label_text(names: Iterable[str]) -> str:
    """``"ECG with a, b and c."`` from English label names (sorted, duplicates removed)."""
    return f"ECG with {join_findings(_clean_names(names))}."


def make_text(entry: RecordEntry, label_names: Mapping[str, str], mode: str) -> str:
    """The shard text of one record for ``mode``; RecordError when the mode's text is missing.

    ``label_names`` maps codes to English names; codes without a name stand for themselves.
    """
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {mode!r}; expected one of {TEXT_MODES}")
    report = (entry.report or "").strip()
    label_text = compose_label_text(label_names.get(code, code) for code in entry.labels) if entry.labels else ""
    if mode == "report" and not report:
        raise RecordError("no_report", entry.path, "--text report needs a report and the record has none",
                          entry.record_id)
    if mode == "labels" and not label_text:
        raise RecordError("no_labels", entry.path, "--text labels needs labels and the record has none",
                          entry.record_id)
    if mode == "both" and not (report or label_text):
        raise RecordError("no_report", entry.path, "--text both needs a report or labels and the record has neither",
                          entry.record_id)
    parts = {"report": [report], "labels": [label_text], "both": [label_text, report]}[mode]
    return " ".join(part for part in parts if part)


class _ProcessRandom:
    """A random.Random per process, seeded from torch's seed (which open_clip's loop seeds per rank
    and the DataLoader per worker) unless `seed` fixes it (tests)."""

    def __init__(self, seed: Optional[int] = None):
        self.seed, self._rng, self._pid = seed, None, None

    def get(self) -> random.Random:
        if self._pid != os.getpid():  # first use in this process (a DataLoader worker, say)
            self._rng = random.Random(self.seed if self.seed is not None else torch.initial_seed())
            self._pid = os.getpid()
        return self._rng


# The kinds of text TrainingTextSampler draws, in the order of its weights.
SAMPLED_TEXT_KINDS = ("report", "findings", "subset", "both")


class TrainingTextSampler:
    """A fresh training text per sample and step, and the findings that text states.

    Kinds (drawn with ``weights``, in :data:`SAMPLED_TEXT_KINDS` order):

    - ``report``: the report as written (states all the record's findings);
    - ``findings``: all finding names in random order inside a random :data:`FINDING_TEMPLATES`
      phrasing, so the text tower sees finding phrases on their own, as prompts use them;
    - ``subset``: the same with a random non-empty subset of the findings; the text's labels are
      that subset (the loss then targets the overlap of the ECG's findings with the text's);
    - ``both``: the ``findings`` text followed by the report (findings first: truncation cuts the
      report, never the findings).

    A kind that cannot be made (no report, no findings) falls back to the other one; a record with
    neither uses its stored text. Returns ``(text, stated label ids)``.

    Random draws come from a generator seeded per process from torch's seed (which open_clip's loop
    seeds per rank and the DataLoader per worker), so workers do not repeat each other's texts and
    a run is reproducible; ``seed`` fixes it instead (tests).
    """

    def __init__(self, names_by_id: Sequence[str], weights: Sequence[float] = (0.25, 0.25, 0.25, 0.25),
                 seed: Optional[int] = None):
        if len(weights) != len(SAMPLED_TEXT_KINDS) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"text weights must be {len(SAMPLED_TEXT_KINDS)} non-negative numbers "
                             f"({', '.join(SAMPLED_TEXT_KINDS)}) with a positive sum, got {list(weights)}")
        self.names_by_id = [_finding_name(name) for name in names_by_id]
        self.weights = [float(w) for w in weights]
        self.cum_weights = list(itertools.accumulate(self.weights))
        self._random = _ProcessRandom(seed)

    @property
    def rng(self) -> random.Random:
        return self._random.get()

    def __call__(self, stored_text: str, report: Optional[str], label_ids: Sequence[int]) -> Tuple[str, List[int]]:
        parts, ids = self.parts(stored_text, report, label_ids)
        return " ".join(parts), ids

    def parts(self, stored_text: str, report: Optional[str], label_ids: Sequence[int]) -> Tuple[Tuple[str, ...], List[int]]:
        """The text as the parts it joins with one space (findings phrase, report), and its stated
        label ids: a tokenizer can cache each part, where the joined ``both`` text rarely repeats."""
        report = (report or "").strip()
        ids = list(dict.fromkeys(int(i) for i in label_ids))
        rng = self.rng
        kind = rng.choices(SAMPLED_TEXT_KINDS, cum_weights=self.cum_weights)[0]  # = weights=self.weights
        if not ids:
            return (report or stored_text,), ids
        if kind == "report" and report:
            return (report,), ids
        if kind == "subset":
            ids = rng.sample(ids, rng.randint(1, len(ids)))
        else:
            ids = rng.sample(ids, len(ids))  # random order
        findings = rng.choice(FINDING_TEMPLATES).format(join_findings([self.names_by_id[i] for i in ids]))
        if kind == "both" and report:
            return (findings, report), sorted(ids)
        return (findings,), sorted(ids)


class FindingTexts:
    """One text per vocabulary finding (and per finding group), phrased afresh on each call
    (``--ecg-finding-texts``, ``--ecg-finding-groups``).

    Every training step pairs each ECG with every finding of the vocabulary, the way a zero-shot
    prompt asks about one finding ("an ECG showing atrial fibrillation."): the text tower learns
    each finding phrase on its own and the ECG tower meets every finding's negatives in every step,
    not only those that happen to be in the batch's texts. Row ``i < len(names_by_id)`` states
    finding ``i``; then come the `groups`, ``(name, member ids)`` such as the PTB-XL superclass
    ("conduction disturbance", ids of 1AVB, CLBBB, ...), so coarse questions are trained in their
    own words too. A group is left out, and listed in ``skipped``, when it has no member in the
    vocabulary, names the same findings as an earlier row, or reuses an earlier row's name for
    other findings (one phrase, one meaning). The phrasing is a random :data:`FINDING_TEMPLATES`
    template per row and call (seeded like :class:`TrainingTextSampler`).
    """

    def __init__(self, names_by_id: Sequence[str], groups: Sequence[Tuple[str, Sequence[int]]] = (),
                 seed: Optional[int] = None):
        if not names_by_id:
            raise ValueError("finding texts need a label vocabulary with at least one finding")
        rows = [(_finding_name(name), (i,)) for i, name in enumerate(names_by_id)]
        self.skipped: List[Tuple[str, str]] = []
        for name, ids in groups:
            name, ids = _finding_name(name), tuple(sorted(set(int(i) for i in ids)))
            if not all(0 <= i < len(names_by_id) for i in ids):
                raise ValueError(f"finding group {name!r}: member ids {list(ids)} outside the vocabulary "
                                 f"of {len(names_by_id)} findings")
            same_findings = next((other for other, other_ids in rows if other_ids == ids), None)
            same_name = next((other for other, _ in rows if other.casefold() == name.casefold()), None)
            if not ids:
                self.skipped.append((name, "no member finding in the vocabulary"))
            elif same_findings is not None:
                self.skipped.append((name, f"names the same findings as {same_findings!r}"))
            elif same_name is not None:
                self.skipped.append((name, f"{same_name!r} already names other findings"))
            else:
                rows.append((name, ids))
        self.names = [name for name, _ in rows]
        self.member_ids = [ids for _, ids in rows]
        self.n_findings = len(names_by_id)
        self._random = _ProcessRandom(seed)

    def __len__(self) -> int:
        return len(self.names)

    def members(self) -> torch.Tensor:
        """``[len(self), n_findings]`` multi-hot: the findings each row names (the loss's ``finding_members``)."""
        members = torch.zeros(len(self), self.n_findings)
        for row, ids in enumerate(self.member_ids):
            members[row, list(ids)] = 1.0
        return members

    def __call__(self) -> List[str]:
        rng = self._random.get()
        return [rng.choice(FINDING_TEMPLATES).format(name) for name in self.names]


def token_count(tokenizer, text: str) -> Optional[int]:
    """Tokens of `text` before an open_clip tokenizer truncates it (start/end tokens included);
    None for tokenizers that map texts to cached embeddings (those were cut when the cache was built)."""
    if hasattr(tokenizer, "encode"):  # open_clip's SimpleTokenizer (CLIP BPE): + <start>, <end>
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer, our decoder-LM tokenizer
    return None if inner is None else len(inner(text)["input_ids"])


def truncation_counts(tokenizer, texts: Iterable[Tuple[str, str]]) -> Dict[str, int]:
    """How many (text, findings sentence) pairs exceed the tokenizer's context, and how many of
    those lose part of the findings sentence itself (it comes first, so only a sentence longer than
    the context can be cut)."""
    context = tokenizer.context_length
    counts = {"texts": 0, "truncated": 0, "findings_cut": 0, "context_length": int(context)}
    for text, findings in texts:
        counts["texts"] += 1
        if token_count(tokenizer, text) > context:
            counts["truncated"] += 1
            if findings and token_count(tokenizer, findings) > context:
                counts["findings_cut"] += 1
    return counts
