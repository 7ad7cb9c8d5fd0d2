"""95% confidence intervals of the report's metrics.

Two sources of spread, one interval each:

* **over seeds** (:func:`t_interval`): a method fitted with ``n >= 2`` seeds has ``n`` values of each
  metric; the Student-t interval ``mean +- t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard
  deviation, ``n - 1`` in its denominator) covers the mean over fits;
* **over test samples** (:func:`bootstrap_intervals`): a method fitted once has one value, and the
  test split is a finite sample: the percentile bootstrap (2.5th and 97.5th percentiles over
  ``B`` resamples) of the accuracies, resampling the test rows **within each class** so that every
  resample keeps the split's class counts (a balanced test split stays balanced).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

#: the metrics a bootstrap interval is computed for (the accuracies, from per-row correctness)
BOOTSTRAP_KEYS = ("overall", "balanced_accuracy", "many", "medium", "few")
#: bootstrap resamples
BOOTSTRAP_RESAMPLES = 1000


def t_interval(values, level: float = 0.95) -> tuple[float, float]:
    """``(low, high)`` Student-t interval of the mean of ``values`` (``n >= 2`` finite numbers);
    NaN bounds when a value is NaN or there are fewer than 2."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or not np.isfinite(v).all():
        return float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean() - half), float(v.mean() + half)


def bootstrap_intervals(logits: np.ndarray, labels: np.ndarray, groups: dict[str, np.ndarray], *,
                        resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                        level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of :data:`BOOTSTRAP_KEYS`, test rows resampled within each class.

    Args:
        logits: ``(N, C)`` test logits; labels ``(N,)``.
        groups: ``{"many": class indices, "medium": ..., "few": ...}`` (the shot groups).
    Returns:
        ``{metric: (low, high)}``; NaN bounds for a group without a class in the test split.
    """
    labels = np.asarray(labels)
    c = logits.shape[1]
    correct = (np.asarray(logits).argmax(axis=1) == labels).astype(np.float64)
    rng = np.random.default_rng(seed)
    counts = np.bincount(labels, minlength=c)
    per_class = np.full((resamples, c), np.nan)  # resampled per-class accuracy
    for k in np.flatnonzero(counts):
        rows = correct[labels == k]
        per_class[:, k] = rows[rng.integers(0, rows.size, size=(resamples, rows.size))].mean(axis=1)
    present = counts > 0
    draws = {"overall": (per_class[:, present] * counts[present]).sum(axis=1) / counts.sum(),
             "balanced_accuracy": per_class[:, present].mean(axis=1)}
    for name in ("many", "medium", "few"):
        idx = [int(i) for i in groups.get(name, []) if present[int(i)]]
        draws[name] = per_class[:, idx].mean(axis=1) if idx else np.full(resamples, np.nan)
    tail = 100 * (1 - level) / 2
    out = {}
    for key in BOOTSTRAP_KEYS:
        d = draws[key]
        out[key] = ((float("nan"), float("nan")) if np.isnan(d).any()
                    else (float(np.percentile(d, tail)), float(np.percentile(d, 100 - tail))))
    return out
