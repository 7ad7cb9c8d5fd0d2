"""Calibration: reliability bins, ECE, classwise ECE, Brier score and NLL.

These follow Hong et al. (paper 002, appendix section 6.5, eq. 28-31); where the printed
equations and the paper's tables disagree, the tables decide (see each function).
"""

from __future__ import annotations

import numpy as np

from longtail.stages.evaluate.classification import row_stats
from longtail.stages.evaluate.validate import check_bins, check_labels, check_logits, check_probs


def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``m`` (0-based) of each value: ``m/M < v <= (m+1)/M`` (paper 002, below eq. 31).

    Edges are ``arange(M+1)/M`` so they equal ``m/M`` exactly; 0 (which no half-open bin holds)
    goes to the first bin, and values a rounding error above 1 to the last.
    """
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    idx = np.searchsorted(edges, values, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    """Reliability bins of confidences ``conf (N,)`` and hits ``correct (N,)`` bool, unchecked
    (what :func:`reliability_bins` returns, from per-sample values computed elsewhere)."""
    idx = _bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    confidence = np.full(n_bins, np.nan)
    accuracy = np.full(n_bins, np.nan)
    filled = count > 0  # guards the division: empty bins have no mean (NaN)
    confidence[filled] = conf_sum[filled] / count[filled]
    accuracy[filled] = acc_sum[filled] / count[filled]
    return {
        "edges": np.arange(n_bins + 1, dtype=np.float64) / n_bins,
        "confidence": confidence,
        "accuracy": accuracy,
        "count": count,
    }


def ece_from_bins(bins: dict[str, np.ndarray]) -> float:
    """ECE (paper 002 eq. 28) of reliability bins: ``sum_m count_m * |acc_m - conf_m| / N``
    over the filled bins, so a diagram and its ECE come from the same bins."""
    count = bins["count"]
    filled = count > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(count[filled] * gap) / count.sum())  # count.sum() = N >= 1


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> dict[str, np.ndarray]:
    """Top-1 confidence histogram for reliability diagrams and ECE.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to 1).
        labels: ``(N,)`` true class indices.
        n_bins: ``M`` equal-width bins on ``[0, 1]``; bin ``m`` holds ``m/M < conf <= (m+1)/M``.

    Returns:
        ``edges`` ``(M+1,)``; ``confidence`` ``(M,)`` mean top-1 probability per bin;
        ``accuracy`` ``(M,)`` fraction of correct top-1 predictions per bin (both NaN for an empty
        bin); ``count`` ``(M,)`` int64 samples per bin (sums to N).
    """
    p = check_probs(probs)
    lab = check_labels(labels, p.shape[0], p.shape[1])
    m = check_bins(n_bins, "n_bins")
    pred = p.argmax(axis=1)
    conf = p[np.arange(p.shape[0]), pred]
    return reliability(conf, pred == lab, m)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> float:
    """ECE, paper 002 eq. 28: ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` over top-1 confidence.

    Eq. 28 writes the binned quantity as ``p(y_i|x_i)``; the text (section 4.4, "predictive
    probability max_y p(y|x)") and Guo et al. [20] make it the top-1 confidence, used here.
    Computed through :func:`reliability_bins`, so it equals what the reliability diagram shows.
    ``probs (N, C)``, ``labels (N,)``; returns a float in ``[0, 1]``.
    """
    return ece_from_bins(reliability_bins(probs, labels, n_bins))


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> float:
    """Classwise ECE (Kull et al. 2019, ref. [31] of paper 002, eq. 29).

    ``(1/C) sum_j sum_m |B_mj|/N * |freq_j(B_mj) - conf_j(B_mj)|`` where ``B_mj`` holds the samples
    whose probability *for class j* falls in bin ``m``, ``freq_j`` is the fraction of them whose
    label is ``j`` and ``conf_j`` their mean probability for ``j``. Paper 002's eq. 29 as printed
    omits the ``1/N`` and describes ``B_mj`` as the samples *of* class ``j``; its tables
    (0.0048 for 100 classes, 0.0004 for 1000) only fit Kull et al.'s definition, which the paper
    says it follows, so that one is implemented. ``probs (N, C)``, ``labels (N,)``; returns a float.
    """
    p = check_probs(probs)
    n, c = p.shape
    lab = check_labels(labels, n, c)
    m = check_bins(n_bins, "n_bins")
    total = 0.0
    for j in range(c):
        stats = reliability(p[:, j], lab == j, m)
        filled = stats["count"] > 0
        gap = np.abs(stats["accuracy"][filled] - stats["confidence"][filled])
        total += float(np.sum(stats["count"][filled] * gap)) / n  # n >= 1 (validated)
    return total / c  # c >= 1 (validated)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multiclass Brier score, paper 002 eq. 30: mean over samples of ``sum_c (p_c - y_c)^2``.

    Not divided by ``C`` (range ``[0, 2]``). Eq. 30 as printed sums over samples as well, but the
    paper's tables (0.61-0.77) are per-sample means, so the mean is taken.
    ``probs (N, C)``, ``labels (N,)`` -> float.
    """
    p = check_probs(probs)
    lab = check_labels(labels, p.shape[0], p.shape[1])
    p_true = p[np.arange(p.shape[0]), lab]
    per_sample = (p * p).sum(axis=1) - 2.0 * p_true + 1.0
    return float(np.clip(per_sample, 0.0, None).mean())


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood, paper 002 eq. 31 (a mean, as the tables are).

    ``-(1/N) sum_i log_softmax(logits)_i[y_i]``, computed in log space from ``logits (N, C)``
    so that a confident mistake gives a large finite value instead of ``inf``.
    """
    x = check_logits(logits)
    lab = check_labels(labels, x.shape[0], x.shape[1])
    return float(-row_stats(x, lab)["logp_true"].mean())


__all__ = [
    "brier_score",
    "classwise_ece",
    "ece_from_bins",
    "expected_calibration_error",
    "nll",
    "reliability",
    "reliability_bins",
]
