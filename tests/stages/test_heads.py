"""Stage-2 heads: the head protocol, the samplers they train with, and what each objective should do
to a long tail."""

import numpy as np
import pytest
import torch

import longtail.stages.heads as heads
import longtail.stages.train.standardise as standardise
from longtail.stages.base import FitContext
from longtail.stages.data import FeatureSet
from longtail.stages.decoupled import TAU_GRID
from longtail.stages.errors import LongtailError
from longtail.stages.heads import deferred_reweighting_epoch
from longtail.stages.losses import class_balanced_weights, ldam_loss, log_prior
from longtail.stages.registry import make_method
from longtail.stages.train.data import TrainData
from longtail.stages.train.samplers import ClassBalancedSampler, InstanceSampler

COUNTS = [200, 100, 40, 15, 5]
NAMES = tuple("abcde")
FAST = {"epochs": 30, "batch_size": 64, "seed": 0}


def _mixture(counts, seed, dim=8, distance=2.0):
    """Unit-variance Gaussians with orthogonal means ``distance * e_c`` (overlapping at distance 2)."""
    rng = np.random.default_rng(seed)
    means = np.eye(len(counts), dim) * distance
    x = np.concatenate([rng.normal(size=(n, dim)) + means[c] for c, n in enumerate(counts)])
    return x.astype(np.float32), np.repeat(np.arange(len(counts)), counts), means


def _balanced_accuracy(pred, labels):
    return float(np.mean([np.mean(pred[labels == c] == c) for c in np.unique(labels)]))


@pytest.fixture(scope="module")
def data():
    x, y, means = _mixture(COUNTS, seed=0)
    xv, yv, _ = _mixture([40] * 5, seed=50)
    xt, yt, _ = _mixture([400] * 5, seed=100)
    train = FeatureSet(x, y, np.array(COUNTS), NAMES, name="train")
    val = FeatureSet(xv, yv, np.array(COUNTS), NAMES, name="val")
    return train, val, xt, yt, means


@pytest.fixture(scope="module")
def ce_fit(data):
    return make_method("ce", FAST).fit(data[0])


# ---------------------------------------------------------------------- samplers and schedule
def test_instance_sampler_is_a_seeded_permutation():
    g = torch.Generator().manual_seed(3)
    a = InstanceSampler().epoch_order(50, g)
    assert sorted(a.tolist()) == list(range(50))
    assert torch.equal(a, InstanceSampler().epoch_order(50, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, InstanceSampler().epoch_order(50, g))  # the next epoch is another order


def test_class_balanced_sampler_draws_classes_uniformly_and_samples_within_class_uniformly():
    labels = torch.tensor(np.repeat(np.arange(5), COUNTS))
    sampler = ClassBalancedSampler(labels, 5)
    idx = sampler.epoch_order(50_000, torch.Generator().manual_seed(0))
    drawn = np.bincount(labels[idx].numpy(), minlength=5)
    np.testing.assert_allclose(drawn / 50_000, 0.2, atol=0.01)  # instance sampling would give 0.56 .. 0.014
    tail = idx[labels[idx] == 4].numpy()  # the 5 samples of the rarest class, each ~1/5 of its draws
    assert set(tail) == set(range(355, 360))
    np.testing.assert_allclose(np.bincount(tail - 355) / len(tail), 0.2, atol=0.03)
    assert torch.equal(idx, sampler.epoch_order(50_000, torch.Generator().manual_seed(0)))


def test_class_balanced_sampler_rejects_an_empty_class():
    with pytest.raises(LongtailError, match=r"class\(es\) \[1\]"):
        ClassBalancedSampler(torch.tensor([0, 0, 2]), 3)


def test_deferred_reweighting_epoch():
    assert deferred_reweighting_epoch(200, 0.8) == 160  # Cao et al., CIFAR: re-weight from epoch 160 of 200
    assert deferred_reweighting_epoch(30, 0.8) == 24
    assert deferred_reweighting_epoch(30, 0.0) == 0
    assert deferred_reweighting_epoch(30, 1.0) == 30  # never


def test_ldam_drw_switches_to_class_balanced_weights_in_the_last_fifth():
    head = make_method("ldam-drw", {"epochs": 10})
    counts = np.array(COUNTS)
    ctx = FitContext(5, 5, counts, counts / counts.sum(), torch.device("cpu"))
    objective = head.objective(ctx)
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 5, generator=g).tanh(), torch.randint(5, (16,), generator=g)
    data = TrainData(z, y)
    identity = lambda x: x  # noqa: E731  (the batch's inputs are the logits)

    def loss(epoch):
        return objective.loss(identity, data.batch(torch.arange(16), epoch, 0), None).loss.item()

    plain = ldam_loss(z, y, COUNTS, max_margin=0.5, scale=30.0)
    weighted = ldam_loss(z, y, COUNTS, max_margin=0.5, scale=30.0, weight=class_balanced_weights(COUNTS, 0.9999))
    assert [loss(e) for e in range(8)] == pytest.approx([plain.item()] * 8, abs=1e-6)
    assert [loss(e) for e in (8, 9)] == pytest.approx([weighted.item()] * 2, abs=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), abs=1e-3)


