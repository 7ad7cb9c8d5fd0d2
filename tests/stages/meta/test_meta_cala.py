"""Meta-CALA (paper 000, Algorithm A-2; specification §2): the special cases M1-M4 of §2.8, the
closed-form meta-gradient of §2.4 against autograd in float64, the diagnostics and bad input."""

import numpy as np
import pytest
import torch

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.losses import log_prior
from longtail.stages.losses.cala import cala_loss
from longtail.stages.meta.cala import INERT_THRESHOLD, AdjustmentNetwork, MetaCALAObjective, kmeans_groups
from longtail.stages.meta.metaset import build_meta_set
from longtail.stages.modules import LinearClassifier
from longtail.stages.registry import make_method
from longtail.stages.train.bilevel import call, meta_gradient
from longtail.stages.train.data import TrainData
from longtail.stages.train.engine import OptimConfig, TrainState, cosine_schedule

TAU1, TAU2, ETA = 1.5, 1.0, 0.7


def toy_state(num_classes=1, seed=0, n=40, d=5, c=4, k=3):
    """A float64 linear head on random data with an (N, K) neighbour table, its TrainState, a
    Meta-CALA objective whose network has ``num_classes`` outputs (1: a class-constant adjustment)
    and a random (non-zero) output layer, a train batch and a meta batch."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.arange(n) % c
    nb = torch.stack([(i + 1 + torch.randperm(n - 1, generator=g)[:k]) % n for i in range(n)])
    module = LinearClassifier(d, c).double()
    module.reset_parameters(g)
    with torch.no_grad():
        module.weight.mul_(3.0)
        module.bias.normal_(generator=g)
    data = TrainData(x, y)
    optimizer = torch.optim.SGD(module.parameters(), lr=ETA)
    state = TrainState(module, optimizer, cosine_schedule(optimizer, 10), g, data,
                       OptimConfig(epochs=1, lr=ETA, batch_size=16))
    net = AdjustmentNetwork(num_classes, hidden=8).double()
    net.reset_parameters(g)
    with torch.no_grad():
        net.out.weight.normal_(generator=g)
        net.out.bias.normal_(generator=g)
    counts = torch.tensor([8.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    objective = MetaCALAObjective(net, nb, counts, tau1=TAU1, tau2=TAU2, meta_lr=1e-3)
    objective.on_fit_start(state)
    batch = data.batch(torch.arange(0, 16), 0, 0)
    xm = torch.randn(12, d, generator=g, dtype=torch.float64)
    meta_batch = TrainData(xm, torch.arange(12) % c).batch(torch.arange(12), 0, 0)
    return state, objective, batch, meta_batch, counts


def closed_form_delta_gradient(state, batch, meta_batch, adjustment):
    """Specification §2.4 for a linear head: ``∂L_m/∂δ_i = −(η τ2/n)(diag(p̃_i) − p̃_i p̃_iᵀ) r_i``,
    ``r_i = G h_i + g_b`` with ``(G, g_b)`` the gradient of the meta CE at the virtual step."""
    w, b = state.module.weight.detach(), state.module.bias.detach()
    h, y = batch.x, batch.y
    n, c = h.shape[0], w.shape[0]
    p = torch.softmax(h @ w.T + b + adjustment, dim=1)  # p̃ of the adjusted training logits
    e = torch.nn.functional.one_hot(y, c).double()
    w_hat = w - ETA * (p - e).T @ h / n
    b_hat = b - ETA * (p - e).mean(0)
    hm, ym = meta_batch.x, meta_batch.y
    q = torch.softmax(hm @ w_hat.T + b_hat, dim=1)
    em = torch.nn.functional.one_hot(ym, c).double()
    big_g = (q - em).T @ hm / hm.shape[0]
    g_b = (q - em).mean(0)
    r = h @ big_g.T + g_b  # (n, C)
    jac_r = p * r - p * (p * r).sum(1, keepdim=True)  # (diag(p) − p pᵀ) r, row by row
    return -(ETA * TAU2 / n) * jac_r


def test_closed_form_meta_gradient_equals_autograd_float64():
    state, objective, batch, meta_batch, counts = toy_state(num_classes=4)
    meta, grads, _ = meta_gradient(state, batch, objective, meta_batch, ETA)
    zeta = objective.characteristics(state, batch)
    delta = objective.network(zeta)  # graph to Ω
    u = TAU1 * log_prior(counts, delta.detach())
    adjustment = (u + TAU2 * delta).detach()
    oracle = closed_form_delta_gradient(state, batch, meta_batch, adjustment)
    # 1) at the level of δ: autograd through the look-ahead with δ as a leaf
    leaf = delta.detach().clone().requires_grad_(True)
    params = dict(state.module.named_parameters())
    inner = cala_loss(call(state.module, params, batch.x), batch.y, u + TAU2 * leaf)
    gw = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    virtual = {k: v - ETA * gr for (k, v), gr in zip(params.items(), gw)}
    outer = torch.nn.functional.cross_entropy(call(state.module, virtual, meta_batch.x), meta_batch.y)
    (auto,) = torch.autograd.grad(outer, [leaf])
    assert float(oracle.abs().max()) > 1e-4  # a non-trivial case
    torch.testing.assert_close(auto, oracle, rtol=0, atol=1e-14)
    # 2) at the level of Ω: ∇_Ω L_m = Σ_i (∂δ_i/∂Ω)ᵀ ∂L_m/∂δ_i, against the objective's meta-gradient
    vjp = torch.autograd.grad(delta, list(meta.values()), grad_outputs=oracle)
    for (key, got), want in zip(grads.items(), vjp):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13, msg=key)
    # the closed form is orthogonal to 1 (a class-constant shift of δ cancels in the softmax)
    torch.testing.assert_close(oracle.sum(1), torch.zeros(oracle.shape[0], dtype=torch.float64), rtol=0, atol=1e-16)


def test_class_constant_adjustment_has_zero_meta_gradient():
    # M3: one output broadcast over the C logits (the released code's (n, 1) network) changes no
    # softmax, so the look-ahead does not depend on Ω: every meta-gradient is 0
    state, objective, batch, meta_batch, _ = toy_state(num_classes=1)
    _, grads, _ = meta_gradient(state, batch, objective, meta_batch, ETA)
    assert max(float(g.abs().max()) for g in grads.values()) < 1e-15
    # the C-dimensional network (Meta-CALA's) has a non-zero one on the same data
    state, objective, batch, meta_batch, _ = toy_state(num_classes=4)
    _, grads, _ = meta_gradient(state, batch, objective, meta_batch, ETA)
    assert call(objective.network, dict(objective.network.named_parameters()),
                objective.characteristics(state, batch)).shape == (16, 4)
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-6


def test_tau2_zero_gives_exactly_zero_meta_gradient():
    # M2: tau2 = 0 removes δ from the training loss: Ω never moves
    state, objective, batch, meta_batch, _ = toy_state(num_classes=4)
    objective.tau2 = 0.0
    _, grads, _ = meta_gradient(state, batch, objective, meta_batch, ETA)
    assert all(bool((g == 0).all()) for g in grads.values())


def test_zero_output_layer_starts_as_logit_adjustment():
    # the initial network outputs exactly 0 (last layer zero), so the first loss is LA with tau1
    net = AdjustmentNetwork(3, hidden=5)
    net.reset_parameters(torch.Generator().manual_seed(1))
    zeta = torch.randn(7, 42, generator=torch.Generator().manual_seed(2))
    assert bool((net(zeta) == 0).all())
    assert float(net.hidden[0].weight.detach().abs().max()) > 0  # the other layers are not zero
    # one row (a last batch of one): batch normalisation gives the shift, not an error
    assert torch.isfinite(net(zeta[:1])).all()


# ---------------------------------------------------------------------- the head
C, D = 4, 6
NAMES = ("a", "b", "c", "d")
COUNTS = (60, 30, 12, 6)


def split(counts, seed, name, attributes=False):
    means = np.random.default_rng(0).normal(size=(C, D)) * 2
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), counts)
    x = (rng.normal(size=(len(y), D)) + means[y]).astype(np.float32)
    attrs = (np.arange(len(y)) % 2).astype(np.int64) if attributes else None
    return FeatureSet(x, y, np.array(COUNTS), NAMES, attributes=attrs, name=name)


TRAIN = split(COUNTS, 0, "train")
VAL = split((8, 8, 8, 8), 1, "val")
TEST_X = split((25, 25, 25, 25), 2, "test").features
#: explicit minibatch SGD settings (after the merge of the heads' `solver` parameter, whose default
#: becomes full-batch L-BFGS, both methods of the parity test must also get `solver: sgd`)
SGD = {"epochs": 5, "lr": 0.1, "batch_size": 16, "min_steps": 0, "seed": 3, "device": "cpu"}


def test_meta_lr_zero_gives_the_logits_of_logit_adjust_with_tau1():
    # M1: δ ≡ 0 (zero last layer, never moved), no MixUp, meta batches from their own generator and
    # characteristics that draw nothing: the fit is logit-adjust with tau = tau1, bit for bit
    meta = make_method("meta-cala", {**SGD, "meta_lr": 0.0, "k": 5, "tau1": 1.25}).fit(TRAIN, VAL)
    # (once the heads get a `solver` parameter, logit-adjust's default is full-batch L-BFGS: ask for SGD)
    la = make_method("logit-adjust", {**SGD, "solver": "sgd", "tau": 1.25}).fit(TRAIN, VAL)
    np.testing.assert_array_equal(meta.logits(TEST_X), la.logits(TEST_X))
    np.testing.assert_allclose(meta.logit_prior(), la.logit_prior(), rtol=1e-12)
    # its diagnostics say that the meta step did nothing
    diag = meta.diagnostics(TRAIN)["meta"]
    assert diag["barely_moved"] and diag["network_shift"] == 0.0 and diag["delta_mean_abs"] == [0.0] * 5
    assert diag["meta_start_epoch"] == 0 and diag["meta_rows"] == 31  # KMeans groups of 8 val rows per class
    assert len(diag["meta_loss"]) == 5 and all(v > 0 for v in diag["meta_loss"])
    # the paper's meta_lr moves the adjustment, the logits and the flag
    moved = make_method("meta-cala", {**SGD, "k": 5, "tau1": 1.25}).fit(TRAIN, VAL)
    diag = moved.diagnostics(TRAIN)["meta"]
    assert not diag["barely_moved"] and diag["network_shift"] > 0 and max(diag["delta_mean_abs"]) > INERT_THRESHOLD
    assert not np.array_equal(moved.logits(TEST_X), la.logits(TEST_X))
    # the diagnostics survive the state dict (the pipeline evaluates a reloaded method)
    again = make_method("meta-cala", moved.get_params()).load_state_dict(moved.state_dict())
    assert again.diagnostics(TRAIN) == moved.diagnostics(TRAIN)


def test_meta_set_is_balanced_by_class_and_group():
    # attributes (auto): per_group rows of every (class, attribute); without them KMeans groups
    val = split((8, 8, 8, 8), 1, "val", attributes=True)
    head = make_method("meta-cala", {**SGD, "k": 5, "per_group": 3})
    groups = head._groups(val)
    np.testing.assert_array_equal(groups, val.attributes)
    rows = build_meta_set(val, source="val", per_group=3, seed=0, groups=groups).rows
    pairs = np.stack([val.labels[rows], val.attributes[rows]], 1)
    _, n = np.unique(pairs, axis=0, return_counts=True)
    assert len(n) == C * 2 and (n == 3).all()
    # KMeans inside each class: two well-separated blobs per class are found, deterministically
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(2), 10)
    blob = np.tile(np.repeat([0.0, 50.0], 5), 2)
    x = (rng.normal(size=(20, 3)) + blob[:, None]).astype(np.float32)
    pool = FeatureSet(x, y, np.array([10, 10]), ("a", "b"), name="val")
    g = kmeans_groups(pool, 2, seed=0)
    for c in range(2):
        part = g[y == c]
        assert len(set(part[:5])) == 1 and len(set(part[5:])) == 1 and part[0] != part[5]
    np.testing.assert_array_equal(kmeans_groups(pool, 2, seed=0), g)
    # fewer rows than groups: one group per row
    assert len(set(kmeans_groups(pool, 50, seed=0)[y == 0])) == 10


def test_bad_input_is_one_line_error_before_any_fit():
    def fails(params, train=TRAIN, val=VAL, match=None):
        method = make_method("meta-cala", {**SGD, "k": 5, **params})
        with pytest.raises(LongtailError, match=match) as info:
            method.fit(train, val)
        assert "\n" not in str(info.value) and not method.is_fitted()

    fails({}, val=None, match="no val split")
    no_d = split((8, 8, 8, 0), 1, "val")
    fails({}, val=no_d, match="class 'd' has no row, so its meta set would be empty")
    fails({"meta_groups": "attribute"}, match="meta_groups is attribute but the val split has no attributes")
    fails({"meta_lr": -1.0}, match="meta_lr")
    fails({"meta_groups": "cluster"}, match="meta_groups")
    fails({"per_group": 0}, match="per_group")
    fails({"k": 500}, match="k = 500 must be smaller")


def test_a_meta_step_size_that_diverges_names_meta_lr():
    # Adam at meta_lr = 1 moves every weight of the network by ~1 per step: within the first epoch
    # the adjustment saturates the softmax (thousands of logits; float32 keeps the loss finite)
    method = make_method("meta-cala", {**SGD, "k": 5, "meta_lr": 1.0})
    with pytest.raises(LongtailError, match=r"diverged \(mean adjustment .* logits at epoch 1\): lower meta_lr "
                                            r"\(now 1\)") as info:
        method.fit(TRAIN, VAL)
    assert "\n" not in str(info.value) and not method.is_fitted()
    # beyond 1 it is rejected before any work
    with pytest.raises(LongtailError, match="meta_lr = 2.0 must be a number >= 0 and <= 1"):
        make_method("meta-cala", {**SGD, "meta_lr": 2.0}).fit(TRAIN, VAL)


def test_shares_the_neighbour_table_of_heuristic_cala_and_declares_its_meta_set():
    meta = make_method("meta-cala", {"k": 12, "seed": 4}).requirements()
    heuristic = make_method("heuristic-cala", {"k": 12, "seed": 4}).requirements()
    assert [r.kind for r in meta] == ["neighbours", "meta-set"]
    assert (meta[0].params, meta[0].modules) == (heuristic[0].params, heuristic[0].modules)  # one artifact
    assert meta[1].split == "val" and meta[1].params["grouping"] == "class-group"
    assert meta[1].params["per_group"] == 2 and meta[1].params["groups"] == 6
    # held out of train: no shared table (it is built on the rows that stay), the meta set from train
    held = make_method("meta-cala", {"meta_source": "train"}).requirements()
    assert [r.kind for r in held] == ["meta-set"] and held[0].split == "train"


def test_meta_source_train_holds_rows_out_and_trains_on_the_rest():
    method = make_method("meta-cala", {**SGD, "k": 5, "meta_source": "train", "meta_groups": "kmeans",
                                       "groups": 2, "per_group": 1})
    method.fit(TRAIN, None)
    assert method.meta_rows_ == 2 * C  # one row per (class, group)
    np.testing.assert_allclose(method.source_prior_, (np.array(COUNTS) - 2) / (sum(COUNTS) - 2 * C))
    assert np.isfinite(method.logits(TEST_X)).all()


def test_tau1_changes_nothing_when_the_classes_are_balanced():
    # M7 / paper 000 Table 4: under ALT (class-balanced train) u is constant and cancels in the softmax
    rows = split((12,) * C, 5, "train")
    balanced = FeatureSet(rows.features, rows.labels, np.array([12] * C), NAMES, name="train")
    a = make_method("meta-cala", {**SGD, "k": 5, "tau1": 0.0}).fit(balanced, VAL).logits(TEST_X)
    b = make_method("meta-cala", {**SGD, "k": 5, "tau1": 1.5}).fit(balanced, VAL).logits(TEST_X)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_cached_neighbour_statistics_train_a_close_but_different_head():
    exact = make_method("meta-cala", {**SGD, "k": 5}).fit(TRAIN, VAL)
    cached = make_method("meta-cala", {**SGD, "k": 5, "neighbour_stats": "cached"}).fit(TRAIN, VAL)
    a, b = exact.logits(TEST_X), cached.logits(TEST_X)
    assert not np.array_equal(a, b)  # stale neighbour values are another input to the network
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.9
    with pytest.raises(LongtailError, match="neighbour_stats"):
        make_method("meta-cala", {**SGD, "neighbour_stats": "stale"}).fit(TRAIN, VAL)


def test_the_report_tells_an_idle_meta_step_from_a_moving_one():
    from longtail.pipeline.report.meta import movement

    idle = make_method("meta-cala", {**SGD, "k": 5, "meta_lr": 0.0}).fit(TRAIN, VAL).diagnostics(TRAIN)["meta"]
    moving = make_method("meta-cala", {**SGD, "k": 5}).fit(TRAIN, VAL).diagnostics(TRAIN)["meta"]
    assert movement(idle)[2] == "barely moved" and idle["barely_moved"]
    assert movement(moving)[2] == "moved" and not moving["barely_moved"]


def test_default_tau1_follows_the_imbalance_ratio_as_heuristic_cala():
    from longtail.stages.cala import default_tau1

    counts = (120, 30, 12, 3)  # 40:1: tau1 = 1 + 0.5 log10(4) = 1.30
    rows = split(counts, 6, "train")
    train = FeatureSet(rows.features, rows.labels, np.array(counts), NAMES, name="train")
    tau1 = default_tau1(counts)
    assert tau1 == pytest.approx(1.0 + 0.5 * np.log10(4.0))
    meta = make_method("meta-cala", {**SGD, "meta_lr": 0.0, "k": 5}).fit(train, VAL)
    la = make_method("logit-adjust", {**SGD, "solver": "sgd", "tau": tau1}).fit(train, VAL)
    np.testing.assert_array_equal(meta.logits(TEST_X), la.logits(TEST_X))
    np.testing.assert_allclose(meta.logit_prior(), la.logit_prior(), rtol=1e-12)
