"""The method interface and the registry.

Every stage-2 method (a head, a composite such as DLSA, a post-hoc wrapper such as PC-Softmax)
follows one contract, in the spirit of scikit-learn estimators:

* hyper-parameters are keyword arguments of ``__init__`` and are only stored there;
* ``fit(train, val=None)`` validates, calls the private hook ``_fit`` and returns ``self``;
* ``logits(features)`` returns unnormalised class scores ``(N, C)`` as float32 numpy;
* learned state ends in ``_``;
* ``state_dict()`` / ``load_state_dict()`` hold tensors only (saved with safetensors, never
  pickled objects).

A registry maps lower-kebab-case names to classes. Wrappers compose by name with ``+``:
``ce+pc`` is PC-Softmax around ``ce``; prefix wrappers (``dlsa+cosine``) wrap what follows them.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError


class Method:
    """Base class of every method that turns features into class scores."""

    #: registry name, set by :func:`register`
    name: ClassVar[str] = ""
    #: Whether ``fit`` needs the whole train split in memory as one :class:`FeatureSet`. True by
    #: default, and for every method that trains on all rows (the heads, LADE, DLSA): the pipeline
    #: then reads the train split in full for the fit. A method whose fit uses only the split's
    #: metadata (class counts, dimension) and the val split sets it False (the post-hoc wrappers
    #: ``+pc`` and ``+ts`` around an already fitted base): the pipeline then fits it on the train
    #: split's class means, computed chunk by chunk (:func:`pipeline.runner.fit_split`). Logits
    #: never need a whole split: the pipeline computes them chunk by chunk from the store
    #: (:func:`pipeline.runner.split_logits`). See :func:`needs_full_split`.
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
        """Constructor parameters, as stored (JSON-friendly for plain values)."""
        out = {}
        for key in self._param_names():
            value = getattr(self, key)
            out[key] = value.get_params() | {"name": value.name} if isinstance(value, Method) else value
        return out

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ public API
    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "Method":
        """Fit on ``train`` (``val`` only for choices the method makes on validation data)."""
        if not isinstance(train, FeatureSet):
            raise TypeError("fit expects a FeatureSet")
        train.check_train()
        if val is not None:
            val.require_labels()
            if val.dim != train.dim:
                raise LongtailError(
                    f"val features have dimension {val.dim}, train features {train.dim}"
                )
        self.num_classes_ = train.num_classes
        self.dim_ = train.dim
        self.source_prior_ = train.prior
        self._fit(train, val)
        return self

    def logits(self, features: np.ndarray) -> np.ndarray:
        """Unnormalised class scores, ``(N, C)`` float32."""
        self._check_fitted()
        feats = np.asarray(features, dtype=np.float32)
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
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.logits(features).argmax(axis=1)

    def check_params(self, num_classes: int) -> None:
        """Checks of the parameters that need the number of classes (a prior's length, ...),
        run by the pipeline before any work so that a bad value fails in seconds. Default: none."""

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
        self.num_classes_ = int(state["_num_classes"])
        self.dim_ = int(state["_dim"])
        self.source_prior_ = state["_source_prior"].numpy().astype(np.float64)
        self._load_state({k: v for k, v in state.items() if not k.startswith("_")})
        return self

    # ------------------------------------------------------------------ hooks
    def _fit(self, train: FeatureSet, val: FeatureSet | None) -> None:
        raise NotImplementedError

    def _logits(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def is_fitted(self) -> bool:
        return hasattr(self, "num_classes_")

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit() first")


class Wrapper(Method):
    """A method that wraps another (post-hoc calibration, composite filters).

    Subclasses take the wrapped method as their first constructor argument ``base``.
    ``state_dict`` nests the base's state under ``base.``.
    """

    def __init__(self, base: Method):
        self.base = base

    def check_params(self, num_classes: int) -> None:
        self.base.check_params(num_classes)

    def fit(self, train: FeatureSet, val: FeatureSet | None = None) -> "Method":
        """Fit the wrapped method unless it is already fitted (a cached base is reused as is),
        then the wrapper's own hook ``_fit``."""
        if not self.base.is_fitted():
            self.base.fit(train, val)
        return super().fit(train, val)

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


# ---------------------------------------------------------------------- registry
METHODS: dict[str, type[Method]] = {}
SUFFIX_WRAPPERS: dict[str, type[Wrapper]] = {}
PREFIX_WRAPPERS: dict[str, type[Wrapper]] = {}


def register(name: str, kind: str = "method") -> Callable[[type], type]:
    """Class decorator: ``@register("balanced-softmax")``.

    ``kind`` is ``"method"`` for a base method, ``"suffix"`` for a wrapper written after the
    base (``ce+pc``), ``"prefix"`` for one written before it (``dlsa+ce``).
    """
    table = {"method": METHODS, "suffix": SUFFIX_WRAPPERS, "prefix": PREFIX_WRAPPERS}[kind]

    def deco(cls: type) -> type:
        if name in table:
            raise RuntimeError(f"method name {name!r} registered twice")
        cls.name = name
        table[name] = cls
        return cls

    return deco


def _construct(cls: type[Method], params: dict[str, Any], full_name: str, **fixed: Any) -> Method:
    allowed = set(cls._param_names()) - set(fixed)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise LongtailError(
            f"method {full_name!r}: unknown parameter(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    try:
        return cls(**fixed, **params)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LongtailError):
            raise
        raise LongtailError(f"method {full_name!r}: bad parameters: {exc}") from exc


def make_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Build a method from its registry name and parameters.

    For composite names, ``params`` holds the base method's parameters; a wrapper's own parameters
    go in a nested dict under the wrapper's name (``{"epochs": 30, "pc": {"target_prior": [...]}}``).
    """
    _ensure_registered()
    params = dict(params or {})
    parts = name.split("+")
    base_pos = [i for i, p in enumerate(parts) if p in METHODS]
    if len(base_pos) != 1:
        known = ", ".join(sorted(METHODS))
        raise LongtailError(f"unknown method {name!r} (known methods: {known}; suffix: "
                            f"{', '.join('+' + s for s in sorted(SUFFIX_WRAPPERS)) or 'none'}; "
                            f"prefix: {', '.join(p + '+' for p in sorted(PREFIX_WRAPPERS)) or 'none'})")
    i = base_pos[0]
    prefixes, base_name, suffixes = parts[:i], parts[i], parts[i + 1:]
    for p in prefixes:
        if p not in PREFIX_WRAPPERS:
            raise LongtailError(f"unknown method {name!r}: {p!r} is not a wrapper that goes before a head")
    for s in suffixes:
        if s not in SUFFIX_WRAPPERS:
            raise LongtailError(f"unknown method {name!r}: {s!r} is not a wrapper that goes after a head")
    wrapper_params = {}
    for w in prefixes + suffixes:
        sub = params.pop(w, {})
        if not isinstance(sub, dict):
            raise LongtailError(f"method {name!r}: parameters of {w!r} must be a mapping")
        wrapper_params[w] = sub
    method = _construct(METHODS[base_name], params, name)
    for w in list(reversed(prefixes)) + suffixes:
        cls = PREFIX_WRAPPERS.get(w) or SUFFIX_WRAPPERS[w]
        method = _construct(cls, wrapper_params[w], name, base=method)
    return method


def needs_full_split(method: Method) -> bool:
    """Whether fitting ``method`` as it stands needs the whole train split in memory: its own
    :attr:`Method.needs_full_split`, or that of a wrapped method that is not fitted yet (a wrapper's
    ``fit`` fits its base first)."""
    m: Method | None = method
    while m is not None:
        if type(m).needs_full_split:
            return True
        base = getattr(m, "base", None)
        m = base if isinstance(base, Method) and not base.is_fitted() else None
    return False


def known_methods() -> list[str]:
    _ensure_registered()
    return sorted(METHODS)


def _ensure_registered() -> None:
    """Import the modules that register methods (one registry line per module)."""
    import longtail.stages.registry  # noqa: F401  (side effect: registration)
