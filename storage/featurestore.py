"""The Zarr v3 feature store: backbone features cached once, read by every stage-2 method.

Layout (one Zarr v3 group, opened by URL through fsspec)::

    <url>/                      root group, attributes:
        schema_version          1
        class_names             [C] str
        class_counts            [C] int, per-class counts of the TRAIN split
        backbone                identity dict, e.g. {"kind": "torchvision", "name": "resnet50"}
        backbone_hash           hash of the backbone weights (str)
        dataset_fingerprint     fingerprint of the input dataset (str)
        feature_dim             D
        splits                  {split: planned rows}
        has_attributes          {split: bool}
        has_labels              {split: bool}; ``train`` is always labelled. Stores written
                                before this key existed lack it: read as "every split labelled"
        fingerprint             content hash of all splits      } written LAST, together,
        complete                true                            } after every split is complete
    <url>/<split>/              one group per split (train, val, test; val optional; more named
                                splits such as ``deploy`` allowed), attributes rows_planned, then
                                on completion: complete, rows, fingerprint
        features                (N, D) float32, chunked by rows, NaN fill (a lost chunk reads NaN)
        labels                  (N,) int64, -1 fill, only where has_labels[split]: an unlabelled
                                split (deployment data for prior estimation) has no labels array
                                at all, rather than one filled with a sentinel that a reader
                                could mistake for data
        attributes              (N,) int64, -1 fill, only where has_attributes[split]
        index                   (N,) int64 sample index into the original dataset, -1 fill

Fingerprints: a split's fingerprint is blake2b over its name, shape and the blake2b of each of
its ``features`` (little-endian float32), ``labels`` and ``attributes`` (little-endian int64)
byte streams, updated chunk by chunk while writing (so it does not depend on how the rows were
chunked, and nothing is re-read). An unlabelled split has no ``labels`` stream and its header
says ``"labels": false``, so it never shares a fingerprint with a labelled split of the same
features; a labelled split's header is unchanged (stores written before unlabelled splits
existed keep their fingerprints). The store's ``fingerprint`` hashes the schema version, class
names, class counts, feature dimension and every split's fingerprint. ``index`` is metadata and
is not part of the fingerprint.

Writing: :class:`FeatureStoreWriter` never overwrites a complete store, resumes an interrupted
one whose plan matches (completed splits are kept), and rebuilds one whose plan differs. One
writer at a time: it holds the lock ``<url>.lock`` next to the store (:mod:`storage.locks`); a
second writer waits, then reuses what the first completed or resumes what it left.
``has_labels`` is part of the plan (:data:`PLAN_KEYS`), compared after reading a missing
``has_labels`` as "every split labelled", so an interrupted store written before the key existed
still resumes under an all-labelled plan.
Reading: :func:`open_store` returns a :class:`FeatureStore`; :meth:`FeatureStore.read` gives a
validated :class:`~stages.data.FeatureSet`. A missing, interrupted, corrupt or unknown-version
store raises :class:`~stages.errors.LongtailError` naming the URL (and split).

Call-order mistakes (``write_chunk`` before ``begin_split``, ``finish`` with a split missing)
are bugs in the caller and raise ``RuntimeError``; bad data raises ``LongtailError``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.storage.fs import check_access, join, json_hash, remote_error, zarr_store
from longtail.storage.locks import DEFAULT_TIMEOUT, WriterLock

SCHEMA_VERSION = 1

#: the plan: what a resumed write must agree on with the store already there
PLAN_KEYS = (
    "class_names",
    "class_counts",
    "backbone",
    "backbone_hash",
    "dataset_fingerprint",
    "feature_dim",
    "splits",
    "has_attributes",
    "has_labels",
)
#: plan keys that stores written by older versions may lack: key -> its value for such a store
_PLAN_DEFAULTS = {"has_labels": lambda attrs: {str(s): True for s in (attrs.get("splits") or {})}}
#: a split name (lower-case letters, digits and ``_``, starting with a letter)
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: target uncompressed size of one chunk of ``features`` (and of the 1-D arrays)
_TARGET_CHUNK_BYTES = 8 << 20
_FEATURE_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}

Status = Literal["missing", "incomplete", "complete"]


# ---------------------------------------------------------------------------------------- status
def _root_attrs(url: str, storage_options: dict | None) -> dict | None:
    """The root group's attributes, or ``None`` when nothing (or an empty directory) is there.

    Reads ``zarr.json`` directly (the Zarr v3 group document), so a status check is one read.
    """
    return _read_root_attrs(url, *check_access(url, storage_options))


def _read_root_attrs(url: str, fs, path: str) -> dict | None:
    """:func:`_root_attrs` on a filesystem already resolved (and checked) for ``url``."""
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
        raise LongtailError(f"{url}: corrupt feature store (zarr.json is not valid JSON)") from e
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
    attrs = _root_attrs(url, storage_options)
    if attrs is None:
        return "missing"
    return "complete" if attrs.get("complete") is True else "incomplete"


def _plan_value(attrs: Mapping[str, Any], key: str) -> Any:
    """Plan entry ``key`` of stored root attributes, with older stores' missing keys defaulted."""
    if key not in attrs and key in _PLAN_DEFAULTS:
        splits = attrs.get("splits")
        return _PLAN_DEFAULTS[key](attrs if isinstance(splits, dict) else {})
    return attrs.get(key)


