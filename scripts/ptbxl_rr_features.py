"""How much do RR intervals alone say about the rhythm findings? (training folds and fold 7 only)

    python scripts/ptbxl_rr_features.py --ptbxl ../shared/data/ptbxl-2k [--codes SARRH SBRAD STACH AFIB SR]

Beats come from :func:`open_clip_ecg.data.rhythm.detect_beats` (the detector behind the RR input
channels) on all 12 leads of each 10 s record; three features per record, each scored as a
single-feature ranker (AUROC, no fitting): the mean RR interval, its coefficient of variation (sd /
mean: sinus arrhythmia, atrial fibrillation) and the median successive difference over the mean
(beat-to-beat irregularity). A finding one feature ranks well while the 1D-ResNet on the raw
signal does not (README, "RR channels") is one the tower cannot see, not one the data cannot
teach. An AUROC far below 0.5 ranks the other way (sinus tachycardia: a shorter mean RR). Fold 8
is never read. Writes a markdown table to stdout and ``--out`` (JSON) when given.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import numpy as np
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from open_clip_ecg.atomic import write_json_atomic
from open_clip_ecg.data.readers import get_reader
from open_clip_ecg.data.rhythm import detect_beats

FEATURES = ("mean RR", "RR sd / mean", "median abs ΔRR / mean")
GROUPS = {"training folds 1-6": range(1, 7), "fold 7": (7,)}


def rr_features(signal: np.ndarray, sampling_rate: float) -> np.ndarray:
    """The three FEATURES of one record, NaN when fewer than three beats were found."""
    rr = np.diff(detect_beats(signal, sampling_rate)) / sampling_rate
    if len(rr) < 2:
        return np.full(len(FEATURES), np.nan)
    return np.array([rr.mean(), rr.std() / rr.mean(), np.median(np.abs(np.diff(rr))) / rr.mean()])


def feature_aurocs(features: np.ndarray, positive: np.ndarray) -> List:
    """AUROC of each feature column for `positive` (None without both classes)."""
    if positive.all() or not positive.any():
        return [None] * features.shape[1]
    return [float(roc_auc_score(positive, features[:, j])) for j in range(features.shape[1])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ptbxl", required=True, help="PTB-XL folder (ptbxl_database.csv, records100/)")
    parser.add_argument("--codes", nargs="+", default=["SARRH", "SBRAD", "STACH", "AFIB", "SR"])
    parser.add_argument("--out", default=None, help="JSON file for the table")
    args = parser.parse_args(argv)

    reader = get_reader("ptbxl", args.ptbxl, sampling_rate=100, label_level="all")
    entries = [e for e in reader.entries() if e.fold is not None and e.fold <= 7]
    features, folds, labels = [], [], []
    for entry in tqdm(entries, desc="records", disable=None):
        record = reader.load(entry)
        features.append(rr_features(record.signal, record.sampling_rate))
        folds.append(entry.fold)
        labels.append(set(entry.labels))
    features, folds = np.array(features), np.array(folds)
    found = ~np.isnan(features).any(axis=1)
    result: Dict = {"records": len(entries), "without_three_beats": int((~found).sum()), "features": FEATURES,
                    "groups": {}}
    lines = [f"{len(entries)} records (folds 1-7); {int((~found).sum())} with fewer than three beats left out", "",
             "| records | code | positives | " + " | ".join(FEATURES) + " |", "|---|---|---|" + "---|" * len(FEATURES)]
    for group, group_folds in GROUPS.items():
        rows = found & np.isin(folds, list(group_folds))
        result["groups"][group] = {}
        for code in args.codes:
            positive = np.array([code in labels[i] for i in np.flatnonzero(rows)])
            aurocs = feature_aurocs(features[rows], positive)
            result["groups"][group][code] = {"positives": int(positive.sum()), "auroc": dict(zip(FEATURES, aurocs))}
            cells = ["–" if a is None else f"{a:.3f}" for a in aurocs]
            lines.append(f"| {group} | {code} | {int(positive.sum())} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if args.out:
        write_json_atomic(args.out, result, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
