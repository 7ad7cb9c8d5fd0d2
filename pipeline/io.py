"""Small I/O and formatting helpers shared by the pipeline's modules: atomic local writes, commit
records of multi-file outputs, the JSON cleaning of NaN, ``.npy`` bytes, percentages for tables."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _host_tag() -> str:
    return hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def sweep_temporaries(path: str | os.PathLike) -> list[str]:
    """Removes the temporary files :func:`atomic_write` left next to ``path`` in a crash: those of
    a process of this host that no longer runs (their names carry the pid and a host tag)."""
    from longtail.storage.locks import pid_alive

    path = Path(path)
    prefix, removed = _tmp_prefix(path.name), []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid, _, rest = name[len(prefix):].partition("-")
        host = rest.partition("-")[0]
        if pid.isdigit() and host == _host_tag() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            try:
                os.unlink(path.parent / name)
                removed.append(name)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it into place,
    so that a reader never sees half a file; the temporary file is removed on any failure, and
    those a crashed writer of the same path left are removed first (:func:`sweep_temporaries`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f"{_tmp_prefix(path.name)}{os.getpid()}-{_host_tag()}-", suffix=".tmp",
                               dir=path.parent)
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


def file_digest(path: str | os.PathLike) -> dict:
    """``{"size", "blake2b"}`` of a local file (blake2b, 32 bytes, hex)."""
    h, size = hashlib.blake2b(digest_size=32), 0
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "blake2b": h.hexdigest()}


def drop_commit(out_dir: str | os.PathLike, record: str) -> None:
    """Removes the commit record ``record`` of ``out_dir`` before its files are rewritten, so that an
    interrupted rewrite leaves no record (and is never taken for a complete output)."""
    try:
        os.unlink(os.path.join(out_dir, record))
    except FileNotFoundError:
        pass


def write_commit(out_dir: str | os.PathLike, record: str, key: str, names: list[str]) -> Path:
    """Commits the files ``names`` (relative to ``out_dir``), written one by one, as one output:
    the record ``{"key", "files": {name: {size, blake2b}}}`` is written last (atomically), and
    :func:`read_commit` trusts the files only while each still matches it."""
    files = {n: file_digest(os.path.join(out_dir, n)) for n in sorted(names)}
    return write_bytes(os.path.join(out_dir, record), json.dumps({"key": key, "files": files}, indent=1).encode())


def read_commit(out_dir: str | os.PathLike, record: str) -> tuple[str | None, str | None]:
    """``(key, problem)`` of the output committed by ``record`` in ``out_dir``: the key when every
    file matches the record (problem None); otherwise key None and why (no record: never
    committed, or an interrupted write; a file missing, or changed since)."""
    try:
        with open(os.path.join(out_dir, record), encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, f"no commit record {record} (an interrupted write, or an older version wrote it)"
    except (OSError, ValueError):
        return None, f"{record} is unreadable"
    if not isinstance(doc, dict) or not isinstance(doc.get("key"), str) or not isinstance(doc.get("files"), dict):
        return None, f"{record} is malformed"
    for name, want in sorted(doc["files"].items()):
        try:
            got = file_digest(os.path.join(out_dir, name))
        except OSError:
            return None, f"{name} is missing"
        if got != want:
            return None, f"{name} changed since it was written (size or hash differs from {record})"
    return doc["key"], None


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
