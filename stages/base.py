"""The method interface: :class:`Method`, :class:`Wrapper`, :class:`Frozen`, :func:`clone`.

Every stage-2 method (a head, a composite such as DLSA, a post-hoc wrapper such as PC-Softmax)
follows one contract, in the spirit of scikit-learn estimators:

* hyper-parameters are keyword arguments of ``__init__`` and are only stored there;
* ``fit(train, val=None)`` is never overridden: it builds a :class:`FitContext` per method of the
  chain (the method and the bases it wraps, down to a :class:`Frozen` one), validates every one
  of them before any work (hooks ``_check_params(num_classes)`` and ``_validate(ctx)``), then fits
  them innermost first through the private hook ``_fit(train, val, ctx)`` and returns ``self``;
  a failed fit leaves nothing fitted (every learned ``*_`` attribute of the chain is removed);
* ``logits(features)`` returns unnormalised class scores ``(N, C)`` as float32 numpy;
* learned state ends in ``_``; anything handed over before the fit (a shared artifact, see
  :class:`Requirement`) is kept in an attribute that does not, since every fit starts afresh;
* ``state_dict()`` / ``load_state_dict()`` hold tensors only (saved with safetensors, never
  pickled objects).

Refitting a wrapper refits its base, unless the base is :class:`Frozen` (scikit-learn's
``FrozenEstimator``): the pipeline hands cached bases in as ``wrapper.with_base(Frozen(base))``.
The names in configs map to classes in :mod:`longtail.stages.registry`.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from longtail.stages.data import FeatureSet
from longtail.stages.device import resolve_device
from longtail.stages.errors import LongtailError


# ---------------------------------------------------------------------- what a fit sees
@dataclass(frozen=True)
class FitContext:
    """What one method's fit knows besides the rows: the train split's metadata and the device.

    Attributes:
        num_classes, dim: ``C`` and ``D`` of the train split.
        class_counts: ``(C,)`` int64 train counts.
        source_prior: ``(C,)`` float64 train prior ``n_c / sum n``.
        device: the method's ``device`` parameter resolved (CPU for a method without one).
        val: the val split, or ``None``.
        provenance: ``store_fingerprint`` / ``split_fingerprint`` when the train split came from a
            store (its ``FeatureSet.meta``), else ``{}``.
    """

    num_classes: int
    dim: int
    class_counts: np.ndarray
    source_prior: np.ndarray
    device: torch.device
    val: FeatureSet | None = None
    provenance: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Requirement:
    """A shared artifact a method needs built once per store and attached before its fit.

    Two requirements with equal ``kind``, ``params`` (minus ``device``) and ``modules`` are the
    same artifact: the pipeline builds it once (as its own task) and attaches it to every method
    that declares it.
    """

    kind: str  #: artifact kind: "neighbours" | "dlsa-cascade" | "meta-set"
    params: Mapping[str, Any]  #: JSON-able, decides the artifact with the store (may hold "device")
    modules: tuple[str, ...]  #: modules whose import closure enters the key
    build: Callable[[FeatureSet], Any]  #: builds it on the split :attr:`split` (train by default)
    save: Callable[[Any], tuple[dict[str, torch.Tensor], dict]]  #: -> (tensors, JSON meta)
    load: Callable[[dict[str, torch.Tensor], dict], Any]  #: the reverse of ``save``
    attach: Callable[[Any], None]  #: hands the built or loaded object to the method, before fit
    split: str = "train"  #: the split ``build`` receives (``val`` for a meta set drawn from val)


#: ``FeatureSet.meta`` keys copied into :attr:`FitContext.provenance`
PROVENANCE_KEYS = ("store_fingerprint", "split_fingerprint")


class Method:
    """Base class of every method that turns features into class scores."""

    #: the lower-kebab-case name configs use (a class that declares it is registered)
    name: ClassVar[str] = ""
    #: ``"method"`` (a base method), ``"suffix"`` (a wrapper written after its base: ``ce+pc``) or
    #: ``"prefix"`` (a wrapper written before it: ``dlsa+ce``)
    kind: ClassVar[str] = "method"
    #: Whether ``fit`` needs the whole train split in memory as one :class:`FeatureSet`. True by
    #: default, and for every method that trains on all rows (the heads, LADE, DLSA): the pipeline
    #: then reads the train split in full for the fit. A method whose own fit uses only the
    #: split's metadata (class counts, dimension) and the val split sets it False (the post-hoc
    #: wrappers ``+pc`` and ``+ts`` around a frozen base): the pipeline may then fit it on a
    #: summary of the train split. Logits never need a whole split. See
    #: :func:`longtail.stages.registry.needs_full_split`.
    needs_full_split: ClassVar[bool] = True

    # ------------------------------------------------------------------ parameters
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as stored (JSON-friendly for plain values; a wrapped method
        as its own ``get_params()`` plus its ``name``)."""
        out = {}
        for key in self._param_names():
            value = getattr(self, key)
            out[key] = value.get_params() | {"name": value.name} if isinstance(value, Method) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ the chain
    def chain(self) -> list["Method"]:
        """``[self, self.base, self.base.base, ...]``, ending with a :class:`Frozen` method or
        the first method that wraps nothing."""
        out: list[Method] = [self]
        while isinstance(out[-1], Wrapper):
            out.append(out[-1].base)
        return out

    def _unfrozen(self) -> list["Method"]:
        """The methods of :meth:`chain` that a fit fits (all but a :class:`Frozen` end)."""
        return [m for m in self.chain() if not isinstance(m, Frozen)]

    def requirements(self) -> list[Requirement]:
        """The shared artifacts to build once per store and attach before :meth:`fit`: this
        method's own (:meth:`_requirements`) and those of the bases it fits (a :class:`Frozen`
        base needs nothing more)."""
        return [r for m in self._unfrozen() for r in m._requirements()]

    def diagnostics(self, train: FeatureSet) -> dict[str, Any] | None:
        """Extra report sections of a fitted method, ``{section: {...}}`` keyed by the
        ``metrics.json`` section they go under; ``None`` (the default) when there are none."""
        return None

    # ------------------------------------------------------------------ public API
    def check_params(self, num_classes: int) -> None:
        """The parameter checks of every method :meth:`fit` would fit (:meth:`_check_params`),
        run by the pipeline before any work so that a bad value fails in seconds."""
        for m in self._unfrozen():
            m._check_params(num_classes)

    def check_data(self, train: FeatureSet, val: FeatureSet | None = None) -> None:
        """Every check :meth:`fit` makes before any work (the parameters and the data-dependent
        ``_validate`` of each method it would fit), without fitting: the pipeline runs it for every
        configured method before the first fit. ``train`` may carry the split's metadata only (its
        class counts and dimension): the checks read no rows."""
        for m in self._unfrozen():
            ctx = m._context(train, val)
            m._check_params(ctx.num_classes)
            m._validate(ctx)

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "Method":
        """Fit on ``train`` (``val`` only for choices a method makes on validation data).

        Validates the whole chain first (no work is done for a bad parameter anywhere in it),
        then fits the unfrozen bases innermost first and this method last. On any exception (a
        bad parameter included) every method it was to fit is left unfitted, an earlier fit
        included, and the exception propagates.
        """
        methods = self._unfrozen()
        try:
            if not isinstance(train, FeatureSet):
                raise TypeError("fit expects a FeatureSet")
            train.check_train()
            if val is not None:
                if not isinstance(val, FeatureSet):
                    raise TypeError("fit expects val to be a FeatureSet or None")
                val.require_labels()
                if val.dim != train.dim:
                    raise LongtailError(f"val features have dimension {val.dim}, train features {train.dim}")
            for m in self.chain():
                if isinstance(m, Frozen) and not m.inner.is_fitted():
                    raise LongtailError(f"method {m.name!r}: a frozen method must be fitted (or loaded) first")
            contexts = [m._context(train, val) for m in methods]
            for m, ctx in zip(methods, contexts):  # every check before any work
                m._check_params(ctx.num_classes)
                m._validate(ctx)
            for m, ctx in reversed(list(zip(methods, contexts))):
                m._forget()
                m.num_classes_ = ctx.num_classes
                m.dim_ = ctx.dim
                m.source_prior_ = ctx.source_prior
                m._fit(train, val, ctx)
        except BaseException:
            for m in methods:
                m._forget()
            raise
        return self

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Unnormalised class scores, ``(N, C)`` float32."""
        self._check_fitted()
        feats = np.ascontiguousarray(features, dtype=np.float32)  # torch takes no negative strides
        if feats.ndim != 2 or feats.shape[1] != self.dim_:
            raise LongtailError(
                f"features of shape {feats.shape} do not match the fitted dimension {self.dim_}"
            )
        out = self._logits(feats)
        return np.asarray(out, dtype=np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Softmax of :meth:`logits`, float64, rows sum to 1."""
        z = self.logits(features).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)  # >= 1 after the max-shift

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def logit_prior(self) -> np.ndarray:
        """The label prior ``(C,)`` float64 that the logits are calibrated to.

        What ``+pc`` swaps for the target prior (``p_s`` of paper 002, eq. 4: "the distribution
        which the model logits are entangled with"). A softmax trained on the train split estimates
        ``p_s(y|x)``: the train prior (the default). Methods that remove the prior in training
        override this (``balanced-softmax``, ``logit-adjust``, ``cb-ce``, ``crt``, ``lade``).
        """
        self._check_fitted()
        return np.asarray(self.source_prior_, dtype=np.float64)

    def is_fitted(self) -> bool:
        return hasattr(self, "num_classes_")

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Learned state as a flat dict of tensors (CPU, contiguous)."""
        self._check_fitted()
        state = {
            "_num_classes": torch.tensor(self.num_classes_),
            "_dim": torch.tensor(self.dim_),
            "_source_prior": torch.as_tensor(np.asarray(self.source_prior_, dtype=np.float64)),
        }
        for key, value in self._state().items():
            state[key] = value.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Method":
        self._forget()
        try:
            self.num_classes_ = int(state["_num_classes"])
            self.dim_ = int(state["_dim"])
            self.source_prior_ = state["_source_prior"].numpy().astype(np.float64)
            self._load_state({k: v for k, v in state.items() if not k.startswith("_")})
        except BaseException:
            self._forget()
            raise
        return self

    # ------------------------------------------------------------------ hooks
    def _check_params(self, num_classes: int) -> None:
        """This method's own parameter checks (a LongtailError naming the method and the key).
        Default: none."""

    def _validate(self, ctx: FitContext) -> None:
        """This method's own checks that need the data (``ctx``), run after :meth:`_check_params`
        for every method of the chain before any fitting. Default: none."""

    def _requirements(self) -> list[Requirement]:
        """This method's own shared artifacts (see :meth:`requirements`). Default: none."""
        return []

    def _fit(self, train: FeatureSet, val: FeatureSet | None, ctx: FitContext) -> None:
        raise NotImplementedError

    def _logits(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ machinery
    def _context(self, train: FeatureSet, val: FeatureSet | None) -> FitContext:
        device = resolve_device(self.device) if "device" in self._param_names() else torch.device("cpu")
        return FitContext(
            num_classes=train.num_classes, dim=train.dim, class_counts=train.class_counts,
            source_prior=train.prior, device=device, val=val,
            provenance={k: train.meta[k] for k in PROVENANCE_KEYS if k in train.meta},
        )

    def _forget(self) -> None:
        """Remove every learned attribute (``*_``): the method is unfitted again."""
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]:
            delattr(self, key)

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit() first")


