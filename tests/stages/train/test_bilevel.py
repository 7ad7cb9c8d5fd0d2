"""The bi-level look-ahead step: parity with the plain step, meta-gradients against finite
differences and the closed form, and the special cases of the meta-learning specification that are
about the step itself (zero meta-gradients, alignment, no state, scaling).

Randomness: train rows come from the fit's generator, meta batches from ``MetaBatches``' own seeded
generator, so a bi-level fit and a plain fit with the same seed visit the same train rows.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longtail.stages.errors import LongtailError
from longtail.stages.train.bilevel import (BilevelStep, MetaBatches, MetaObjective, call, gradient_step,
                                           meta_gradient, optimizer_update)
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import OptimConfig, TrainState, cosine_schedule, fit_module
from longtail.stages.train.objective import Objective, StepOutput
from longtail.stages.train.samplers import ClassBalancedSampler

C, D = 3, 3


def toy(n_per_class, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(n_per_class)), torch.tensor(n_per_class))
    centres = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]], dtype=dtype)
    x = torch.randn(len(y), D, generator=g, dtype=dtype) + centres[y]
    return TrainData(x, y)


def linear(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    m = nn.Linear(D, C).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.randn(C, D, generator=g, dtype=dtype) * 0.5)
        m.bias.copy_(torch.randn(C, generator=g, dtype=dtype) * 0.5)
    return m


TRAIN, META = toy((7, 4, 2), 0), toy((3, 3, 3), 1)
PRIOR = torch.tensor([7.0, 4.0, 2.0], dtype=torch.float64) / 13
WEIGHTS = torch.tensor([0.5, 0.9, 1.6], dtype=torch.float64)


class Recorder(MetaObjective):
    """Records, at every meta step, the theta and lr the look-ahead starts from, the batch, the meta
    batch, the meta values and the meta-gradients (through the public hooks only). Subclasses give
    ``variables`` and ``update``."""

    def __init__(self):
        self.calls = []

    def meta_variables(self, state, batch):
        self._batch, meta = batch, self.variables(state, batch)
        self._values = {k: v.detach().clone() for k, v in meta.items()}
        return meta

    def meta_loss(self, params, state, meta_batch):  # called only in meta steps
        self.calls.append({"theta": {k: p.detach().clone() for k, p in state.module.named_parameters()},
                           "lr": state.lr, "rows": self._batch.rows.clone(), "step": self._batch.step,
                           "values": self._values, "meta_rows": meta_batch.rows.clone()})
        return super().meta_loss(params, state, meta_batch)

    def meta_update(self, meta, grads, state):
        self.calls[-1]["grads"] = {k: g.clone() for k, g in grads.items()}
        return self.update(meta, grads)


class Weighted(Recorder):
    """Jamal's loss (paper 003 eq. 8): ``(1/n) sum (w_y + eps_i) CE_i``, eps fresh zeros per batch,
    ``eps = -tau grad``; warm-up: plain CE."""

    def __init__(self, w, tau):
        super().__init__()
        self.w, self.tau = w, tau

    def variables(self, state, batch):
        return {"eps": torch.zeros(batch.rows.shape[0], dtype=batch.x.dtype, requires_grad=True)}

    def inner_loss(self, params, state, batch, meta):
        z = call(state.module, params, batch.x)
        per = F.cross_entropy(z, batch.y, reduction="none")
        return StepOutput(((self.w.to(z.dtype)[batch.y] + meta["eps"]) * per).mean(), logits=z, per_sample=per)

    def warmup_loss(self, module, batch, state):
        z = module(batch.x)
        return StepOutput(F.cross_entropy(z, batch.y), logits=z)

    def update(self, meta, grads):
        return gradient_step(meta, grads, self.tau)


class Offsets(Recorder):
    """A persistent per-class meta parameter: logits ``z + lam * t`` (``t`` fixed, e.g. ``log pi``),
    ``lam`` moved by its own optimiser (``make_opt``)."""

    def __init__(self, t, make_opt, init=1.0):
        super().__init__()
        self.t = t
        self.lam = torch.full(t.shape, init, dtype=t.dtype, requires_grad=True)
        self.opt = make_opt([self.lam])

    def variables(self, state, batch):
        return {"lam": self.lam}

    def inner_loss(self, params, state, batch, meta):
        z = call(state.module, params, batch.x)
        return StepOutput(F.cross_entropy(z + meta["lam"] * self.t.to(z.dtype), batch.y), logits=z)

    def update(self, meta, grads):
        return optimizer_update(self.opt, meta, grads)


class PlainWeighted(Objective):
    """What ``Weighted`` is with eps held at 0, written for ``plain_step``."""

    def __init__(self, w, warmup):
        self.w, self.warmup = w, warmup

    def loss(self, module, batch, state):
        z = module(batch.x)
        if batch.epoch < self.warmup:
            return StepOutput(F.cross_entropy(z, batch.y), logits=z)
        per = F.cross_entropy(z, batch.y, reduction="none")
        return StepOutput((self.w.to(z.dtype)[batch.y] * per).mean(), logits=z)


class PlainOffsets(Objective):
    def __init__(self, t, lam):
        self.t, self.lam = t, lam

    def loss(self, module, batch, state):
        z = module(batch.x)
        return StepOutput(F.cross_entropy(z + self.lam * self.t.to(z.dtype), batch.y), logits=z)


def meta_stream(seed=5, batch_size=4, balanced=True, data=META):
    sampler = ClassBalancedSampler(data.y, C) if balanced else None
    return MetaBatches(data, batch_size, sampler=sampler, seed=seed)


def fit(module, objective, config, step=None, data=TRAIN, seed=11):
    gen = torch.Generator().manual_seed(seed)
    kwargs = {} if step is None else {"step": step}
    state = fit_module(module, data, objective, config, generator=gen, desc="toy", **kwargs)
    return state, gen


# --- (a) meta variables held fixed: bit-for-bit the plain step ----------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fresh_weights_held_at_zero_equal_plain_step_bit_for_bit(optimizer):
    train = TrainData(TRAIN.x.float(), TRAIN.y)
    meta = TrainData(META.x.float(), META.y)
    config = OptimConfig(epochs=4, lr=0.3, batch_size=5, weight_decay=1e-2, optimizer=optimizer)
    w = WEIGHTS.float()
    start = linear(2, torch.float32)
    objective = Weighted(w, tau=0.0)
    step = BilevelStep(meta_stream(data=meta), warmup_epochs=1, every=2)
    got, gen_got = fit(copy.deepcopy(start), objective, config, step, data=train)
    want, gen_want = fit(copy.deepcopy(start), PlainWeighted(w, warmup=1), config, data=train)
    for (name, p), q in zip(got.module.named_parameters(), want.module.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(gen_got.get_state(), gen_want.get_state())  # the meta draws left it alone
    assert [h["loss"] for h in got.history] == [h["loss"] for h in want.history]
    # the meta step really ran (3 steps per epoch, every 2nd of the 9 after warm-up) and had a gradient
    assert len(objective.calls) == 5
    assert all(c["grads"]["eps"].abs().max() > 1e-6 for c in objective.calls)
    assert "meta" not in got.history[0] and all("meta" in h for h in got.history[1:])


def test_persistent_parameter_with_zero_meta_lr_equals_plain_step_bit_for_bit():
    config = OptimConfig(epochs=3, lr=0.2, batch_size=4, weight_decay=5e-3)
    t = PRIOR.log()
    objective = Offsets(t, lambda ps: torch.optim.Adam(ps, lr=0.0))
    start = linear(3)
    got, _ = fit(copy.deepcopy(start), objective, config, BilevelStep(meta_stream(balanced=False)))
    want, _ = fit(copy.deepcopy(start), PlainOffsets(t, torch.ones(C, dtype=torch.float64)), config)
    assert all(torch.equal(p, q) for p, q in zip(got.module.parameters(), want.module.parameters()))
    assert torch.equal(objective.lam.detach(), torch.ones(C, dtype=torch.float64))
    assert len(objective.calls) == 3 * 4 and objective.calls[0]["grads"]["lam"].abs().max() > 1e-4


# --- (b) the meta-gradient against central finite differences, float64 ---------------------------

def linear_ce_grad(W, b, x, y, row_weights, offsets=None):
    """Closed-form gradient of ``(1/n) sum_i a_i CE(W x_i + b + o_i, y_i)`` for a linear head."""
    z = x @ W.T + b + (0 if offsets is None else offsets)
    r = (torch.softmax(z, 1) - F.one_hot(y, C).to(x.dtype)) * row_weights[:, None] / len(y)
    return r.T @ x, r.sum(0)


def lookahead_meta_loss(theta, lr, batch_x, batch_y, row_weights, meta_x, meta_y, offsets=None):
    """An independent reference: ``L_meta(theta - lr * grad L_in(theta))``, plain SGD, no autograd."""
    W, b = theta["weight"], theta["bias"]
    gW, gb = linear_ce_grad(W, b, batch_x, batch_y, row_weights, offsets)
    return F.cross_entropy(meta_x @ (W - lr * gW).T + (b - lr * gb), meta_y)


def central_differences(f, at, h=1e-5):
    out = torch.empty_like(at)
    for i in range(at.numel()):
        e = torch.zeros_like(at)
        e.view(-1)[i] = h
        out.view(-1)[i] = (f(at + e) - f(at - e)) / (2 * h)
    return out


def test_fresh_per_example_meta_gradient_matches_finite_differences():
    # two steps: the second looks ahead from a moved theta, at the scheduled lr (cosine: half of it),
    # while the real optimiser has momentum and weight decay, which the plain-SGD look-ahead ignores
    config = OptimConfig(epochs=1, lr=0.4, batch_size=7, weight_decay=1e-2, momentum=0.9)
    objective = Weighted(WEIGHTS, tau=50.0)
    fit(linear(4), objective, config, BilevelStep(meta_stream(batch_size=5, balanced=False)))
    assert len(objective.calls) == 2
    assert objective.calls[0]["lr"] == pytest.approx(0.4) and objective.calls[1]["lr"] == pytest.approx(0.2)
    assert not torch.equal(objective.calls[0]["theta"]["weight"], objective.calls[1]["theta"]["weight"])
    for c in objective.calls:
        x, y = TRAIN.x[c["rows"]], TRAIN.y[c["rows"]]
        xm, ym = META.x[c["meta_rows"]], META.y[c["meta_rows"]]

        def loss_at(eps):
            return lookahead_meta_loss(c["theta"], c["lr"], x, y, WEIGHTS[y] + eps, xm, ym)

        numeric = central_differences(loss_at, torch.zeros(len(y), dtype=torch.float64))
        got = c["grads"]["eps"]
        assert got.abs().max() > 1e-3
        torch.testing.assert_close(got, numeric, rtol=1e-6, atol=1e-10)


def test_persistent_per_class_meta_gradient_matches_finite_differences():
    config = OptimConfig(epochs=2, lr=0.3, batch_size=7, weight_decay=1e-3)
    t = PRIOR.log()
    objective = Offsets(t, lambda ps: torch.optim.SGD(ps, lr=2.0))
    fit(linear(5), objective, config, BilevelStep(meta_stream(batch_size=4)))
    assert len(objective.calls) == 4
    lams = [c["values"]["lam"] for c in objective.calls]
    assert not torch.equal(lams[0], lams[-1])  # it persisted and moved
    for c in objective.calls:
        x, y = TRAIN.x[c["rows"]], TRAIN.y[c["rows"]]
        xm, ym = META.x[c["meta_rows"]], META.y[c["meta_rows"]]
        ones = torch.ones(len(y), dtype=torch.float64)

        def loss_at(lam):
            return lookahead_meta_loss(c["theta"], c["lr"], x, y, ones, xm, ym, offsets=lam * t)

        numeric = central_differences(loss_at, c["values"]["lam"])
        assert c["grads"]["lam"].abs().max() > 1e-4
        torch.testing.assert_close(c["grads"]["lam"], numeric, rtol=1e-6, atol=1e-10)


def test_conditional_weights_equal_the_closed_form():
    """Specification §1.2 (J3): ``eps_i = (tau eta / n) <g_D(theta~), g_i(theta)>`` with, for a linear
    CE head, ``<g_D, g_i> = (q_i - e_{y_i})^T (G h_i + g_b)``."""
    config = OptimConfig(epochs=1, lr=0.5, batch_size=13)
    tau = 3.0
    objective = Weighted(WEIGHTS, tau=tau)
    fit(linear(6), objective, config, BilevelStep(meta_stream(batch_size=None)))
    (c,) = objective.calls
    x, y = TRAIN.x[c["rows"]], TRAIN.y[c["rows"]]
    W, b, eta, n = c["theta"]["weight"], c["theta"]["bias"], c["lr"], len(y)
    gW, gb = linear_ce_grad(W, b, x, y, WEIGHTS[y])
    Wv, bv = W - eta * gW, b - eta * gb
    G, g_b = linear_ce_grad(Wv, bv, META.x, META.y, torch.ones(len(META), dtype=torch.float64))
    q = torch.softmax(x @ W.T + b, 1) - F.one_hot(y, C).double()
    closed = tau * eta / n * (q * (x @ G.T + g_b)).sum(1)
    eps = -tau * c["grads"]["eps"]
    assert torch.equal(META.y[c["meta_rows"]], META.y)  # the whole meta set, in order
    torch.testing.assert_close(eps, closed, rtol=0, atol=1e-12)


# --- (c) special cases about the step itself -----------------------------------------------------

def bare_state(module, data=TRAIN, lr=0.5):
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    return TrainState(module, optimizer, cosine_schedule(optimizer, 1), torch.Generator(), data,
                      OptimConfig(epochs=1, lr=lr, batch_size=len(data)))


class Adjusted(MetaObjective):
    """Logits ``z + scale * adjust(meta, batch)``: a generic logit-offset meta objective."""

    def __init__(self, variables, adjust, scale=1.0):
        self.variables, self.adjust, self.scale = variables, adjust, scale

    def meta_variables(self, state, batch):
        return self.variables(batch)

    def inner_loss(self, params, state, batch, meta):
        z = call(state.module, params, batch.x)
        return StepOutput(F.cross_entropy(z + self.scale * self.adjust(meta, batch), batch.y))

    def meta_update(self, meta, grads, state):
        return gradient_step(meta, grads, 1.0)


def grads_of(objective, module=None, rows=slice(None), lr=0.5):
    state = bare_state(linear(7) if module is None else module)
    batch = TRAIN.batch(torch.arange(len(TRAIN))[rows], 0, 0)
    meta_batch = META.batch(torch.arange(len(META)), 0, 0)
    return meta_gradient(state, batch, objective, meta_batch, lr)[1]


def fresh(shape_of):
    return lambda batch: {"c": torch.zeros(shape_of(batch), dtype=torch.float64, requires_grad=True)}


def test_class_constant_adjustment_has_zero_meta_gradient():
    """M3: ``delta_i = c_i * 1`` cancels in the softmax, so its meta-gradient is 0 (up to rounding),
    for a fresh per-row constant and for a persistent network with one output broadcast over the
    classes (the released Meta-CALA code); the faithful C outputs have a gradient."""
    n_rows = lambda b: (b.rows.shape[0], 1)  # noqa: E731
    constant = grads_of(Adjusted(fresh(n_rows), lambda m, b: m["c"]))["c"]
    true_class = grads_of(Adjusted(fresh(n_rows), lambda m, b: m["c"] * F.one_hot(b.y, C)))["c"]
    assert constant.abs().max() < 1e-15 and true_class.abs().max() > 1e-3

    for outputs, zero in ((1, True), (C, False)):
        net = nn.Linear(D, outputs).double()
        torch.nn.init.normal_(net.weight, generator=torch.Generator().manual_seed(0))
        params = dict(net.named_parameters())
        g = grads_of(Adjusted(lambda b: params, lambda m, b: call(net, m, b.x)))
        size = max(v.abs().max() for v in g.values())
        assert (size < 1e-15) if zero else (size > 1e-3)


def test_zero_adjustment_scale_gives_exactly_zero_gradient_and_persistent_params_never_move():
    """M2 (``tau2 = 0``): the meta-gradient is exactly 0 and Adam leaves the network as it was."""
    net = nn.Linear(D, C).double()
    before = copy.deepcopy(net.state_dict())
    params = dict(net.named_parameters())
    adam = torch.optim.Adam(params.values(), lr=1e-2)
    seen = []

    class Network(Adjusted):
        def meta_update(self, meta, grads, state):
            seen.append(grads)
            return optimizer_update(adam, meta, grads)

    objective = Network(lambda b: params, lambda m, b: call(net, m, b.x), scale=0.0)
    fit(linear(8), objective, OptimConfig(epochs=2, lr=0.3, batch_size=5), BilevelStep(meta_stream()))
    assert len(seen) == 6 and all(bool((g == 0).all()) for gs in seen for g in gs.values())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_per_pair_coefficients_absent_rows_and_diagonal_get_exactly_zero_gradient():
    """L9: ``delta_{y,c} = lam_{y,c} T_{y,c}`` with ``delta_{y,y} = 0``: the rows ``y`` with no sample in
    the batch and the diagonal get exactly zero meta-gradient; the others do not."""
    T = torch.randn(C, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    off = 1 - torch.eye(C, dtype=torch.float64)
    lam = torch.ones(C, C, dtype=torch.float64, requires_grad=True)
    objective = Adjusted(lambda b: {"lam": lam}, lambda m, b: (m["lam"] * T * off)[b.y])
    rows = TRAIN.y < 2  # no row of class 2
    g = grads_of(objective, rows=rows)["lam"]
    assert bool((g[2] == 0).all()) and bool((g.diagonal() == 0).all())
    assert bool((g[:2] * off[:2] != 0).sum() == 4)


def test_no_virtual_step_means_no_meta_gradient_and_eps_is_linear_in_tau():
    """J4: with a zero virtual lr the meta loss does not see eps (gradient exactly 0, so eps = 0);
    eps = -tau * gradient is linear in tau."""
    objective = Weighted(WEIGHTS, tau=1.0)
    state = bare_state(linear(9))
    batch = TRAIN.batch(torch.arange(len(TRAIN)), 0, 0)
    meta_batch = META.batch(torch.arange(len(META)), 0, 0)
    _, g0, _ = meta_gradient(state, batch, objective, meta_batch, 0.0)
    assert bool((g0["eps"] == 0).all())
    meta, g, _ = meta_gradient(state, batch, objective, meta_batch, 0.5)
    assert torch.equal(gradient_step(meta, g, 2.0)["eps"], 2 * gradient_step(meta, g, 1.0)["eps"])


def test_a_row_equal_to_the_only_meta_row_gets_a_positive_weight():
    """J5: with ``m = 1`` and a small lr, ``eps_i -> (tau eta / n) ||g_i||^2 > 0`` for the duplicate."""
    module = linear(10)
    state = bare_state(module)
    i = 9
    meta_batch = TrainData(TRAIN.x[i:i + 1], TRAIN.y[i:i + 1]).batch(torch.arange(1), 0, 0)
    batch = TRAIN.batch(torch.arange(len(TRAIN)), 0, 0)
    meta, g, _ = meta_gradient(state, batch, Weighted(WEIGHTS, 1.0), meta_batch, 1e-3)
    eps = gradient_step(meta, g, 1.0)["eps"]
    with torch.no_grad():
        gi = linear_ce_grad(module.weight, module.bias, TRAIN.x[i:i + 1], TRAIN.y[i:i + 1], torch.ones(1))
    norm2 = sum(float((v ** 2).sum()) for v in gi)
    assert eps[i] > 0 and float(eps[i]) == pytest.approx(1e-3 / len(TRAIN) * norm2, rel=1e-2)


def test_fresh_weights_keep_no_state_across_batches():
    """J6: at a fixed theta, a batch's eps does not depend on the batches before it."""
    objective, state = Weighted(WEIGHTS, 1.0), bare_state(linear(11))
    meta_batch = META.batch(torch.arange(len(META)), 0, 0)
    a, b = TRAIN.batch(torch.arange(0, 6), 0, 0), TRAIN.batch(torch.arange(6, 13), 0, 1)
    first = meta_gradient(state, a, objective, meta_batch, 0.5)[1]["eps"]
    meta_gradient(state, b, objective, meta_batch, 0.5)
    again = meta_gradient(state, a, objective, meta_batch, 0.5)[1]["eps"]
    assert torch.equal(first, again)


