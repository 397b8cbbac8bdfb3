"""Real-data learning check: Jaccard vs identity SigLIP targets on PTB-XL, side by side.

    python scripts/ptbxl_jaccard_vs_identity.py --ptbxl ../shared/data/ptbxl --out ptbxl_check

Protocol: PTB-XL records at 100 Hz, superclass labels (NORM, MI, STTC, CD, HYP), text = report +
English label sentence (`--text both`: PTB-XL reports are mostly German); train on folds 1-7,
validate on fold 8 (``--val-folds 8``; folds 9-10 are the official val/test folds). Both runs use
the same model, seed, data order and schedule; only ``--ecg-targets`` differs. Each checkpoint
is evaluated zero-shot on fold 8 (task ``ptbxl-super``, thresholds 0.5: fold 8 is the only
held-out data, so nothing is tuned on it). Writes ``OUT/jaccard_vs_identity.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.shards import ShardOptions, write_shards
from open_clip_ecg.embed import load_model
from open_clip_ecg.evaluate import evaluate_zeroshot, headline_line, write_report
from open_clip_ecg.quickstart import default_precision
from open_clip_ecg.train import main as train_main

TARGETS = ("jaccard", "identity")
COLUMNS = ("macro_auroc", "micro_auroc", "macro_ap", "micro_f1", "jaccard_samples")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptbxl", required=True, help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--out", default="ptbxl_check")
    parser.add_argument("--model", default="ECG-RN18-CLIPText")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--precision", default=default_precision())
    parser.add_argument("--init-logit-bias", type=float, default=-4.0)
    args = parser.parse_args(argv)

    shards = os.path.join(args.out, "shards")
    write_shards(get_reader("ptbxl", args.ptbxl, sampling_rate=100, label_level="superclass"), shards,
                 ShardOptions(sampling_rate=100, seconds=10, split_by="fold", val_folds=(8,), test_folds=(10,),
                              text="both", shard_size=32))
    rows = []
    for targets in TARGETS:
        name = f"ptbxl-{targets}"
        status = train_main([
            "--model", args.model, "--train-data", os.path.join(shards, "train-*.tar"),
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--warmup", "20", "--wd", "0.05", "--workers", "2", "--seed", str(args.seed),
            "--logs", os.path.join(args.out, "logs"), "--name", name, "--resume", "latest",
            "--ecg-targets", targets, "--log-every-n-steps", "50", "--precision", args.precision,
            "--ecg-init-logit-bias", str(args.init_logit_bias)])
        if status != 0:
            raise RuntimeError(f"training with --ecg-targets {targets} failed")
        checkpoint = os.path.join(args.out, "logs", name, "checkpoints", f"epoch_{args.epochs}.pt")
        model, tokenizer = load_model(args.model, checkpoint)
        result = evaluate_zeroshot(model, tokenizer, shards, "ptbxl-super", split="val",
                                   n_bootstrap=args.bootstrap, seed=args.seed,
                                   about={"model": args.model, "pretrained": checkpoint, "targets": targets})
        write_report(result, os.path.join(args.out, "eval", targets))
        print(headline_line(result))
        rows.append({"targets": targets, "headline": result.metrics["headline"],
                     "intervals": (result.metrics.get("confidence_intervals") or {}).get("intervals", {})})

    lines = [f"PTB-XL superclass, zero-shot on fold 8 after training on folds 1-7 ({args.epochs} epochs, "
             f"{args.model}, 100 Hz)", "", "| targets | " + " | ".join(COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row["headline"].get(column)
            interval = row["intervals"].get(column)
            cells.append("n/a" if value is None else f"{value:.3f}" + (
                f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else ""))
        lines.append(f"| {row['targets']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    for name, text in (("jaccard_vs_identity.md", table), ("jaccard_vs_identity.json", json.dumps(rows, indent=2))):
        with open(os.path.join(args.out, name + ".tmp"), "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(os.path.join(args.out, name + ".tmp"), os.path.join(args.out, name))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
