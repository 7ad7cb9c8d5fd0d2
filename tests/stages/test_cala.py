"""Heuristic-CALA and Dynamic-LA (paper 000): v and its smoothing by hand, the special cases of the
section "Heuristic-CALA Framework" (v = 0 when p_pr = p_mx, K = 0 -> ALA form, K = infinity ->
Dynamic-LA), MixUp label distributions, the neighbour table's reuse and checks, the ablations."""

import math

import numpy as np
import pytest
import torch

import longtail.stages.cala as cala_module
from longtail.stages.registry import make_method
from longtail.stages.calibrate import logit_prior
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.heads import SGD_MIN_STEPS, LinearClassifier
from longtail.stages.losses.cala import (
    cala_adjustment,
    cala_loss,
    dynamic_la_adjustment,
    neighbourhood_label_distribution,
    neighbourhood_prediction,
    smooth_with_class_averages,
    with_self,
)
from longtail.stages.neighbours import NeighbourTable, build_table

# ---------------------------------------------------------------------- a 4-sample toy table
# 3 classes; class 2 (row 3) is nobody's neighbour, class 1 is absent from row 2's neighbourhood
Y = torch.tensor([0, 0, 1, 2])
NB = torch.tensor([[1, 2], [0, 2], [0, 1], [2, 0]])
Q = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]])
PRIOR = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)


def test_neighbourhood_statistics_by_hand():
    # p_pr: means of the neighbours' q, e.g. row 0 = (q1 + q2) / 2
    np.testing.assert_allclose(neighbourhood_prediction(NB, Q).numpy(),
                               [[0.35, 0.45, 0.2], [0.45, 0.4, 0.15], [0.6, 0.25, 0.15], [0.45, 0.4, 0.15]], atol=1e-7)
    np.testing.assert_allclose(neighbourhood_label_distribution(NB, Y, 3).numpy(),
                               [[0.5, 0.5, 0], [0.5, 0.5, 0], [1, 0, 0], [0.5, 0.5, 0]], atol=1e-7)
    # MixUp labels m_j = lam_j e(y_j) + (1 - lam_j) e(y'_j): row 0 = (m_1 + m_2) / 2 with
    # m_1 = 0.75 e0 + 0.25 e1, m_2 = 0.6 e1 + 0.4 e0
    partner = torch.tensor([2, 1, 0, 0])
    lam = torch.tensor([1.0, 0.75, 0.6, 0.5])
    p_mx = neighbourhood_label_distribution(NB, Y, 3, partner_labels=partner, lam=lam)
    np.testing.assert_allclose(p_mx[0].numpy(), [0.575, 0.425, 0.0], atol=1e-7)
    np.testing.assert_allclose(p_mx.sum(1).numpy(), 1.0, atol=1e-6)


def test_mixup_neighbourhood_label_distributions_sum_to_one():
    g = torch.Generator().manual_seed(0)
    n, c, k = 200, 7, 13
    y = torch.randint(c, (n,), generator=g)
    nb = torch.randint(n, (n, k), generator=g)
    partner = torch.randint(c, (n,), generator=g)
    lam = 0.5 + 0.5 * torch.rand(n, generator=g)
    p = neighbourhood_label_distribution(nb, y, c, partner_labels=partner, lam=lam)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(1).numpy(), 1.0, atol=1e-6)


