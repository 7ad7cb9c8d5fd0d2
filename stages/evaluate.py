"""Evaluation: accuracy by shot group, agreement scores and calibration, in pure numpy.

Every metric is computed in float64 from logits (never from rounded probabilities), with
log-softmax in log space. :func:`evaluate` returns the ``metrics.json`` row of one method; the
helpers (:func:`softmax`, :func:`per_class_accuracy`, :func:`confusion`,
:func:`reliability_bins`, ...) are what the report's plots use, so a plotted number and a
tabulated number come from the same code.

Shapes: ``N`` test samples, ``C`` classes, ``M`` confidence bins.

Shot groups follow Liu et al. (OLTR) and Kang et al. (decoupling): *many* = classes with more than
100 train samples, *medium* = 20 to 100 (both ends included), *few* = fewer than 20. See
:func:`shot_groups` for the quantile fallback used on data sets where a group would be empty.

Calibration metrics follow Hong et al. (paper 002, appendix section 6.5, eq. 28-31); where the
printed equations and the paper's tables disagree, the tables decide (see each function).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from longtail.stages.errors import LongtailError

__all__ = [
    "METRIC_KEYS",
    "SPLIT_RULES",
    "evaluate",
    "shot_groups",
    "log_softmax",
    "softmax",
    "per_class_accuracy",
    "confusion",
    "reliability_bins",
    "expected_calibration_error",
    "classwise_ece",
    "brier_score",
    "nll",
    "matthews_corrcoef",
    "normalized_mutual_info",
    "group_counts",
    "group_accuracy",
    "macro_precision",
    "group_metrics",
]

#: The keys of :func:`evaluate`'s result, in report order (the ``metrics.json`` contract).
METRIC_KEYS: tuple[str, ...] = (
    "overall",
    "balanced_accuracy",
    "many",
    "medium",
    "few",
    "mcc",
    "nmi",
    "ece",
    "brier",
    "nll",
)

#: Accepted values of ``split_rule``.
SPLIT_RULES: tuple[str, ...] = ("auto", "absolute", "quantile")

SplitRule = Literal["auto", "absolute", "quantile"]

# Rows of logits converted to float64 at a time: bounds the temporary memory of evaluate() to
# about 32 MB whatever N x C is (iNaturalist: 8142 classes).
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------- validation
def _check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim != 2:
        raise LongtailError(f"{what}: expected a 2-D array (N x C), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise LongtailError(f"{what}: empty array of shape {arr.shape} (need N >= 1 and C >= 1)")
    if arr.dtype.kind not in "fiub":
        raise LongtailError(f"{what}: expected numbers, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise LongtailError(f"{what}: {bad} row(s) contain NaN or infinite values")
    return arr


def _check_labels(labels: np.ndarray, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise LongtailError(f"{what}: expected shape ({n},) to match {n} rows, got shape {lab.shape}")
    if lab.dtype.kind == "f":
        if not np.isfinite(lab).all() or not np.all(lab == np.round(lab)):
            raise LongtailError(f"{what}: must be integer class indices")
    elif lab.dtype.kind not in "iu":
        raise LongtailError(f"{what}: must be integer class indices, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    lo, hi = int(lab.min()), int(lab.max())
    if lo < 0 or hi >= num_classes:
        raise LongtailError(
            f"{what}: class index {lo if lo < 0 else hi} outside [0, {num_classes})"
        )
    return lab


def _check_pred_labels(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``pred`` and ``labels`` ``(N,)`` against each other and ``C = num_classes``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise LongtailError(f"num_classes: expected a positive integer, got {num_classes!r}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] == 0:
        raise LongtailError(f"labels: expected a non-empty 1-D array, got shape {lab.shape}")
    lab = _check_labels(lab, lab.shape[0], int(num_classes))
    return _check_labels(pred, lab.shape[0], int(num_classes), what="pred"), lab


def _check_probs(probs: np.ndarray, what: str = "probs") -> np.ndarray:
    arr = _check_logits(probs, what).astype(np.float64, copy=False)
    # 1e-6 tolerates float32 rounding of probabilities computed elsewhere.
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise LongtailError(f"{what}: probabilities must lie in [0, 1] (found {arr.min():.3g}..{arr.max():.3g})")
    return arr


def _check_counts(class_counts: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise LongtailError(f"class_counts: expected a non-empty 1-D array, got shape {counts.shape}")
    if num_classes is not None and counts.size != num_classes:
        raise LongtailError(
            f"class_counts: {counts.size} entries for {num_classes} classes (logits have {num_classes} columns)"
        )
    if counts.dtype.kind == "f":
        if not np.isfinite(counts).all() or not np.all(counts == np.round(counts)):
            raise LongtailError("class_counts: must be integer train counts")
    elif counts.dtype.kind not in "iu":
        raise LongtailError(f"class_counts: must be integer train counts, got dtype {counts.dtype}")
    counts = counts.astype(np.int64)
    if (counts < 0).any():
        raise LongtailError("class_counts: negative entries")
    return counts


def _check_bins(n_bins: int, what: str = "ece_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise LongtailError(f"{what}: expected a positive integer, got {n_bins!r}")
    return int(n_bins)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN when there is none (guards the empty mean)."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    return float(values[keep].mean())


def _share(part: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``part / total`` element-wise as float64, NaN where ``total`` is 0 (guards the division:
    an accuracy over no sample is undefined)."""
    out = np.full(np.shape(total), np.nan)
    present = total > 0
    out[present] = part[present] / total[present]
    return out


