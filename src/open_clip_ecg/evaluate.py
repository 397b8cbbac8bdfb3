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

Python API: :func:`load_model`, :func:`evaluate_zeroshot`, :func:`write_report`; the supervised
baseline and the linear probe go through :func:`choose_thresholds`, :func:`summarize` and
:func:`write_report` too, so every method is scored and reported the same way.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from . import metrics as M
from .data.manifest import read_shard_info
from .atomic import write_atomic
from .embed import EmbeddedShards, ShardRecords, embed_shards, load_model, model_leads, resolve_shards
from .scoring import AGGREGATIONS, PROMPT_NAMES, SCORINGS, ScoringRules, TaskScorer
from .tasks import TASKS, Task, get_task

__all__ = ["EvaluationResult", "LabelledScores", "choose_thresholds", "evaluate_zeroshot", "labelled_scores",
           "load_model", "resolve_task", "summarize", "write_report"]


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


def labelled_scores(task: Task, records: ShardRecords, y_score: np.ndarray, spec: str) -> LabelledScores:
    """Task targets of `records` beside their scores, keeping the records the task evaluates."""
    y_true, keep = task.targets(records.label_codes, records.metas, records.keys, where=f"shards {spec!r}")
    keys = [k for k, kept in zip(records.keys, keep) if kept]
    return LabelledScores(y_true[keep], np.asarray(y_score, dtype=np.float64)[keep], keys, spec, len(keep))


def describe_shards(spec, split: Optional[str] = None) -> str:
    """The shards as the user named them, e.g. ``'shards/ (split test)'``."""
    return f"{spec} (split {split})" if split else str(spec)


def check_disjoint(evaluated, validation) -> None:
    """Refuse validation data that share records with the evaluated data (thresholds would leak).

    Both arguments have ``keys`` and ``spec`` (:class:`LabelledScores` or the probe's rows)."""
    shared = sorted(set(evaluated.keys) & set(validation.keys))
    if shared:
        raise ValueError(f"--val-data {validation.spec!r} and --data {evaluated.spec!r} share {len(shared)} "
                         f"record(s) (e.g. {shared[0]}): thresholds must come from other records")


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
        with torch.no_grad():
            probabilities = scorer.scores(torch.from_numpy(embedded.embeddings))
        return labelled_scores(task, embedded.records, probabilities.cpu().numpy(), spec), embedded

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


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

PER_LABEL_COLUMNS = ("code", "name", "n", "n_positive", "prevalence", "auroc", "auroc_status", "ap", "f1",
                     "sensitivity", "specificity", "threshold", "threshold_source")


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _plot_per_label(result: EvaluationResult, path: str) -> None:
    rows = result.metrics["per_label"]
    defined = sorted((r for r in rows if r["auroc"] is not None), key=lambda r: r["auroc"])
    undefined = [r for r in rows if r["auroc"] is None]
    ordered = undefined + defined  # bottom to top: best AUROC on top, undefined at the bottom
    height = max(3.0, 0.28 * len(ordered) + 1.5)
    fig = Figure(figsize=(10, height))
    ax_auc, ax_prev = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [3, 1]})
    positions = np.arange(len(ordered))
    ax_auc.barh(positions, [r["auroc"] or 0 for r in ordered], color=["#bbbbbb" if r["auroc"] is None
                                                                      else "#3b75af" for r in ordered])
    for y, r in zip(positions, ordered):
        text = _fmt(r["auroc"]) if r["auroc"] is not None else r["auroc_status"]
        ax_auc.text((r["auroc"] or 0) + 0.01, y, text, va="center", fontsize=7)
    macro = result.metrics["headline"]["macro_auroc"]
    if macro is not None:
        ax_auc.axvline(macro, color="#c44e52", linestyle="--", linewidth=1, label=f"macro AUROC {macro:.3f}")
        ax_auc.legend(loc="lower right", fontsize=8)
    ax_auc.axvline(0.5, color="#888888", linestyle=":", linewidth=1)
    ax_auc.set_xlim(0, 1.12)
    ax_auc.set_yticks(positions, [f"{r['code']}  {r['name'][:40]}" for r in ordered], fontsize=7)
    ax_auc.set_xlabel("AUROC")
    ax_prev.barh(positions, [r["prevalence"] for r in ordered], color="#55a868")
    for y, r in zip(positions, ordered):
        ax_prev.text(r["prevalence"], y, f" {r['n_positive']}", va="center", fontsize=7)
    ax_prev.set_xlabel("prevalence (n positive)")
    ax_prev.set_xlim(0, max([r["prevalence"] for r in ordered] + [0.05]) * 1.35)
    fig.suptitle(f"{result.method}: per-label AUROC, task {result.task.name} "
                 f"({result.metrics['n_records']} records)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _plot_roc(result: EvaluationResult, path: str, max_legend: int = 12) -> None:
    y_true, y_score = result.scores.y_true, result.scores.y_score
    fig = Figure(figsize=(6.5, 6))
    ax = fig.subplots()
    rows = result.metrics["per_label"]
    by_prevalence = sorted((j for j, r in enumerate(rows) if r["auroc"] is not None),
                           key=lambda j: -rows[j]["n_positive"])
    for rank, j in enumerate(by_prevalence):
        fpr, tpr, _ = roc_curve(y_true[:, j], y_score[:, j])
        label = f"{rows[j]['code']} ({rows[j]['auroc']:.2f})" if rank < max_legend else None
        ax.plot(fpr, tpr, linewidth=1, alpha=0.8 if rank < max_legend else 0.35, label=label)
    micro = result.metrics["headline"]["micro_auroc"]
    if micro is not None:
        fpr, tpr, _ = roc_curve(y_true.ravel(), y_score.ravel())
        ax.plot(fpr, tpr, color="black", linewidth=2.5, label=f"micro-average ({micro:.2f})")
    ax.plot([0, 1], [0, 1], color="#888888", linestyle=":", linewidth=1)
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           xlim=(0, 1), ylim=(0, 1.01), title=f"{result.method} ROC curves, task {result.task.name}")
    if len(by_prevalence) > max_legend:
        ax.plot([], [], color="#999999", alpha=0.35, label=f"{len(by_prevalence) - max_legend} more labels")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