# ---------------------------------------------------------------------- re-balancing works
@pytest.mark.parametrize("name", ["balanced-softmax", "logit-adjust", "crt", "tau-norm", "lws", "cb-ce", "ldam-drw"])
def test_rebalancing_heads_beat_ce_on_balanced_accuracy(data, ce_fit, name):
    train, val, xt, yt, _ = data
    acc_ce = _balanced_accuracy(ce_fit.predict(xt), yt)
    acc = _balanced_accuracy(make_method(name, FAST).fit(train, val).predict(xt), yt)
    # with these seeds ce is at 0.64 and the re-balanced heads at 0.71 .. 0.74
    assert acc >= acc_ce + 0.05, (name, acc_ce, acc)


def test_balanced_softmax_reaches_the_bayes_balanced_accuracy():
    # 2-D, unit-variance classes with means on a circle of radius 1.5: five samples are enough to
    # place the rarest class, so a consistent balanced loss gets within reach of the Bayes rule
    angles = 2 * np.pi * np.arange(5) / 5
    means = 1.5 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(n, 2)) + means[c] for c, n in enumerate(COUNTS)]).astype(np.float32)
    xt = np.concatenate([rng.normal(size=(400, 2)) + m for m in means]).astype(np.float32)
    yt = np.repeat(np.arange(5), 400)
    train = FeatureSet(x, np.repeat(np.arange(5), COUNTS), np.array(COUNTS), NAMES, name="train")
    bayes = (-((xt[:, None, :] - means[None]) ** 2).sum(-1)).argmax(1)  # uniform prior, unit covariance
    acc_bayes = _balanced_accuracy(bayes, yt)
    acc_ce = _balanced_accuracy(make_method("ce", {**FAST, "epochs": 60}).fit(train).predict(xt), yt)
    acc = _balanced_accuracy(make_method("balanced-softmax", {**FAST, "epochs": 60}).fit(train).predict(xt), yt)
    assert acc == pytest.approx(acc_bayes, abs=0.02), (acc, acc_bayes)
    assert acc_ce < acc_bayes - 0.1  # while plain cross-entropy is far from it


def test_logit_adjust_with_tau_zero_is_ce(data, ce_fit):
    train, _, xt, _, _ = data
    la = make_method("logit-adjust", {**FAST, "tau": 0.0}).fit(train)
    np.testing.assert_allclose(la.logits(xt), ce_fit.logits(xt), atol=1e-5)


# ---------------------------------------------------------------------- two-stage heads
def test_lws_keeps_the_ce_classifier_and_learns_larger_scales_for_the_tail(data, ce_fit):
    train, _, xt, _, _ = data
    lws = make_method("lws", FAST).fit(train)
    # stage 1 is exactly ce with the same seed, and stage 2 does not touch it
    torch.testing.assert_close(lws.module_.linear.weight, ce_fit.module_.weight, rtol=0, atol=0)
    torch.testing.assert_close(lws.module_.linear.bias, ce_fit.module_.bias, rtol=0, atol=0)
    scales = lws.module_.scales.detach().numpy()
    np.testing.assert_allclose(lws.logits(xt), ce_fit.logits(xt) * scales, rtol=1e-5, atol=1e-5)
    assert scales[-1] > scales[0]


def _standardised(head, x):
    return (x - head.mean_.numpy()) / head.std_.numpy()


def test_tau_norm_logits_by_hand_and_fallback_without_val(data):
    train, _, xt, _, _ = data
    head = make_method("tau-norm", FAST).fit(train)  # no val: tau = 1
    assert head.tau_ == 1.0
    w = head.module_.weight.detach().numpy().astype(np.float64)
    expected = _standardised(head, xt.astype(np.float64)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head.logits(xt), expected, rtol=1e-4, atol=1e-4)
    fixed = make_method("tau-norm", {**FAST, "tau": 0.0}).fit(train)  # tau = 0: the bias-free CE head itself
    np.testing.assert_allclose(fixed.logits(xt), _standardised(fixed, xt) @ w.T, rtol=1e-4, atol=1e-4)


