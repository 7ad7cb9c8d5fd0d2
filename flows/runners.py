"""Task runners chosen in the config (``runner:``) and the reachability checks that run first.

Independent stage-2 tasks (heads, DLSA cascades, wrappers) are Prefect tasks; where they run is
Prefect's task runner: threads in this process, a Dask cluster (prefect-dask) or Ray (prefect-ray).
An unreachable scheduler, Ray head or Prefect API is a one-line error before anything runs.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from longtail.pipeline.config import RunnerConfig
from longtail.stages.errors import LongtailError

CONNECT_TIMEOUT_S = 5.0


def _check_tcp(what: str, address: str, default_port: int) -> None:
    url = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = url.hostname, url.port or default_port
    if not host:
        raise LongtailError(f"{what} address {address!r} names no host")
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise LongtailError(f"{what} at {address!r} is unreachable ({exc.strerror or exc})") from None


def check_runner(rc: RunnerConfig) -> None:
    """Fail early, in one line, if the configured runner cannot start."""
    if rc.kind == "dask":
        try:
            import prefect_dask  # noqa: F401
        except ImportError:
            raise LongtailError("runner kind 'dask' needs prefect-dask: pip install prefect-dask") from None
        if rc.address:
            _check_tcp("Dask scheduler", rc.address, 8786)
    elif rc.kind == "ray":
        try:
            import prefect_ray  # noqa: F401
        except ImportError:
            raise LongtailError("runner kind 'ray' needs prefect-ray: pip install -e '.[ray]'") from None
        if rc.address and rc.address != "auto":
            _check_tcp("Ray cluster", rc.address, 10001)


def check_prefect_api() -> str | None:
    """If ``PREFECT_API_URL`` names a Prefect server, it must answer its health check.

    Returns the URL, or None when flows run on a temporary local server (Prefect's default)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value() or None
    if not url:
        return None
    import httpx

    health = url.rstrip("/") + "/health"
    headers = {}
    key = os.environ.get("PREFECT_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        resp = httpx.get(health, timeout=CONNECT_TIMEOUT_S, headers=headers)
    except httpx.HTTPError as exc:
        raise LongtailError(f"Prefect API at {url!r} is unreachable ({type(exc).__name__}: {exc})") from None
    if resp.status_code >= 400:
        raise LongtailError(f"Prefect API at {url!r} answered {resp.status_code} to its health check")
    return url


def make_task_runner(rc: RunnerConfig):
    """The Prefect task runner for ``rc`` (not started: the flow starts and stops it)."""
    check_runner(rc)
    if rc.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=rc.workers)
    if rc.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if rc.address:
            return DaskTaskRunner(address=rc.address)
        # one single-threaded worker process per task slot; no dashboard (clusters are often locked down)
        return DaskTaskRunner(cluster_kwargs={"n_workers": rc.workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    from prefect_ray import RayTaskRunner

    if rc.address:
        return RayTaskRunner(address=rc.address)
    return RayTaskRunner(init_kwargs={"num_cpus": rc.workers, "include_dashboard": False})
