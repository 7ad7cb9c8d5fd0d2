"""Small fsspec helpers shared by the feature store, the artifact store and the importers.

A *URL* here is anything fsspec understands: a plain local path (``runs/features.zarr``), a
``file://`` URL, ``memory://`` (tests) or a remote one (``s3://bucket/key``, with the backend's
package installed). ``storage_options`` are passed to the fsspec filesystem (credentials,
endpoints) and never stored.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from longtail.stages.errors import LongtailError

#: bytes read at a time when hashing a file
HASH_BLOCK = 8 << 20


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``(filesystem, path)`` for a URL; ``path`` is what the filesystem's methods take.

    LongtailError naming the URL when no fsspec backend handles its protocol (unknown, or its
    package, e.g. ``s3fs`` for ``s3://``, is not installed) or the options are not accepted.
    """
    try:
        return fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ImportError as e:
        raise LongtailError(f"{url}: the filesystem package for this URL is not installed ({_one_line(e)})") from e
    except (ValueError, TypeError) as e:
        raise LongtailError(f"{url}: cannot open this URL ({_one_line(e)})") from e


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def remote_error(url: str, exc: BaseException) -> LongtailError:
    """A one-line LongtailError naming ``url`` for a backend failure: missing credentials, an
    unreachable endpoint, access denied; anything else is reported with its type and message.

    Classified by exception class names (botocore, aiohttp), so no backend is imported here.
    """
    names = {t.__name__ for t in type(exc).__mro__}
    text = _one_line(exc)
    if names & {"NoCredentialsError", "PartialCredentialsError", "NoAuthTokenError"}:
        return LongtailError(
            f"{url}: no credentials for this store (for s3:// set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
            f"or a profile, or give them in storage_options) ({text})"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                "ConnectionError", "ServerTimeoutError", "ReadTimeoutError", "TimeoutError"}:
        return LongtailError(f"{url}: cannot reach the storage endpoint ({text})")
    if names & {"PermissionError"} or any(k in text for k in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied")):
        return LongtailError(f"{url}: access denied: check the credentials and permissions ({text})")
    return LongtailError(f"{url}: storage error ({text})")


#: buckets (``""`` for backends without buckets) already probed, by ``id`` of the filesystem
#: instance (fsspec instances compare equal by their arguments alone, so not by the instance)
_PROBED: dict[int, set[str]] = {}


def check_access(url: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``resolve(url)`` plus, for a remote URL, one request that proves the backend answers with
    the credentials at hand, and (for object stores with buckets) that the bucket exists; nothing
    is written. Raises :func:`remote_error`'s LongtailError otherwise. Local paths are not probed.

    A successful probe is remembered for the filesystem instance and bucket (an instance keeps
    the credentials and endpoint it resolved), so the stores that are opened again and again
    while a run goes on cost no request after the first.
    """
    fs, path = resolve(url, storage_options)
    if is_local(fs):
        return fs, path
    split_path = getattr(fs, "split_path", None)  # s3fs and friends: (bucket, key, version)
    try:
        bucket = split_path(path)[0] if split_path is not None else ""
        probed = _PROBED.get(id(fs))
        if probed is not None and bucket in probed:
            return fs, path
        fs.exists(path)
        if bucket and not fs.exists(bucket):
            raise LongtailError(f"{url}: bucket {bucket!r} does not exist (create it first)")
    except LongtailError:
        raise
    except Exception as e:  # backends raise their own types (botocore, aiohttp, ...)
        raise remote_error(url, e) from e
    if probed is None:
        probed = _PROBED[id(fs)] = set()
        weakref.finalize(fs, _PROBED.pop, id(fs), None)  # an id is reused only after this runs
    probed.add(bucket)
    return fs, path


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
