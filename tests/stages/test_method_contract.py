"""One contract over every registered method (the spirit of scikit-learn's ``check_estimator``).

Parametrised over ``known_methods()`` plus the composites ``ce+pc``, ``ce+ts`` and ``dlsa+ce``: a
method added to the registry is checked here without a new line.
"""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from longtail.stages.base import Frozen, Method, Wrapper, clone
from longtail.stages.calibrate import validate_prior
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.registry import PREFIX_WRAPPERS, known_methods, make_method

C, D = 4, 6
NAMES = ("a", "b", "c", "d")
TARGET = [0.1, 0.2, 0.3, 0.4]


def _params(name: str) -> dict:
    """Small, non-default parameters for a fast fit (every head takes these)."""
    params = {"epochs": 3, "batch_size": 32, "seed": 7}
    if "min_steps" in make_method(name).get_params():
        params["min_steps"] = 0  # exactly the 3 epochs (the minibatch heads' step budget is 5,000 steps)
    if name == "ce+pc":
        params["pc"] = {"target_prior": list(TARGET)}
    return params


ALL = known_methods() + ["ce+pc", "ce+ts", "ce+bcts", "dlsa+ce"]


def _data(counts=(60, 30, 12, 6), seed=0, labels_of=None):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D)) * 2
    y = np.repeat(np.arange(C), counts)
    x = (rng.normal(size=(len(y), D)) + means[y]).astype(np.float32)
    return FeatureSet(x, y, np.array(counts if labels_of is None else labels_of), NAMES, name="train")


@pytest.fixture(scope="module")
def train():
    return _data()


@pytest.fixture(scope="module")
def val():
    return _data(counts=(5, 5, 5, 5), seed=1)


@pytest.fixture(scope="module")
def test_x():
    return _data(counts=(25, 25, 25, 25), seed=2).features


@pytest.fixture(scope="module")
def fitted(train, val):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = make_method(name, _params(name)).fit(train, val)
        return cache[name]

    return get


def _make_params(method: Method) -> dict:
    """``get_params`` back in the form ``make_method`` takes (wrappers nest under their name)."""
    if isinstance(method, Wrapper):
        inner = _make_params(method.base)
        own = {k: v for k, v in method.get_params().items() if k != "base"}
        return inner | {method.name: own}
    return method.get_params()


def _full_name(method: Method) -> str:
    if not isinstance(method, Wrapper):
        return method.name
    inner = _full_name(method.base)
    return f"{method.name}+{inner}" if method.name in PREFIX_WRAPPERS else f"{inner}+{method.name}"


@pytest.mark.parametrize("name", ALL)
def test_constructor_only_stores_parameters(name):
    params = _params(name)
    method = make_method(name, params)
    got = _make_params(method)
    for key, value in params.items():
        assert got[key] == value
    if name == "ce+pc":
        assert method.target_prior is params["pc"]["target_prior"]  # stored as given, not copied
    assert not [k for k in vars(method) if k.endswith("_")], "learned state before fit"
    # round trip: the same parameters build the same method
    again = make_method(_full_name(method), got)
    assert _make_params(again) == got
    # the constructor validates nothing; fit does
    make_method(name, {"epochs": -3})


