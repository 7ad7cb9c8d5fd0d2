"""The classic losses against values computed by hand and against the identities of their papers."""

import math

import numpy as np
import pytest
import torch

from longtail.stages.errors import LongtailError
from longtail.stages.losses import (
    balanced_softmax_loss,
    class_balanced_weights,
    cross_entropy,
    focal_loss,
    ldam_loss,
    ldam_margins,
    log_prior,
    logit_adjusted_loss,
)

# two samples, three classes; labels 0 and 2
LOGITS = [[2.0, 1.0, 0.0], [0.0, 0.5, 1.0]]
LABELS = [0, 2]
# by hand: log(e^2 + e^1 + e^0) = log 11.1073 = 2.407606; log(1 + e^0.5 + e^1) = log 5.3670 = 1.680270
NLL = np.array([2.407606 - 2.0, 1.680270 - 1.0])  # 0.407606, 0.680270


def _z(dtype=torch.float64):
    return torch.tensor(LOGITS, dtype=dtype)


def _y():
    return torch.tensor(LABELS)


def _random_problem(seed=0, n=7, c=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 3, torch.randint(c, (n,), generator=g)


# ---------------------------------------------------------------------- cross-entropy
def test_cross_entropy_matches_hand_value():
    assert cross_entropy(_z(), _y()).item() == pytest.approx(0.543938, abs=1e-6)
    assert cross_entropy(_z(), _y()).item() == pytest.approx(NLL.mean(), abs=1e-6)


def test_weighted_cross_entropy_divides_by_batch_size():
    weight = [0.5, 1.0, 2.0]
    expected = (0.5 * NLL[0] + 2.0 * NLL[1]) / 2  # the mean over N = 2, not over the weights' sum
    assert cross_entropy(_z(), _y(), weight=weight).item() == pytest.approx(expected, abs=1e-6)
    assert cross_entropy(_z(), _y(), weight=torch.tensor(weight)).item() == pytest.approx(expected, abs=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
    z = torch.tensor([[1000.0, 0.0, -1000.0]], dtype=torch.float32)
    assert cross_entropy(z, torch.tensor([0])).item() == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy(z, torch.tensor([1])).item() == pytest.approx(1000.0, rel=1e-6)


def test_loss_keeps_dtype():
    assert cross_entropy(_z(torch.float32), _y()).dtype == torch.float32
    assert balanced_softmax_loss(_z(torch.float32), _y(), [6, 3, 1]).dtype == torch.float32


# ---------------------------------------------------------------------- priors and Balanced Softmax
def test_log_prior_by_hand():
    lp = log_prior([6, 3, 1], _z())
    np.testing.assert_allclose(lp.numpy(), np.log([0.6, 0.3, 0.1]), atol=1e-12)


def test_balanced_softmax_matches_hand_value():
    # logits + log prior [.6, .3, .1]; sample 0 (label 0): z = [2 + log .6, 1 + log .3, log .1]
    z0 = np.array([2 + math.log(0.6), 1 + math.log(0.3), math.log(0.1)])
    z1 = np.array([math.log(0.6), 0.5 + math.log(0.3), 1 + math.log(0.1)])
    expected = ((np.log(np.exp(z0).sum()) - z0[0]) + (np.log(np.exp(z1).sum()) - z1[2])) / 2
    assert balanced_softmax_loss(_z(), _y(), [6, 3, 1]).item() == pytest.approx(expected, abs=1e-10)
    # by hand: sample 0: log(4.4334 + 0.8155 + 0.1) - 1.4892 = 0.18772 (the frequent label costs less
    # than in CE, 0.4076); sample 1: log(0.6 + 0.4946 + 0.2718) + 1.3026 = 1.61480 (the rare label
    # costs more than in CE, 0.6803)
    assert expected == pytest.approx((0.18772 + 1.61480) / 2, abs=1e-5)


def test_balanced_softmax_is_cross_entropy_on_logits_plus_log_prior():
    z, y = _random_problem()
    counts = np.array([50, 20, 5, 1])
    expected = torch.nn.functional.cross_entropy(z + torch.log(torch.tensor(counts / counts.sum())), y)
    assert balanced_softmax_loss(z, y, counts).item() == pytest.approx(expected.item(), abs=1e-12)


def test_balanced_softmax_gradient_is_adjusted_softmax_minus_onehot():
    z, y = _random_problem(seed=3)
    z.requires_grad_(True)
    counts = np.array([50.0, 20.0, 5.0, 1.0])
    balanced_softmax_loss(z, y, counts).backward()
    adj = z.detach().numpy() + np.log(counts / counts.sum())
    p = np.exp(adj - adj.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p - np.eye(4)[y.numpy()]) / len(y)
    np.testing.assert_allclose(z.grad.numpy(), expected, atol=1e-12)


def test_logit_adjust_tau_one_is_balanced_softmax_and_tau_zero_is_ce():
    z, y = _random_problem(seed=1)
    counts = [30, 7, 2, 9]
    assert logit_adjusted_loss(z, y, counts, tau=1.0).item() == pytest.approx(
        balanced_softmax_loss(z, y, counts).item(), abs=1e-12)
    assert logit_adjusted_loss(z, y, counts, tau=0.0).item() == pytest.approx(cross_entropy(z, y).item(), abs=1e-12)


def test_logit_adjust_tau_two_by_hand():
    lp = np.log([0.6, 0.3, 0.1])
    z = np.array(LOGITS) + 2.0 * lp
    expected = np.mean([np.log(np.exp(z[0]).sum()) - z[0, 0], np.log(np.exp(z[1]).sum()) - z[1, 2]])
    assert logit_adjusted_loss(_z(), _y(), [6, 3, 1], tau=2.0).item() == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("counts, match", [([6, 3], "2 entries for 3 classes"), ([6, 0, 1], r"class_counts\[1\] = 0"),
                                           ([6, -1, 1], r"class_counts\[1\] = -1")])
def test_bad_class_counts_raise(counts, match):
    with pytest.raises(LongtailError, match=match):
        balanced_softmax_loss(_z(), _y(), counts)


# ---------------------------------------------------------------------- class-balanced weights
def test_class_balanced_weights_by_hand():
    # beta = 0.5, counts [1, 2]: (1 - .5)/(1 - .5) = 1 and (1 - .5)/(1 - .25) = 2/3, normalised to sum 2
    np.testing.assert_allclose(class_balanced_weights([1, 2], 0.5), [1.2, 0.8], atol=1e-12)


def test_class_balanced_weights_limits():
    counts = np.array([200, 50, 10, 5])
    np.testing.assert_array_equal(class_balanced_weights(counts, 0.0), np.ones(4))
    inv = (1 / counts) * (4 / (1 / counts).sum())
    np.testing.assert_allclose(class_balanced_weights(counts, 1.0), inv, rtol=1e-12)
    np.testing.assert_allclose(class_balanced_weights(counts, 1 - 1e-9), inv, rtol=1e-6)
    np.testing.assert_allclose(class_balanced_weights(counts, 0.999999), inv, rtol=1e-3)
    # between the limits: sums to C, rarer classes weigh more, milder than inverse frequency
    w = class_balanced_weights(counts, 0.99)
    assert w.sum() == pytest.approx(4.0)
    assert np.all(np.diff(w) > 0)
    assert w[-1] / w[0] < inv[-1] / inv[0]


@pytest.mark.parametrize("beta", [-0.1, 1.5, float("nan")])
def test_class_balanced_weights_reject_bad_beta(beta):
    with pytest.raises(LongtailError, match="beta"):
        class_balanced_weights([3, 2], beta)


# ---------------------------------------------------------------------- focal loss
def test_focal_matches_hand_value():
    # p_y = e^-NLL = 0.665241, 0.506480; (1 - p)^2 * NLL = 0.045678, 0.165688
    assert focal_loss(_z(), _y(), gamma=2.0).item() == pytest.approx((0.045678 + 0.165688) / 2, abs=1e-6)


def test_focal_gamma_zero_is_cross_entropy_and_weight_is_alpha():
    z, y = _random_problem(seed=2)
    assert focal_loss(z, y, gamma=0.0).item() == pytest.approx(cross_entropy(z, y).item(), abs=1e-12)
    w = [1.0, 2.0, 3.0, 4.0]
    assert focal_loss(z, y, gamma=0.0, weight=w).item() == pytest.approx(
        cross_entropy(z, y, weight=w).item(), abs=1e-12)
    # weighting is per sample: weight[y] * FL, averaged over N
    per = torch.stack([focal_loss(z[i:i + 1], y[i:i + 1], gamma=1.5) for i in range(len(y))])
    wt = torch.tensor(w, dtype=torch.float64)[y]
    assert focal_loss(z, y, gamma=1.5, weight=w).item() == pytest.approx((wt * per).mean().item(), abs=1e-12)


def test_focal_of_a_confident_correct_sample_is_zero_not_nan():
    z = torch.tensor([[100.0, 0.0]])
    out = focal_loss(z, torch.tensor([0]), gamma=0.5)
    assert out.item() == 0.0


# ---------------------------------------------------------------------- LDAM
def test_ldam_margins_by_hand():
    # n^-1/4 for 100, 10, 1 = 0.316228, 0.562341, 1; rescaled so the largest is 0.5
    np.testing.assert_allclose(ldam_margins([100, 10, 1], max_margin=0.5), [0.158114, 0.281171, 0.5], atol=1e-6)


def test_ldam_margins_largest_and_ordering():
    counts = np.array([37, 500, 3, 80, 12])
    m = ldam_margins(counts, max_margin=0.7)
    assert m.max() == pytest.approx(0.7)
    assert np.argmax(m) == np.argmin(counts)
    np.testing.assert_array_equal(np.argsort(m), np.argsort(-counts))  # fewer samples, larger margin
    np.testing.assert_allclose(m * counts ** 0.25, np.full(5, m[0] * 37 ** 0.25))  # m ∝ n^-1/4


def test_ldam_loss_by_hand():
    z = torch.tensor([[0.2, -0.1, 0.4], [0.3, 0.1, -0.2]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    counts = [100, 10, 1]  # margins 0.158114, 0.281171, 0.5
    # sample 0: 10 * [0.2, -0.1, 0.4 - 0.5] = [2, -1, -1]; sample 1: 10 * [0.3 - 0.158114, 0.1, -0.2]
    s0 = -(-1.0) + math.log(math.exp(2) + 2 * math.exp(-1))
    a = 10 * (0.3 - 0.1581139)
    s1 = -a + math.log(math.exp(a) + math.exp(1.0) + math.exp(-2.0))
    assert ldam_loss(z, y, counts, max_margin=0.5, scale=10.0).item() == pytest.approx((s0 + s1) / 2, abs=1e-6)
    w = [3.0, 1.0, 0.5]
    assert ldam_loss(z, y, counts, max_margin=0.5, scale=10.0, weight=w).item() == pytest.approx(
        (0.5 * s0 + 3.0 * s1) / 2, abs=1e-6)


def test_ldam_with_tiny_margin_is_scaled_cross_entropy():
    z, y = _random_problem(seed=4)
    counts = [5, 5, 5, 5]
    assert ldam_loss(z, y, counts, max_margin=1e-12, scale=3.0).item() == pytest.approx(
        cross_entropy(3.0 * z, y).item(), abs=1e-9)


def test_ldam_rejects_non_positive_margin():
    with pytest.raises(LongtailError, match="max_margin"):
        ldam_margins([3, 2], max_margin=0.0)
