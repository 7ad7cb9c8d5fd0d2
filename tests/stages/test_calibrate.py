"""PC-Softmax: Theorem 1 of paper 002 in closed form, prior validation, the ``+pc`` wrapper."""

import warnings

import numpy as np
import pytest
import torch

from longtail.stages.base import Frozen
from longtail.stages.registry import make_method
from longtail.stages.calibrate import (
    PostCompensatedSoftmax,
    TemperatureScaling,
    fit_temperature,
    logit_prior,
    post_compensate,
    validate_prior,
)
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.evaluate import nll


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


def test_pc_around_a_frozen_base_does_not_refit_it_and_around_a_plain_one_does(imbalanced):
    train, xt, _ = imbalanced
    ce = make_method("ce", FAST).fit(train)
    module = ce.module_
    pc = PostCompensatedSoftmax(Frozen(ce)).fit(train)
    assert pc.base.inner.module_ is module  # the cached fit is reused as is
    np.testing.assert_array_equal(pc.logits(xt), post_compensate(ce.logits(xt), train.prior, None))
    refit = PostCompensatedSoftmax(ce).fit(train)  # not frozen: fitting the wrapper refits the base
    assert ce.module_ is not module
    np.testing.assert_array_equal(refit.logits(xt), pc.logits(xt))  # the same seed, the same fit


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


# ---------------------------------------------------------------------- Bayes optimality (issue 4)
BAYES_MEANS = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, 1.7]])
BAYES_COV = np.array([[1.0, 0.2], [0.2, 0.8]])
BAYES_COUNTS = np.array([2000, 400, 80])  # source prior 0.81, 0.16, 0.03
BAYES_TARGET = np.array([0.1, 0.3, 0.6])  # a backward shift


def _gaussian_sample(counts, rng):
    y = np.repeat(np.arange(len(counts)), counts)
    x = BAYES_MEANS[y] + rng.normal(size=(len(y), 2)) @ np.linalg.cholesky(BAYES_COV).T
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def shifted_gaussians():
    """Train on the long tail; test on 20,000 samples of the shifted target prior; the Bayes-optimal
    prediction under the target, ``argmax_y log p_t(y) + log N(x; mu_y, Sigma)``, from the densities."""
    rng = np.random.default_rng(0)
    x, y = _gaussian_sample(BAYES_COUNTS, rng)
    train = FeatureSet(x, y, BAYES_COUNTS, ("a", "b", "c"), name="train")
    xt, yt = _gaussian_sample(rng.multinomial(20_000, BAYES_TARGET), rng)
    inv = np.linalg.inv(BAYES_COV)
    d = xt.astype(np.float64)[:, None, :] - BAYES_MEANS[None]
    log_density = -0.5 * np.einsum("ncd,dk,nck->nc", d, inv, d)  # + a constant shared by the classes
    bayes = float(((log_density + np.log(BAYES_TARGET)).argmax(1) == yt).mean())
    return train, xt, yt, bayes


@pytest.mark.parametrize("name", ["ce", "balanced-softmax"])
def test_pc_with_the_true_target_prior_reaches_the_bayes_accuracy(shifted_gaussians, name):
    """Theorem 1: a softmax regression (well specified here: shared covariance makes the log-odds
    linear) post-compensated to the true target prior is Bayes-optimal under the target.

    Tolerance 0.01: three binomial standard errors of an accuracy near 0.83 on 20,000 samples
    (0.0027 each), which also covers the small excess risk of a head fitted on 2,480 samples. Without
    compensation, or compensating balanced-softmax's already balanced logits a second time, the
    accuracy falls far outside it.
    """
    train, xt, yt, bayes = shifted_gaussians
    params = {"epochs": 30, "batch_size": 256, "weight_decay": 0.0, "seed": 0}
    pc = make_method(f"{name}+pc", {**params, "pc": {"target_prior": list(BAYES_TARGET)}}).fit(train)
    acc = float((pc.predict(xt) == yt).mean())
    assert acc >= bayes - 0.01, (acc, bayes)
    base = pc.base.logits(xt)
    assert float((base.argmax(1) == yt).mean()) < bayes - 0.03  # uncompensated: far from Bayes
    twice = post_compensate(base, train.prior, BAYES_TARGET)  # the train prior removed whatever the base
    if name == "balanced-softmax":
        assert float((twice.argmax(1) == yt).mean()) < bayes - 0.03  # double compensation hurts
    else:
        np.testing.assert_array_equal(twice, pc.logits(xt))  # for ce the train prior is the right one