def _markdown(result: EvaluationResult) -> str:
    m = result.metrics
    ci = (m.get("confidence_intervals") or {}).get("intervals", {})
    th = m["thresholds"]
    lines = [f"# {result.method} evaluation: task `{result.task.name}`", ""]
    for key in ("model", "pretrained"):
        if key in m:
            lines.append(f"- {key}: `{m[key]}`")
    lines += [
        f"- task: {result.task.description}",
        f"- data: `{m['data']['spec']}`: {m['data']['records_evaluated']} records evaluated "
        f"({m['data']['records_without_task_label_not_evaluated']} of {m['data']['records_read']} read had no "
        "label of the task and were not evaluated)",
        f"- thresholds: {th['source']}" + (f" on `{th['val_data']}` ({th['val_records']} records)"
                                           if th["source"] != "fixed" else f" {th['value']}") + f". {th['note']}",
        f"- labels with undefined AUROC (no positives or no negatives here): {m['labels_auroc_undefined']['count']}"
        + (f" ({', '.join(m['labels_auroc_undefined']['codes'])}); excluded from macro AUROC, AP and F1"
           if m["labels_auroc_undefined"]["count"] else ""),
        "", "## Headline metrics", "",
        "| metric | value | 95% CI |", "|---|---|---|",
    ]
    for name in M.HEADLINE_METRICS:
        interval = ci.get(name)
        lines.append(f"| {name} | {_fmt(m['headline'][name])} | "
                     f"{'n/a' if not interval else f'{interval[0]:.3f} - {interval[1]:.3f}'} |")
    if m.get("confidence_intervals"):
        c = m["confidence_intervals"]
        lines += ["", f"Intervals: {c['method']}, {c['n_bootstrap']} resamples, seed {c['seed']}."]
    lines += ["", "## Per label", "", "![per-label AUROC](per_label.png)", "",
              "| code | name | n+ | prevalence | AUROC | AP | F1 | sensitivity | specificity | threshold |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(m["per_label"], key=lambda r: (r["auroc"] is None, -(r["auroc"] or 0)))
    for r in rows:
        auroc = _fmt(r["auroc"]) if r["auroc"] is not None else r["auroc_status"]
        lines.append(f"| {r['code']} | {r['name']} | {r['n_positive']} | {r['prevalence']:.3f} | {auroc} | "
                     f"{_fmt(r['ap'])} | {_fmt(r['f1'])} | {_fmt(r['sensitivity'])} | {_fmt(r['specificity'])} | "
                     f"{r['threshold']:.3f} |")
    lines += ["", "## ROC curves", "", "![ROC curves](roc_curves.png)", ""]
    return "\n".join(lines)


def write_report(result: EvaluationResult, out_dir: str) -> Dict[str, str]:
    """metrics.json, per_label.csv, per_label.png, roc_curves.png and report.md in `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name)
             for name in ("metrics.json", "per_label.csv", "per_label.png", "roc_curves.png", "report.md")}

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(result.metrics, f, indent=2)

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=PER_LABEL_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()}
                             for row in result.metrics["per_label"])

    def write_md(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(_markdown(result))

    write_atomic(paths["metrics.json"], write_json)
    write_atomic(paths["per_label.csv"], write_csv)
    _plot_per_label(result, paths["per_label.png"])
    _plot_roc(result, paths["roc_curves.png"])
    write_atomic(paths["report.md"], write_md)
    return paths


def headline_line(result: EvaluationResult) -> str:
    """One line of the headline metrics, for terminals and logs."""
    h = result.metrics["headline"]
    return (f"{result.method} {result.task.name}: " + ", ".join(f"{k} {_fmt(h[k])}" for k in M.HEADLINE_METRICS)
            + f" (thresholds: {result.metrics['thresholds']['source']})")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def add_data_arguments(parser) -> None:
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


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model config name, e.g. ECG-RN18-MiniLM")
    parser.add_argument("--pretrained", required=True, help="checkpoint (open_clip_train's epoch_N.pt)")
    add_data_arguments(parser)
    parser.add_argument("--prompts", default=None, help="prompt JSON overriding the shipped finding names/templates")
    add_scoring_arguments(parser)


def add_scoring_arguments(parser) -> None:
    """The zero-shot scoring rules (open_clip_ecg.scoring), for evaluate and the experiment scripts."""
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
    return ScoringRules(names=args.prompt_names, aggregate=args.aggregate, scoring=args.scoring)


def run(args) -> int:
    model, tokenizer = load_model(args.model, args.pretrained, device=args.device)
    result = evaluate_zeroshot(
        model, tokenizer, args.data, args.task, split=args.split, val_data=args.val_data, val_split=args.val_split,
        prompts=args.prompts, seconds=args.seconds, batch_size=args.batch_size, workers=args.workers,
        n_bootstrap=args.bootstrap, seed=args.seed, about={"model": args.model, "pretrained": args.pretrained},
        rules=scoring_rules(args))
    paths = write_report(result, args.out)
    print(headline_line(result))
    print(f"report: {paths['report.md']}")
    return 0
