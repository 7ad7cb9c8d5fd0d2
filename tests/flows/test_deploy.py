"""`longtail deploy`: the deployment carries the config and the cron schedule; bad input is one line."""

import os

import pytest

from tests.pipeline.conftest import FAST, assert_user_error, feature_files, imported_run, invoke, write_config  # noqa: F401 (fixtures)


@pytest.fixture
def config(imported_run):
    return imported_run["config"]


def test_deployment_object_has_schedule_and_parameters(config):
    from longtail.flows.deploy import build_deployment
    from longtail.pipeline.config import load_config

    cfg = load_config(config)
    dep = build_deployment(cfg, "0 3 * * 1", "nightly")
    assert dep.name == "nightly"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * 1"]
    assert dep.entrypoint == "longtail.flows.pipeline_flow.longtail_flow"
    params = dep.parameters["config"]
    assert params["methods"] == [{"name": "ce", "params": FAST, "label": "ce"},
                                 {"name": "ce+pc", "params": FAST, "label": "ce+pc"}]
    assert os.path.isabs(params["store"]) and os.path.isabs(params["output"])


def test_registered_with_a_work_pool(harness, config):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="lt-pool", type="process"))
    r = invoke("deploy", config, "--cron", "15 2 * * *", "--pool", "lt-pool", "--name", "retrain")
    assert r.exit_code == 0, r.output
    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("longtail/retrain")
    assert dep.work_pool_name == "lt-pool"
    assert [s.schedule.cron for s in dep.schedules] == ["15 2 * * *"]
    assert dep.parameters["config"]["methods"][0]["name"] == "ce"
    assert_user_error(invoke("deploy", config, "--cron", "15 2 * * *", "--pool", "no-such-pool"),
                      "work pool 'no-such-pool' does not exist")


@pytest.mark.parametrize("cron", ["61 * * * *", "every day", "* * *"])
def test_malformed_cron(config, cron):
    assert_user_error(invoke("deploy", config, "--cron", cron, "--dry-run"), "is not a valid cron expression")


def test_needs_a_reachable_prefect_server(config, monkeypatch):
    import socket

    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert_user_error(invoke("deploy", config, "--cron", "0 3 * * *"), "deploy needs a Prefect server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
        assert_user_error(invoke("deploy", config, "--cron", "0 3 * * *"), "Prefect API at", "is unreachable")
