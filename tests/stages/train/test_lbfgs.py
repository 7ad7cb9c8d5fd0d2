"""The full-batch L-BFGS solver: it reaches scikit-learn's optimum of the same regularised problem,
class-balanced sampling becomes its expectation, its stopping rule and hooks; and the rule of which
head trains by which solver."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from longtail.stages.errors import LongtailError
from longtail.stages.modules import LinearClassifier, ScaledClassifier
from longtail.stages.registry import METHODS, make_method
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import fit_module
from longtail.stages.train.objective import LossObjective, Objective, StepOutput
from longtail.stages.train.samplers import ClassBalancedSampler
from longtail.stages.train.state import OptimConfig

COUNTS = (40, 15, 5)
C, D = 3, 4


def tiny(seed=0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), COUNTS)
    x = rng.normal(size=(len(y), D)) + np.eye(C, D)[y] * 1.5
    return x.astype(np.float32), y


def lbfgs(wd, **kw):
    return OptimConfig(epochs=1, lr=1.0, batch_size=8, weight_decay=wd, optimizer="lbfgs", max_iter=500, **kw)


def solve(x, y, wd, sampler=None):
    module = LinearClassifier(D, C, bias=False)
    module.reset_parameters(torch.Generator().manual_seed(0))
    data = TrainData(torch.tensor(x), torch.tensor(y))
    state = fit_module(module, data, LossObjective(F.cross_entropy), lbfgs(wd), generator=torch.Generator(),
                       sampler=sampler)
    return module.weight.detach().numpy().astype(np.float64), state


@pytest.mark.parametrize("balanced", [False, True])
def test_lbfgs_reaches_the_scikit_learn_optimum_of_the_same_regularised_problem(balanced):
    """sklearn minimises ``C sum_i s_i l_i + ||W||^2 / 2``; ours ``mean_i l_i + wd/2 ||W||^2``, the same
    problem for ``wd = 1 / (C N)``. Class-balanced sampling's expectation is the mean over classes of
    each class's mean loss: sklearn with sample weights ``N / (K n_y)``."""
    x, y = tiny()
    n, c_reg = len(y), 0.5
    weights = (n / (C * np.asarray(COUNTS, dtype=np.float64)))[y] if balanced else None
    ref = LogisticRegression(C=c_reg, fit_intercept=False, tol=1e-10, max_iter=10_000)
    ref.fit(x.astype(np.float64), y, sample_weight=weights)
    sampler = ClassBalancedSampler(torch.tensor(y), C) if balanced else None
    w, state = solve(x, y, 1.0 / (c_reg * n), sampler)
    np.testing.assert_allclose(w, ref.coef_, atol=2e-4)
    assert state.solver["stopped"] in ("tol_grad", "tol_change")
    assert state.solver["grad_max"] < 1e-4
    assert 0 < state.solver["iterations"] < 500


def test_the_iteration_cap_stops_the_solver_and_is_reported():
    x, y = tiny()
    module = LinearClassifier(D, C)
    module.reset_parameters(torch.Generator().manual_seed(0))
    state = fit_module(module, TrainData(torch.tensor(x), torch.tensor(y)), LossObjective(F.cross_entropy),
                       OptimConfig(epochs=1, lr=1.0, batch_size=8, optimizer="lbfgs", max_iter=2),
                       generator=torch.Generator())
    assert state.solver["iterations"] == 2 and state.solver["stopped"] == "max_iter"
    assert not any(p.requires_grad for p in module.parameters()) and not module.training


def test_a_no_decay_parameter_is_held_to_its_start_not_to_zero():
    """LWS's scales: separable data would send them to infinity; the anchor keeps them finite and
    near 1, and a frozen part stays exactly as it was."""
    x, y = tiny()
    x = (x + np.eye(C, D)[y] * 20).astype(np.float32)  # separable
    module = ScaledClassifier(D, C)
    module.reset_parameters(torch.Generator().manual_seed(0))
    before = module.linear.weight.detach().clone()
    fit_module(module, TrainData(torch.tensor(x), torch.tensor(y)), LossObjective(F.cross_entropy), lbfgs(0.1),
               generator=torch.Generator(), params=[("scales", module.scales)])
    s = module.scales.detach().clone().requires_grad_(True)
    assert torch.isfinite(s).all()
    assert torch.equal(module.linear.weight, before)
    # stationarity of CE(s) + 0.1/2 ||s - 1||^2: the loss gradient balances a pull to 1, not to 0
    with torch.no_grad():
        z = module.linear(torch.tensor(x))
    F.cross_entropy(z * s, torch.tensor(y)).backward()
    np.testing.assert_allclose(s.grad.numpy(), (-0.1 * (s - 1)).detach().numpy(), atol=2e-4)
    assert not torch.allclose(s, torch.ones(C), atol=1e-2)  # and the data did move them


