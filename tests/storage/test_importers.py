"""Importing user feature files (.npz, .h5) into a feature store; one-line errors naming the file."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from longtail.stages.errors import LongtailError
from longtail.storage import importers
from longtail.storage.featurestore import open_store, store_status
from longtail.storage.importers import import_features, load_feature_file

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


# ---------------------------------------------------------------------------------------- unlabelled splits
def unlabelled_arrays(n: int, seed: int, attributes: bool = False) -> dict:
    data = arrays(n, seed, attributes=attributes)
    del data["labels"]
    return data


def test_load_feature_file_without_labels(tmp_path):
    data = unlabelled_arrays(9, 4, attributes=True)
    path = save(tmp_path / "deploy.h5", data)
    got = load_feature_file(path, require_labels=False)
    assert set(got) == {"features", "attributes"}
    np.testing.assert_array_equal(got["features"], data["features"].astype(np.float32))
    with pytest.raises(LongtailError, match=r"missing key 'labels' \(found: attributes, features\)"):
        load_feature_file(path)  # labels required by default
    # labels are read when present, even where they are optional
    labelled = save(tmp_path / "l.npz", arrays(9, 4))
    assert "labels" in load_feature_file(labelled, require_labels=False)


def test_file_without_labels_but_with_another_key_is_refused(tmp_path):
    """``targets`` is more likely misnamed labels than no labels: never drop them silently."""
    good = arrays(10, 0)
    path = save(tmp_path / "t.npz", {"features": good["features"], "targets": good["labels"]})
    with pytest.raises(LongtailError, match=r"t.npz: missing key 'labels' \(found: features, targets\).*not 'targets'") as e:
        load_feature_file(path, require_labels=False)
    assert "\n" not in str(e.value)


def test_import_with_unlabelled_extra_and_test_splits(tmp_path):
    train, val = arrays(30, 0), arrays(8, 1, attributes=False)
    test, deploy = unlabelled_arrays(12, 2), unlabelled_arrays(15, 3, attributes=True)
    out = str(tmp_path / "o.zarr")
    res = import_features(
        save(tmp_path / "tr.npz", train), save(tmp_path / "te.npz", test), out,
        val=save(tmp_path / "va.npz", val), extra={"deploy": save(tmp_path / "dep.h5", deploy)},
    )
    st = res.store
    assert st.splits == ("train", "val", "test", "deploy")
    assert [st.has_labels(s) for s in st.splits] == [True, True, False, False]
    assert st.class_names == ("0", "1", "2", "3")  # C from the labels present (train, val)
    np.testing.assert_array_equal(st.class_counts, np.bincount(train["labels"], minlength=4))
    assert st.backbone["files"] == ["tr.npz", "va.npz", "te.npz", "dep.h5"]
    for split, d in (("test", test), ("deploy", deploy)):
        fs = st.read(split)
        assert fs.labels is None
        np.testing.assert_array_equal(fs.features, d["features"].astype(np.float32))
    np.testing.assert_array_equal(st.read("deploy").attributes, deploy["attributes"])
    np.testing.assert_array_equal(st.read("val").labels, val["labels"])
    st.verify()


def test_reuse_takes_the_extra_splits_into_account(tmp_path):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    dep = save(tmp_path / "dep.npz", unlabelled_arrays(15, 3))
    out = str(tmp_path / "o.zarr")
    first = import_features(tr, te, out, extra={"deploy": dep})
    before = snapshot(out)
    again = import_features(tr, te, out, extra={"deploy": dep})
    assert again.reused and again.store.fingerprint == first.store.fingerprint
    other = save(tmp_path / "dep2.npz", unlabelled_arrays(15, 4))
    for kw in ({"extra": {"deploy": other}}, {}, {"extra": {"target": dep}}):
        with pytest.raises(LongtailError, match="already holds a complete feature store"):
            import_features(tr, te, out, **kw)
    assert snapshot(out) == before


def test_train_needs_labels(tmp_path):
    tr = save(tmp_path / "tr.npz", unlabelled_arrays(30, 0))
    with pytest.raises(LongtailError, match=r"tr.npz: missing key 'labels'"):
        import_features(tr, save(tmp_path / "te.npz", arrays(12, 2)), str(tmp_path / "o.zarr"))
    assert store_status(str(tmp_path / "o.zarr")) == "missing"


@pytest.mark.parametrize(
    "name, match",
    [("Deploy", "bad extra split name 'Deploy'"), ("1st", "bad extra split name '1st'"),
     ("test", "'test' clashes"), ("val", "'val' clashes")],
)
def test_bad_extra_split_names(tmp_path, name, match):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    with pytest.raises(LongtailError, match=match):
        import_features(tr, te, str(tmp_path / "o.zarr"), extra={name: te})
    assert store_status(str(tmp_path / "o.zarr")) == "missing"


def test_labels_of_unlabelled_capable_splits_are_still_checked(tmp_path):
    """A val/test/extra file that has labels must have good ones: optional is not unchecked."""
    dep = arrays(15, 3)
    dep["labels"][4] = 9
    with pytest.raises(LongtailError, match=r"dep.npz: label 9 outside \[0, 4\)"):
        import_features(save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2)),
                        str(tmp_path / "o.zarr"), class_names=list("abcd"),
                        extra={"deploy": save(tmp_path / "dep.npz", dep)})


# ---------------------------------------------------------------------------------------- the command
def _cli(*args):
    from typer.testing import CliRunner

    from longtail.flows.cli import app

    return CliRunner().invoke(app, ["import-features", *[str(a) for a in args]])


def test_cli_extra_split(tmp_path):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    dep = save(tmp_path / "dep.npz", unlabelled_arrays(15, 3))
    lab = save(tmp_path / "lab.npz", arrays(7, 5))
    out = tmp_path / "o.zarr"
    r = _cli("--train", tr, "--test", te, "--out", out, "--extra", f"deploy={dep}", "--extra", f"shifted={lab}")
    assert r.exit_code == 0, r.output
    st = open_store(str(out))
    assert st.splits == ("train", "test", "deploy", "shifted")
    assert not st.has_labels("deploy") and st.has_labels("shifted")
    assert st.read("deploy").labels is None
    np.testing.assert_array_equal(st.read("deploy").features, np.load(dep)["features"].astype(np.float32))


@pytest.mark.parametrize(
    "value, needle",
    [("deploy", "expected NAME=FILE"), ("=x.npz", "expected NAME=FILE"), ("deploy=", "expected NAME=FILE"),
     ("Deploy={dep}", "bad extra split name 'Deploy'"), ("train={dep}", "'train' clashes"),
     ("test={dep}", "'test' clashes")],
)
def test_cli_malformed_extra_is_one_line(tmp_path, value, needle):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    dep = save(tmp_path / "dep.npz", unlabelled_arrays(15, 3))
    r = _cli("--train", tr, "--test", te, "--out", tmp_path / "o.zarr", "--extra", value.format(dep=dep))
    assert r.exit_code == 2, (r.exit_code, r.output)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert store_status(str(tmp_path / "o.zarr")) == "missing"


def test_cli_same_extra_split_twice_is_refused(tmp_path):
    tr, te = save(tmp_path / "tr.npz", arrays(30, 0)), save(tmp_path / "te.npz", arrays(12, 2))
    dep = save(tmp_path / "dep.npz", unlabelled_arrays(15, 3))
    r = _cli("--train", tr, "--test", te, "--out", tmp_path / "o.zarr", "--extra", f"deploy={dep}", "--extra", f"deploy={tr}")
    assert r.exit_code == 2 and "given twice" in r.stderr and len(r.stderr.strip().splitlines()) == 1
