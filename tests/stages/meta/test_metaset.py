"""Meta-set selection (specification §1.4, §2.6, §4.1): balanced, seeded, error paths."""

import numpy as np
import pytest

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.stages.meta.metaset import (
    build_meta_set,
    meta_set_from_tensors,
    meta_set_requirement,
    meta_set_tensors,
    select_meta_rows,
    split_for_fit,
)


def _split(labels, name, counts=None, attributes=None):
    labels = np.asarray(labels, dtype=np.int64)
    c = int(labels.max()) + 1 if counts is None else len(counts)
    counts = np.bincount(labels, minlength=c) if counts is None else np.asarray(counts)
    feats = np.arange(labels.size * 2, dtype=np.float32).reshape(-1, 2)
    return FeatureSet(feats, labels, counts, tuple(f"c{i}" for i in range(c)), attributes=attributes, name=name)


def test_per_class_balanced_sorted_and_seeded():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 12)
    rows = select_meta_rows(labels, per_group=4, seed=3)
    assert np.all(np.diff(rows) > 0)
    assert np.bincount(labels[rows]).tolist() == [4, 3, 4]  # class 1 has only 3: all of them
    assert np.array_equal(rows, select_meta_rows(labels, per_group=4, seed=3))
    others = {tuple(select_meta_rows(labels, per_group=4, seed=s)) for s in range(6)}
    assert len(others) > 1  # the seed matters


def test_per_class_and_group():
    labels = np.array([0] * 8 + [1] * 8)
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 2] * 2)
    rows = select_meta_rows(labels, groups, per_group=2, seed=0)
    pairs = list(zip(labels[rows].tolist(), groups[rows].tolist()))
    # (class, group) sizes 3, 2, 3 per class: two of each
    assert sorted(pairs) == sorted([(c, g) for c in (0, 1) for g in (0, 0, 1, 1, 2, 2)])


def test_keep_one_leaves_every_class_a_row():
    labels = np.array([0] * 3 + [1] * 2 + [2] * 30)
    rows = select_meta_rows(labels, per_group=10, seed=0, keep_one=True)
    assert np.bincount(labels[rows]).tolist() == [2, 1, 10]  # min(10, n_c - 1)


def test_empty_class_is_one_line_error():
    with pytest.raises(LongtailError, match=r"class 'c2' has no row.*empty") as info:
        select_meta_rows(np.array([0, 0, 1]), per_group=2, num_classes=3, class_names=("c0", "c1", "c2"))
    assert "\n" not in str(info.value)
    with pytest.raises(LongtailError, match="only one row"):
        select_meta_rows(np.array([0, 0, 1]), per_group=2, keep_one=True)
    with pytest.raises(LongtailError, match="per_group"):
        select_meta_rows(np.array([0, 1]), per_group=0)
    with pytest.raises(LongtailError, match="groups"):
        select_meta_rows(np.array([0, 1]), np.array([0]), per_group=1)


def test_split_for_fit_val_and_train_sources():
    train = _split([0] * 6 + [1] * 3, "train")
    val = _split([0, 0, 0, 1, 1, 1], "val", counts=train.class_counts)
    meta = build_meta_set(val, source="val", per_group=2, seed=0)
    fit_train, meta_rows = split_for_fit(train, val, meta)
    assert fit_train is train and len(meta_rows) == 4
    assert np.bincount(meta_rows.labels).tolist() == [2, 2]

    held = build_meta_set(train, source="train", per_group=2, seed=0)
    fit_train, meta_rows = split_for_fit(train, None, held)
    assert fit_train.class_counts.tolist() == [4, 1]  # the meta rows left train
    assert len(fit_train) == 5 and len(meta_rows) == 4
    both = np.concatenate([fit_train.features[:, 0], meta_rows.features[:, 0]])
    assert sorted(both.tolist()) == sorted(train.features[:, 0].tolist())  # a partition of train
    with pytest.raises(LongtailError, match="no val split"):
        split_for_fit(train, None, meta)
    with pytest.raises(LongtailError, match="another val split"):
        split_for_fit(train, _split([0, 1, 0, 1], "val", counts=train.class_counts), meta)


def test_requirement_round_trip_and_key_params():
    got = []
    val = _split([0, 0, 1, 1, 1], "val")
    req = meta_set_requirement(source="val", per_group=1, seed=5, attach=got.append)
    assert req.split == "val" and req.kind == "meta-set"
    assert req.params == {"source": "val", "per_group": 1, "seed": 5, "grouping": "class"}
    built = req.build(val)
    tensors, meta = meta_set_tensors(built)
    back = meta_set_from_tensors(tensors, meta)
    req.attach(back)
    assert got[0].rows.tolist() == built.rows.tolist() and got[0].source == "val" and got[0].num_rows == 5
