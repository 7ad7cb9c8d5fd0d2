"""The artifact store: stage outputs keyed by content, written once, never overwritten in place.

Layout::

    <root>/<kind>/<key>/            one artifact (kind: e.g. "method", "metrics"; key: hex)
        <name> ...                  the caller's files
        meta.json                   the caller's metadata (JSON)
        _COMPLETE                   written LAST: {"kind", "key", "files": {name: {size, blake2b}}}
    <root>/<kind>/.tmp-<key>-<rand>/    a write in progress (ignored by readers)

The caller computes the key (a hex content hash of the inputs, the stage, its parameters and
its code version; see pipeline/); the store never does. The same key means the same bytes, so
:meth:`ArtifactStore.write` of a key that is already complete does nothing. An artifact
directory without ``_COMPLETE`` (a crash on a backend without atomic rename) is not an artifact:
:meth:`ArtifactStore.exists` is False and the next write replaces it.

Tensors go through safetensors (:func:`save_tensors` / :func:`load_tensors`), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from stages.errors import LongtailError
from storage.fs import is_local, join, resolve

MARKER = "_COMPLETE"
META = "meta.json"
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_KEY = re.compile(r"^[0-9a-f]{8,128}$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


# ---------------------------------------------------------------------------------------- JSON
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def dump_json(obj: Any) -> bytes:
    """UTF-8 JSON bytes with sorted keys and a final newline; numpy scalars and arrays become
    numbers and lists. NaN and infinity are refused (``ValueError``): JSON has no such values."""
    text = json.dumps(obj, sort_keys=True, indent=2, default=_json_default, allow_nan=False)
    return (text + "\n").encode("utf-8")


def load_json(data: bytes, where: str = "JSON") -> Any:
    """Parses JSON bytes; LongtailError naming ``where`` when they are not valid JSON."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise LongtailError(f"{where}: not valid JSON ({e})") from e


# ---------------------------------------------------------------------------------------- tensors
def save_tensors(state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """safetensors bytes of a ``{name: torch.Tensor}`` dict (e.g. a method's ``state_dict()``).

    Tensors are detached, moved to CPU and copied (safetensors refuses shared storage). A value
    that is not a tensor is a bug in the caller: ``TypeError`` naming the key.
    """
    import torch
    from safetensors.torch import save

    out = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"save_tensors: {name!r} is a {type(value).__name__}, not a torch.Tensor")
        out[str(name)] = value.detach().to("cpu").contiguous().clone()
    return save(out, metadata=dict(metadata) if metadata else None)


