"""Shifted test sets: paper 002 (Hong et al., CVPR 2021), Sec. 4.3 and Table 6.

From a class-balanced test split, long-tailed subsets whose label distribution ranges from the
source's shape (forward) to its reverse (backward). Classes are ranked by their **train** count,
most frequent first (rank ``j = 1 .. C``; ties keep the lower class index first), ``N`` is the
per-class test count and ``mu`` the imbalance ratio:

* **forward**: ``n_j = N * mu^(-(j - 1) / (C - 1))``: the head classes keep ``N`` samples, the tail
  ``N / mu``; the larger ``mu``, the closer to the source distribution;
* **backward**: ``n_j = N * mu^(-(C - j) / (C - 1))``: the same counts in reverse order, the further
  from the source distribution the larger ``mu``;
* ``mu = 1`` is the balanced test split itself (``uniform``).

The paper prints ``N * mu^((j - 1)/C)`` (with ``mu`` read as ``1/ratio``); the CIFAR-LT construction it
cites ([13, 9]) and the authors' code divide by ``C - 1``, which makes the head-to-tail ratio exactly
``mu``; that form is used. Counts are floored as in that code (``int(n)``, with a ``1e-9`` guard
against ``50 * 50^-1 = 0.99999...``) and kept at least 1, so every class stays present and every
prior entry is positive (a ratio above ``N`` is then realised as ``N``, the best the split allows).

``N`` is the smallest per-class count of the test split (the paper's test sets are exactly balanced;
on a nearly balanced split this keeps every ``n_j`` available). Samples are drawn without
replacement from one seeded permutation per class, shared by all subsets: the subsets of one
direction are nested (a larger ``mu`` keeps a subset of the samples of a smaller one), which makes
the columns of the table differ by the shift, not by a fresh draw.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np

from longtail.stages.errors import LongtailError

__all__ = ["RATIOS", "DIRECTIONS", "ShiftedSubset", "shifted_counts", "shifted_subsets", "train_rank"]

#: the imbalance ratios of paper 002's Table 6
RATIOS: tuple[float, ...] = (50, 25, 10, 5, 2, 1)
DIRECTIONS = ("forward", "uniform", "backward")


class ShiftedSubset(NamedTuple):
    """One shifted test set.

    Attributes:
        name: ``"forward-50"``, ``"uniform"``, ``"backward-2"``, ... (``f"{direction}-{ratio:g}"``).
        direction: ``"forward"``, ``"uniform"`` or ``"backward"``.
        ratio: the imbalance ratio ``mu`` (1 for uniform).
        indices: ``(n,)`` int64 sorted row indices into the test split.
        prior: ``(C,)`` float64 label distribution of the subset (its true target prior), sums to 1.
    """

    name: str
    direction: str
    ratio: float
    indices: np.ndarray
    prior: np.ndarray


def train_rank(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    """Classes ordered by train count, most frequent first (stable: ties by class index), ``(C,)``."""
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise LongtailError(f"class_counts: expected a non-empty 1-D array, got shape {counts.shape}")
    if counts.dtype.kind not in "iuf" or not np.isfinite(counts).all() or (counts < 0).any():
        raise LongtailError("class_counts: expected non-negative train counts")
    return np.argsort(-counts.astype(np.float64), kind="stable")


def _check_ratio(ratio) -> float:
    ok = isinstance(ratio, (int, float, np.integer, np.floating)) and not isinstance(ratio, bool)
    if not ok or not math.isfinite(float(ratio)) or float(ratio) < 1:
        raise LongtailError(f"shifted test sets: imbalance ratio {ratio!r} must be a number >= 1")
    return float(ratio)


def shifted_counts(per_class: int, class_counts: Sequence[int] | np.ndarray, ratio: float,
                   direction: str) -> np.ndarray:
    """Per-class sample counts ``(C,)`` int64 of one shifted test set, indexed by class (not rank).

    ``per_class`` is ``N``; ``direction`` ``"forward"`` or ``"backward"`` (``"uniform"`` needs
    ``ratio = 1``); see the module docstring for the formula.
    """
    if direction not in DIRECTIONS:
        raise LongtailError(f"shifted test sets: direction {direction!r} is not one of {', '.join(DIRECTIONS)}")
    mu = _check_ratio(ratio)
    if direction == "uniform" and mu != 1:
        raise LongtailError(f"shifted test sets: the uniform test set has ratio 1, not {ratio!r}")
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise LongtailError(f"shifted test sets: samples per class {per_class!r} must be a positive integer")
    order = train_rank(class_counts)
    c = order.size
    rank = np.arange(c, dtype=np.float64)  # j - 1
    if c == 1:  # guards the division by C - 1: one class is balanced whatever mu
        exponent = np.zeros(1)
    elif direction == "backward":
        exponent = (c - 1 - rank) / (c - 1)
    else:
        exponent = rank / (c - 1)
    by_rank = np.floor(per_class * mu ** (-exponent) + 1e-9).astype(np.int64)
    by_rank = np.clip(by_rank, 1, per_class)
    out = np.empty(c, dtype=np.int64)
    out[order] = by_rank
    return out


def shifted_subsets(
    labels: np.ndarray,
    class_counts: Sequence[int] | np.ndarray,
    ratios: Sequence[float] = RATIOS,
    seed: int = 0,
) -> list[ShiftedSubset]:
    """Every shifted test set of Sec. 4.3 from a balanced labelled test split.

    Args:
        labels: ``(N_test,)`` class indices of the test split.
        class_counts: ``(C,)`` per-class **train** counts (they order the classes).
        ratios: imbalance ratios, each ``>= 1``, no repeats; a ratio ``mu > 1`` gives a forward and a
            backward set, ``1`` the uniform set.
        seed: seeds the per-class permutations (``numpy.random.default_rng``).

    Returns:
        Table 6's column order: forward sets by decreasing ratio, the uniform set, backward sets by
        increasing ratio. Each a :class:`ShiftedSubset` ``(name, direction, ratio, indices, prior)``.
    """
    order = train_rank(class_counts)
    c = order.size
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.size == 0:
        raise LongtailError(f"shifted test sets: labels must be a non-empty 1-D array, got shape {lab.shape}")
    if lab.dtype.kind not in "iu" or lab.min() < 0 or lab.max() >= c:
        raise LongtailError(f"shifted test sets: labels must be class indices in [0, {c}) (class_counts has {c})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise LongtailError(f"shifted test sets: seed {seed!r} must be a non-negative integer")
    mus = [_check_ratio(r) for r in ratios]
    if not mus:
        raise LongtailError("shifted test sets: no imbalance ratio given")
    if len(set(mus)) != len(mus):
        raise LongtailError(f"shifted test sets: repeated imbalance ratio in {list(ratios)}")
    lab = lab.astype(np.int64)
    test_counts = np.bincount(lab, minlength=c)
    if (test_counts == 0).any():
        raise LongtailError(f"shifted test sets: class {int(np.argmin(test_counts))} has no test sample")
    per_class = int(test_counts.min())
    rng = np.random.default_rng(int(seed))
    perms = [rng.permutation(np.flatnonzero(lab == k)) for k in range(c)]

    def subset(direction: str, mu: float) -> ShiftedSubset:
        counts = shifted_counts(per_class, class_counts, mu, direction)
        idx = np.sort(np.concatenate([perms[k][:counts[k]] for k in range(c)]))
        name = "uniform" if direction == "uniform" else f"{direction}-{mu:g}"
        return ShiftedSubset(name, direction, mu, idx, counts / counts.sum())  # sum >= C >= 1

    out = [subset("forward", mu) for mu in sorted((m for m in mus if m > 1), reverse=True)]
    if 1.0 in mus:
        out.append(subset("uniform", 1.0))
    out += [subset("backward", mu) for mu in sorted(m for m in mus if m > 1)]
    return out
