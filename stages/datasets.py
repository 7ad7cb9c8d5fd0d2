"""Built-in image datasets for stage 1 (no download: they come from files a dependency ships).

``digits-lt``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images), split per class
into a class-balanced test split, a class-balanced val split and a long-tailed train split drawn
from the rest with an exponential profile (Cao et al. 2019, Cui et al. 2019):

    n_c = n_max * ratio ** (-c / (C - 1)),   c = 0 .. C-1,

so the head class keeps ``n_max`` images and the tail class ``n_max / ratio``. Classes are ordered
by their digit (0 is the head, 9 the tail), as CIFAR-10-LT does.

``digits-glt``: the same real images with one visual attribute each (original, intensity
inversion, thickened strokes) and the CLT / ALT / GLT protocols of the generalized long tail
(Tang et al. 2022, as paper 000 uses them); see :func:`digits_glt`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from longtail.stages.errors import LongtailError


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
    attribute_names: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.splits["train"].labels, minlength=self.num_classes).astype(np.int64)


def _fingerprint(spec: dict, images: np.ndarray, splits: dict[str, ImageSplit], *,
                 attributes: bool = False) -> str:
    """blake2b of the JSON ``spec``, the source ``images`` and each split's index (and, with
    ``attributes``, each split's attributes), in the order train, val, test."""
    h = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=16)
    h.update(np.ascontiguousarray(images).tobytes())
    for name in ("train", "val", "test"):
        h.update(name.encode())
        h.update(splits[name].index.tobytes())
        if attributes:
            h.update(splits[name].attributes.tobytes())
    return h.hexdigest()


def exponential_profile(n_max: int, num_classes: int, ratio: float) -> np.ndarray:
    """Per-class counts ``n_max * ratio ** (-c / (C - 1))``, rounded, at least 1."""
    if ratio < 1:
        raise LongtailError(f"imbalance_ratio must be >= 1, got {ratio}")
    if num_classes < 2:  # guards the division by C - 1
        return np.array([n_max], dtype=np.int64)
    c = np.arange(num_classes, dtype=np.float64)
    counts = np.floor(n_max * ratio ** (-c / (num_classes - 1)) + 0.5).astype(np.int64)
    return np.maximum(counts, 1)


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The real scikit-learn digits: images ``(N, 1, 8, 8)`` float32 in [0, 1], labels ``(N,)``
    int64, and per class a seeded permutation of its row indices (one generator, classes 0..9)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    return images, labels, per_class


def digits_lt(
    imbalance_ratio: float = 20.0,
    test_per_class: int = 50,
    val_per_class: int = 20,
    seed: int = 0,
) -> ImageDataset:
    """The ``digits-lt`` dataset. Every choice is seeded and reproducible."""
    if test_per_class < 1 or val_per_class < 1:
        raise LongtailError("digits-lt: test_per_class and val_per_class must be >= 1")
    images, labels, per_class = _digits(seed)
    num_classes = len(per_class)
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
    return ImageDataset(
        name="digits-lt",
        class_names=tuple(str(c) for c in range(num_classes)),
        splits=splits,
        fingerprint=_fingerprint(spec, images, splits),
    )


# ---------------------------------------------------------------------------- digits-glt
#: The visual attributes of ``digits-glt``: attribute ``a`` of an image is this transform of the
#: real image (a nuisance for the class, easy for a small CNN to see).
GLT_ATTRIBUTES: tuple[str, ...] = ("original", "inverted", "thick")
#: The protocols of Tang et al. 2022 as paper 000 (Sec. "GLT benchmarks", appendix D) uses them.
GLT_PROTOCOLS: tuple[str, ...] = ("clt", "alt", "glt")