def test_smoothing_with_class_averages_by_hand():
    """Eq. A.11 with a = 0.5. s(x') = p(y_x' | N_K(x')): s_pr = 0.35, 0.45, 0.25, 0.15.
    Row 0's neighbours: row 1 (class 0, s = 0.45), row 2 (class 1, s = 0.25); no class-2 neighbour."""
    p_pr = neighbourhood_prediction(NB, Q)
    s = p_pr.gather(1, Y[:, None]).squeeze(1)
    np.testing.assert_allclose(s.numpy(), [0.35, 0.45, 0.25, 0.15], atol=1e-7)
    got = smooth_with_class_averages(p_pr, NB, Y, s, 0.5)
    np.testing.assert_allclose(got[0].numpy(), [0.5 * 0.45 + 0.5 * 0.35, 0.5 * 0.25 + 0.5 * 0.45, 0.2], atol=1e-7)
    # row 2: two class-0 neighbours (s = 0.35, 0.45): class average 0.4
    np.testing.assert_allclose(got[2].numpy(), [0.5 * 0.4 + 0.5 * 0.6, 0.25, 0.15], atol=1e-7)
    np.testing.assert_array_equal(smooth_with_class_averages(p_pr, NB, Y, s, 0.0).numpy(), p_pr.numpy())


def test_v_by_hand_on_the_toy_table():
    tau1, tau2 = 1.0, 2.0
    u = np.log(PRIOR.numpy())
    # unsmoothed: v = log(p_pr / p_mx) where p_mx > 0, else 0 (class 2 everywhere, class 1 in row 2)
    v = np.array([[math.log(0.7), math.log(0.9), 0], [math.log(0.9), math.log(0.8), 0],
                  [math.log(0.6), 0, 0], [math.log(0.9), math.log(0.8), 0]])
    got = cala_adjustment(NB, Y, Q, torch.log(PRIOR), tau1=tau1, tau2=tau2, smoothing=0.0)
    assert got.dtype == torch.float32 and got.shape == (4, 3)
    np.testing.assert_allclose(got.numpy(), tau1 * u + tau2 * v, rtol=1e-5, atol=1e-6)
    # smoothed (a = 0.5): row 0: p~_pr = (0.40, 0.35, 0.2), p~_mx = (0.5, 0.5 * 0 + 0.5 * 0.5, 0)
    # (row 2's own-class p_mx is 0: its class 1 is not in its neighbourhood); row 2: p~_pr = (0.5,
    # 0.25, 0.15), p~_mx = (0.5 * 0.5 + 0.5 * 1, 0, 0)
    got = cala_adjustment(NB, Y, Q, torch.log(PRIOR), tau1=tau1, tau2=tau2, smoothing=0.5, chunk_entries=3)
    np.testing.assert_allclose(got[0].numpy(), tau1 * u + tau2 * np.array([math.log(0.8), math.log(1.4), 0]),
                               rtol=1e-5)
    np.testing.assert_allclose(got[2].numpy(), tau1 * u + tau2 * np.array([math.log(0.5 / 0.75), 0, 0]), rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.05, 0.7])
def test_v_is_zero_when_predictions_equal_the_neighbourhood_labels(smoothing):
    g = torch.Generator().manual_seed(1)
    n, c, k = 50, 4, 6
    y = torch.randint(c, (n,), generator=g)
    nb = torch.randint(n, (n, k), generator=g)
    probs = torch.nn.functional.one_hot(y, c).float()  # then p_pr = p_mx in every neighbourhood
    log_prior = torch.log(torch.bincount(y, minlength=c).double().clamp_min(1) / n)
    got = cala_adjustment(nb, y, probs, log_prior, tau1=1.5, tau2=1.0, smoothing=smoothing)
    np.testing.assert_allclose(got.numpy(), (1.5 * log_prior).float().expand(n, c).numpy(), atol=1e-6)


def test_k_zero_is_the_ala_form():
    """N_0(x) = {x}: only the true class gets tau2 log p_pr(y_x | x) on top of tau1 log p_tr."""
    got = cala_adjustment(None, Y, Q, torch.log(PRIOR), tau1=1.5, tau2=1.0, smoothing=0.05)
    q_true = Q.numpy()[np.arange(4), Y.numpy()]
    want = 1.5 * np.log(PRIOR.numpy())[None, :] + np.eye(3)[Y.numpy()] * np.log(q_true)[:, None]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)
    # the same as a table whose only neighbour of each row is the row itself
    self_table = torch.arange(4)[:, None]
    np.testing.assert_allclose(cala_adjustment(self_table, Y, Q, torch.log(PRIOR), tau1=1.5, tau2=1.0,
                                               smoothing=0.05).numpy(), want, rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.05])
