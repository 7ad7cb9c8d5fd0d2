"""Target-prior estimation: EM (Saerens et al. 2002) and BBSE (Lipton et al. 2018)."""

import numpy as np
import pytest

from longtail.stages.registry import make_method
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.priors import bbse_prior, em_prior, estimate_target_prior

MEANS = np.array([[0.0, 0.0], [2.5, 0.0], [0.0, 2.5], [2.5, 2.5]])
SOURCE = np.array([0.55, 0.25, 0.15, 0.05])
TARGET = np.array([0.05, 0.15, 0.30, 0.50])  # reversed-ish: far from the source


def _sample(prior, n, rng):
    y = rng.choice(len(prior), size=n, p=prior)
    return MEANS[y] + rng.normal(size=(n, 2)), y


def _posterior(x, prior):
    """Exact p(y|x) for unit-variance Gaussians, in log space."""
    log_joint = -0.5 * ((x[:, None, :] - MEANS[None]) ** 2).sum(-1) + np.log(prior)
    log_joint -= log_joint.max(axis=1, keepdims=True)
    p = np.exp(log_joint)
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def target():
    return _sample(TARGET, 20_000, np.random.default_rng(0))


# ---------------------------------------------------------------------- EM
def test_em_recovers_a_known_prior(target):
    x, y = target
    probs = _posterior(x, SOURCE)  # calibrated source posteriors
    est = em_prior(probs, SOURCE)
    assert est.method == "em" and est.converged and est.iterations > 5
    empirical = np.bincount(y, minlength=4) / len(y)
    np.testing.assert_allclose(est.prior, empirical, atol=0.015)  # sampling error ~0.005 per entry
    assert est.prior.sum() == pytest.approx(1.0, abs=1e-12)
    # the naive estimate (the mean posterior) is far off: the test can tell EM from it
    assert np.abs(probs.mean(axis=0) - empirical).max() > 0.05
    # the fixed point: posteriors under the estimate average to the estimate (Saerens' M-step)
    np.testing.assert_allclose(_posterior(x, est.prior).mean(axis=0), est.prior, atol=1e-6)


def test_em_with_one_hot_posteriors_returns_the_predicted_frequencies_in_two_steps():
    probs = np.eye(3)[[0, 0, 1, 2, 2, 2, 2, 1]]
    est = em_prior(probs, [0.5, 0.3, 0.2])
    np.testing.assert_allclose(est.prior, [2 / 8, 2 / 8, 4 / 8], rtol=0, atol=1e-15)
    assert est.iterations == 2 and est.converged  # one step to the answer, one to see it stay


def test_em_without_convergence_warns():
    x, _ = _sample(TARGET, 500, np.random.default_rng(1))
    with pytest.warns(UserWarning, match="no convergence within 2 iterations"):
        est = em_prior(_posterior(x, SOURCE), SOURCE, max_iter=2)
    assert not est.converged and est.iterations == 2


@pytest.mark.parametrize(
    "probs, prior, match",
    [
        (np.full((2, 3), 1 / 3), [0.5, 0.5, 0.0], r"source prior\[2\] = 0: log 0"),
        (np.full((2, 3), 1 / 3), [0.5, 0.6, -0.1], r"source prior\[2\] = -0.1 is negative"),
        (np.full((2, 3), 1 / 3), [0.5, 0.5], "has 2 entries, expected 3"),
        (np.full((2, 3), 1 / 3), [0.5, 0.3, 0.1], "sums to 0.9"),
        (np.full((2, 3), 0.3), [0.4, 0.3, 0.3], "row 0 sums to 0.9"),
        (np.full((2, 3), np.nan), [0.4, 0.3, 0.3], "finite and non-negative"),
    ],
)
def test_em_bad_input(probs, prior, match):
    with pytest.raises(LongtailError, match=match):
        em_prior(probs, prior)


# ---------------------------------------------------------------------- BBSE
def test_bbse_by_hand():
    # joint confusion on val [[.4, .1], [.1, .4]] (rows: predicted, columns: true), so q = [.5, .5]
    val_pred = np.array([0] * 4 + [0] + [1] + [1] * 4)
    val_labels = np.array([0] * 4 + [1] + [0] + [1] * 4)
    target_pred = np.array([0] * 3 + [1] * 7)  # mu = [.3, .7]
    # w = solve([[.4, .1], [.1, .4]], [.3, .7]) = [1/3, 5/3]; p_t = w q = [1/6, 5/6]
    est = bbse_prior(val_pred, val_labels, target_pred, 2)
    np.testing.assert_allclose(est.prior, [1 / 6, 5 / 6], rtol=1e-12)
    assert est.method == "bbse" and est.converged
    # mu = [.05, .95] gives w = [-0.5, 2.5]: clipped at 0, p_t = [0, 1]
    est = bbse_prior(val_pred, val_labels, np.array([0] + [1] * 19), 2)
    np.testing.assert_allclose(est.prior, [0.0, 1.0], atol=1e-12)