class Wrapper(Method):
    """A method that wraps another (post-hoc calibration, composite filters).

    Subclasses take the wrapped method as their first constructor argument ``base``; ``fit``
    refits it first unless it is :class:`Frozen`. ``state_dict`` nests the base's state under
    ``base.``.
    """

    def __init__(self, base: Method):
        self.base = base

    def with_base(self, base: Method) -> "Wrapper":
        """A new, unfitted wrapper of this class and own parameters (copied) around ``base``."""
        own = {k: copy.deepcopy(getattr(self, k)) for k in self._param_names() if k != "base"}
        return type(self)(base=base, **own)

    def _logits(self, features: np.ndarray) -> np.ndarray:
        return self._transform(self.base.logits(features))

    def _transform(self, logits: np.ndarray) -> np.ndarray:
        """Map the base's logits ``(N, C)`` to the wrapper's logits ``(N, C)``."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = super().state_dict()
        for key, value in self.base.state_dict().items():
            state[f"base.{key}"] = value
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Method":
        base_state = {k[5:]: v for k, v in state.items() if k.startswith("base.")}
        self.base.load_state_dict(base_state)
        own = {k: v for k, v in state.items() if not k.startswith("base.")}
        return super().load_state_dict(own)


class Frozen(Method):
    """A fitted method that :meth:`fit` never refits (scikit-learn's ``FrozenEstimator``).

    ``wrapper.with_base(Frozen(fitted))`` fits only the wrapper. Its fit is a no-op (an error if
    the inner method is not fitted); logits, the logit prior, the state, ``is_fitted``,
    ``num_classes_``, ``dim_``, ``source_prior_``, ``name`` and the parameters are the inner
    method's (:attr:`inner`).
    """

    needs_full_split = False  # nothing to fit

    def __init__(self, inner: Method):
        if not isinstance(inner, Method):
            raise TypeError("Frozen wraps a Method")
        self.inner = inner.inner if isinstance(inner, Frozen) else inner

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def num_classes_(self) -> int:
        return self.inner.num_classes_

    @property
    def dim_(self) -> int:
        return self.inner.dim_

    @property
    def source_prior_(self) -> np.ndarray:
        return self.inner.source_prior_

    def get_params(self) -> dict[str, Any]:
        return self.inner.get_params()

    def __repr__(self) -> str:
        return f"Frozen({self.inner!r})"

    def is_fitted(self) -> bool:
        return self.inner.is_fitted()

    def logits(self, features: np.ndarray) -> np.ndarray:
        return self.inner.logits(features)

    def logit_prior(self) -> np.ndarray:
        return self.inner.logit_prior()

    def diagnostics(self, train: FeatureSet) -> dict[str, Any] | None:
        return self.inner.diagnostics(train)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> "Method":
        self.inner.load_state_dict(state)
        return self


def clone(method: Method) -> Method:
    """A fresh, unfitted copy of ``method`` with the same parameters (deep-copied); the bases
    it wraps are cloned too, except a :class:`Frozen` one, which is kept as is."""
    if isinstance(method, Frozen):
        return method
    params = {}
    for key in method._param_names():
        value = getattr(method, key)
        params[key] = clone(value) if isinstance(value, Method) else copy.deepcopy(value)
    return type(method)(**params)


# ---------------------------------------------------------------------- parameter checks
def check_number(owner: str, key: str, value: Any, *, integer: bool = False, low: float | None = None,
                 high: float | None = None, low_open: bool = False, high_open: bool = False,
                 allow_none: bool = False) -> None:
    """A LongtailError ``"<owner>: <key> = <value> must be a number >= low ..."`` unless ``value`` is
    a finite number (an integer when ``integer``; never a bool) in the given range; ``None`` passes
    when ``allow_none``."""
    if allow_none and value is None:
        return
    ok = isinstance(value, (int, np.integer)) if integer else isinstance(value, (int, float, np.number))
    ok = ok and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and low is not None:
        ok = float(value) > low if low_open else float(value) >= low
    if ok and high is not None:
        ok = float(value) < high if high_open else float(value) <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high:g}")
        kind = "an integer" if integer else "a number"
        extra = " (or null)" if allow_none else ""
        raise LongtailError(f"{owner}: {key} = {value!r} must be {kind} {' and '.join(bounds)}{extra}".rstrip())
