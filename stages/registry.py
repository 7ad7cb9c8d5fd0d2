"""The registry: the lower-kebab-case names of configs, mapped to method classes.

A class is registered by declaring ``name`` (and ``kind``: ``"method"``, the default; ``"suffix"``
for a wrapper written after its base, ``ce+pc``; ``"prefix"`` for one written before it,
``dlsa+ce``) in one of the modules below. Adding a method is one module plus one line here. The
method modules never import this one (no import cycle).

Names compose with ``+``: ``<prefix>+...+<base>+<suffix>+...``. Prefix wrappers wrap what follows
them, suffix wrappers what precedes them, and the suffixes are outside the prefixes
(``dlsa+ce+pc`` is PC-Softmax around DLSA around ``ce``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from longtail.stages import heads  # noqa: F401
from longtail.stages import decoupled  # noqa: F401
from longtail.stages import calibrate  # noqa: F401
from longtail.stages import lade  # noqa: F401
from longtail.stages import dlsa  # noqa: F401
from longtail.stages import cala  # noqa: F401
from longtail.stages import bcts  # noqa: F401
from longtail.stages import meta  # noqa: F401
from longtail.stages.base import Frozen, Method, Wrapper
from longtail.stages.errors import LongtailError

#: the modules whose classes register (the lines above)
MODULES: tuple[ModuleType, ...] = (heads, decoupled, calibrate, lade, dlsa, cala, bcts, meta)

METHODS: dict[str, type[Method]] = {}
SUFFIX_WRAPPERS: dict[str, type[Wrapper]] = {}
PREFIX_WRAPPERS: dict[str, type[Wrapper]] = {}
_TABLES = {"method": METHODS, "suffix": SUFFIX_WRAPPERS, "prefix": PREFIX_WRAPPERS}


def _classes(module: ModuleType) -> list[type[Method]]:
    """The classes of ``module`` (and of its submodules, for a package) that declare a ``name``."""
    found = [obj for obj in vars(module).values()
             if isinstance(obj, type) and issubclass(obj, Method) and vars(obj).get("name")
             and (obj.__module__ == module.__name__ or obj.__module__.startswith(module.__name__ + "."))]
    return sorted(set(found), key=lambda c: c.name)


def _register(cls: type[Method]) -> None:
    if cls.kind not in _TABLES:
        raise RuntimeError(f"{cls.__qualname__}: kind {cls.kind!r} is not one of {', '.join(_TABLES)}")
    if (cls.kind == "method") == issubclass(cls, Wrapper):
        raise RuntimeError(f"{cls.__qualname__}: a {cls.kind!r} must {'not ' * (cls.kind == 'method')}be a Wrapper")
    for table in _TABLES.values():
        if cls.name in table and table[cls.name] is not cls:
            raise RuntimeError(f"method name {cls.name!r} registered twice ({table[cls.name].__qualname__}, "
                               f"{cls.__qualname__})")
    _TABLES[cls.kind][cls.name] = cls


for _module in MODULES:
    for _cls in _classes(_module):
        _register(_cls)


# ---------------------------------------------------------------------- names
@dataclass(frozen=True)
class MethodName:
    """A composite name split into its parts: ``dlsa+ce+pc`` is ``(("dlsa",), "ce", ("pc",))``."""

    prefixes: tuple[str, ...]
    base: str
    suffixes: tuple[str, ...]

    def __str__(self) -> str:
        return "+".join((*self.prefixes, self.base, *self.suffixes))

    @property
    def outer(self) -> str | None:
        """The outermost wrapper's name (the last suffix, else the first prefix), ``None`` for a
        plain method."""
        if self.suffixes:
            return self.suffixes[-1]
        return self.prefixes[0] if self.prefixes else None

    @property
    def inner_name(self) -> str | None:
        """The name without the outermost wrapper (what it wraps), ``None`` for a plain method."""
        if self.suffixes:
            return str(MethodName(self.prefixes, self.base, self.suffixes[:-1]))
        if self.prefixes:
            return str(MethodName(self.prefixes[1:], self.base, ()))
        return None


def _unknown(name: str) -> LongtailError:
    return LongtailError(
        f"unknown method {name!r} (known methods: {', '.join(sorted(METHODS))}; suffix: "
        f"{', '.join('+' + s for s in sorted(SUFFIX_WRAPPERS)) or 'none'}; "
        f"prefix: {', '.join(p + '+' for p in sorted(PREFIX_WRAPPERS)) or 'none'})")


def parse_name(name: str) -> MethodName:
    """Split ``name`` into prefix wrappers, the base method and suffix wrappers.

    The base part is the one part that is no wrapper; it need not be registered (a user method's
    name, built from its ``target``). A LongtailError when no such split exists.
    """
    if not isinstance(name, str) or not name:
        raise LongtailError(f"method name {name!r} must be a non-empty string")
    parts = name.split("+")
    for i, part in enumerate(parts):
        if (part and part not in PREFIX_WRAPPERS and part not in SUFFIX_WRAPPERS
                and all(p in PREFIX_WRAPPERS for p in parts[:i])
                and all(s in SUFFIX_WRAPPERS for s in parts[i + 1:])):
            return MethodName(tuple(parts[:i]), part, tuple(parts[i + 1:]))
    bases = [p for p in parts if p in METHODS]
    if len(bases) == 1:
        i = parts.index(bases[0])
        for p in parts[:i]:
            if p not in PREFIX_WRAPPERS:
                raise LongtailError(f"unknown method {name!r}: {p!r} is not a wrapper that goes before a head")
        for s in parts[i + 1:]:
            if s not in SUFFIX_WRAPPERS:
                raise LongtailError(f"unknown method {name!r}: {s!r} is not a wrapper that goes after a head")
    raise _unknown(name)


# ---------------------------------------------------------------------- construction
def _construct(cls: type[Method], params: dict[str, Any], owner: str, **fixed: Any) -> Method:
    allowed = set(cls._param_names()) - set(fixed)
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise LongtailError(
            f"{owner}: unknown parameter(s) {', '.join(unknown)} "
            f"(allowed: {', '.join(sorted(allowed)) or 'none'})"
        )
    try:
        return cls(**fixed, **params)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, LongtailError):
            raise
        raise LongtailError(f"{owner}: bad parameters: {exc}") from exc


_TARGETS: dict[tuple[type, str], type[Method]] = {}


def _target_class(target: str, name: str) -> type[Method]:
    """The user's method class ``pkg.module:Class``, under the config's ``name``."""
    owner = f"method target {target!r}"
    if not isinstance(target, str) or target.count(":") != 1 or not all(target.split(":")):
        raise LongtailError(f"{owner} must look like 'package.module:Class'")
    mod_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:  # any failure of the user's import is their mistake, said in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LongtailError(f"{owner}: cannot import {mod_name!r} ({type(exc).__name__}: {first})") from exc
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise LongtailError(f"{owner}: module {mod_name!r} has no {cls_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Method)) or issubclass(cls, (Wrapper, Frozen)):
        raise LongtailError(f"{owner}: {cls_name!r} is not a method class (a subclass of "
                            "longtail.stages.base.Method, e.g. of longtail.stages.heads.TrainedHead)")
    if cls.name == name:
        return cls
    key = (cls, name)
    if key not in _TARGETS:  # the same class under the config's name, for messages and clone()
        _TARGETS[key] = type(cls.__name__, (cls,), {"name": name, "__module__": cls.__module__,
                                                    "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
    return _TARGETS[key]


def make_method(name: str, params: dict[str, Any] | None = None, *, target: str | None = None) -> Method:
    """Build a method from its name and parameters.

    For composite names, ``params`` holds the base method's parameters; a wrapper's own
    parameters go in a nested dict under the wrapper's name (``{"epochs": 30, "pc":
    {"target_prior": [...]}}``). With ``target = "pkg.module:Class"`` the base part of ``name`` is
    built from that class (a user's method, a subclass of :class:`~longtail.stages.base.Method`).
    """
    parsed = parse_name(name)
    if target is not None:
        cls = _target_class(target, parsed.base)
        owner = f"method target {target!r}"
    elif parsed.base in METHODS:
        cls, owner = METHODS[parsed.base], f"method {name!r}"
    else:
        raise _unknown(name)
    params = dict(params or {})
    wrapper_params = {}
    for w in parsed.prefixes + parsed.suffixes:
        sub = params.pop(w, {})
        if not isinstance(sub, dict):
            raise LongtailError(f"method {name!r}: parameters of {w!r} must be a mapping")
        wrapper_params[w] = sub
    method = _construct(cls, params, owner)
    for w in list(reversed(parsed.prefixes)) + list(parsed.suffixes):
        wcls = PREFIX_WRAPPERS.get(w) or SUFFIX_WRAPPERS[w]
        method = _construct(wcls, wrapper_params[w], f"method {name!r}", base=method)
    return method


def known_methods() -> list[str]:
    """The registered base methods' names, sorted."""
    return sorted(METHODS)


def needs_full_split(method: Method) -> bool:
    """Whether fitting ``method`` needs the whole train split in memory: the
    :attr:`~longtail.stages.base.Method.needs_full_split` of any method its fit fits (the chain
    down to a :class:`~longtail.stages.base.Frozen` base)."""
    return any(type(m).needs_full_split for m in method.chain() if not isinstance(m, Frozen))
