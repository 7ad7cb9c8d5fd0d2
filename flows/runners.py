"""Task runners chosen in the config (``runner:``) and the reachability checks that run first.

Independent stage-2 tasks (heads, DLSA cascades, wrappers) are Prefect tasks; where they run is
Prefect's task runner: threads in this process, a Dask cluster (prefect-dask) or Ray (prefect-ray).
An unreachable scheduler, Ray head or Prefect API is a one-line error before anything runs.
Without a configured Prefect API, a run gets a temporary local server that dies with it
(:func:`temporary_prefect_server`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
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


#: the watchdog of a temporary server: reads the server's pid(s) from its stdin, one per line, until
#: the pipe ends (closed by the kernel however the run ends, SIGKILL included), then stops them
_WATCHDOG = """
import os, signal, sys, time
pids = [int(line) for line in sys.stdin.buffer.read().split()]
for pid in dict.fromkeys(pids):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + 5.0
        while time.monotonic() < end:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            continue
        break
"""


def _sigterm_exits(signum, frame):  # noqa: ARG001 (signal handler signature)
    raise SystemExit(128 + signum)


def _tied_server(watchdog: subprocess.Popen):
    """Prefect's temporary-server launcher, telling ``watchdog`` each server pid as soon as the
    process exists (before it answers: a run killed while it starts must not leave it behind)."""
    from prefect.server.api.server import SubprocessASGIServer

    class TiedServer(SubprocessASGIServer):
        def _run_uvicorn_command(self):  # Prefect's (3.8) launcher of the server process
            proc = super()._run_uvicorn_command()
            watchdog.stdin.write(f"{proc.pid}\n".encode())
            watchdog.stdin.flush()
            return proc

    return TiedServer()


def _drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send what Prefect's background workers still hold (log records, events): once the temporary
    server is gone they would print "Error logging to API" after the run's own output."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


@contextlib.contextmanager
def temporary_prefect_server():
    """The Prefect API of a Prefect-mode run: ``PREFECT_API_URL`` when it is set (yields it);
    otherwise a temporary local server started here (what Prefect would start on its own), which
    dies with the run however it ends: stopped when the block exits, on SIGTERM (``timeout``,
    ``kill``: turned into ``SystemExit`` while the block runs in the main thread), and by a
    watchdog process (its own session, so a terminal's Ctrl-C leaves it to us) when this process is
    killed outright (SIGKILL, the out-of-memory killer)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value() or None
    if url:
        yield url
        return
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _sigterm_exits) if main else None
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG], stdin=subprocess.PIPE, start_new_session=True)
    server = _tied_server(watchdog)
    try:
        server.start()
        watchdog.stdin.write(f"{server.server_process.pid}\n".encode())  # in case the launcher changed
        watchdog.stdin.flush()
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        try:
            _drain_prefect_workers()  # the run's last logs and events reach the server before it stops
            server.stop()
        finally:
            watchdog.stdin.close()  # the server is stopped: the watchdog finds nothing left to stop
            watchdog.wait()
            if main:
                signal.signal(signal.SIGTERM, old)


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
