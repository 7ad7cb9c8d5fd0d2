"""Synthetic feature sets built to show a paper's claim (pure numpy, seeded).

:func:`dove_crow` is the story of paper 000 (CALA, AAAI 2025, introduction and footnote 1): a head
class whose rare attribute looks like a tail class. Doves are common and mostly white; the few dark
doves lie towards the crows, a tail class. Train is long-tailed in the classes *and* in the
attributes inside each class; val and test are balanced in both (Test-GBL of Tang et al. 2022: the
paper assumes ``p_te(white | dove) = p_te(dark | dove)`` "for fairness"), so the class-conditional
densities of train and test differ (``p_tr(x | y) != p_te(x | y)``, the CCPD ratio that CALA's
``v`` estimates) and worst-group accuracy is measurable on every (class, attribute) group.

Geometry (``D`` dimensions, isotropic unit-variance Gaussian noise):

* class ``c`` has its centre ``separation * e_c`` (``e_c`` orthonormal, seeded), its common attribute
  at the centre and its rare attribute at ``centre + shift_c``;
* the dove's (class 0) rare attribute ``dark`` lies a fraction ``toward`` of the way to the crow's
  (class ``C - 1``) centre, plus ``offset`` along a direction of its own that neither class uses:
  the dark doves are separable from the crows, but only by a boundary that a head tuned to the
  class prior (logit adjustment, which favours the tail class) places through them;
* every other class's rare attribute is shifted by ``rare_shift`` along a direction of its own
  (it looks like no other class).

Class counts fall geometrically from ``head`` (dove) to ``head / imbalance_ratio`` (crow); inside each
class the common:rare attribute ratio is ``attribute_ratio`` (at least one rare sample per class).
Attribute indices: 0 = ``light``, 1 = ``dark``; the dove's common attribute is ``light``, the crow's
``dark``, the others alternate (class ``c`` mostly ``light`` for even ``c``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SyntheticSet", "dove_crow"]

ATTRIBUTES = ("light", "dark")


@dataclass(frozen=True)
class SyntheticSet:
    """Splits ready for :class:`longtail.stages.data.FeatureSet`.

    Attributes:
        splits: ``{"train" | "val" | "test": {"features": (N, D) float32, "labels": (N,) int64,
            "attributes": (N,) int64}}``.
        class_counts: ``(C,)`` int64 train counts.
        class_names: ``C`` names (``dove`` first, ``crow`` last).
        attribute_names: ``("light", "dark")``.
        common: ``(C,)`` int64, each class's common attribute.
        params: the generator's arguments.
    """

    splits: dict[str, dict[str, np.ndarray]]
    class_counts: np.ndarray
    class_names: tuple[str, ...]
    attribute_names: tuple[str, ...]
    common: np.ndarray
    params: dict = field(default_factory=dict)

    def feature_set(self, split: str):
        """The split as a :class:`~longtail.stages.data.FeatureSet` (with its attributes)."""
        from longtail.stages.data import FeatureSet

        s = self.splits[split]
        return FeatureSet(s["features"], s["labels"], self.class_counts, self.class_names,
                          attributes=s["attributes"], name=split, source="dove-crow")


def _class_names(c: int) -> tuple[str, ...]:
    middle = ("gull", "sparrow", "finch", "heron", "owl", "swan", "wren", "kite")
    names = ["dove"] + [middle[i] if i < len(middle) else f"bird{i}" for i in range(c - 2)] + ["crow"]
    return tuple(names)


def dove_crow(seed: int = 0, *, num_classes: int = 5, dim: int = 8, head: int = 600,
              imbalance_ratio: float = 20.0, attribute_ratio: float = 19.0, separation: float = 4.0,
              toward: float = 0.7, offset: float = 1.5, rare_shift: float = 2.5,
              val_per_group: int = 20, test_per_group: int = 100) -> SyntheticSet:
    """The dove/crow set of paper 000's story (module docstring), seeded by ``seed``.

    Args:
        seed: feeds every draw (geometry and samples).
        num_classes: ``C >= 2``; class 0 is the dove (head), class ``C - 1`` the crow (tail).
        dim: feature dimension ``D >= C + 2``.
        head: train samples of the dove.
        imbalance_ratio: dove : crow train counts (geometric in between).
        attribute_ratio: common : rare train counts inside every class.
        separation: distance of each class centre from the origin (noise has unit variance).
        toward: how far the dark doves lie from the dove's centre towards the crow's (0 to 1).
        offset: the dark doves' distance from that line, along a direction of their own.
        rare_shift: the length of the other classes' rare-attribute shift.
        val_per_group, test_per_group: samples per (class, attribute) group of val and test.
    """
    c, d = int(num_classes), int(dim)
    if c < 2 or d < c + 2:
        raise ValueError(f"dove_crow needs num_classes >= 2 and dim >= num_classes + 2, got {c}, {d}")
    rng = np.random.default_rng([int(seed), 0xD0E])
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))  # orthonormal columns
    centres = separation * basis[:, :c].T  # (C, D)
    shifts = np.empty((c, d))
    # the dove's dark attribute: towards the crow, plus a direction only it uses
    shifts[0] = toward * (centres[c - 1] - centres[0]) + offset * basis[:, c]
    for k in range(1, c):
        direction = rng.normal(size=d)
        direction -= basis[:, :c + 1] @ (basis[:, :c + 1].T @ direction)  # away from every class and the dark doves
        shifts[k] = rare_shift * direction / np.linalg.norm(direction)
    common = np.array([0] + [k % 2 for k in range(1, c - 1)] + [1], dtype=np.int64)[:c]
    if c == 2:
        common = np.array([0, 1], dtype=np.int64)
    counts = np.maximum(2, np.round(head * float(imbalance_ratio) ** (-np.arange(c) / (c - 1)))).astype(np.int64)

    def draw(per_group: np.ndarray) -> dict[str, np.ndarray]:
        """``per_group`` ``(C, 2)``: samples of (class, common) and (class, rare)."""
        xs, ys, attrs = [], [], []
        for k in range(c):
            for rare in (0, 1):
                n = int(per_group[k, rare])
                mean = centres[k] + (shifts[k] if rare else 0.0)
                xs.append(mean + rng.normal(size=(n, d)))
                ys.append(np.full(n, k, dtype=np.int64))
                attrs.append(np.full(n, common[k] if not rare else 1 - common[k], dtype=np.int64))
        order = rng.permutation(int(per_group.sum()))
        return {"features": np.concatenate(xs).astype(np.float32)[order],
                "labels": np.concatenate(ys)[order], "attributes": np.concatenate(attrs)[order]}

    rare = np.maximum(1, np.round(counts / (1.0 + float(attribute_ratio)))).astype(np.int64)
    train = draw(np.stack([counts - rare, rare], 1))
    val = draw(np.full((c, 2), int(val_per_group)))
    test = draw(np.full((c, 2), int(test_per_group)))
    params = {"seed": int(seed), "num_classes": c, "dim": d, "head": int(head), "imbalance_ratio": float(imbalance_ratio),
              "attribute_ratio": float(attribute_ratio), "separation": float(separation), "toward": float(toward),
              "offset": float(offset), "rare_shift": float(rare_shift), "val_per_group": int(val_per_group),
              "test_per_group": int(test_per_group)}
    return SyntheticSet({"train": train, "val": val, "test": test}, counts, _class_names(c), ATTRIBUTES, common,
                        params)
