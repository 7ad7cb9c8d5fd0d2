"""The artifact store: stage outputs keyed by content, written once, never overwritten in place.

Layout::

    <root>/<kind>/<key>/            one artifact (kind: e.g. "method", "metrics"; key: hex)
        <name> ...                  the caller's files
        meta.json                   the caller's metadata (JSON)
        _COMPLETE                   written LAST: {"kind", "key", "files": {name: {size, blake2b}}}
    <root>/<kind>/.tmp-<key>-<rand>/    a local write in progress (ignored by readers); its
                                        ``.owner`` file names the writer (host, pid)
    <root>/<kind>/.old-<key>-<rand>/    a replaced artifact being removed (``replace=True``)
    <root>/<kind>/.lock-<key>           a remote write in progress (see below)

Atomicity. A reader only trusts an artifact whose ``_COMPLETE`` marker (the manifest: every
file's size and blake2b, ``meta.json`` included) is there, and that marker is written last. On
the local filesystem the whole directory is written under a temporary name and renamed into
place (one ``rename(2)``), so the artifact appears complete or not at all. Object stores have no
directory rename: there a writer takes the per-key lock ``.lock-<key>`` (an exclusive create, see
:mod:`storage.locks`), writes the files in place and the marker last, then releases the lock; a
second writer of the same key waits for the first's marker and writes nothing. So two writers of
one key never interleave their files, even when their bytes differ (a timestamp in ``meta``).

The caller computes the key (a hex content hash of the inputs, the stage, its parameters and
its code version; see pipeline/); the store never does. The same key means the same bytes, so
:meth:`ArtifactStore.write` of a key that is already complete does nothing. An artifact
directory without ``_COMPLETE`` (a crash on a backend without atomic rename) is not an artifact:
:meth:`ArtifactStore.exists` is False and the next write replaces it.

Replacing. ``write(..., replace=True)`` (a forced recomputation) writes the new artifact whatever
is there: locally the old directory is renamed aside and the new one renamed into place (a reader
sees the old artifact, then for an instant none, then the new one, never a mixture), then the old
one is removed; remotely, under the key's lock, the old marker is deleted first.

Leftovers. A crashed local writer leaves its ``.tmp-``/``.old-`` directory behind; the next writer
of the same kind removes those whose owner is a process of this host that no longer runs (and
those without an owner file older than :data:`ORPHAN_AGE` seconds); a live writer's are kept.

Tensors go through safetensors (:func:`save_tensors` / :func:`load_tensors`), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from longtail.stages.errors import LongtailError
from longtail.storage.fs import check_access, is_local, join
from longtail.storage.locks import DEFAULT_TIMEOUT, WriterLock, pid_alive

log = logging.getLogger("longtail.storage")

MARKER = "_COMPLETE"
META = "meta.json"
_KIND = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_KEY = re.compile(r"^[0-9a-f]{8,128}$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
OWNER = ".owner"
#: seconds after which a temporary directory without an owner file counts as abandoned
ORPHAN_AGE = 3600.0


class CorruptArtifactError(LongtailError):
    """A complete artifact whose files do not match its ``_COMPLETE`` marker (a file edited,
    truncated or missing), or whose marker is unreadable; the message names the file."""


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
    """Content-keyed artifacts under ``root_url`` (local path, ``file://``, ``memory://``,
    ``s3://``, ...). A remote root is probed once here (credentials, endpoint, bucket), so a
    misconfigured store fails before any work. ``lock_timeout``: seconds a writer waits for
    another writer of the same key on a remote store."""

    def __init__(self, root_url: str, *, storage_options: dict | None = None,
                 lock_timeout: float = DEFAULT_TIMEOUT) -> None:
        self.root_url = str(root_url).rstrip("/") or str(root_url)
        self.fs, self.root = check_access(self.root_url, storage_options)
        self.lock_timeout = lock_timeout

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
        try:
            manifest = load_json(raw, join(where, MARKER))
        except LongtailError as e:
            raise CorruptArtifactError(f"{e} (corrupt artifact marker)") from None
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("blake2b"), str)
                for v in files.values()):
            raise CorruptArtifactError(f"{join(where, MARKER)}: corrupt artifact marker (no file list with sizes "
                                       "and hashes)")
        return manifest

    def files(self, kind: str, key: str) -> list[str]:
        """Names of the caller's files in a complete artifact (``meta.json`` excluded)."""
        return sorted(n for n in self._manifest(kind, key)["files"] if n != META)

    def read_meta(self, kind: str, key: str) -> dict:
        """The ``meta`` dict given to :meth:`write`."""
        return load_json(self.read_file(kind, key, META), join(self.url(kind, key), META))

    def read_file(self, kind: str, key: str, name: str) -> bytes:
        """Bytes of file ``name`` of a complete artifact, checked against the size and blake2b
        its ``_COMPLETE`` marker holds. LongtailError when the artifact is missing or incomplete or
        the name is unknown; :class:`CorruptArtifactError` when the file is missing or its size
        or content differs from the marker's."""
        return self._read_listed(kind, key, name, self._manifest(kind, key))

    def _read_listed(self, kind: str, key: str, name: str, manifest: dict) -> bytes:
        """:meth:`read_file` against a marker already read (one marker read per artifact)."""
        where = join(self.url(kind, key), name)
        if name not in manifest["files"]:
            known = ", ".join(sorted(manifest["files"]))
            raise LongtailError(f"{where}: no file {name!r} in artifact (files: {known})")
        try:
            data = self.fs.cat_file(join(self._dir(kind, key), name))
        except FileNotFoundError as e:
            raise CorruptArtifactError(f"{where}: file listed in {MARKER} is missing (corrupt artifact)") from e
        info = manifest["files"][name]
        if len(data) != info["size"]:
            raise CorruptArtifactError(f"{where}: {len(data)} bytes, {info['size']} expected (corrupt artifact)")
        if hashlib.blake2b(data, digest_size=32).hexdigest() != info["blake2b"]:
            raise CorruptArtifactError(f"{where}: content does not match its hash in {MARKER} (corrupt artifact)")
        return data

    def verify(self, kind: str, key: str) -> None:
        """Checks every file's size and blake2b against the marker (what every read checks);
        :class:`CorruptArtifactError` naming the first bad file."""
        manifest = self._manifest(kind, key)
        for name in sorted(manifest["files"]):
            self._read_listed(kind, key, name, manifest)

    # ------------------------------------------------------------------ writing
    def write(self, kind: str, key: str, files: Mapping[str, bytes], meta: Mapping[str, Any] | None = None,
              replace: bool = False) -> str:
        """Writes artifact ``<kind>/<key>`` once; returns its URL.

        Locally everything goes to a temporary sibling ``.tmp-<key>-<rand>`` first, the
        ``_COMPLETE`` marker last, then the directory is renamed into place; remotely the files
        are written in place under the key's lock, the marker last (see the module docstring).
        If the artifact already exists and is complete, nothing is written (same key, same
        bytes). A partial directory (no marker) at the final place is replaced. ``files`` maps
        plain names (no ``/``; not ``meta.json`` or ``_COMPLETE``) to bytes; ``meta`` must be
        JSON-serialisable. ``replace``: write even when the artifact is complete, and replace it
        (a forced recomputation; see the module docstring).
        """
        final = self._dir(kind, key)
        for name, data in files.items():
            if not isinstance(name, str) or not _NAME.match(name) or name in (META, MARKER):
                raise LongtailError(f"{self.url(kind, key)}: bad artifact file name {name!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise TypeError(f"artifact file {name!r}: expected bytes, got {type(data).__name__}")
        if self.exists(kind, key) and not replace:
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
        if is_local(self.fs):
            self._write_local(kind, key, final, payload, manifest, replace)
        else:
            self._write_remote(kind, key, final, payload, manifest, replace)
        if not self.exists(kind, key):  # pragma: no cover - a backend that lost the write
            raise RuntimeError(f"{self.url(kind, key)}: artifact not complete after writing")
        return self.url(kind, key)

    def sweep(self, kind: str) -> list[str]:
        """Removes the ``.tmp-``/``.old-`` directories of ``kind`` that crashed local writers left
        (owner a dead process of this host; or no owner file and older than :data:`ORPHAN_AGE`);
        returns their names. A no-op on remote stores (their writers write in place, under a lock)."""
        base = join(self.root, kind)
        if not is_local(self.fs) or not os.path.isdir(base):
            return []
        removed = []
        host, now = socket.gethostname(), time.time()
        for name in os.listdir(base):
            if not (name.startswith(".tmp-") or name.startswith(".old-")):
                continue
            path = os.path.join(base, name)
            try:
                with open(os.path.join(path, OWNER), encoding="utf-8") as f:
                    owner = json.load(f)
                dead = (isinstance(owner, dict) and owner.get("host") == host and isinstance(owner.get("pid"), int)
                        and owner["pid"] != os.getpid() and not pid_alive(owner["pid"]))
            except (OSError, ValueError):
                try:
                    dead = now - os.stat(path).st_mtime > ORPHAN_AGE
                except OSError:
                    continue
            if dead:
                self.fs.rm(path, recursive=True)
                removed.append(name)
        if removed:
            log.warning("%s: removed %d temporary director%s left by crashed writers: %s", join(self.root_url, kind),
                        len(removed), "y" if len(removed) == 1 else "ies", ", ".join(removed))
        return removed

    def _write_local(self, kind: str, key: str, final: str, payload: dict, manifest: dict, replace: bool) -> None:
        self.sweep(kind)
        tag = uuid.uuid4().hex[:12]
        tmp = join(self.root, kind, f".tmp-{key}-{tag}")
        self.fs.makedirs(tmp, exist_ok=True)
        owner = dump_json({"host": socket.gethostname(), "pid": os.getpid()})
        try:
            self.fs.pipe_file(join(tmp, OWNER), owner)
            for name, data in payload.items():
                self.fs.pipe_file(join(tmp, name), data)
            self.fs.pipe_file(join(tmp, MARKER), dump_json(manifest))
            os.unlink(join(tmp, OWNER))  # an artifact holds the caller's files and its marker only
            if replace and os.path.isdir(final):
                old = join(self.root, kind, f".old-{key}-{tag}")
                os.replace(final, old)  # aside first: rename(2) cannot replace a non-empty directory
                with open(join(old, OWNER), "wb") as f:
                    f.write(owner)
                try:
                    os.replace(tmp, final)
                finally:
                    self.fs.rm(old, recursive=True)
                return
            if os.path.isdir(final) and not os.path.exists(join(final, MARKER)):
                # a partial artifact (hand-made, or an older non-atomic writer): replace it
                self.fs.rm(final, recursive=True)
            try:  # one atomic rename of the whole directory (POSIX rename(2))
                os.replace(tmp, final)
            except OSError:
                # another writer put the same key in place first (the target is a non-empty
                # directory): same key, same bytes, so theirs is as good as ours
                if not os.path.exists(join(final, MARKER)):
                    raise
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp, recursive=True)

    def _write_remote(self, kind: str, key: str, final: str, payload: dict, manifest: dict, replace: bool) -> None:
        lock = WriterLock(self.fs, join(self.root, kind, f".lock-{key}"), join(self.root_url, kind, f".lock-{key}"),
                          f"artifact {self.url(kind, key)}", self.lock_timeout)
        with lock:
            self.fs.invalidate_cache(final)  # listings cached before the wait are stale now
            if self.exists(kind, key) and not replace:  # the writer we waited for completed it
                return
            if replace and self.exists(kind, key):  # the marker first: never a complete mixture
                self.fs.rm_file(join(final, MARKER))
            if self.fs.exists(final):  # a partial artifact from a crashed writer: replace it
                self.fs.rm(final, recursive=True)
            try:
                for name, data in payload.items():
                    self.fs.pipe_file(join(final, name), data)
                self.fs.pipe_file(join(final, MARKER), dump_json(manifest))
            except BaseException:  # still ours (locked) and not an artifact: leave nothing behind
                if self.fs.exists(final) and not self.fs.exists(join(final, MARKER)):
                    self.fs.rm(final, recursive=True)
                raise


__all__ = ["ArtifactStore", "CorruptArtifactError", "dump_json", "load_json", "load_tensors", "save_tensors", "MARKER", "META"]
