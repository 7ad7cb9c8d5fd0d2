"""Writer locks: one writer per feature store, a second one waits and reuses or fails; stale locks;
artifacts written by two processes at once. Real processes (multiprocessing, spawn), no timed asserts."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import socket
import threading
import time
import uuid

import fsspec
import pytest

from longtail.stages.errors import LongtailError
from longtail.storage.artifacts import ArtifactStore
from longtail.storage.featurestore import FeatureStoreWriter, open_store
from longtail.storage.locks import WriterLock, create_exclusive
from tests.storage.test_featurestore import build, make_data, plan, snapshot, write_split

KEY = "0123456789abcdef" * 2
CTX = mp.get_context("spawn")


def dead_pid() -> int:
    p = CTX.Process(target=int)
    p.start()
    p.join()
    return p.pid


def write_lock(path, host, pid) -> None:
    with open(path, "w") as f:
        json.dump({"host": host, "pid": pid, "time": time.time(), "token": "t"}, f)


# ---------------------------------------------------------------------------------------- primitives
@pytest.mark.parametrize("backend", ["local", "memory"])
def test_exclusive_create_succeeds_once(tmp_path, backend):
    if backend == "local":
        fs, path = fsspec.filesystem("file"), str(tmp_path / "sub" / "x.lock")
    else:
        fs, path = fsspec.filesystem("memory"), f"/lt-{uuid.uuid4().hex}/x.lock"
    assert create_exclusive(fs, path, b"first")
    assert not create_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"
    if backend == "local":
        assert sorted(os.listdir(tmp_path / "sub")) == ["x.lock"]  # no temporary file left


def test_backend_without_exclusive_create_gets_check_then_write(monkeypatch):
    fs, path = fsspec.filesystem("memory"), f"/lt-{uuid.uuid4().hex}/x.lock"
    real = fs.pipe_file

    def old_pipe_file(p, data, **kw):  # an fsspec backend from before exclusive writes
        if kw:
            raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
        return real(p, data)

    monkeypatch.setattr(fs, "pipe_file", old_pipe_file)
    assert create_exclusive(fs, path, b"first")
    assert not create_exclusive(fs, path, b"second")
    assert fs.cat_file(path) == b"first"


def test_release_never_deletes_a_lock_that_is_not_ours(tmp_path):
    fs = fsspec.filesystem("file")
    path = str(tmp_path / "x.lock")
    a = WriterLock(fs, path, path, "thing", timeout=0)
    a.acquire()
    write_lock(path, "elsewhere", 1)  # someone replaced it (took it over)
    a.release()
    assert os.path.exists(path)


# ---------------------------------------------------------------------------------------- feature store
def test_second_writer_fails_after_the_timeout_naming_the_live_holder(tmp_path):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    write_lock(url + ".lock", socket.gethostname(), os.getppid())  # a live process that is not us
    with pytest.raises(LongtailError) as e:
        FeatureStoreWriter(url, **plan(data), lock_timeout=0.2)
    msg = str(e.value)
    assert "\n" not in msg and f"pid {os.getppid()}" in msg and url + ".lock" in msg and "lock_timeout" in msg
    assert not os.path.exists(url)  # nothing written


def test_lock_from_another_host_is_not_taken_over(tmp_path):
    url = str(tmp_path / "f.zarr")
    write_lock(url + ".lock", "some-other-host", dead_pid())
    with pytest.raises(LongtailError, match="some-other-host"):
        FeatureStoreWriter(url, **plan(make_data()), lock_timeout=0)


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    pid = dead_pid()
    write_lock(url + ".lock", socket.gethostname(), pid)
    with caplog.at_level(logging.WARNING, logger="longtail.storage"):
        fp = build(url, data)
    assert any(f"pid {pid}" in r.getMessage() and "gone" in r.getMessage() for r in caplog.records)
    assert fp == build(str(tmp_path / "clean.zarr"), data)
    assert not os.path.exists(url + ".lock")


def test_abandoned_writer_of_this_process_is_superseded(tmp_path):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    old = FeatureStoreWriter(url, **plan(data))
    write_split(old, data, "train")
    new = FeatureStoreWriter(url, **plan(data), lock_timeout=0)
    assert new.resumed and new.split_done("train")
    with pytest.raises(RuntimeError, match="took over"):
        write_split(old, data, "val")
    old.close()  # must not release the new writer's lock
    assert os.path.exists(url + ".lock")
    for split in ("val", "test"):
        write_split(new, data, split)
    assert new.finish() == build(str(tmp_path / "clean.zarr"), data)
    assert not os.path.exists(url + ".lock")


def test_close_releases_the_lock_and_keeps_the_store_resumable(tmp_path):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    with FeatureStoreWriter(url, **plan(data)) as w:
        write_split(w, data, "train")
    assert not os.path.exists(url + ".lock")
    w = FeatureStoreWriter(url, **plan(data), lock_timeout=0)
    assert w.resumed and w.split_done("train")
    w.close()


class _SetOnWait(logging.Handler):
    """Sets an event when the lock says it waits for another writer (the child's signal)."""

    def __init__(self, event) -> None:
        super().__init__(logging.INFO)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for the writer" in record.getMessage():
            self.event.set()


def _wait_then_write(url: str, over: dict, waiting: "mp.Event", out: "mp.Queue") -> None:
    """Second writer: waits for the lock held by the parent test, reports what it found."""
    logger = logging.getLogger("longtail.storage")
    logger.setLevel(logging.INFO)
    logger.addHandler(_SetOnWait(waiting))
    data = make_data()
    try:
        w = FeatureStoreWriter(url, **plan(data, **over), lock_timeout=60)
        res = {"waited": w.waited, "reused": w.reused, "resumed": w.resumed}
        for split in data:
            if not w.split_done(split):
                write_split(w, data, split)
        res["fingerprint"] = w.finish()
    except LongtailError as e:
        res = {"error": str(e)}
    out.put(res)


def _start_waiter(url: str, over: dict):
    """The child process, once it waits for the lock the parent holds."""
    waiting, out = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_wait_then_write, args=(url, over, waiting, out))
    p.start()
    assert waiting.wait(60), "the second writer never waited for the lock"
    return p, out, waiting


