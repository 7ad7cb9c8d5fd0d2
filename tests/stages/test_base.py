"""The method lifecycle (validate the chain once, fit innermost first, clean up on failure), Frozen,
clone, with_base, FitContext, requirements, and the registry's names and user targets."""

import sys
import textwrap

import numpy as np
import pytest
import torch

from longtail.stages.base import FitContext, Frozen, Method, Requirement, Wrapper, check_number, clone
from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.registry import (
    METHODS,
    MethodName,
    known_methods,
    make_method,
    needs_full_split,
    parse_name,
)

C, D = 3, 2
CALLS: list[str] = []


def _train(seed=0, counts=(6, 4, 2), meta=None):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(C), counts)
    x = rng.normal(size=(len(y), D)).astype(np.float32) + y[:, None]
    return FeatureSet(x, y, np.array(counts), ("a", "b", "c"), name="train", meta=meta or {})


class Mean(Method):
    """Logits: minus the squared distance to each class mean, times ``scale``."""

    def __init__(self, scale: float = 1.0, fail: bool = False, device: str = "cpu"):
        self.scale = scale
        self.fail = fail
        self.device = device

    def _check_params(self, num_classes):
        CALLS.append("check Mean")
        check_number("method 'mean'", "scale", self.scale, low=0, low_open=True)

    def _validate(self, ctx):
        CALLS.append("validate Mean")

    def _fit(self, train, val, ctx):
        CALLS.append("fit Mean")
        self.ctx_ = ctx
        self.means_ = np.stack([train.features[train.labels == c].mean(0) for c in range(ctx.num_classes)])
        if self.fail:
            raise RuntimeError("boom")

    def _logits(self, features):
        return -self.scale * ((features[:, None, :] - self.means_[None]) ** 2).sum(-1)

    def _state(self):
        return {"means": torch.as_tensor(self.means_)}

    def _load_state(self, state):
        self.means_ = state["means"].numpy()


class Shift(Wrapper):
    """The base's logits plus ``shift``; fails in its own fit when ``fail``."""

    needs_full_split = False

    def __init__(self, base, shift: float = 0.0, fail: bool = False):
        super().__init__(base)
        self.shift = shift
        self.fail = fail

    def _check_params(self, num_classes):
        CALLS.append("check Shift")
        check_number("method 'shift'", "shift", self.shift)

    def _validate(self, ctx):
        CALLS.append("validate Shift")

    def _requirements(self):
        return [Requirement("table", {"k": 1}, ("longtail.stages.base",), build=lambda t: 1,
                            save=lambda a: ({}, {}), load=lambda t, m: 1, attach=lambda a: None)]

    def _fit(self, train, val, ctx):
        CALLS.append("fit Shift")
        self.fitted_shift_ = float(self.shift)
        if self.fail:
            raise RuntimeError("boom")

    def _transform(self, logits):
        return logits + self.fitted_shift_

    def _state(self):
        return {"shift": torch.tensor(self.fitted_shift_)}

    def _load_state(self, state):
        self.fitted_shift_ = float(state["shift"])


@pytest.fixture(autouse=True)
def _calls():
    CALLS.clear()
    yield


def _learned(m):
    return sorted(k for k in vars(m) if k.endswith("_"))


# ---------------------------------------------------------------------- the lifecycle
def test_fit_checks_the_whole_chain_first_then_fits_innermost_first():
    Shift(Shift(Mean())).fit(_train())
    assert CALLS == ["check Shift", "validate Shift", "check Shift", "validate Shift", "check Mean",
                     "validate Mean", "fit Mean", "fit Shift", "fit Shift"]


def test_a_bad_parameter_anywhere_in_the_chain_fails_before_any_work():
    method = Shift(Mean(scale=-1.0))
    with pytest.raises(LongtailError, match="method 'mean': scale = -1.0 must be a number > 0"):
        method.fit(_train())
    assert not any(c.startswith("fit") for c in CALLS)
    with pytest.raises(LongtailError, match="scale = -1.0"):
        method.check_params(C)  # what the pipeline runs before any work: the same checks


@pytest.mark.parametrize("where", ["base", "wrapper"])
def test_a_fit_that_fails_midway_leaves_no_learned_attribute_anywhere(where):
    base = Mean(fail=where == "base")
    method = Shift(base, fail=where == "wrapper")
    with pytest.raises(RuntimeError, match="boom"):
        method.fit(_train())
    assert _learned(method) == [] and _learned(base) == []
    assert not method.is_fitted() and not base.is_fitted()