def test_bbse_uses_the_val_label_distribution():
    # a perfect classifier on an unbalanced val split: C_hat = diag(q), w = mu / q, p_t = mu
    val_labels = np.array([0] * 8 + [1] * 2)
    est = bbse_prior(val_labels, val_labels, np.array([0, 1, 1, 1]), 2)
    np.testing.assert_allclose(est.prior, [0.25, 0.75], rtol=1e-12)


def test_bbse_with_a_singular_confusion_matrix_still_returns_a_prior():
    # class 2 is never predicted: C_hat has a zero row; least squares instead of a solve
    val_labels = np.array([0, 0, 1, 1, 2, 2])
    val_pred = np.array([0, 0, 1, 1, 1, 1])
    est = bbse_prior(val_pred, val_labels, np.array([0, 0, 1, 1]), 3)
    assert (est.prior >= 0).all() and est.prior.sum() == pytest.approx(1.0)
    assert est.prior[0] == pytest.approx(0.5)  # class 0 is identified exactly


@pytest.mark.parametrize("val_prior", [SOURCE, np.full(4, 0.25)], ids=["val-like-train", "balanced-val"])
def test_bbse_recovers_a_known_prior(target, val_prior):
    rng = np.random.default_rng(2)
    xv, yv = _sample(val_prior, 20_000, rng)
    predict = lambda x: _posterior(x, SOURCE).argmax(axis=1)  # noqa: E731  (a fixed black box)
    x, y = target
    est = bbse_prior(predict(xv), yv, predict(x), 4)
    np.testing.assert_allclose(est.prior, np.bincount(y, minlength=4) / len(y), atol=0.03)


def test_bbse_bad_input():
    with pytest.raises(LongtailError, match="val labels must be a non-empty 1-D array of length 3"):
        bbse_prior(np.array([0, 1, 1]), np.array([0, 1]), np.array([0]), 2)
    with pytest.raises(LongtailError, match=r"target predictions must be class indices in \[0, 2\)"):
        bbse_prior(np.array([0, 1]), np.array([0, 1]), np.array([0, 2]), 2)
    with pytest.raises(LongtailError, match="num_classes"):
        bbse_prior(np.array([0]), np.array([0]), np.array([0]), 0)


# ---------------------------------------------------------------------- on fitted methods
@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(3)
    counts = np.array([1100, 500, 300, 100])
    y = np.repeat(np.arange(4), counts)
    x = (MEANS[y] + rng.normal(size=(len(y), 2))).astype(np.float32)
    train = FeatureSet(x, y, counts, tuple("abcd"), name="train")
    xv, yv = _sample(np.full(4, 0.25), 8000, rng)
    val = FeatureSet(xv.astype(np.float32), yv, counts, tuple("abcd"), name="val")
    params = {"epochs": 30, "batch_size": 256, "weight_decay": 0.0, "seed": 0}
    return {name: make_method(name, params).fit(train) for name in ("ce", "balanced-softmax")}, val


@pytest.mark.parametrize("name", ["ce", "balanced-softmax"])
@pytest.mark.parametrize("how", ["em", "bbse"])
def test_estimate_target_prior_on_a_fitted_method(fitted, target, name, how):
    """EM must use the prior the method's logits carry: the train prior for ce, uniform for
    balanced-softmax (treating the latter's posteriors as train-prior ones would miss by far)."""
    methods, val = fitted
    x, y = target
    est = estimate_target_prior(methods[name], x.astype(np.float32), how=how, val=val)
    # EM inherits the calibration error of a learned head (up to 0.05 per entry across data seeds
    # here), BBSE the noise of a finite val split; taking balanced-softmax's posteriors as
    # train-prior ones instead misses by 0.35
    np.testing.assert_allclose(est.prior, np.bincount(y, minlength=4) / len(y), atol=0.07)


def test_estimate_target_prior_bad_input(fitted, target):
    methods, _ = fitted
    x, _ = target
    with pytest.raises(LongtailError, match="bbse needs a labelled val split"):
        estimate_target_prior(methods["ce"], x, how="bbse")
    with pytest.raises(LongtailError, match="unknown method 'kmm'"):
        estimate_target_prior(methods["ce"], x, how="kmm")
    with pytest.raises(LongtailError, match="do not match the fitted dimension 2"):
        estimate_target_prior(methods["ce"], np.zeros((5, 3), np.float32))
