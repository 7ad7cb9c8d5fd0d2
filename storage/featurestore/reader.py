"""Reading a complete feature store: :func:`open_store` and :class:`FeatureStore`."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore.hashing import SplitHash
from longtail.storage.featurestore.schema import SCHEMA_VERSION, CorruptStoreError, StorePlan
from longtail.storage.featurestore.status import root_attrs
from longtail.storage.fs import zarr_store

def open_store(url: str, *, storage_options: dict | None = None) -> "FeatureStore":
    """Opens a complete feature store for reading.

    Raises LongtailError when nothing is there, when the store is incomplete (interrupted), when
    its schema version is unknown, or when its metadata is corrupt.
    """
    url = str(url)
    attrs = root_attrs(url, storage_options)
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

    Properties give the root attributes (``plan`` the validated :class:`StorePlan`);
    :meth:`read` returns one split as a validated :class:`~stages.data.FeatureSet`;
    :meth:`iter_chunks` streams a split in row blocks. A damaged store raises
    :class:`CorruptStoreError` (a LongtailError) naming the URL and split.
    """

    def __init__(self, url: str, attrs: dict, storage_options: dict | None = None, *,
                 plan: StorePlan | None = None) -> None:
        """``attrs``: the root attributes as read (:func:`open_store` checked the store is
        complete and of this schema version). ``plan``: the plan of ``attrs`` when the caller
        has already validated it (a writer that found its own plan there), else it is validated
        here; a corrupt plan raises :class:`CorruptStoreError`."""
        import zarr

        self.url = url
        self._attrs = attrs
        self._storage_options = storage_options
        if plan is None:
            plan = StorePlan.from_attrs(url, attrs, required=("fingerprint",))
        elif "fingerprint" not in attrs:
            raise self._corrupt("root attribute 'fingerprint' is missing")
        self.plan = plan
        if "has_labels" not in attrs:  # a store written before unlabelled splits existed
            attrs["has_labels"] = dict(plan.has_labels)
        try:
            self._root = zarr.open_group(zarr_store(url, read_only=True, storage_options=storage_options), mode="r")
        except Exception as e:  # a corrupt store: zarr raises many types
            raise CorruptStoreError(f"{url}: corrupt feature store ({type(e).__name__}: {e})") from e
        self._groups: dict[str, Any] = {}
        self._arrays: dict[str, dict[str, Any]] = {}  # split -> its arrays, opened once

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.url}: corrupt feature store: {what}")

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
        except CorruptStoreError:
            raise
        except LongtailError as e:  # the FeatureSet's own checks: stored data that cannot be right
            raise CorruptStoreError(f"{e} (the feature store is corrupt or was edited by hand; rebuild it)") from e

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
            h = SplitHash(self.has_attributes(name), self.has_labels(name))
            for feats, labels, attrs in self.iter_chunks(name):
                h.update(
                    np.ascontiguousarray(feats, dtype="<f4"),
                    None if labels is None else np.ascontiguousarray(labels, dtype="<i8"),
                    None if attrs is None else np.ascontiguousarray(attrs, dtype="<i8"),
                )
            fps[name] = h.hexdigest(name, self.num_rows(name), self.feature_dim)
            if fps[name] != self.split_fingerprint(name):
                raise self._corrupt(f"split {name!r}: content does not match its fingerprint")
        if split is None and self.plan.fingerprint(fps) != self.fingerprint:
            raise self._corrupt("the store fingerprint does not match its splits")


__all__ = ["FeatureStore", "open_store"]
