"""Writing a feature store: :class:`FeatureStoreWriter`, split by split, chunk by chunk, with resume."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from longtail.stages.errors import LongtailError
from longtail.storage.featurestore.hashing import SplitHash
from longtail.storage.featurestore.reader import FeatureStore
from longtail.storage.featurestore import schema
from longtail.storage.featurestore.schema import (
    RESERVED_ATTRS,
    SCHEMA_VERSION,
    StorePlan,
    feature_chunk_rows,
    vector_chunk_rows,
)
from longtail.storage.featurestore.status import read_root_attrs
from longtail.storage.fs import check_access, zarr_store
from longtail.storage.locks import DEFAULT_TIMEOUT, WriterLock

class _ArrayBuffer:
    """Appends rows to a Zarr array in whole chunks (a partial chunk is written once, at close)."""

    def __init__(self, array, chunk_rows: int) -> None:
        self.array = array
        self.chunk = chunk_rows
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.offset = 0  # rows already stored

    def push(self, block: np.ndarray) -> None:
        self.pending.append(block)
        self.pending_rows += block.shape[0]
        if self.pending_rows >= self.chunk:
            self._flush(final=False)
        else:  # kept past this call: the caller may reuse its buffer, so own a copy
            self.pending[-1] = block.copy()

    def close(self) -> None:
        if self.pending_rows:
            self._flush(final=True)

    def _flush(self, final: bool) -> None:
        data = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        n = data.shape[0] if final else (data.shape[0] // self.chunk) * self.chunk
        if n:
            self.array[self.offset : self.offset + n] = data[:n]
            self.offset += n
        rest = data[n:]
        self.pending = [rest.copy()] if rest.shape[0] else []
        self.pending_rows = rest.shape[0]


class _ActiveSplit:
    def __init__(
        self, group, rows: int, dim: int, has_attributes: bool, has_labels: bool, num_classes: int, chunk_rows: int
    ) -> None:
        vec_rows = vector_chunk_rows(rows)
        self.rows_planned = rows
        self.rows = 0
        self.hash = SplitHash(has_attributes, has_labels)
        self.counts = np.zeros(num_classes, dtype=np.int64)
        self.features = _ArrayBuffer(group["features"], chunk_rows)
        self.labels = _ArrayBuffer(group["labels"], vec_rows) if has_labels else None
        self.attributes = _ArrayBuffer(group["attributes"], vec_rows) if has_attributes else None
        self.index = _ArrayBuffer(group["index"], vec_rows)


def _as_int_vector(x: Any, n: int, what: str, where: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (n,):
        raise LongtailError(f"{where}: {what} has shape {arr.shape}, expected ({n},) to match the features")
    if arr.dtype.kind not in "iu":
        raise LongtailError(f"{where}: {what} must be integers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype="<i8")


class FeatureStoreWriter:
    """Writes a feature store split by split, chunk by chunk, with resume.

    Args:
        url: where the store goes (local path, ``file://``, ``memory://``, ``s3://`` ...).
        class_names: ``C`` class names.
        class_counts: ``(C,)`` per-class counts of the train split; checked against the train
            labels actually written.
        backbone: JSON identity of the backbone (``{"kind": ..., "name": ...}``).
        backbone_hash: hash of the backbone weights.
        dataset_fingerprint: fingerprint of the input dataset.
        feature_dim: ``D``.
        splits: ``{split: N}`` rows planned per split; must include ``train``.
        has_attributes: ``{split: bool}``; splits not named have no attributes.
        has_labels: ``{split: bool}``; splits not named are labelled. An unlabelled split (for
            example deployment features for prior estimation) stores no ``labels`` array and is
            written with ``labels=None``. ``train`` must be labelled.
        chunk_rows: rows per chunk of ``features`` (default: about 8 MiB per chunk).
        storage_options: fsspec options for ``url``.
        extra_attrs: descriptive root attributes (for example the dataset name) that are not part
            of the plan: they do not decide whether an interrupted store is resumed.
        lock_timeout: seconds to wait for another writer of the same store (see below).
        reuse_complete: reuse a complete store with the same plan instead of refusing it (for
            callers that checked the store was missing and then planned; another run may have
            completed it meanwhile).

    One writer at a time: the writer holds a lock ``<url>.lock`` next to the store (host, pid,
    time; see :mod:`storage.locks`) from construction until :meth:`finish`, :meth:`abort` or
    :meth:`close`. A second writer waits up to ``lock_timeout`` seconds: if the first completed
    the store with the same plan meanwhile, the second reuses it (``reused`` is True, every split
    is done and :meth:`finish` returns the fingerprint without writing); if the first is still
    writing at the deadline, LongtailError names it. A lock left by a dead process on this host
    is taken over with a warning; use the writer as a context manager (or call :meth:`close`) so
    that an exception releases the lock (the interrupted store stays resumable).

    On construction: a complete store at ``url`` raises LongtailError (never overwritten; reuse
    it or delete it) unless it has the same plan and the writer waited for its lock or was given
    ``reuse_complete``; an incomplete store with the same plan (:data:`PLAN_KEYS`) is resumed
    (``resumed`` is True; completed splits are kept and :meth:`split_done` says which); an
    incomplete store with another plan is deleted and rebuilt.

    Usage::

        w = FeatureStoreWriter(url, ..., splits={"train": 1000, "test": 200})
        for name in ("train", "test"):
            if w.split_done(name):
                continue
            w.begin_split(name)
            for feats, labels in blocks(name):      # (n, D) float32, (n,) int
                w.write_chunk(name, feats, labels)
            w.end_split(name)
        fingerprint = w.finish()
    """

    def __init__(
        self,
        url: str,
        *,
        class_names: Sequence[str],
        class_counts: Sequence[int] | np.ndarray,
        backbone: Mapping[str, Any],
        backbone_hash: str,
        dataset_fingerprint: str,
        feature_dim: int,
        splits: Mapping[str, int],
        has_attributes: Mapping[str, bool] | None = None,
        has_labels: Mapping[str, bool] | None = None,
        chunk_rows: int | None = None,
        storage_options: dict | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
        lock_timeout: float = DEFAULT_TIMEOUT,
        reuse_complete: bool = False,
    ) -> None:
        self.url = str(url)
        extra = dict(extra_attrs or {})
        clash = sorted(set(extra) & RESERVED_ATTRS)
        if clash:
            raise ValueError(f"extra_attrs may not set {', '.join(clash)}")
        self._storage_options = storage_options
        self._plan = StorePlan.create(
            self.url,
            class_names=class_names,
            class_counts=class_counts,
            backbone=backbone,
            backbone_hash=backbone_hash,
            dataset_fingerprint=dataset_fingerprint,
            feature_dim=feature_dim,
            splits=splits,
            has_attributes=has_attributes,
            has_labels=has_labels,
        )
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise LongtailError(f"{self.url}: chunk_rows must be a positive integer, got {chunk_rows!r}")
        self._chunk_rows = chunk_rows
        self._done: dict[str, str] = {}  # split -> fingerprint
        self._active: dict[str, _ActiveSplit] = {}
        self._closed = False
        self.resumed = False
        self.reused = False
        self._reused_fp: str | None = None

        self._fs, self._path = fs, path = check_access(self.url, storage_options)
        base = self.url.rstrip("/")
        self._lock = WriterLock(fs, path.rstrip("/") + ".lock", base + ".lock", f"feature store {base}", lock_timeout,
                                supersede_own=True)
        self.waited = self._lock.acquire()
        try:
            fs.invalidate_cache(path)  # listings cached before the lock may be stale now
            self._open(extra, reuse_complete or self.waited)
        except BaseException:
            self._lock.release()
            raise

    def _open(self, extra: dict, reuse: bool) -> None:
        import zarr

        storage_options = self._storage_options
        attrs = read_root_attrs(self.url, self._fs, self._path)
        if attrs is not None:
            same = self._plan.matches(attrs)
            if attrs.get("complete") is True:
                if reuse and same:  # another writer completed this very plan: nothing to write
                    # what open_store would check and read again: complete, this schema version
                    store = FeatureStore(self.url, attrs, storage_options, plan=self._plan)
                    self._done = {s: store.split_fingerprint(s) for s in self._plan.splits}
                    self._reused_fp = store.fingerprint
                    self.reused = True
                    self._lock.release()
                    return
                raise LongtailError(
                    f"{self.url}: a complete feature store is already there "
                    f"(fingerprint {str(attrs.get('fingerprint'))[:16]}); it is never overwritten: "
                    "reuse it or delete it first"
                )
            if same:
                self.resumed = True
            else:
                self._delete()
        store = zarr_store(self.url, read_only=False, storage_options=storage_options)
        if self.resumed:
            self._root = zarr.open_group(store, mode="r+")
            if "has_labels" not in attrs:  # written before the key existed: record the (equal) plan
                self._root.update_attributes({"has_labels": dict(self._plan.has_labels)})
            for name, rows in self._plan.splits.items():
                if name in self._root:
                    sattrs = self._root[name].attrs.asdict()
                    if sattrs.get("complete") is True and sattrs.get("rows") == rows and sattrs.get("fingerprint"):
                        self._done[name] = str(sattrs["fingerprint"])
        else:
            self._root = zarr.create_group(
                store, attributes={"schema_version": SCHEMA_VERSION, **self._plan.to_attrs(), **extra}, overwrite=True
            )

    def _delete(self) -> None:
        if self._fs.exists(self._path):
            self._fs.rm(self._path, recursive=True)

    # ------------------------------------------------------------------ splits
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.url}: the writer is closed (finish() or abort() was called)")
        if self._lock.superseded:
            raise RuntimeError(f"{self.url}: a newer writer of this store in this process took over its lock")

    def split_done(self, name: str) -> bool:
        """True when split ``name`` is already complete (kept from a resumed store, or ended)."""
        return name in self._done

    def begin_split(self, name: str) -> None:
        """Starts (or restarts, dropping any half-written rows of) split ``name``."""
        self._check_open()
        if name not in self._plan.splits:
            raise RuntimeError(f"{self.url}: split {name!r} is not in the plan {list(self._plan.splits)}")
        if name in self._done:
            raise RuntimeError(f"{self.url}: split {name!r} is already complete (check split_done first)")
        if name in self._active:
            raise RuntimeError(f"{self.url}: split {name!r} was already begun")
        if name in self._root:
            del self._root[name]  # a half-written split restarts from row 0
        rows = self._plan.splits[name]
        dim = self._plan.feature_dim
        has_attr = self._plan.has_attributes[name]
        has_lab = self._plan.has_labels[name]
        chunk = min(self._chunk_rows or feature_chunk_rows(rows, dim), rows)
        vec = vector_chunk_rows(rows)
        g = self._root.create_group(name, attributes={"rows_planned": rows})
        g.create_array(
            "features",
            shape=(rows, dim),
            chunks=(chunk, dim),
            dtype="float32",
            fill_value=np.nan,
            compressors=schema.array_compressors("features"),
        )
        for key in (("labels",) if has_lab else ()) + ("index",) + (("attributes",) if has_attr else ()):
            g.create_array(key, shape=(rows,), chunks=(vec,), dtype="int64", fill_value=-1,
                           compressors=schema.array_compressors("vector"))
        self._active[name] = _ActiveSplit(g, rows, dim, has_attr, has_lab, self._plan.num_classes, chunk)

    def write_chunk(
        self,
        name: str,
        features: np.ndarray,
        labels: np.ndarray | None,
        attributes: np.ndarray | None = None,
        index: np.ndarray | None = None,
    ) -> None:
        """Appends rows to split ``name``, in order.

        Args:
            features: ``(n, D)`` finite floats (stored as float32).
            labels: ``(n,)`` integers in ``[0, C)``; ``None`` exactly when the plan says the
                split is unlabelled (``has_labels[name]`` false).
            attributes: ``(n,)`` non-negative integers; required iff the split has attributes.
            index: ``(n,)`` non-negative sample indices; default: the running row number.
        """
        self._check_open()
        if name not in self._active:
            raise RuntimeError(f"{self.url}: write_chunk({name!r}) before begin_split({name!r})")
        sp = self._active[name]
        where = f"{self.url}: split {name!r}"
        if sp.labels is None and labels is not None:
            raise LongtailError(f"{where}: labels given, but the plan has this split unlabelled (has_labels false)")
        if sp.labels is not None and labels is None:
            raise LongtailError(f"{where}: the chunk has no labels, but the plan has this split labelled")
        feats = np.asarray(features)
        dim = self._plan.feature_dim
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise LongtailError(f"{where}: features must have shape (n, {dim}), got {feats.shape}")
        if feats.dtype.kind not in "fiu":
            raise LongtailError(f"{where}: features must be numbers, got dtype {feats.dtype}")
        feats = np.ascontiguousarray(feats, dtype="<f4")
        n = feats.shape[0]
        if n == 0:
            return
        if not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats)).any(axis=1).sum())
            raise LongtailError(f"{where}: {bad} row(s) with NaN or infinite features at rows {sp.rows}..{sp.rows + n - 1}")
        if sp.rows + n > sp.rows_planned:
            raise LongtailError(f"{where}: {sp.rows + n} rows written, only {sp.rows_planned} planned")
        num_classes = self._plan.num_classes
        labs = None
        if sp.labels is not None:
            labs = _as_int_vector(labels, n, "labels", where)
            lo, hi = int(labs.min()), int(labs.max())
            if lo < 0 or hi >= num_classes:
                raise LongtailError(f"{where}: labels outside [0, {num_classes}) (found {lo if lo < 0 else hi})")
        if sp.attributes is not None:
            if attributes is None:
                raise LongtailError(f"{where}: the plan has attributes for this split but the chunk has none")
            attrs = _as_int_vector(attributes, n, "attributes", where)
            if attrs.min() < 0:
                raise LongtailError(f"{where}: attributes must be >= 0 (found {int(attrs.min())})")
        elif attributes is not None:
            raise LongtailError(f"{where}: attributes given, but the plan has none for this split")
        else:
            attrs = None
        if index is None:
            idx = np.arange(sp.rows, sp.rows + n, dtype="<i8")
        else:
            idx = _as_int_vector(index, n, "index", where)
            if idx.min() < 0:
                raise LongtailError(f"{where}: index must be >= 0 (found {int(idx.min())})")

        sp.hash.update(feats, labs, attrs)
        sp.features.push(feats)
        if sp.labels is not None:
            sp.counts += np.bincount(labs, minlength=num_classes)
            sp.labels.push(labs)
        if sp.attributes is not None:
            sp.attributes.push(attrs)
        sp.index.push(idx)
        sp.rows += n

    def end_split(self, name: str) -> str:
        """Flushes split ``name``, checks its row count (and, for ``train``, the class counts),
        marks it complete and returns its fingerprint."""
        self._check_open()
        if name not in self._active:
            raise RuntimeError(f"{self.url}: end_split({name!r}) before begin_split({name!r})")
        sp = self._active[name]
        where = f"{self.url}: split {name!r}"
        if sp.rows != sp.rows_planned:
            raise LongtailError(f"{where}: {sp.rows} rows written, {sp.rows_planned} planned")
        if name == "train":
            given = np.asarray(self._plan.class_counts, dtype=np.int64)
            diff = np.flatnonzero(given != sp.counts)
            if diff.size:
                c = int(diff[0])
                raise LongtailError(
                    f"{where}: class_counts do not match the train labels written "
                    f"(class {self._plan.class_names[c]!r}: {int(given[c])} given, {int(sp.counts[c])} written)"
                )
        for buf in (sp.features, sp.labels, sp.attributes, sp.index):
            if buf is not None:
                buf.close()
        fp = sp.hash.hexdigest(name, sp.rows, self._plan.feature_dim)
        # write_chunk refused non-finite features: recorded, so that reads need not scan them again
        self._root[name].update_attributes(
            {"complete": True, "rows": sp.rows, "fingerprint": fp, schema.FINITE_ATTR: True})
        del self._active[name]
        self._done[name] = fp
        return fp

    def finish(self) -> str:
        """Writes the store's fingerprint and ``complete: true`` (last), releases the lock and
        returns the fingerprint (a reused store's, unchanged, when ``reused``)."""
        self._check_open()
        if self.reused:
            self._closed = True
            return str(self._reused_fp)
        missing = [s for s in self._plan.splits if s not in self._done]
        if missing:
            raise RuntimeError(f"{self.url}: finish() with split(s) not complete: {', '.join(missing)}")
        fp = self._plan.fingerprint({s: self._done[s] for s in self._plan.splits})
        self._root.update_attributes({"fingerprint": fp, "complete": True})
        self.close()
        return fp

    def abort(self) -> None:
        """Deletes the (incomplete) store this writer was building (a reused complete store is
        left alone) and releases the lock."""
        self._check_open()
        self._active.clear()
        if not self.reused:
            self._delete()
        self.close()

    def close(self) -> None:
        """Releases the lock without completing or deleting anything: an unfinished store stays
        there, incomplete and resumable. Idempotent; the writer cannot write afterwards."""
        self._closed = True
        self._active.clear()
        self._lock.release()

    def __enter__(self) -> "FeatureStoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["FeatureStoreWriter"]
