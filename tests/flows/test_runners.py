"""Task runners from the config: Dask gives the thread runner's metrics; bad runners fail in one line."""

import socket

import pytest

from longtail.pipeline.config import parse_config
from longtail.stages.errors import LongtailError

from tests.pipeline.conftest import FAST, gaussian_split


@pytest.fixture
def store(tmp_path):
    import numpy as np

    from longtail.storage.importers import import_features

    files = {}
    for name, counts, seed in (("train", [60, 25, 10, 4], 0), ("val", [15] * 4, 1), ("test", [30] * 4, 2)):
        x, y = gaussian_split(counts, seed=seed)
        files[name] = str(tmp_path / f"{name}.npz")
        np.savez(files[name], features=x, labels=y)
    return import_features(train=files["train"], val=files["val"], test=files["test"],
                           out=str(tmp_path / "store.zarr")).url


def _config(store, out, runner):
    return {"store": store, "output": str(out), "runner": runner,
            "evaluation": {"shift_ratios": []},
            "methods": [{"name": "ce", "params": FAST}, {"name": "balanced-softmax", "params": FAST},
                        {"name": "logit-adjust", "params": FAST}, {"name": "ce+pc", "params": FAST}]}


def test_dask_runner_matches_thread_runner(harness, store, tmp_path):
    from longtail.flows.pipeline_flow import longtail_flow

    threads = longtail_flow(_config(store, tmp_path / "threads", {"kind": "threads", "workers": 2}))
    dask = longtail_flow(_config(store, tmp_path / "dask", {"kind": "dask", "workers": 2}))
    assert set(dask["methods"]) == {"ce", "balanced-softmax", "logit-adjust", "ce+pc"}
    for name, m in threads["methods"].items():
        d = dask["methods"][name]
        for key in ("overall", "balanced_accuracy", "many", "medium", "few", "ece", "nll"):
            assert d[key] == m[key], (name, key)
    # the two runs fitted in separate caches (their own output dirs): the Dask workers really fitted
    assert (tmp_path / "dask" / "cache").is_dir()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_dask_scheduler_is_one_line(tmp_path):
    from longtail.flows.runners import check_runner

    cfg = parse_config(_config("x.zarr", tmp_path, {"kind": "dask", "address": f"tcp://127.0.0.1:{_closed_port()}"}))
    with pytest.raises(LongtailError, match="Dask scheduler at 'tcp://127.0.0.1:.*' is unreachable"):
        check_runner(cfg.runner)


def test_address_needs_a_cluster_runner(tmp_path):
    with pytest.raises(LongtailError, match="address is only for the dask and ray runners"):
        parse_config(_config("x.zarr", tmp_path, {"kind": "threads", "address": "tcp://h:1"}))


def test_unreachable_prefect_api_is_one_line(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from longtail.flows.runners import check_prefect_api

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{_closed_port()}/api"}):
        with pytest.raises(LongtailError, match="Prefect API at .* is unreachable"):
            check_prefect_api()
