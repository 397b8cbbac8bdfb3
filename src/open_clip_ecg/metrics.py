"""Multi-label metrics, decision thresholds chosen on validation data only, and bootstrap intervals.

Point estimates come from scikit-learn. Conventions (documented because papers differ):

- A prediction is positive when ``score >= threshold`` (scikit-learn's precision-recall convention).
- A label is *evaluable* when the evaluated data holds both positives and negatives for it. AUROC
  of any other label is undefined: it is reported as ``None`` with the reason, left out of every
  macro mean (AUROC, AP, F1), and counted. Micro and sample-averaged metrics use every label.
- Sample-averaged Jaccard (the paper's score) counts a record with no true and no predicted
  finding as agreement (``zero_division=1``); F1 of a label with no true and no predicted
  positive is 0 (``zero_division=0``).

Retrieval under multi-label relevance (:func:`multilabel_retrieval`): open_clip's validation counts
only the paired text as a match for an ECG, so among records sharing a finding set (most PTB-XL texts
are a few label sentences) a perfect model scores R@1 far below 1. Here every item whose finding set
has Jaccard >= a stated level with the query's counts as relevant; mAP comes from scikit-learn's
``label_ranking_average_precision_score`` (ties ranked pessimistically).

Bootstrap intervals resample records with replacement. Every replicate is a vector of multinomial
record counts, drawn all at once from one seeded generator, so replicate statistics are matrix
products instead of a Python loop of scikit-learn calls. scikit-learn has no batched (many
sample-weight vectors at once) AUROC or AP, so ``_RankedScores`` computes the sample-weighted
area under the ROC and precision-recall step curves itself; ``tests/test_metrics.py`` checks it
equals ``roc_auc_score`` / ``average_precision_score`` with ``sample_weight`` replicate by replicate.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    label_ranking_average_precision_score,
    precision_recall_curve,
    recall_score,
    roc_auc_score,
)

HEADLINE_METRICS = (
    "macro_auroc", "micro_auroc", "macro_ap", "micro_f1", "macro_f1", "jaccard_samples", "exact_match",
)
DEFAULT_THRESHOLD = 0.5
RETRIEVAL_KS = (1, 5, 10)


def _check_arrays(y_true, y_score) -> Tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != y_score.shape:
        raise ValueError(f"y_true {y_true.shape} and y_score {y_score.shape} must both be [n_records, n_labels]")
    if y_true.shape[0] == 0:
        raise ValueError("no records to evaluate")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("y_true must be a 0/1 multi-hot matrix")
    if not np.isfinite(y_score).all():
        raise ValueError("y_score contains NaN or infinite values")
    return y_true.astype(bool), y_score


def binarize(y_score, thresholds) -> np.ndarray:
    """Positive where ``score >= threshold`` (per label)."""
    return np.asarray(y_score) >= np.asarray(thresholds, dtype=np.float64)[None, :]


def label_status(y_true) -> List[str]:
    """'ok', 'no positives' or 'no negatives' per label: why an AUROC is (un)defined."""
    y_true = np.asarray(y_true, dtype=bool)
    n_pos = y_true.sum(0)
    return ["no positives" if p == 0 else "no negatives" if p == len(y_true) else "ok" for p in n_pos]


def _evaluable(y_true) -> np.ndarray:
    """Boolean mask of the labels with both positives and negatives (those with a defined AUROC)."""
    return np.array([s == "ok" for s in label_status(y_true)], dtype=bool)


def max_f1_thresholds(y_true, y_score, default: float = DEFAULT_THRESHOLD) -> Tuple[np.ndarray, List[str]]:
    """Per-label thresholds maximising F1 on the data given, which must be validation data.

    Returns ``(thresholds, sources)``; a label without positives in these data keeps ``default``
    and its source says so. Never call this on the data being evaluated.
    """
    y_true, y_score = _check_arrays(y_true, y_score)
    thresholds = np.full(y_true.shape[1], default, dtype=np.float64)
    sources = []
    for j in range(y_true.shape[1]):
        if not y_true[:, j].any():
            sources.append(f"default {default:g} (no positives in validation data)")
            continue
        precision, recall, cut = precision_recall_curve(y_true[:, j], y_score[:, j])
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
        thresholds[j] = cut[int(np.argmax(f1[:-1]))]  # the last (P=1, R=0) point has no threshold
        sources.append("validation max-F1")
    return thresholds, sources


def macro_auroc(y_true, y_score) -> Optional[float]:
    """Mean AUROC over the evaluable labels (None when there is none): the figure that selects
    epochs, C values and training settings on validation data. Needs no threshold."""
    y_true, y_score = _check_arrays(y_true, y_score)
    ok = _evaluable(y_true)
    return float(roc_auc_score(y_true[:, ok], y_score[:, ok], average="macro")) if ok.any() else None


def headline_metrics(y_true, y_score, thresholds) -> Dict[str, Optional[float]]:
    """Macro/micro AUROC, macro AP, micro/macro F1, sample Jaccard and exact match (scikit-learn)."""
    y_true, y_score = _check_arrays(y_true, y_score)
    pred = binarize(y_score, thresholds)
    ok = _evaluable(y_true)
    flat_defined = 0 < y_true.sum() < y_true.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out = {
            "macro_auroc": macro_auroc(y_true, y_score),
            "micro_auroc": float(roc_auc_score(y_true, y_score, average="micro")) if flat_defined else None,
            "macro_ap": (float(average_precision_score(y_true[:, ok], y_score[:, ok], average="macro"))
                         if ok.any() else None),
            "micro_f1": float(f1_score(y_true, pred, average="micro", zero_division=0)),
            "macro_f1": (float(f1_score(y_true[:, ok], pred[:, ok], average="macro", zero_division=0))
                         if ok.any() else None),
            "jaccard_samples": float(jaccard_score(y_true, pred, average="samples", zero_division=1.0)),
            "exact_match": float(accuracy_score(y_true, pred)),
        }
    return out


def finding_set_relevance(query_labels, item_labels, min_jaccard: float = 1.0) -> np.ndarray:
    """``[queries, items]`` bool: the item's finding set has Jaccard >= `min_jaccard` with the
    query's (1.0: the same set; two empty sets count as the same)."""
    if not 0 < min_jaccard <= 1:
        raise ValueError(f"min_jaccard must be in (0, 1], got {min_jaccard}")
    query, item = np.asarray(query_labels, dtype=np.float64), np.asarray(item_labels, dtype=np.float64)
    if query.ndim != 2 or item.ndim != 2 or query.shape[1] != item.shape[1]:
        raise ValueError(f"expected [queries, labels] and [items, labels] multi-hot arrays, got shapes "
                         f"{query.shape} and {item.shape}")
    shared = query @ item.T
    union = query.sum(1)[:, None] + item.sum(1)[None, :] - shared
    return shared >= min_jaccard * union


