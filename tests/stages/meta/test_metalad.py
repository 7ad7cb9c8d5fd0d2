"""``metalad`` (paper 001, eq. 33-36; specification §3): parity with ``logit-adjust`` (L2), the
statistics against their definitions (``V`` with explicit covariances, ``G`` by hand, L8), the
closed-form hypergradient in float64, zero gradients (L9, class-constant offsets) and the errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.stages.errors import LongtailError
from longtail.stages.meta.metalad import LogitPerturbationObjective, pair_statistics, variance_term
from longtail.stages.registry import METHODS
from longtail.stages.train.bilevel import meta_gradient
from tests.stages.meta.conftest import FIT, float64_state, linear_ce_grad, toy_data


def test_proportion_only_with_eta2_zero_is_logit_adjust(splits):
    """L2: ``λ_1 = 1``, ``λ_2 = λ_3 = 0`` (here: the other terms off) and ``eta2 = 0`` train the
    logit-adjusted loss with ``tau = 1`` (softmax shift invariance); equal up to float rounding."""
    train, val = splits
    la = METHODS["logit-adjust"](tau=1.0, solver="sgd", **FIT).fit(train, val)
    lad = METHODS["metalad"](eta2=0.0, terms=["proportion"], meta_start=0.0, meta_batch=8, **FIT).fit(train, val)
    np.testing.assert_allclose(lad.logits(val.features), la.logits(val.features), rtol=0, atol=1e-5)
    np.testing.assert_allclose(lad.logit_prior(), la.logit_prior(), atol=1e-12)
    assert np.nanmax(lad.lambda_moved_) == 0.0  # eta2 = 0: the coefficients never moved
    assert lad.diagnostics(train)["meta"]["lambda_mean"]["proportion"][-1] == 1.0


def test_statistics_equal_their_definitions():
    """``P = log π_c − log π_y``; ``G = log(Δ̄/Δ_yc)`` by hand on three centres; ``V`` from explicit
    ML covariances ``Δwᵀ Σ_y Δw / ‖Δw‖²``; ``V`` is unchanged by rescaling ``W`` (L8)."""
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 0.0], [3.0, 2.0], [3.0, -2.0], [0.0, 4.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1, 2])
    counts = torch.tensor([2, 3, 1])
    s = pair_statistics(x, y, counts)
    torch.testing.assert_close(s["P"][0, 1], torch.log(torch.tensor(3 / 2, dtype=torch.float64)))
    # centres (0,0), (3,0), (0,4): distances 3, 4, 5, mean 4
    expect = torch.log(torch.tensor([[4 / 4, 4 / 3, 4 / 4], [4 / 3, 4 / 4, 4 / 5], [4 / 4, 4 / 5, 4 / 4]],
                                    dtype=torch.float64)) * (1 - torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(s["G"], expect)

    g = torch.Generator().manual_seed(0)
    data = toy_data((9, 6, 4), 3, dim=4)
    cnt = torch.bincount(data.y)
    st = pair_statistics(data.x, data.y, cnt)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64)
    V = variance_term(st["centred"], data.y, cnt, W)
    for a in range(3):
        A = data.x[data.y == a] - data.x[data.y == a].mean(0)
        cov = A.T @ A / len(A)
        for c in range(3):
            dw = W[a] - W[c]
            want = 0.0 if a == c else float(dw @ cov @ dw / (dw @ dw))
            assert abs(float(V[a, c]) - want) < 1e-12
    torch.testing.assert_close(variance_term(st["centred"], data.y, cnt, 5.0 * W), V)


def _objective(state, terms=("proportion", "variance", "distance"), eta2=1.0):
    data = state.data
    counts = torch.bincount(data.y)
    stats = pair_statistics(data.x, data.y, counts)
    obj = LogitPerturbationObjective(stats=stats, counts=counts, labels=data.y, terms=terms, eta2=eta2,
                                     lambda_init=1.0, epochs=1)
    with torch.no_grad():  # coefficients away from 1, so each term has its own weight
        obj.lam.copy_(torch.rand(obj.lam.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.5)
    return obj


def test_hypergradient_equals_the_closed_form():
    """Specification §3.2, float64: ``∂L_m/∂δ_i = −(η/n)(diag p̃_i − p̃_i p̃_iᵀ)(G h_i + g_b)`` and
    ``∂L_m/∂λ_{y,c,k} = Σ_{i: y_i = y} [∂L_m/∂δ_i]_c T_k[y, c]``, at the look-ahead of the perturbed loss."""
    lr = 0.7
    state = float64_state(lr=lr)
    obj = _objective(state)
    batch = state.data.batch(torch.arange(len(state.data)), 0, 0)
    meta = toy_data((3, 3, 3), 9)
    _, grads, _ = meta_gradient(state, batch, obj, meta.batch(torch.arange(len(meta)), 0, 0), lr)
    x, y, n = batch.x, batch.y, len(batch.y)
    W, b = state.module.weight.detach(), state.module.bias.detach()
    delta = obj.delta(obj.lam.detach())[y]
    p = torch.softmax(x @ W.T + b + delta, 1)
    r = p - F.one_hot(y, 3).double()  # gradient of the perturbed CE in the logits
    gW, gb = r.T @ x / n, r.sum(0) / n
    G, g_b = linear_ce_grad(W - lr * gW, b - lr * gb, meta.x, meta.y, torch.ones(len(meta), dtype=torch.float64))
    res = x @ G.T + g_b
    d_delta = -(lr / n) * (p * res - p * (p * res).sum(1, keepdim=True))  # (diag p - p p^T) r
    T = obj.terms_tensor()
    closed = torch.zeros(3, 3, 3, dtype=torch.float64)
    for i in range(n):
        closed[:, y[i], :] += d_delta[i] * T[:, y[i], :] * obj.off[y[i]]
    torch.testing.assert_close(grads["lam"], closed, rtol=0, atol=1e-12)
    assert float(grads["lam"].abs().max()) > 1e-6


def test_absent_rows_diagonal_and_class_constant_offsets_have_zero_gradient():
    """L9: rows ``y`` absent from the batch and the diagonal get exactly zero gradient; an offset
    constant over the classes of a row (the diagonal let in, ``T`` constant per row, the row's
    coefficients moved together) cancels in the softmax: its hypergradient is 0 (M3)."""
    state = float64_state()
    obj = _objective(state)
    rows = torch.nonzero(state.data.y < 2).flatten()
    meta = toy_data((3, 3, 3), 9)
    _, grads, _ = meta_gradient(state, state.data.batch(rows, 0, 0), obj,
                                meta.batch(torch.arange(len(meta)), 0, 0), 0.5)
    g = grads["lam"]
    assert bool((g[:, 2] == 0).all()) and bool((g.diagonal(dim1=1, dim2=2) == 0).all())
    assert float(g[:, :2].abs().max()) > 1e-6

    const = _objective(state, terms=("proportion",))
    const.off = torch.ones(3, 3, dtype=torch.float64)  # let the diagonal in
    const.P = torch.tensor([[0.3], [-1.2], [2.0]], dtype=torch.float64).expand(3, 3).contiguous()
    _, grads, _ = meta_gradient(state, state.data.batch(torch.arange(len(state.data)), 0, 0), const,
                                meta.batch(torch.arange(len(meta)), 0, 0), 0.5)
    # moving a row's coefficients together (lam_{y,:} += t) shifts every logit of its rows by t T_y:
    # that direction's derivative, the row sum of the gradient, is 0; single coefficients do move
    assert float(grads["lam"][0].sum(1).abs().max()) < 1e-15 and float(grads["lam"][0].abs().max()) > 1e-3


def test_meta_stage_moves_the_coefficients_and_records_diagnostics(splits):
    train, val = splits
    lad = METHODS["metalad"](eta2=1e3, meta_start=0.5, meta_batch=8, **FIT).fit(train, val)
    diag = lad.diagnostics(train)["meta"]
    assert diag["lambda_moved"][:2] == [None, None] and diag["lambda_moved"][3] > 0
    assert set(diag["lambda_mean"]) == {"proportion", "variance", "distance"}
    assert diag["delta_mean_abs"][3] > 0 and diag["meta_loss"][3] is not None
    off = ~np.eye(4, dtype=bool)
    assert diag["lambda_mean"]["proportion"][3] == pytest.approx(lad.lam_[0][off].mean())
    lam1 = lad.lam_[0][off].mean()
    prior = np.exp((1 - lam1) * np.log(lad.source_prior_))
    np.testing.assert_allclose(lad.logit_prior(), prior / prior.sum())


@pytest.mark.parametrize("params, match", [
    ({"terms": ["proportion", "skew"]}, r"unknown terms 'skew' \(known: proportion, variance, distance\)"),
    ({"terms": 3}, "terms = 3 must be a list"),
    ({"meta_start": 1.5}, "meta_start"),
    ({"eta2": -1.0}, "eta2"),
    ({"eta2": 1e300}, r"eta2 = 1e\+300 must be a number >= 0 and <= 3.40282e\+38"),
    ({"stats_interval": 0}, "stats_interval"),
])
def test_bad_parameters_fail_before_any_fit(splits, params, match):
    train, val = splits
    with pytest.raises(LongtailError, match=match) as info:
        METHODS["metalad"](**params, **FIT).fit(train, val)
    assert "\n" not in str(info.value)


def test_a_small_meta_step_lowers_the_look_ahead_meta_loss():
    """Descent: at a fixed ``θ``, one small step on ``Λ`` along ``−∇_Λ L_m`` lowers ``L_m(θ̂(Λ))`` (a
    wrong sign or a wrong look-ahead would raise it)."""
    state = float64_state(lr=0.5)
    obj = _objective(state)
    batch = state.data.batch(torch.arange(len(state.data)), 0, 0)
    meta = toy_data((3, 3, 3), 9)
    mb = meta.batch(torch.arange(len(meta)), 0, 0)
    values, grads, before = meta_gradient(state, batch, obj, mb, 0.5)
    with torch.no_grad():
        obj.lam -= 1e-2 * grads["lam"] / grads["lam"].norm()
    _, _, after = meta_gradient(state, batch, obj, mb, 0.5)
    assert float(after) < float(before)
