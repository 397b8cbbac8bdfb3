"""Linear probe: logistic regression on frozen ECG embeddings with 1%, 10% and 100% of the training labels.

    open-clip-ecg probe --model ECG-RN18-MiniLM --pretrained epoch_10.pt --task ptbxl-super \\
        --train-data shards/ --train-split train --data shards/ --split test \\
        --val-data shards/ --val-split val --out probe/

The protocol peers report for contrastive ECG models. ECG embeddings (L2-normalised, the
zero-shot ones, :func:`open_clip_ecg.embed.embed_shards`) of the training records the task
evaluates are standardised and fed to one scikit-learn ``LogisticRegression`` per label.

- Label fractions: a seeded subset of the training records. Rare labels would vanish from a 1%
  random subset, so the subset first takes, rarest label first, one positive and one negative
  record of every label that has both in the full training set, then fills up at random to
  ``ceil(fraction * n)`` records. When the guarantee alone needs more records than that (many
  labels, tiny fraction), the subset is larger than the fraction: ``metrics.json`` records the
  real count. A label with one class in its subset anyway (no positive in the whole training
  set) is scored with that class's constant probability and listed as ``constant_labels``.
- Regularisation: ``--C``, or (default) the value of (0.01, 0.1, 1, 10) with the best
  validation macro AUROC when ``--val-data`` is given, else 1.0.
- Thresholds: per-label max-F1 on the validation records (``--val-data``), else 0.5; scoring
  and reports are the zero-shot evaluation's. Each fraction gets a report in
  ``OUT/fraction_<percent>/``; ``OUT/probe.json`` and ``OUT/probe.md`` summarise them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .atomic import write_json_atomic, write_text_atomic
from .embed import EmbeddedShards, embed_shards, resolve_shards
from .factory import add_model_arguments, load_model_from_args
from .metrics import HEADLINE_METRICS, macro_auroc
from .reporting import headline_line, write_report
from .scoring import (
    LabelledScores,
    add_evaluation_arguments,
    check_disjoint,
    choose_thresholds,
    describe_shards,
    resolve_task,
    summarize,
)
from .tasks import Task

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
C_GRID = (0.01, 0.1, 1.0, 10.0)


def subsample(y: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted record indices: a `fraction` of the rows of `y` [N, L] that keeps, for every label with
    both classes, at least one positive and one negative (see module docstring)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fractions must be in (0, 1], got {fraction}")
    n = len(y)
    target = max(1, math.ceil(fraction * n))
    if target >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(n, dtype=bool)
    for j in np.argsort(y.sum(0), kind="stable"):  # rarest label first
        for value in (True, False):
            candidates = np.flatnonzero(y[:, j] == value)
            if len(candidates) and not (y[chosen, j] == value).any() and len(candidates) < n:
                chosen[rng.choice(candidates)] = True
    rest = np.flatnonzero(~chosen)
    missing = target - int(chosen.sum())
    if missing > 0:
        chosen[rng.choice(rest, size=missing, replace=False)] = True
    return np.flatnonzero(chosen)


class LinearProbe:
    """One standardised logistic regression per label; a label with a single class in its training
    data gets that class's constant probability."""

    def __init__(self, C: float = 1.0, max_iter: int = 2000):
        self.C, self.max_iter = C, max_iter
        self.models: List = []
        self.constant_labels: List[int] = []

    def fit(self, x: np.ndarray, y: np.ndarray) -> "LinearProbe":
        self.models, self.constant_labels = [], []
        for j in range(y.shape[1]):
            if y[:, j].min() == y[:, j].max():
                self.models.append(float(y[0, j]))
                self.constant_labels.append(j)
            else:
                model = make_pipeline(StandardScaler(), LogisticRegression(C=self.C, max_iter=self.max_iter))
                self.models.append(model.fit(x, y[:, j]))
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.stack([np.full(len(x), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
                         for m in self.models], axis=1)


@dataclass
class _ProbeRows:
    """Embeddings and task targets of the records a task evaluates, from one set of shards."""

    x: np.ndarray
    y: np.ndarray
    keys: List[str]
    spec: str
    n_read: int

    @classmethod
    def from_embedded(cls, task: Task, embedded: EmbeddedShards, spec: str) -> "_ProbeRows":
        records = embedded.records
        y, keep = task.targets(records.label_codes, records.metas, records.keys, where=f"shards {spec!r}")
        return cls(embedded.embeddings[keep], y[keep], [k for k, kept in zip(records.keys, keep) if kept], spec,
                   len(keep))

    def scored(self, scores: np.ndarray) -> LabelledScores:
        return LabelledScores(self.y, scores, self.keys, self.spec, self.n_read)


def run_probe(model, task, train_data, data, *, train_split=None, split=None, val_data=None, val_split=None,
              fractions: Sequence[float] = DEFAULT_FRACTIONS, C: Optional[float] = None,
              seconds: Optional[float] = None, batch_size: int = 64, workers: int = 0,
              n_bootstrap: int = 1000, seed: int = 0, about: Optional[Dict] = None) -> Dict[float, object]:
    """Linear probes at each label fraction: {fraction: EvaluationResult} on `data`."""
    specs = {"train": (train_data, train_split), "eval": (data, split)}
    if val_data is not None:
        specs["val"] = (val_data, val_split)
    shards = {name: resolve_shards(*spec) for name, spec in specs.items()}
    task = resolve_task(task, shards["train"])
    rows = {}
    for name, (spec, spec_split) in specs.items():
        embedded = embed_shards(model, shards[name], seconds=seconds, batch_size=batch_size, workers=workers)
        rows[name] = _ProbeRows.from_embedded(task, embedded, describe_shards(spec, spec_split))
    check_disjoint(rows["eval"], rows["train"], "--train-data", "the probes must be fitted on other records")
    if "val" in rows:
        check_disjoint(rows["eval"], rows["val"])
    train = rows["train"]
    results = {}
    for fraction in fractions:
        index = subsample(train.y, fraction, seed)
        grid = ([C] if C is not None else list(C_GRID) if "val" in rows else [1.0])
        fitted = []
        for c in grid:
            probe = LinearProbe(C=c).fit(train.x[index], train.y[index])
            val_auroc = macro_auroc(rows["val"].y, probe.predict_proba(rows["val"].x)) if "val" in rows else None
            fitted.append((val_auroc if val_auroc is not None else -np.inf, c, probe))
        _, chosen_c, probe = max(fitted, key=lambda item: item[0])
        validation = rows["val"].scored(probe.predict_proba(rows["val"].x)) if "val" in rows else None
        thresholds, threshold_info = choose_thresholds(task.codes, validation)
        evaluated = rows["eval"]
        probe_info = {
            "label_fraction": fraction, "train_records": int(len(index)), "train_records_available": len(train.keys),
            "train_data": train.spec, "C": chosen_c,
            "C_selection": ("given" if C is not None
                            else f"validation macro AUROC over {list(C_GRID)}" if "val" in rows
                            else "default 1.0 (no --val-data)"),
            "constant_labels": [task.codes[j] for j in probe.constant_labels], "seed": seed,
        }
        results[fraction] = summarize(task, "linear probe", evaluated.scored(probe.predict_proba(evaluated.x)),
                                      thresholds, threshold_info, n_bootstrap, seed,
                                      about={**(about or {}), "probe": probe_info})
    return results


def write_probe_reports(results: Dict[float, object], out_dir: str) -> Dict[str, str]:
    """A report per fraction in OUT/fraction_<percent>/, plus probe.json and probe.md side by side."""
    os.makedirs(out_dir, exist_ok=True)
    summary = {}
    for fraction, result in results.items():
        folder = os.path.join(out_dir, f"fraction_{fraction * 100:g}pct")
        write_report(result, folder)
        summary[f"{fraction:g}"] = {"folder": folder, **result.metrics["probe"],
                                    "headline": result.metrics["headline"]}
    lines = ["# Linear probe", "", "| label fraction | train records | C | "
             + " | ".join(HEADLINE_METRICS) + " |", "|---" * (3 + len(HEADLINE_METRICS)) + "|"]
    for entry in summary.values():
        values = " | ".join("n/a" if entry["headline"][k] is None else f"{entry['headline'][k]:.3f}"
                            for k in HEADLINE_METRICS)
        lines.append(f"| {entry['label_fraction']:g} | {entry['train_records']} | {entry['C']:g} | {values} |")
    paths = {"probe.json": os.path.join(out_dir, "probe.json"), "probe.md": os.path.join(out_dir, "probe.md")}
    write_json_atomic(paths["probe.json"], summary, indent=2)
    write_text_atomic(paths["probe.md"], "\n".join(lines) + "\n")
    return paths


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--train-data", required=True, help="training shards (spec, or folder with --train-split)")
    parser.add_argument("--train-split", default=None, help="split of --train-data when it is a folder")
    add_evaluation_arguments(parser)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="fractions of the training labels (default: 0.01 0.1 1.0)")
    parser.add_argument("--C", type=float, default=None,
                        help="inverse regularisation; default: chosen on --val-data from 0.01 0.1 1 10, else 1.0")


def run(args) -> int:
    model, _ = load_model_from_args(args, device=args.device)
    results = run_probe(model, args.task, args.train_data, args.data, train_split=args.train_split, split=args.split,
                        val_data=args.val_data, val_split=args.val_split, fractions=args.fractions, C=args.C,
                        seconds=args.seconds, batch_size=args.batch_size, workers=args.workers,
                        n_bootstrap=args.bootstrap, seed=args.seed,
                        about={"model": args.model, "pretrained": args.pretrained})
    paths = write_probe_reports(results, args.out)
    for fraction, result in results.items():
        print(f"{fraction:g} of the labels: {headline_line(result)}")
    print(f"summary: {paths['probe.md']}")
    return 0
