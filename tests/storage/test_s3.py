"""s3:// stores and artifact caches through s3fs, against an S3-compatible server on loopback
(moto's ThreadedMotoServer) started here; credentials and endpoint come from the environment."""

from __future__ import annotations

import json
import socket
import uuid

import numpy as np
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from longtail.pipeline.config import parse_config  # noqa: E402
from longtail.stages.errors import LongtailError  # noqa: E402
from longtail.storage.artifacts import ArtifactStore, load_tensors, save_tensors  # noqa: E402
from longtail.storage.featurestore import FeatureStoreWriter, open_store, store_status  # noqa: E402
from tests.pipeline.conftest import FAST, assert_user_error, gaussian_split, invoke, write_feature_files  # noqa: E402
from tests.storage.test_featurestore import build, make_data, plan  # noqa: E402
from tests.storage.test_locks import race_artifact_writers  # noqa: E402

KEY = "0123456789abcdef" * 2
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _clear_s3fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # an instance keeps the credentials it resolved


@pytest.fixture(scope="module")
def endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp_env:
        for k, v in CREDENTIALS.items():
            mp_env.setenv(k, v)
        mp_env.setenv("AWS_ENDPOINT_URL", url)
        mp_env.setenv("AWS_EC2_METADATA_DISABLED", "true")
        _clear_s3fs_cache()
        yield url
        _clear_s3fs_cache()
    server.stop()


@pytest.fixture
def bucket(endpoint):
    import s3fs

    name = f"lt-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def no_credentials(monkeypatch, tmp_path) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    _clear_s3fs_cache()


def s3_listing(bucket: str) -> list[str]:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    return sorted(fs.find(bucket.removeprefix("s3://")))


# ---------------------------------------------------------------------------------------- round trips
def test_feature_store_round_trips_like_a_local_one(bucket, tmp_path):
    data = make_data()
    url = f"{bucket}/f.zarr"
    assert store_status(url) == "missing"
    fp = build(url, data, chunk_rows=16)
    assert fp == build(str(tmp_path / "f.zarr"), data)  # chunking is not part of the fingerprint
    st = open_store(url)
    assert st.fingerprint == fp and store_status(url) == "complete"
    for split, d in data.items():
        fs = st.read(split)
        np.testing.assert_array_equal(fs.features, d["features"])
        np.testing.assert_array_equal(fs.labels, d["labels"])
        np.testing.assert_array_equal(fs.index, d["index"])
        if d["attributes"] is None:
            assert fs.attributes is None
        else:
            np.testing.assert_array_equal(fs.attributes, d["attributes"])
    st.verify()
    assert not any(p.endswith(".lock") for p in s3_listing(bucket))  # the writer's lock is gone
    with pytest.raises(LongtailError, match="complete feature store"):
        FeatureStoreWriter(url, **plan(data))


def test_artifact_store_round_trips(bucket):
    import torch

    store = ArtifactStore(f"{bucket}/cache")
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    url = store.write("method", KEY, {"state.safetensors": save_tensors(state), "x.npy": b"123"}, {"lr": 0.1})
    assert url == f"{bucket}/cache/method/{KEY}"
    assert store.exists("method", KEY) and store.keys("method") == [KEY]
    assert torch.equal(load_tensors(store.read_file("method", KEY, "state.safetensors"))["w"], state["w"])
    assert store.read_meta("method", KEY) == {"lr": 0.1}
    store.verify("method", KEY)
    assert not any(".lock-" in p for p in s3_listing(bucket))


def test_two_processes_writing_one_s3_artifact_never_mix_their_files(bucket):
    # the writers live in test_locks, a light module for the spawned interpreters to import
    race_artifact_writers(f"{bucket}/cache")
    assert not any(".lock-" in p for p in s3_listing(bucket))


# ---------------------------------------------------------------------------------------- the pipeline
def _run(files, store, artifacts, out) -> dict:
    r = invoke("import-features", "--train", files["train"], "--val", files["val"], "--test", files["test"],
               "--out", store)
    assert r.exit_code == 0, r.output
    cfg = {"store": store, "output": str(out), "methods": [{"name": "ce", "params": FAST}]}
    if artifacts:
        cfg["artifacts"] = artifacts
    path = out.parent / f"{uuid.uuid4().hex}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    r = invoke("run", path, "--no-prefect")
    assert r.exit_code == 0, r.output
    return json.loads((out / "metrics.json").read_text())


def _comparable(metrics: dict) -> dict:
    m = {k: v for k, v in metrics.items() if k != "lineage"}
    m["methods"] = {n: {k: v for k, v in d.items() if k != "fit_seconds"} for n, d in m["methods"].items()}
    return m


