"""Cache keys and lineage: every artifact is keyed by the content of what produced it.

key = hash(input fingerprints, stage name, stage parameters, the stage's code version).

A code version is the hash of the source of a stage's **import closure**: the modules it names,
and every module of the project they import (top-level and function-local imports, found by
parsing the source, never by importing it), transitively. The project is ``longtail.*`` (the
``stages``, ``storage``, ``pipeline`` and ``flows`` folders); a user's method module brings its own
top-level package along (its imports inside that package are followed too). The method registry
(``longtail.stages.registry``) is left out: it imports every method module, and a method's key
must not change when another method is edited. So editing a loss invalidates the heads whose
closure holds it, editing ``stages/evaluate.py`` invalidates ``tau-norm`` (which chooses tau with
it) and the evaluation, and editing extraction code invalidates neither.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

PROJECT = "longtail"
_HERE = Path(__file__).resolve().parent
#: where the project's packages live (``package-dir`` maps ``longtail.X`` to the folder ``X``)
PROJECT_ROOTS: dict[str, Path] = {f"{PROJECT}.{pkg}": _HERE.parent / pkg
                                  for pkg in ("stages", "storage", "pipeline", "flows")}
#: modules whose source never enters a closure
EXCLUDED = frozenset({f"{PROJECT}.stages.registry"})


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float, np.integer, np.floating)):
        return repr(float(obj))  # exact for floats, and 1 and 1.0 hash alike
    return obj


def stable_hash(*parts: Any, size: int = 16) -> str:
    """Hex digest of a JSON rendering with sorted keys (dicts, lists, numbers, strings)."""
    h = hashlib.blake2b(digest_size=size)
    h.update(json.dumps(_jsonable(list(parts)), sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def files_version(paths: Iterable[Path]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for p in sorted({Path(p).resolve() for p in paths}):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- import closures
def _user_root(module: str) -> tuple[str, Path] | None:
    """``(top-level name, its folder or file)`` of a module outside the project, or None when it
    cannot be found (a built-in, a namespace without files)."""
    top = module.split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        return (top, Path(locations[0])) if locations else None
    return (top, Path(spec.origin)) if spec.origin and spec.origin.endswith(".py") else None


def _resolve(name: str, roots: Mapping[str, Path]) -> Path | None:
    """The source file of module ``name`` under the longest matching root, or None."""
    for prefix in sorted(roots, key=len, reverse=True):
        if name != prefix and not name.startswith(prefix + "."):
            continue
        root = roots[prefix]
        if root.suffix == ".py":  # a single-file top-level module
            return root if name == prefix else None
        rest = name[len(prefix):].lstrip(".").split(".") if name != prefix else []
        base = root.joinpath(*rest)
        for cand in (base.with_name(base.name + ".py") if rest else None, base / "__init__.py"):
            if cand is not None and cand.is_file():
                return cand
        return None
    return None


#: CPython 3.11's parser is not thread-safe ("AST constructor recursion depth mismatch" when
#: threads parse at once, as the threads task runner's method tasks do): one parse at a time, and
#: each source parsed once per process (keyed by its bytes, so an edited file is parsed again)
_PARSE_LOCK = threading.Lock()
_PARSED: dict[tuple[str, str, bytes], tuple[str, ...]] = {}


def _imported(path: Path, module: str) -> tuple[str, ...]:
    """Every module name ``path`` imports, anywhere in it (relative imports resolved); for ``from
    A import b`` both ``A`` and ``A.b`` (which of them is a module is decided by resolving)."""
    source = path.read_bytes()
    key = (str(path), module, hashlib.blake2b(source, digest_size=16).digest())
    with _PARSE_LOCK:
        if key not in _PARSED:
            _PARSED[key] = tuple(_imports_of(ast.parse(source, str(path)), path, module))
        return _PARSED[key]


def _imports_of(tree: ast.AST, path: Path, module: str) -> Iterable[str]:
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                up = parts[: len(parts) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def import_closure(modules: Iterable[str], roots: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """``{module name: source file}`` of ``modules`` and every module of the project (and of the
    user packages ``modules`` belong to) they import, transitively, less :data:`EXCLUDED`.

    ``roots`` maps package names to folders (default :data:`PROJECT_ROOTS`); a test points them at
    a temporary copy of the tree."""
    roots = dict(PROJECT_ROOTS if roots is None else roots)
    todo = list(modules)
    for name in todo:
        if not any(name == p or name.startswith(p + ".") for p in roots):
            found = _user_root(name)
            if found is not None:
                roots.setdefault(*found)
    out: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in out or name in EXCLUDED:
            continue
        path = _resolve(name, roots)
        if path is None:
            continue
        out[name] = path
        todo.extend(m for m in _imported(path, name) if m not in out)
    return out


def code_version(modules: Iterable[str], roots: Mapping[str, Path] | None = None) -> str:
    """Hash of the source of the import closure of ``modules`` (module names and bytes)."""
    h = hashlib.blake2b(digest_size=8)
    for name, path in sorted(import_closure(modules, roots).items()):
        h.update(name.encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def method_modules(method: Any) -> set[str]:
    """The modules a method runs: those of every class in its wrapper chain (their bases
    included) and those its shared artifacts name (``Requirement.modules``)."""
    mods: set[str] = set()
    for m in method.chain():
        mods |= {cls.__module__ for cls in type(m).__mro__ if cls.__module__ != "builtins"}
    for req in method.requirements():
        mods |= set(req.modules)
    return mods


def method_code_version(method: Any, roots: Mapping[str, Path] | None = None) -> str:
    """Source hash of what a method runs: the import closure of :func:`method_modules`."""
    return code_version(method_modules(method), roots)


def extract_code_version() -> str:
    """Source hash of the extraction (the files themselves, as the stores already made record it:
    a complete store is never overwritten, so this key must not move with unrelated code)."""
    stages = PROJECT_ROOTS[f"{PROJECT}.stages"]
    return files_version([stages / "extract.py", stages / "datasets.py"])


def without_device(params: Mapping[str, Any]) -> dict:
    """Parameters that decide a result: the device does not (a GPU fit is the same artifact)."""
    return {k: without_device(v) if isinstance(v, Mapping) else v for k, v in params.items() if k != "device"}


def with_device(params: Mapping[str, Any], device: str) -> dict:
    """``params`` with every ``device`` entry (nested wrapper mappings too) set to ``device``."""
    return {k: device if k == "device" else with_device(v, device) if isinstance(v, Mapping) else v
            for k, v in params.items()}