# ---------------------------------------------------------------------------------------- hashing
class _SplitHash:
    """Content hash of one split, updated block by block; independent of the block sizes."""

    def __init__(self, has_attributes: bool, has_labels: bool = True) -> None:
        self.features = hashlib.blake2b(digest_size=32)
        self.labels = hashlib.blake2b(digest_size=32) if has_labels else None
        self.attributes = hashlib.blake2b(digest_size=32) if has_attributes else None

    def update(self, features: np.ndarray, labels: np.ndarray | None, attributes: np.ndarray | None) -> None:
        # callers pass C-contiguous little-endian float32 / int64 arrays
        self.features.update(features)
        if self.labels is not None:
            self.labels.update(labels)
        if self.attributes is not None:
            self.attributes.update(attributes)

    def hexdigest(self, name: str, rows: int, dim: int) -> str:
        h = hashlib.blake2b(digest_size=32)
        header = {"split": name, "rows": rows, "feature_dim": dim, "attributes": self.attributes is not None}
        if self.labels is None:  # only unlabelled splits carry the key: labelled ones hash as before
            header["labels"] = False
        h.update(json.dumps(header, sort_keys=True).encode())
        h.update(self.features.digest())
        if self.labels is not None:
            h.update(self.labels.digest())
        if self.attributes is not None:
            h.update(self.attributes.digest())
        return h.hexdigest()


def _store_fingerprint(attrs: Mapping[str, Any], split_fingerprints: Mapping[str, str]) -> str:
    return json_hash(
        {
            "schema_version": SCHEMA_VERSION,
            "class_names": list(attrs["class_names"]),
            "class_counts": [int(c) for c in attrs["class_counts"]],
            "feature_dim": int(attrs["feature_dim"]),
            "splits": dict(split_fingerprints),
        }
    )


