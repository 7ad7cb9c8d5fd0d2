"""Content hashes of a feature store's splits (see :mod:`storage.featurestore`, "Fingerprints").

A split's fingerprint is blake2b over a JSON header (its name, shape, whether it has attributes
and, only for an unlabelled split, ``"labels": false``) and the blake2b of each of its byte
streams, updated block by block: the result does not depend on how the rows were chunked.
The store's fingerprint is :func:`~storage.featurestore.schema.store_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np


class SplitHash:
    """Content hash of one split, updated block by block; independent of the block sizes."""

    def __init__(self, has_attributes: bool, has_labels: bool = True) -> None:
        self.features = hashlib.blake2b(digest_size=32)
        self.labels = hashlib.blake2b(digest_size=32) if has_labels else None
        self.attributes = hashlib.blake2b(digest_size=32) if has_attributes else None

    def update(self, features: np.ndarray, labels: np.ndarray | None, attributes: np.ndarray | None) -> None:
        """Adds one block: ``features (n, D)`` little-endian float32, ``labels`` and
        ``attributes`` ``(n,)`` little-endian int64 (C-contiguous; None where the split has none)."""
        self.features.update(features)
        if self.labels is not None:
            self.labels.update(labels)
        if self.attributes is not None:
            self.attributes.update(attributes)

    def hexdigest(self, name: str, rows: int, dim: int) -> str:
        """The split's fingerprint, for split ``name`` of ``rows`` x ``dim`` features."""
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


__all__ = ["SplitHash"]
