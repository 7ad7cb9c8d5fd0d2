"""PC-Softmax: Theorem 1 of paper 002 in closed form, prior validation, the ``+pc`` wrapper."""

import warnings

import numpy as np
import pytest
import torch

from stages.base import make_method
from stages.calibrate import PostCompensatedSoftmax, post_compensate, validate_prior
from stages.data import FeatureSet
from stages.errors import LongtailError


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def _circle_mixture(counts, seed, radius=1.5):
    """Unit-variance 2-D Gaussians with means on a circle (heavily overlapping for radius 1.5)."""
    rng = np.random.default_rng(seed)
    angles = 2 * np.pi * np.arange(len(counts)) / len(counts)
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    x = np.concatenate([rng.normal(size=(n, 2)) + means[c] for c, n in enumerate(counts)])
    return x.astype(np.float32), np.repeat(np.arange(len(counts)), counts)


def _balanced_accuracy(pred, labels):
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


# ---------------------------------------------------------------------- Theorem 1
MEANS = np.array([[0.0, 0.0], [1.5, 0.5], [0.5, 1.8]])
COV = np.array([[1.0, 0.3], [0.3, 0.5]])
SOURCE = np.array([0.7, 0.2, 0.1])


def _source_logits(x, seed=0):
    """The softmax-regression logits of the Bayes posterior under SOURCE (linear discriminant), plus a
    per-sample constant that a softmax ignores."""
    inv = np.linalg.inv(COV)
    w = MEANS @ inv  # (C, D)
    b = -0.5 * np.einsum("cd,dk,ck->c", MEANS, inv, MEANS) + np.log(SOURCE)
    shift = np.random.default_rng(seed).normal(size=(len(x), 1)) * 5
    return x @ w.T + b + shift


def _posterior_from_densities(x, prior):
    """p(y|x) from the Gaussian densities themselves (not in log space): prior_c N(x; mu_c, COV)."""
    inv = np.linalg.inv(COV)
    norm = 1.0 / (2 * np.pi * np.sqrt(np.linalg.det(COV)))
    dens = np.stack([norm * np.exp(-0.5 * np.einsum("nd,dk,nk->n", x - m, inv, x - m)) for m in MEANS], axis=1)
    joint = dens * prior
    return joint / joint.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("target", [[0.2, 0.3, 0.5], None, [0.7, 0.2, 0.1], [0.05, 0.05, 0.9]])
def test_post_compensation_is_the_bayes_posterior_under_the_target_prior(target):
    x = np.random.default_rng(1).normal(size=(200, 2)) * 1.5 + [0.6, 0.7]
    logits = _source_logits(x)
    np.testing.assert_allclose(_softmax(logits), _posterior_from_densities(x, SOURCE), rtol=1e-9, atol=1e-12)
    prior_t = np.full(3, 1 / 3) if target is None else np.asarray(target)
    expected = _posterior_from_densities(x, prior_t)
    np.testing.assert_allclose(_softmax(post_compensate(logits, SOURCE, target)), expected, rtol=1e-9, atol=1e-12)
    if not np.allclose(prior_t, SOURCE):  # without the compensation the posterior is the source one
        assert not np.allclose(_softmax(logits), expected, atol=1e-3)


def test_post_compensate_keeps_type_dtype_and_works_on_tensors():
    z = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]], dtype=np.float32)
    out = post_compensate(z, [0.5, 0.25, 0.25], [0.25, 0.25, 0.5])
    assert out.dtype == np.float32
    # shift = log p_t - log p_s = [log .5, 0, log 2]
    np.testing.assert_allclose(out, z + np.log([0.5, 1.0, 2.0]), atol=1e-6)
    t = post_compensate(torch.tensor(z), [0.5, 0.25, 0.25], [0.25, 0.25, 0.5])
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, atol=1e-7)


def test_zero_target_entry_gives_zero_probability():
    z = np.array([[1.0, 2.0, 3.0]])
    p = _softmax(post_compensate(z, [0.2, 0.3, 0.5], [0.0, 0.5, 0.5]))
    assert p[0, 0] == 0.0
    # the other two keep their relative odds times p_t/p_s: e^2 * .5/.3 vs e^3 * .5/.5
    odds = np.exp(2) * (0.5 / 0.3) / (np.exp(3) * 1.0)
    assert p[0, 1] / p[0, 2] == pytest.approx(odds)


# ---------------------------------------------------------------------- prior validation
@pytest.mark.parametrize(
    "prior, match",
    [
        ([0.5, -0.1, 0.6], r"target_prior\[1\] = -0.1 is negative"),
        ([0.5, 0.5], "has 2 entries, expected 3"),
        ([0.5, 0.3, 0.1, 0.1], "has 4 entries, expected 3"),
        ([0.5, 0.3, 0.1], "sums to 0.9"),
        ([0.5, float("nan"), 0.5], r"target_prior\[1\] = nan"),
        ([[0.5, 0.5, 0.0]], "flat list"),
        (["a", "b", "c"], "expected a list of 3 numbers"),
    ],
)
def test_validate_prior_rejects_bad_priors(prior, match):
    with pytest.raises(LongtailError, match=match):
        validate_prior(prior, 3, "target_prior")


