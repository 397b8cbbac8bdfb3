"""How a task is scored, for every method: zero-shot scores by rules, then thresholds and metrics.

The chain ``task -> probabilities -> thresholds -> metrics`` lives here, so the zero-shot
evaluation, the supervised baseline, the linear probe and training-time zero-shot score alike.

**Zero-shot scores.** :mod:`open_clip_ecg.zeroshot` turns prompts into a classifier and ECG
embeddings into pair probabilities; :class:`TaskScorer` decides what is scored for an evaluation
task (:mod:`open_clip_ecg.tasks`) and how (:class:`ScoringRules`):

- **prompt names** (``names``): ``shipped`` (each finding's English name and synonyms from the
  shipped prompt tables), ``name`` (the English name only: synonyms like "slow sinus rhythm"
  for sinus bradycardia share words with commoner findings and blur them), or ``vocabulary`` (the
  name the shards' ``vocabulary.json`` gives the code: the very phrase the model read in its
  training sentences; codes it lacks fall back to ``name``). A user prompt file overrides all.
- **aggregation** (``aggregate``): ``prompt`` scores each label from its own prompts (e.g.
  "myocardial infarction" for the superclass MI); ``noisy-or``, ``max`` or ``mean`` score every
  member statement of the label (IMI, AMI, ... for MI) from the statement's prompts and combine
  their probabilities, so a model trained on fine statements answers coarse questions in the terms
  it learned. A label whose only member is itself scores the same either way.
- **scoring** (``scoring``): ``sigmoid`` is SigLIP's pair probability
  ``sigmoid(s * cos(ecg, finding) + b)``; ``contrast`` compares the finding's prompt with its
  negation ("no atrial fibrillation") as CheXzero does for chest X-rays:
  ``sigmoid(s * (cos(ecg, finding) - cos(ecg, no finding)))``, a score that compares like with
  like across ECGs whatever a prompt's overall similarity level.

The rules are recorded in ``metrics.json`` (:meth:`TaskScorer.describe`). Which rules suit a task
is chosen on validation data, from :data:`ALL_SCORING_RULES` by default
(:func:`open_clip_ecg.evaluate.choose_on_validation`).

**Thresholds and metrics, any method.** A method's scores on one set of shards become
:class:`LabelledScores` (:func:`labelled_scores`: the task's targets beside the scores, records
without a task label dropped). Thresholds are 0.5, or per-label max-F1 on validation records only
(:func:`choose_thresholds`); validation data that share records with the evaluated data are
refused (:func:`check_disjoint`). :func:`summarize` scores with fixed thresholds
(:mod:`open_clip_ecg.metrics`) into an :class:`EvaluationResult`, whose ``metrics`` is what
``metrics.json`` holds (:mod:`open_clip_ecg.reporting` writes it).

The command-line options the evaluating subcommands share are here too
(:func:`add_evaluation_arguments`, :func:`add_scoring_arguments`, :func:`scoring_rules`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import metrics as M
from .data.manifest import read_shard_info
from .prompts import PROMPT_NAMES, task_prompts
from .tasks import SCP, SNOMED, TASKS, Task, TaskLabel, get_task
from .zeroshot import DEFAULT_TEMPLATES, build_zeroshot_classifier

if TYPE_CHECKING:
    from .embed import EmbeddedShards, ShardRecords

AGGREGATIONS = ("prompt", "noisy-or", "max", "mean")
SCORINGS = ("sigmoid", "contrast")
NEGATION = "no {}"


@dataclass
class ScoringRules:
    """How zero-shot scores are made (the options of ``open-clip-ecg evaluate``).

    The defaults won on fold 7 of PTB-XL (``scripts/ptbxl_zeroshot_study.py``): English names
    only, labels as the noisy-OR of their member statements, SigLIP's sigmoid."""

    names: str = "name"
    aggregate: str = "noisy-or"
    scoring: str = "sigmoid"

    def __post_init__(self):
        for value, choices, what in ((self.names, PROMPT_NAMES, "prompt names"),
                                     (self.aggregate, AGGREGATIONS, "aggregation"),
                                     (self.scoring, SCORINGS, "scoring")):
            if value not in choices:
                raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")


