"""Whether a feature store is there, and complete: :func:`store_status`, in one metadata read."""

from __future__ import annotations

import json
from typing import Literal

from longtail.stages.errors import LongtailError
from longtail.storage.featurestore.schema import CorruptStoreError
from longtail.storage.fs import check_access, join, remote_error

Status = Literal["missing", "incomplete", "complete"]


def root_attrs(url: str, storage_options: dict | None) -> dict | None:
    """The root group's attributes, or ``None`` when nothing (or an empty directory) is there.

    Reads ``zarr.json`` directly (the Zarr v3 group document), so a status check is one read.
    """
    return read_root_attrs(url, *check_access(url, storage_options))


def read_root_attrs(url: str, fs, path: str) -> dict | None:
    """:func:`root_attrs` on a filesystem already resolved (and checked) for ``url``."""
    try:
        if not fs.exists(path):
            return None
        if not fs.isdir(path):
            raise LongtailError(f"{url}: not a feature store (a file, not a Zarr directory)")
        meta = join(path, "zarr.json")
        if not fs.exists(meta):
            if not fs.ls(path, detail=False):
                return None
            raise LongtailError(f"{url}: not a feature store (a non-empty directory without zarr.json)")
        raw = fs.cat_file(meta)
    except LongtailError:
        raise
    except OSError as e:
        raise LongtailError(f"{url}: cannot read the feature store ({type(e).__name__}: {e})") from e
    except Exception as e:  # a remote backend's own error types (credentials, connection)
        raise remote_error(url, e) from e
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CorruptStoreError(f"{url}: corrupt feature store (zarr.json is not valid JSON)") from e
    if not isinstance(doc, dict) or doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        raise LongtailError(f"{url}: not a feature store (zarr.json is not a Zarr v3 group)")
    attrs = doc.get("attributes") or {}
    if not isinstance(attrs, dict) or "schema_version" not in attrs:
        raise LongtailError(f"{url}: not a longtail feature store (no schema_version attribute)")
    return attrs


def store_status(url: str, *, storage_options: dict | None = None) -> Status:
    """``"missing"`` (nothing there, or an empty directory), ``"incomplete"`` (a feature store
    without ``complete: true``: interrupted, resumable) or ``"complete"``.

    Raises LongtailError when the path holds something that is not a longtail feature store
    (a file, a non-empty directory without ``zarr.json``, unreadable metadata).
    """
    attrs = root_attrs(url, storage_options)
    if attrs is None:
        return "missing"
    return "complete" if attrs.get("complete") is True else "incomplete"


__all__ = ["Status", "read_root_attrs", "root_attrs", "store_status"]
