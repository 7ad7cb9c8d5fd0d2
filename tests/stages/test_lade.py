"""LADE (paper 002, eq. 15-21): the loss by hand, the logits' level (figure 3), target-prior injection."""

import math
import warnings

import numpy as np
import pytest
import torch

from longtail.stages.registry import make_method
from longtail.stages.calibrate import logit_prior, post_compensate
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.losses.classic import balanced_softmax_loss
from longtail.stages.losses.lade import lade_ce_loss, lade_loss, lader_loss, lader_terms

# ---------------------------------------------------------------------- the loss by hand
# 4 samples, 3 classes, class 2 absent from the batch
COUNTS = [6.0, 3.0, 1.0]  # p_s = 0.6, 0.3, 0.1
LOGITS = [[2.0, -1.0, 0.5], [1.0, 0.0, -0.5], [-1.0, 1.5, 0.0], [0.5, 0.2, 1.0]]
LABELS = [0, 0, 1, 0]


def _lader_by_hand(logits, labels, counts, lam, present_only=False):
    """Eq. 15-16 with a plain loop: alpha_c = p_s(c), weights p_u(y_i)/p_s(y_i) of each sample's label."""
    n, c = len(logits), len(counts)
    ps = [k / sum(counts) for k in counts]
    total = 0.0
    for k in range(c):
        pos = [logits[i][k] for i in range(n) if labels[i] == k]
        if present_only and not pos:
            continue
        first = -sum(pos) / len(pos) if pos else 0.0
        s = math.log(sum((1.0 / c) / ps[labels[i]] * math.exp(logits[i][k]) for i in range(n)) / n)
        total += ps[k] * (first + s + lam * s * s)
    return total


@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5])
def test_lader_matches_a_hand_computation_including_an_absent_class(lam):
    z = torch.tensor(LOGITS, dtype=torch.float64)
    y = torch.tensor(LABELS)
    got = lader_loss(z, y, COUNTS, lam=lam)
    assert got.item() == pytest.approx(_lader_by_hand(LOGITS, LABELS, COUNTS, lam), rel=1e-12, abs=1e-12)
    # the absent class 2 contributes p_s(2) (s_2 + lam s_2^2), which eq. 16 read literally would drop
    # weights p_u/p_s: label 0 -> (1/3)/0.6, label 1 -> (1/3)/0.3
    s2 = math.log(((1 / 3) / 0.6 * (math.exp(0.5) + math.exp(-0.5) + math.exp(1.0)) + (1 / 3) / 0.3) / 4)
    terms = lader_terms(z, y, COUNTS, lam=lam)
    assert terms[2].item() == pytest.approx(s2 + lam * s2 * s2, rel=1e-12)
    dropped = _lader_by_hand(LOGITS, LABELS, COUNTS, lam, present_only=True)
    assert got.item() - dropped == pytest.approx(0.1 * (s2 + lam * s2 * s2), rel=1e-10)


def test_lade_is_prior_injected_ce_plus_alpha_lader():
    z = torch.tensor(LOGITS, dtype=torch.float64)
    y = torch.tensor(LABELS)
    # eq. 18 by hand for sample 0: -log(0.6 e^2 / (0.6 e^2 + 0.3 e^-1 + 0.1 e^0.5))
    ce0 = -math.log(0.6 * math.exp(2) / (0.6 * math.exp(2) + 0.3 * math.exp(-1) + 0.1 * math.exp(0.5)))
    per_sample = torch.nn.functional.cross_entropy(z + torch.log(torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)),
                                                   y, reduction="none")
    assert per_sample[0].item() == pytest.approx(ce0, rel=1e-12)
    assert lade_ce_loss(z, y, COUNTS).item() == pytest.approx(per_sample.mean().item(), rel=1e-12)
    assert lade_loss(z, y, COUNTS, alpha=0.0).item() == balanced_softmax_loss(z, y, COUNTS).item()
    expected = per_sample.mean().item() + 0.3 * _lader_by_hand(LOGITS, LABELS, COUNTS, 0.2)
    assert lade_loss(z, y, COUNTS, alpha=0.3, lam=0.2).item() == pytest.approx(expected, rel=1e-12)