def test_refitting_a_wrapper_refits_its_base_and_starts_afresh():
    base = Mean()
    method = Shift(base, shift=1.0).fit(_train(0))
    base.extra_ = "stale"  # a learned attribute a previous fit left
    method.fit(_train(1))
    assert "extra_" not in vars(base)
    fresh = Mean().fit(_train(1))
    np.testing.assert_array_equal(base.means_, fresh.means_)


def test_fit_context_holds_the_train_metadata_and_provenance():
    train = _train(meta={"store_fingerprint": "abc", "split_fingerprint": "def", "other": 1})
    val = _train(seed=3)
    base = Mean().fit(train, val)
    ctx = base.ctx_
    assert isinstance(ctx, FitContext)
    assert (ctx.num_classes, ctx.dim) == (C, D)
    np.testing.assert_array_equal(ctx.class_counts, [6, 4, 2])
    np.testing.assert_allclose(ctx.source_prior, [0.5, 1 / 3, 1 / 6])
    assert ctx.device == torch.device("cpu") and ctx.val is val
    assert ctx.provenance == {"store_fingerprint": "abc", "split_fingerprint": "def"}
    assert Mean().fit(_train()).ctx_.provenance == {}


def test_fit_rejects_val_of_another_dimension_and_a_non_feature_set():
    with pytest.raises(LongtailError, match="val features have dimension 3"):
        Mean().fit(_train(), FeatureSet(np.zeros((2, 3), np.float32), np.array([0, 1]), np.array([6, 4, 2]),
                                        ("a", "b", "c")))
    method = Shift(Mean()).fit(_train())
    with pytest.raises(TypeError):
        method.fit(np.zeros((3, 2)))
    assert not method.is_fitted() and not method.base.is_fitted()  # a rejected refit leaves nothing fitted


# ---------------------------------------------------------------------- Frozen, clone, with_base
def test_a_frozen_base_is_not_refitted_and_delegates():
    base = Mean(scale=2.0).fit(_train(0))
    means = base.means_
    CALLS.clear()
    frozen = Frozen(base)
    assert frozen.is_fitted() and frozen.inner is base and Frozen(frozen).inner is base
    assert (frozen.num_classes_, frozen.dim_) == (C, D)
    np.testing.assert_array_equal(frozen.source_prior_, base.source_prior_)
    assert frozen.get_params() == base.get_params()
    method = Shift(frozen, shift=1.0).fit(_train(1))
    assert base.means_ is means and "fit Mean" not in CALLS
    x = _train(2).features
    np.testing.assert_array_equal(method.logits(x), base.logits(x) + 1.0)
    np.testing.assert_array_equal(frozen.logit_prior(), base.logit_prior())
    assert method.chain() == [method, frozen]
    assert set(method.state_dict()) == {"_num_classes", "_dim", "_source_prior", "shift", "base._num_classes",
                                        "base._dim", "base._source_prior", "base.means"}


def test_a_frozen_unfitted_method_is_an_error_at_fit():
    with pytest.raises(LongtailError, match="frozen method must be fitted"):
        Shift(Frozen(Mean())).fit(_train())
    assert CALLS == []


def test_clone_copies_parameters_not_state_and_keeps_a_frozen_base():
    prior = [0.2, 0.3, 0.5]
    method = Shift(Mean(scale=prior), shift=2.0)  # a list parameter: deep-copied
    method.base.scale = prior
    twin = clone(method)
    assert type(twin) is Shift and twin.get_params() == method.get_params()
    assert twin.base is not method.base and twin.base.scale == prior and twin.base.scale is not prior
    frozen = Frozen(Mean().fit(_train()))
    kept = clone(Shift(frozen).fit(_train()))
    assert kept.base is frozen and not kept.is_fitted()


def test_with_base_gives_a_new_unfitted_wrapper_with_the_same_own_parameters():
    method = Shift(Mean(), shift=3.0).fit(_train())
    other = Frozen(Mean(scale=2.0).fit(_train()))
    again = method.with_base(other)
    assert type(again) is Shift and again is not method and again.base is other
    assert again.shift == 3.0 and not again.is_fitted() and method.is_fitted()


def test_requirements_collect_the_chain_and_stop_at_a_frozen_base():
    assert len(Shift(Shift(Mean())).requirements()) == 2
    assert len(Shift(Frozen(Shift(Mean()).fit(_train()))).requirements()) == 1
    assert Mean().requirements() == [] and Mean().diagnostics(_train()) is None


def test_needs_full_split_looks_at_what_the_fit_fits():
    assert needs_full_split(Shift(Mean()))
    assert not needs_full_split(Shift(Frozen(Mean().fit(_train()))))
    assert not needs_full_split(Frozen(Mean().fit(_train())))


