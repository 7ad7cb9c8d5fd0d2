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

Modules: :mod:`~stages.evaluate.classification` (probabilities, accuracy, MCC, NMI, shot
groups), :mod:`~stages.evaluate.calibration` (reliability bins, ECE, Brier, NLL),
:mod:`~stages.evaluate.groups` (GLT group metrics) and :mod:`~stages.evaluate.validate`
(argument checks); every public name is re-exported here.
"""

from __future__ import annotations

import numpy as np

from longtail.stages.evaluate.calibration import (
    brier_score,
    classwise_ece,
    ece_from_bins,
    expected_calibration_error,
    nll,
    reliability,
    reliability_bins,
)
from longtail.stages.evaluate.classification import (
    SPLIT_RULES,
    SplitRule,
    accuracy,
    confusion,
    log_softmax,
    matthews_corrcoef,
    normalized_mutual_info,
    per_class_accuracy,
    row_stats,
    shot_groups,
    softmax,
)
from longtail.stages.evaluate.groups import group_accuracy, group_counts, group_metrics, macro_precision
from longtail.stages.evaluate.validate import check_bins, check_counts, check_labels, check_logits, nanmean

__all__ = [
    "METRIC_KEYS",
    "SPLIT_RULES",
    "evaluate",
    "accuracy",
    "shot_groups",
    "log_softmax",
    "softmax",
    "per_class_accuracy",
    "confusion",
    "reliability_bins",
    "ece_from_bins",
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
    x = check_logits(logits)
    n, c = x.shape
    lab = check_labels(labels, n, c)
    counts = check_counts(class_counts, c)
    bins = check_bins(ece_bins)
    many_idx, medium_idx, few_idx, _ = shot_groups(
        counts, many_threshold=many_threshold, few_threshold=few_threshold, split_rule=split_rule
    )

    rows = row_stats(x, lab)
    pred = rows["pred"]
    correct = pred == lab
    acc_c = per_class_accuracy(pred, lab, c)
    p_true = np.exp(rows["logp_true"])
    brier = np.clip(rows["sum_p2"] - 2.0 * p_true + 1.0, 0.0, None)  # see brier_score
    return {
        "overall": float(correct.mean()),
        "balanced_accuracy": nanmean(acc_c),
        "many": nanmean(acc_c[many_idx]),
        "medium": nanmean(acc_c[medium_idx]),
        "few": nanmean(acc_c[few_idx]),
        "mcc": matthews_corrcoef(pred, lab, c),
        "nmi": normalized_mutual_info(pred, lab),
        "ece": ece_from_bins(reliability(rows["conf"], correct, bins)),
        "brier": float(brier.mean()),
        "nll": float(-rows["logp_true"].mean()),
    }