def test_k_infinity_is_dynamic_la(smoothing):
    """Neighbourhood = the whole train set: p_mx = p_tr exactly (one MixUp lam and a permutation of
    partners per batch), p_pr = the mean prediction, so tau log p_tr + tau log(p_pr / p_tr) = tau log p_pr."""
    g = torch.Generator().manual_seed(2)
    n, c, tau = 60, 5, 1.3
    y = torch.arange(n) % c
    y = torch.cat([y, torch.zeros(20, dtype=torch.long)])  # class 0 is the head
    n = len(y)
    probs = torch.softmax(torch.randn(n, c, generator=g) * 2, dim=1)
    partner, lam = torch.empty_like(y), torch.empty(n)
    order = torch.randperm(n, generator=g)
    for start in range(0, n, 16):  # MixUp as the trainer does it: per batch, one lam, permuted partners
        rows = order[start:start + 16]
        partner[rows] = y[rows][torch.randperm(len(rows), generator=g)]
        lam[rows] = 0.5 + 0.5 * float(torch.rand(1, generator=g))
    prior = torch.bincount(y, minlength=c).double() / n
    everyone = torch.arange(n).expand(n, n)
    p_mx = neighbourhood_label_distribution(everyone[:1], y, c, partner_labels=partner, lam=lam)
    np.testing.assert_allclose(p_mx[0].numpy(), prior.numpy(), atol=1e-6)
    got = cala_adjustment(everyone, y, probs, torch.log(prior), tau1=tau, tau2=tau, smoothing=smoothing,
                          partner_labels=partner, lam=lam)
    want = dynamic_la_adjustment(probs.double().mean(0), tau)
    np.testing.assert_allclose(got.numpy(), want.float().expand(n, c).numpy(), rtol=1e-5, atol=1e-5)


def test_cala_loss_is_eq_5_with_the_mixup_criterion():
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    adj = torch.tensor([[0.1, -0.2, 0.3], [0.0, 1.0, -1.0]])
    ya, yb = torch.tensor([0, 2]), torch.tensor([1, 2])

    def ce(row, y):
        a = z[row] + adj[row]
        return -(a[y] - torch.logsumexp(a, 0)).item()

    plain = (ce(0, 0) + ce(1, 2)) / 2
    assert cala_loss(z, ya, adj).item() == pytest.approx(plain, rel=1e-6)
    mixed = 0.7 * plain + 0.3 * (ce(0, 1) + ce(1, 2)) / 2
    assert cala_loss(z, ya, adj, partner_labels=yb, lam=0.7).item() == pytest.approx(mixed, rel=1e-6)


def test_mixing_logits_of_the_linear_head_is_mixing_its_features():
    g = torch.Generator().manual_seed(0)
    head = LinearClassifier(5, 3)
    head.reset_parameters(g)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    x = torch.randn(4, 5, generator=g)
    perm = torch.tensor([2, 0, 3, 1])
    lam = 0.8
    np.testing.assert_allclose(head(lam * x + (1 - lam) * x[perm]).detach().numpy(),
                               (lam * head(x) + (1 - lam) * head(x)[perm]).detach().numpy(), atol=1e-6)


# ---------------------------------------------------------------------- the methods
C, D = 4, 6
NAMES = ("a", "b", "c", "d")
#: ``min_steps: 0``: exactly ``epochs`` epochs (the default step budget would stretch them on these small sets)
FAST = {"epochs": 4, "batch_size": 32, "seed": 3, "device": "cpu", "min_steps": 0}


def _data(counts=(60, 30, 12, 6), seed=0, meta=None):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D)) * 2
    y = np.repeat(np.arange(C), counts)
    x = (rng.normal(size=(len(y), D)) + means[y]).astype(np.float32)
    return FeatureSet(x, y, np.array(counts), NAMES, name="train", meta=meta or {})