@pytest.mark.parametrize("first", ["completes", "completes another plan", "stops half-way"])
def test_second_process_waits_then_reuses_fails_or_resumes(tmp_path, first):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    clean = build(str(tmp_path / "clean.zarr"), data)
    over = {"dataset_fingerprint": "e" * 16} if first == "completes another plan" else {}
    w = FeatureStoreWriter(url, **plan(data, **over))
    p, out, _ = _start_waiter(url, {})
    if first == "stops half-way":
        write_split(w, data, "train")
        w.close()
    else:
        for split in data:
            write_split(w, data, split)
        w.finish()
    before = snapshot(tmp_path / "f.zarr")
    res = out.get(timeout=120)
    p.join()
    if first == "completes":
        assert res == {"waited": True, "reused": True, "resumed": False, "fingerprint": clean}
        assert snapshot(tmp_path / "f.zarr") == before  # the reuser wrote nothing
    elif first == "completes another plan":
        assert "complete feature store is already there" in res["error"]
        assert snapshot(tmp_path / "f.zarr") == before
    else:
        assert res == {"waited": True, "reused": False, "resumed": True, "fingerprint": clean}
    open_store(url).verify()
    assert not os.path.exists(url + ".lock")


def _race_writer(url: str, go: "mp.Event", out: "mp.Queue") -> None:
    data = make_data()
    go.wait()
    w = FeatureStoreWriter(url, **plan(data, chunk_rows=2), lock_timeout=120, reuse_complete=True)
    for split in data:
        if not w.split_done(split):
            write_split(w, data, split, block=1)
    out.put({"reused": w.reused, "fingerprint": w.finish()})


