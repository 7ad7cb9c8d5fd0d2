"""Meta sets: the small balanced labelled sets the meta-learned methods evaluate their outer loss on.

Paper 003 (Jamal et al., §4.2 and §5) calls it the development set ``D``: ten rows per class,
"sample[d] from" the validation set on ImageNet-LT and Places-LT, held out of train on CIFAR-LT and
iNat. Paper 000 (Meta-CALA) balances it by class and by KMeans group inside each class; paper 001
(MetaLAD) takes ten rows per class. The specification (``meta-learning.md``, §1.4, §2.6, §3.4, §4.1)
fixes the project's rule, implemented here:

* the pool is the **val** split by default (never test); ``meta_source: train`` holds the rows out of
  train instead, at most ``n_c - 1`` per class so that every class keeps a train row, and those
  rows then leave the train set of the fit (:func:`split_for_fit`);
* :func:`select_meta_rows` draws ``per_group`` rows per class, or per (class, group) when groups
  are given (all of them where fewer), with a seeded generator: the same seed, labels and groups
  give the same rows;
* the selection is a shared artifact (:func:`meta_set_requirement`, kind ``meta-set``) built once
  per store on the split it is drawn from and attached to the method before its fit.

A class without any row in the pool is a one-line :class:`LongtailError`, before any fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from longtail.stages.base import Requirement
from longtail.stages.data import FeatureSet, counts_from_labels
from longtail.stages.errors import LongtailError

#: where a meta set is drawn from
META_SOURCES = ("val", "train")
#: the artifact kind of :func:`meta_set_requirement`
KIND = "meta-set"
#: salt of the selection generator: a meta set's draws never share a stream with a fit's
_SALT = 0x3E7A5E7


def select_meta_rows(labels: np.ndarray, groups: np.ndarray | None = None, *, per_group: int = 10,
                     seed: int = 0, num_classes: int | None = None, keep_one: bool = False,
                     class_names: tuple[str, ...] | None = None, where: str = "meta set") -> np.ndarray:
    """Sorted ``(M,)`` int64 row indices of a balanced meta set drawn from ``labels`` ``(N,)``.

    For every class ``c`` in ``[0, num_classes)`` (default ``max(labels) + 1``), and within it for
    every group of ``groups`` ``(N,)`` (integers; ``None``: the class is one group), ``per_group``
    rows are drawn without replacement, or all the rows where fewer. ``keep_one`` (rows held out of
    a train split) caps a class at ``n_c - 1`` rows, dropping the last drawn, so that the class keeps
    one. The draws come from ``numpy.random.default_rng([seed, salt])``, class by class and group by
    group in increasing order: deterministic for a seed.

    Raises a one-line :class:`LongtailError` (prefixed ``where``) when a class has no row (or, with
    ``keep_one``, only one), or for a bad ``per_group`` or ``groups``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise LongtailError(f"{where}: labels must be a 1-D integer array")
    if isinstance(per_group, bool) or not isinstance(per_group, (int, np.integer)) or per_group < 1:
        raise LongtailError(f"{where}: per_group = {per_group!r} must be an integer >= 1")
    labels = labels.astype(np.int64)
    c = int(labels.max()) + 1 if num_classes is None and labels.size else int(num_classes or 0)
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape or groups.dtype.kind not in "iu":
            raise LongtailError(f"{where}: groups must be integers, one per row ({labels.shape[0]})")
        groups = groups.astype(np.int64)
    if c < 1:
        raise LongtailError(f"{where}: no labelled rows to draw a meta set from")
    names = class_names if class_names is not None and len(class_names) == c else tuple(str(i) for i in range(c))
    rng = np.random.default_rng([int(seed), _SALT])
    chosen: list[np.ndarray] = []
    for cls in range(c):
        rows = np.flatnonzero(labels == cls)
        need = 2 if keep_one else 1
        if rows.size < need:
            have = "no row" if rows.size == 0 else "only one row"
            extra = " (holding rows out of train leaves each class at least one)" if keep_one else ""
            raise LongtailError(f"{where}: class {names[cls]!r} has {have}, so its meta set would be empty{extra}")
        picked = []
        for g in (np.unique(groups[rows]) if groups is not None else (None,)):
            seg = rows if g is None else rows[groups[rows] == g]
            picked.append(seg[rng.permutation(seg.size)[:int(per_group)]])
        take = np.concatenate(picked)
        if keep_one and take.size >= rows.size:
            take = take[:rows.size - 1]
        chosen.append(take)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class MetaSet:
    """A meta set: ``rows`` ``(M,)`` sorted int64 indices into the split ``source`` (``val`` or
    ``train``) of ``num_rows`` rows; ``fingerprint`` that split's fingerprint when it came from a
    store (``""`` otherwise), checked when the meta set is used."""

    rows: np.ndarray
    source: str
    num_rows: int
    fingerprint: str = ""


