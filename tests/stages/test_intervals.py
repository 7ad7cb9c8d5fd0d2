"""Confidence intervals: Student-t over seeds, stratified bootstrap over test samples."""

import math

import numpy as np
import pytest

from longtail.stages.evaluate.intervals import bootstrap_intervals, t_interval


def test_t_interval_by_hand():
    lo, hi = t_interval([0.80, 0.84, 0.82, 0.86])
    # mean 0.83, sample sd sqrt(0.002/3), t_{0.975, 3} = 3.182446
    half = 3.182446 * math.sqrt(0.002 / 3) / 2
    assert (lo, hi) == pytest.approx((0.83 - half, 0.83 + half), rel=1e-6)
    assert t_interval([0.5, 0.5]) == (0.5, 0.5)
    assert all(math.isnan(b) for b in t_interval([0.7]))
    assert all(math.isnan(b) for b in t_interval([0.7, float("nan")]))


def _logits(pred, c):
    z = np.zeros((len(pred), c), dtype=np.float32)
    z[np.arange(len(pred)), pred] = 1
    return z


def test_bootstrap_resamples_within_each_class():
    labels = np.repeat(np.arange(3), 40)
    pred = labels.copy()
    pred[80:100] = 0  # class 2: half right
    z = _logits(pred, 3)
    ci = bootstrap_intervals(z, labels, {"many": np.array([0, 1]), "medium": np.array([], int), "few": np.array([2])},
                             seed=0)
    assert ci["many"] == (1.0, 1.0)  # classes always right stay right in every resample
    lo, hi = ci["few"]
    assert lo < 0.5 < hi and 0 < lo and hi < 1
    assert all(math.isnan(b) for b in ci["medium"])  # an empty group
    # class counts are kept, so overall = balanced here (3 equal classes) in every resample
    assert ci["overall"] == pytest.approx(ci["balanced_accuracy"])
    again = bootstrap_intervals(z, labels, {"many": np.array([0, 1]), "few": np.array([2])}, seed=0)
    assert again["few"] == ci["few"]  # seeded