# Every rule combination: the grid validation chooses from (open_clip_ecg.evaluate.choose_on_validation).
ALL_SCORING_RULES = tuple(ScoringRules(*rules) for rules in itertools.product(PROMPT_NAMES, AGGREGATIONS, SCORINGS))


def aggregate_probabilities(statement_probs: torch.Tensor, members: Sequence[Sequence[int]], rule: str) -> torch.Tensor:
    """``[N, S]`` statement probabilities -> ``[N, L]``: label l combines columns ``members[l]``.

    ``noisy-or``: 1 - prod(1 - p) (the label is present if any statement is, statements treated as
    independent); ``max``: the most probable statement; ``mean``: their average.
    """
    if rule not in AGGREGATIONS[1:]:
        raise ValueError(f"unknown aggregation {rule!r}; expected one of {', '.join(AGGREGATIONS[1:])}")
    columns = []
    for label, indices in enumerate(members):
        if not indices:
            raise ValueError(f"label #{label} has no member statement to aggregate")
        p = statement_probs[:, list(indices)]
        if rule == "noisy-or":
            columns.append(1 - torch.prod(1 - p, dim=1))
        elif rule == "max":
            columns.append(p.max(dim=1).values)
        else:
            columns.append(p.mean(dim=1))
    return torch.stack(columns, dim=1)


