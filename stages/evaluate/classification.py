"""Probabilities, accuracy, agreement scores (MCC, NMI) and the many/medium/few shot groups.

Shot groups follow Liu et al. (OLTR) and Kang et al. (decoupling): *many* = classes with more than
100 train samples, *medium* = 20 to 100 (both ends included), *few* = fewer than 20. See
:func:`shot_groups` for the quantile fallback used on data sets where a group would be empty.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from longtail.stages.errors import LongtailError
from longtail.stages.evaluate.validate import check_counts, check_logits, check_pred_labels, share

#: Accepted values of ``split_rule``.
SPLIT_RULES: tuple[str, ...] = ("auto", "absolute", "quantile")

SplitRule = Literal["auto", "absolute", "quantile"]

# Rows of logits converted to float64 at a time: bounds the temporary memory of evaluate() to
# about 32 MB whatever N x C is (iNaturalist: 8142 classes).
CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------- probabilities
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax ``(N, C) -> (N, C)`` float64: ``x - logsumexp(x)``, max-shifted."""
    x = check_logits(logits).astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))  # the sum is >= 1 after the shift
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``(N, C) -> (N, C)`` float64, computed as ``exp(log_softmax(logits))``."""
    return np.exp(log_softmax(logits))


def row_stats(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample quantities ``(N,)`` from logits ``(N, C)``, in chunks of rows, float64.

    ``pred`` (argmax, first on ties), ``conf`` (top-1 probability), ``logp_true`` (log-probability
    of the true label) and ``sum_p2`` (``sum_c p_c^2``, for the Brier score).
    """
    n, c = logits.shape
    step = max(1, CHUNK_ELEMENTS // c)
    pred = np.empty(n, dtype=np.int64)
    conf = np.empty(n, dtype=np.float64)
    logp_true = np.empty(n, dtype=np.float64)
    sum_p2 = np.empty(n, dtype=np.float64)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        x = np.asarray(logits[sl], dtype=np.float64)
        top = x.max(axis=1, keepdims=True)
        shifted = x - top
        lse = np.log(np.exp(shifted).sum(axis=1))  # log sum exp(x - max) >= 0
        logp = shifted - lse[:, None]
        pred[sl] = x.argmax(axis=1)
        conf[sl] = np.exp(-lse)  # max_c p_c = exp(max - logsumexp)
        logp_true[sl] = logp[np.arange(logp.shape[0]), labels[sl]]
        sum_p2[sl] = np.exp(2.0 * logp).sum(axis=1)
    return {"pred": pred, "conf": conf, "logp_true": logp_true, "sum_p2": sum_p2}


# ---------------------------------------------------------------------------------- accuracy
def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``(N, C)`` scores against ``(N,)`` labels."""
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels))


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class recall ``(C,)`` float64: correct / test samples of each class.

    Args:
        pred: ``(N,)`` predicted class indices.
        labels: ``(N,)`` true class indices in ``[0, C)``.
        num_classes: ``C``.

    Returns:
        ``(C,)`` fractions in ``[0, 1]``; NaN for a class with no test sample (its accuracy is
        undefined, and every mean in this module skips it).
    """
    pred, labels = check_pred_labels(pred, labels, num_classes)
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[pred == labels], minlength=num_classes)
    return share(correct, total)  # classes absent from the test labels stay NaN


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix ``(C, C)`` int64: row = true class, column = predicted class; sums to N."""
    pred, labels = check_pred_labels(pred, labels, num_classes)
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def matthews_corrcoef(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K), as scikit-learn computes it.

    ``(c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))`` with ``t``/``p`` the true/predicted counts per
    class, ``c`` the correct count and ``s = N``; 0 when either variance term is 0 (a constant
    prediction or a single test class), like scikit-learn.
    """
    pred, labels = check_pred_labels(pred, labels, num_classes)
    t = np.bincount(labels, minlength=num_classes).astype(np.float64)
    p = np.bincount(pred, minlength=num_classes).astype(np.float64)
    s = float(labels.shape[0])
    c = float((pred == labels).sum())
    cov_tp = c * s - t @ p
    cov_pp = s * s - p @ p
    cov_tt = s * s - t @ t
    denom = cov_pp * cov_tt
    if denom == 0:  # guards the division: a constant prediction or a single true class
        return 0.0
    return float(cov_tp / np.sqrt(denom))