# --- the step's options and the meta stream ------------------------------------------------------

def test_meta_term_is_the_meta_loss_at_the_virtual_parameters():
    objective = Weighted(WEIGHTS, tau=0.0)
    config = OptimConfig(epochs=1, lr=0.5, batch_size=13)
    state, _ = fit(linear(12), objective, config, BilevelStep(meta_stream(batch_size=None)))
    (c,) = objective.calls
    x, y = TRAIN.x[c["rows"]], TRAIN.y[c["rows"]]
    want = lookahead_meta_loss(c["theta"], c["lr"], x, y, WEIGHTS[y], META.x, META.y)
    assert state.history[0]["meta"] == pytest.approx(float(want), rel=1e-12)


def test_fixed_virtual_lr_every_and_warmup():
    objective = Weighted(WEIGHTS, tau=1.0)
    config = OptimConfig(epochs=3, lr=0.5, batch_size=4)  # 4 steps per epoch
    step = BilevelStep(meta_stream(), virtual_lr=0.125, every=3, warmup_epochs=1)
    fit(linear(13), objective, config, step)
    assert [c["step"] for c in objective.calls] == [4, 7, 10]  # meta-stage steps 0, 3, 6 of 8
    # the look-ahead lr is the fixed one, not the schedule's (which it checks through the gradient)
    c = objective.calls[1]
    x, y = TRAIN.x[c["rows"]], TRAIN.y[c["rows"]]
    xm, ym = META.x[c["meta_rows"]], META.y[c["meta_rows"]]
    numeric = central_differences(
        lambda e: lookahead_meta_loss(c["theta"], 0.125, x, y, WEIGHTS[y] + e, xm, ym), torch.zeros(len(y)).double())
    torch.testing.assert_close(c["grads"]["eps"], numeric, rtol=1e-6, atol=1e-10)