def test_tau_norm_chooses_tau_by_balanced_accuracy_on_val(data):
    train, val, _, _, _ = data
    head = make_method("tau-norm", FAST).fit(train, val)
    w = head.module_.weight.detach().numpy().astype(np.float64)
    xv = _standardised(head, val.features.astype(np.float64))
    scores = [_balanced_accuracy((xv @ (w / np.linalg.norm(w, axis=1, keepdims=True) ** t).T).argmax(1), val.labels)
              for t in TAU_GRID]
    assert head.tau_ == TAU_GRID[int(np.argmax(scores))]
    assert head.tau_ > 0  # on a long tail, some normalisation beats the raw CE weights
    np.testing.assert_allclose(head.val_scores_, scores, atol=1e-12)
    explicit = make_method("tau-norm", {**FAST, "tau": 0.7}).fit(train, val)  # an explicit tau ignores val
    assert explicit.tau_ == 0.7


# ---------------------------------------------------------------------- modules
def test_cosine_logits_are_bounded_by_the_scale(data):
    train, _, xt, _, _ = data
    fixed = make_method("cosine", {**FAST, "scale": 5.0, "learn_scale": False}).fit(train)
    assert float(fixed.module_.scale) == 5.0
    assert np.abs(fixed.logits(xt)).max() <= 5.0 + 1e-5
    learned = make_method("cosine", {**FAST, "scale": 5.0}).fit(train)
    assert float(learned.module_.scale) != pytest.approx(5.0, abs=1e-3)
    ldam = make_method("ldam-drw", {**FAST, "scale": 30.0}).fit(train)
    assert np.abs(ldam.logits(xt)).max() <= 30.0 + 1e-4


# ---------------------------------------------------------------------- features and batching
@pytest.mark.parametrize("chunk", [1, 2, 1000])
def test_balanced_moments_by_hand(chunk):
    x = np.array([[0.0, 1.0], [2.0, 1.0], [10.0, 4.0]], dtype=np.float32)
    y = np.array([0, 0, 1])
    mean, std = heads.balanced_moments(x, y, 2, chunk=chunk)
    # column 0: class means 1 and 10 -> 5.5; variance ((5.5^2 + 3.5^2) / 2 + 4.5^2) / 2 = 20.75
    # column 1: class means 1 and 4 -> 2.5; variance (1.5^2 + 1.5^2) / 2 = 2.25 (the plain std is 1.41)
    np.testing.assert_allclose(mean, [5.5, 2.5], atol=1e-12)
    np.testing.assert_allclose(std, [np.sqrt(20.75), 1.5], atol=1e-12)
    shuffled = np.array([2, 0, 1])  # the order of the rows does not matter
    np.testing.assert_allclose(heads.balanced_moments(x[shuffled], y[shuffled], 2, chunk=chunk)[0], mean, atol=1e-12)


def _two_pass_moments(x, y, num_classes):
    """The definition, by class and in two passes over float64 copies: (1/C) sum_c mean(x | c), then
    (1/C) sum_c mean((x - mean)^2 | c)."""
    x = x.astype(np.float64)
    mean = np.mean([x[y == c].mean(axis=0) for c in range(num_classes)], axis=0)
    var = np.mean([((x[y == c] - mean) ** 2).mean(axis=0) for c in range(num_classes)], axis=0)
    return mean, np.sqrt(var)


@pytest.mark.parametrize("chunk", [None, 1, 7, 10_000])
def test_balanced_moments_match_the_two_pass_definition_far_from_the_origin(chunk):
    """One shifted pass keeps float64 accuracy where the plain E[x^2] - E[x]^2 does not: a mean of
    1e4 and a spread of 1e-2 cancel 12 digits there (a relative error of about 1e-4 in the std)."""
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), [300, 60, 9, 2])
    rng.shuffle(y)
    x = (1e4 + np.array([0.0, 1e-2, -2e-2, 5e-3])[y, None] + 1e-2 * rng.standard_normal((len(y), 3))).astype(np.float32)
    x[:, 2] = 7.0  # a constant column: variance 0, not a tiny negative number
    mean, std = heads.balanced_moments(x, y, 4, chunk=chunk)
    ref_mean, ref_std = _two_pass_moments(x, y, 4)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12)
    np.testing.assert_allclose(std[:2], ref_std[:2], rtol=1e-9)
    assert std[2] == 0.0
    naive = np.sqrt(np.mean([(x[y == c].astype(np.float64) ** 2).mean(axis=0) for c in range(4)], axis=0) - mean ** 2)
    assert np.nanmax(np.abs(naive[:2] / ref_std[:2] - 1)) > 1e-5  # what the shift buys


