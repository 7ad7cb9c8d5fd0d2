"""Generalized long-tail group metrics: accuracy per (class, attribute) group, worst-group
accuracy and macro precision (paper 000, Tables 3, 4 and A-2)."""

from __future__ import annotations

import numpy as np

from longtail.stages.evaluate.validate import check_attributes, check_labels, check_logits, check_pred_labels, share


def group_counts(labels: np.ndarray, attributes: np.ndarray, num_classes: int,
                 num_attributes: int | None = None) -> np.ndarray:
    """Samples per (class, attribute) group ``(C, A)`` int64; ``A`` defaults to ``max + 1``."""
    lab = check_labels(labels, np.asarray(labels).shape[0], num_classes)
    att = check_attributes(attributes, lab.shape[0])
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
    pred, lab = check_pred_labels(pred, labels, num_classes)
    total = group_counts(lab, attributes, num_classes, num_attributes)
    a = total.shape[1]
    att = np.asarray(attributes).astype(np.int64)
    hit = pred == lab
    correct = np.bincount(lab[hit] * a + att[hit], minlength=num_classes * a).reshape(num_classes, a)
    return share(correct, total)  # an empty group has no accuracy


def macro_precision(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean per-class precision ``TP_c / #{pred = c}`` over the classes in ``labels`` (the
    "precision" of paper 000's Table 4 / Tang et al. 2022). A class that is never predicted has
    precision 0 (scikit-learn's ``zero_division=0``): a classifier that never names a class
    should not have that class drop out of the mean."""
    pred, lab = check_pred_labels(pred, labels, num_classes)
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
    x = check_logits(logits)
    n, c = x.shape
    lab = check_labels(labels, n, c)
    pred = x.argmax(axis=1)
    acc = group_accuracy(pred, lab, attributes, c, num_attributes)
    present = acc[~np.isnan(acc)]  # non-empty: every test sample is in a group
    return {
        "average_group": float(present.mean()),
        "worst_group": float(present.min()),
        "group_accuracy": acc.tolist(),
        "macro_precision": macro_precision(pred, lab, c),
    }


__all__ = ["group_accuracy", "group_counts", "group_metrics", "macro_precision"]
