"""Built-in image datasets for stage 1 (no download: they come from files a dependency ships).

``digits-lt``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images), split per class
into a class-balanced test split, a class-balanced val split and a long-tailed train split drawn
from the rest with an exponential profile (Cao et al. 2019, Cui et al. 2019):

    n_c = n_max * ratio ** (-c / (C - 1)),   c = 0 .. C-1,

so the head class keeps ``n_max`` images and the tail class ``n_max / ratio``. Classes are ordered
by their digit (0 is the head, 9 the tail), as CIFAR-10-LT does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from stages.errors import LongtailError


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of images: ``images`` (N, 1, H, W) float32 in [0, 1], ``labels`` (N,), ``index`` (N,)."""

    images: np.ndarray
    labels: np.ndarray
    index: np.ndarray
    attributes: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, eq=False)
class ImageDataset:
    name: str
    class_names: tuple[str, ...]
    splits: dict[str, ImageSplit]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes).astype(np.int64)


def exponential_profile(n_max: int, num_classes: int, ratio: float) -> np.ndarray:
    """Per-class counts ``n_max * ratio ** (-c / (C - 1))``, rounded, at least 1."""
    if ratio < 1:
        raise LongtailError(f"imbalance_ratio must be >= 1, got {ratio}")
    if num_classes < 2:  # guards the division by C - 1
        return np.array([n_max], dtype=np.int64)
    c = np.arange(num_classes, dtype=np.float64)
    counts = np.floor(n_max * ratio ** (-c / (num_classes - 1)) + 0.5).astype(np.int64)
    return np.maximum(counts, 1)


def digits_lt(
    imbalance_ratio: float = 20.0,
    test_per_class: int = 50,
    val_per_class: int = 20,
    seed: int = 0,
) -> ImageDataset:
    """The ``digits-lt`` dataset. Every choice is seeded and reproducible."""
    from sklearn.datasets import load_digits

    if test_per_class < 1 or val_per_class < 1:
        raise LongtailError("digits-lt: test_per_class and val_per_class must be >= 1")
    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    num_classes = 10
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    pool = min(len(ix) for ix in per_class) - test_per_class - val_per_class
    if pool < 1:
        raise LongtailError(
            f"digits-lt: test_per_class + val_per_class = {test_per_class + val_per_class} leaves no "
            "train images (the smallest digit class has "
            f"{min(len(ix) for ix in per_class)} images)"
        )
    counts = exponential_profile(pool, num_classes, imbalance_ratio)
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c, ix in enumerate(per_class):
        parts["test"].append(ix[:test_per_class])
        parts["val"].append(ix[test_per_class:test_per_class + val_per_class])
        parts["train"].append(ix[test_per_class + val_per_class:][: counts[c]])
    splits = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        splits[name] = ImageSplit(images=images[idx], labels=labels[idx], index=idx.astype(np.int64))
    spec = {
        "name": "digits-lt",
        "imbalance_ratio": float(imbalance_ratio),
        "test_per_class": int(test_per_class),
        "val_per_class": int(val_per_class),
        "seed": int(seed),
    }
    h = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=16)
    h.update(np.ascontiguousarray(images).tobytes())
    for name in ("train", "val", "test"):
        h.update(name.encode())
        h.update(splits[name].index.tobytes())
    return ImageDataset(
        name="digits-lt",
        class_names=tuple(str(c) for c in range(num_classes)),
        splits=splits,
        fingerprint=h.hexdigest(),
    )


DATASETS = {"digits-lt": digits_lt}


def load_dataset(name: str, **params) -> ImageDataset:
    """Build a built-in dataset by name (``digits-lt``)."""
    if name not in DATASETS:
        raise LongtailError(f"unknown dataset {name!r} (built-in: {', '.join(sorted(DATASETS))})")
    try:
        return DATASETS[name](**params)
    except TypeError as exc:
        raise LongtailError(f"dataset {name!r}: bad parameters: {exc}") from exc