@pytest.fixture(scope="module")
def train():
    return _data()


@pytest.fixture(scope="module")
def test_x():
    return _data(counts=(20, 20, 20, 20), seed=2).features


def _no_build(*args, **kwargs):
    raise AssertionError("build_table was called")


def test_a_given_table_is_used_instead_of_building_one(train, test_x, monkeypatch):
    own = make_method("heuristic-cala", {**FAST, "k": 5}).fit(train)
    table = build_table(train.features, 9)  # a larger K serves too: its first 5 columns are the 5-NN
    monkeypatch.setattr(cala_module, "build_table", _no_build)
    given = make_method("heuristic-cala", {**FAST, "k": 5}).set_table(table).fit(train)
    np.testing.assert_array_equal(given.logits(test_x), own.logits(test_x))
    (req,) = make_method("heuristic-cala", {**FAST, "k": 5}).requirements()
    assert (req.kind, dict(req.params)) == ("neighbours", {"k": 5, "metric": "cosine", "index": "flat",
                                                          "device": "cpu"})
    # the neighbourhood term matters: another table, other logits
    rng = np.random.default_rng(0)
    shuffled = NeighbourTable(rng.permutation(table.indices), table.similarities, 9)
    other = make_method("heuristic-cala", {**FAST, "k": 5}).set_table(shuffled).fit(train)
    assert not np.array_equal(other.logits(test_x), own.logits(test_x))


def test_ablations_are_the_parameters_and_no_v_needs_no_table(train, test_x, monkeypatch):
    no_u = make_method("cala-no-u", FAST).fit(train)
    same = make_method("heuristic-cala", {**FAST, "tau1": 0}).fit(train)
    np.testing.assert_array_equal(no_u.logits(test_x), same.logits(test_x))
    assert "tau1" not in no_u.get_params() and no_u.tau1 == 0.0
    monkeypatch.setattr(cala_module, "build_table", _no_build)
    no_v = make_method("cala-no-v", FAST)
    assert not callable(getattr(no_v, "table_params", None))  # the pipeline builds no table for it
    no_v.fit(train)
    same = make_method("heuristic-cala", {**FAST, "tau2": 0}).fit(train)
    np.testing.assert_array_equal(no_v.logits(test_x), same.logits(test_x))


def test_first_epoch_is_the_warm_up_and_later_epochs_use_the_predictions(train, test_x):
    """Epoch 1 has no predictions: v = 0 and Dynamic-LA uses p_tr, so all three are the same
    logit-adjusted MixUp training; from epoch 2 on the recorded predictions change the adjustment."""
    one = {**FAST, "epochs": 1}
    z = make_method("cala-no-v", {**one, "tau1": 1.0}).fit(train).logits(test_x)
    np.testing.assert_array_equal(make_method("heuristic-cala", {**one, "tau1": 1.0}).fit(train).logits(test_x), z)
    dyn = make_method("dynamic-la", one).fit(train)
    np.testing.assert_array_equal(dyn.logits(test_x), z)
    np.testing.assert_allclose(dyn.pred_prior_, train.prior)
    dyn3 = make_method("dynamic-la", {**FAST, "epochs": 3}).fit(train)
    assert abs(dyn3.pred_prior_.sum() - 1) < 1e-6 and not np.allclose(dyn3.pred_prior_, train.prior)
    z3 = make_method("cala-no-v", {**FAST, "epochs": 3, "tau1": 1.0}).fit(train).logits(test_x)
    assert not np.array_equal(dyn3.logits(test_x), z3)
    cala3 = make_method("heuristic-cala", {**FAST, "epochs": 3, "tau1": 1.0}).fit(train)
    assert not np.array_equal(cala3.logits(test_x), z3)


