"""Integrity on read (issue 14, item 1): per-chunk checksums, truncated chunks, fingerprints and
class counts verified, artifact files checked against their completion marker on every read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zarr

from longtail.stages.errors import LongtailError
from longtail.storage import artifacts as art
from longtail.storage.featurestore import CorruptStoreError, open_store
from longtail.storage.featurestore import schema
from tests.storage.test_featurestore import build, make_data


@pytest.fixture
def data():
    return make_data()


def _chunk(root, split, array, *idx):
    return os.path.join(root, split, array, "c", *[str(i) for i in idx])


def _flip_last_byte(path):
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0x10
    open(path, "wb").write(bytes(raw))


def _old_store(monkeypatch, url, data):
    """A store as written before per-chunk checksums existed (Blosc / default codecs only)."""
    with monkeypatch.context() as m:
        m.setattr(schema, "CHUNK_CHECKSUM", False)
        build(url, data)


# ---------------------------------------------------------------------------------------- feature store
def test_new_stores_carry_a_crc32c_codec_on_every_array(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    g = zarr.open_group(url, mode="r")
    for key in ("features", "labels", "index", "attributes"):
        names = [type(c).__name__ for c in g["train"][key].compressors]
        assert names[-1] == "Crc32cCodec", (key, names)


def test_a_byte_edit_of_a_chunk_names_the_chunk(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    path = _chunk(url, "train", "features", 1, 0)
    _flip_last_byte(path)
    st = open_store(url)
    with pytest.raises(CorruptStoreError) as e:
        st.read("train")
    msg = str(e.value)
    assert "\n" not in msg and "train/features/c/1/0" in msg and "checksum" in msg
    with pytest.raises(CorruptStoreError, match="train/features/c/1/0"):
        st.verify()


def test_a_truncated_chunk_of_an_old_store_is_an_error_not_a_crash(tmp_path, data, monkeypatch):
    url = str(tmp_path / "f.zarr")
    _old_store(monkeypatch, url, data)
    assert [type(c).__name__ for c in zarr.open_group(url)["train"]["features"].compressors] == ["BloscCodec"]
    open_store(url).verify()  # an old store still opens and verifies
    path = _chunk(url, "train", "features", 2, 0)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[: len(raw) // 2])
    with pytest.raises(CorruptStoreError, match="train/features/c/2/0.*truncated") as e:
        open_store(url).read("train")
    assert "\n" not in str(e.value)
    with pytest.raises(CorruptStoreError, match="truncated"):
        open_store(url).verify()


def test_a_truncated_chunk_with_a_checksum_is_named(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    path = _chunk(url, "test", "features", 0, 0)
    raw = open(path, "rb").read()
    open(path, "wb").write(raw[:7])
    with pytest.raises(CorruptStoreError, match="test/features/c/0/0"):
        open_store(url).read("test")


def test_a_decodable_edit_of_an_old_store_fails_verification(tmp_path, data, monkeypatch):
    url = str(tmp_path / "f.zarr")
    _old_store(monkeypatch, url, data)
    g = zarr.open_group(url, mode="r+")
    with monkeypatch.context() as m:  # rewrite one value with the old codecs: still decodes
        g["test"]["features"][3, 2] = 9.0
    open_store(url).read("test")
    with pytest.raises(CorruptStoreError, match="'test'.*does not match its fingerprint.*rebuild"):
        open_store(url).verify()


def test_edited_train_labels_are_checked_against_the_class_counts(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    g = zarr.open_group(url, mode="r+")
    labels = g["train"]["labels"][:]
    labels[labels == 0] = 1  # every class-0 sample becomes class 1 (rewritten with a valid checksum)
    labels[0] = 0
    g["train"]["labels"][:] = labels
    with pytest.raises(CorruptStoreError, match="train.*labels.*class counts.*'cat'"):
        open_store(url).verify()


def test_verify_reports_progress_of_every_split(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    assert open_store(url).verify() is None


# ---------------------------------------------------------------------------------------- read layout (issue 13)
def _codecs(url, split, key):
    return [type(c).__name__ for c in zarr.open_group(url, mode="r")[split][key].metadata.codecs]


def test_new_layout_is_raw_bytes_and_a_checksum_and_round_trips(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    g = zarr.open_group(url, mode="r")  # any Zarr v3 client reads it: plain zarr here
    st = open_store(url)
    for split, d in data.items():
        assert g[split].attrs[schema.FINITE_ATTR] is True
        fs = st.read(split)
        for key in ("features", "labels", "index", "attributes"):
            if d[key] is None:
                continue
            assert _codecs(url, split, key) == ["BytesCodec", "Crc32cCodec"]
            np.testing.assert_array_equal(g[split][key][:], d[key])
            np.testing.assert_array_equal(getattr(fs, key), d[key])
            assert getattr(fs, key).dtype == d[key].dtype
    # a chunk file is the chunk's little-endian bytes (the last chunk padded to a whole chunk), then their CRC-32C
    raw = open(_chunk(url, "train", "features", 4, 0), "rb").read()
    assert len(raw) == 8 * 6 * 4 + 4
    np.testing.assert_array_equal(np.frombuffer(raw[:5 * 6 * 4], "<f4").reshape(5, 6), data["train"]["features"][32:])
    assert np.isnan(np.frombuffer(raw[5 * 6 * 4:-4], "<f4")).all()


def test_row_ranges_across_chunk_boundaries_read_the_same_rows(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)  # 8-row chunks, 37 train rows
    st = open_store(url)
    for rows in (1, 3, 8, 13, 100):
        blocks = list(st.iter_chunks("train", rows))
        np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), data["train"]["features"])
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), data["train"]["labels"])
        np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), data["train"]["attributes"])
    st.verify()


def test_a_padded_chunk_is_named(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    path = _chunk(url, "train", "labels", 0)
    open(path, "ab").write(b"\0\0")
    with pytest.raises(CorruptStoreError, match="train/labels/c/0 is truncated or padded") as e:
        open_store(url).read("train")
    assert "\n" not in str(e.value)


def test_stores_of_the_issue_14_layout_still_read(tmp_path, data, monkeypatch):
    url = str(tmp_path / "f.zarr")
    with monkeypatch.context() as m:
        m.setattr(schema, "RAW_CHUNKS", False)
        fp = build(url, data)
    assert _codecs(url, "train", "features") == ["BytesCodec", "BloscCodec", "Crc32cCodec"]
    st = open_store(url)
    assert st.fingerprint == fp == build(str(tmp_path / "new.zarr"), data)  # the layout is not content
    for split, d in data.items():
        np.testing.assert_array_equal(st.read(split).features, d["features"])
    st.verify()
    _flip_last_byte(_chunk(url, "train", "features", 1, 0))
    with pytest.raises(CorruptStoreError, match="train/features/c/1/0 fails its checksum"):
        open_store(url).read("train")


def test_a_nan_rewritten_with_a_valid_checksum_is_caught_by_verify(tmp_path, data):
    # finiteness is checked once, by the writer, and recorded; a later edit through another
    # client (valid checksum) is what the fingerprint check on first open is for
    url = str(tmp_path / "f.zarr")
    build(url, data)
    zarr.open_group(url, mode="r+")["val"]["features"][1, 1] = np.nan
    with pytest.raises(CorruptStoreError, match="'val': content does not match its fingerprint"):
        open_store(url).verify()


def test_replacing_the_features_of_a_read_set_checks_them_again(tmp_path, data):
    import dataclasses

    url = str(tmp_path / "f.zarr")
    build(url, data)
    fs = open_store(url).read("train")
    bad = fs.features.copy()
    bad[0, 0] = np.inf
    with pytest.raises(LongtailError, match="1 sample.*NaN or infinite"):
        dataclasses.replace(fs, features=bad)


def test_an_object_store_reads_the_raw_layout(data):
    import uuid

    url = f"memory://longtail-{uuid.uuid4().hex}/f.zarr"
    build(url, data)
    st = open_store(url)
    np.testing.assert_array_equal(st.read("test").features, data["test"]["features"])
    st.verify()


# ---------------------------------------------------------------------------------------- artifacts
def test_a_same_size_rewrite_of_an_artifact_file_is_refused_on_read(tmp_path):
    store = art.ArtifactStore(str(tmp_path / "cache"))
    key = "ab" * 16
    store.write("method", key, {"logits_test.npy": b"0123456789"}, {"x": 1})
    path = tmp_path / "cache" / "method" / key / "logits_test.npy"
    path.write_bytes(b"0123456780")
    with pytest.raises(art.CorruptArtifactError) as e:
        store.read_file("method", key, "logits_test.npy")
    assert "logits_test.npy" in str(e.value) and "hash" in str(e.value)
    with pytest.raises(art.CorruptArtifactError):
        store.verify("method", key)
    assert store.read_meta("method", key) == {"x": 1}  # the other files still read


def test_a_corrupt_marker_is_a_corrupt_artifact(tmp_path):
    store = art.ArtifactStore(str(tmp_path / "cache"))
    key = "cd" * 16
    store.write("method", key, {"a.bin": b"x"})
    (tmp_path / "cache" / "method" / key / art.MARKER).write_text("{not json")
    with pytest.raises(art.CorruptArtifactError, match=art.MARKER):
        store.verify("method", key)
    assert issubclass(art.CorruptArtifactError, LongtailError)
    doc = {"kind": "method", "key": key, "files": {"a.bin": {"size": 1}}}
    (tmp_path / "cache" / "method" / key / art.MARKER).write_text(json.dumps(doc))
    with pytest.raises(art.CorruptArtifactError, match=f"{art.MARKER}.*hashes"):  # a marker without hashes
        store.read_file("method", key, "a.bin")


# ---------------------------------------------------------------------------------------- --force, leftovers
def test_replace_writes_a_new_artifact_over_a_corrupt_one(tmp_path):
    store = art.ArtifactStore(str(tmp_path / "cache"))
    key = "ef" * 16
    store.write("method", key, {"a.bin": b"old!"}, {"v": 1})
    (tmp_path / "cache" / "method" / key / "a.bin").write_bytes(b"bad!")
    store.write("method", key, {"a.bin": b"new"}, {"v": 2})  # without replace: kept as it is
    with pytest.raises(art.CorruptArtifactError):
        store.verify("method", key)
    store.write("method", key, {"a.bin": b"new"}, {"v": 2}, replace=True)
    store.verify("method", key)
    assert store.read_file("method", key, "a.bin") == b"new" and store.read_meta("method", key) == {"v": 2}
    assert sorted(os.listdir(tmp_path / "cache" / "method")) == [key]  # nothing left aside


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_next_writer_removes_what_crashed_writers_left(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    store = art.ArtifactStore(str(tmp_path / "cache"))
    base = tmp_path / "cache" / "method"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name, pid in ((".tmp-" + "1" * 32 + "-dead", _dead_pid()), (".tmp-" + "2" * 32 + "-live", live.pid),
                          (".old-" + "3" * 32 + "-dead", _dead_pid())):
            (base / name).mkdir(parents=True)
            (base / name / "big.bin").write_bytes(b"x" * 1000)
            (base / name / art.OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        (base / ".tmp-ownerless-recent").mkdir()
        (base / ".tmp-ownerless-old").mkdir()
        old = time.time() - 2 * art.ORPHAN_AGE
        os.utime(base / ".tmp-ownerless-old", (old, old))
        store.write("method", "ab" * 16, {"a.bin": b"x"})
        left = sorted(p.name for p in base.iterdir())
        assert left == sorted(["ab" * 16, ".tmp-" + "2" * 32 + "-live", ".tmp-ownerless-recent"])
    finally:
        live.kill()
        live.wait()


def test_atomic_write_removes_the_temporaries_of_dead_writers(tmp_path):
    from longtail.pipeline import io as pio

    target = tmp_path / "metrics.json"
    dead = tmp_path / f".metrics.json.tmp-{_dead_pid()}-{pio._host_tag()}-abc.tmp"
    mine = tmp_path / f".metrics.json.tmp-{os.getpid()}-{pio._host_tag()}-abc.tmp"  # a live writer: this one
    other = tmp_path / f".report.md.tmp-{_dead_pid()}-{pio._host_tag()}-abc.tmp"  # another file's: not ours
    for p in (dead, mine, other):
        p.write_bytes(b"{")
    pio.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not dead.exists() and mine.exists() and other.exists()


# ---------------------------------------------------------------------------------------- random rows
def _rows_equal(fs, d, idx):
    np.testing.assert_array_equal(fs.features, d["features"][idx])
    np.testing.assert_array_equal(fs.labels, d["labels"][idx])
    np.testing.assert_array_equal(fs.index, d["index"][idx])
    if d["attributes"] is not None:
        np.testing.assert_array_equal(fs.attributes, d["attributes"][idx])


@pytest.mark.parametrize("where", ["local", "memory"])
def test_read_rows_gives_the_rows_asked_for_in_their_order(tmp_path, data, where):
    import uuid

    url = str(tmp_path / "f.zarr") if where == "local" else f"memory://longtail-{uuid.uuid4().hex}/f.zarr"
    build(url, data)  # 8-row chunks, 37 train rows: the last chunk is part-used
    st = open_store(url)
    rng = np.random.default_rng(0)
    for idx in (rng.integers(0, 37, 50), np.array([36, 0, 8, 7, 36, 36]), np.arange(37)[::-1]):
        for _ in range(2):  # the second time from the maps of the verified chunks
            fs = st.read_rows("train", idx)
            assert len(fs) == idx.size and fs.class_counts.tolist() == st.class_counts.tolist()
            _rows_equal(fs, data["train"], idx)
    _rows_equal(st.read_rows("val", [3, 1]), data["val"], [3, 1])  # no attributes there


def test_read_rows_reads_a_chunk_whole_once_then_from_its_map(tmp_path, data, monkeypatch):
    from longtail.storage.featurestore.reader import FeatureStore

    url = str(tmp_path / "f.zarr")
    build(url, data)
    st = open_store(url)
    whole = []
    real = FeatureStore._read_raw
    monkeypatch.setattr(FeatureStore, "_read_raw", lambda self, s, k, a, b: whole.append((k, a, b)) or real(self, s, k, a, b))
    vectors = ("labels", "attributes", "index")  # one chunk of 37 rows each; features: 8-row chunks
    st.read_rows("train", [1, 2, 9, 1])
    assert sorted(whole) == sorted([("features", 0, 8), ("features", 8, 16)] + [(k, 0, 37) for k in vectors])
    whole.clear()
    _rows_equal(st.read_rows("train", [3, 10, 4]), data["train"], [3, 10, 4])
    assert whole == []  # verified chunks: gathered from their maps, nothing read whole
    _rows_equal(st.read_rows("train", [3, 17, 36]), data["train"], [3, 17, 36])
    assert sorted(whole) == [("features", 16, 24), ("features", 32, 40)]  # the last chunk whole, padding too


def test_read_rows_refuses_a_corrupt_chunk_and_one_changed_since_it_was_verified(tmp_path, data):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    path = _chunk(url, "train", "features", 1, 0)
    good = open(path, "rb").read()
    _flip_last_byte(path)
    with pytest.raises(CorruptStoreError, match="train/features/c/1/0 fails its checksum"):
        open_store(url).read_rows("train", [9])
    open(path, "wb").write(good)
    st = open_store(url)
    _rows_equal(st.read_rows("train", [9]), data["train"], [9])  # verified now
    _flip_last_byte(path)  # same size; the modification time moves on
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1_000_000))
    with pytest.raises(CorruptStoreError, match="train/features/c/1/0 fails its checksum"):
        st.read_rows("train", [9])


def test_read_rows_of_an_old_store_reads_whole_chunks(tmp_path, data, monkeypatch):
    url = str(tmp_path / "f.zarr")
    _old_store(monkeypatch, url, data)
    st = open_store(url)
    for _ in range(2):
        _rows_equal(st.read_rows("train", [30, 2, 2]), data["train"], [30, 2, 2])
    assert st._verified == {}


@pytest.mark.parametrize("rows, message", [
    ([0, 37], "row 37 is out of range for split 'train' \\(37 rows\\)"),
    ([-1], "row -1 is out of range"),
    ([0.5], "1-D array of integer row numbers, got float64"),
    ([[0, 1]], "got int64 of shape \\(1, 2\\)"),
    (np.array([], dtype=int), "needs at least one row number"),
])
def test_read_rows_names_bad_row_numbers(tmp_path, data, rows, message):
    url = str(tmp_path / "f.zarr")
    build(url, data)
    with pytest.raises(LongtailError, match=message) as e:
        open_store(url).read_rows("train", rows)
    assert not isinstance(e.value, CorruptStoreError) and "\n" not in str(e.value)


def test_read_rows_never_caches_a_chunk_that_changed_while_it_was_checked(tmp_path, data, monkeypatch):
    from itertools import count

    from longtail.storage.featurestore import reader

    url = str(tmp_path / "f.zarr")
    build(url, data)
    ticks = count()
    monkeypatch.setattr(reader, "_file_state", lambda path: (1, 2, next(ticks)))  # a new mtime at every look
    st = open_store(url)
    for _ in range(2):
        _rows_equal(st.read_rows("train", [20, 3]), data["train"], [20, 3])  # the bytes it checked
    assert st._verified == {}