def test_balanced_moments_do_not_depend_on_the_number_of_threads(monkeypatch):
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 500)
    x = rng.standard_normal((500, 4)).astype(np.float32) * 3 + 1
    monkeypatch.setattr(standardise, "MOMENTS_BLOCK", 2)  # blocks of 2 chunks of 16 rows: 16 blocks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = heads.balanced_moments(x, y, 3, chunk=16)
        torch.set_num_threads(4)
        four = heads.balanced_moments(x, y, 3, chunk=16)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(one[0], four[0])
    np.testing.assert_array_equal(one[1], four[1])
    np.testing.assert_allclose(one[1], _two_pass_moments(x, y, 3)[1], rtol=1e-12)


def test_the_log_prior_a_head_reuses_follows_its_counts_tensor():
    """The heads pass one counts tensor to every batch's loss: its log prior is computed once, and
    again when the tensor changes in place."""
    counts = torch.tensor([8.0, 2.0], dtype=torch.float64)
    like = torch.zeros(3, 2)
    first = log_prior(counts, like)
    assert log_prior(counts, like) is first
    np.testing.assert_allclose(first.numpy(), np.log([0.8, 0.2]), rtol=1e-6)
    counts[1] = 8.0
    np.testing.assert_allclose(log_prior(counts, like).numpy(), np.log([0.5, 0.5]), rtol=1e-6)
    assert log_prior(counts, like.double()).dtype == torch.float64


def test_standardised_copy_is_bit_identical_to_the_whole_array_expression(monkeypatch):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((53, 6)) * 3 + 1).astype(np.float32)
    mean = torch.tensor(x.mean(axis=0))
    std = torch.tensor(x.std(axis=0))
    expected = (torch.tensor(x) - mean) / std
    monkeypatch.setattr(standardise, "MOMENTS_CHUNK", 6 * 5)  # chunks of 5 rows, the last one short
    assert torch.equal(heads.standardised_copy(x, mean, std), expected)
    frozen = x.copy()
    frozen.flags.writeable = False  # a read-only array (a memory-mapped store) is read, not written
    assert torch.equal(heads.standardised_copy(frozen, mean, std), expected)
    flipped = np.ascontiguousarray(x[::-1])[::-1]  # negative strides
    assert torch.equal(heads.standardised_copy(flipped, mean, std), expected)
    np.testing.assert_array_equal(x, frozen)  # the input is not modified


def test_a_transformed_train_data_standardises_each_batch_and_keeps_its_input():
    rng = np.random.default_rng(4)
    raw = torch.tensor((rng.standard_normal((20, 3)) * 5 + 2).astype(np.float32))
    before = raw.clone()
    mean, std = raw.mean(0), raw.std(0)
    data = TrainData(raw, torch.arange(20) % 2, transform=lambda v: v.sub_(mean).div_(std))
    rows = torch.tensor([3, 0, 17, 3])
    batch = data.batch(rows, 1, 7)
    assert data._x is None and len(data) == 20 and data.device == raw.device  # nothing standardised yet
    assert torch.equal(batch.x, ((raw - mean) / std)[rows])
    assert torch.equal(raw, before)  # the stored input is never written
    assert torch.equal(data.x, (raw - mean) / std) and data.x is data.x  # computed once on first access
    assert torch.equal(data.batch(rows, 1, 7).x, batch.x) and torch.equal(raw, before)
    assert data.whole(0, 0).x is data.x


def test_a_minibatch_head_on_cpu_trains_on_the_callers_features_without_a_copy(data, monkeypatch):
    train = data[0]
    seen = []
    original = heads.fit_module

    def spy(module, train_data, *args, **kwargs):
        state = original(module, train_data, *args, **kwargs)
        seen.append(train_data)
        return state

    monkeypatch.setattr(heads, "fit_module", spy)
    make_method("ce", {**FAST, "epochs": 2, "solver": "sgd"}).fit(train)
    (used,) = seen
    assert used._stored.data_ptr() == train.features.ctypes.data  # shared, not copied
    assert used._x is None  # and never standardised as a whole