def build_meta_set(split: FeatureSet, *, source: str, per_group: int, seed: int,
                   groups: np.ndarray | None = None, where: str = "meta set") -> MetaSet:
    """The :class:`MetaSet` of ``split`` (the val split, or the train split for ``source: train``)."""
    if source not in META_SOURCES:
        raise LongtailError(f"{where}: meta_source = {source!r} is not one of {', '.join(META_SOURCES)}")
    labels = split.require_labels()
    rows = select_meta_rows(labels, groups, per_group=per_group, seed=seed, num_classes=split.num_classes,
                            keep_one=source == "train", class_names=split.class_names,
                            where=f"{where} ({split.name} split)")
    return MetaSet(rows, source, len(split), str(split.meta.get("split_fingerprint", "")))


def meta_set_tensors(meta: MetaSet) -> tuple[dict[str, torch.Tensor], dict]:
    """``Requirement.save``: the rows as a tensor, the rest as JSON."""
    return ({"rows": torch.as_tensor(np.asarray(meta.rows, dtype=np.int64))},
            {"source": meta.source, "num_rows": int(meta.num_rows), "fingerprint": meta.fingerprint})


def meta_set_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> MetaSet:
    """``Requirement.load``: the reverse of :func:`meta_set_tensors`."""
    return MetaSet(tensors["rows"].numpy().astype(np.int64), str(meta["source"]), int(meta["num_rows"]),
                   str(meta.get("fingerprint", "")))


def meta_set_requirement(*, source: str, per_group: int, seed: int, attach: Callable[[MetaSet], None],
                         groups: Callable[[FeatureSet], np.ndarray | None] | None = None,
                         group_params: Mapping[str, Any] | None = None,
                         modules: tuple[str, ...] = ()) -> Requirement:
    """The shared artifact (kind ``meta-set``) of a meta set drawn from the split ``source``.

    Built once per store and parameters on that split (``Requirement.split``): the val split by
    default, the train split for ``source: train``. ``groups`` maps the split to one group per row
    (KMeans clusters inside each class, the store's attributes) for a (class, group)-balanced
    meta set; what decides them goes in ``group_params`` (part of the key), their code in
    ``modules``. ``attach`` hands the built or loaded :class:`MetaSet` to the method.
    """
    params = {"source": source, "per_group": int(per_group), "seed": int(seed),
              "grouping": "class" if groups is None else "class-group", **dict(group_params or {})}

    def build(split: FeatureSet) -> MetaSet:
        return build_meta_set(split, source=source, per_group=int(per_group), seed=int(seed),
                              groups=None if groups is None else groups(split))

    return Requirement(kind=KIND, params=params, modules=("longtail.stages.meta.metaset", *modules),
                       build=build, save=meta_set_tensors, load=meta_set_from_tensors, attach=attach,
                       split=source)


def _subset(split: FeatureSet, rows: np.ndarray, name: str, class_counts: np.ndarray | None = None) -> FeatureSet:
    return replace(split, features=split.features[rows], labels=split.labels[rows],
                   attributes=None if split.attributes is None else split.attributes[rows],
                   index=None if split.index is None else split.index[rows], name=name,
                   class_counts=split.class_counts if class_counts is None else class_counts)


def split_for_fit(train: FeatureSet, val: FeatureSet | None, meta: MetaSet,
                  where: str = "meta set") -> tuple[FeatureSet, FeatureSet]:
    """``(train rows of the fit, meta rows)`` for a meta set drawn for this ``train`` / ``val``.

    ``source: val``: ``train`` unchanged and the meta rows of ``val``. ``source: train``: the meta
    rows leave train, whose ``class_counts`` become those of the rows that stay (so every prior and
    class weight of the fit is that of the reduced train set). A meta set drawn from another split
    (a different row count or fingerprint) is a :class:`LongtailError`.
    """
    pool = val if meta.source == "val" else train
    if pool is None:
        raise LongtailError(f"{where}: meta_source is val but there is no val split "
                            "(set meta_source: train to hold meta rows out of train)")
    fp = str(pool.meta.get("split_fingerprint", ""))
    if len(pool) != meta.num_rows or (fp and meta.fingerprint and fp != meta.fingerprint):
        raise LongtailError(f"{where}: the meta set was drawn from another {meta.source} split "
                            f"({meta.num_rows} rows; this one has {len(pool)})")
    rows = np.asarray(meta.rows, dtype=np.int64)
    if meta.source == "val":
        return train, _subset(val, rows, "meta")
    keep = np.ones(len(train), dtype=bool)
    keep[rows] = False
    kept = np.flatnonzero(keep)
    counts = counts_from_labels(train.labels[kept], train.num_classes)
    return _subset(train, kept, train.name, counts), _subset(train, rows, "meta", counts)
