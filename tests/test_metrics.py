"""Multi-label metrics against scikit-learn, undefined labels, validation-only thresholds, bootstrap."""
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    recall_score,
    roc_auc_score,
)

from open_clip_ecg import metrics as M


@pytest.fixture(scope="module")
def arrays():
    """80 records x 5 labels, scores rounded to 0.05 so ties occur, labels 0 and 1 informative."""
    rng = np.random.default_rng(7)
    y = rng.random((80, 5)) < np.array([0.3, 0.5, 0.2, 0.4, 0.35])
    s = np.round(np.clip(rng.random((80, 5)) * 0.7 + 0.3 * y * np.array([1, 1, 0, 0.5, 0]), 0, 1) * 20) / 20
    return y, s


def test_headline_metrics_match_scikit_learn(arrays):
    y, s = arrays
    thresholds = np.array([0.5, 0.4, 0.6, 0.5, 0.45])
    pred = s >= thresholds
    got = M.headline_metrics(y, s, thresholds)
    assert got["macro_auroc"] == pytest.approx(roc_auc_score(y, s, average="macro"))
    assert got["micro_auroc"] == pytest.approx(roc_auc_score(y, s, average="micro"))
    assert got["macro_ap"] == pytest.approx(average_precision_score(y, s, average="macro"))
    assert got["micro_f1"] == pytest.approx(f1_score(y, pred, average="micro"))
    assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert got["jaccard_samples"] == pytest.approx(jaccard_score(y, pred, average="samples"))
    assert got["exact_match"] == pytest.approx(accuracy_score(y, pred))
    assert got["macro_auroc"] > 0.6  # the fixture's informative labels are seen as such


def test_per_label_rows_match_scikit_learn(arrays):
    y, s = arrays
    rows = M.per_label_metrics(y, s, np.full(5, 0.5), codes=list("ABCDE"))
    for j, row in enumerate(rows):
        pred = s[:, j] >= 0.5
        assert row["code"] == "ABCDE"[j] and row["n"] == 80 and row["n_positive"] == y[:, j].sum()
        assert row["prevalence"] == pytest.approx(y[:, j].mean())
        assert row["auroc"] == pytest.approx(roc_auc_score(y[:, j], s[:, j]))
        assert row["ap"] == pytest.approx(average_precision_score(y[:, j], s[:, j]))
        assert row["f1"] == pytest.approx(f1_score(y[:, j], pred))
        assert row["sensitivity"] == pytest.approx(recall_score(y[:, j], pred))
        assert row["specificity"] == pytest.approx(recall_score(~y[:, j], ~pred))


def test_labels_without_positives_or_negatives_are_undefined_excluded_and_counted(arrays):
    y, s = arrays
    y = y.copy()
    y[:, 2] = False  # no positives
    y[:, 4] = True  # no negatives
    result = M.evaluate_scores(y, s, np.full(5, 0.5), codes=list("ABCDE"), n_bootstrap=50)
    rows = {r["code"]: r for r in result["per_label"]}
    assert rows["C"]["auroc"] is None and rows["C"]["auroc_status"] == "undefined (no positives)"
    assert rows["C"]["ap"] is None and rows["C"]["sensitivity"] is None
    assert rows["E"]["auroc"] is None and rows["E"]["auroc_status"] == "undefined (no negatives)"
    assert rows["E"]["specificity"] is None
    assert result["labels_auroc_undefined"]["count"] == 2
    assert result["labels_auroc_undefined"]["codes"] == ["C", "E"]
    ok = [0, 1, 3]
    headline = result["headline"]
    assert headline["macro_auroc"] == pytest.approx(roc_auc_score(y[:, ok], s[:, ok], average="macro"))
    assert headline["macro_ap"] == pytest.approx(average_precision_score(y[:, ok], s[:, ok], average="macro"))
    assert headline["macro_f1"] == pytest.approx(f1_score(y[:, ok], s[:, ok] >= 0.5, average="macro"))
    assert headline["micro_auroc"] == pytest.approx(roc_auc_score(y, s, average="micro"))  # every label
    for interval in result["confidence_intervals"]["intervals"].values():
        assert interval is not None and interval[0] <= interval[1]


def test_macro_auroc_averages_the_evaluable_labels_and_needs_no_threshold(arrays):
    """The figure validation selects on (epochs, C, settings) is the headline's macro AUROC."""
    y, s = arrays
    y = y.copy()
    y[:, 2] = False  # no positives: left out
    expected = roc_auc_score(y[:, [0, 1, 3, 4]], s[:, [0, 1, 3, 4]], average="macro")
    assert M.macro_auroc(y, s) == pytest.approx(expected)
    for thresholds in (np.full(5, M.DEFAULT_THRESHOLD), np.linspace(0.1, 0.9, 5)):
        assert M.headline_metrics(y, s, thresholds)["macro_auroc"] == M.macro_auroc(y, s)
    assert M.macro_auroc(np.zeros_like(y), s) is None  # no label has positives
    with pytest.raises(ValueError, match="must both be"):
        M.macro_auroc(y, s[:, :4])


def test_max_f1_thresholds_reach_the_best_f1_and_skip_labels_without_positives(arrays):
    y, s = arrays
    y = y.copy()
    y[:, 3] = False
    thresholds, sources = M.max_f1_thresholds(y, s)
    for j in (0, 1, 2, 4):
        best = max(f1_score(y[:, j], s[:, j] >= t) for t in np.unique(s[:, j]))
        assert f1_score(y[:, j], s[:, j] >= thresholds[j]) == pytest.approx(best)
        assert sources[j] == "validation max-F1"
    assert thresholds[3] == M.DEFAULT_THRESHOLD and "no positives" in sources[3]


