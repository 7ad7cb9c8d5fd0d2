"""The feature set: what every stage-2 method sees.

A :class:`FeatureSet` is one split of cached backbone features. The feature store produces it,
methods consume it. Validation lives here, in one place, so that every method and every loader
rejects the same bad input with the same message.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

import numpy as np

from longtail.stages.errors import LongtailError


@dataclass(frozen=True, eq=False)
class FeatureSet:
    """One split of cached features.

    Attributes:
        features: ``(N, D)`` float32 backbone features.
        labels: ``(N,)`` int64 class indices in ``[0, C)``, or ``None`` for an unlabelled split.
        class_counts: ``(C,)`` int64 per-class counts of the **train** split (the source prior),
            the same array for every split of a store.
        class_names: ``C`` class names.
        attributes: optional ``(N,)`` int64 attribute index per sample (generalized long tail).
        index: optional ``(N,)`` int64 sample index into the original dataset.
        name: the split's name (``train``, ``val``, ``test``), used in error messages.
        source: where it came from (a store URL or file), used in error messages.

    ``features_checked`` (init-only, not a field): the caller has already checked that
    ``features`` is finite float32 (the feature store, for chunks checksummed against what its
    writer checked); the scan over every value is skipped. ``dataclasses.replace`` does not carry
    it over: a replaced set is checked again.
    """

    features: np.ndarray
    labels: np.ndarray | None
    class_counts: np.ndarray
    class_names: tuple[str, ...]
    attributes: np.ndarray | None = None
    index: np.ndarray | None = None
    name: str = "split"
    source: str = ""
    meta: dict = field(default_factory=dict)
    features_checked: InitVar[bool] = False

    def __post_init__(self, features_checked: bool = False) -> None:
        where = f"{self.source}: split {self.name!r}" if self.source else f"split {self.name!r}"
        feats = np.asarray(self.features)
        if feats.ndim != 2:
            raise LongtailError(f"{where}: features must be 2-D (N x D), got shape {feats.shape}")
        if feats.shape[0] == 0:
            raise LongtailError(f"{where}: the split is empty (0 samples)")
        if feats.shape[1] == 0:
            raise LongtailError(f"{where}: features have dimension 0")
        if feats.dtype != np.float32:
            feats = feats.astype(np.float32)
        if not (features_checked and feats is self.features) and not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats)).any(axis=1).sum())
            raise LongtailError(f"{where}: {bad} sample(s) have NaN or infinite features")
        object.__setattr__(self, "features", feats)

        counts = np.asarray(self.class_counts)
        if counts.ndim != 1 or counts.size == 0:
            raise LongtailError(f"{where}: class_counts must be a non-empty 1-D array")
        if (counts < 0).any():
            raise LongtailError(f"{where}: class_counts has negative entries")
        object.__setattr__(self, "class_counts", counts.astype(np.int64))
        num_classes = counts.size
        names = tuple(str(n) for n in self.class_names)
        if len(names) != num_classes:
            raise LongtailError(
                f"{where}: {len(names)} class names for {num_classes} classes in class_counts"
            )
        object.__setattr__(self, "class_names", names)

        n = feats.shape[0]
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,):
                raise LongtailError(
                    f"{where}: {labels.shape[0] if labels.ndim else 0} labels for {n} feature rows "
                    "(features and labels must have the same length)"
                )
            if labels.dtype.kind == "f":
                if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
                    raise LongtailError(f"{where}: labels must be integers")
            elif labels.dtype.kind not in "iu":
                raise LongtailError(f"{where}: labels must be integers, got dtype {labels.dtype}")
            labels = labels.astype(np.int64)
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise LongtailError(
                    f"{where}: labels outside [0, {num_classes}) (found {lo if lo < 0 else hi})"
                )
            object.__setattr__(self, "labels", labels)
        for key in ("attributes", "index"):
            arr = getattr(self, key)
            if arr is None:
                continue
            arr = np.asarray(arr)
            if arr.shape != (n,):
                raise LongtailError(f"{where}: {key} has shape {arr.shape}, expected ({n},)")
            if arr.dtype.kind not in "iu":
                raise LongtailError(f"{where}: {key} must be integers, got dtype {arr.dtype}")
            object.__setattr__(self, key, arr.astype(np.int64))

    # ------------------------------------------------------------------ derived quantities
    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.class_counts.size)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def prior(self) -> np.ndarray:
        """The source (train) label prior ``n_c / sum n``, float64, shape ``(C,)``."""
        total = self.class_counts.sum()
        if total <= 0:  # guards the division: a store with no train samples at all
            raise LongtailError(f"{self.source or self.name}: train class counts sum to 0")
        return self.class_counts.astype(np.float64) / float(total)

    def require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise LongtailError(f"{self.source or 'features'}: split {self.name!r} has no labels")
        return self.labels

    def check_train(self) -> "FeatureSet":
        """Checks that make sense only for a train split: every class has a sample."""
        labels = self.require_labels()
        seen = np.bincount(labels, minlength=self.num_classes)
        empty = np.flatnonzero(seen == 0)
        if empty.size:
            names = ", ".join(self.class_names[i] for i in empty[:5])
            raise LongtailError(
                f"{self.source or 'features'}: split {self.name!r}: class(es) with no train sample: {names}"
            )
        return self


def counts_from_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class counts ``(C,)`` int64 of integer labels."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.int64)
