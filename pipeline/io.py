"""Small I/O and formatting helpers shared by the pipeline's modules: atomic local writes, the
JSON cleaning of NaN, ``.npy`` bytes, percentages for tables."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place,
    so that a reader never sees half a file; the temporary file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` written atomically to ``path`` (parent directories created)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def json_clean(obj: Any) -> Any:
    """NaN and infinities (a shot group with no class under the absolute rule) become null in
    JSON; numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """``obj`` as indented JSON (NaN as null), written atomically."""
    return write_bytes(path, json.dumps(json_clean(obj), indent=2).encode())


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def pct(v: Any, digits: int = 2) -> str:
    """A fraction as a percentage; ``n/a`` for a missing value (None or NaN)."""
    return "n/a" if v is None or v != v else f"{100 * v:.{digits}f}"
