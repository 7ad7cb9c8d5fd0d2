"""digits-glt (the generalized long-tail protocols) and the group metrics, at the stages level."""

import numpy as np
import pytest

from longtail.stages import evaluate as ev
from longtail.stages.datasets import (
    attribute_shares,
    attribute_transform,
    digits_glt,
    digits_lt,
    exponential_profile,
    load_dataset,
)
from longtail.stages.errors import LongtailError


def table(split, a=3):
    """Samples per (class, attribute) ``(10, A)``."""
    out = np.zeros((10, a), dtype=np.int64)
    np.add.at(out, (split.labels, split.attributes), 1)
    return out


@pytest.fixture(scope="module")
def protocols():
    return {p: digits_glt(protocol=p, seed=0) for p in ("clt", "alt", "glt")}


def test_digits_lt_is_unchanged_by_digits_glt():
    # the fingerprint digits-lt had before digits-glt was added (same sklearn digits, seed 0)
    assert digits_lt(seed=0).fingerprint == "99ede45d6afbbe6ff562b47c014e5f45"
    assert digits_lt(seed=0).splits["train"].attributes is None


def test_attribute_shares_by_hand():
    # ratio 4 over 3 attributes: 4 ** (-r / 2) = 1, 1/2, 1/4 -> / 1.75; class 1's head is attribute 1
    np.testing.assert_allclose(attribute_shares(3, 4.0, 0), np.array([1, 0.5, 0.25]) / 1.75)
    np.testing.assert_allclose(attribute_shares(3, 4.0, 1), np.array([0.25, 1, 0.5]) / 1.75)
    np.testing.assert_allclose(attribute_shares(2, 9.0, 3), [0.1, 0.9])


def test_attribute_transforms_by_hand():
    img = np.zeros((1, 1, 3, 3), dtype=np.float32)
    img[0, 0, 1, 1] = 0.5
    np.testing.assert_array_equal(attribute_transform(img, 0), img)
    np.testing.assert_array_equal(attribute_transform(img, 1), 1 - img)
    thick = attribute_transform(img, 2)[0, 0]
    # grey dilation with a 2 x 2 footprint: the pixel spreads one step up and left
    want = np.zeros((3, 3), dtype=np.float32)
    want[:2, :2] = 0.5
    np.testing.assert_array_equal(thick, want)


def test_glt_train_is_long_tailed_in_classes_and_attributes(protocols):
    d = protocols["glt"]
    train = table(d.splits["train"])
    # 174 images in the smallest class - 45 test - 15 val = 114 in the train pool
    assert train.sum(1).tolist() == exponential_profile(114, 10, 20.0).tolist()
    for c in range(10):
        order = np.argsort(-attribute_shares(3, 10.0, c))
        assert order[0] == c % 3  # the common attribute rotates with the class
        assert np.all(np.diff(train[c][order]) <= 0) and train[c].min() >= 1
    # head class: 114 * (1, 10^-0.5, 0.1) / 1.416 -> 80.5, 25.5, 8.1 rounded, the head absorbs the rest
    assert train[0].tolist() == [81, 25, 8]


def test_protocol_test_and_val_splits(protocols):
    clt, alt, glt = protocols["clt"], protocols["alt"], protocols["glt"]
    for d in (alt, glt):  # Test-GBL: balanced in classes and attributes; val drawn the same way
        assert (table(d.splits["test"]) == 15).all()
        assert (table(d.splits["val"]) == 5).all()
    # Test-CBL: class-balanced, attributes as in train (45 * shares, at least 1)
    t = table(clt.splits["test"])
    assert (t.sum(1) == 45).all()
    assert t[0].tolist() == [32, 10, 3] and t[1].tolist() == [3, 32, 10]
    assert table(clt.splits["val"])[0].tolist() == [11, 3, 1]
    # ALT: class-balanced train as large as Train-GLT (389 / 10 -> 39 per class), attributes long-tailed
    a = table(alt.splits["train"])
    assert (a.sum(1) == 39).all() and a[0].tolist() == [27, 9, 3] and a[2].tolist() == [9, 3, 27]