def attribute_transform(images: np.ndarray, attribute: int) -> np.ndarray:
    """Attribute ``attribute`` of images ``(N, 1, H, W)`` in [0, 1]: 0 the image itself, 1 its
    intensity inversion ``1 - x``, 2 its strokes thickened by a grey dilation with a 2 x 2
    footprint (each stroke grows by one pixel up and left; a larger footprint closes the loops of
    8 x 8 digits)."""
    from scipy.ndimage import grey_dilation

    if attribute == 0:
        return images
    if attribute == 1:
        return (1.0 - images).astype(np.float32)
    if attribute == 2:
        return grey_dilation(images, size=(1, 1, 2, 2)).astype(np.float32)
    raise LongtailError(f"digits-glt: unknown attribute {attribute} (0..{len(GLT_ATTRIBUTES) - 1})")


def attribute_shares(num_attributes: int, ratio: float, cls: int) -> np.ndarray:
    """Long-tailed attribute shares ``(A,)`` inside class ``cls`` (sum 1).

    The exponential profile of the classes, over attributes: the attribute of rank ``r`` gets a
    share proportional to ``ratio ** (-r / (A - 1))``. The ranking rotates with the class (class
    ``c``'s most common attribute is ``c mod A``), so that, as in paper 000's Fig. 1 (white doves,
    dark crows), the common attribute of one class is a rare one of another and the attribute is
    spuriously correlated with the class in train.
    """
    if num_attributes < 2:  # guards the division by A - 1
        return np.ones(1)
    rank = (np.arange(num_attributes) - cls) % num_attributes
    w = ratio ** (-rank / (num_attributes - 1))
    return w / w.sum()


def _allocate(n: int, shares: np.ndarray, min_each: int) -> np.ndarray:
    """``n`` images over groups with the given shares: each rounded, at least ``min_each``; the
    most common group absorbs the rounding so that the counts sum to ``n``."""
    counts = np.maximum(np.floor(n * shares + 0.5).astype(np.int64), min_each)
    counts[int(np.argmax(shares))] += n - int(counts.sum())
    return counts


