"""One contract over every registered method (the spirit of scikit-learn's ``check_estimator``).

Parametrised over ``known_methods()`` plus the composites ``ce+pc`` and ``dlsa+ce``: a method added to the registry is
checked here without a new line.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from longtail.stages.base import PREFIX_WRAPPERS, Method, Wrapper, known_methods, make_method
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError

C, D = 4, 6
NAMES = ("a", "b", "c", "d")
TARGET = [0.1, 0.2, 0.3, 0.4]


def _params(name: str) -> dict:
    """Small, non-default parameters for a fast fit (every head takes these)."""
    params = {"epochs": 3, "batch_size": 32, "seed": 7}
    if name == "ce+pc":
        params["pc"] = {"target_prior": list(TARGET)}
    return params


ALL = known_methods() + ["ce+pc", "dlsa+ce"]


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
