"""The Zarr feature store: round trip, interruption and resume, never overwriting, fingerprints."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import numpy as np
import pytest
import zarr

from longtail.stages.data import FeatureSet
from longtail.stages.errors import LongtailError
from longtail.storage.featurestore import CorruptStoreError, FeatureStoreWriter, StorePlan, open_store, store_status

D = 6
NAMES = ["cat", "dog", "emu"]


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", 37), ("val", 9), ("test", 23)):
        labels = rng.integers(0, 3, n)
        labels[:3] = [0, 1, 2]  # every class present
        out[split] = {
            "features": rng.normal(size=(n, D)).astype(np.float32),
            "labels": labels.astype(np.int64),
            "attributes": rng.integers(0, 4, n).astype(np.int64) if split != "val" else None,
            "index": (np.arange(n) * 10 + 5).astype(np.int64),
        }
    return out


def plan(data: dict, **over) -> dict:
    kw = dict(
        class_names=NAMES,
        class_counts=np.bincount(data["train"]["labels"], minlength=3),
        backbone={"kind": "torchvision", "name": "resnet50"},
        backbone_hash="b" * 16,
        dataset_fingerprint="d" * 16,
        feature_dim=D,
        splits={s: len(v["features"]) for s, v in data.items()},
        has_attributes={s: v["attributes"] is not None for s, v in data.items()},
        chunk_rows=8,
    )
    if any(v["labels"] is None for v in data.values()):  # else: the default, every split labelled
        kw["has_labels"] = {s: v["labels"] is not None for s, v in data.items()}
    kw.update(over)
    return kw


def write_split(w: FeatureStoreWriter, data: dict, split: str, block: int = 5, stop: int | None = None) -> None:
    d = data[split]
    n = len(d["features"]) if stop is None else stop
    w.begin_split(split)
    for i in range(0, n, block):
        j = min(n, i + block)
        w.write_chunk(
            split,
            d["features"][i:j],
            None if d["labels"] is None else d["labels"][i:j],
            None if d["attributes"] is None else d["attributes"][i:j],
            d["index"][i:j],
        )
    if stop is None:
        w.end_split(split)


def build(url: str, data: dict, block: int = 5, **over) -> str:
    w = FeatureStoreWriter(url, **plan(data, **over))
    for split in data:
        write_split(w, data, split, block)
    return w.finish()


def snapshot(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture
def data():
    return make_data()


# ---------------------------------------------------------------------------------------- round trip
def test_round_trip_arrays_attrs_and_featureset(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    fp = build(url, data)
    assert store_status(url) == "complete"
    st = open_store(url)
    assert st.splits == ("train", "val", "test")
    assert st.fingerprint == fp
    assert st.class_names == tuple(NAMES)
    np.testing.assert_array_equal(st.class_counts, np.bincount(data["train"]["labels"], minlength=3))
    assert st.backbone == {"kind": "torchvision", "name": "resnet50"}
    assert (st.backbone_hash, st.dataset_fingerprint, st.feature_dim) == ("b" * 16, "d" * 16, D)
    assert st.attrs["schema_version"] == 1 and st.attrs["complete"] is True
    for split, d in data.items():
        fs = st.read(split)
        assert isinstance(fs, FeatureSet)
        assert (fs.name, fs.source) == (split, url)
        assert fs.features.dtype == np.float32
        np.testing.assert_array_equal(fs.features, d["features"])
        np.testing.assert_array_equal(fs.labels, d["labels"])
        np.testing.assert_array_equal(fs.index, d["index"])
        if d["attributes"] is None:
            assert fs.attributes is None and not st.has_attributes(split)
        else:
            np.testing.assert_array_equal(fs.attributes, d["attributes"])
        np.testing.assert_array_equal(fs.class_counts, st.class_counts)
        assert fs.class_names == tuple(NAMES)
        assert fs.meta["split_fingerprint"] == st.split_fingerprint(split)
        assert fs.meta["store_fingerprint"] == fp
        # chunks are stored by rows, as planned
        assert zarr.open_group(url, mode="r")[split]["features"].chunks == (8, D)


def test_iter_chunks_concatenates_to_the_split(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    st = open_store(url)
    blocks = list(st.iter_chunks("train", 10))
    assert [b[0].shape[0] for b in blocks] == [10, 10, 10, 7]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), data["train"]["features"])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), data["train"]["labels"])
    np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), data["train"]["attributes"])
    assert all(b[2] is None for b in st.iter_chunks("val"))
    st.verify()


@pytest.mark.parametrize("raw", [True, False])
def test_chunks_read_no_metadata_once_the_split_is_open(tmp_path, data, monkeypatch, raw):
    # on an object store every metadata read is a request: a split's arrays are opened once
    from zarr.storage import LocalStore

    from longtail.storage.featurestore import schema

    url = str(tmp_path / "f.zarr")
    with monkeypatch.context() as m:
        m.setattr(schema, "RAW_CHUNKS", raw)  # False: the compressed layout of older stores
        build(url, data)
    st = open_store(url)
    st.read("train")
    reads = []
    real = LocalStore.get

    async def get(self, key, *args, **kw):
        reads.append(key)
        return await real(self, key, *args, **kw)

    monkeypatch.setattr(LocalStore, "get", get)
    blocks = list(st.iter_chunks("train", 10))
    assert len(blocks) == 4 and st.has_attributes("train")
    assert [k for k in reads if k.endswith("zarr.json")] == []
    if raw:  # uncompressed chunks are read straight from their files, not through zarr
        assert reads == []
    else:
        assert reads  # the chunks themselves were read through the spied store


def test_fingerprint_does_not_depend_on_write_blocks_or_chunks(tmp_path, data):
    a = build(str(tmp_path / "a.zarr"), data, block=3)
    b = build(str(tmp_path / "b.zarr"), data, block=100, chunk_rows=None)
    assert a == b


def test_fingerprint_changes_with_one_feature_value(tmp_path, data):
    a = build(str(tmp_path / "a.zarr"), data)
    changed = make_data()
    changed["test"]["features"][7, 2] += 1e-3
    b = build(str(tmp_path / "b.zarr"), changed)
    assert a != b
    sa, sb = open_store(str(tmp_path / "a.zarr")), open_store(str(tmp_path / "b.zarr"))
    assert sa.split_fingerprint("test") != sb.split_fingerprint("test")
    assert sa.split_fingerprint("train") == sb.split_fingerprint("train")


def test_memory_url_round_trip(data):
    url = f"memory://lt-{uuid.uuid4().hex}/f.zarr"
    try:
        assert store_status(url) == "missing"
        fp = build(url, data)
        st = open_store(url)
        assert st.fingerprint == fp
        np.testing.assert_array_equal(st.read("test").features, data["test"]["features"])
        np.testing.assert_array_equal(st.read("val").labels, data["val"]["labels"])
        st.verify()
    finally:
        fsspec.filesystem("memory").rm(url.split("://")[1].split("/")[0], recursive=True)


def test_file_url_and_local_path_give_the_same_store(tmp_path, data):
    url = "file://" + str(tmp_path / "f.zarr")
    fp = build(url, data)
    assert open_store(str(tmp_path / "f.zarr")).fingerprint == fp


# ---------------------------------------------------------------------------------------- interruption
def test_interrupted_write_is_incomplete_and_refused(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    assert store_status(url) == "incomplete"
    with pytest.raises(LongtailError, match="interrupted") as e:
        open_store(url)
    assert url in str(e.value)
    w.begin_split("val")
    assert store_status(url) == "incomplete"  # and still after more splits, until finish()
    write_split(w, data, "test")
    assert store_status(url) == "incomplete"


def test_resume_keeps_completed_split_and_gives_the_same_fingerprint(tmp_path, data):
    clean = build(str(tmp_path / "clean.zarr"), data)
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    write_split(w, data, "val", stop=4)  # crash half-way through val
    del w
    # back-date the train split's files: a rewrite would give them a new mtime
    train_dir = tmp_path / "f.zarr" / "train"
    for p in train_dir.rglob("*"):
        if p.is_file():
            os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    before = snapshot(train_dir)

    w = FeatureStoreWriter(url, **plan(data, chunk_rows=5))  # chunking is not part of the plan
    assert w.resumed
    assert w.split_done("train") and not w.split_done("val") and not w.split_done("test")
    with pytest.raises(RuntimeError):
        w.begin_split("train")
    for split in ("val", "test"):
        write_split(w, data, split, block=4)
    fp = w.finish()

    assert fp == clean
    assert snapshot(train_dir) == before
    st = open_store(url)
    np.testing.assert_array_equal(st.read("val").features, data["val"]["features"])
    st.verify()


def test_half_written_split_restarts_from_row_zero(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    other = make_data(seed=1)
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    # a half-written test split with different rows than the final ones
    w.begin_split("test")
    w.write_chunk("test", other["test"]["features"][:10], other["test"]["labels"][:10], other["test"]["attributes"][:10])
    w = FeatureStoreWriter(url, **plan(data))
    assert w.resumed and not w.split_done("test")
    write_split(w, data, "val")
    write_split(w, data, "test")
    w.finish()
    np.testing.assert_array_equal(open_store(url).read("test").features, data["test"]["features"])


def test_complete_store_is_never_overwritten(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    before = snapshot(tmp_path / "f.zarr")
    with pytest.raises(LongtailError, match="complete feature store") as e:
        FeatureStoreWriter(url, **plan(data))
    assert url in str(e.value)
    with pytest.raises(LongtailError):
        FeatureStoreWriter(url, **plan(data, dataset_fingerprint="other"))
    assert snapshot(tmp_path / "f.zarr") == before


def test_plan_mismatch_on_incomplete_store_rebuilds(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    old = make_data(seed=3)
    w = FeatureStoreWriter(url, **plan(old, dataset_fingerprint="old"))
    write_split(w, old, "train")
    (tmp_path / "f.zarr" / "stale.txt").write_text("left by the old build")

    w = FeatureStoreWriter(url, **plan(data, dataset_fingerprint="new"))
    assert not w.resumed and not w.split_done("train")
    assert not (tmp_path / "f.zarr" / "stale.txt").exists()
    for split in data:
        write_split(w, data, split)
    w.finish()
    st = open_store(url)
    assert st.dataset_fingerprint == "new"
    np.testing.assert_array_equal(st.read("train").features, data["train"]["features"])


@pytest.mark.parametrize("change", [{"feature_dim": D + 1}, {"backbone_hash": "c" * 16}, {"splits": {"train": 37, "test": 23}}])
def test_each_plan_field_is_compared(tmp_path, data, change):
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    if "splits" in change:
        change = dict(change, has_attributes={"train": True, "test": True})
    assert not FeatureStoreWriter(url, **plan(data, **change)).resumed


# ---------------------------------------------------------------------------------------- status and errors
def test_store_status_of_what_is_not_a_store(tmp_path):
    assert store_status(str(tmp_path / "nothing")) == "missing"
    (tmp_path / "empty").mkdir()
    assert store_status(str(tmp_path / "empty")) == "missing"
    (tmp_path / "file.zarr").write_text("x")
    with pytest.raises(LongtailError, match="not a feature store"):
        store_status(str(tmp_path / "file.zarr"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "photo.jpg").write_text("x")
    with pytest.raises(LongtailError, match="not a feature store"):
        store_status(str(tmp_path / "dir"))
    zarr.create_group(str(tmp_path / "foreign.zarr"), attributes={"hello": 1})
    with pytest.raises(LongtailError, match="no schema_version"):
        store_status(str(tmp_path / "foreign.zarr"))
    with pytest.raises(LongtailError, match="no schema_version"):  # and a writer will not delete it
        FeatureStoreWriter(str(tmp_path / "foreign.zarr"), **plan(make_data()))
    assert (tmp_path / "foreign.zarr" / "zarr.json").exists()
    with pytest.raises(LongtailError, match="no feature store"):
        open_store(str(tmp_path / "nothing"))


def _edit_root(path, **attrs):
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"].update(attrs)
    meta.write_text(json.dumps(doc))


def test_unknown_schema_version_and_corrupt_metadata(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    _edit_root(tmp_path / "f.zarr", schema_version=99)
    with pytest.raises(LongtailError, match="schema_version 99"):
        open_store(url)
    (tmp_path / "f.zarr" / "zarr.json").write_text("{not json")
    with pytest.raises(LongtailError, match="corrupt") as e:
        open_store(url)
    assert url in str(e.value)


@pytest.mark.parametrize("raw", [True, False])
def test_lost_chunk_is_reported_not_read_as_zeros(tmp_path, data, monkeypatch, raw):
    from longtail.storage.featurestore import schema

    url = str(tmp_path / "f.zarr")
    with monkeypatch.context() as m:
        m.setattr(schema, "RAW_CHUNKS", raw)  # False: the compressed layout, read through zarr
        build(url, data)
    (tmp_path / "f.zarr" / "test" / "features" / "c" / "1" / "0").unlink()
    st = open_store(url)
    # read directly, a lost chunk is named; through zarr it reads as NaN, which the FeatureSet refuses
    with pytest.raises(LongtailError, match="test/features/c/1/0 is missing" if raw else "'test'.*NaN") as e:
        st.read("test")
    msg = str(e.value)
    assert url in msg and "\n" not in msg
    st.read("train")  # the other splits still read


def test_hand_edited_labels_and_features_are_caught(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    g = zarr.open_group(url, mode="r+")
    g["val"]["labels"][2] = 7  # only 3 classes
    with pytest.raises(LongtailError, match=r"labels outside \[0, 3\)") as e:
        open_store(url).read("val")
    assert url in str(e.value) and "'val'" in str(e.value)
    g["train"]["features"][0, 0] = 123.0  # still finite: only the fingerprint can tell
    st = open_store(url)
    st.read("train")
    with pytest.raises(LongtailError, match="'train': content does not match"):
        st.verify("train")
    del g["test"]["labels"]
    with pytest.raises(LongtailError, match="no 'labels' array"):
        open_store(url).read("test")


def test_corrupt_store_errors_are_one_type_and_wrapped_once(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    g = zarr.open_group(url, mode="r+")
    g["val"]["labels"][2] = 7  # caught by the FeatureSet's checks, reported as a corrupt store
    with pytest.raises(CorruptStoreError) as e:
        open_store(url).read("val")
    assert str(e.value).count("rebuild it") == 1
    (tmp_path / "f.zarr" / "test" / "index" / "c" / "0").unlink()  # the store's own check: not re-wrapped
    with pytest.raises(CorruptStoreError, match="test/index/c/0 is missing") as e:
        open_store(url).read("test")
    assert "rebuild it" not in str(e.value) and str(e.value).count("rebuild") == 1
    _edit_root(tmp_path / "f.zarr", feature_dim=0)
    with pytest.raises(CorruptStoreError, match="feature_dim 0"):
        open_store(url)


def test_reader_and_writer_agree_on_the_plan(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    fp = build(url, data)
    kw = {k: v for k, v in plan(data).items() if k != "chunk_rows"}
    written = StorePlan.create(url, **kw)
    st = open_store(url)
    assert st.plan == written and written.matches(st.attrs)
    assert written.fingerprint({s: st.split_fingerprint(s) for s in st.splits}) == fp == st.fingerprint
    assert not StorePlan.create(url, **(kw | {"backbone_hash": "other"})).matches(st.attrs)

def test_unknown_split(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    with pytest.raises(LongtailError, match="no split 'extra'.*train, val, test"):
        open_store(url).read("extra")


# ---------------------------------------------------------------------------------------- writer input checks
def _writer_on_train(tmp_path, data):
    w = FeatureStoreWriter(str(tmp_path / "f.zarr"), **plan(data))
    w.begin_split("train")
    return w


@pytest.mark.parametrize(
    "feats, labels, attrs, match",
    [
        (np.full((2, D), np.nan), [0, 1], [0, 0], "NaN or infinite"),
        (np.zeros((2, D + 1)), [0, 1], [0, 0], rf"shape \(n, {D}\)"),
        (np.zeros((2, D)), [0, 3], [0, 0], r"labels outside \[0, 3\)"),
        (np.zeros((2, D)), [0.0, 1.0], [0, 0], "labels must be integers"),
        (np.zeros((2, D)), [0, 1, 2], [0, 0], "labels has shape"),
        (np.zeros((2, D)), [0, 1], None, "plan has attributes"),
        (np.zeros((2, D)), [0, 1], [0, -1], "attributes must be >= 0"),
        (np.zeros((40, D)), np.zeros(40, int), np.zeros(40, int), "only 37 planned"),
    ],
)
def test_write_chunk_rejects_bad_data(tmp_path, data, feats, labels, attrs, match):
    w = _writer_on_train(tmp_path, data)
    with pytest.raises(LongtailError, match=match) as e:
        w.write_chunk("train", feats, np.asarray(labels), None if attrs is None else np.asarray(attrs))
    assert "'train'" in str(e.value)


def test_end_split_checks_rows_and_train_counts(tmp_path, data):
    w = _writer_on_train(tmp_path, data)
    d = data["train"]
    w.write_chunk("train", d["features"][:30], d["labels"][:30], d["attributes"][:30])
    with pytest.raises(LongtailError, match="30 rows written, 37 planned"):
        w.end_split("train")
    counts = np.bincount(d["labels"], minlength=3)
    counts[0] += 1
    counts[1] -= 1
    w = FeatureStoreWriter(str(tmp_path / "g.zarr"), **plan(data, class_counts=counts))
    with pytest.raises(LongtailError, match="class_counts do not match.*'cat'"):
        write_split(w, data, "train")


def test_writer_plan_checks_and_call_order(tmp_path, data):
    with pytest.raises(LongtailError, match="'train' split"):
        FeatureStoreWriter(str(tmp_path / "a.zarr"), **plan(data, splits={"test": 3}, has_attributes={}))
    with pytest.raises(LongtailError, match="class_counts"):
        FeatureStoreWriter(str(tmp_path / "a.zarr"), **plan(data, class_counts=[1, 2]))
    w = FeatureStoreWriter(str(tmp_path / "b.zarr"), **plan(data))
    with pytest.raises(RuntimeError):
        w.write_chunk("train", data["train"]["features"], data["train"]["labels"])
    write_split(w, data, "train")
    with pytest.raises(RuntimeError, match="val, test"):
        w.finish()
    assert store_status(str(tmp_path / "b.zarr")) == "incomplete"
    w.abort()
    assert store_status(str(tmp_path / "b.zarr")) == "missing"


def test_writer_does_not_keep_references_to_caller_buffers(tmp_path, data):
    """Rows shorter than a chunk are buffered: the caller may reuse its array right after."""
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    d = data["train"]
    buf = np.empty((5, D), dtype=np.float32)
    w.begin_split("train")
    for i in range(0, 37, 5):
        j = min(37, i + 5)
        buf[: j - i] = d["features"][i:j]
        w.write_chunk("train", buf[: j - i], d["labels"][i:j], d["attributes"][i:j])
        buf[:] = -99.0  # scribble over the caller's buffer
    w.end_split("train")
    for split in ("val", "test"):
        write_split(w, data, split)
    w.finish()
    np.testing.assert_array_equal(open_store(url).read("train").features, d["features"])


# ---------------------------------------------------------------------------------------- unlabelled splits
def unlabelled(data: dict, *splits: str) -> dict:
    out = {s: dict(v) for s, v in data.items()}
    for s in splits:
        out[s]["labels"] = None
    return out


def test_unlabelled_split_round_trip(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    udata = unlabelled(data, "test")
    fp = build(url, udata)
    st = open_store(url)
    assert st.attrs["has_labels"] == {"train": True, "val": True, "test": False}
    assert [st.has_labels(s) for s in st.splits] == [True, True, False]
    fs = st.read("test")
    assert fs.labels is None
    np.testing.assert_array_equal(fs.features, data["test"]["features"])
    np.testing.assert_array_equal(fs.attributes, data["test"]["attributes"])  # attributes are kept
    np.testing.assert_array_equal(fs.index, data["test"]["index"])
    with pytest.raises(LongtailError, match="'test' has no labels"):
        fs.require_labels()
    np.testing.assert_array_equal(st.read("val").labels, data["val"]["labels"])
    assert "labels" not in zarr.open_group(url, mode="r")["test"]  # no sentinel-filled array
    blocks = list(st.iter_chunks("test", 10))
    assert all(b[1] is None for b in blocks)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), data["test"]["features"])
    st.verify()  # the recomputed fingerprints agree with the written ones
    assert st.fingerprint == fp


def test_unlabelled_fingerprint_differs_and_labelled_ones_do_not_move(tmp_path, data):
    build(str(tmp_path / "l.zarr"), data)
    build(str(tmp_path / "u.zarr"), unlabelled(data, "test"))
    lab, unl = open_store(str(tmp_path / "l.zarr")), open_store(str(tmp_path / "u.zarr"))
    assert lab.split_fingerprint("test") != unl.split_fingerprint("test")
    assert lab.fingerprint != unl.fingerprint
    for s in ("train", "val"):
        assert lab.split_fingerprint(s) == unl.split_fingerprint(s)
    # a labelled split hashes exactly as before unlabelled splits existed (old stores keep theirs)
    import hashlib

    d = data["val"]
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps({"split": "val", "rows": 9, "feature_dim": D, "attributes": False}, sort_keys=True).encode())
    for arr, dt in ((d["features"], "<f4"), (d["labels"], "<i8")):
        h.update(hashlib.blake2b(np.ascontiguousarray(arr, dtype=dt).tobytes(), digest_size=32).digest())
    assert lab.split_fingerprint("val") == h.hexdigest()
    # and the unlabelled one is not the labelled one with its labels left out of the hash
    d = data["test"]
    h = hashlib.blake2b(digest_size=32)
    h.update(json.dumps({"split": "test", "rows": 23, "feature_dim": D, "attributes": True}, sort_keys=True).encode())
    for arr in (np.ascontiguousarray(d["features"], dtype="<f4"), np.ascontiguousarray(d["attributes"], dtype="<i8")):
        h.update(hashlib.blake2b(arr.tobytes(), digest_size=32).digest())
    assert unl.split_fingerprint("test") != h.hexdigest()


def test_labels_must_match_the_plan(tmp_path, data):
    udata = unlabelled(data, "test")
    w = FeatureStoreWriter(str(tmp_path / "f.zarr"), **plan(udata))
    w.begin_split("test")
    d = data["test"]
    with pytest.raises(LongtailError, match="labels given, but the plan has this split unlabelled") as e:
        w.write_chunk("test", d["features"][:5], d["labels"][:5], d["attributes"][:5])
    assert "'test'" in str(e.value)
    w.begin_split("val")
    with pytest.raises(LongtailError, match="no labels, but the plan has this split labelled") as e:
        w.write_chunk("val", data["val"]["features"][:5], None)
    assert "'val'" in str(e.value)


def test_train_must_be_labelled_and_has_labels_names_known_splits(tmp_path, data):
    with pytest.raises(LongtailError, match="'train' must be labelled") as e:
        FeatureStoreWriter(str(tmp_path / "a.zarr"), **plan(data, has_labels={"train": False}))
    assert str(tmp_path / "a.zarr") in str(e.value)
    with pytest.raises(LongtailError, match="has_labels names unknown split"):
        FeatureStoreWriter(str(tmp_path / "a.zarr"), **plan(data, has_labels={"deploy": False}))
    assert store_status(str(tmp_path / "a.zarr")) == "missing"


def _drop_root_attr(path, key):
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"][key]
    meta.write_text(json.dumps(doc))


def test_store_written_without_has_labels_still_opens(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    fp = build(url, data)
    _drop_root_attr(tmp_path / "f.zarr", "has_labels")  # as written before the key existed
    st = open_store(url)
    assert all(st.has_labels(s) for s in st.splits)
    np.testing.assert_array_equal(st.read("test").labels, data["test"]["labels"])
    st.verify()
    assert st.fingerprint == fp


def test_resume_of_store_written_without_has_labels(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    _drop_root_attr(tmp_path / "f.zarr", "has_labels")
    w = FeatureStoreWriter(url, **plan(data))  # the same (all-labelled) plan: resumed
    assert w.resumed and w.split_done("train")
    for split in ("val", "test"):
        write_split(w, data, split)
    assert w.finish() == build(str(tmp_path / "clean.zarr"), data)
    assert open_store(url).attrs["has_labels"] == {"train": True, "val": True, "test": True}

    url = str(tmp_path / "g.zarr")
    w = FeatureStoreWriter(url, **plan(data))
    write_split(w, data, "train")
    _drop_root_attr(tmp_path / "g.zarr", "has_labels")
    w = FeatureStoreWriter(url, **plan(unlabelled(data, "test")))  # another plan: rebuilt
    assert not w.resumed and not w.split_done("train")


def test_has_labels_is_part_of_the_plan(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    w = FeatureStoreWriter(url, **plan(unlabelled(data, "val")))
    write_split(w, unlabelled(data, "val"), "train")
    assert FeatureStoreWriter(url, **plan(unlabelled(data, "val"))).resumed
    assert not FeatureStoreWriter(url, **plan(data)).resumed
    with pytest.raises(ValueError, match="has_labels"):
        FeatureStoreWriter(url, **plan(data), extra_attrs={"has_labels": {}})


def test_hand_edited_has_labels_is_caught(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, unlabelled(data, "test"))
    _edit_root(tmp_path / "f.zarr", has_labels={"train": True, "val": True, "test": True})
    with pytest.raises(LongtailError, match="'test' has no 'labels' array"):
        open_store(url).read("test")
    _edit_root(tmp_path / "f.zarr", has_labels={"train": True, "val": False, "test": False})
    with pytest.raises(LongtailError, match="'val' is planned unlabelled but has a 'labels' array"):
        open_store(url).read("val")
    _edit_root(tmp_path / "f.zarr", has_labels={"train": False, "val": True, "test": False})
    with pytest.raises(LongtailError, match="marks the 'train' split unlabelled"):
        open_store(url)
