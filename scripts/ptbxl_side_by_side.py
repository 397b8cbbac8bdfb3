"""PTB-XL side by side: zero-shot vs supervised BCE tower vs linear probe on the same shards and tasks.

    python scripts/ptbxl_side_by_side.py --shards SHARD_DIR --model ECG-RN18-MiniLM \\
        --pretrained logs/run/checkpoints/epoch_10.pt --out side_by_side/

Protocol (defaults): train on the ``train`` split (PTB-XL folds 1-7 when the shards were written
with ``--val-folds 8``), evaluate on the ``val`` split (fold 8), tasks ``ptbxl-super`` and
``ptbxl-rhythm``. The evaluated split is the only held-out data then, so nothing is tuned on it:
thresholds are 0.5 for every method, the supervised model is its last epoch and the probe uses
C = 1. With ``--eval-split test --tune-split val`` the val split chooses thresholds (max F1),
the supervised epoch and the probe's C, and the test split is evaluated.

Writes each method's full report (metrics.json, per_label.csv/png, roc_curves.png, report.md)
under ``OUT/<task>/<method>/`` and the comparison as ``OUT/side_by_side.md`` / ``.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

from open_clip_ecg.atomic import write_json_atomic, write_text_atomic
from open_clip_ecg.baselines import CHECKPOINT_NAME, evaluate_supervised, train_supervised
from open_clip_ecg.evaluate import evaluate_zeroshot
from open_clip_ecg.factory import load_model
from open_clip_ecg.metrics import HEADLINE_METRICS
from open_clip_ecg.probe import DEFAULT_FRACTIONS, run_probe
from open_clip_ecg.reporting import write_report

COLUMNS = ("macro_auroc", "macro_ap", "micro_f1", "macro_f1", "jaccard_samples", "exact_match")


def _cell(metrics: Dict, name: str) -> str:
    value = metrics["headline"][name]
    if value is None:
        return "n/a"
    interval = ((metrics.get("confidence_intervals") or {}).get("intervals") or {}).get(name)
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval and name == "macro_auroc" else "")


def side_by_side(args) -> List[Dict]:
    model, tokenizer = load_model(args.model, args.pretrained, device=args.device)
    tune = dict(val_data=args.shards, val_split=args.tune_split) if args.tune_split else {}
    common = dict(batch_size=args.batch_size, workers=args.workers, n_bootstrap=args.bootstrap, seed=args.seed)
    rows = []
    for task in args.tasks:
        out = os.path.join(args.out, task)
        zeroshot = evaluate_zeroshot(model, tokenizer, args.shards, task, split=args.eval_split, seconds=args.seconds,
                                     about={"model": args.model, "pretrained": args.pretrained}, **tune, **common)
        write_report(zeroshot, os.path.join(out, "zero-shot"))
        rows.append({"task": task, "method": "zero-shot", "train labels": "none", "metrics": zeroshot.metrics})

        os.makedirs(os.path.join(out, "supervised"), exist_ok=True)
        supervised_model, about, validation = train_supervised(
            task, args.shards, train_split=args.train_split, epochs=args.epochs, seconds=args.seconds,
            device=args.device, checkpoint_path=os.path.join(out, "supervised", CHECKPOINT_NAME),
            batch_size=args.batch_size, workers=args.workers, seed=args.seed, **tune)
        supervised = evaluate_supervised(supervised_model, about, args.shards, split=args.eval_split,
                                         validation=validation, **common)
        write_report(supervised, os.path.join(out, "supervised"))
        rows.append({"task": task, "method": f"supervised BCE ({about['epoch']} of {args.epochs} epochs)",
                     "train labels": "100%", "metrics": supervised.metrics})

        probes = run_probe(model, task, args.shards, args.shards, train_split=args.train_split,
                           split=args.eval_split, fractions=args.fractions, seconds=args.seconds,
                           about={"model": args.model, "pretrained": args.pretrained}, **tune, **common)
        for fraction, result in probes.items():
            write_report(result, os.path.join(out, f"probe_{fraction * 100:g}pct"))
            rows.append({"task": task, "method": f"linear probe (C={result.metrics['probe']['C']:g})",
                         "train labels": f"{fraction * 100:g}% ({result.metrics['probe']['train_records']} records)",
                         "metrics": result.metrics})
    return rows


def write_table(rows: List[Dict], args) -> str:
    lines = ["# PTB-XL: zero-shot vs supervised vs linear probe", "",
             f"- model `{args.model}`, checkpoint `{args.pretrained}`",
             f"- shards `{args.shards}`: train split `{args.train_split}`, evaluated split `{args.eval_split}`"
             + (f", thresholds / epoch / C tuned on split `{args.tune_split}`" if args.tune_split
                else "; nothing tuned on held-out data (thresholds 0.5, last epoch, C = 1)"),
             f"- macro AUROC with its bootstrap 95% interval ({args.bootstrap} resamples); macro means over "
             "labels with positives and negatives in the evaluated split", "",
             "| task | method | train labels | n | " + " | ".join(COLUMNS) + " | AUROC undefined |",
             "|---" * (5 + len(COLUMNS)) + "|"]
    for row in rows:
        m = row["metrics"]
        lines.append(f"| {row['task']} | {row['method']} | {row['train labels']} | {m['n_records']} | "
                     + " | ".join(_cell(m, c) for c in COLUMNS)
                     + f" | {m['labels_auroc_undefined']['count']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", required=True, help="PTB-XL shard folder (train / val [/ test] splits)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="+", default=["ptbxl-super", "ptbxl-rhythm"])
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--eval-split", default="val")
    parser.add_argument("--tune-split", default=None, help="split for thresholds / epoch / C (default: none)")
    parser.add_argument("--epochs", type=int, default=20, help="supervised baseline epochs")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DEFAULT_FRACTIONS))
    parser.add_argument("--seconds", type=float, default=None, help="crop length (default: whole record)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.tune_split and args.tune_split == args.eval_split:
        parser.error("--tune-split must differ from --eval-split: the evaluated records never tune anything")
    rows = side_by_side(args)
    table = write_table(rows, args)
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "side_by_side.md"), table)
    write_json_atomic(os.path.join(args.out, "side_by_side.json"),
                      [{k: (v if k != "metrics" else {h: v["headline"][h] for h in HEADLINE_METRICS})
                        for k, v in row.items()} for row in rows], indent=2)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