# ---------------------------------------------------------------------------------- probabilities
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax ``(N, C) -> (N, C)`` float64: ``x - logsumexp(x)``, max-shifted."""
    x = _check_logits(logits).astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))  # the sum is >= 1 after the shift
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``(N, C) -> (N, C)`` float64, computed as ``exp(log_softmax(logits))``."""
    return np.exp(log_softmax(logits))


def _row_stats(logits: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample quantities ``(N,)`` from logits ``(N, C)``, in chunks of rows, float64.

    ``pred`` (argmax, first on ties), ``conf`` (top-1 probability), ``logp_true`` (log-probability
    of the true label) and ``sum_p2`` (``sum_c p_c^2``, for the Brier score).
    """
    n, c = logits.shape
    step = max(1, _CHUNK_ELEMENTS // c)
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
    pred, labels = _check_pred_labels(pred, labels, num_classes)
    total = np.bincount(labels, minlength=num_classes)
    correct = np.bincount(labels[pred == labels], minlength=num_classes)
    return _share(correct, total)  # classes absent from the test labels stay NaN


def confusion(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrix ``(C, C)`` int64: row = true class, column = predicted class; sums to N."""
    pred, labels = _check_pred_labels(pred, labels, num_classes)
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def matthews_corrcoef(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Multiclass Matthews correlation (Gorodkin's R_K), as scikit-learn computes it.

    ``(c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))`` with ``t``/``p`` the true/predicted counts per
    class, ``c`` the correct count and ``s = N``; 0 when either variance term is 0 (a constant
    prediction or a single test class), like scikit-learn.
    """
    pred, labels = _check_pred_labels(pred, labels, num_classes)
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
    counts = _check_counts(class_counts)
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


# ---------------------------------------------------------------------------------- calibration
def _bin_index(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin ``m`` (0-based) of each value: ``m/M < v <= (m+1)/M`` (paper 002, below eq. 31).

    Edges are ``arange(M+1)/M`` so they equal ``m/M`` exactly; 0 (which no half-open bin holds)
    goes to the first bin, and values a rounding error above 1 to the last.
    """
    edges = np.arange(n_bins + 1, dtype=np.float64) / n_bins
    idx = np.searchsorted(edges, values, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def _reliability(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
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


def _ece_from_bins(bins: dict[str, np.ndarray]) -> float:
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
    p = _check_probs(probs)
    lab = _check_labels(labels, p.shape[0], p.shape[1])
    m = _check_bins(n_bins, "n_bins")
    pred = p.argmax(axis=1)
    conf = p[np.arange(p.shape[0]), pred]
    return _reliability(conf, pred == lab, m)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> float:
    """ECE, paper 002 eq. 28: ``sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` over top-1 confidence.

    Eq. 28 writes the binned quantity as ``p(y_i|x_i)``; the text (section 4.4, "predictive
    probability max_y p(y|x)") and Guo et al. [20] make it the top-1 confidence, used here.
    Computed through :func:`reliability_bins`, so it equals what the reliability diagram shows.
    ``probs (N, C)``, ``labels (N,)``; returns a float in ``[0, 1]``.
    """
    return _ece_from_bins(reliability_bins(probs, labels, n_bins))


def classwise_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 20) -> float:
    """Classwise ECE (Kull et al. 2019, ref. [31] of paper 002, eq. 29).

    ``(1/C) sum_j sum_m |B_mj|/N * |freq_j(B_mj) - conf_j(B_mj)|`` where ``B_mj`` holds the samples
    whose probability *for class j* falls in bin ``m``, ``freq_j`` is the fraction of them whose
    label is ``j`` and ``conf_j`` their mean probability for ``j``. Paper 002's eq. 29 as printed
    omits the ``1/N`` and describes ``B_mj`` as the samples *of* class ``j``; its tables
    (0.0048 for 100 classes, 0.0004 for 1000) only fit Kull et al.'s definition, which the paper
    says it follows, so that one is implemented. ``probs (N, C)``, ``labels (N,)``; returns a float.
    """
    p = _check_probs(probs)
    n, c = p.shape
    lab = _check_labels(labels, n, c)
    m = _check_bins(n_bins, "n_bins")
    total = 0.0
    for j in range(c):
        stats = _reliability(p[:, j], lab == j, m)
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
    p = _check_probs(probs)
    lab = _check_labels(labels, p.shape[0], p.shape[1])
    p_true = p[np.arange(p.shape[0]), lab]
    per_sample = (p * p).sum(axis=1) - 2.0 * p_true + 1.0
    return float(np.clip(per_sample, 0.0, None).mean())


def nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood, paper 002 eq. 31 (a mean, as the tables are).

    ``-(1/N) sum_i log_softmax(logits)_i[y_i]``, computed in log space from ``logits (N, C)``
    so that a confident mistake gives a large finite value instead of ``inf``.
    """
    x = _check_logits(logits)
    lab = _check_labels(labels, x.shape[0], x.shape[1])
    return float(-_row_stats(x, lab)["logp_true"].mean())


# ---------------------------------------------------------------------------------- groups (GLT)
def _check_attributes(attributes: np.ndarray, n: int) -> np.ndarray:
    att = np.asarray(attributes)
    if att.ndim != 1 or att.shape[0] != n:
        raise LongtailError(f"attributes: expected shape ({n},) to match {n} labels, got shape {att.shape}")
    if att.dtype.kind not in "iu":
        raise LongtailError(f"attributes: must be integer attribute indices, got dtype {att.dtype}")
    att = att.astype(np.int64)
    if att.min() < 0:
        raise LongtailError(f"attributes: attribute index {int(att.min())} is negative")
    return att


def group_counts(labels: np.ndarray, attributes: np.ndarray, num_classes: int,
                 num_attributes: int | None = None) -> np.ndarray:
    """Samples per (class, attribute) group ``(C, A)`` int64; ``A`` defaults to ``max + 1``."""
    lab = _check_labels(labels, np.asarray(labels).shape[0], num_classes)
    att = _check_attributes(attributes, lab.shape[0])
    a = int(att.max()) + 1 if num_attributes is None else max(int(num_attributes), int(att.max()) + 1)
    return np.bincount(lab * a + att, minlength=num_classes * a).reshape(num_classes, a).astype(np.int64)


def group_accuracy(pred: np.ndarray, labels: np.ndarray, attributes: np.ndarray, num_classes: int,
                   num_attributes: int | None = None) -> np.ndarray:
    """Accuracy of every (class, attribute) group ``(C, A)`` float64, NaN for an empty group.

    The groups of the subpopulation-shift and GLT evaluations in paper 000 (Tables 3 and A-2:
    "average and worst-group accuracy"; a group is a (class, attribute) pair, Waterbirds' four
    (bird, scene) pairs). ``pred``, ``labels``, ``attributes`` ``(N,)``; ``A`` defaults to the
    largest attribute + 1.
    """
    pred, lab = _check_pred_labels(pred, labels, num_classes)
    total = group_counts(lab, attributes, num_classes, num_attributes)
    a = total.shape[1]
    att = np.asarray(attributes).astype(np.int64)
    hit = pred == lab
    correct = np.bincount(lab[hit] * a + att[hit], minlength=num_classes * a).reshape(num_classes, a)
    return _share(correct, total)  # an empty group has no accuracy


def macro_precision(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class precision ``TP_c / #{pred = c}`` over the classes in ``labels`` (the
    "precision" of paper 000's Table 4 / Tang et al. 2022). A class that is never predicted has
    precision 0 (scikit-learn's ``zero_division=0``): a classifier that never names a class
    should not have that class drop out of the mean."""
    pred, lab = _check_pred_labels(pred, labels, num_classes)
    predicted = np.bincount(pred, minlength=num_classes).astype(np.float64)
    tp = np.bincount(lab[pred == lab], minlength=num_classes).astype(np.float64)
    present = np.bincount(lab, minlength=num_classes) > 0
    prec = np.zeros(num_classes)
    named = predicted > 0  # guards the division: a class never predicted keeps precision 0
    prec[named] = tp[named] / predicted[named]
    return float(prec[present].mean())  # labels is non-empty, so some class is present


def group_metrics(logits: np.ndarray, labels: np.ndarray, attributes: np.ndarray,
                  num_attributes: int | None = None) -> dict:
    """The generalized long-tail metrics of one method (paper 000, Tables 3, 4 and A-2).

    Args:
        logits: ``(N, C)`` class scores; labels, attributes: ``(N,)``.

    Returns:
        ``average_group``: mean accuracy over the (class, attribute) groups with test samples;
        ``worst_group``: the lowest of them; ``group_accuracy``: the ``(C, A)`` table as nested
        lists (NaN for an empty group); ``macro_precision``: see :func:`macro_precision`.
    """
    x = _check_logits(logits)
    n, c = x.shape
    lab = _check_labels(labels, n, c)
    pred = x.argmax(axis=1)
    acc = group_accuracy(pred, lab, attributes, c, num_attributes)
    present = acc[~np.isnan(acc)]  # non-empty: every test sample is in a group
    return {
        "average_group": float(present.mean()),
        "worst_group": float(present.min()),
        "group_accuracy": acc.tolist(),
        "macro_precision": macro_precision(pred, lab, c),
    }


# ---------------------------------------------------------------------------------- evaluate
def evaluate(
    logits: np.ndarray,
    labels: np.ndarray,
    class_counts: np.ndarray,
    *,
    many_threshold: int = 100,
    few_threshold: int = 20,
    split_rule: SplitRule = "auto",
    ece_bins: int = 20,
) -> dict[str, float]:
    """Every metric of one method on one test split: a ``metrics.json`` row.

    Args:
        logits: ``(N, C)`` unnormalised class scores (finite).
        labels: ``(N,)`` true class indices in ``[0, C)``.
        class_counts: ``(C,)`` per-class TRAIN counts (defines the shot groups).
        many_threshold, few_threshold, split_rule: the shot-group rule, see :func:`shot_groups`.
        ece_bins: equal-width bins of top-1 confidence for the ECE (paper 002: 20).

    Returns:
        A dict with exactly the keys of :data:`METRIC_KEYS`, all Python floats:

        * ``overall``: top-1 accuracy, a fraction in ``[0, 1]``;
        * ``balanced_accuracy``: mean per-class recall over the classes present in ``labels``;
        * ``many`` / ``medium`` / ``few``: mean per-class accuracy over the group's classes that
          have test samples; NaN when the group is empty or none of its classes is in the test
          split (the report prints "n/a"; the JSON writer turns NaN into ``null``);
        * ``mcc``: multiclass Matthews correlation, see :func:`matthews_corrcoef`;
        * ``nmi``: normalised mutual information of predictions and labels;
        * ``ece``: expected calibration error of the top-1 confidence;
        * ``brier``: mean over samples of ``sum_c (p_c - y_c)^2``, not divided by ``C``;
        * ``nll``: mean negative log-likelihood (natural log).
    """
    x = _check_logits(logits)
    n, c = x.shape
    lab = _check_labels(labels, n, c)
    counts = _check_counts(class_counts, c)
    bins = _check_bins(ece_bins)
    many_idx, medium_idx, few_idx, _ = shot_groups(
        counts, many_threshold=many_threshold, few_threshold=few_threshold, split_rule=split_rule
    )

    rows = _row_stats(x, lab)
    pred = rows["pred"]
    correct = pred == lab
    acc_c = per_class_accuracy(pred, lab, c)
    p_true = np.exp(rows["logp_true"])
    brier = np.clip(rows["sum_p2"] - 2.0 * p_true + 1.0, 0.0, None)  # see brier_score
    return {
        "overall": float(correct.mean()),
        "balanced_accuracy": _nanmean(acc_c),
        "many": _nanmean(acc_c[many_idx]),
        "medium": _nanmean(acc_c[medium_idx]),
        "few": _nanmean(acc_c[few_idx]),
        "mcc": matthews_corrcoef(pred, lab, c),
        "nmi": normalized_mutual_info(pred, lab),
        "ece": _ece_from_bins(_reliability(rows["conf"], correct, bins)),
        "brier": float(brier.mean()),
        "nll": float(-rows["logp_true"].mean()),
    }
