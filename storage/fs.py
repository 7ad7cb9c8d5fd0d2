"""Small fsspec helpers shared by the feature store, the artifact store and the importers.

A *URL* here is anything fsspec understands: a plain local path (``runs/features.zarr``), a
``file://`` URL, ``memory://`` (tests) or a remote one (``s3://bucket/key``, with the backend's
package installed). ``storage_options`` are passed to the fsspec filesystem (credentials,
endpoints) and never stored.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

#: bytes read at a time when hashing a file
HASH_BLOCK = 8 << 20


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URL; ``path`` is what the filesystem's methods take."""
    return fsspec.core.url_to_fs(str(url), **(storage_options or {}))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True for the local filesystem, where ``os`` calls (``os.replace``) apply to ``path``."""
    return isinstance(fs, LocalFileSystem)


def join(base: str, *parts: str) -> str:
    """Joins URL or path components with ``/`` (fsspec paths use ``/`` on every backend)."""
    out = str(base).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def zarr_store(url: str, *, read_only: bool, storage_options: dict[str, Any] | None = None):
    """A Zarr v3 store for ``url``: ``LocalStore`` for local paths, ``FsspecStore`` otherwise."""
    from zarr.storage import FsspecStore, LocalStore

    fs, path = resolve(url, storage_options)
    if is_local(fs):
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(str(url), storage_options=storage_options, read_only=read_only)


def file_hash(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """blake2b (32 bytes, hex) of a file's bytes, read block by block."""
    fs, path = resolve(url, storage_options)
    h = hashlib.blake2b(digest_size=32)
    with fs.open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def json_hash(obj: Any) -> str:
    """blake2b (32 bytes, hex) of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()
