"""Cache keys and lineage: every artifact is keyed by the content of what produced it.

key = hash(input fingerprints, stage name, stage parameters, the stage's code version).
The code version is a hash of the source files the stage runs, so editing a loss invalidates the
heads that use it and nothing else.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np

_STAGES_DIR = Path(__file__).resolve().parent.parent / "stages"


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


def _module_file(obj: Any) -> Path | None:
    mod = sys.modules.get(getattr(obj, "__module__", ""), None)
    try:
        return Path(inspect.getfile(mod)) if mod is not None else None
    except TypeError:
        return None


def method_code_version(method: Any) -> str:
    """Source hash of what a method runs: its classes' modules (wrappers and bases included),
    the shared interface and data modules, and the loss modules."""
    files: set[Path] = {_STAGES_DIR / "base.py", _STAGES_DIR / "data.py", _STAGES_DIR / "device.py"}
    files |= set((_STAGES_DIR / "losses").glob("*.py"))
    m = method
    while m is not None:
        for cls in type(m).__mro__:
            f = _module_file(cls)
            if f is not None and f.is_relative_to(_STAGES_DIR):
                files.add(f)
        if callable(getattr(m, "table_params", None)):  # fitted on a neighbour table
            files.add(_STAGES_DIR / "neighbours.py")
        m = getattr(m, "base", None)
    return files_version(files)


def extract_code_version() -> str:
    return files_version([_STAGES_DIR / "extract.py", _STAGES_DIR / "datasets.py"])


def table_code_version() -> str:
    """Source hash of the neighbour-table code (a table does not depend on the method that uses it)."""
    return files_version([_STAGES_DIR / "neighbours.py"])


def evaluate_code_version() -> str:
    """Source hash of the evaluation: metrics, label-shift protocol, prior estimators, group
    metrics, the runner."""
    names = ("evaluate.py", "label_shift.py", "priors.py", "shift.py", "calibrate.py")
    here = Path(__file__).parent
    return files_version([_STAGES_DIR / n for n in names] + [here / "runner.py", here / "glt.py"])


def report_code_version() -> str:
    """Source hash of the report: plots and page (stages/report.py) and its tables (the runner,
    the group tables)."""
    here = Path(__file__).parent
    return files_version([_STAGES_DIR / "report.py", here / "runner.py", here / "glt.py"])