def test_load_state_dict_replaces_everything_learned():
    method = Shift(Mean(), shift=1.0).fit(_train(0))
    again = Shift(Mean(), shift=1.0)
    again.base.extra_ = 1
    again.load_state_dict(method.state_dict())
    assert "extra_" not in vars(again.base)
    x = _train(2).features
    np.testing.assert_array_equal(again.logits(x), method.logits(x))


# ---------------------------------------------------------------------- names
def test_parse_name_splits_prefixes_base_and_suffixes():
    name = parse_name("ce+ts+pc")
    assert name == MethodName((), "ce", ("ts", "pc"))
    assert (name.outer, name.inner_name, str(name)) == ("pc", "ce+ts", "ce+ts+pc")
    plain = parse_name("ce")
    assert (plain.outer, plain.inner_name) == (None, None)
    assert parse_name("my-loss+pc").base == "my-loss"  # a user method's name need not be registered
    for bad in ("ce+nope", "pc", "ce++pc", ""):
        with pytest.raises(LongtailError, match="unknown method|non-empty"):
            parse_name(bad)


def test_prefix_names_when_a_prefix_wrapper_is_registered():
    from longtail.stages.registry import PREFIX_WRAPPERS

    if not PREFIX_WRAPPERS:
        pytest.skip("no prefix wrapper registered")
    prefix = sorted(PREFIX_WRAPPERS)[0]
    name = parse_name(f"{prefix}+ce+pc")
    assert (name.prefixes, name.base, name.suffixes) == ((prefix,), "ce", ("pc",))
    assert (name.outer, name.inner_name) == ("pc", f"{prefix}+ce")
    assert parse_name(f"{prefix}+ce").inner_name == "ce"


def test_every_registered_class_declares_its_name_and_kind():
    assert known_methods() == sorted(METHODS)
    for key, cls in METHODS.items():
        assert cls.name == key and cls.kind == "method" and "name" in vars(cls)


# ---------------------------------------------------------------------- user methods (target)
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_losses_mod.py").write_text(textwrap.dedent('''
        import torch
        from longtail.stages.heads import TrainedHead
        from longtail.stages.train.objective import Objective, StepOutput


        class RowWeighted(Objective):
            def __init__(self, n):
                self.weights = torch.linspace(1.0, 2.0, n)

            def loss(self, module, batch, state):
                z = module(batch.x)
                per = torch.nn.functional.cross_entropy(z, batch.y, reduction="none")
                w = self.weights.to(z.device)[batch.rows]
                return StepOutput((w * per).mean(), logits=z, per_sample=per)


        class MyHead(TrainedHead):
            def __init__(self, *, strength=1.0, epochs=3, lr=0.1, batch_size=8, weight_decay=0.0, seed=0,
                         device="cpu"):
                super().__init__(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                                 seed=seed, device=device)
                self.strength = strength

            def objective(self, ctx):
                return RowWeighted(int(ctx.class_counts.sum()))

        NOT_A_CLASS = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_losses_mod"
    sys.modules.pop("my_losses_mod", None)


def test_a_user_method_from_its_target_fits_wraps_and_clones(user_module):
    method = make_method("my-loss+pc", {"strength": 2.0, "epochs": 2}, target=f"{user_module}:MyHead")
    assert method.base.name == "my-loss" and method.base.strength == 2.0
    method.fit(_train())
    z = method.logits(_train(2).features)
    assert z.shape == (12, C) and np.isfinite(z).all()
    twin = clone(method)
    assert twin.base.name == "my-loss" and type(twin.base) is type(method.base)
    np.testing.assert_array_equal(twin.fit(_train()).logits(_train(2).features), z)


@pytest.mark.parametrize("target, match", [
    ("no_such_module_xyz:MyHead", r"method target 'no_such_module_xyz:MyHead': cannot import"),
    ("{mod}:Missing", r"has no 'Missing'"),
    ("{mod}:NOT_A_CLASS", r"'NOT_A_CLASS' is not a method class"),
    ("{mod}:RowWeighted", r"'RowWeighted' is not a method class"),
    ("nocolon", r"must look like 'package.module:Class'"),
])
def test_a_bad_target_is_one_line_naming_it(user_module, target, match):
    with pytest.raises(LongtailError, match=match) as info:
        make_method("my-loss", {}, target=target.format(mod=user_module))
    assert "\n" not in str(info.value)


def test_a_target_with_an_unknown_parameter_names_the_target(user_module):
    with pytest.raises(LongtailError, match=r"method target 'my_losses_mod:MyHead': unknown parameter\(s\) bogus"):
        make_method("my-loss", {"bogus": 1}, target="my_losses_mod:MyHead")
