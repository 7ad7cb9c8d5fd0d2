"""Scheduled retraining: a Prefect deployment of the full flow with its config and a cron schedule.

``longtail deploy CONFIG --cron "0 3 * * *"`` either serves the deployment from this long-running
process (``flow.serve``-style; the process runs the scheduled flow runs) or, with ``--pool``,
registers it with a Prefect work pool whose workers run it (``prefect worker start --pool NAME``).
Every scheduled run is a normal ``longtail run``: stages whose inputs did not change come from the
cache, the rest is recomputed.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.deployments.runner import EntrypointType, RunnerDeployment

from longtail.pipeline.config import RunConfig
from longtail.stages.errors import LongtailError


def check_cron(cron: str) -> str:
    """A five-field cron expression Prefect accepts, or a one-line error naming it."""
    from pydantic import ValidationError
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=cron)
    except (ValidationError, ValueError):
        raise LongtailError(f"--cron {cron!r} is not a valid cron expression (five fields, e.g. '0 3 * * *')") from None
    return cron


def _absolute(url: str | None) -> str | None:
    """Local paths become absolute (a worker may start elsewhere); fsspec URLs stay as they are."""
    if url is None or "://" in url:
        return url
    return os.path.abspath(url)


def deployment_parameters(cfg: RunConfig, allow_override: bool = False) -> dict[str, Any]:
    """The flow's parameters: ``config``, the validated config with local paths made absolute, and
    ``allow_config_override`` (whether a flow run may bring another config; read from the stored
    deployment, never from the run, see :func:`flows.pipeline_flow.check_run_config`)."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    for key in ("store", "output", "artifacts"):
        if key in data:
            data[key] = _absolute(data[key])
    if data.get("backbone", {}).get("path"):
        data["backbone"]["path"] = _absolute(data["backbone"]["path"])
    return {"config": data, "allow_config_override": bool(allow_override)}


def default_name(config_path: str) -> str:
    return "longtail-" + os.path.splitext(os.path.basename(config_path))[0]


def build_deployment(cfg: RunConfig, cron: str, name: str, work_pool: str | None = None,
                     allow_override: bool = False) -> RunnerDeployment:
    """The deployment object (not registered yet) of the full flow for ``cfg`` on ``cron``; its flow
    runs refuse a config other than ``cfg`` unless ``allow_override``."""
    from longtail.flows.pipeline_flow import longtail_flow

    check_cron(cron)
    return longtail_flow.to_deployment(
        name=name, cron=cron, parameters=deployment_parameters(cfg, allow_override), work_pool_name=work_pool,
        description=f"longtail pipeline for {cfg.output} (store {cfg.store})", tags=["longtail"],
        entrypoint_type=EntrypointType.MODULE_PATH,  # runs wherever longtail is installed
    )


def register(deployment: RunnerDeployment, work_pool: str) -> str:
    """Register ``deployment`` with an existing work pool; returns the deployment id."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(work_pool)
        except ObjectNotFound:
            raise LongtailError(f"work pool {work_pool!r} does not exist: create it with "
                                f"`prefect work-pool create {work_pool} --type process`") from None
    return str(deployment.apply(work_pool_name=work_pool))


def serve(deployment: RunnerDeployment) -> None:
    """Serve the deployment from this process until it is stopped (Ctrl-C / SIGTERM)."""
    from prefect import serve as prefect_serve

    try:
        prefect_serve(deployment)
    except RuntimeError as exc:  # the temporary server did not start, or the API went away
        if "Prefect API" not in str(exc):
            raise
        raise LongtailError(f"deployment {deployment.name}: {exc}") from None
