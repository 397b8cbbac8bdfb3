"""Zero-shot multi-label evaluation with honest thresholds and a per-label report.

    open-clip-ecg evaluate --model ECG-RN18-MiniLM --pretrained logs/run/checkpoints/epoch_10.pt \\
        --data shards/ --split test --val-data shards/ --val-split val --task ptbxl-super --out report/

- Scores: SigLIP's sigmoid probability per (ECG, finding), from prompt-ensembled finding
  embeddings (:mod:`open_clip_ecg.zeroshot`, :mod:`open_clip_ecg.prompts`).
- Thresholds: 0.5, or per-label max-F1 thresholds chosen on ``--val-data`` only. The evaluated
  data never choose anything: validation shards that share a shard or a record key with the
  evaluated ones are refused. ``metrics.json`` records which thresholds were used and why.
- Metrics (:mod:`open_clip_ecg.metrics`): macro/micro AUROC, macro AP, micro/macro F1,
  sample-averaged Jaccard, exact match, with bootstrap 95% intervals; per label AUROC, AP, F1,
  sensitivity, specificity, prevalence and counts. Labels without positives (or negatives) in the
  evaluated data get no AUROC: listed, counted, and left out of the macro means.
- Outputs in ``--out``: ``metrics.json``, ``per_label.csv``, ``per_label.png`` (AUROC per label,
  sorted, beside its prevalence), ``roc_curves.png`` and ``report.md``.

Python API: :func:`evaluate_zeroshot` (a model from :func:`open_clip_ecg.factory.load_model`;
the report from :func:`open_clip_ecg.reporting.write_report`); :func:`choose_on_validation` picks,
per task, the checkpoint and scoring rules with the best validation macro AUROC (the quickstart
does, as the PTB-XL study does). Thresholds and metrics are
:mod:`open_clip_ecg.scoring`'s, as for the supervised baseline and the linear probe, so every
method is scored and reported the same way.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from . import metrics as M
from .data.manifest import read_shard_info
from .embed import EmbeddedShards, embed_shards, model_leads, resolve_shards
from .factory import add_model_arguments, load_model, load_model_from_args
from .reporting import headline_line, write_report
from .scoring import (
    ALL_SCORING_RULES,
    EvaluationResult,
    LabelledScores,
    ScoringRules,
    TaskScorer,
    add_evaluation_arguments,
    add_scoring_arguments,
    check_disjoint,
    choose_thresholds,
    describe_shards,
    resolve_task,
    scoring_rules,
    summarize,
)
from .tasks import Task
from .zeroshot import PromptEmbeddingCache

__all__ = ["evaluate_zeroshot", "choose_on_validation", "TaskChoice", "add_arguments", "run"]


def evaluate_zeroshot(model, tokenizer, data, task: Union[str, Task] = "labels", *, split: Optional[str] = None,
                      val_data=None, val_split: Optional[str] = None, prompts: Optional[str] = None,
                      seconds: Optional[float] = None, batch_size: int = 64, workers: int = 0,
                      n_bootstrap: int = 1000, seed: int = 0, about: Optional[Dict] = None,
                      rules: ScoringRules = ScoringRules()) -> EvaluationResult:
    """Zero-shot evaluation of `model` on the shards `data` (a spec, or a folder with `split`).

    `prompts` is a user prompt JSON (see :mod:`open_clip_ecg.prompts`); `val_data` / `val_split`
    give the validation shards thresholds are chosen on (none: 0.5); `rules` say which prompt names,
    aggregation and scoring make the scores (:mod:`open_clip_ecg.scoring`).
    """
    if getattr(model, "logit_bias", None) is None:
        raise ValueError("zero-shot probabilities need a SigLIP-trained model with a logit_bias")
    shards = resolve_shards(data, split)
    val_shards = resolve_shards(val_data, val_split) if val_data is not None else None
    if val_shards and set(map(os.path.abspath, val_shards)) & set(map(os.path.abspath, shards)):
        raise ValueError(f"--val-data {val_data!r} and --data {data!r} include the same shard(s): thresholds "
                         "must come from other records")
    task = resolve_task(task, shards)
    scorer = TaskScorer(model, tokenizer, task, rules, prompts, read_shard_info(shards)["vocabulary"], batch_size)

    def score(spec, shard_list) -> Tuple[LabelledScores, EmbeddedShards]:
        embedded = embed_shards(model, shard_list, seconds=seconds, batch_size=batch_size, workers=workers)
        return scorer.labelled_scores(embedded, spec), embedded

    evaluated, embedded = score(describe_shards(data, split), shards)
    validation = None
    if val_shards is not None:
        validation, _ = score(describe_shards(val_data, val_split), val_shards)
        check_disjoint(evaluated, validation)
    thresholds, threshold_info = choose_thresholds(task.codes, validation)
    about = {**(about or {}),
             "ecg": {"n_samples": embedded.n_samples, "sampling_rate": embedded.sampling_rate,
                     "seconds": embedded.n_samples / embedded.sampling_rate, "crop": "centre",
                     "leads": model_leads(model)},
             "logit_scale": float(scorer.logit_scale), "logit_bias": float(scorer.logit_bias.reshape(-1)[0]),
             "zeroshot": scorer.describe()}
    return summarize(task, "zero-shot", evaluated, thresholds, threshold_info, n_bootstrap, seed, about)


@dataclass
class TaskChoice:
    """The checkpoint and scoring rules a task is evaluated with, and the validation AUROC that chose them."""

    checkpoint: str
    rules: ScoringRules
    val_macro_auroc: Optional[float]
    chosen_on: Optional[str]  # the validation split (or shards) that chose; None: nothing was chosen on data
    note: Optional[str] = None  # why, when nothing was chosen on data

    def describe(self) -> Dict:
        """For ``metrics.json``."""
        about = {"chosen_on": self.chosen_on, "checkpoint": self.checkpoint, "rules": asdict(self.rules),
                 "val_macro_auroc": self.val_macro_auroc}
        return {**about, "note": self.note} if self.note else about


def choose_on_validation(model_name: str, checkpoints: Sequence[str], val_data, val_split: Optional[str] = None,
                         tasks: Sequence[str] = ("labels",), rules_grid: Sequence[ScoringRules] = ALL_SCORING_RULES,
                         *, fallback_rules: ScoringRules = ScoringRules(), prompts: Optional[str] = None,
                         seconds: Optional[float] = None, batch_size: int = 64,
                         workers: int = 0) -> Tuple[Dict[str, TaskChoice], List[Dict]]:
    """Per task, the checkpoint x scoring rules with the best macro AUROC on the validation shards.

    Which training length and which scoring rule rank a task best differ from task to task (the
    PTB-XL study, ``scripts/ptbxl_zeroshot_study.py``), and nothing but labelled data can tell, so
    validation data choose both, as the supervised baseline chooses its epoch. Each checkpoint is
    loaded and embeds the validation shards once. Ties go to the earlier candidate (checkpoints in
    the given order, then `rules_grid`'s). A task whose AUROC is undefined for every candidate takes
    the last checkpoint with `fallback_rules`, and its note says so.

    Returns ``({task: TaskChoice}, candidates)``: one row per task x checkpoint x rules (task,
    checkpoint, names, aggregate, scoring, val_macro_auroc), in candidate order.
    """
    if not checkpoints or not rules_grid:
        raise ValueError("choosing on validation data needs at least one checkpoint and one scoring rule")
    val_shards = resolve_shards(val_data, val_split)
    spec, vocabulary = describe_shards(val_data, val_split), read_shard_info(val_shards)["vocabulary"]
    resolved = {name: resolve_task(name, val_shards) for name in tasks}
    candidates = []
    for checkpoint in map(str, checkpoints):
        model, tokenizer = load_model(model_name, checkpoint)
        embedded = embed_shards(model, val_shards, seconds=seconds, batch_size=batch_size, workers=workers)
        model = PromptEmbeddingCache(model)  # the grid prompts the same texts under many rules
        for rules in rules_grid:
            for name, task in resolved.items():
                scorer = TaskScorer(model, tokenizer, task, rules, prompts, vocabulary, batch_size)
                scores = scorer.labelled_scores(embedded, spec)
                candidates.append({"task": name, "checkpoint": checkpoint, **asdict(rules),
                                   "val_macro_auroc": M.macro_auroc(scores.y_true, scores.y_score)})
    choices = {}
    for name in tasks:
        defined = [row for row in candidates if row["task"] == name and row["val_macro_auroc"] is not None]
        if not defined:
            choices[name] = TaskChoice(str(checkpoints[-1]), fallback_rules, None, None,
                                       f"no label of {name} has both positives and negatives in {spec}: "
                                       "the last checkpoint with the default rules, nothing chosen")
            continue
        best = max(defined, key=lambda row: row["val_macro_auroc"])  # the first of equals
        choices[name] = TaskChoice(best["checkpoint"], ScoringRules(best["names"], best["aggregate"], best["scoring"]),
                                   best["val_macro_auroc"], val_split or spec)
    return choices, candidates


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    add_evaluation_arguments(parser)
    parser.add_argument("--prompts", default=None, help="prompt JSON overriding the shipped finding names/templates")
    add_scoring_arguments(parser)


def run(args) -> int:
    model, tokenizer = load_model_from_args(args, device=args.device)
    result = evaluate_zeroshot(
        model, tokenizer, args.data, args.task, split=args.split, val_data=args.val_data, val_split=args.val_split,
        prompts=args.prompts, seconds=args.seconds, batch_size=args.batch_size, workers=args.workers,
        n_bootstrap=args.bootstrap, seed=args.seed, about={"model": args.model, "pretrained": args.pretrained},
        rules=scoring_rules(args))
    paths = write_report(result, args.out)
    print(headline_line(result))
    print(f"report: {paths['report.md']}")
    return 0