def test_meta_batches_cycle_balance_and_restart_with_each_fit():
    stream = meta_stream(seed=3, batch_size=4, balanced=False)
    rows = torch.cat([stream.next(0, k).rows for k in range(2)])
    assert sorted(rows.tolist()) == sorted(set(rows.tolist()))  # one shuffle: no repeats within it
    whole = MetaBatches(META, batch_size=100)
    assert torch.equal(whole.next(0, 0).rows, torch.arange(len(META)))

    skewed = toy((20, 3, 1), 2)
    balanced = MetaBatches(skewed, 12, sampler=ClassBalancedSampler(skewed.y, C), seed=0)
    counts = torch.bincount(torch.cat([skewed.y[balanced.next(0, k).rows] for k in range(40)]), minlength=C)
    assert counts.min() > 100 and counts.max() < 220  # 160 each in expectation, vs 20:3:1 in the set

    objective = Weighted(WEIGHTS, tau=20.0)
    step = BilevelStep(meta_stream(batch_size=2))
    config = OptimConfig(epochs=2, lr=0.3, batch_size=5)
    one, _ = fit(linear(14), objective, config, step)
    first = [c["meta_rows"] for c in objective.calls]
    objective.calls.clear()
    two, _ = fit(linear(14), objective, config, step)  # the same step object: re-seeded
    assert all(torch.equal(a, c["meta_rows"]) for a, c in zip(first, objective.calls))
    assert all(torch.equal(p, q) for p, q in zip(one.module.parameters(), two.module.parameters()))


def test_bad_options_are_one_line_errors():
    for kwargs in ({"every": 0}, {"every": 1.5}, {"warmup_epochs": -1}, {"virtual_lr": math.nan}):
        with pytest.raises(LongtailError, match="bi-level step"):
            BilevelStep(meta_stream(), **kwargs)
    with pytest.raises(LongtailError, match="meta set is empty"):
        MetaBatches(TrainData(META.x[:0], META.y[:0]))
    with pytest.raises(LongtailError, match="meta batch size"):
        MetaBatches(META, 0)
