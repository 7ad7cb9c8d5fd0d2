"""Argument checks and guarded reductions shared by the metrics: a bad argument raises
LongtailError naming it (``logits``, ``labels``, ``class_counts`` ...)."""

from __future__ import annotations

import numpy as np

from longtail.stages.errors import LongtailError


def check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
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


def check_labels(labels: np.ndarray, n: int, num_classes: int, what: str = "labels") -> np.ndarray:
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


def check_pred_labels(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``pred`` and ``labels`` ``(N,)`` against each other and ``C = num_classes``."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise LongtailError(f"num_classes: expected a positive integer, got {num_classes!r}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] == 0:
        raise LongtailError(f"labels: expected a non-empty 1-D array, got shape {lab.shape}")
    lab = check_labels(lab, lab.shape[0], int(num_classes))
    return check_labels(pred, lab.shape[0], int(num_classes), what="pred"), lab


def check_probs(probs: np.ndarray, what: str = "probs") -> np.ndarray:
    arr = check_logits(probs, what).astype(np.float64, copy=False)
    # 1e-6 tolerates float32 rounding of probabilities computed elsewhere.
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise LongtailError(f"{what}: probabilities must lie in [0, 1] (found {arr.min():.3g}..{arr.max():.3g})")
    return arr


def check_counts(class_counts: np.ndarray, num_classes: int | None = None) -> np.ndarray:
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


def check_bins(n_bins: int, what: str = "ece_bins") -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise LongtailError(f"{what}: expected a positive integer, got {n_bins!r}")
    return int(n_bins)


def nanmean(values: np.ndarray) -> float:
    """Mean of the finite entries; NaN when there is none (guards the empty mean)."""
    values = np.asarray(values, dtype=np.float64)
    keep = ~np.isnan(values)
    if not keep.any():
        return float("nan")
    return float(values[keep].mean())


def share(part: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``part / total`` element-wise as float64, NaN where ``total`` is 0 (guards the division:
    an accuracy over no sample is undefined)."""
    out = np.full(np.shape(total), np.nan)
    present = total > 0
    out[present] = part[present] / total[present]
    return out


def check_attributes(attributes: np.ndarray, n: int) -> np.ndarray:
    att = np.asarray(attributes)
    if att.ndim != 1 or att.shape[0] != n:
        raise LongtailError(f"attributes: expected shape ({n},) to match {n} labels, got shape {att.shape}")
    if att.dtype.kind not in "iu":
        raise LongtailError(f"attributes: must be integer attribute indices, got dtype {att.dtype}")
    att = att.astype(np.int64)
    if att.min() < 0:
        raise LongtailError(f"attributes: attribute index {int(att.min())} is negative")
    return att


__all__ = [
    "check_attributes",
    "check_bins",
    "check_counts",
    "check_labels",
    "check_logits",
    "check_pred_labels",
    "check_probs",
    "nanmean",
    "share",
]