@pytest.mark.parametrize("name", ALL)
def test_fit_returns_self_and_logits_are_finite_float32(name, train, val, test_x):
    method = make_method(name, _params(name))
    assert method.fit(train, val) is method
    z = method.logits(test_x)
    assert z.shape == (len(test_x), C)
    assert z.dtype == np.float32
    assert np.isfinite(z).all()
    p = method.predict_proba(test_x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(method.predict(test_x), z.argmax(axis=1))


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_logits_and_the_seed_matters(name, fitted, train, val, test_x):
    z = fitted(name).logits(test_x)
    again = make_method(name, _params(name)).fit(train, val).logits(test_x)
    np.testing.assert_array_equal(z, again)
    other = make_method(name, {**_params(name), "seed": 8}).fit(train, val).logits(test_x)
    assert not np.array_equal(z, other)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_holds_tensors_and_reloads_exactly(name, fitted, test_x, tmp_path):
    method = fitted(name)
    state = method.state_dict()
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "state.safetensors"
    save_file(state, str(path))
    rebuilt = make_method(_full_name(method), _make_params(method))
    rebuilt.load_state_dict(load_file(str(path)))
    np.testing.assert_array_equal(rebuilt.logits(test_x), method.logits(test_x))
    assert set(rebuilt.state_dict()) == set(state)


@pytest.mark.parametrize("name", ALL)
def test_unknown_parameter_and_unknown_name_raise(name):
    with pytest.raises(LongtailError, match="unknown parameter.*bogus"):
        make_method(name, {**_params(name), "bogus": 1})
    if name == "ce+pc":
        with pytest.raises(LongtailError, match="unknown parameter.*bogus"):
            make_method(name, {"pc": {"bogus": 1}})
    with pytest.raises(LongtailError, match="unknown method"):
        make_method(name + "-nope")
    with pytest.raises(LongtailError, match="unknown method"):
        make_method(name + "+nope")


@pytest.mark.parametrize("name", ALL)
def test_fit_rejects_a_class_without_train_sample(name):
    x = np.random.default_rng(0).normal(size=(30, D)).astype(np.float32)
    y = np.repeat([0, 1, 3], 10)  # class 'c' has no sample
    train = FeatureSet(x, y, np.array([10, 10, 0, 10]), NAMES, name="train")
    with pytest.raises(LongtailError, match="no train sample: c"):
        make_method(name, _params(name)).fit(train)


@pytest.mark.parametrize("name", ALL)
def test_logits_check_fitted_and_dimension(name, fitted):
    with pytest.raises(RuntimeError, match="not fitted"):
        make_method(name, _params(name)).logits(np.zeros((2, D), np.float32))
    with pytest.raises(LongtailError, match="do not match the fitted dimension"):
        fitted(name).logits(np.zeros((2, D + 1), np.float32))


# ---------------------------------------------------------------------- the lifecycle (issue 10)
def _learned(method: Method) -> dict[str, list[str]]:
    """The learned (``*_``) attributes of every method of the chain, by position."""
    return {f"{i}:{type(m).__name__}": sorted(k for k in vars(m) if k.endswith("_"))
            for i, m in enumerate(method.chain()) if not isinstance(m, Frozen)}


def _other_data():
    """A train split of the same classes and dimension, other rows and other counts."""
    return _data(counts=(20, 35, 50, 10), seed=5)


@pytest.mark.parametrize("name", ALL)
def test_refit_on_other_data_equals_a_fresh_fit_on_it(name, train, val, test_x):
    """Defect (a) of issue 10: ``ce+pc`` fitted on ``a`` then on ``b`` kept the base fitted on ``a``."""
    other = _other_data()
    method = make_method(name, _params(name)).fit(train, val)
    first = method.logits(test_x)
    method.fit(other, val)
    fresh = make_method(name, _params(name)).fit(other, val)
    np.testing.assert_array_equal(method.logits(test_x), fresh.logits(test_x))
    assert not np.array_equal(method.logits(test_x), first)
    np.testing.assert_array_equal(method.source_prior_, other.prior)
    for m in method.chain():
        np.testing.assert_array_equal(m.source_prior_, other.prior)


@pytest.mark.parametrize("name", ALL)
def test_a_failed_fit_leaves_nothing_fitted_and_a_later_good_fit_works(name, train, val, test_x):
    """Defect (b) of issue 10: a failed fit (``epochs: 0``) left the method fitted, and the next
    fit crashed with ``AttributeError: ... 'mean_'``."""
    bad = make_method(name, {**_params(name), "epochs": 0})
    with pytest.raises(LongtailError, match="epochs = 0"):
        bad.fit(train, val)
    assert not any(m.is_fitted() for m in bad.chain())
    assert not any(_learned(bad).values())
    # fitted first, then a failed refit: the old fit is gone too
    method = make_method(name, _params(name)).fit(train, val)
    holder = next(m for m in method.chain() if "epochs" in m._param_names())
    holder.epochs = 0
    with pytest.raises(LongtailError, match="epochs = 0"):
        method.fit(train, val)
    assert not method.is_fitted() and not any(_learned(method).values())
    with pytest.raises(RuntimeError, match="not fitted"):
        method.logits(test_x)
    holder.epochs = _params(name)["epochs"]
    np.testing.assert_array_equal(method.fit(train, val).logits(test_x), fitted_logits(name, train, val, test_x))


_FITTED_LOGITS: dict[str, np.ndarray] = {}


def fitted_logits(name, train, val, test_x):
    if name not in _FITTED_LOGITS:
        _FITTED_LOGITS[name] = make_method(name, _params(name)).fit(train, val).logits(test_x)
    return _FITTED_LOGITS[name]


@pytest.mark.parametrize("name", ALL)
def test_fit_leaves_the_parameters_unchanged(name, train, val):
    method = make_method(name, _params(name))
    before = copy.deepcopy(_make_params(method))
    stored = {i: dict(vars(m)) for i, m in enumerate(method.chain())}
    method.fit(train, val)
    assert _make_params(method) == before
    for i, m in enumerate(method.chain()):  # the very objects given, not copies (sklearn's check)
        for key in m._param_names():
            assert getattr(m, key) is stored[i][key], (type(m).__name__, key)


@pytest.mark.parametrize("name", ALL)
def test_clone_is_an_unfitted_copy_with_equal_parameters(name, fitted, train, val, test_x):
    method = fitted(name)
    copied = clone(method)
    assert type(copied) is type(method)
    assert not copied.is_fitted() and not any(_learned(copied).values())
    assert _make_params(copied) == _make_params(method)
    for original, twin in zip(method.chain(), copied.chain()):
        assert twin is not original
    np.testing.assert_array_equal(copied.fit(train, val).logits(test_x), method.logits(test_x))
    assert method.is_fitted()  # the original is untouched


@pytest.mark.parametrize("name", ALL)
def test_logits_of_a_subset_are_the_subset_of_the_logits(name, fitted, test_x):
    """Each row's logits depend on that row only (the pipeline computes them chunk by chunk).
    Up to float32 rounding: BLAS picks its kernel (and so its summation order) by the number of
    rows, and the golden logits pin today's kernels, so bit equality cannot be asked for."""
    method = fitted(name)
    z = method.logits(test_x)
    for a, b in ((0, 1), (3, 17), (40, len(test_x))):
        np.testing.assert_allclose(method.logits(test_x[a:b]), z[a:b], rtol=1e-5, atol=1e-6)
    # nor does the order of the rows (a reversed, negatively strided view included)
    np.testing.assert_allclose(method.logits(test_x[::-1])[::-1], z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_logit_prior_is_a_valid_prior(name, fitted):
    prior = fitted(name).logit_prior()
    assert isinstance(prior, np.ndarray) and prior.dtype == np.float64 and prior.shape == (C,)
    assert np.isfinite(prior).all() and (prior > 0).all()
    assert prior.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_array_equal(validate_prior(prior, C, name, allow_zero=False), prior / prior.sum())


@pytest.mark.parametrize("name", ALL)
def test_a_wrapper_around_a_frozen_copy_fits_only_itself(name, fitted, train, val, test_x):
    method = fitted(name)
    if not isinstance(method, Wrapper):
        return
    base = method.base
    state = {k: v.clone() for k, v in base.state_dict().items()}
    wrapped = method.with_base(Frozen(base))
    assert type(wrapped) is type(method) and not wrapped.is_fitted() and wrapped.base.inner is base
    wrapped.fit(train, val)
    after = base.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    np.testing.assert_array_equal(wrapped.logits(test_x), method.logits(test_x))