def test_logit_priors_for_pc(train, test_x):
    cala = make_method("heuristic-cala", {**FAST, "tau1": 1.5}).fit(train)
    p = train.prior ** -0.5
    np.testing.assert_allclose(logit_prior(cala), p / p.sum())
    np.testing.assert_allclose(logit_prior(make_method("cala-no-u", FAST).fit(train)), train.prior)
    dyn = make_method("dynamic-la", {**FAST, "tau": 2.0}).fit(train)
    p = train.prior / dyn.pred_prior_ ** 2
    np.testing.assert_allclose(logit_prior(dyn), p / p.sum())
    # state round trip keeps the proportions (and so the prior +pc removes)
    again = make_method("dynamic-la", {**FAST, "tau": 2.0}).load_state_dict(dyn.state_dict())
    np.testing.assert_allclose(logit_prior(again), logit_prior(dyn))
    np.testing.assert_array_equal(again.logits(test_x), dyn.logits(test_x))
    pc = make_method("heuristic-cala+pc", FAST).fit(train)
    z = pc.base.logits(test_x).astype(np.float64)
    prior = pc.base.logit_prior()
    np.testing.assert_allclose(pc.logits(test_x), z - np.log(prior) + np.log(0.25), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params, match", [
    ({"k": 0}, "k = 0 must be an integer >= 1"),
    ({"k": 2.5}, "k = 2.5 must be an integer"),
    ({"tau1": -1}, "tau1 = -1 must be a number >= 0"),
    ({"tau2": float("nan")}, "tau2 = nan"),
    ({"alpha": -0.5}, "alpha = -0.5 must be a number >= 0"),
    ({"smoothing": 1.0}, "smoothing = 1.0 must be >= 0 and < 1"),
    ({"smoothing": -0.1}, "smoothing = -0.1 must be a number >= 0"),
    ({"index": "lsh"}, "index = 'lsh' is not one of flat, ivf, hnsw"),
])
def test_bad_parameters_raise_before_any_work(params, match, train, monkeypatch):
    monkeypatch.setattr(cala_module, "build_table", _no_build)
    with pytest.raises(LongtailError, match=match):
        make_method("heuristic-cala", {**FAST, **params}).fit(train)
    with pytest.raises(LongtailError, match=match):
        make_method("heuristic-cala", {**FAST, **params}).check_params(C)


def test_k_not_smaller_than_the_train_split_and_bad_tables_raise(train):
    with pytest.raises(LongtailError, match="k = 108 must be smaller than the 108 train samples"):
        make_method("heuristic-cala", {**FAST, "k": 108}).fit(train)
    with pytest.raises(LongtailError, match="alpha = -1"):
        make_method("dynamic-la", {**FAST, "alpha": -1}).fit(train)
    small = _data(counts=(10, 10, 10, 10))
    with pytest.raises(LongtailError, match="neighbour table has 40 rows, the train split 108"):
        make_method("heuristic-cala", {**FAST, "k": 5}).set_table(build_table(small.features, 5)).fit(train)
    with pytest.raises(LongtailError, match="neighbour table has K = 3, k = 5 was asked for"):
        make_method("heuristic-cala", {**FAST, "k": 5}).set_table(build_table(train.features, 3)).fit(train)
    # a table built for other features of a store is refused, never reused
    stored = _data(meta={"store_fingerprint": "abc"})
    stale = build_table(stored.features, 5, fingerprint="old:train")
    with pytest.raises(LongtailError, match="built for other features"):
        make_method("heuristic-cala", {**FAST, "k": 5}).set_table(stale).fit(stored)
    fresh = build_table(stored.features, 5, fingerprint="abc:train")
    make_method("heuristic-cala", {**FAST, "k": 5}).set_table(fresh).fit(stored)


