"""The report of an evaluation: ``metrics.json``, ``per_label.csv``, plots and ``report.md``.

Every method (zero-shot, supervised baseline, linear probe) is reported the same way from its
:class:`~open_clip_ecg.scoring.EvaluationResult`:

- ``metrics.json``: the result's metrics as they are (:func:`open_clip_ecg.scoring.summarize`);
- ``per_label.csv``: one row per label (``PER_LABEL_COLUMNS``);
- ``per_label.png``: AUROC per label, sorted, beside its prevalence; ``roc_curves.png``;
- ``report.md``: the headline metrics with their intervals and the per-label table.

:func:`headline_line` and :func:`results_table` summarise results for terminals. Every file is
written atomically (:mod:`open_clip_ecg.atomic`).
"""
from __future__ import annotations

import csv
import os
from typing import Dict, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from . import metrics as M
from .atomic import write_atomic, write_json_atomic, write_text_atomic
from .scoring import EvaluationResult

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

    def write_csv(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=PER_LABEL_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({k: ("" if v is None else v) for k, v in row.items()}
                             for row in result.metrics["per_label"])

    write_json_atomic(paths["metrics.json"], result.metrics, indent=2)
    write_atomic(paths["per_label.csv"], write_csv)
    _plot_per_label(result, paths["per_label.png"])
    _plot_roc(result, paths["roc_curves.png"])
    write_text_atomic(paths["report.md"], _markdown(result))
    return paths


def headline_line(result: EvaluationResult) -> str:
    """One line of the headline metrics, for terminals and logs."""
    h = result.metrics["headline"]
    return (f"{result.method} {result.task.name}: " + ", ".join(f"{k} {_fmt(h[k])}" for k in M.HEADLINE_METRICS)
            + f" (thresholds: {result.metrics['thresholds']['source']})")


def results_table(results: Sequence[EvaluationResult]) -> str:
    """Markdown table, one row per task: macro AUROC with its 95% interval, micro-F1, sample Jaccard."""
    lines = ["| task | macro AUROC [95% CI] | micro-F1 | sample Jaccard |", "|---|---|---|---|"]
    for result in results:
        h = result.metrics["headline"]
        ci = ((result.metrics.get("confidence_intervals") or {}).get("intervals") or {}).get("macro_auroc")
        auroc = "n/a" if h["macro_auroc"] is None else f"{h['macro_auroc']:.3f}" + (
            f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        lines.append(f"| {result.task.name} | {auroc} | {h['micro_f1']:.3f} | {h['jaccard_samples']:.3f} |")
    return "\n".join(lines)