def test_two_processes_writing_one_store_at_once_leave_one_valid_store(tmp_path):
    data = make_data()
    url = str(tmp_path / "f.zarr")
    clean = build(str(tmp_path / "clean.zarr"), data)
    go, out = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_race_writer, args=(url, go, out)) for _ in range(2)]
    for p in procs:
        p.start()
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
        assert p.exitcode == 0
    assert [r["fingerprint"] for r in results] == [clean, clean]
    assert sorted(r["reused"] for r in results) == [False, True]  # one wrote, the other reused
    st = open_store(url)
    st.verify()
    assert st.fingerprint == clean
    assert not os.path.exists(url + ".lock")


# ---------------------------------------------------------------------------------------- artifacts
def _artifact_writer(root: str, i: int, go: "mp.Event", out: "mp.Queue") -> None:
    store = ArtifactStore(root, lock_timeout=120)
    go.wait()
    payload = {f"part{j}.bin": bytes([i]) * (50_000 + j) for j in range(8)}  # differ by writer
    store.write("method", KEY, payload, {"writer": i})
    out.put(i)


def race_artifact_writers(root: str) -> None:
    """Two spawned processes write artifact ``KEY`` under ``root`` at once: exactly one writer's
    files end up there, complete and verified (also used by test_s3 for s3:// roots)."""
    go, out = CTX.Event(), CTX.Queue()
    procs = [CTX.Process(target=_artifact_writer, args=(root, i, go, out)) for i in (1, 2)]
    for p in procs:
        p.start()
    go.set()
    assert sorted(out.get(timeout=120) for _ in procs) == [1, 2]
    for p in procs:
        p.join()
    store = ArtifactStore(root)
    store.verify("method", KEY)
    winner = store.read_meta("method", KEY)["writer"]
    assert {store.read_file("method", KEY, n) for n in store.files("method", KEY)} == {
        bytes([winner]) * (50_000 + j) for j in range(8)
    }


def test_two_processes_writing_one_artifact_never_mix_their_files(tmp_path):
    race_artifact_writers(str(tmp_path / "cache"))
    assert [p for p in os.listdir(tmp_path / "cache" / "method") if p != KEY] == []  # no temp or lock left


def test_remote_artifact_writer_waits_for_the_key_lock_and_writes_nothing(monkeypatch):
    root = f"memory://lt-{uuid.uuid4().hex}/cache"
    first, second = ArtifactStore(root), ArtifactStore(root, lock_timeout=30)
    lock_path = f"{first.root}/method/.lock-{KEY}"
    entered, proceed = threading.Event(), threading.Event()
    real = first.fs.pipe_file

    def slow_marker(path, data, **kw):  # the first writer pauses before its marker
        if path.endswith("_COMPLETE") and threading.current_thread().name == "first":
            entered.set()
            proceed.wait(30)
        return real(path, data, **kw)

    monkeypatch.setattr(first.fs, "pipe_file", slow_marker)
    t = threading.Thread(target=first.write, args=("method", KEY, {"a": b"one"}, {"w": 1}), name="first")
    t.start()
    assert entered.wait(30)
    assert first.fs.exists(lock_path) and not second.exists("method", KEY)  # files there, no marker yet
    second_done = threading.Thread(target=second.write, args=("method", KEY, {"a": b"two!"}, {"w": 2}))
    second_done.start()
    proceed.set()
    t.join()
    second_done.join()
    assert second.read_file("method", KEY, "a") == b"one" and second.read_meta("method", KEY) == {"w": 1}
    second.verify("method", KEY)
    assert not first.fs.exists(lock_path)


def test_artifact_lock_timeout_names_the_holder():
    root = f"memory://lt-{uuid.uuid4().hex}/cache"
    store = ArtifactStore(root, lock_timeout=0)
    store.fs.pipe_file(f"{store.root}/method/.lock-{KEY}",
                       json.dumps({"host": "builder-7", "pid": 4242, "time": 0, "token": "x"}).encode())
    with pytest.raises(LongtailError, match="builder-7.*pid 4242") as e:
        store.write("method", KEY, {"a": b"x"})
    assert "\n" not in str(e.value) and not store.exists("method", KEY)