def test_protocols_share_images_and_use_each_once(protocols):
    clt, alt, glt = protocols["clt"], protocols["alt"], protocols["glt"]
    for d in protocols.values():
        ids = np.concatenate([d.splits[s].index for s in ("train", "val", "test")])
        assert len(np.unique(ids)) == len(ids)  # each real image once
        for s in d.splits.values():
            assert s.attributes is not None and len(s.attributes) == len(s)
    # CLT and GLT share Train-GLT, ALT and GLT share Test-GBL
    for key in ("index", "attributes", "images"):
        np.testing.assert_array_equal(getattr(clt.splits["train"], key), getattr(glt.splits["train"], key))
        np.testing.assert_array_equal(getattr(alt.splits["test"], key), getattr(glt.splits["test"], key))
    # the image is the attribute's transform of the real digit
    from sklearn.datasets import load_digits

    raw = (load_digits().images.astype(np.float32) / 16.0)[:, None]
    s = glt.splits["test"]
    for a in range(3):
        sel = s.attributes == a
        np.testing.assert_array_equal(s.images[sel], attribute_transform(raw[s.index[sel]], a))


def test_fingerprint_names_protocol_and_attribute_params(protocols):
    fps = {d.fingerprint for d in protocols.values()}
    assert len(fps) == 3
    assert digits_glt(seed=0).fingerprint == protocols["glt"].fingerprint  # glt is the default
    assert digits_glt(attribute_ratio=5).fingerprint not in fps
    assert digits_glt(num_attributes=2).fingerprint not in fps
    assert digits_glt(seed=1).fingerprint not in fps
    assert load_dataset("digits-glt", protocol="clt").attribute_names == ("original", "inverted", "thick")


@pytest.mark.parametrize("params, needle", [
    ({"protocol": "blt"}, "unknown protocol 'blt'"),
    ({"num_attributes": 1}, "num_attributes"),
    ({"attribute_ratio": 0.5}, "attribute_ratio"),
    ({"test_per_group": 55}, "leave"),
    ({"val_per_group": 0}, "val_per_group"),
])
def test_digits_glt_bad_parameters(params, needle):
    with pytest.raises(LongtailError, match=needle):
        digits_glt(**params)
    with pytest.raises(LongtailError, match="digits-lt"):
        load_dataset("digits-lt", protocol="glt")


# ------------------------------------------------------------------------------ group metrics
def test_group_accuracy_average_and_worst_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    attrs = np.array([0, 0, 1, 0, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 0])
    acc = ev.group_accuracy(pred, labels, attrs, 3)
    # class 0: attr 0 -> 1/2, attr 1 -> 1/1; class 1: attr 0 -> 1/1, attr 1 -> 1/3; class 2: empty
    np.testing.assert_allclose(acc[:2], [[0.5, 1.0], [1.0, 1 / 3]])
    assert np.isnan(acc[2]).all()
    logits = np.eye(3)[pred] * 5.0
    g = ev.group_metrics(logits, labels, attrs)
    assert g["average_group"] == pytest.approx((0.5 + 1 + 1 + 1 / 3) / 4)
    assert g["worst_group"] == pytest.approx(1 / 3)
    # overall accuracy 4/7 weighs groups by size; the average-group mean does not
    assert g["average_group"] != pytest.approx(4 / 7)
    assert ev.group_counts(labels, attrs, 3, num_attributes=3).tolist() == [[2, 1, 0], [1, 3, 0], [0, 0, 0]]


def test_macro_precision_by_hand():
    labels = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 1])
    # precision: class 0 -> 1/1, class 1 -> 2/4, class 2 never predicted -> 0
    assert ev.macro_precision(pred, labels, 3) == pytest.approx((1 + 0.5 + 0) / 3)
    # perfect predictions: precision 1; a class absent from the labels is left out of the mean
    assert ev.macro_precision(labels, labels, 4) == 1.0


def test_group_metrics_bad_attributes():
    logits = np.zeros((3, 2))
    with pytest.raises(LongtailError, match="attributes"):
        ev.group_metrics(logits, np.array([0, 1, 0]), np.array([0, 1]))
    with pytest.raises(LongtailError, match="negative"):
        ev.group_metrics(logits, np.array([0, 1, 0]), np.array([0, -1, 0]))
    with pytest.raises(LongtailError, match="integer"):
        ev.group_metrics(logits, np.array([0, 1, 0]), np.array([0.5, 1, 0]))


def test_group_accuracy_plot(tmp_path):
    from longtail.pipeline.report.plots import plot_group_accuracy

    table = [[1.0, None], [0.25, 0.5]]  # as metrics.json holds it, null for an empty group
    path = plot_group_accuracy(table, ["a", "b"], ["x", "y"], "ce", tmp_path / "g.png")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(LongtailError, match="3 attribute names"):
        plot_group_accuracy(table, ["a", "b"], ["x", "y", "z"], "ce", tmp_path / "h.png")
    assert not (tmp_path / "h.png").exists()
