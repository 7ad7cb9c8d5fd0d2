"""``meta-cb`` (paper 003, specification §1): parity with ``cb-ce`` (J1), the closed-form conditional
weights (J3), no clipping (J7), the held-out meta set, diagnostics and the one-line errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.stages.base import clone
from longtail.stages.errors import LongtailError
from longtail.stages.meta.jamal import ConditionalWeightObjective, MetaCBHead, per_sample_loss
from longtail.stages.registry import METHODS
from longtail.stages.train.bilevel import meta_gradient
from tests.stages.meta.conftest import FIT, float64_state, linear_ce_grad, toy_data


def test_tau_zero_and_no_warmup_is_cb_ce_bit_for_bit(splits):
    """J1 (paper 003 §4.3: "at worst the same as the class-balanced method"): same beta, seed and
    minibatch SGD settings (passed explicitly: cb-ce's own defaults may change) give the same logits."""
    train, val = splits
    cb = METHODS["cb-ce"](beta=0.9, solver="sgd", **FIT).fit(train, val)
    meta = METHODS["meta-cb"](beta=0.9, tau=0.0, meta_start=0.0, meta_batch=8, **FIT).fit(train, val)
    assert np.array_equal(cb.logits(val.features), meta.logits(val.features))
    assert np.array_equal(cb.logit_prior(), meta.logit_prior())
    assert np.all(np.nan_to_num(meta.eps_class_mean_) == 0)  # every epoch had meta steps, all eps = 0
    moved = METHODS["meta-cb"](beta=0.9, tau=1e4, meta_start=0.0, meta_batch=8, **FIT).fit(train, val)
    assert not np.array_equal(cb.logits(val.features), moved.logits(val.features))


def test_default_beta_is_n_minus_one_over_n(splits):
    train, _ = splits
    n = sum(train.class_counts)
    assert MetaCBHead().beta_value(train.class_counts) == (n - 1) / n
    assert MetaCBHead(batch_size=64).tau_value() == pytest.approx(0.64)


@pytest.mark.parametrize("lr", [0.5, 0.05])
def test_conditional_weights_equal_the_closed_form(lr):
    """J3 (specification §1.2), float64: ``ε_i = (τ η / n) (q_i − e_{y_i})ᵀ (G h_i + g_b)``, ``G, g_b``
    the meta-loss gradient at ``θ̃ = θ − η ∇ (1/n) Σ w_{y_i} CE_i``; from the head's own objective."""
    state = float64_state(lr=lr)
    weight = torch.tensor([0.4, 1.1, 1.5], dtype=torch.float64)
    tau = 7.0
    objective = ConditionalWeightObjective(weight=weight, tau=tau, loss=per_sample_loss("ce"), epochs=1)
    batch = state.data.batch(torch.arange(len(state.data)), 0, 0)
    meta = toy_data((3, 3, 3), 9)
    meta_batch = meta.batch(torch.arange(len(meta)), 0, 0)
    values, grads, _ = meta_gradient(state, batch, objective, meta_batch, lr)
    eps = objective.meta_update(values, grads, state)["eps"]
    x, y, n = batch.x, batch.y, len(batch.y)
    W, b = state.module.weight.detach(), state.module.bias.detach()
    gW, gb = linear_ce_grad(W, b, x, y, weight[y])
    G, g_b = linear_ce_grad(W - lr * gW, b - lr * gb, meta.x, meta.y, torch.ones(len(meta), dtype=torch.float64))
    q = torch.softmax(x @ W.T + b, 1) - F.one_hot(y, 3).double()
    closed = tau * lr / n * (q * (x @ G.T + g_b)).sum(1)
    torch.testing.assert_close(eps, closed, rtol=0, atol=1e-12)
    # J7: no clipping or normalisation, the weights enter the real loss as they are
    big = -1e3 * eps  # some total weights w + eps below 0
    out = objective.inner_loss(dict(state.module.named_parameters()), state, batch, {"eps": big})
    per = per_sample_loss("ce")(state.module(x), y)
    torch.testing.assert_close(out.loss, ((weight[y] + big) * per).mean(), rtol=1e-14, atol=0)
    assert bool(((weight[y] + big) < 0).any())


def test_held_out_meta_set_leaves_train(splits):
    train, _ = splits
    head = METHODS["meta-cb"](meta_source="train", meta_per_class=3, tau=10.0, meta_start=0.5, **FIT).fit(train)
    counts = np.array(train.class_counts) - 3
    assert head.meta_rows_ == 12
    np.testing.assert_allclose(head.source_prior_, counts / counts.sum())
    w = head.class_weights_  # effective-number weights of the counts that stayed in train
    n = counts.sum()
    raw = (1 - (n - 1) / n) / (1 - ((n - 1) / n) ** counts)
    np.testing.assert_allclose(w, raw * 4 / raw.sum(), rtol=1e-6)


def test_diagnostics_survive_the_state_dict(splits):
    train, val = splits
    head = METHODS["meta-cb"](tau=1e4, meta_start=0.5, meta_batch=8, **FIT).fit(train, val)
    diag = head.diagnostics(train)["meta"]
    assert diag["meta_start_epoch"] == 2 and diag["meta_rows"] == 24
    assert diag["eps_class_mean"][0] == [None] * 4 and diag["meta_loss"][:2] == [None, None]
    assert all(v is not None for v in diag["eps_class_mean"][3]) and diag["eps_scale"][3] > 0
    back = clone(head).load_state_dict(head.state_dict())
    assert back.diagnostics(train) == head.diagnostics(train)
    np.testing.assert_array_equal(back.logits(val.features), head.logits(val.features))


@pytest.mark.parametrize("params, match", [
    ({"meta_start": 1.0}, "meta_start = 1.0 must be a number >= 0 and < 1"),
    ({"meta_start": -0.1}, "meta_start"),
    ({"loss": "hinge"}, "loss = 'hinge' is not one of ce, focal, ldam"),
    ({"meta_source": "test"}, "meta_source = 'test' is not one of val, train"),
    ({"tau": -1.0}, "tau"),
])
def test_bad_parameters_fail_before_any_fit(splits, params, match):
    train, val = splits
    head = METHODS["meta-cb"](**params, **FIT)
    with pytest.raises(LongtailError, match=match) as info:
        head.fit(train, val)
    assert "\n" not in str(info.value) and not head.is_fitted()


def test_missing_val_and_empty_meta_class_are_one_line_errors(splits):
    train, val = splits
    with pytest.raises(LongtailError, match="no val split .*meta_source: train"):
        METHODS["meta-cb"](**FIT).fit(train)
    no_d = type(val)(val.features[:18], val.labels[:18], val.class_counts, val.class_names, name="val")
    with pytest.raises(LongtailError, match="class 'd' has no row"):
        METHODS["meta-cb"](**FIT).fit(train, no_d)


def test_a_step_size_that_breaks_the_loss_names_tau(splits):
    train, val = splits
    head = METHODS["meta-cb"](tau=1e30, meta_start=0.5, **FIT)
    with pytest.raises(LongtailError, match=r"non-finite at epoch \d+: lower tau \(now 1e\+30\)"):
        head.fit(train, val)
    assert not head.is_fitted()


@pytest.mark.parametrize("loss", ["focal", "ldam"])
def test_other_losses_train_and_their_meta_loss_is_the_same_loss(splits, loss):
    train, val = splits
    head = METHODS["meta-cb"](loss=loss, tau=100.0, meta_start=0.5, **FIT).fit(train, val)
    assert np.isfinite(head.meta_loss_[2:]).all() and np.isnan(head.meta_loss_[:2]).all()
    if loss == "ldam":  # test-time logits are scale * cosine
        assert np.abs(head.logits(val.features)).max() <= 30.0 + 1e-4


def test_the_conditional_weights_lower_the_look_ahead_meta_loss():
    """Descent: the look-ahead with ``ε = −τ ∇_ε L_m`` (small ``τ``) has a lower meta loss than with
    ``ε = 0`` at the same ``θ`` (a wrong sign would raise it)."""
    state = float64_state(lr=0.5)
    weight = torch.tensor([0.4, 1.1, 1.5], dtype=torch.float64)
    obj = ConditionalWeightObjective(weight=weight, tau=0.05, loss=per_sample_loss("ce"), epochs=1)
    batch = state.data.batch(torch.arange(len(state.data)), 0, 0)
    meta = toy_data((3, 3, 3), 9)
    mb = meta.batch(torch.arange(len(meta)), 0, 0)
    values, grads, at_zero = meta_gradient(state, batch, obj, mb, 0.5)
    eps = obj.meta_update(values, grads, state)["eps"]
    assert float(eps.abs().max()) > 0

    class Fixed(ConditionalWeightObjective):
        def meta_variables(self, state, batch):
            self._labels = batch.y
            return {"eps": eps.clone().requires_grad_(True)}

    _, _, moved = meta_gradient(state, batch, Fixed(weight=weight, tau=0.05, loss=per_sample_loss("ce"), epochs=1),
                                mb, 0.5)
    assert float(moved) < float(at_zero)