def test_validate_prior_zero_entry():
    np.testing.assert_allclose(validate_prior([0.0, 0.5, 0.5], 3, "target_prior"), [0, 0.5, 0.5])
    with pytest.raises(LongtailError, match=r"source prior\[0\] = 0: log 0"):
        validate_prior([0.0, 0.5, 0.5], 3, "source prior", allow_zero=False)
    with pytest.raises(LongtailError, match=r"source prior\[0\] = 0"):
        post_compensate(np.zeros((2, 3)), [0.0, 0.5, 0.5], None)


def test_validate_prior_renormalises_with_a_warning_within_tolerance():
    with pytest.warns(UserWarning, match="sums to 1.0000005"):
        p = validate_prior([0.2, 0.3, 0.5000005], 3, "target_prior")
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    np.testing.assert_allclose(p, np.array([0.2, 0.3, 0.5000005]) / 1.0000005)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # floating-point rounding of the sum is not worth a warning
        validate_prior([0.1] * 10, 10, "target_prior")
    with pytest.raises(LongtailError, match="sums to 1.00001"):
        validate_prior([0.2, 0.3, 0.50001], 3, "target_prior")


# ---------------------------------------------------------------------- the +pc wrapper
COUNTS = [200, 100, 40, 15, 5]
NAMES = tuple("abcde")
FAST = {"epochs": 30, "batch_size": 64, "seed": 0}


@pytest.fixture(scope="module")
def imbalanced():
    x, y = _circle_mixture(COUNTS, seed=0)
    xt, yt = _circle_mixture([400] * 5, seed=100)
    return FeatureSet(x, y, np.array(COUNTS), NAMES, name="train"), xt, yt


def test_pc_with_uniform_target_beats_ce_on_balanced_accuracy(imbalanced):
    train, xt, yt = imbalanced
    ce = make_method("ce", FAST).fit(train)
    pc = make_method("ce+pc", FAST).fit(train)
    acc_ce = _balanced_accuracy(ce.predict(xt), yt)
    acc_pc = _balanced_accuracy(pc.predict(xt), yt)
    assert acc_pc >= acc_ce + 0.05, (acc_ce, acc_pc)


def test_pc_logits_are_the_post_compensated_base_logits(imbalanced):
    train, xt, _ = imbalanced
    target = [0.1, 0.1, 0.2, 0.3, 0.3]
    ce = make_method("ce", FAST).fit(train)
    pc = make_method("ce+pc", {**FAST, "pc": {"target_prior": target}}).fit(train)
    np.testing.assert_array_equal(pc.logits(xt), post_compensate(ce.logits(xt), train.prior, target))
    # the shift by hand: log p_t - log p_s, the same for every sample
    shift = pc.logits(xt).astype(np.float64) - ce.logits(xt)
    np.testing.assert_allclose(shift, np.broadcast_to(np.log(target) - np.log(np.array(COUNTS) / 360), shift.shape),
                               atol=1e-5)


def test_pc_around_an_already_fitted_base_does_not_refit_it(imbalanced):
    train, xt, _ = imbalanced
    ce = make_method("ce", FAST).fit(train)
    module = ce.module_
    pc = PostCompensatedSoftmax(ce).fit(train)
    assert pc.base.module_ is module  # the cached fit is reused as is
    np.testing.assert_array_equal(pc.logits(xt), post_compensate(ce.logits(xt), train.prior, None))


def test_pc_with_the_source_prior_as_target_changes_nothing(imbalanced):
    train, xt, _ = imbalanced
    ce = make_method("ce", FAST).fit(train)
    pc = make_method("ce+pc", {**FAST, "pc": {"target_prior": list(train.prior)}}).fit(train)
    np.testing.assert_allclose(pc.logits(xt), ce.logits(xt), atol=1e-5)


def test_pc_rejects_a_bad_target_before_fitting_the_base(imbalanced):
    train, _, _ = imbalanced
    pc = make_method("ce+pc", {**FAST, "pc": {"target_prior": [0.5, 0.5, 0.0]}})
    with pytest.raises(LongtailError, match="ce\\+pc: target_prior: has 3 entries, expected 5"):
        pc.fit(train)
    assert not hasattr(pc.base, "num_classes_")
    pc = make_method("ce+pc", {**FAST, "pc": {"target_prior": [0.5, 0.5, 0.1, -0.1, 0.0]}})
    with pytest.raises(LongtailError, match=r"target_prior\[3\] = -0.1 is negative"):
        pc.fit(train)


def test_pc_renormalises_a_nearly_normalised_target_with_a_warning(imbalanced):
    train, _, _ = imbalanced
    pc = make_method("ce+pc", {"epochs": 1, "pc": {"target_prior": [0.2, 0.2, 0.2, 0.2, 0.2000004]}})
    with pytest.warns(UserWarning, match="renormalised"):
        pc.fit(train)
    assert pc.target_prior_.sum() == pytest.approx(1.0, abs=1e-15)


def test_pc_rejects_a_zero_source_count():
    x, y = _circle_mixture([20, 20, 20], seed=3)
    train = FeatureSet(x, y, np.array([30, 0, 30]), ("a", "b", "c"), name="train")  # counts disagree with labels
    with pytest.raises(LongtailError, match=r"train prior\[1\] = 0: log 0"):
        make_method("ce+pc", {"epochs": 1}).fit(train)
