"""The one training loop: hook order and what each hook sees, sampling over strata, history means,
the non-finite error, frozen and no-decay parameters, the optimiser table, the schedule, the end
state and determinism."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from longtail.stages.errors import LongtailError
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import OPTIMIZERS, OptimConfig, fit_module
from longtail.stages.train.objective import LossObjective, Objective, StepOutput
from longtail.stages.train.samplers import ClassBalancedSampler, InstanceSampler

N, D, C = 10, 4, 3


def data(n=N, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    return TrainData(torch.randn(n, D, generator=g), torch.arange(n) % C, **kwargs)


def head(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(D, C)


def gen(seed=7):
    return torch.Generator().manual_seed(seed)


class Log(Objective):
    """Records every hook call and what the loss sees; the loss is CE plus a term."""

    def __init__(self):
        self.events, self.batches = [], []

    def on_fit_start(self, state):
        self.events.append(("fit_start", state.module.training))

    def on_epoch_start(self, state):
        self.events.append(("epoch_start", state.epoch))

    def loss(self, module, batch, state):
        self.events.append(("loss", batch.epoch, batch.step))
        self.batches.append({"rows": batch.rows.clone(), "x": batch.x.clone(), "y": batch.y.clone(),
                             "extras": {k: v.clone() for k, v in batch.extras.items()},
                             "step": state.step, "lr": state.lr, "training": module.training})
        z = module(batch.x)
        return StepOutput(F.cross_entropy(z, batch.y), logits=z, terms={"rows": batch.rows.double().mean()})

    def on_batch_end(self, state, batch, out):
        self.events.append(("batch_end", batch.epoch, batch.step))

    def on_epoch_end(self, state, means):
        self.events.append(("epoch_end", state.epoch, dict(means)))


def test_hooks_run_in_order_and_batches_carry_their_rows_labels_and_extras():
    tags = torch.arange(N) * 10
    train = data(extras={"tag": tags, "pair": torch.stack([tags, -tags], 1)})
    objective = Log()
    config = OptimConfig(epochs=2, lr=0.1, batch_size=4)  # batches of 4, 4, 2
    module = head().eval()
    state = fit_module(module, train, objective, config, generator=gen())

    names = [e[0] for e in objective.events]
    per_epoch = ["epoch_start"] + ["loss", "batch_end"] * 3 + ["epoch_end"]
    assert names == ["fit_start"] + per_epoch * 2
    assert objective.events[0] == ("fit_start", False)  # before module.train()
    steps = [(e[1], e[2]) for e in objective.events if e[0] == "batch_end"]
    assert steps == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)] and state.step == 6

    replay = gen()
    orders = [InstanceSampler().epoch_order(N, replay) for _ in range(2)]
    expected_rows = [o[s:s + 4] for o in orders for s in (0, 4, 8)]
    for b, rows in zip(objective.batches, expected_rows):
        assert torch.equal(b["rows"], rows)
        assert torch.equal(b["x"], train.x[rows]) and torch.equal(b["y"], train.y[rows])
        assert torch.equal(b["extras"]["tag"], tags[rows])
        assert torch.equal(b["extras"]["pair"], torch.stack([tags, -tags], 1)[rows])
        assert b["training"]
    assert [b["step"] for b in objective.batches] == list(range(6))

    # the epoch's means: every term weighted by batch size, over the rows the epoch saw
    for epoch, (_, _, means) in enumerate(e for e in objective.events if e[0] == "epoch_end"):
        rows = orders[epoch].double()
        assert means["rows"] == pytest.approx(float(rows.mean()), rel=1e-12)
        assert state.history[epoch] == means
    assert set(state.history[0]) == {"loss", "rows"}


def test_history_loss_is_the_batch_size_weighted_mean():
    values = {}

    class Known(Objective):
        def loss(self, module, batch, state):
            v = float(batch.step + 1)
            values.setdefault(batch.epoch, []).append((v, batch.rows.numel()))
            return StepOutput(module(batch.x).sum() * 0 + v)

    state = fit_module(head(), data(), Known(), OptimConfig(epochs=2, lr=0.1, batch_size=4), generator=gen())
    for epoch, pairs in values.items():
        assert state.history[epoch]["loss"] == sum(v * n for v, n in pairs) / N
    assert state.history[0]["loss"] == (1 * 4 + 2 * 4 + 3 * 2) / 10


def test_class_balanced_sampling_balances_strata_and_leaves_labels_alone():
    # labels 0/1, strata 0/1/2 of sizes 40, 15, 5 that cut across them
    n = 60
    strata = torch.cat([torch.zeros(40), torch.ones(15), torch.full((5,), 2)]).long()
    y = torch.arange(n) % 2
    train = TrainData(torch.randn(n, D, generator=gen(1)), y, strata=strata)
    seen_y, seen_strata = [], []

    class Check(Objective):
        def loss(self, module, batch, state):
            assert torch.equal(batch.y, y[batch.rows])  # labels reach the loss unchanged
            seen_y.append(batch.y)
            seen_strata.append(strata[batch.rows])
            return StepOutput(F.cross_entropy(module(batch.x), batch.y))

    sampler = ClassBalancedSampler(train.balance, 3)
    fit_module(head(), train, Check(), OptimConfig(epochs=20, lr=0.1, batch_size=16),
               generator=gen(), sampler=sampler)
    counts = torch.bincount(torch.cat(seen_strata), minlength=3)
    assert int(counts.sum()) == 20 * n
    assert all(abs(int(c) - 400) < 60 for c in counts)  # 400 each in expectation; 40:15:5 in the data
    assert set(torch.cat(seen_y).tolist()) == {0, 1}


def test_a_class_without_rows_is_an_error():
    with pytest.raises(LongtailError, match=r"class\(es\) \[1\]"):
        ClassBalancedSampler(torch.tensor([0, 0, 2]), 3)


def test_extras_must_have_one_row_per_sample():
    with pytest.raises(ValueError, match="tag has 3 rows, x has 10"):
        data(extras={"tag": torch.zeros(3)})


def test_non_finite_loss_names_the_fit_the_epoch_and_the_lr_parameter():
    class Blows(Objective):
        def loss(self, module, batch, state):
            z = module(batch.x)
            bad = math.inf if batch.epoch == 1 else 0.0
            return StepOutput(F.cross_entropy(z, batch.y) + bad, terms={"part": z.sum() * 0 + 1})

    config = OptimConfig(epochs=3, lr=0.25, batch_size=4, lr_name="flow_lr")
    with pytest.raises(LongtailError) as err:
        fit_module(head(), data(), Blows(), config, generator=gen(), desc="dlsa filter 2")
    message = str(err.value)
    assert message.startswith("dlsa filter 2: the training loss became inf at epoch 2")
    assert "lower flow_lr (now 0.25)" in message and "(loss inf, part 1)" in message and "\n" not in message


class Two(nn.Module):
    no_decay = ("bias", "scales")

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(D, C)
        self.second = nn.Linear(C, C)
        self.scales = nn.Parameter(torch.ones(C))

    def forward(self, x):
        return self.second(self.first(x)) * self.scales


def test_params_freezes_the_others():
    torch.manual_seed(0)
    module = Two()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = fit_module(module, data(), LossObjective(F.cross_entropy), OptimConfig(epochs=2, lr=0.1, batch_size=4),
                       generator=gen(), params=module.first.named_parameters())
    after = module.state_dict()
    assert not torch.equal(after["first.weight"], before["first.weight"])
    assert not torch.equal(after["first.bias"], before["first.bias"])
    for k in ("second.weight", "second.bias", "scales"):
        assert torch.equal(after[k], before[k]), k
    optimised = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(module.first.weight), id(module.first.bias)}


def test_no_decay_parameters_get_no_weight_decay():
    torch.manual_seed(0)
    module = Two()
    before = {k: v.clone() for k, v in module.state_dict().items()}

    class Zero(Objective):  # zero gradient: only weight decay moves a parameter
        def loss(self, module, batch, state):
            return StepOutput(module(batch.x).sum() * 0)

    state = fit_module(module, data(), Zero(), OptimConfig(epochs=2, lr=0.1, batch_size=4, weight_decay=0.5),
                       generator=gen())
    after = module.state_dict()
    for k in ("first.bias", "second.bias", "scales"):  # last name part or full name in no_decay
        assert torch.equal(after[k], before[k]), k
    for k in ("first.weight", "second.weight"):
        ratio = after[k] / before[k]
        assert bool((ratio < 1).all()) and torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))
    decays = sorted(g["weight_decay"] for g in state.optimizer.param_groups)
    assert decays == [0.0, 0.5]


def test_optimizer_table():
    p = nn.Parameter(torch.zeros(2))
    config = OptimConfig(epochs=1, lr=0.3, batch_size=1, momentum=0.7)
    sgd = OPTIMIZERS["sgd"]([{"params": [p]}], config)
    adam = OPTIMIZERS["adam"]([{"params": [p]}], config)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.7 and sgd.defaults["lr"] == 0.3
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 0.3
    lbfgs = OPTIMIZERS["lbfgs"]([{"params": [p]}, {"params": [q := nn.Parameter(torch.zeros(1))]}],
                                OptimConfig(epochs=1, lr=1.0, batch_size=1, optimizer="lbfgs", max_iter=7))
    assert isinstance(lbfgs, torch.optim.LBFGS) and lbfgs.defaults["max_iter"] == 7
    assert lbfgs.defaults["line_search_fn"] == "strong_wolfe" and lbfgs.defaults["max_eval"] == 14
    assert lbfgs.param_groups[0]["params"] == [p, q]  # one group: L-BFGS takes no per-group options
    assert set(OPTIMIZERS) == {"sgd", "adam", "lbfgs"}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_first_step_of_each_optimizer(optimizer):
    """One step of a loss with constant gradient ``c``: SGD moves by ``-lr c``, Adam by about
    ``-lr sign(c)``."""
    module = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(module.weight)
    c = torch.tensor([[2.0, -0.5]])

    class Constant(Objective):
        def loss(self, module, batch, state):
            return StepOutput((module.weight * c).sum() + module(batch.x).sum() * 0)

    train = TrainData(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long))
    fit_module(module, train, Constant(), OptimConfig(epochs=1, lr=0.1, batch_size=1, optimizer=optimizer),
               generator=gen())
    want = -0.1 * c if optimizer == "sgd" else -0.1 * c.sign()
    torch.testing.assert_close(module.weight.detach(), want, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_per_step():
    objective = Log()
    fit_module(head(), data(), objective, OptimConfig(epochs=2, lr=0.4, batch_size=4), generator=gen())
    lrs = [b["lr"] for b in objective.batches]
    assert lrs == pytest.approx([0.4 * 0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)], rel=1e-12)


def test_module_ends_in_eval_mode_with_frozen_parameters():
    module = head()
    fit_module(module, data(), LossObjective(F.cross_entropy), OptimConfig(epochs=1, lr=0.1, batch_size=4),
               generator=gen())
    assert not module.training and not any(p.requires_grad for p in module.parameters())


def test_a_seeded_generator_gives_identical_results_twice():
    def run(seed):
        module = head()
        state = fit_module(module, data(), LossObjective(F.cross_entropy), OptimConfig(epochs=3, lr=0.5, batch_size=3),
                           generator=gen(seed), sampler=ClassBalancedSampler(data().y, C))
        return module, state

    (a, sa), (b, sb), (c, _) = run(7), run(7), run(8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert sa.history == sb.history
    assert not torch.equal(a.weight, c.weight)


def test_loss_objective_passes_stats_and_per_epoch_stats():
    seen = []

    def fn(z, y, scale, weight=None):
        seen.append((scale, weight))
        return F.cross_entropy(z, y) * scale

    objective = LossObjective(fn, epoch_stats=lambda e: {"weight": "late" if e >= 1 else None}, scale=2.0)
    fit_module(head(), data(), objective, OptimConfig(epochs=2, lr=0.1, batch_size=5), generator=gen())
    assert seen == [(2.0, None)] * 2 + [(2.0, "late")] * 2