def test_class_sums_agree_on_both_paths():
    """The accelerator path (weighted embedding_bag over the identity, a fixed summation order) gives
    the CPU path's scatter-add sums."""
    from longtail.stages.losses.cala import _class_sums

    g = torch.Generator().manual_seed(5)
    classes = torch.randint(7, (40, 9), generator=g)
    w = torch.rand(40, 9, generator=g)
    np.testing.assert_allclose(_class_sums(classes, w, 7, scatter=False).numpy(),
                               _class_sums(classes, w, 7, scatter=True).numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mixed, smoothing, c", [(False, 0.0, 12), (True, 0.05, 12), (True, 0.5, 12), (True, 0.05, 4)])
def test_adjustment_on_the_support_equals_the_dense_definitions(mixed, smoothing, c):
    """cala_adjustment evaluates eq. 8 only on the neighbourhood's label classes (all classes when
    C <= 2M); the dense (R, C) definitions (eq. 8 with eq. A.11, max(0, log(M p~_pr)) where
    p~_mx = 0) give the same table."""
    g = torch.Generator().manual_seed(4)
    n, k = 90, 5
    y = torch.randint(c, (n,), generator=g)
    nb = torch.randint(n, (n, k), generator=g)
    probs = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)
    partner = torch.randint(c, (n,), generator=g) if mixed else None
    lam = torch.where(torch.rand(n, generator=g) < 0.2, 1.0, 0.5 + 0.5 * torch.rand(n, generator=g)) if mixed else None
    log_prior = torch.log(torch.full((c,), 1.0 / c, dtype=torch.float64))
    p_pr = neighbourhood_prediction(nb, probs)
    p_mx = neighbourhood_label_distribution(nb, y, c, partner_labels=partner, lam=lam)
    if smoothing:
        s_pr, s_mx = p_pr.gather(1, y[:, None]).squeeze(1), p_mx.gather(1, y[:, None]).squeeze(1)
        p_pr = smooth_with_class_averages(p_pr, nb, y, s_pr, smoothing)
        p_mx = smooth_with_class_averages(p_mx, nb, y, s_mx, smoothing)
    absent = (torch.log(p_pr.clamp_min(1e-12)) + math.log(k)).clamp_min(0.0)  # max(0, log(M p_pr))
    v = torch.where(p_mx > 0, torch.log(p_pr) - torch.log(p_mx.clamp_min(1e-30)), absent)
    want = 1.2 * log_prior.float() + 0.8 * v
    got = cala_adjustment(nb, y, probs, log_prior, tau1=1.2, tau2=0.8, smoothing=smoothing,
                          partner_labels=partner, lam=lam, chunk_entries=200)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- issue 11: fidelity to the paper
def test_the_neighbourhood_includes_the_sample_itself():
    """N_K(x) = {x} + its K nearest others (N_0(x) = {x}). Row 3 (class 2) has no class-2 neighbour
    in the toy table: without itself its true class had no label mass (v = 0); with itself, members
    {3, 2, 0} with labels 2, 1, 0: p_mx = (1/3, 1/3, 1/3), p_pr = mean(q3, q2, q0) = (1/3, 0.3, 1.1/3)."""
    members = with_self(NB)
    np.testing.assert_array_equal(members.numpy(), [[0, 1, 2], [1, 0, 2], [2, 0, 1], [3, 2, 0]])
    got = cala_adjustment(members, Y, Q, torch.log(PRIOR), tau1=1.0, tau2=1.0, smoothing=0.0)
    u = np.log(PRIOR.numpy())
    np.testing.assert_allclose(got[3].numpy(), u + np.log([1.0, 0.9, 1.1]), rtol=1e-5)
    assert got[3, 2] != pytest.approx(float(u[2]))  # the true-class term is there
    # row 2 (class 1) likewise: members {2, 0, 1}, p_mx(1) = 1/3, p_pr(1) = (0.6 + 0.2 + 0.3) / 3
    assert got[2, 1].item() == pytest.approx(u[1] + math.log(1.1), rel=1e-5)