def multilabel_retrieval(similarity, query_labels, item_labels, min_jaccard: float = 1.0,
                         ks: Sequence[int] = RETRIEVAL_KS) -> Dict[str, float]:
    """Retrieval of items (columns of `similarity`) for each query (rows) where every item whose
    finding set has Jaccard >= `min_jaccard` with the query's is relevant.

    Returns ``mAP`` (mean average precision over queries), ``R@k`` (share of queries with a relevant
    item among the top k; ties broken by item order, as open_clip's R@k) and ``queries`` (how many
    had a relevant item: the others, possible when a text states fewer findings than its ECG shows,
    are left out of both)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    relevant = finding_set_relevance(query_labels, item_labels, min_jaccard)
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity of shape {similarity.shape} for {relevant.shape[0]} queries and "
                         f"{relevant.shape[1]} items")
    answerable = relevant.any(axis=1)
    relevant, similarity = relevant[answerable], similarity[answerable]
    if not len(relevant):
        return {"mAP": float("nan"), **{f"R@{k}": float("nan") for k in ks}, "queries": 0.0}
    ranked = np.take_along_axis(relevant, np.argsort(-similarity, axis=1, kind="stable"), axis=1)
    return {"mAP": float(label_ranking_average_precision_score(relevant, similarity)),
            **{f"R@{k}": float(ranked[:, :k].any(axis=1).mean()) for k in ks},
            "queries": float(len(relevant))}


def per_label_metrics(y_true, y_score, thresholds, codes: Optional[Sequence[str]] = None) -> List[Dict]:
    """One row per label: AUROC, AP, F1, sensitivity, specificity, prevalence, counts, threshold."""
    y_true, y_score = _check_arrays(y_true, y_score)
    pred = binarize(y_score, thresholds)
    codes = list(codes) if codes is not None else [str(j) for j in range(y_true.shape[1])]
    rows = []
    for j, status in enumerate(label_status(y_true)):
        yt, ys, yp = y_true[:, j], y_score[:, j], pred[:, j]
        n_pos = int(yt.sum())
        rows.append({
            "code": codes[j],
            "n": int(len(yt)),
            "n_positive": n_pos,
            "prevalence": n_pos / len(yt),
            "auroc": float(roc_auc_score(yt, ys)) if status == "ok" else None,
            "auroc_status": "ok" if status == "ok" else f"undefined ({status})",
            "ap": float(average_precision_score(yt, ys)) if n_pos else None,
            "f1": float(f1_score(yt, yp, zero_division=0)),
            "sensitivity": float(recall_score(yt, yp, zero_division=0)) if n_pos else None,
            "specificity": (float(recall_score(~yt, ~yp, zero_division=0)) if n_pos < len(yt) else None),
            "threshold": float(np.asarray(thresholds)[j]),
        })
    return rows


class _RankedScores:
    """One label's scores sorted once; sample-weighted AUROC and AP for many weight vectors at once.

    Resampling only re-weights records, so the ranking (and its tie groups) is shared by all
    replicates: each statistic is a sum over tie groups of weighted positive/negative counts.
    Weights come as ``[n_records, n_replicates]`` so the reductions run over contiguous rows.
    """

    def __init__(self, y_true: np.ndarray, y_score: np.ndarray):
        self.order = np.argsort(y_score, kind="mergesort")
        sorted_scores = y_score[self.order]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        self.group_starts = starts if len(starts) < len(sorted_scores) else None  # None: no ties
        self.positive = y_true[self.order].astype(np.float64)[:, None]

    def group_counts(self, weights_t: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Weighted positives and negatives per tie group, ascending score: two [n_groups, B]."""
        w = weights_t[self.order]
        pos, neg = w * self.positive, w * (1.0 - self.positive)
        if self.group_starts is not None:
            pos = np.add.reduceat(pos, self.group_starts, axis=0)
            neg = np.add.reduceat(neg, self.group_starts, axis=0)
        return pos, neg

    @staticmethod
    def auroc(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """Area under the weighted ROC curve; ties count one half (as the trapezoid does)."""
        neg_below = np.cumsum(neg, axis=0) - neg
        total = pos.sum(0) * neg.sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, (pos * (neg_below + 0.5 * neg)).sum(0) / total, np.nan)

    @staticmethod
    def average_precision(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
        """sum_k (R_k - R_{k-1}) P_k over thresholds from the highest score down."""
        pos, neg = pos[::-1], neg[::-1]
        tp, fp = np.cumsum(pos, axis=0), np.cumsum(neg, axis=0)
        total = tp[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
            return np.where(total > 0, (pos * precision).sum(0) / total, np.nan)


def _f1_from_counts(tp, fp, fn) -> np.ndarray:
    denom = 2 * tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / denom, 0.0)


def bootstrap_weights(n_records: int, n_bootstrap: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_bootstrap, n_records]`` record counts, one resample with replacement per row (seeded)."""
    if n_bootstrap < 1 or n_records < 1:
        raise ValueError(f"need n_bootstrap >= 1 and records, got {n_bootstrap} and {n_records}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_records, np.full(n_records, 1.0 / n_records), size=n_bootstrap).astype(np.float64)


def bootstrap_replicates(y_true, y_score, thresholds, weights: np.ndarray,
                         chunk_elements: int = 4_000_000) -> Dict[str, np.ndarray]:
    """Headline metrics of each resample in `weights` (:func:`bootstrap_weights`): {metric: [B]}.

    Same label conventions as :func:`headline_metrics`: macro means run over the labels evaluable
    in the full data; a replicate in which such a label lost all its positives (or negatives)
    averages its AUROC and AP over the rest. ``chunk_elements`` bounds the memory of micro AUROC.
    """
    y_true, y_score = _check_arrays(y_true, y_score)
    n, n_labels = y_true.shape
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 2 or weights.shape[1] != n:
        raise ValueError(f"weights must be [n_bootstrap, {n}], got {weights.shape}")
    n_bootstrap = len(weights)
    pred = binarize(y_score, thresholds)
    ok = np.flatnonzero(_evaluable(y_true))

    tp = weights @ (pred & y_true)
    fp = weights @ (pred & ~y_true)
    fn = weights @ (~pred & y_true)
    union = (pred | y_true).sum(1)
    sample_jaccard = np.where(union > 0, (pred & y_true).sum(1) / np.maximum(union, 1), 1.0)
    exact = (pred == y_true).all(1).astype(np.float64)

    per_label_auroc = np.full((n_bootstrap, len(ok)), np.nan)
    per_label_ap = np.full((n_bootstrap, len(ok)), np.nan)
    weights_t = np.ascontiguousarray(weights.T)
    for k, j in enumerate(ok):
        counts = _RankedScores(y_true[:, j], y_score[:, j]).group_counts(weights_t)
        per_label_auroc[:, k] = _RankedScores.auroc(*counts)
        per_label_ap[:, k] = _RankedScores.average_precision(*counts)

    micro_ranked = _RankedScores(y_true.ravel(), y_score.ravel())  # record-major: record i -> rows i*L..
    micro_auroc = np.empty(n_bootstrap)
    step = max(1, chunk_elements // (n * n_labels))
    for start in range(0, n_bootstrap, step):
        chunk = np.repeat(weights_t[:, start:start + step], n_labels, axis=0)
        micro_auroc[start:start + step] = _RankedScores.auroc(*micro_ranked.group_counts(chunk))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a replicate with no evaluable label
        macro_auroc = np.nanmean(per_label_auroc, axis=1) if len(ok) else np.full(n_bootstrap, np.nan)
        macro_ap = np.nanmean(per_label_ap, axis=1) if len(ok) else np.full(n_bootstrap, np.nan)
    return {
        "macro_auroc": macro_auroc,
        "micro_auroc": micro_auroc,
        "macro_ap": macro_ap,
        "micro_f1": _f1_from_counts(tp.sum(1), fp.sum(1), fn.sum(1)),
        "macro_f1": (_f1_from_counts(tp[:, ok], fp[:, ok], fn[:, ok]).mean(1) if len(ok)
                     else np.full(n_bootstrap, np.nan)),
        "jaccard_samples": weights @ sample_jaccard / weights.sum(1),
        "exact_match": weights @ exact / weights.sum(1),
    }


def bootstrap_intervals(y_true, y_score, thresholds, n_bootstrap: int = 1000, seed: int = 0,
                        confidence: float = 0.95) -> Dict[str, Optional[List[float]]]:
    """Percentile bootstrap intervals ``[low, high]`` of the headline metrics (None if undefined)."""
    weights = bootstrap_weights(len(y_true), n_bootstrap, seed)
    replicates = bootstrap_replicates(y_true, y_score, thresholds, weights)
    tail = 100 * (1 - confidence) / 2
    out = {}
    for name, values in replicates.items():
        values = values[np.isfinite(values)]
        out[name] = [float(v) for v in np.percentile(values, [tail, 100 - tail])] if len(values) else None
    return out


def evaluate_scores(y_true, y_score, thresholds, codes: Optional[Sequence[str]] = None,
                    n_bootstrap: int = 1000, seed: int = 0) -> Dict:
    """Everything `metrics.json` reports about one set of scores, given already-chosen thresholds."""
    y_true, y_score = _check_arrays(y_true, y_score)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (y_true.shape[1],):
        raise ValueError(f"need one threshold per label ({y_true.shape[1]}), got shape {thresholds.shape}")
    per_label = per_label_metrics(y_true, y_score, thresholds, codes)
    undefined = [row["code"] for row in per_label if row["auroc"] is None]
    return {
        "n_records": int(y_true.shape[0]),
        "n_labels": int(y_true.shape[1]),
        "headline": headline_metrics(y_true, y_score, thresholds),
        "confidence_intervals": (
            {"method": "percentile bootstrap over records", "level": 0.95, "n_bootstrap": int(n_bootstrap),
             "seed": int(seed), "intervals": bootstrap_intervals(y_true, y_score, thresholds, n_bootstrap, seed)}
            if n_bootstrap else None),
        "labels_auroc_undefined": {"count": len(undefined), "codes": undefined,
                                   "note": "excluded from macro AUROC, macro AP and macro F1"},
        "per_label": per_label,
    }