@pytest.mark.parametrize("solver, atol", [("sgd", 1e-3), ("lbfgs", 0.03)])
def test_heads_are_invariant_to_an_affine_rescaling_of_each_feature(data, solver, atol):
    """Exactly for SGD (the same steps on the same standardised rows); to the solver's tolerance for
    L-BFGS (rounding moves its stopping point; a gradient of 1e-5 with a ridge of 5e-4 leaves the
    weights within about 0.02 of the optimum)."""
    train, _, xt, _, _ = data
    a = np.array([1000.0, 0.01, 1, 1, 3, 1, 1, 0.5], dtype=np.float32)
    b = np.array([-5.0, 0.3, 0, 0, 0, 1, 0, 0], dtype=np.float32)
    moved = FeatureSet(train.features * a + b, train.labels, train.class_counts, NAMES, name="train")
    params = {**FAST, "epochs": 5, "solver": solver}
    z1 = make_method("ce", params).fit(train).logits(xt)
    z2 = make_method("ce", params).fit(moved).logits(xt * a + b)
    np.testing.assert_allclose(z1, z2, atol=atol)


def test_constant_features_do_not_break_standardisation(data):
    train, _, xt, yt, _ = data
    x = np.concatenate([train.features, np.full((len(train), 1), 3.0, np.float32)], axis=1)
    head = make_method("ce", FAST).fit(FeatureSet(x, train.labels, train.class_counts, NAMES))
    z = head.logits(np.concatenate([xt, np.full((len(xt), 1), 3.0, np.float32)], axis=1))
    assert np.isfinite(z).all()
    assert head.std_[-1].item() == 1.0


def test_logits_are_computed_in_chunks_with_the_same_result(data, ce_fit, monkeypatch):
    xt = data[2]
    whole = ce_fit.logits(xt)
    monkeypatch.setattr(heads, "LOGITS_CHUNK", 7)
    np.testing.assert_array_equal(ce_fit.logits(xt), whole)


def test_counts_that_disagree_with_labels_are_rejected(data):
    train = data[0]
    bad = FeatureSet(train.features, train.labels, np.array([200, 100, 0, 15, 5]), NAMES, name="train")
    with pytest.raises(LongtailError, match="class_counts of class 'c' is 0"):
        make_method("balanced-softmax", {"epochs": 1}).fit(bad)


# ---------------------------------------------------------------------- hyper-parameter validation
@pytest.mark.parametrize(
    "name, params, key",
    [
        ("ce", {"epochs": 0}, "epochs = 0"),
        ("ce", {"epochs": 2.5}, "epochs = 2.5"),
        ("ce", {"lr": -0.1}, "lr = -0.1"),
        ("ce", {"batch_size": 0}, "batch_size = 0"),
        ("ce", {"weight_decay": -1}, "weight_decay = -1"),
        ("ce", {"seed": "x"}, "seed = 'x'"),
        ("ce", {"device": "tpu"}, "device"),
        ("logit-adjust", {"tau": -1}, "tau = -1"),
        ("cb-ce", {"beta": 1.5}, "beta = 1.5"),
        ("focal", {"gamma": -2}, "gamma = -2"),
        ("cosine", {"scale": 0}, "scale = 0"),
        ("cosine", {"learn_scale": "yes"}, "learn_scale = 'yes'"),
        ("ldam-drw", {"drw_start": 1.2}, "drw_start = 1.2"),
        ("ldam-drw", {"max_margin": 0}, "max_margin = 0"),
        ("tau-norm", {"tau": -0.5}, "tau = -0.5"),
    ],
)
def test_bad_hyper_parameters_raise_at_fit_naming_the_key(data, name, params, key):
    method = make_method(name, params)  # the constructor only stores
    with pytest.raises(LongtailError, match=key):
        method.fit(data[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_user_error(data):
    with pytest.raises(LongtailError, match="CUDA is not available"):
        make_method("ce", {"device": "cuda", "epochs": 1}).fit(data[0])


def test_tau_norm_logit_prior_is_a_power_of_the_train_prior_chosen_on_val():
    rng = np.random.default_rng(0)
    counts = [120, 40, 12, 4]

    def split(per_class, name):
        x = np.concatenate([rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[c] for c, n in enumerate(per_class)])
        y = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)])
        return FeatureSet(x.astype(np.float32), y, np.array(counts), tuple("abcd"), name=name)

    train, val = split(counts, "train"), split([30] * 4, "val")
    head = make_method("tau-norm", {"epochs": 10, "device": "cpu"}).fit(train, val)
    assert 0.0 <= head.prior_power_ <= 1.0
    expected = train.prior ** head.prior_power_
    np.testing.assert_allclose(head.logit_prior(), expected / expected.sum())
    # without val there is nothing to measure it on: the train prior
    no_val = make_method("tau-norm", {"epochs": 10, "device": "cpu"}).fit(train)
    np.testing.assert_allclose(no_val.logit_prior(), train.prior)