def load_tensors(data: bytes, where: str = "tensors", device: str = "cpu") -> dict:
    """``{name: torch.Tensor}`` from safetensors bytes (no unpickling). LongtailError naming
    ``where`` when the bytes are not a safetensors file."""
    from safetensors.torch import load

    try:
        state = load(bytes(data))
    except Exception as e:  # safetensors raises its own SafetensorError and others
        raise LongtailError(f"{where}: not a readable safetensors file ({type(e).__name__}: {e})") from e
    if device != "cpu":
        state = {k: v.to(device) for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------- the store
class ArtifactStore:
    """Content-keyed artifacts under ``root_url`` (local path, ``file://``, ``memory://``, ...)."""

    def __init__(self, root_url: str, *, storage_options: dict | None = None) -> None:
        self.root_url = str(root_url).rstrip("/") or str(root_url)
        self.fs, self.root = resolve(self.root_url, storage_options)

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root_url!r})"

    # ------------------------------------------------------------------ names
    def _check(self, kind: str, key: str) -> None:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise LongtailError(f"{self.root_url}: bad artifact kind {kind!r} (lower-case letters, digits, - and _)")
        if not isinstance(key, str) or not _KEY.match(key):
            raise LongtailError(f"{self.root_url}: bad artifact key {key!r} (8 to 128 lower-case hex digits)")

    def _dir(self, kind: str, key: str) -> str:
        self._check(kind, key)
        return join(self.root, kind, key)

    def url(self, kind: str, key: str) -> str:
        """URL of the artifact directory ``<root>/<kind>/<key>`` (whether or not it exists)."""
        self._check(kind, key)
        return join(self.root_url, kind, key)

    def local_path(self, kind: str, key: str) -> str | None:
        """The artifact directory as a local path, or None when the store is not local."""
        return self._dir(kind, key) if is_local(self.fs) else None

    # ------------------------------------------------------------------ queries
    def exists(self, kind: str, key: str) -> bool:
        """True when the artifact is complete (its ``_COMPLETE`` marker is there)."""
        return self.fs.exists(join(self._dir(kind, key), MARKER))

    def keys(self, kind: str) -> list[str]:
        """Sorted keys of the complete artifacts of ``kind`` (partial and temporary ones left out)."""
        if not _KIND.match(kind):
            raise LongtailError(f"{self.root_url}: bad artifact kind {kind!r}")
        base = join(self.root, kind)
        if not self.fs.exists(base):
            return []
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if _KEY.match(n) and self.exists(kind, n))

    def _manifest(self, kind: str, key: str) -> dict:
        d = self._dir(kind, key)
        where = f"{self.url(kind, key)}"
        try:
            raw = self.fs.cat_file(join(d, MARKER))
        except FileNotFoundError:
            if self.fs.exists(d):
                raise LongtailError(f"{where}: artifact is incomplete (no {MARKER} marker); rerun the stage") from None
            raise LongtailError(f"{where}: no such artifact") from None
        manifest = load_json(raw, join(where, MARKER))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise LongtailError(f"{join(where, MARKER)}: corrupt artifact marker (no file list)")
        return manifest

    def files(self, kind: str, key: str) -> list[str]:
        """Names of the caller's files in a complete artifact (``meta.json`` excluded)."""
        return sorted(n for n in self._manifest(kind, key)["files"] if n != META)

    def read_meta(self, kind: str, key: str) -> dict:
        """The ``meta`` dict given to :meth:`write`."""
        return load_json(self.read_file(kind, key, META), join(self.url(kind, key), META))

    def read_file(self, kind: str, key: str, name: str) -> bytes:
        """Bytes of file ``name`` of a complete artifact; LongtailError when the artifact is
        missing or incomplete, the name is unknown, or the file's size differs from the marker's."""
        manifest = self._manifest(kind, key)
        where = join(self.url(kind, key), name)
        if name not in manifest["files"]:
            known = ", ".join(sorted(manifest["files"]))
            raise LongtailError(f"{where}: no file {name!r} in artifact (files: {known})")
        try:
            data = self.fs.cat_file(join(self._dir(kind, key), name))
        except FileNotFoundError as e:
            raise LongtailError(f"{where}: file listed in {MARKER} is missing (corrupt artifact)") from e
        if len(data) != manifest["files"][name]["size"]:
            raise LongtailError(f"{where}: {len(data)} bytes, {manifest['files'][name]['size']} expected (corrupt artifact)")
        return data

    def verify(self, kind: str, key: str) -> None:
        """Checks every file's blake2b against the marker; LongtailError naming the first bad one."""
        manifest = self._manifest(kind, key)
        for name, info in manifest["files"].items():
            if hashlib.blake2b(self.read_file(kind, key, name), digest_size=32).hexdigest() != info["blake2b"]:
                raise LongtailError(f"{join(self.url(kind, key), name)}: content does not match its hash (corrupt artifact)")

    # ------------------------------------------------------------------ writing
    def write(self, kind: str, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any] | None = None) -> str:
        """Writes artifact ``<kind>/<key>`` once; returns its URL.

        Everything goes to a temporary sibling ``.tmp-<key>-<rand>`` first, the ``_COMPLETE``
        marker last, then the directory is renamed into place. If the artifact already exists
        and is complete, nothing is written (same key, same bytes). A partial directory (no
        marker) at the final place is replaced. ``files`` maps plain names (no ``/``; not
        ``meta.json`` or ``_COMPLETE``) to bytes; ``meta`` must be JSON-serialisable.
        """
        final = self._dir(kind, key)
        for name, data in files.items():
            if not isinstance(name, str) or not _NAME.match(name) or name in (META, MARKER):
                raise LongtailError(f"{self.url(kind, key)}: bad artifact file name {name!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"artifact file {name!r}: expected bytes, got {type(data).__name__}")
        if self.exists(kind, key):
            return self.url(kind, key)

        payload = {name: bytes(data) for name, data in files.items()}
        payload[META] = dump_json(dict(meta or {}))
        manifest = {
            "kind": kind,
            "key": key,
            "files": {
                n: {"size": len(b), "blake2b": hashlib.blake2b(b, digest_size=32).hexdigest()}
                for n, b in sorted(payload.items())
            },
        }
        tmp = join(self.root, kind, f".tmp-{key}-{uuid.uuid4().hex[:12]}")
        self.fs.makedirs(tmp, exist_ok=True)
        try:
            for name, data in payload.items():
                self.fs.pipe_file(join(tmp, name), data)
            self.fs.pipe_file(join(tmp, MARKER), dump_json(manifest))
            self._move_into_place(tmp, final, list(payload))
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)
        if not self.exists(kind, key):  # pragma: no cover - a backend that lost the rename
            raise RuntimeError(f"{self.url(kind, key)}: artifact not complete after writing")
        return self.url(kind, key)

    def _move_into_place(self, tmp: str, final: str, names: list[str]) -> None:
        if self.fs.exists(final) and not self.fs.exists(join(final, MARKER)):
            # a partial artifact from a crashed write on a non-atomic backend: replace it
            self.fs.rm(final, recursive=True)
        if is_local(self.fs):
            # one atomic rename of the whole directory (POSIX rename(2))
            try:
                os.replace(tmp, final)
            except OSError:
                # another writer put the same key in place first (the target is a non-empty
                # directory): same key, same bytes, so theirs is as good as ours
                if not self.fs.exists(join(final, MARKER)):
                    raise
            return
        if self.fs.exists(join(final, MARKER)):  # another writer won the race
            return
        # Object stores have no directory rename: move file by file, the marker last, so a
        # crash leaves a directory without marker (not an artifact). Atomicity of each move
        # is per the backend.
        for name in names:
            self.fs.mv(join(tmp, name), join(final, name))
        self.fs.mv(join(tmp, MARKER), join(final, MARKER))


__all__ = ["ArtifactStore", "dump_json", "load_json", "load_tensors", "save_tensors", "MARKER", "META"]