# ---------------------------------------------------------------------- the prior the logits carry
def _row_constant(diff):
    """``diff`` ``(N, C)`` is a constant per row (a shift no softmax sees)."""
    return np.abs(diff - diff[:, :1]).max()


@pytest.mark.parametrize("name", ["balanced-softmax", "logit-adjust", "crt"])
def test_pc_around_a_balanced_base_with_uniform_target_changes_nothing(imbalanced, name):
    train, xt, _ = imbalanced
    params = {"epochs": 3, "batch_size": 64, "seed": 0}
    base = make_method(name, params).fit(train)
    pc = PostCompensatedSoftmax(base).fit(train)
    np.testing.assert_allclose(logit_prior(base), np.full(5, 0.2), rtol=0, atol=1e-15)
    assert _row_constant(pc.logits(xt).astype(np.float64) - base.logits(xt)) < 1e-5
    target = [0.1, 0.1, 0.2, 0.3, 0.3]
    pc = PostCompensatedSoftmax(base, target_prior=target).fit(train)
    # Sec. 4.3: log p_t - log p_u added to Balanced Softmax's logits
    expected = base.logits(xt) + np.log(target) - np.log(0.2)
    np.testing.assert_allclose(pc.logits(xt), expected, atol=1e-5)
    np.testing.assert_allclose(logit_prior(pc), target)


def test_ce_plus_pc_still_removes_the_train_prior(imbalanced):
    train, xt, _ = imbalanced
    ce = make_method("ce", {"epochs": 3, "batch_size": 64}).fit(train)
    np.testing.assert_allclose(logit_prior(ce), train.prior, rtol=0, atol=1e-15)
    diff = PostCompensatedSoftmax(ce).fit(train).logits(xt).astype(np.float64) - ce.logits(xt)
    np.testing.assert_allclose(diff[0], np.log(0.2) - np.log(np.array(COUNTS) / 360), atol=1e-5)
    assert _row_constant(diff) > 3  # a real shift: log(200/5) = 3.7 between head and tail


def test_logit_prior_of_the_other_heads(imbalanced):
    train, _, _ = imbalanced
    ps = np.array(COUNTS) / 360
    params = {"epochs": 1}
    la = make_method("logit-adjust", {**params, "tau": 0.5}).fit(train)
    np.testing.assert_allclose(logit_prior(la), np.sqrt(ps) / np.sqrt(ps).sum(), rtol=1e-12)
    la0 = make_method("logit-adjust", {**params, "tau": 0.0}).fit(train)
    np.testing.assert_allclose(logit_prior(la0), ps, rtol=1e-12)
    cb = make_method("cb-ce", {**params, "beta": 0.99}).fit(train)
    effective = (1 - 0.99 ** np.array(COUNTS)) / (1 - 0.99)  # weights 1/E_n
    expected = ps / effective
    np.testing.assert_allclose(logit_prior(cb), expected / expected.sum(), rtol=1e-12)
    reloaded = make_method("cb-ce", cb.get_params()).load_state_dict(cb.state_dict())
    np.testing.assert_array_equal(logit_prior(reloaded), logit_prior(cb))
    for name in ("ce", "focal", "cosine", "tau-norm"):
        np.testing.assert_allclose(logit_prior(make_method(name, params).fit(train)), ps, rtol=1e-12)


