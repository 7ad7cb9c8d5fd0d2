"""Importing user feature files (.npz, .h5) into a feature store; one-line errors naming the file."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from stages.errors import LongtailError
from storage import importers
from storage.featurestore import open_store, store_status
from storage.importers import import_features, load_feature_file

D = 5


def arrays(n: int, seed: int, classes: int = 4, attributes: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    labels[:classes] = np.arange(classes)
    out = {"features": rng.normal(size=(n, D)), "labels": labels}  # float64 features on purpose
    if attributes:
        out["attributes"] = rng.integers(0, 3, n)
    return out


def save(path, data: dict) -> str:
    path = str(path)
    if path.endswith(".npz"):
        np.savez(path, **data)
    else:
        with h5py.File(path, "w") as f:
            for k, v in data.items():
                f.create_dataset(k, data=v)
    return path


def snapshot(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[p] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


# ---------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", [".npz", ".h5", ".hdf5"])
def test_load_feature_file(tmp_path, ext):
    data = arrays(20, 0)
    path = save(tmp_path / f"train{ext}", data)
    got = load_feature_file(path)
    assert set(got) == {"features", "labels", "attributes"}
    assert got["features"].dtype == np.float32 and got["labels"].dtype == np.int64
    np.testing.assert_array_equal(got["features"], data["features"].astype(np.float32))
    np.testing.assert_array_equal(got["labels"], data["labels"])
    np.testing.assert_array_equal(got["attributes"], data["attributes"])


def test_npz_import_round_trip(tmp_path):
    train, val, test = arrays(30, 0), arrays(8, 1, attributes=False), arrays(12, 2)
    res = import_features(
        save(tmp_path / "tr.npz", train), save(tmp_path / "te.npz", test), str(tmp_path / "out.zarr"),
        val=save(tmp_path / "va.npz", val),
    )
    assert not res.reused
    st = open_store(str(tmp_path / "out.zarr"))
    assert st.splits == ("train", "val", "test")
    assert st.class_names == ("0", "1", "2", "3")
    np.testing.assert_array_equal(st.class_counts, np.bincount(train["labels"], minlength=4))
    assert st.backbone == {"kind": "imported", "files": ["tr.npz", "va.npz", "te.npz"]}
    for split, d in (("train", train), ("val", val), ("test", test)):
        fs = st.read(split)
        np.testing.assert_array_equal(fs.features, d["features"].astype(np.float32))
        np.testing.assert_array_equal(fs.labels, d["labels"])
        if "attributes" in d:
            np.testing.assert_array_equal(fs.attributes, d["attributes"])
        else:
            assert fs.attributes is None
    st.verify()


def test_h5_import_streams_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(importers, "_BLOCK_BYTES", 4 * D * 7)  # 7 rows per block
    reads = []
    real = importers._FeatureFile.iter_features

    def spy(self, rows=None):
        for start, block in real(self, rows):
            reads.append(block.shape[0])
            yield start, block

    monkeypatch.setattr(importers._FeatureFile, "iter_features", spy)
    train, test = arrays(30, 0), arrays(12, 2)
    import_features(save(tmp_path / "tr.h5", train), save(tmp_path / "te.hdf5", test), str(tmp_path / "o.zarr"), chunk_rows=4)
    assert max(reads) == 7 and sum(reads) == 42
    st = open_store(str(tmp_path / "o.zarr"))
    np.testing.assert_array_equal(st.read("train").features, train["features"].astype(np.float32))
    np.testing.assert_array_equal(st.read("test").attributes, test["attributes"])


def test_class_names_fix_the_number_of_classes(tmp_path):
    train, test = arrays(30, 0), arrays(12, 2)
    names = ["a", "b", "c", "d"]
    import_features(save(tmp_path / "tr.npz", train), save(tmp_path / "te.npz", test), str(tmp_path / "o.zarr"), class_names=names)
    assert open_store(str(tmp_path / "o.zarr")).class_names == tuple(names)
    with pytest.raises(LongtailError, match=r"tr.npz: label 3 outside \[0, 3\)"):
        import_features(str(tmp_path / "tr.npz"), str(tmp_path / "te.npz"), str(tmp_path / "p.zarr"), class_names=names[:3])
    assert store_status(str(tmp_path / "p.zarr")) == "missing"


def test_complete_output_is_never_touched_and_same_files_are_reused(tmp_path):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    out = str(tmp_path / "o.zarr")
    first = import_features(tr, te, out)
    before = snapshot(out)
    again = import_features(tr, te, out)
    assert again.reused and again.store.fingerprint == first.store.fingerprint
    other = save(tmp_path / "te2.npz", arrays(12, 3))
    with pytest.raises(LongtailError, match="already holds a complete feature store") as e:
        import_features(tr, other, out)
    assert out in str(e.value)
    with pytest.raises(LongtailError, match="already holds"):
        import_features(tr, te, out, class_names=["a", "b", "c", "d"])
    assert snapshot(out) == before


def test_bad_data_midway_leaves_no_partial_store(tmp_path):
    test = arrays(12, 2)
    test["features"][9, 1] = np.inf
    with pytest.raises(LongtailError, match="te.npz: NaN or infinite features.*first at row 9"):
        import_features(save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", test), str(tmp_path / "o.zarr"))
    assert store_status(str(tmp_path / "o.zarr")) == "missing"


def test_class_without_train_sample(tmp_path):
    train = arrays(30, 0)
    train["labels"][train["labels"] == 2] = 1
    test = arrays(12, 2)
    with pytest.raises(LongtailError, match=r"tr.npz: 1 class\(es\) with no train sample: '2'"):
        import_features(save(tmp_path / "tr.npz", train), save(tmp_path / "te.npz", test), str(tmp_path / "o.zarr"))


def test_feature_dims_must_agree(tmp_path):
    test = arrays(12, 2)
    test["features"] = test["features"][:, :3]
    with pytest.raises(LongtailError, match="te.npz: features have dimension 3"):
        import_features(save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", test), str(tmp_path / "o.zarr"))


# ---------------------------------------------------------------------------------------- bad files
def _bad(tmp_path, kind: str) -> str:
    good = arrays(10, 0)
    if kind == "missing":
        return str(tmp_path / "absent.npz")
    if kind == "corrupt-npz":
        p = tmp_path / "broken.npz"
        p.write_bytes(b"PK\x03\x04 this is not a zip archive")
        return str(p)
    if kind == "corrupt-h5":
        p = tmp_path / "broken.h5"
        p.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
        return str(p)
    if kind == "extension":
        p = tmp_path / "feats.csv"
        p.write_text("1,2,3")
        return str(p)
    if kind == "missing-key":
        return save(tmp_path / "nolabels.h5", {"features": good["features"], "targets": good["labels"]})
    if kind == "not-2d":
        return save(tmp_path / "flat.npz", {"features": good["features"].ravel(), "labels": good["labels"]})
    if kind == "lengths":
        return save(tmp_path / "short.h5", {"features": good["features"], "labels": good["labels"][:-1]})
    if kind == "nan":
        good["features"][3, 0] = np.nan
        return save(tmp_path / "nan.npz", good)
    if kind == "float-labels":
        return save(tmp_path / "frac.npz", {"features": good["features"], "labels": good["labels"] + 0.5})
    if kind == "string-labels":
        return save(tmp_path / "str.npz", {"features": good["features"], "labels": good["labels"].astype(str)})
    if kind == "object":
        return save(tmp_path / "obj.npz", {"features": good["features"], "labels": np.array([None] * 10, dtype=object)})
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "feature file not found"),
        ("corrupt-npz", "cannot read feature file"),
        ("corrupt-h5", "cannot read feature file"),
        ("extension", "unsupported feature file extension '.csv'"),
        ("missing-key", r"missing key 'labels' \(found: features, targets\)"),
        ("not-2d", r"'features' must be 2-D \(N x D\), got shape \(50,\)"),
        ("lengths", "10 feature rows but 9 labels"),
        ("nan", "NaN or infinite features"),
        ("float-labels", "'labels' must be integers"),
        ("string-labels", "'labels' must be integers"),
        ("object", "cannot read 'labels'"),
    ],
)
def test_bad_files_name_the_file(tmp_path, kind, match):
    path = _bad(tmp_path, kind)
    with pytest.raises(LongtailError, match=match) as e:
        load_feature_file(path)
    msg = str(e.value)
    assert msg.startswith(path) and "\n" not in msg
    # the same errors through the import, naming the bad file (here the test file)
    good = save(tmp_path / "good.npz", arrays(10, 0))
    with pytest.raises(LongtailError, match=match) as e:
        import_features(good, path, str(tmp_path / "o.zarr"))
    assert str(e.value).startswith(path)
    assert store_status(str(tmp_path / "o.zarr")) == "missing"


def test_integer_valued_float_labels_are_accepted(tmp_path):
    data = arrays(10, 0)
    data["labels"] = data["labels"].astype(np.float64)
    got = load_feature_file(save(tmp_path / "f.npz", data))
    assert got["labels"].dtype == np.int64
    np.testing.assert_array_equal(got["labels"], data["labels"].astype(np.int64))
