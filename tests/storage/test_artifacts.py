"""The artifact store: content-keyed, written once, completion marked last; tensors via safetensors."""

from __future__ import annotations

import io
import os
import uuid

import fsspec
import numpy as np
import pytest
import torch

from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import MARKER, ArtifactStore, dump_json, load_json, load_tensors, save_tensors

KEY = "0123456789abcdef" * 2
OTHER = "fedcba9876543210" * 2


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield ArtifactStore(str(tmp_path / "art"))
        return
    root = f"lt-{uuid.uuid4().hex}"
    yield ArtifactStore(f"memory://{root}/art")
    if fsspec.filesystem("memory").exists(f"/{root}"):
        fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_write_then_read(store):
    assert not store.exists("method", KEY)
    url = store.write("method", KEY, {"state.safetensors": b"abc", "extra.bin": b""}, {"lr": 0.1, "n": np.int64(3)})
    assert url == store.url("method", KEY) == f"{store.root_url}/method/{KEY}"
    assert store.exists("method", KEY) and not store.exists("method", OTHER)
    assert store.read_file("method", KEY, "state.safetensors") == b"abc"
    assert store.read_file("method", KEY, "extra.bin") == b""
    assert store.read_meta("method", KEY) == {"lr": 0.1, "n": 3}
    assert store.files("method", KEY) == ["extra.bin", "state.safetensors"]
    assert store.keys("method") == [KEY] and store.keys("metrics") == []
    store.verify("method", KEY)
    with pytest.raises(LongtailError, match="no file 'nope'.*state.safetensors"):
        store.read_file("method", KEY, "nope")
    with pytest.raises(LongtailError, match="no such artifact"):
        store.read_meta("method", OTHER)


def test_second_write_of_same_key_does_not_rewrite(store, monkeypatch):
    store.write("method", KEY, {"a": b"first"}, {"v": 1})
    path = f"{store.root}/method/{KEY}/a"
    if store.local_path("method", KEY):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))

    def no_writes(*a, **kw):
        raise AssertionError("a complete artifact was written again")

    monkeypatch.setattr(store.fs, "pipe_file", no_writes)
    store.write("method", KEY, {"a": b"second", "b": b"new"}, {"v": 2})
    monkeypatch.undo()
    assert store.read_file("method", KEY, "a") == b"first"
    assert store.read_meta("method", KEY) == {"v": 1}
    assert store.files("method", KEY) == ["a"]
    if store.local_path("method", KEY):
        assert os.stat(path).st_mtime_ns == 1_000_000_000


def test_concurrent_writer_of_same_key_keeps_the_first(store, monkeypatch):
    """Two runs computing the same key: the one that renames second keeps the first's files."""
    store.write("method", KEY, {"a": b"first"})
    real, calls = store.exists, []

    def first_check_misses(kind, key):  # it checked before the other run had finished
        calls.append(key)
        return False if len(calls) == 1 else real(kind, key)

    monkeypatch.setattr(store, "exists", first_check_misses)
    store.write("method", KEY, {"a": b"first"})
    monkeypatch.undo()
    assert store.exists("method", KEY) and store.read_file("method", KEY, "a") == b"first"
    assert [p for p in store.fs.find(store.root) if ".tmp-" in p] == []


def test_leftover_temp_dir_is_not_an_artifact(store):
    tmp = f"{store.root}/method/.tmp-{KEY}-deadbeef0000"
    store.fs.makedirs(tmp, exist_ok=True)
    store.fs.pipe_file(f"{tmp}/a", b"x")
    store.fs.pipe_file(f"{tmp}/{MARKER}", dump_json({"kind": "method", "key": KEY, "files": {}}))
    assert not store.exists("method", KEY)
    assert store.keys("method") == []
    store.write("method", KEY, {"a": b"real"})
    assert store.read_file("method", KEY, "a") == b"real"


def test_partial_final_dir_is_replaced(store):
    final = f"{store.root}/method/{KEY}"
    store.fs.makedirs(final, exist_ok=True)
    store.fs.pipe_file(f"{final}/a", b"half")
    store.fs.pipe_file(f"{final}/stale", b"from the crashed write")
    assert not store.exists("method", KEY)
    with pytest.raises(LongtailError, match="incomplete"):
        store.read_file("method", KEY, "a")
    store.write("method", KEY, {"a": b"whole"})
    assert store.read_file("method", KEY, "a") == b"whole"
    assert not store.fs.exists(f"{final}/stale")


def test_crash_before_marker_leaves_no_artifact(store, monkeypatch):
    real = store.fs.pipe_file

    def crash_on_marker(path, data, **kw):
        if path.endswith(MARKER):
            raise OSError("disk full")
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", crash_on_marker)
    with pytest.raises(OSError, match="disk full"):
        store.write("method", KEY, {"a": b"x"})
    monkeypatch.undo()
    assert not store.exists("method", KEY)
    assert not store.fs.exists(f"{store.root}/method/{KEY}")
    assert [p for p in store.fs.find(f"{store.root}") if ".tmp-" in p] == []  # temp cleaned