def test_weighted_ranking_statistics_equal_scikit_learn_with_sample_weight(arrays):
    y, s = arrays
    weights = M.bootstrap_weights(len(y), n_bootstrap=6, seed=3)
    for j in range(y.shape[1]):
        ranked = M._RankedScores(y[:, j], s[:, j])
        counts = ranked.group_counts(np.ascontiguousarray(weights.T))
        auroc, ap = M._RankedScores.auroc(*counts), M._RankedScores.average_precision(*counts)
        for b, w in enumerate(weights):
            assert auroc[b] == pytest.approx(roc_auc_score(y[:, j], s[:, j], sample_weight=w), abs=1e-12)
            assert ap[b] == pytest.approx(average_precision_score(y[:, j], s[:, j], sample_weight=w), abs=1e-12)


def test_bootstrap_replicates_equal_metrics_of_the_resampled_records(arrays):
    y, s = arrays
    thresholds = np.full(5, 0.5)
    weights = M.bootstrap_weights(len(y), n_bootstrap=5, seed=11)
    replicates = M.bootstrap_replicates(y, s, thresholds, weights, chunk_elements=100)  # several micro chunks
    for b, w in enumerate(weights):
        index = np.repeat(np.arange(len(y)), w.astype(int))
        expected = M.headline_metrics(y[index], s[index], thresholds)
        for name in M.HEADLINE_METRICS:
            assert replicates[name][b] == pytest.approx(expected[name], abs=1e-12), name


def test_bootstrap_is_seeded(arrays):
    y, s = arrays
    a = M.bootstrap_intervals(y, s, np.full(5, 0.5), n_bootstrap=200, seed=1)
    b = M.bootstrap_intervals(y, s, np.full(5, 0.5), n_bootstrap=200, seed=1)
    c = M.bootstrap_intervals(y, s, np.full(5, 0.5), n_bootstrap=200, seed=2)
    assert a == b and a != c
    point = M.headline_metrics(y, s, np.full(5, 0.5))
    for name in M.HEADLINE_METRICS:
        assert a[name][0] <= point[name] <= a[name][1]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="must both be"):
        M.headline_metrics(np.zeros((3, 2)), np.zeros((3, 3)), [0.5, 0.5])
    with pytest.raises(ValueError, match="0/1"):
        M.headline_metrics(np.full((3, 2), 2), np.zeros((3, 2)), [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        M.headline_metrics(np.zeros((3, 2)), np.full((3, 2), np.nan), [0.5, 0.5])
    with pytest.raises(ValueError, match="one threshold per label"):
        M.evaluate_scores(np.zeros((3, 2)), np.zeros((3, 2)), [0.5])


def test_finding_set_relevance_by_jaccard_level():
    queries = [[1, 1, 0], [0, 0, 0], [1, 0, 0]]  # {A, B}, {}, {A}
    items = [[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1]]  # {A}, {}, {A, B}, {C}
    assert M.finding_set_relevance(queries, items).tolist() == [
        [False, False, True, False], [False, True, False, False], [True, False, False, False]]
    assert M.finding_set_relevance(queries, items, 0.5).tolist() == [  # {A} vs {A, B}: 1/2
        [True, False, True, False], [False, True, False, False], [True, False, True, False]]
    with pytest.raises(ValueError, match="min_jaccard"):
        M.finding_set_relevance(queries, items, 0.0)


def test_multilabel_retrieval_by_hand():
    """Records 0 and 1 share the finding set {A}: each one's text is relevant to the other."""
    labels = [[1, 0], [1, 0], [0, 1]]
    similarity = [[0.9, 0.1, 0.5],   # relevant 0, 1 ranked 1st and 3rd: AP (1/1 + 2/3) / 2 = 5/6
                  [0.2, 0.3, 0.8],   # relevant 0, 1 ranked 3rd and 2nd: AP (1/2 + 2/3) / 2 = 7/12
                  [0.1, 0.7, 0.4]]   # relevant 2 ranked 2nd: AP 1/2
    figures = M.multilabel_retrieval(similarity, labels, labels, ks=(1, 2))
    assert figures == pytest.approx({"mAP": (5 / 6 + 7 / 12 + 1 / 2) / 3, "R@1": 1 / 3, "R@2": 1.0, "queries": 3})


def test_multilabel_retrieval_leaves_out_queries_without_a_relevant_item():
    ecg_labels = [[1, 1], [1, 0]]
    text_labels = [[1, 0], [1, 0]]  # the first text states only one of its ECG's two findings
    figures = M.multilabel_retrieval([[0.2, 0.9], [0.8, 0.1]], ecg_labels, text_labels, ks=(1,))
    assert figures == pytest.approx({"mAP": 1.0, "R@1": 1.0, "queries": 1})
    assert M.multilabel_retrieval([[0.2, 0.9], [0.8, 0.1]], ecg_labels, text_labels, min_jaccard=0.5,
                                ks=(1,)) == pytest.approx({"mAP": 1.0, "R@1": 1.0, "queries": 2})
    with pytest.raises(ValueError, match="similarity of shape"):
        M.multilabel_retrieval([[0.2, 0.9]], ecg_labels, text_labels)
