"""The feature store's schema: its version, its plan and the errors a bad store raises.

The *plan* (:data:`PLAN_KEYS`) is what a store is planned to hold: class names and train counts,
the backbone identity, the feature dimension, the splits with their row counts and which of them
have attributes and labels. :class:`StorePlan` is that plan, validated once: from the writer's
arguments (:meth:`StorePlan.create`, a mistake is a :class:`~stages.errors.LongtailError`) or from
a stored root group's attributes (:meth:`StorePlan.from_attrs`, a mistake is a
:class:`CorruptStoreError`). The writer compares it with the plan of a store already there to
decide between reuse, resume and rebuild; the reader validates the stored plan with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from longtail.stages.errors import LongtailError
from longtail.storage.fs import json_hash

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
PLAN_DEFAULTS = {"has_labels": lambda attrs: {str(s): True for s in (attrs.get("splits") or {})}}
#: a split name (lower-case letters, digits and ``_``, starting with a letter)
SPLIT_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: root attributes that are neither plan nor description: written by the writer itself
RESERVED_ATTRS = frozenset(PLAN_KEYS) | {"schema_version", "complete", "fingerprint"}
#: target uncompressed size of one chunk of ``features`` (and of the 1-D arrays)
TARGET_CHUNK_BYTES = 8 << 20
#: the Blosc settings of ``features`` in stores written before :data:`RAW_CHUNKS` (still read)
FEATURE_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"}
#: whether new arrays end their codec chain with a CRC-32C checksum of each stored chunk, so that a
#: corrupt or truncated chunk is refused (and named) before it is decompressed. Stores written
#: before it existed have no checksum; the reader checks their Blosc chunk headers instead.
CHUNK_CHECKSUM = True
#: whether new checksummed arrays store their chunks uncompressed (codecs ``bytes`` little-endian,
#: then ``crc32c``: each chunk file is the chunk's bytes followed by their 4-byte CRC-32C), the
#: layout chosen for read speed (issue 13): the reader copies each chunk file straight into the
#: output array, checksumming it as it goes, with no decompression and no intermediate buffer.
#: Backbone features barely compress (LZ4 saved about 7% on the ImageNet-LT-shaped set), so the
#: store grows by that much. False gives the layout of issue 14 (Blosc LZ4 / Zstandard, then
#: CRC-32C), which is still read (through zarr, slower).
RAW_CHUNKS = True
#: split attribute recorded by the writer at completion: every feature was checked finite when it
#: was written. With every chunk present and its checksum verified, a read of such a split skips
#: the scan over every value (validation done once, at write time, and recorded).
FINITE_ATTR = "features_finite"


def array_compressors(kind: str) -> list:
    """The bytes-to-bytes codecs of a new array: only a CRC-32C checksum (:data:`RAW_CHUNKS`);
    or, for the older layouts, ``"features"`` Blosc LZ4 with byte shuffle, the 1-D int64 arrays
    Zstandard, each followed by a CRC-32C checksum where :data:`CHUNK_CHECKSUM` (decoded first: a
    chunk whose checksum fails never reaches the decompressor)."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if CHUNK_CHECKSUM and RAW_CHUNKS:
        return [Crc32cCodec()]
    codecs = [BloscCodec(**FEATURE_CODEC)] if kind == "features" else [ZstdCodec(level=0)]
    return codecs + ([Crc32cCodec()] if CHUNK_CHECKSUM else [])


class CorruptStoreError(LongtailError):
    """A feature store whose metadata or content is damaged (or was edited by hand); the message
    names the URL and, where it applies, the split."""