def test_a_method_without_its_own_logit_prior_is_taken_to_carry_the_train_prior(imbalanced):
    from longtail.stages.base import Method

    class Raw(Method):  # not registered: a method written elsewhere
        def _fit(self, train, val, ctx):
            pass

        def _logits(self, features):
            return np.repeat(features[:, :1], 5, axis=1) * np.arange(5)

    train, xt, _ = imbalanced
    raw = Raw().fit(train)
    np.testing.assert_allclose(logit_prior(raw), train.prior)
    np.testing.assert_allclose(PostCompensatedSoftmax(raw).fit(train).logits(xt),
                               post_compensate(raw.logits(xt), train.prior, None), atol=1e-6)


# ---------------------------------------------------------------------- temperature scaling
def test_fit_temperature_recovers_the_temperature_of_overconfident_logits():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 6)) * 2
    y = np.array([rng.choice(6, p=p) for p in _softmax(z)])  # labels drawn from softmax(z): calibrated
    for scale in (0.5, 3.0):
        assert fit_temperature(z * scale, y) == pytest.approx(scale, rel=0.05)
    # it is the minimiser of the NLL: a grid around it does no better
    t = fit_temperature(z * 3, y)
    grid = [nll(z * 3 / s, y) for s in t * np.array([0.9, 0.97, 1.03, 1.1])]
    assert nll(z * 3 / t, y) <= min(grid)


def test_fit_temperature_at_a_bound_and_bad_input():
    z = np.array([[5.0, 0.0], [0.0, 5.0]])
    with pytest.warns(UserWarning, match="still decreases at T = 1/100"):
        assert fit_temperature(z, np.array([0, 1])) == pytest.approx(0.01)
    with pytest.raises(LongtailError, match="finite"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(LongtailError, match="labels in"):
        fit_temperature(z, np.array([0, 2]))


@pytest.fixture(scope="module")
def with_val(imbalanced):
    train, xt, yt = imbalanced
    xv, yv = _circle_mixture([40] * 5, seed=200)
    return train, FeatureSet(xv, yv, np.array(COUNTS), NAMES, name="val"), xt, yt


def test_ts_lowers_val_nll_and_keeps_accuracy(with_val):
    train, val, xt, yt = with_val
    ce = make_method("ce", {**FAST, "epochs": 10}).fit(train, val)
    ts = TemperatureScaling(Frozen(ce)).fit(train, val)  # frozen: fits the temperature only
    assert ts.base.inner is ce and ts.temperature_ > 0
    assert nll(ts.logits(val.features), val.labels) < nll(ce.logits(val.features), val.labels) - 1e-3
    np.testing.assert_array_equal(ts.predict(xt), ce.predict(xt))  # T > 0 keeps every argmax
    np.testing.assert_allclose(ts.logits(xt), ce.logits(xt) / ts.temperature_, rtol=1e-6)
    rebuilt = make_method("ce+ts", ts.base.get_params()).load_state_dict(ts.state_dict())
    np.testing.assert_array_equal(rebuilt.logits(xt), ts.logits(xt))


def test_ts_needs_a_val_split_and_says_so_before_fitting(with_val):
    train, _, _, _ = with_val
    ts = make_method("ce+ts", {"epochs": 1})
    with pytest.raises(LongtailError, match=r"ce\+ts: temperature scaling is fitted on the val split"):
        ts.fit(train)
    assert not ts.base.is_fitted()


def test_pc_after_ts_removes_the_scaled_prior(with_val):
    train, val, xt, _ = with_val
    method = make_method("ce+ts+pc", {**FAST, "epochs": 3}).fit(train, val)
    t = method.base.temperature_
    ce_logits = method.base.base.logits(xt).astype(np.float64)
    # (f - log p_s) / T + log p_u: the temperature-scaled balanced logits, up to a constant per row
    expected = (ce_logits - np.log(train.prior)) / t
    assert _row_constant(method.logits(xt) - expected) < 1e-4
