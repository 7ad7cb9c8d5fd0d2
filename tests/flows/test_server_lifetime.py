"""Issue 14, item 6: the temporary Prefect server of a Prefect-mode run dies with the run, however the
run ends (SIGKILL of the parent, SIGTERM as ``timeout`` sends it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipeline.conftest import FAST, feature_files, imported_run, write_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the server process")


def _descendants(pid: int) -> dict[int, str]:
    """``{pid: cmdline}`` of every living descendant of ``pid``."""
    parents: dict[int, int] = {}
    cmd: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                out[child] = cmd.get(child, "")
                frontier.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _server_of(proc: subprocess.Popen, deadline_s: float = 240) -> int:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for pid, cmd in _descendants(proc.pid).items():
            if "uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd:
                return pid
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its server was seen: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError("no temporary Prefect server appeared")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_the_temporary_server_dies_with_the_run(imported_run, tmp_path, how):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    proc = subprocess.Popen([sys.executable, "-m", "longtail.flows.cli", "run", str(imported_run["config"])],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = None
    try:
        server = _server_of(proc)
        proc.send_signal(how)
        proc.wait(timeout=60)
        end = time.monotonic() + 30  # a deadline for the watchdog, not a timing assertion
        while _alive(server) and time.monotonic() < end:
            time.sleep(0.2)
        assert not _alive(server), f"the temporary Prefect server {server} outlived its run"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if server is not None and _alive(server):
            os.kill(server, signal.SIGKILL)
