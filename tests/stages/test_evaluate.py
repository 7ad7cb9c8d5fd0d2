"""Tests of stages/evaluate/: metrics against scikit-learn, plain loops and hand-computed values."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

import longtail.stages.evaluate as ev
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import (
    METRIC_KEYS,
    brier_score,
    classwise_ece,
    confusion,
    evaluate,
    expected_calibration_error,
    log_softmax,
    nll,
    per_class_accuracy,
    reliability_bins,
    shot_groups,
    softmax,
)


def _random_problem(seed: int, n: int = 400, c: int = 9, signal: float = 1.5):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c)) * 2.0
    logits[np.arange(n), labels] += signal
    counts = rng.integers(1, 400, c)
    return logits.astype(np.float32), labels, counts


# ---------------------------------------------------------------------------------- vs scikit-learn
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_mcc_nmi_match_sklearn(seed):
    logits, labels, counts = _random_problem(seed)
    pred = logits.argmax(axis=1)
    out = evaluate(logits, labels, counts)
    assert out["overall"] == pytest.approx(skm.accuracy_score(labels, pred), abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, pred), abs=1e-12)
    assert out["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, pred), abs=1e-12)
    assert out["nmi"] == pytest.approx(skm.normalized_mutual_info_score(labels, pred), abs=1e-12)


def test_balanced_accuracy_skips_classes_absent_from_test_labels():
    # Class 3 is predicted but never a true label: the mean runs over classes 0-2 only.
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    pred = np.array([0, 3, 1, 1, 2, 3, 2, 0])
    logits = np.eye(4)[pred] * 5.0
    out = evaluate(logits, labels, np.array([300, 50, 10, 5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that y_pred has a class not in y_true
        expected = skm.balanced_accuracy_score(labels, pred)
    assert out["balanced_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert out["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)


@pytest.mark.filterwarnings("ignore:A single label was found")  # sklearn, on the one-class cases
@pytest.mark.parametrize(
    "labels, pred",
    [
        ([0, 1, 2, 0, 1], [1, 1, 1, 1, 1]),  # constant prediction
        ([2, 2, 2, 2], [2, 2, 2, 2]),  # one class, predicted perfectly
        ([2, 2, 2, 2], [0, 1, 2, 0]),  # one true class, several predicted
        ([0, 0, 1, 1], [1, 1, 0, 0]),  # a relabelling: NMI 1, MCC -1
    ],
)
def test_mcc_and_nmi_edge_cases_match_sklearn(labels, pred):
    labels, pred = np.array(labels), np.array(pred)
    assert ev.matthews_corrcoef(pred, labels, 3) == pytest.approx(skm.matthews_corrcoef(labels, pred), abs=1e-12)
    assert ev.normalized_mutual_info(pred, labels) == pytest.approx(
        skm.normalized_mutual_info_score(labels, pred), abs=1e-12
    )


def test_confusion_matches_sklearn_and_sums_to_n():
    logits, labels, _ = _random_problem(3, n=250, c=6)
    pred = logits.argmax(axis=1)
    cm = confusion(pred, labels, 6)
    assert cm.sum() == 250
    np.testing.assert_array_equal(cm, skm.confusion_matrix(labels, pred, labels=range(6)))
    acc = per_class_accuracy(pred, labels, 6)
    np.testing.assert_allclose(acc, np.diag(cm) / cm.sum(axis=1))


def test_per_class_accuracy_is_nan_for_a_class_without_test_samples():
    acc = per_class_accuracy(np.array([0, 1, 1]), np.array([0, 1, 0]), 3)
    assert acc[0] == 0.5 and acc[1] == 1.0 and math.isnan(acc[2])


# ---------------------------------------------------------------------------------- calibration
def _ece_loop(probs, labels, n_bins):
    """ECE as paper 002 eq. 28 reads, one sample and one bin at a time."""
    n = len(labels)
    conf = [max(row) for row in probs.tolist()]
    pred = [row.index(max(row)) for row in probs.tolist()]
    total = 0.0
    for m in range(1, n_bins + 1):
        members = [i for i in range(n) if (m - 1) / n_bins < conf[i] <= m / n_bins]
        if m == 1:
            members += [i for i in range(n) if conf[i] == 0.0]
        if not members:
            continue
        acc = sum(pred[i] == labels[i] for i in members) / len(members)
        avg = sum(conf[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - avg)
    return total


@pytest.mark.parametrize("n_bins", [20, 7])
def test_ece_equals_a_plain_loop(n_bins):
    logits, labels, counts = _random_problem(4, n=300, c=5, signal=1.0)
    probs = softmax(logits)
    expected = _ece_loop(probs, labels.tolist(), n_bins)
    assert expected > 0.01  # a non-trivial value, so agreement means something
    assert expected_calibration_error(probs, labels, n_bins) == pytest.approx(expected, abs=1e-12)
    out = evaluate(logits, labels, counts, ece_bins=n_bins)
    assert out["ece"] == pytest.approx(expected, abs=1e-12)


def test_ece_bins_are_closed_on_the_right():
    # Top-1 confidences exactly on the edges 0.15, 0.5 and 0.75 of 20 bins, plus 1.0.
    rows = []
    for top in (0.15, 0.5, 0.75, 1.0):
        rest = (1.0 - top) / 9
        rows.append([top] + [rest] * 9)
    probs = np.array(rows)
    labels = np.array([0, 1, 0, 0])
    bins = reliability_bins(probs, labels, 20)
    assert bins["count"].sum() == 4
    expected_bins = [int(np.ceil(round(p * 20, 9))) - 1 for p in probs.max(axis=1)]  # (m-1)/M < p <= m/M
    assert expected_bins == [2, 9, 14, 19]
    for b in expected_bins:
        assert bins["count"][b] == 1
    assert expected_calibration_error(probs, labels, 20) == pytest.approx(_ece_loop(probs, labels.tolist(), 20), abs=1e-12)


def test_classwise_ece_equals_a_plain_loop():
    logits, labels, _ = _random_problem(5, n=200, c=4, signal=1.0)
    probs = softmax(logits)
    n, c, m_bins = probs.shape[0], probs.shape[1], 10
    total = 0.0
    for j in range(c):
        for m in range(1, m_bins + 1):
            members = [i for i in range(n) if (m - 1) / m_bins < probs[i, j] <= m / m_bins]
            if not members:
                continue
            freq = sum(labels[i] == j for i in members) / len(members)
            avg = sum(probs[i, j] for i in members) / len(members)
            total += len(members) / n * abs(freq - avg)
    assert classwise_ece(probs, labels, m_bins) == pytest.approx(total / c, abs=1e-12)


def test_brier_and_nll_on_three_hand_computed_samples():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25], [0.1, 0.1, 0.8]])
    labels = np.array([0, 1, 2])
    logits = np.log(probs) + np.array([[3.0], [-2.0], [10.0]])  # per-row shifts change nothing
    # Brier per sample: 0.09+0.04+0.01 = 0.14; 0.25+0.5625+0.0625 = 0.875; 0.01+0.01+0.04 = 0.06
    expected_brier = (0.14 + 0.875 + 0.06) / 3  # = 0.358333..., not divided by C
    # NLL: -(ln 0.7 + ln 0.25 + ln 0.8) / 3 = (0.356675 + 1.386294 + 0.223144) / 3
    expected_nll = 0.6553710
    assert brier_score(probs, labels) == pytest.approx(expected_brier, abs=1e-12)
    assert nll(logits, labels) == pytest.approx(expected_nll, abs=1e-6)
    out = evaluate(logits, labels, np.array([300, 50, 5]))
    assert out["brier"] == pytest.approx(0.3583333333, abs=1e-9)
    assert out["nll"] == pytest.approx(expected_nll, abs=1e-6)


def test_nll_is_finite_for_a_confident_mistake():
    # exp(-1000) underflows to 0 in float64: a probability-space NLL would be inf.
    logits = np.array([[0.0, -1000.0]])
    assert nll(logits, np.array([1])) == pytest.approx(1000.0, rel=1e-12)


# ---------------------------------------------------------------------------------- invariants
def test_softmax_rows_sum_to_one_even_for_huge_logits():
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(50, 12)) * 30
    logits[0] = [1e4] + [0.0] * 11
    logits[1] = -1e4
    probs = softmax(logits)
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax(logits)), probs)
    assert probs.dtype == np.float64


def test_perfect_predictions():
    labels = np.repeat(np.arange(6), 5)
    logits = np.eye(6)[labels] * 40.0
    out = evaluate(logits, labels, np.array([500, 200, 60, 30, 10, 3]))
    for key in ("overall", "balanced_accuracy", "many", "medium", "few", "mcc", "nmi"):
        assert out[key] == pytest.approx(1.0, abs=1e-12), key
    assert out["nll"] < 1e-12
    assert out["brier"] < 1e-12
    assert out["ece"] < 1e-12


def test_evaluate_returns_exactly_the_contract_keys_as_floats():
    logits, labels, counts = _random_problem(7)
    out = evaluate(logits, labels, counts)
    assert tuple(out) == METRIC_KEYS
    assert all(type(v) is float for v in out.values())
    for key in ("overall", "balanced_accuracy", "many", "medium", "few", "ece"):
        assert 0.0 <= out[key] <= 1.0


def test_chunking_does_not_change_the_metrics(monkeypatch):
    logits, labels, counts = _random_problem(8, n=123, c=7)
    whole = evaluate(logits, labels, counts)
    monkeypatch.setattr(ev.classification, "CHUNK_ELEMENTS", 20)  # 2 rows per chunk
    chunked = evaluate(logits, labels, counts)
    assert chunked == pytest.approx(whole, abs=1e-14)


# ---------------------------------------------------------------------------------- shot groups
# Train counts and per-class test results made by hand: class k has 4 test samples and
# correct[k] of them are predicted right.
_COUNTS = np.array([500, 150, 101, 100, 50, 20, 19, 5, 1])
_CORRECT = np.array([4, 3, 2, 4, 2, 0, 1, 1, 0])


def _hand_logits(correct: np.ndarray):
    c = correct.size
    labels = np.repeat(np.arange(c), 4)
    pred = labels.copy()
    for k in range(c):
        wrong = np.flatnonzero(labels == k)[correct[k]:]
        pred[wrong] = (k + 1) % c
    return np.eye(c)[pred] * 3.0, labels


def test_shot_groups_absolute_thresholds():
    many, medium, few, rule = shot_groups(_COUNTS)
    assert rule == "absolute"  # every group has a class, so auto keeps the absolute rule
    assert many.tolist() == [0, 1, 2]  # > 100
    assert medium.tolist() == [3, 4, 5]  # 20..100, both ends included
    assert few.tolist() == [6, 7, 8]  # < 20
    logits, labels = _hand_logits(_CORRECT)
    out = evaluate(logits, labels, _COUNTS)
    assert out["many"] == pytest.approx((4 + 3 + 2) / 12)
    assert out["medium"] == pytest.approx((4 + 2 + 0) / 12)
    assert out["few"] == pytest.approx((1 + 1 + 0) / 12)


def test_auto_falls_back_to_quantile_thirds_without_many_shot_classes():
    counts = np.array([60, 90, 40, 10, 80, 40, 30])  # nothing > 100: the absolute rule has no many group
    many, medium, few, rule = shot_groups(counts)
    assert rule == "quantile"
    assert many.tolist() == [0, 1, 4]  # 90, 80, 60
    assert medium.tolist() == [2, 5]  # 40, 40
    assert few.tolist() == [3, 6]  # 30, 10
    correct = np.array([4, 2, 1, 0, 3, 3, 2])
    logits, labels = _hand_logits(correct)
    out = evaluate(logits, labels, counts)
    assert out["many"] == pytest.approx((4 + 2 + 3) / 12)
    assert out["medium"] == pytest.approx((1 + 3) / 8)
    assert out["few"] == pytest.approx((0 + 2) / 8)
    # Forcing the absolute rule on the same data leaves the many group empty: NaN, not a number.
    forced = evaluate(logits, labels, counts, split_rule="absolute")
    assert math.isnan(forced["many"])
    assert forced["medium"] == pytest.approx((4 + 2 + 1 + 3 + 3 + 2) / 24)  # 20 <= count <= 100
    assert forced["few"] == 0.0  # only the class with 10 train samples


def test_quantile_rule_sizes_and_ties_go_to_the_higher_group():
    many, medium, few, rule = shot_groups(np.arange(10, 0, -1), split_rule="quantile")
    assert (many.size, medium.size, few.size, rule) == (4, 3, 3, "quantile")
    # Ranks 1 and 2 (both 40) straddle the first cut: both join the many group.
    many, medium, few, _ = shot_groups(np.array([50, 40, 40, 20, 10, 5]), split_rule="quantile")
    assert many.tolist() == [0, 1, 2]
    assert medium.tolist() == [3]
    assert few.tolist() == [4, 5]
    # The quantile rule can be forced even where the absolute thresholds would work.
    many, medium, few, rule = shot_groups(_COUNTS, split_rule="quantile")
    assert (many.tolist(), medium.tolist(), few.tolist(), rule) == ([0, 1, 2], [3, 4, 5], [6, 7, 8], "quantile")


def test_custom_thresholds():
    many, medium, few, rule = shot_groups(_COUNTS, many_threshold=50, few_threshold=5, split_rule="absolute")
    assert many.tolist() == [0, 1, 2, 3]
    assert medium.tolist() == [4, 5, 6, 7]
    assert few.tolist() == [8]


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "logits, labels, counts, match",
    [
        (np.zeros(5), np.zeros(5, int), [1], r"2-D"),
        (np.zeros((2, 3, 4)), np.zeros(2, int), [1, 1, 1], r"2-D"),
        (np.zeros((4, 3)), np.zeros(5, int), [1, 1, 1], r"\(4,\)"),
        (np.zeros((4, 3)), np.array([0, 1, 3, 0]), [1, 1, 1], r"outside \[0, 3\)"),
        (np.zeros((4, 3)), np.array([0, -1, 2, 0]), [1, 1, 1], r"outside \[0, 3\)"),
        (np.zeros((4, 3)), np.array([0, 1.5, 2, 0]), [1, 1, 1], r"integer"),
        (np.array([[0, np.nan, 1], [0, 0, 0]]), np.zeros(2, int), [1, 1, 1], r"NaN or infinite"),
        (np.array([[0, np.inf, 1], [0, 0, 0]]), np.zeros(2, int), [1, 1, 1], r"NaN or infinite"),
        (np.zeros((4, 3)), np.zeros(4, int), [1, 1], r"class_counts"),
        (np.zeros((4, 3)), np.zeros(4, int), [1, -1, 1], r"class_counts"),
    ],
)
def test_evaluate_rejects_bad_input(logits, labels, counts, match):
    with pytest.raises(LongtailError, match=match) as info:
        evaluate(logits, labels, np.array(counts))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"split_rule": "thirds"}, "split_rule"),
        ({"many_threshold": 10, "few_threshold": 20}, "few_threshold"),
        ({"ece_bins": 0}, "ece_bins"),
    ],
)
def test_evaluate_rejects_bad_options(kwargs, match):
    logits, labels, counts = _random_problem(9, n=20, c=3)
    with pytest.raises(LongtailError, match=match):
        evaluate(logits, labels, counts, **kwargs)


def test_helpers_reject_bad_input():
    with pytest.raises(LongtailError, match="probabilities"):
        brier_score(np.array([[1.5, -0.5]]), np.array([0]))
    with pytest.raises(LongtailError, match="pred"):
        confusion(np.array([0, 1]), np.array([0, 1, 1]), 2)
    with pytest.raises(LongtailError, match="NaN"):
        softmax(np.array([[np.nan, 0.0]]))