def feature_chunk_rows(rows: int, dim: int) -> int:
    """Default rows per chunk of a ``(rows, dim)`` float32 ``features`` array (about 8 MiB)."""
    return max(1, min(rows, TARGET_CHUNK_BYTES // (4 * dim)))


def vector_chunk_rows(rows: int) -> int:
    """Rows per chunk of a ``(rows,)`` int64 array (about 8 MiB)."""
    return max(1, min(rows, TARGET_CHUNK_BYTES // 8))


def plan_value(attrs: Mapping[str, Any], key: str) -> Any:
    """Plan entry ``key`` of stored root attributes, with older stores' missing keys defaulted."""
    if key not in attrs and key in PLAN_DEFAULTS:
        splits = attrs.get("splits")
        return PLAN_DEFAULTS[key](attrs if isinstance(splits, dict) else {})
    return attrs.get(key)


def store_fingerprint(class_names: Sequence[Any], class_counts: Sequence[Any], feature_dim: int,
                      split_fingerprints: Mapping[str, str]) -> str:
    """The store's ``fingerprint``: a hash of the schema version, class names, class counts,
    feature dimension and every split's fingerprint (see :mod:`storage.featurestore`)."""
    return json_hash(
        {
            "schema_version": SCHEMA_VERSION,
            "class_names": list(class_names),
            "class_counts": [int(c) for c in class_counts],
            "feature_dim": int(feature_dim),
            "splits": dict(split_fingerprints),
        }
    )


@dataclass(frozen=True)
class StorePlan:
    """The validated plan of one feature store (the values of :data:`PLAN_KEYS`).

    Treat it as read-only: the mappings are the plan itself (:meth:`to_attrs` gives copies).
    ``splits`` keeps the planned order (``train`` first as written by the callers).
    """

    class_names: tuple[str, ...]
    class_counts: tuple[int, ...]  # (C,) train counts
    backbone: Mapping[str, Any]
    backbone_hash: str
    dataset_fingerprint: str
    feature_dim: int
    splits: Mapping[str, int]  # split -> planned rows
    has_attributes: Mapping[str, bool]
    has_labels: Mapping[str, bool]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_attrs(self) -> dict[str, Any]:
        """The plan as root attributes (JSON values, a fresh copy, in :data:`PLAN_KEYS` order)."""
        return json.loads(json.dumps({k: getattr(self, k) for k in PLAN_KEYS}, allow_nan=False))

    def matches(self, attrs: Mapping[str, Any]) -> bool:
        """Whether stored root attributes ``attrs`` have this schema version and this plan
        (a key older stores lack is compared at its default, see :data:`PLAN_DEFAULTS`)."""
        mine = self.to_attrs()
        return attrs.get("schema_version") == SCHEMA_VERSION and all(plan_value(attrs, k) == mine[k] for k in PLAN_KEYS)

    def fingerprint(self, split_fingerprints: Mapping[str, str]) -> str:
        """The store fingerprint of this plan with the given split fingerprints."""
        return store_fingerprint(self.class_names, self.class_counts, self.feature_dim, split_fingerprints)

    # ------------------------------------------------------------------ from the writer's arguments
    @classmethod
    def create(
        cls,
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
    ) -> StorePlan:
        """Validates a writer's plan (see :class:`~storage.featurestore.FeatureStoreWriter` for
        the arguments); a mistake raises LongtailError naming ``url``."""
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
        try:  # normalise to what a JSON round trip gives back, so a resume compares equal
            ident = json.loads(json.dumps(dict(backbone), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise LongtailError(f"{url}: backbone identity is not JSON-serialisable ({e})") from e
        return cls(
            class_names=tuple(names),
            class_counts=tuple(int(c) for c in counts),
            backbone=ident,
            backbone_hash=str(backbone_hash),
            dataset_fingerprint=str(dataset_fingerprint),
            feature_dim=int(feature_dim),
            splits=split_rows,
            has_attributes={name: attrs_flags.get(name, False) for name in split_rows},
            has_labels={name: label_flags.get(name, True) for name in split_rows},
        )

    # ------------------------------------------------------------------ from a stored root group
    @classmethod
    def from_attrs(cls, url: str, attrs: Mapping[str, Any], *, required: Sequence[str] = ()) -> StorePlan:
        """Validates the plan in stored root attributes ``attrs`` (and that the keys
        ``required`` are there); a mistake raises :class:`CorruptStoreError` naming ``url``.
        A key older stores lack takes its default (:data:`PLAN_DEFAULTS`)."""

        def corrupt(what: str) -> CorruptStoreError:
            return CorruptStoreError(f"{url}: corrupt feature store: {what}")

        for key in PLAN_KEYS + tuple(required):
            if key not in attrs and key not in PLAN_DEFAULTS:
                raise corrupt(f"root attribute {key!r} is missing")
        names = attrs["class_names"]
        if not isinstance(names, list) or not names:
            raise corrupt("class_names is not a non-empty list")
        counts = attrs["class_counts"]
        if not isinstance(counts, list) or len(counts) != len(names) or not all(
            isinstance(c, int) and c >= 0 for c in counts
        ):
            raise corrupt(f"class_counts is not {len(names)} non-negative integers")
        dim = attrs["feature_dim"]
        if not isinstance(dim, int) or dim < 1:
            raise corrupt(f"feature_dim {dim!r} is not a positive integer")
        splits = attrs["splits"]
        if not isinstance(splits, dict) or "train" not in splits:
            raise corrupt("splits does not list a 'train' split")
        if not isinstance(attrs["has_attributes"], dict):
            raise corrupt("has_attributes is not a {split: bool} mapping")
        labelled = plan_value(attrs, "has_labels")
        if not isinstance(labelled, dict) or not all(isinstance(v, bool) for v in labelled.values()):
            raise corrupt("has_labels is not a {split: bool} mapping")
        if labelled.get("train", True) is not True:
            raise corrupt("has_labels marks the 'train' split unlabelled")
        return cls(
            class_names=tuple(str(n) for n in names),
            class_counts=tuple(int(c) for c in counts),
            backbone=attrs["backbone"],
            backbone_hash=str(attrs["backbone_hash"]),
            dataset_fingerprint=str(attrs["dataset_fingerprint"]),
            feature_dim=int(dim),
            splits=splits,
            has_attributes=attrs["has_attributes"],
            has_labels=labelled,
        )


__all__ = [
    "CHUNK_CHECKSUM",
    "FINITE_ATTR",
    "PLAN_DEFAULTS",
    "RAW_CHUNKS",
    "array_compressors",
    "PLAN_KEYS",
    "RESERVED_ATTRS",
    "SCHEMA_VERSION",
    "SPLIT_NAME",
    "CorruptStoreError",
    "StorePlan",
    "feature_chunk_rows",
    "plan_value",
    "store_fingerprint",
    "vector_chunk_rows",
]