def test_full_batch_hooks_see_one_epoch_and_every_row_once_at_the_solution():
    x, y = tiny()

    class Log(Objective):
        def __init__(self):
            self.events, self.rows = [], []

        def on_fit_start(self, state):
            self.events.append("fit_start")

        def on_epoch_start(self, state):
            self.events.append(("epoch_start", state.epoch))

        def loss(self, module, batch, state):
            z = module(batch.x)
            return StepOutput(F.cross_entropy(z, batch.y), logits=z, terms={"two": torch.tensor(2.0)})

        def on_batch_end(self, state, batch, out):
            self.events.append("batch_end")
            self.rows.append(batch.rows)

        def on_epoch_end(self, state, means):
            self.events.append(("epoch_end", dict(means)))

    log = Log()
    module = LinearClassifier(D, C)
    module.reset_parameters(torch.Generator().manual_seed(0))
    state = fit_module(module, TrainData(torch.tensor(x), torch.tensor(y)), log, lbfgs(1e-2),
                       generator=torch.Generator(), sampler=ClassBalancedSampler(torch.tensor(y), C))
    assert log.events[:2] == ["fit_start", ("epoch_start", 0)]
    assert log.events[2:5] == ["batch_end"] * C  # one group per class, at the solution
    assert torch.equal(torch.sort(torch.cat(log.rows)).values, torch.arange(len(y)))
    (_, means), = log.events[5:]
    assert means["two"] == pytest.approx(2.0)  # terms: weighted by 1 / K, summing to the term
    with torch.no_grad():
        z = module(torch.tensor(x))
        by_hand = np.mean([F.cross_entropy(z[torch.tensor(y) == k], torch.tensor(y[y == k])).item() for k in range(C)])
    assert means["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert state.history == [means]


def test_instance_sampling_solves_on_the_data_itself_not_a_gathered_copy():
    """The full-batch batch of instance sampling is the data's own tensors (one copy of the features
    in a fit, not two) with every row in order; class-balanced groups gather their rows."""
    x, y = tiny()
    data = TrainData(torch.tensor(x), torch.tensor(y))
    seen = []

    class Record(LossObjective):
        def loss(self, module, batch, state):
            seen.append(batch)
            return super().loss(module, batch, state)

    module = LinearClassifier(D, C)
    module.reset_parameters(torch.Generator().manual_seed(0))
    fit_module(module, data, Record(F.cross_entropy), lbfgs(1e-2), generator=torch.Generator())
    assert all(b.x is data.x and b.y is data.y for b in seen)
    assert torch.equal(seen[0].rows, torch.arange(len(y)))
    whole, gathered = data.whole(2, 5), data.batch(torch.arange(len(y)), 2, 5)
    assert torch.equal(whole.x, gathered.x) and torch.equal(whole.y, gathered.y)
    assert (whole.epoch, whole.step) == (2, 5)


def test_a_non_finite_loss_is_a_user_error_naming_the_fit():
    x, y = tiny()

    class Blows(Objective):
        def loss(self, module, batch, state):
            return StepOutput(module(batch.x).sum() * float("nan"))

    module = LinearClassifier(D, C)
    with pytest.raises(LongtailError, match="my head: .*L-BFGS.*weight_decay"):
        fit_module(module, TrainData(torch.tensor(x), torch.tensor(y)), Blows(), lbfgs(1e-3),
                   generator=torch.Generator(), desc="my head")


# ---------------------------------------------------------------------- the rule
#: which solver each registered head uses at its defaults, and why (README "Methods")
RULE = {
    # convex: a smooth loss of a linear module's parameters, full batch to convergence
    "ce": "lbfgs", "balanced-softmax": "lbfgs", "logit-adjust": "lbfgs", "cb-ce": "lbfgs", "crt": "lbfgs",
    "tau-norm": "lbfgs", "lws": "lbfgs",
    # smooth full-batch objectives of a linear module, not convex in general: L-BFGS too
    "focal": "lbfgs", "lade": "lbfgs",
    # normalised modules and epoch schedules / per-batch randomness: minibatch SGD
    "cosine": "sgd", "ldam-drw": "sgd", "heuristic-cala": "sgd", "cala-no-u": "sgd", "cala-no-v": "sgd",
    "dynamic-la": "sgd",
    # the bi-level look-ahead step is a minibatch step
    "meta-cb": "sgd", "metalad": "sgd", "meta-cala": "sgd",
}


def test_which_heads_use_which_solver():
    from longtail.stages.heads import TrainedHead

    heads = {name for name, cls in METHODS.items() if issubclass(cls, TrainedHead)}
    assert heads <= set(RULE), heads - set(RULE)
    for name in heads:
        head = make_method(name, {})
        assert head.solver == "auto"
        config = head.optim_config()
        assert config.optimizer == RULE[name], name
        assert config.full_batch == (RULE[name] == "lbfgs")
        # every head that takes the parameter can still be asked for the minibatch path
        if "solver" in head.get_params():
            assert make_method(name, {"solver": "sgd"}).optim_config().optimizer == "sgd"
    # a composite gets the solver through the head protocol
    assert make_method("dlsa+ce", {}).base.optim_config().optimizer == "lbfgs"
    assert make_method("dlsa+cosine", {}).base.optim_config().optimizer == "sgd"


def test_sgd_heads_get_a_step_budget_that_scales_with_the_data():
    config = make_method("cosine", {}).optim_config()
    assert config.total_epochs(353) == 2500  # 2 steps of 256 rows per epoch: 5,000 steps
    assert config.total_epochs(10_000) == 125  # 40 steps per epoch
    assert config.total_epochs(1_000_000) == 30  # never fewer than the epochs asked for
    assert make_method("ce", {"solver": "sgd"}).optim_config().total_epochs(353) == 30  # the old path


def test_ldam_drw_rejects_lbfgs_and_a_bad_solver_is_a_user_error():
    from longtail.stages.data import FeatureSet

    x, y = tiny()
    train = FeatureSet(x, y, np.array(COUNTS), tuple("abc"), name="train")
    with pytest.raises(LongtailError, match="'ldam-drw'.*solver = 'lbfgs'"):
        make_method("ldam-drw", {"solver": "lbfgs"}).fit(train)
    with pytest.raises(LongtailError, match="'ce'.*solver = 'adam'"):
        make_method("ce", {"solver": "adam"}).fit(train)
    with pytest.raises(LongtailError, match="max_iter"):
        make_method("ce", {"max_iter": 0}).fit(train)