def test_non_local_backend_writes_the_marker_last_under_the_key_lock(monkeypatch):
    root = f"lt-{uuid.uuid4().hex}"
    store = ArtifactStore(f"memory://{root}")
    written = []
    real = store.fs.pipe_file

    def spy(path, data, **kw):
        written.append(path.rsplit("/", 1)[-1])
        if path.endswith(MARKER):
            assert store.fs.exists(f"/{root}/method/.lock-{KEY}")  # written while holding the lock
            raise OSError("connection reset")  # a crash between the files and the marker
        return real(path, data, **kw)

    monkeypatch.setattr(store.fs, "pipe_file", spy)
    with pytest.raises(OSError):
        store.write("method", KEY, {"a": b"1", "b": b"2"})
    monkeypatch.undo()
    assert written[0] == f".lock-{KEY}" and written[-1] == MARKER
    assert sorted(written[1:-1]) == ["a", "b", "meta.json"]
    assert not store.exists("method", KEY) and not store.fs.exists(f"/{root}/method/{KEY}")
    assert not store.fs.exists(f"/{root}/method/.lock-{KEY}")  # released on the error
    store.write("method", KEY, {"a": b"1", "b": b"2"})
    assert store.exists("method", KEY) and store.keys("method") == [KEY]
    fsspec.filesystem("memory").rm(f"/{root}", recursive=True)


def test_a_remote_root_is_probed_once_per_filesystem_and_bucket(monkeypatch):
    # the pipeline opens the artifact store for every stage: the backend is asked once
    import longtail.storage.fs

    monkeypatch.setattr(longtail.storage.fs, "_PROBED", {})
    fs = fsspec.filesystem("memory")
    probes = []
    real = fs.exists
    monkeypatch.setattr(fs, "exists", lambda path, **kw: probes.append(path) or real(path, **kw))
    root = f"memory://lt-{uuid.uuid4().hex}"
    ArtifactStore(f"{root}/a")
    assert probes  # the first store proves the backend answers
    probes.clear()
    ArtifactStore(f"{root}/b")
    assert probes == []


def test_corrupt_files_are_detected(tmp_path):
    store = ArtifactStore(str(tmp_path))
    store.write("method", KEY, {"a": b"0123456789"})
    p = tmp_path / "method" / KEY / "a"
    p.write_bytes(b"01234")
    with pytest.raises(LongtailError, match="5 bytes, 10 expected"):
        store.read_file("method", KEY, "a")
    p.write_bytes(b"0123456780")  # same size, other bytes
    with pytest.raises(LongtailError, match="does not match its hash"):
        store.verify("method", KEY)


@pytest.mark.parametrize(
    "kind, key, files, match",
    [
        ("method", "not-hex", {}, "bad artifact key"),
        ("method", "ABCDEF0123456789", {}, "bad artifact key"),
        ("Method/..", KEY, {}, "bad artifact kind"),
        ("method", KEY, {"../escape": b""}, "bad artifact file name"),
        ("method", KEY, {"meta.json": b"{}"}, "bad artifact file name"),
        ("method", KEY, {MARKER: b""}, "bad artifact file name"),
    ],
)
def test_bad_names(tmp_path, kind, key, files, match):
    with pytest.raises(LongtailError, match=match):
        ArtifactStore(str(tmp_path)).write(kind, key, files)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------- tensors and JSON
def test_tensors_round_trip_without_pickle():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"w": base.t(), "view": base[0], "steps": torch.tensor([5], dtype=torch.int64), "h": torch.ones(2, dtype=torch.float16)}
    out = load_tensors(save_tensors(state, metadata={"method": "ce"}))
    assert set(out) == set(state)
    for k, v in state.items():
        assert out[k].dtype == v.dtype
        assert torch.equal(out[k], v)


def test_load_tensors_refuses_pickles_and_garbage():
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    with pytest.raises(LongtailError, match="model.bin: not a readable safetensors"):
        load_tensors(buf.getvalue(), where="model.bin")
    with pytest.raises(LongtailError):
        load_tensors(b"\x00" * 3)
    with pytest.raises(TypeError, match="'lr'"):
        save_tensors({"lr": 0.1})


def test_json_helpers():
    data = dump_json({"b": np.float32(0.5), "a": np.arange(3), "c": {np.int64(1).item(): "x"}})
    assert data.startswith(b'{\n  "a": [\n')  # sorted keys
    assert load_json(data) == {"a": [0, 1, 2], "b": 0.5, "c": {"1": "x"}}
    with pytest.raises(ValueError):
        dump_json({"x": float("nan")})
    with pytest.raises(LongtailError, match="metrics.json: not valid JSON"):
        load_json(b"{", "metrics.json")