def test_v_of_a_class_without_label_mass_by_hand():
    """Eq. 8 where the class has label mass, max(0, log(M p_pr)) where it has none (one member's
    share 1/M is the resolution of an M-member estimate). Row 0 (class 0), members {0, 1}, both of
    class 0, q0 = (0.2, 0.7, 0.1), q1 = (0.4, 0.5, 0.1): p_pr = (0.3, 0.6, 0.1), p_mx = (1, 0, 0):
    v = (log 0.3, log(2 * 0.6), max(0, log(2 * 0.1)) = 0): the dark dove that the model calls a crow
    with no crow among its neighbours gets a margin against the crow."""
    y = torch.tensor([0, 0, 1])
    q = torch.tensor([[0.2, 0.7, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1]])
    members = with_self(torch.tensor([[1], [0], [0]]))
    prior = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    got = cala_adjustment(members, y, q, torch.log(prior), tau1=0.5, tau2=2.0, smoothing=0.0)
    u = 0.5 * np.log(prior.numpy())
    np.testing.assert_allclose(got[0].numpy(), u + 2.0 * np.array([math.log(0.3), math.log(1.2), 0.0]), rtol=1e-5)
    # row 2 (class 1), members {2, 0}: p_pr = (0.15, 0.75, 0.1), p_mx = (0.5, 0.5, 0)
    np.testing.assert_allclose(got[2].numpy(), u + 2.0 * np.array([math.log(0.3), math.log(1.5), 0.0]), rtol=1e-5)


@pytest.mark.parametrize("counts, want", [((50, 50), 1.0), ((100, 10), 1.0), ((100, 1), 1.5), ((5000, 2), 1.5),
                                          ((1000, 300, 20), 1.0 + 0.5 * (math.log10(50) - 1)), ((20, 3), 1.0)])
def test_tau1_default_from_the_imbalance_ratio(counts, want):
    """Paper 000, Fig. 5: tau1 = 1 at 10:1, 1.5 at 100:1; linear in log10 of the ratio in between."""
    assert cala_module.default_tau1(np.array(counts)) == pytest.approx(want)
    # scale-free: the train prior gives the tau1 of its counts (logit_prior passes the prior)
    assert cala_module.default_tau1(np.array(counts) / sum(counts)) == pytest.approx(want)


def test_the_heads_use_the_tau1_of_their_imbalance_ratio(test_x):
    """tau1 = None (the default) is tau1 = default_tau1(train counts): 1 at the 10:1 of this set
    (so the logits carry a uniform prior), 1.5 at 100:1."""
    train = _data()  # counts 60 .. 6: 10:1
    auto = make_method("heuristic-cala", {**FAST, "k": 5}).fit(train)
    assert auto.tau1 is None
    np.testing.assert_array_equal(auto.logits(test_x),
                                  make_method("heuristic-cala", {**FAST, "k": 5, "tau1": 1.0}).fit(train).logits(test_x))
    np.testing.assert_allclose(logit_prior(auto), np.full(C, 0.25))
    steep = _data(counts=(300, 60, 12, 3))  # 100:1
    np.testing.assert_array_equal(
        make_method("cala-no-v", FAST).fit(steep).logits(test_x),
        make_method("cala-no-v", {**FAST, "tau1": 1.5}).fit(steep).logits(test_x))
    # the logits carry p_tr^(1 - 1.5) there, not a uniform prior
    prior = np.array((300, 60, 12, 3), dtype=np.float64) / 375
    want = prior ** -0.5 / (prior ** -0.5).sum()
    np.testing.assert_allclose(logit_prior(make_method("heuristic-cala", {**FAST, "k": 5}).fit(steep)), want, rtol=1e-9)