def test_lader_minimum_over_free_logits_puts_positive_logits_at_log_c():
    """Eq. 21 on the loss alone: with free per-sample logits, positives go to log C, negatives down."""
    counts = torch.tensor([20.0, 8.0, 3.0, 1.0], dtype=torch.float64)
    y = torch.repeat_interleave(torch.arange(4), counts.long())
    z = torch.zeros(len(y), 4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([z], lr=0.2)
    for _ in range(300):
        loss = lader_loss(z, y, counts, lam=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pos = z.detach()[torch.arange(len(y)), y]
    np.testing.assert_allclose(pos.numpy(), math.log(4), atol=0.01)
    negative = torch.ones_like(z, dtype=torch.bool)
    negative[torch.arange(len(y)), y] = False
    assert z.detach()[negative].max() < math.log(4) - 4


def test_loss_rejects_bad_statistics():
    z = torch.tensor(LOGITS, dtype=torch.float64)
    y = torch.tensor(LABELS)
    with pytest.raises(LongtailError, match=r"class_counts\[1\] = 0"):
        lader_loss(z, y, [6.0, 0.0, 1.0])
    with pytest.raises(LongtailError, match="2 entries for 3 classes"):
        lade_loss(z, y, [6.0, 1.0])
    with pytest.raises(LongtailError, match="lam = -0.1"):
        lader_loss(z, y, COUNTS, lam=-0.1)
    with pytest.raises(LongtailError, match="alpha = -1"):
        lade_loss(z, y, COUNTS, alpha=-1.0)


# ---------------------------------------------------------------------- the head
C, D = 4, 4
TRAIN_COUNTS = np.array([200, 80, 30, 12])
NAMES = tuple("abcd")


@pytest.fixture(scope="module")
def separable():
    """Four unit-variance Gaussians 8 standard deviations apart: separable in practice."""
    rng = np.random.default_rng(0)
    means = np.eye(C, D) * 8
    y = np.repeat(np.arange(C), TRAIN_COUNTS)
    x = (means[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    yt = np.repeat(np.arange(C), 100)
    xt = (means[yt] + rng.normal(size=(len(yt), D))).astype(np.float32)
    return FeatureSet(x, y, TRAIN_COUNTS, NAMES, name="train"), xt, yt


# full batch (the Monte-Carlo estimates of eq. 11-13 are then exact; lade's default solver is
# full-batch L-BFGS), no weight decay
FULL = {"batch_size": 512, "epochs": 60, "weight_decay": 0.0, "seed": 0}


def test_positive_logits_approach_log_c_as_alpha_grows(separable):
    """Paper 002, figure 3 / eq. 21: LADER levels the true-class logits near log C.

    At the optimum (L-BFGS, float32; SciPy's L-BFGS-B in float64 gives the same distances 0.117,
    0.026, 0.156) the distance is not monotone in alpha on a linear model, whose logits are not
    free as eq. 21 assumes; under-trained SGD made it look so. What holds: every alpha > 0 puts the
    mean true-class logit near log C, and Balanced Softmax (alpha = 0) far from any level."""
    train, xt, yt = separable
    distance = []
    for alpha in (0.0, 0.1, 1.0, 10.0):
        z = make_method("lade", {**FULL, "alpha": alpha}).fit(train).logits(xt)
        assert (z.argmax(1) == yt).mean() == 1.0  # separable: the regulariser costs no accuracy
        distance.append(abs(float(z[np.arange(len(yt)), yt].mean()) - math.log(C)))
    assert distance[0] > 2.0, distance  # alpha = 0 (Balanced Softmax): logits grow without a level
    assert max(distance[1:]) < 0.2, distance


def test_target_prior_is_injected_as_eq_17(separable):
    train, xt, _ = separable
    target = [0.1, 0.2, 0.3, 0.4]
    plain = make_method("lade", {**FULL, "epochs": 5}).fit(train)
    shifted = make_method("lade", {**FULL, "epochs": 5, "target_prior": target}).fit(train)
    # the target prior does not touch training: f(x) + log p_t - log p_u, a per-class shift
    np.testing.assert_allclose(shifted.logits(xt), plain.logits(xt) + np.log(np.array(target) * C), atol=1e-5)
    np.testing.assert_allclose(plain.logit_prior(), 0.25)
    np.testing.assert_allclose(logit_prior(shifted), target)
    # lade+pc to a target equals lade with that target (no double compensation)
    pc = make_method("lade+pc", {**FULL, "epochs": 5, "pc": {"target_prior": target}}).fit(train)
    np.testing.assert_allclose(pc.logits(xt), shifted.logits(xt), atol=1e-5)
    # softmax of eq. 17 by hand
    p = plain.predict_proba(xt) * target
    np.testing.assert_allclose(shifted.predict_proba(xt), p / p.sum(1, keepdims=True), atol=1e-5)


def test_state_with_a_target_prior_reloads_exactly(separable):
    train, xt, _ = separable
    m = make_method("lade", {**FULL, "epochs": 3, "target_prior": [0.4, 0.3, 0.2, 0.1]}).fit(train)
    again = make_method("lade", m.get_params()).load_state_dict(m.state_dict())
    np.testing.assert_array_equal(again.logits(xt), m.logits(xt))
    np.testing.assert_array_equal(again.logit_prior(), m.logit_prior())


@pytest.mark.parametrize(
    "target, match",
    [
        ([0.5, -0.1, 0.3, 0.3], r"target_prior\[1\] = -0.1 is negative"),
        ([0.5, 0.5], "has 2 entries, expected 4"),
        ([0.3, 0.3, 0.3, 0.3], "sums to 1.2"),
        ([0.25, 0.25, 0.25, 0.2500001], None),  # within 1e-6: renormalised with a warning
    ],
)
def test_bad_target_prior_fails_before_training(separable, target, match):
    train, _, _ = separable
    m = make_method("lade", {**FULL, "epochs": 1, "target_prior": target})
    if match is None:
        with pytest.warns(UserWarning, match="renormalised"):
            m.fit(train)
        assert m.logit_prior().sum() == pytest.approx(1.0, abs=1e-15)
        return
    with pytest.raises(LongtailError, match=match):
        m.fit(train)
    assert not hasattr(m, "module_")  # nothing was trained


def test_bad_hyper_parameters_and_zero_source_count(separable):
    train, _, _ = separable
    with pytest.raises(LongtailError, match="alpha = -0.5 must be a number >= 0"):
        make_method("lade", {"alpha": -0.5}).fit(train)
    with pytest.raises(LongtailError, match="lam = 'x' must be a number"):
        make_method("lade", {"lam": "x"}).fit(train)
    counts = TRAIN_COUNTS.copy()
    counts[2] = 0  # the labels have samples of class c, the counts say none
    bad = FeatureSet(train.features, train.labels, counts, NAMES, name="train")
    with pytest.raises(LongtailError, match="class_counts of class 'c' is 0"):
        make_method("lade", {"epochs": 1}).fit(bad)


def test_lade_matches_balanced_softmax_at_alpha_zero(separable):
    train, xt, _ = separable
    params = {"epochs": 3, "batch_size": 64, "seed": 1}
    lade = make_method("lade", {**params, "alpha": 0.0}).fit(train)
    bs = make_method("balanced-softmax", params).fit(train)
    np.testing.assert_allclose(lade.logits(xt), bs.logits(xt), atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(post_compensate(lade.logits(xt), logit_prior(lade), None), lade.logits(xt),
                                   atol=1e-5)