def _feature_chunk_rows(rows: int, dim: int) -> int:
    return max(1, min(rows, _TARGET_CHUNK_BYTES // (4 * dim)))


def _vector_chunk_rows(rows: int) -> int:
    return max(1, min(rows, _TARGET_CHUNK_BYTES // 8))


# ---------------------------------------------------------------------------------------- writer
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
        vec_rows = _vector_chunk_rows(rows)
        self.rows_planned = rows
        self.rows = 0
        self.hash = _SplitHash(has_attributes, has_labels)
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
        clash = sorted(set(extra) & (set(PLAN_KEYS) | {"schema_version", "complete", "fingerprint"}))
        if clash:
            raise ValueError(f"extra_attrs may not set {', '.join(clash)}")
        self._storage_options = storage_options
        self._plan = self._make_plan(
            class_names,
            class_counts,
            backbone,
            backbone_hash,
            dataset_fingerprint,
            feature_dim,
            splits,
            has_attributes,
            has_labels,
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
        attrs = _read_root_attrs(self.url, self._fs, self._path)
        if attrs is not None:
            same = attrs.get("schema_version") == SCHEMA_VERSION and all(
                _plan_value(attrs, k) == self._plan[k] for k in PLAN_KEYS
            )
            if attrs.get("complete") is True:
                if reuse and same:  # another writer completed this very plan: nothing to write
                    # what open_store would check and read again: complete, this schema version
                    store = FeatureStore(self.url, attrs, storage_options)
                    self._done = {s: store.split_fingerprint(s) for s in self._plan["splits"]}
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
                self._root.update_attributes({"has_labels": self._plan["has_labels"]})
            for name, rows in self._plan["splits"].items():
                if name in self._root:
                    sattrs = self._root[name].attrs.asdict()
                    if sattrs.get("complete") is True and sattrs.get("rows") == rows and sattrs.get("fingerprint"):
                        self._done[name] = str(sattrs["fingerprint"])
        else:
            self._root = zarr.create_group(
                store, attributes={"schema_version": SCHEMA_VERSION, **self._plan, **extra}, overwrite=True
            )

    # ------------------------------------------------------------------ plan
    def _make_plan(
        self,
        class_names,
        class_counts,
        backbone,
        backbone_hash,
        dataset_fingerprint,
        feature_dim,
        splits,
        has_attributes,
        has_labels,
    ) -> dict:
        url = self.url
        names = [str(n) for n in class_names]
        if not names:
            raise LongtailError(f"{url}: class_names is empty")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})[:3]
            raise LongtailError(f"{url}: duplicate class names: {', '.join(dup)}")
        counts = np.asarray(class_counts)
        if counts.shape != (len(names),) or counts.dtype.kind not in "iu" or (counts < 0).any():
            raise LongtailError(
                f"{url}: class_counts must be {len(names)} non-negative integers (one per class name), "
                f"got shape {counts.shape} dtype {counts.dtype}"
            )
        if not isinstance(feature_dim, (int, np.integer)) or int(feature_dim) < 1:
            raise LongtailError(f"{url}: feature_dim must be a positive integer, got {feature_dim!r}")
        if not isinstance(backbone, Mapping):
            raise LongtailError(f"{url}: backbone must be a dict identifying the backbone, got {backbone!r}")
        split_rows: dict[str, int] = {}
        for name, rows in splits.items():
            if not SPLIT_NAME.match(str(name)):
                raise LongtailError(f"{url}: bad split name {name!r} (lower-case letters, digits, _)")
            if not isinstance(rows, (int, np.integer)) or int(rows) < 1:
                raise LongtailError(f"{url}: split {name!r} must plan at least 1 row, got {rows!r}")
            split_rows[str(name)] = int(rows)
        if "train" not in split_rows:
            raise LongtailError(f"{url}: a feature store needs a 'train' split (got {', '.join(split_rows) or 'none'})")
        attrs_flags = {k: bool(v) for k, v in (has_attributes or {}).items()}
        unknown = sorted(set(attrs_flags) - set(split_rows))
        if unknown:
            raise LongtailError(f"{url}: has_attributes names unknown split(s): {', '.join(unknown)}")
        label_flags = {k: bool(v) for k, v in (has_labels or {}).items()}
        unknown = sorted(set(label_flags) - set(split_rows))
        if unknown:
            raise LongtailError(f"{url}: has_labels names unknown split(s): {', '.join(unknown)}")
        if not label_flags.get("train", True):
            raise LongtailError(f"{url}: split 'train' must be labelled (has_labels['train'] is false)")
        plan = {
            "class_names": names,
            "class_counts": [int(c) for c in counts],
            "backbone": dict(backbone),
            "backbone_hash": str(backbone_hash),
            "dataset_fingerprint": str(dataset_fingerprint),
            "feature_dim": int(feature_dim),
            "splits": split_rows,
            "has_attributes": {name: attrs_flags.get(name, False) for name in split_rows},
            "has_labels": {name: label_flags.get(name, True) for name in split_rows},
        }
        try:  # normalise to what a JSON round trip gives back, so a resume compares equal
            return json.loads(json.dumps(plan, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise LongtailError(f"{url}: backbone identity is not JSON-serialisable ({e})") from e

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
        from zarr.codecs import BloscCodec

        self._check_open()
        if name not in self._plan["splits"]:
            raise RuntimeError(f"{self.url}: split {name!r} is not in the plan {list(self._plan['splits'])}")
        if name in self._done:
            raise RuntimeError(f"{self.url}: split {name!r} is already complete (check split_done first)")
        if name in self._active:
            raise RuntimeError(f"{self.url}: split {name!r} was already begun")
        if name in self._root:
            del self._root[name]  # a half-written split restarts from row 0
        rows = self._plan["splits"][name]
        dim = self._plan["feature_dim"]
        has_attr = self._plan["has_attributes"][name]
        has_lab = self._plan["has_labels"][name]
        chunk = min(self._chunk_rows or _feature_chunk_rows(rows, dim), rows)
        vec = _vector_chunk_rows(rows)
        g = self._root.create_group(name, attributes={"rows_planned": rows})
        g.create_array(
            "features",
            shape=(rows, dim),
            chunks=(chunk, dim),
            dtype="float32",
            fill_value=np.nan,
            compressors=BloscCodec(**_FEATURE_CODEC),
        )
        for key in (("labels",) if has_lab else ()) + ("index",) + (("attributes",) if has_attr else ()):
            g.create_array(key, shape=(rows,), chunks=(vec,), dtype="int64", fill_value=-1)
        self._active[name] = _ActiveSplit(g, rows, dim, has_attr, has_lab, len(self._plan["class_names"]), chunk)

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
        dim = self._plan["feature_dim"]
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
        num_classes = len(self._plan["class_names"])
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
            given = np.asarray(self._plan["class_counts"], dtype=np.int64)
            diff = np.flatnonzero(given != sp.counts)
            if diff.size:
                c = int(diff[0])
                raise LongtailError(
                    f"{where}: class_counts do not match the train labels written "
                    f"(class {self._plan['class_names'][c]!r}: {int(given[c])} given, {int(sp.counts[c])} written)"
                )
        for buf in (sp.features, sp.labels, sp.attributes, sp.index):
            if buf is not None:
                buf.close()
        fp = sp.hash.hexdigest(name, sp.rows, self._plan["feature_dim"])
        self._root[name].update_attributes({"complete": True, "rows": sp.rows, "fingerprint": fp})
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
        missing = [s for s in self._plan["splits"] if s not in self._done]
        if missing:
            raise RuntimeError(f"{self.url}: finish() with split(s) not complete: {', '.join(missing)}")
        fp = _store_fingerprint(self._plan, {s: self._done[s] for s in self._plan["splits"]})
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


# ---------------------------------------------------------------------------------------- reader
def open_store(url: str, *, storage_options: dict | None = None) -> "FeatureStore":
    """Opens a complete feature store for reading.

    Raises LongtailError when nothing is there, when the store is incomplete (interrupted), when
    its schema version is unknown, or when its metadata is corrupt.
    """
    url = str(url)
    attrs = _root_attrs(url, storage_options)
    if attrs is None:
        raise LongtailError(f"{url}: no feature store there")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise LongtailError(
            f"{url}: feature store schema_version {attrs.get('schema_version')!r} is not supported "
            f"(this longtail reads version {SCHEMA_VERSION})"
        )
    if attrs.get("complete") is not True:
        raise LongtailError(f"{url}: the feature store was interrupted while being written; rerun to resume or rebuild it")
    return FeatureStore(url, attrs, storage_options)


class FeatureStore:
    """A complete feature store, read-only. Build it with :func:`open_store`.

    Properties give the root attributes; :meth:`read` returns one split as a validated
    :class:`~stages.data.FeatureSet`; :meth:`iter_chunks` streams a split in row blocks.
    """

    def __init__(self, url: str, attrs: dict, storage_options: dict | None = None) -> None:
        import zarr

        self.url = url
        self._attrs = attrs
        self._storage_options = storage_options
        self._check_attrs()
        try:
            self._root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
        except Exception as e:  # a corrupt store: zarr raises many types
            raise LongtailError(f"{url}: corrupt feature store ({type(e).__name__}: {e})") from e
        self._groups: dict[str, Any] = {}
        self._arrays: dict[str, dict[str, Any]] = {}  # split -> its arrays, opened once

    def _corrupt(self, what: str) -> LongtailError:
        return LongtailError(f"{self.url}: corrupt feature store: {what}")

    def _check_attrs(self) -> None:
        a = self._attrs
        for key in PLAN_KEYS + ("fingerprint",):
            if key not in a and key not in _PLAN_DEFAULTS:
                raise self._corrupt(f"root attribute {key!r} is missing")
        if not isinstance(a["class_names"], list) or not a["class_names"]:
            raise self._corrupt("class_names is not a non-empty list")
        counts = a["class_counts"]
        if not isinstance(counts, list) or len(counts) != len(a["class_names"]) or not all(
            isinstance(c, int) and c >= 0 for c in counts
        ):
            raise self._corrupt(f"class_counts is not {len(a['class_names'])} non-negative integers")
        if not isinstance(a["feature_dim"], int) or a["feature_dim"] < 1:
            raise self._corrupt(f"feature_dim {a['feature_dim']!r} is not a positive integer")
        if not isinstance(a["splits"], dict) or "train" not in a["splits"]:
            raise self._corrupt("splits does not list a 'train' split")
        if not isinstance(a["has_attributes"], dict):
            raise self._corrupt("has_attributes is not a {split: bool} mapping")
        if "has_labels" not in a:  # a store written before unlabelled splits existed
            a["has_labels"] = _plan_value(a, "has_labels")
        labelled = a["has_labels"]
        if not isinstance(labelled, dict) or not all(isinstance(v, bool) for v in labelled.values()):
            raise self._corrupt("has_labels is not a {split: bool} mapping")
        if labelled.get("train", True) is not True:
            raise self._corrupt("has_labels marks the 'train' split unlabelled")

    # ------------------------------------------------------------------ metadata
    @property
    def attrs(self) -> dict:
        """A copy of the root attributes."""
        return copy.deepcopy(self._attrs)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names, in the order they were planned (``train``, ``val``, ``test``)."""
        return tuple(self._attrs["splits"])

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(str(n) for n in self._attrs["class_names"])

    @property
    def class_counts(self) -> np.ndarray:
        """``(C,)`` int64 per-class train counts."""
        return np.asarray(self._attrs["class_counts"], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self._attrs["class_names"])

    @property
    def feature_dim(self) -> int:
        return int(self._attrs["feature_dim"])

    @property
    def fingerprint(self) -> str:
        """Content hash of the whole store (see the module docstring)."""
        return str(self._attrs["fingerprint"])

    @property
    def backbone(self) -> dict:
        return copy.deepcopy(self._attrs["backbone"])

    @property
    def backbone_hash(self) -> str:
        return str(self._attrs["backbone_hash"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self._attrs["dataset_fingerprint"])

    def num_rows(self, split: str) -> int:
        self._group(split)
        return int(self._attrs["splits"][split])

    def has_attributes(self, split: str) -> bool:
        self._group(split)
        return "attributes" in self._arrays[split]

    def has_labels(self, split: str) -> bool:
        """False for an unlabelled split (:meth:`read` gives ``labels=None``); stores written
        before unlabelled splits existed have every split labelled."""
        self._group(split)
        return self._attrs["has_labels"].get(split, True) is True

    def split_fingerprint(self, split: str) -> str:
        """Content hash of one split (features, labels, attributes as written)."""
        return str(self._group(split).attrs["fingerprint"])

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={n}" for s, n in self._attrs["splits"].items())
        return f"FeatureStore({self.url!r}, C={self.num_classes}, D={self.feature_dim}, {rows})"

    # ------------------------------------------------------------------ splits
    def _group(self, split: str):
        if split in self._groups:
            return self._groups[split]
        if split not in self._attrs["splits"]:
            raise LongtailError(f"{self.url}: no split {split!r} in the feature store (splits: {', '.join(self.splits)})")
        rows = self._attrs["splits"][split]
        where = f"split {split!r}"
        try:
            g = self._root[split]
            sattrs = g.attrs.asdict()
            arrays = {k: g[k] for k in ("features", "labels", "index", "attributes") if k in g}
        except LongtailError:
            raise
        except Exception as e:
            raise self._corrupt(f"{where} is unreadable ({type(e).__name__}: {e})") from e
        if sattrs.get("complete") is not True or sattrs.get("rows") != rows or not sattrs.get("fingerprint"):
            raise self._corrupt(f"{where} is not marked complete with {rows} rows")
        expected = {"features": ((rows, self.feature_dim), "float32"), "index": ((rows,), "int64")}
        if self._attrs["has_labels"].get(split, True) is True:
            expected["labels"] = ((rows,), "int64")
        elif "labels" in arrays:
            raise self._corrupt(f"{where} is planned unlabelled but has a 'labels' array")
        if self._attrs["has_attributes"].get(split):
            expected["attributes"] = ((rows,), "int64")
        for key, (shape, dtype) in expected.items():
            if key not in arrays:
                raise self._corrupt(f"{where} has no {key!r} array")
            arr = arrays[key]
            if tuple(arr.shape) != shape or str(arr.dtype) != dtype:
                raise self._corrupt(f"{where}: {key!r} is {arr.dtype} {tuple(arr.shape)}, expected {dtype} {shape}")
        self._groups[split] = g
        self._arrays[split] = arrays  # opening an array reads its metadata: once, not per chunk
        return g

    def _read(self, split: str, key: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        self._group(split)
        try:
            out = np.asarray(self._arrays[split][key][start:stop])
        except Exception as e:  # lost/garbled chunk bytes: codecs raise many types
            raise self._corrupt(f"split {split!r}: cannot read {key!r} ({type(e).__name__}: {e})") from e
        if key in ("attributes", "index") and out.size and out.min() < 0:
            raise self._corrupt(f"split {split!r}: {key!r} has negative entries (a lost chunk reads -1)")
        return out

    def _feature_set(self, split: str, name: str, start: int | None, stop: int | None) -> FeatureSet:
        attrs = self._read(split, "attributes", start, stop) if self.has_attributes(split) else None
        try:
            return FeatureSet(
                features=self._read(split, "features", start, stop),
                labels=self._read(split, "labels", start, stop) if self.has_labels(split) else None,
                class_counts=self.class_counts,
                class_names=self.class_names,
                attributes=attrs,
                index=self._read(split, "index", start, stop),
                name=name,
                source=self.url,
                meta={
                    "split_fingerprint": self.split_fingerprint(split),
                    "store_fingerprint": self.fingerprint,
                    "backbone": self.backbone,
                    "backbone_hash": self.backbone_hash,
                    "dataset_fingerprint": self.dataset_fingerprint,
                },
            )
        except LongtailError as e:
            if "corrupt feature store" in str(e):
                raise
            raise LongtailError(f"{e} (the feature store is corrupt or was edited by hand; rebuild it)") from e

    def read(self, split: str) -> FeatureSet:
        """Split ``split`` in full as a validated FeatureSet (``name=split``, ``source=url``).

        Shapes: features ``(N, D)`` float32, labels ``(N,)`` int64 (``None`` for an unlabelled
        split, see :meth:`has_labels`), attributes ``(N,)`` int64 or None, index ``(N,)`` int64;
        class_counts ``(C,)`` are the train counts.
        """
        return self._feature_set(split, split, None, None)

    def iter_chunks(
        self, split: str, rows: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Yields ``(features (n, D) float32, labels (n,) int64 | None, attributes (n,) int64 | None)``
        blocks of at most ``rows`` rows (default: the stored chunk size), in order, each
        validated like :meth:`read`; labels are None throughout for an unlabelled split."""
        n = self.num_rows(split)
        if rows is None:
            self._group(split)
            rows = int(self._arrays[split]["features"].chunks[0])
        if rows < 1:
            raise LongtailError(f"{self.url}: iter_chunks rows must be >= 1, got {rows}")
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            fs = self._feature_set(split, f"{split}[{start}:{stop}]", start, stop)
            yield fs.features, fs.labels, fs.attributes

    def verify(self, split: str | None = None) -> None:
        """Recomputes the fingerprint of ``split`` (default: every split, and the store's) from
        the stored bytes; raises LongtailError naming the split on a mismatch."""
        names = [split] if split is not None else list(self.splits)
        fps = {}
        for name in names:
            h = _SplitHash(self.has_attributes(name), self.has_labels(name))
            for feats, labels, attrs in self.iter_chunks(name):
                h.update(
                    np.ascontiguousarray(feats, dtype="<f4"),
                    None if labels is None else np.ascontiguousarray(labels, dtype="<i8"),
                    None if attrs is None else np.ascontiguousarray(attrs, dtype="<i8"),
                )
            fps[name] = h.hexdigest(name, self.num_rows(name), self.feature_dim)
            if fps[name] != self.split_fingerprint(name):
                raise self._corrupt(f"split {name!r}: content does not match its fingerprint")
        if split is None and _store_fingerprint(self._attrs, fps) != self.fingerprint:
            raise self._corrupt("the store fingerprint does not match its splits")


__all__ = ["SCHEMA_VERSION", "FeatureStore", "FeatureStoreWriter", "open_store", "store_status"]
