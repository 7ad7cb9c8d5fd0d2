"""Bias-corrected temperature scaling (Alexandari et al. 2020) and EM on its calibrated posteriors."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from longtail.stages.bcts import RIDGE, calibrated_prior, fit_bcts
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import softmax
from longtail.stages.label_shift import BCTSCalibration, estimate_prior, shifted_evaluation
from longtail.stages.priors import em_prior
from longtail.stages.registry import make_method


def _calibrated_sample(n, c, seed):
    """Labels drawn from softmax(s): s are calibrated logits by construction."""
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(n, c)) * 2.0
    p = softmax(s)
    y = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return s, y


def test_fit_recovers_a_known_temperature_and_bias():
    s, y = _calibrated_sample(20_000, 4, 0)
    shift = np.array([1.0, -0.5, 0.25, -0.75])
    z = 3.0 * s - 3.0 * shift  # softmax(z / 3 + shift) is the calibrated softmax(s)
    t, b = fit_bcts(z, y)
    assert t == pytest.approx(3.0, rel=0.03)
    assert b == pytest.approx(shift - shift.mean(), abs=0.05)
    assert b.sum() == pytest.approx(0.0, abs=1e-9)


def test_the_optimum_is_stationary_and_the_mean_posterior_is_the_label_frequency():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(300, 5)) * 3
    y = rng.integers(0, 5, 300)
    z[np.arange(300), y] += 2.0
    t, b = fit_bcts(z, y)
    a = torch.tensor(1.0 / t, dtype=torch.float64, requires_grad=True)
    bb = torch.tensor(b, requires_grad=True)
    torch.nn.functional.cross_entropy(a * torch.tensor(z) + bb, torch.tensor(y)).backward()
    assert abs(float(a.grad)) < 1e-8
    assert bb.grad.numpy() == pytest.approx(-RIDGE * b, abs=1e-8)  # only the ridge's pull is left
    # d NLL / d b_c = mean q_c - freq_c = 0: the calibrated posteriors carry the val frequencies
    assert calibrated_prior(z, t, b) == pytest.approx(np.bincount(y) / 300, abs=1e-5)


def test_a_class_without_val_samples_keeps_a_finite_bias():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(60, 3))
    y = rng.integers(0, 2, 60)  # class 2 never appears
    t, b = fit_bcts(z, y)
    assert np.isfinite(t) and np.isfinite(b).all() and b[2] < b[:2].min()


@pytest.mark.parametrize("z, y, match", [
    (np.zeros((0, 3)), np.zeros(0, int), "N >= 1"),
    (np.full((2, 3), np.nan), np.array([0, 1]), "finite"),
    (np.zeros((2, 3)), np.array([0, 3]), r"labels in \[0, 3\)"),
])
def test_bad_input(z, y, match):
    with pytest.raises(LongtailError, match=match):
        fit_bcts(z, y)


C, D = 5, 6


def _draw(counts, rng, means):
    y = np.repeat(np.arange(C), counts)
    return (rng.normal(size=(len(y), D)) + means[y]).astype(np.float32), y


def _fs(x, y, name):
    return FeatureSet(x, y, np.bincount(y, minlength=C), tuple("abcde"), name=name)


def test_the_wrapper_needs_val_and_carries_the_val_prior():
    rng = np.random.default_rng(3)
    means = rng.normal(size=(C, D)) * 1.5
    train, val = _fs(*_draw([200, 100, 50, 25, 12], rng, means), "train"), _fs(*_draw([20] * C, rng, means), "val")
    with pytest.raises(LongtailError, match="ce\\+bcts.*val split"):
        make_method("ce+bcts", {"epochs": 2}).fit(train, None)
    m = make_method("ce+bcts", {"epochs": 5, "seed": 0}).fit(train, val)
    assert m.logit_prior() == pytest.approx(np.full(C, 0.2), abs=1e-4)
    base = m.base.logits(val.features).astype(np.float64)
    assert m.logits(val.features) == pytest.approx((base / m.temperature_ + m.bias_).astype(np.float32), abs=1e-5)


def test_em_after_bcts_is_at_least_as_close_as_sklearn_logistic_regression_with_em():
    """Known class-conditionals (Gaussians with one covariance: logistic regression is well
    specified), a long-tailed train split, a balanced val split, a shifted target. The product's
    ``ce`` head, calibrated by BCTS on val, then EM; against scikit-learn's logistic regression
    (calibrated to the train prior) with EM. Mean L1 error of the estimated prior over 8 draws."""
    target = np.array([0.05, 0.1, 0.15, 0.3, 0.4])
    errors = {"plain": [], "bcts": [], "sklearn": []}
    for seed in range(8):
        rng = np.random.default_rng(seed)
        means = rng.normal(size=(C, D)) * 1.2
        xt, yt = _draw((np.array([1.0, 0.5, 0.25, 0.12, 0.06]) * 1000).astype(int), rng, means)
        xv, yv = _draw([400] * C, rng, means)
        xs, _ = _draw((target * 5000).astype(int), rng, means)
        m = make_method("ce", {"seed": seed, "device": "cpu"}).fit(_fs(xt, yt, "train"), _fs(xv, yv, "val"))
        zs = m.logits(xs)
        errors["plain"].append(np.abs(estimate_prior("em", zs, m.logit_prior()) - target).sum())
        cal = BCTSCalibration(m.logits(xv), yv)
        errors["bcts"].append(np.abs(estimate_prior("em", zs, m.logit_prior(), calibration=cal) - target).sum())
        lr = LogisticRegression(C=1e4, max_iter=5000).fit(xt, yt)
        ref = em_prior(lr.predict_proba(xs), np.bincount(yt) / len(yt)).prior
        errors["sklearn"].append(np.abs(ref - target).sum())
    mean = {k: float(np.mean(v)) for k, v in errors.items()}
    assert mean["bcts"] <= mean["sklearn"], mean
    assert mean["bcts"] < mean["plain"], mean


def test_shifted_evaluation_reports_em_after_bcts_with_a_val_split():
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(C), 60)
    z = rng.normal(size=(len(y), C)).astype(np.float32)
    z[np.arange(len(y)), y] += 2
    counts = np.array([100, 50, 25, 12, 6])
    prior = counts / counts.sum()
    yv = np.repeat(np.arange(C), 10)
    zv = rng.normal(size=(len(yv), C)).astype(np.float32)
    zv[np.arange(len(yv)), yv] += 2
    without = shifted_evaluation(z, y, counts, prior, ratios=(5,))
    assert all("em_bcts_error" not in row for row in without.values())
    with_val = shifted_evaluation(z, y, counts, prior, val_logits=zv, val_labels=yv, ratios=(5,))
    for name, row in with_val.items():
        assert 0 <= row["em_bcts_error"] <= 1 and 0 <= row["accuracy_em_bcts"] <= 1
        assert row["em_error"] == without[name]["em_error"]  # plain EM is unchanged