class TaskScorer:
    """Scores ``[N, n_labels]`` of `task` for ECG embeddings, by `rules` (see the module docstring)."""

    def __init__(self, model, tokenizer, task: Task, rules: ScoringRules = ScoringRules(),
                 prompt_file: Optional[str] = None, vocabulary: Optional[Sequence[Mapping]] = None,
                 batch_size: int = 256):
        self.task, self.rules, self.prompt_file = task, rules, prompt_file
        vocabulary_names = {str(v["code"]): str(v["name"]) for v in (vocabulary or ())}
        # What gets prompted: the labels themselves, or every member statement of theirs.
        if rules.aggregate == "prompt":
            self.prompted = list(task.labels)
            self.members = [[i] for i in range(len(task.labels))]
        else:
            system = task.systems[0]
            statements = sorted({code for label in task.labels for code in label.members.get(system, ())})
            keyed = system in (SCP, SNOMED)  # statements of a shipped prompt table
            self.prompted = [TaskLabel(code, vocabulary_names.get(code, code), {}, (code,) if keyed else ())
                             for code in statements]
            index = {code: i for i, code in enumerate(statements)}
            self.members = [sorted(index[c] for c in label.members.get(system, ())) for label in task.labels]
        self.names, templates, self.sources = task_prompts(self.prompted, prompt_file, rules.names, vocabulary_names)
        self.templates = list(templates or DEFAULT_TEMPLATES)

        device = next(model.parameters()).device
        self.positive = build_zeroshot_classifier(model, tokenizer, self.names, self.templates, device, batch_size)
        self.negative = None
        if rules.scoring == "contrast":
            negations = {code: [NEGATION.format(n) for n in names] for code, names in self.names.items()}
            self.negative = build_zeroshot_classifier(model, tokenizer, negations, self.templates, device, batch_size)
        self.logit_scale = model.logit_scale.exp().detach().float()
        self.logit_bias = model.logit_bias.detach().float()

    def scores(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[N, embed_dim]`` ECG embeddings -> ``[N, n_labels]`` scores in [0, 1]."""
        e = F.normalize(embeddings.float(), dim=-1)
        scale = self.logit_scale.to(e.device)
        positive = e @ self.positive.to(e.device).T
        if self.rules.scoring == "contrast":
            probs = torch.sigmoid(scale * (positive - e @ self.negative.to(e.device).T))
        else:
            probs = torch.sigmoid(scale * positive + self.logit_bias.to(e.device))
        if self.rules.aggregate == "prompt":
            return probs
        return aggregate_probabilities(probs, self.members, self.rules.aggregate)

    def labelled_scores(self, embedded: "EmbeddedShards", spec: str) -> "LabelledScores":
        """Scores of the embedded records beside the task's targets (:func:`labelled_scores`)."""
        with torch.no_grad():
            probabilities = self.scores(torch.from_numpy(embedded.embeddings))
        return labelled_scores(self.task, embedded.records, probabilities.cpu().numpy(), spec)

    def describe(self) -> Dict:
        """The rules, templates and prompt names, for ``metrics.json``."""
        formula = {"sigmoid": "sigmoid(exp(logit_scale) * cos(ecg, finding) + logit_bias)",
                   "contrast": "sigmoid(exp(logit_scale) * (cos(ecg, finding) - cos(ecg, 'no ' + finding)))"}
        about = {"names": self.rules.names, "aggregate": self.rules.aggregate, "scoring": self.rules.scoring,
                 "formula": formula[self.rules.scoring], "file": self.prompt_file, "templates": self.templates,
                 "prompted": self.names, "sources": self.sources}
        if self.rules.aggregate != "prompt":
            codes = [item.code for item in self.prompted]
            about["members"] = {label.code: [codes[i] for i in m] for label, m in zip(self.task.labels, self.members)}
            about["aggregation"] = {"noisy-or": "1 - prod(1 - p_statement)", "max": "max(p_statement)",
                                    "mean": "mean(p_statement)"}[self.rules.aggregate]
        return about


# ------------------------------------------------------------------------------------------------
# Scores of any method -> thresholds -> metrics
# ------------------------------------------------------------------------------------------------

@dataclass
class LabelledScores:
    """Scores of one method on one set of shards, restricted to the records the task evaluates."""

    y_true: np.ndarray  # bool [N, n_labels]
    y_score: np.ndarray  # float [N, n_labels]
    keys: List[str]
    spec: str  # the shards as the user gave them
    n_read: int  # records read before the task's filter


@dataclass
class EvaluationResult:
    task: Task
    method: str
    scores: LabelledScores
    thresholds: np.ndarray
    metrics: Dict  # what metrics.json holds


def resolve_task(task: Union[str, Task], shards: Sequence[str]) -> Task:
    """A task object; `labels` takes the vocabulary written beside `shards`."""
    if isinstance(task, Task):
        return task
    return get_task(task, vocabulary=read_shard_info(shards)["vocabulary"] if task == "labels" else None)


def labelled_scores(task: Task, records: "ShardRecords", y_score: np.ndarray, spec: str) -> LabelledScores:
    """Task targets of `records` beside their scores, keeping the records the task evaluates."""
    y_true, keep = task.targets(records.label_codes, records.metas, records.keys, where=f"shards {spec!r}")
    keys = [k for k, kept in zip(records.keys, keep) if kept]
    return LabelledScores(y_true[keep], np.asarray(y_score, dtype=np.float64)[keep], keys, spec, len(keep))


def describe_shards(spec, split: Optional[str] = None) -> str:
    """The shards as the user named them, e.g. ``'shards/ (split test)'``."""
    return f"{spec} (split {split})" if split else str(spec)


def check_disjoint(evaluated, other, flag: str = "--val-data",
                   reason: str = "thresholds must come from other records") -> None:
    """Refuse `other` data (given as `flag`) that share records with the evaluated data: what they
    choose (thresholds, a probe's weights) would leak into the figures; `reason` says which.

    Both arguments have ``keys`` and ``spec`` (:class:`LabelledScores` or the probe's rows)."""
    shared = sorted(set(evaluated.keys) & set(other.keys))
    if shared:
        raise ValueError(f"{flag} {other.spec!r} and --data {evaluated.spec!r} share {len(shared)} "
                         f"record(s) (e.g. {shared[0]}): {reason}")


def choose_thresholds(codes: Sequence[str], validation: Optional[LabelledScores] = None):
    """(thresholds, metrics.json 'thresholds' entry): 0.5, or max-F1 per label on `validation`."""
    if validation is None:
        return (np.full(len(codes), M.DEFAULT_THRESHOLD),
                {"source": "fixed", "value": M.DEFAULT_THRESHOLD,
                 "note": "no --val-data: every label uses 0.5; no data chose it"})
    thresholds, sources = M.max_f1_thresholds(validation.y_true, validation.y_score)
    return thresholds, {
        "source": "validation max-F1", "val_data": validation.spec, "val_records": len(validation.keys),
        "note": "per-label thresholds maximising F1 on the validation records; the evaluated records "
                "were not used",
        "per_label": {code: {"threshold": float(t), "source": s} for code, t, s in zip(codes, thresholds, sources)},
    }


def summarize(task: Task, method: str, scores: LabelledScores, thresholds: np.ndarray, threshold_info: Dict,
              n_bootstrap: int = 1000, seed: int = 0, about: Optional[Dict] = None) -> EvaluationResult:
    """Score `scores` with fixed `thresholds`: the metrics.json content, whatever the method."""
    evaluated = M.evaluate_scores(scores.y_true, scores.y_score, thresholds, task.codes,
                                  n_bootstrap=n_bootstrap, seed=seed)
    names = {label.code: label.name for label in task.labels}
    label_sources = threshold_info.get("per_label", {})
    for row in evaluated["per_label"]:
        row["name"] = names[row["code"]]
        row["threshold_source"] = label_sources.get(row["code"], {}).get("source", threshold_info["source"])
    metrics = {
        "method": method,
        **(about or {}),
        "task": {"name": task.name, "description": task.description, "codes": task.codes,
                 **({"notes": task.notes} if task.notes else {})},
        "data": {"spec": scores.spec, "records_read": scores.n_read, "records_evaluated": len(scores.keys),
                 "records_without_task_label_not_evaluated": scores.n_read - len(scores.keys)},
        "thresholds": threshold_info,
        **evaluated,
    }
    return EvaluationResult(task, method, scores, np.asarray(thresholds), metrics)


# ------------------------------------------------------------------------------------------------
# Command-line options shared by the evaluating subcommands and scripts
# ------------------------------------------------------------------------------------------------

def add_evaluation_arguments(parser) -> None:
    """Options every evaluating subcommand (evaluate, train-supervised, probe) shares."""
    parser.add_argument("--data", required=True,
                        help="evaluated shards: brace pattern, glob, '::' list, or a folder with --split")
    parser.add_argument("--split", default=None, help="split of --data when it is a folder (e.g. test)")
    parser.add_argument("--val-data", default=None,
                        help="validation shards: per-label max-F1 thresholds are chosen here (default: 0.5)")
    parser.add_argument("--val-split", default=None, help="split of --val-data when it is a folder (e.g. val)")
    parser.add_argument("--task", default="labels", choices=TASKS, help="label set to score (default: labels)")
    parser.add_argument("--out", required=True, help="output folder for metrics.json, per_label.*, report.md")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=None, help="centre crop length (default: whole record)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def add_scoring_arguments(parser) -> None:
    """The zero-shot scoring rules (:class:`ScoringRules`) as options of ``open-clip-ecg evaluate``."""
    defaults = ScoringRules()
    parser.add_argument("--prompt-names", choices=PROMPT_NAMES, default=defaults.names,
                        help=f"finding names in prompts: shipped names and synonyms, the English name only, or "
                             f"the shards' vocabulary names (default {defaults.names})")
    parser.add_argument("--aggregate", choices=AGGREGATIONS, default=defaults.aggregate,
                        help="score a label from its own prompts, or combine the probabilities of its member "
                             f"statements (PTB-XL superclasses/subclasses) (default {defaults.aggregate})")
    parser.add_argument("--scoring", choices=SCORINGS, default=defaults.scoring,
                        help="SigLIP pair probability, or finding vs its negation ('no ...') "
                             f"(default {defaults.scoring})")


def scoring_rules(args) -> ScoringRules:
    """The :class:`ScoringRules` of parsed :func:`add_scoring_arguments` options."""
    return ScoringRules(names=args.prompt_names, aggregate=args.aggregate, scoring=args.scoring)