def normalized_mutual_info(pred: np.ndarray, labels: np.ndarray) -> float:
    """Normalised mutual information between true labels and predictions ``(N,)``.

    ``I(Y; Y_hat) / ((H(Y) + H(Y_hat)) / 2)`` (natural log; the arithmetic normaliser is
    scikit-learn's default). Edge cases as in scikit-learn: 1.0 when both labellings are a single
    value, 0.0 when only one of them is (then the mutual information is 0).
    """
    labels, pred = np.asarray(labels), np.asarray(pred)
    if labels.ndim != 1 or labels.shape[0] == 0 or pred.shape != labels.shape:
        raise LongtailError(
            f"pred and labels: expected two non-empty 1-D arrays of equal length, got {pred.shape} and {labels.shape}"
        )
    labels, pred = labels.astype(np.int64), pred.astype(np.int64)
    n = labels.shape[0]  # >= 1
    _, t_inv = np.unique(labels, return_inverse=True)
    clusters, p_inv = np.unique(pred, return_inverse=True)
    k_true, k_pred = int(t_inv.max()) + 1, int(clusters.size)
    if k_true == 1 and k_pred == 1:
        return 1.0
    if k_true == 1 or k_pred == 1:
        return 0.0
    a = np.bincount(t_inv, minlength=k_true).astype(np.float64)
    b = np.bincount(p_inv, minlength=k_pred).astype(np.float64)
    # Sparse contingency table: only the (true, pred) pairs that occur, no C x C array.
    pairs, n_ij = np.unique(t_inv.astype(np.int64) * k_pred + p_inv, return_counts=True)
    n_ij = n_ij.astype(np.float64)
    i, j = pairs // k_pred, pairs % k_pred
    # sum_ij (n_ij/n) log(n n_ij / (a_i b_j)); every count here is >= 1, so each log is finite.
    mi = float(np.sum(n_ij / n * (np.log(n_ij) + np.log(n) - np.log(a[i]) - np.log(b[j]))))
    mi = max(mi, 0.0)  # rounding can leave a tiny negative value for independent labellings
    if mi == 0.0:
        return 0.0
    h_true = float(-np.sum(a / n * (np.log(a) - np.log(n))))
    h_pred = float(-np.sum(b / n * (np.log(b) - np.log(n))))
    # Both entropies are > 0 here (each labelling has >= 2 values), so the normaliser is > 0.
    return float(mi / ((h_true + h_pred) / 2.0))


# ---------------------------------------------------------------------------------- shot groups
def shot_groups(
    class_counts: np.ndarray,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    split_rule: SplitRule = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Split classes into many-, medium- and few-shot groups by their TRAIN counts.

    Rules:

    * ``"absolute"``: many = count ``> many_threshold``, medium = ``few_threshold <= count <=
      many_threshold``, few = count ``< few_threshold`` (Liu et al. / Kang et al.: >100, 20-100,
      <20). A group may be empty; :func:`evaluate` then reports NaN for it (the report prints
      "n/a" and the JSON writer turns NaN into ``null``).
    * ``"quantile"``: classes sorted by train count, largest first (stable order), are cut into
      thirds by rank: rank ``r`` of ``C`` goes to group ``floor(3 r / C)`` (0 many, 1 medium,
      2 few), so for ``C`` not divisible by 3 the extra classes go to the higher-count groups
      (10 classes -> 4/3/3). Classes with equal counts always share a group: a tie that straddles
      a cut goes wholly to the group of the higher count. With ``C >= 3`` distinct counts no group
      is empty; with fewer classes, or many ties, a lower group can still be empty (NaN again).
    * ``"auto"`` (default): ``"absolute"`` when each of its three groups has at least one class,
      otherwise ``"quantile"`` (small or synthetic data sets with no class over 100 samples).

    Args:
        class_counts: ``(C,)`` per-class train counts.
        many_threshold: a class with more train samples than this is many-shot.
        few_threshold: a class with fewer train samples than this is few-shot.
        split_rule: ``"auto"``, ``"absolute"`` or ``"quantile"``.

    Returns:
        ``(many_idx, medium_idx, few_idx, rule_used)``: three sorted int64 arrays of class indices
        that partition ``range(C)``, and ``"absolute"`` or ``"quantile"``.
    """
    counts = check_counts(class_counts)
    if split_rule not in SPLIT_RULES:
        raise LongtailError(f"split_rule: {split_rule!r} is not one of {', '.join(SPLIT_RULES)}")
    for key, value in (("many_threshold", many_threshold), ("few_threshold", few_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise LongtailError(f"{key}: expected a non-negative integer, got {value!r}")
    if few_threshold > many_threshold:
        raise LongtailError(
            f"few_threshold ({few_threshold}) must not exceed many_threshold ({many_threshold})"
        )

    if split_rule in ("auto", "absolute"):
        many = np.flatnonzero(counts > many_threshold)
        few = np.flatnonzero(counts < few_threshold)
        medium = np.flatnonzero((counts >= few_threshold) & (counts <= many_threshold))
        if split_rule == "absolute" or (many.size and medium.size and few.size):
            return many, medium, few, "absolute"

    c = counts.size
    order = np.argsort(-counts, kind="stable")  # largest count first
    group_of_rank = (3 * np.arange(c)) // c  # 0, 1, 2 by thirds of the ranking
    group = np.empty(c, dtype=np.int64)
    group[order] = group_of_rank
    # Ties: every class of a given count joins the highest-count group any of them reached.
    values, inverse = np.unique(counts, return_inverse=True)
    lowest = np.full(values.size, 2, dtype=np.int64)
    np.minimum.at(lowest, inverse, group)
    group = lowest[inverse]
    return (
        np.flatnonzero(group == 0),
        np.flatnonzero(group == 1),
        np.flatnonzero(group == 2),
        "quantile",
    )


__all__ = [
    "CHUNK_ELEMENTS",
    "SPLIT_RULES",
    "SplitRule",
    "accuracy",
    "confusion",
    "log_softmax",
    "matthews_corrcoef",
    "normalized_mutual_info",
    "per_class_accuracy",
    "row_stats",
    "shot_groups",
    "softmax",
]