def test_pipeline_on_s3_gives_the_metrics_of_the_local_run(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would show up here as "s3:"
    files = write_feature_files(tmp_path)
    local = _run(files, str(tmp_path / "store.zarr"), None, tmp_path / "out-local")
    remote = _run(files, f"{bucket}/store.zarr", f"{bucket}/cache", tmp_path / "out-s3")
    assert _comparable(remote) == _comparable(local)
    assert remote["lineage"]["store_fingerprint"] == local["lineage"]["store_fingerprint"]
    assert remote["lineage"]["store"] == f"{bucket}/store.zarr"
    assert not (tmp_path / "s3:").exists()
    listing = s3_listing(bucket)
    assert any("/cache/method/" in p for p in listing) and any(p.endswith("store.zarr/zarr.json") for p in listing)
    # a second run recomputes nothing: the cached fit on s3 is reused (same key, no new artifact)
    before = listing
    _run(files, f"{bucket}/store.zarr", f"{bucket}/cache", tmp_path / "out-s3")
    assert s3_listing(bucket) == before


# ---------------------------------------------------------------------------------------- bad input
def test_missing_credentials_is_one_line_naming_the_url(bucket, tmp_path, monkeypatch):
    files = write_feature_files(tmp_path)
    no_credentials(monkeypatch, tmp_path)
    url = f"{bucket}/x.zarr"
    r = invoke("import-features", "--train", files["train"], "--test", files["test"], "--out", url)
    assert_user_error(r, url, "no credentials", "AWS_ACCESS_KEY_ID")
    with pytest.raises(LongtailError, match="no credentials"):
        ArtifactStore(f"{bucket}/cache")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"store": url, "output": str(tmp_path / "o"), "methods": ["ce"]}))
    assert_user_error(invoke("run", cfg, "--no-prefect"), url, "no credentials")
    monkeypatch.undo()
    _clear_s3fs_cache()
    assert s3_listing(bucket) == []  # nothing was written
    assert not (tmp_path / "o").exists()


def test_unreachable_endpoint_and_missing_bucket(bucket, tmp_path, monkeypatch):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    options = {"endpoint_url": f"http://127.0.0.1:{port}",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(LongtailError, match="cannot reach the storage endpoint") as e:
        ArtifactStore(f"{bucket}/cache", storage_options=options)
    assert bucket in str(e.value) and "\n" not in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"store": f"{bucket}/x.zarr", "output": str(tmp_path / "o"), "methods": ["ce"],
                               "storage_options": options}))
    assert_user_error(invoke("run", cfg, "--no-prefect"), f"{bucket}/x.zarr", "cannot reach")
    with pytest.raises(LongtailError, match="bucket 'no-such-bucket' does not exist"):
        ArtifactStore("s3://no-such-bucket/cache")
    assert not (tmp_path / "o").exists()


def test_remote_output_directory_is_refused():
    with pytest.raises(LongtailError, match="output.*must be a local path"):
        parse_config({"store": "s3://b/s.zarr", "output": "s3://b/out", "methods": ["ce"]})


# ---------------------------------------------------------------------------------------- URLs without a server
def test_import_from_remote_files_into_a_memory_store_equals_the_local_import(tmp_path):
    """Input files and the store on fsspec URLs (memory://): no local path is assumed anywhere."""
    import fsspec
    import h5py

    from longtail.storage.importers import import_features

    files = write_feature_files(tmp_path)
    with h5py.File(tmp_path / "test.h5", "w") as f:  # one HDF5 file, read through a file object
        x, y = gaussian_split([30] * 4, seed=2)
        f["features"], f["labels"] = x, y
    files["test"] = tmp_path / "test.h5"
    mem = fsspec.filesystem("memory")
    root = f"lt-{uuid.uuid4().hex}"
    remote = {}
    for name, p in files.items():
        mem.pipe_file(f"/{root}/in/{p.name}", p.read_bytes())
        remote[name] = f"memory://{root}/in/{p.name}"
    local = import_features(files["train"], files["test"], str(tmp_path / "s.zarr"), val=files["val"])
    res = import_features(remote["train"], remote["test"], f"memory://{root}/s.zarr", val=remote["val"])
    assert not res.reused and res.store.fingerprint == local.store.fingerprint
    assert res.store.dataset_fingerprint == local.store.dataset_fingerprint
    again = import_features(remote["train"], remote["test"], f"memory://{root}/s.zarr", val=remote["val"])
    assert again.reused  # the same files: the complete store is reused, not rewritten
    with pytest.raises(LongtailError, match="feature file not found"):
        import_features(f"memory://{root}/in/nope.npz", remote["test"], f"memory://{root}/t.zarr")
    assert not mem.exists(f"/{root}/t.zarr")
    mem.rm(f"/{root}", recursive=True)
