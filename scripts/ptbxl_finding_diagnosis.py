"""Is a badly ranked finding a text-side or an ECG-side failure? (fold 7, or the training folds)

    python scripts/ptbxl_finding_diagnosis.py --checkpoint study/logs/NAME/checkpoints/epoch_8.pt \
        --shards study/shards --codes SARRH STACH SBRAD AFIB SR [--ecg-split train]

For each statement code, with the prompt of the zero-shot rules (its English name in every
``FINDING_TEMPLATES`` phrasing, averaged):

- **ECG side**: AUROC of cos(ECG embedding, prompt) for the code on the validation split (fold 7),
  overall and against three kinds of negatives: normal ECGs (NORM), ECGs with another rhythm
  finding, and the other abnormal ECGs. A finding the ECG tower cannot see ranks near 0.5 against
  normal ECGs; a prompt that carries "abnormal" in general ranks the finding's (often otherwise
  normal) ECGs *below* abnormal negatives.
- **Text side**: AUROC of cos(training text, prompt) for the code over the training texts: does
  the text tower place the prompt next to the texts that state the finding?
- The code's training positives and its most frequent co-labels.

``--ecg-split train`` scores the ECG side on the training ECGs instead: a finding that ranks poorly
even there is not learned at all, not merely not generalised. Fold 8 is never read. Writes a
markdown table to stdout and ``--out`` (JSON) when given.
"""
from __future__ import annotations

import argparse
import collections
import sys
from typing import Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from open_clip_ecg.atomic import write_json_atomic
from open_clip_ecg.data.manifest import read_shard_info
from open_clip_ecg.data.pipeline import iterate_samples
from open_clip_ecg.data.text import FINDING_TEMPLATES
from open_clip_ecg.embed import embed_shards, resolve_shards
from open_clip_ecg.factory import load_model

RHYTHM = {"AFIB", "AFLT", "BIGU", "PACE", "PSVT", "SARRH", "SBRAD", "STACH", "SVARR", "SVTAC", "TRIGU", "PVC", "PAC"}


def auroc(y: np.ndarray, score: np.ndarray):
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else None


def encode_prompt(model, tokenizer, name: str) -> torch.Tensor:
    with torch.no_grad():
        embedded = F.normalize(model.encode_text(tokenizer([t.format(name) for t in FINDING_TEMPLATES])).float(), dim=-1)
    return F.normalize(embedded.mean(0), dim=-1)


def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([F.normalize(model.encode_text(tokenizer(list(texts[i:i + batch_size]))).float(), dim=-1)
                          for i in range(0, len(texts), batch_size)])


def diagnose(model, tokenizer, shards: str, codes: Sequence[str], ecg_split: str = "val") -> List[Dict]:
    names = {v["code"]: v["name"] for v in read_shard_info(resolve_shards(shards, "train"))["vocabulary"]}
    embedded = embed_shards(model, resolve_shards(shards, ecg_split), batch_size=64)
    ecg = F.normalize(torch.from_numpy(embedded.embeddings).float(), dim=-1)
    ecg_codes = [set(c) for c in embedded.records.label_codes]
    train = [(s["text"], set(s["label_codes"])) for s in iterate_samples(resolve_shards(shards, "train"))]
    texts = encode_texts(model, tokenizer, [t for t, _ in train])
    normal = np.array(["NORM" in c for c in ecg_codes])
    rows = []
    for code in codes:
        if code not in names:
            raise ValueError(f"{code!r} is not in the vocabulary of {shards}")
        prompt = encode_prompt(model, tokenizer, names[code])
        y = np.array([code in c for c in ecg_codes])
        score = (ecg @ prompt).numpy()
        other_rhythm = np.array([bool((RHYTHM - {code}) & c) for c in ecg_codes])
        against = {"NORM": normal & ~y, "other rhythm": other_rhythm & ~y & ~normal,
                   "other abnormal": ~normal & ~other_rhythm & ~y}
        y_text = np.array([code in c for _, c in train])
        co_labels = collections.Counter(x for _, c in train if code in c for x in c if x != code)
        rows.append({
            "code": code, "prompt": names[code], "ecg_split": ecg_split, "ecg_positives": int(y.sum()),
            "train_positives": int(y_text.sum()),
            "ecg_auroc": auroc(y, score),
            "ecg_auroc_against": {k: auroc(y[y | m], score[y | m]) for k, m in against.items()},
            "n_against": {k: int(m.sum()) for k, m in against.items()},
            "text_auroc": auroc(y_text, (texts @ prompt).numpy()),
            "co_labels": co_labels.most_common(4)})
    return rows


def markdown(rows: List[Dict]) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"
    split = rows[0]["ecg_split"] if rows else "val"
    lines = [f"| code | prompt | n+ {split} (ECG side) | n+ train (text side) | ECG side | vs NORM | vs other rhythm | vs other abnormal "
             "| text side | top co-labels (train) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        against = r["ecg_auroc_against"]
        co = ", ".join(f"{c} {n}" for c, n in r["co_labels"])
        lines.append(f"| {r['code']} | {r['prompt']} | {r['ecg_positives']} | {r['train_positives']} | "
                     f"{f(r['ecg_auroc'])} | {f(against['NORM'])} | {f(against['other rhythm'])} | "
                     f"{f(against['other abnormal'])} | {f(r['text_auroc'])} | {co} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="open_clip_train checkpoint (epoch_N.pt)")
    parser.add_argument("--model", default="ECG-RN18-CLIPText")
    parser.add_argument("--shards", required=True, help="shard folder with train and val splits")
    parser.add_argument("--codes", nargs="+", default=["SARRH", "STACH", "SBRAD", "AFIB", "SR"])
    parser.add_argument("--ecg-split", choices=("val", "train"), default="val",
                        help="ECGs of the ECG side: fold 7 (default) or the training folds (is it learned at all?)")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, args.checkpoint)
    rows = diagnose(model, tokenizer, args.shards, args.codes, args.ecg_split)
    print(markdown(rows))
    if args.out:
        write_json_atomic(args.out, rows, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