def digits_glt(
    protocol: str = "glt",
    imbalance_ratio: float = 20.0,
    attribute_ratio: float = 10.0,
    num_attributes: int = 3,
    test_per_group: int = 15,
    val_per_group: int = 5,
    seed: int = 0,
) -> ImageDataset:
    """The ``digits-glt`` dataset: the real scikit-learn digits, one visual attribute per image.

    Each real image is used once, with one attribute (:func:`attribute_transform`). Per class a
    seeded permutation of its images gives ``A * test_per_group`` test images, then
    ``A * val_per_group`` val images, then a train pool of ``P`` images (the same ``P`` for every
    class). The splits of the three protocols of Tang et al. 2022 (paper 000, "GLT benchmarks"
    and appendix D: ImageNet-GLT's Train-GLT / Train-CBL / Test-CBL / Test-GBL):

    * Train-GLT (``clt``, ``glt``): class counts ``P * imbalance_ratio ** (-c / (C - 1))`` (the
      profile of ``digits-lt``), attributes long-tailed inside each class
      (:func:`attribute_shares`, ``attribute_ratio`` between the most and the least common);
    * Train-CBL (``alt``): class-balanced with the same number of train images in total as
      Train-GLT (ImageNet-GLT's Train-CBL is as large as its Train-GLT), attributes long-tailed;
    * Test-CBL (``clt``): class-balanced, attributes distributed as in train;
    * Test-GBL (``alt``, ``glt``): balanced in classes and attributes (``test_per_group`` images
      per (class, attribute) group).

    The val split is drawn like the protocol's test split, so that what a method chooses on val
    (tau-norm's tau, temperature) is chosen for the distribution it is tested on. Train, val and
    test take the same real images under every protocol; only the attributes (and, for ``alt``,
    the train images kept) change, so CLT and GLT share one train split, ALT and GLT one test
    split. Every group keeps at least one train, val and test image.
    """
    if protocol not in GLT_PROTOCOLS:
        raise LongtailError(f"digits-glt: unknown protocol {protocol!r} (use one of {', '.join(GLT_PROTOCOLS)})")
    if not 2 <= num_attributes <= len(GLT_ATTRIBUTES):
        raise LongtailError(f"digits-glt: num_attributes must be 2..{len(GLT_ATTRIBUTES)}, got {num_attributes}")
    if attribute_ratio < 1:
        raise LongtailError(f"digits-glt: attribute_ratio must be >= 1, got {attribute_ratio}")
    if test_per_group < 1 or val_per_group < 1:
        raise LongtailError("digits-glt: test_per_group and val_per_group must be >= 1")
    images, labels, per_class = _digits(seed)
    num_classes, a_count = len(per_class), int(num_attributes)
    n_test, n_val = a_count * test_per_group, a_count * val_per_group
    pool = min(len(ix) for ix in per_class) - n_test - n_val
    if pool < a_count:
        raise LongtailError(
            f"digits-glt: {n_test} test and {n_val} val images per class leave {max(pool, 0)} train "
            f"images for {a_count} attributes (the smallest digit class has {min(len(ix) for ix in per_class)})"
        )
    glt_counts = exponential_profile(pool, num_classes, imbalance_ratio)
    balanced = int(np.floor(glt_counts.sum() / num_classes + 0.5))
    train_counts = np.full(num_classes, balanced) if protocol == "alt" else glt_counts
    uniform = np.full(a_count, 1.0 / a_count)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for c, ix in enumerate(per_class):
        shares = attribute_shares(a_count, attribute_ratio, c)
        test_shares = shares if protocol == "clt" else uniform
        take = {"test": (ix[:n_test], _allocate(n_test, test_shares, 1)),
                "val": (ix[n_test:n_test + n_val], _allocate(n_val, test_shares, 1)),
                "train": (ix[n_test + n_val:][: max(train_counts[c], a_count)],
                          _allocate(max(int(train_counts[c]), a_count), shares, 1))}
        for name, (chosen, counts) in take.items():
            parts[name].append((chosen, np.repeat(np.arange(a_count), counts)))
    splits = {}
    for name, chunks in parts.items():
        idx = np.concatenate([ix for ix, _ in chunks])
        attrs = np.concatenate([a for _, a in chunks])
        order = np.argsort(idx, kind="stable")
        idx, attrs = idx[order], attrs[order]
        imgs = images[idx].copy()
        for a in range(1, a_count):
            sel = attrs == a
            imgs[sel] = attribute_transform(imgs[sel], a)
        splits[name] = ImageSplit(images=imgs, labels=labels[idx], index=idx.astype(np.int64),
                                  attributes=attrs.astype(np.int64))
    spec = {
        "name": "digits-glt",
        "protocol": protocol,
        "imbalance_ratio": float(imbalance_ratio),
        "attribute_ratio": float(attribute_ratio),
        "attributes": list(GLT_ATTRIBUTES[:a_count]),
        "test_per_group": int(test_per_group),
        "val_per_group": int(val_per_group),
        "seed": int(seed),
    }
    return ImageDataset(
        name="digits-glt",
        class_names=tuple(str(c) for c in range(num_classes)),
        splits=splits,
        fingerprint=_fingerprint(spec, images, splits, attributes=True),
        attribute_names=GLT_ATTRIBUTES[:a_count],
    )


DATASETS = {"digits-lt": digits_lt, "digits-glt": digits_glt}
#: Built-in datasets whose splits carry attributes and follow ``protocol`` (the GLT protocols).
PROTOCOL_DATASETS = ("digits-glt",)


def load_dataset(name: str, **params) -> ImageDataset:
    """Build a built-in dataset by name (``digits-lt``, ``digits-glt``)."""
    if name not in DATASETS:
        raise LongtailError(f"unknown dataset {name!r} (built-in: {', '.join(sorted(DATASETS))})")
    try:
        return DATASETS[name](**params)
    except TypeError as exc:
        raise LongtailError(f"dataset {name!r}: bad parameters: {exc}") from exc