def _reference():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "cala_dovecrow.py"
    spec = importlib.util.spec_from_file_location("cala_dovecrow", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_product_equals_the_reference_on_a_dove_crow_batch():
    """On a tiny dove/crow set: the product's neighbourhoods (the shared table plus the sample
    itself), adjustment (eq. 8, A.11, MixUp labels) and loss (eq. 5 with the MixUp criterion) equal
    the plain dense transcription of benchmarks/cala_dovecrow.py on a fixed batch."""
    from longtail.stages.synthetic import dove_crow

    ref = _reference()
    data = dove_crow(0, head=60, dim=8, val_per_group=1, test_per_group=1)
    tr = data.splits["train"]
    x, y = tr["features"], torch.as_tensor(tr["labels"])
    n, c, k = len(y), len(data.class_names), 6
    members = with_self(torch.as_tensor(build_table(x, k).indices))
    ref_members = ref.reference_neighbourhoods(x, k)
    np.testing.assert_array_equal(np.sort(members.numpy(), 1), np.sort(ref_members.numpy(), 1))
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(2 * torch.randn(n, c, generator=g), 1)
    partner = y[torch.randperm(n, generator=g)]
    lam = 0.5 + 0.5 * torch.rand(n, generator=g)
    log_prior = torch.log(torch.as_tensor(data.class_counts, dtype=torch.float64) / n)
    kw = {"tau1": 1.15, "tau2": 1.0, "smoothing": 0.05}
    got = cala_adjustment(members, y, q, log_prior, partner_labels=partner, lam=lam, **kw)
    want = ref.reference_adjustment(ref_members, y, q, partner, lam, log_prior, **kw)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    rows = torch.randperm(n, generator=g)[:16]
    logits = torch.randn(16, c, generator=g)
    yb = y[rows][torch.randperm(16, generator=g)]
    assert cala_loss(logits, y[rows], got[rows], partner_labels=yb, lam=0.8).item() == pytest.approx(
        ref.reference_loss(logits.double(), y[rows], want[rows], yb, 0.8).item(), rel=1e-5)


def test_the_head_adjusts_with_the_table_rows_plus_the_sample_itself(train, monkeypatch):
    """What the fit hands cala_adjustment: column 0 the row itself, then the table's first k columns
    (the shared table stays self-excluded, so its key and Meta-CALA's reading of it are unchanged)."""
    table = build_table(train.features, 9)
    seen = []

    def spy(neighbours, *args, **kwargs):
        seen.append(neighbours.clone())
        return cala_adjustment(neighbours, *args, **kwargs)

    monkeypatch.setattr(cala_module, "cala_adjustment", spy)
    make_method("heuristic-cala", {**FAST, "k": 5, "epochs": 2}).set_table(table).fit(train)
    assert len(seen) == 1  # epoch 2 (epoch 1 is the warm-up without v)
    np.testing.assert_array_equal(seen[0].numpy(), np.c_[np.arange(len(train.labels)), table.indices[:, :5]])
    assert not (table.indices == np.arange(len(train.labels))[:, None]).any()


@pytest.mark.parametrize("name", ["heuristic-cala", "cala-no-u", "cala-no-v", "dynamic-la"])
def test_the_adjusted_heads_train_at_least_the_sgd_step_budget_by_default(name):
    assert make_method(name).get_params()["min_steps"] == SGD_MIN_STEPS


def test_a_step_budget_adds_epochs_and_each_refreshes_the_adjustment(train, monkeypatch):
    """``epochs: 1`` with ``min_steps`` one more than an epoch's steps trains two epochs: the second
    adjusts by v (epoch 1 is the warm-up), so cala_adjustment is called once."""
    table = build_table(train.features, 9)
    seen = []

    def spy(neighbours, *args, **kwargs):
        seen.append(1)
        return cala_adjustment(neighbours, *args, **kwargs)

    monkeypatch.setattr(cala_module, "cala_adjustment", spy)
    steps = math.ceil(len(train.labels) / FAST["batch_size"])
    make_method("heuristic-cala", {**FAST, "k": 5, "epochs": 1, "min_steps": steps + 1}).set_table(table).fit(train)
    assert len(seen) == 1
    seen.clear()
    make_method("heuristic-cala", {**FAST, "k": 5, "epochs": 1, "min_steps": steps}).set_table(table).fit(train)
    assert seen == []
