"""Writer locks for feature stores and artifacts, on any fsspec filesystem.

A lock is a small JSON object ``{"host", "pid", "time", "token"}`` created only if absent:

* local filesystem: the JSON is written to a temporary file that is then ``os.link``-ed to the
  lock name; ``link(2)`` fails when the name exists, so the lock appears atomically and complete
  (a reader never sees an empty lock file);
* object stores and other fsspec backends: ``pipe_file(..., mode="create")``, an exclusive
  create (S3 conditional write ``If-None-Match: *`` through s3fs, ``memory://``). A backend
  without exclusive create gets a best effort instead: write when absent, then read the lock back
  and keep it only if it holds our token (two writers that check within the same instant can
  both believe they hold it; say so in the docs, not in silence).

Whoever cannot take a lock waits, polling, up to ``timeout`` seconds. A lock whose holder is on
this host and whose process no longer runs is stale: it is taken over with a warning. So is a
lock of this very process whose lock object is gone. With ``supersede_own`` (the feature store:
one writer per store and process), a lock of this process still held by a live object belongs to
an earlier writer that was abandoned without being closed (an exception in a notebook, an
interrupted loop): the new lock supersedes it, with a warning, and the earlier lock object reports
``superseded`` (its writer refuses to write on). Without it (artifacts, written by the threads of
a task runner) a thread waits for another thread like for another process. A holder on another host (or another live process here) cannot be judged from here: after
``timeout`` the waiter fails with a :class:`~stages.errors.LongtailError` naming the holder and
the lock, which can be deleted by hand once that writer is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
import weakref
from typing import Any

from longtail.stages.errors import LongtailError
from longtail.storage.fs import is_local

log = logging.getLogger("longtail.storage")

#: default seconds a second writer waits for the first (config key ``lock_timeout``)
DEFAULT_TIMEOUT = 600.0

#: the locks this process holds, by token (a superseded one is told so)
_HELD: "weakref.WeakValueDictionary[str, WriterLock]" = weakref.WeakValueDictionary()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else; else: cannot tell, so alive
        return True
    return True


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Creates file ``path`` holding ``data`` only if nothing is there; True when it did.

    Atomic on the local filesystem (``os.link``) and on backends with exclusive create; a best
    effort (check, write, read back) on the others, see the module docstring.
    """
    parent = path.rsplit("/", 1)[0] if "/" in path.strip("/") else None
    if is_local(fs):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except Exception as e:  # no exclusive create on this backend (fsspec before 2025): best effort
        # (an older s3fs hands ``mode`` to botocore, which refuses it as a ParamValidationError)
        if not isinstance(e, (TypeError, NotImplementedError, ValueError)) and type(e).__name__ != "ParamValidationError":
            raise
        log.debug("%s: no exclusive create on %s (%s): check-then-write", path, type(fs).__name__, e)
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    try:
        return fs.cat_file(path) == data
    except FileNotFoundError:
        return False


class WriterLock:
    """An exclusive lock named ``path`` on ``fs`` (see the module docstring).

    Args:
        fs, path: the filesystem and the lock's path on it.
        url: the lock's URL, for messages.
        what: what the lock protects, for messages (``"feature store s3://b/f.zarr"``).
        timeout: seconds to wait for a live holder before failing; 0 fails at once.
        poll: first polling interval in seconds (doubles up to 1 s).
        supersede_own: take over a lock held by a live lock object of this process (see the
            module docstring) instead of waiting for it.

    ``acquire()`` returns True when it had to wait for another writer (so the caller knows that
    the protected object may have changed meanwhile); ``release()`` deletes the lock if it is
    still ours. Also a context manager.
    """

    def __init__(self, fs, path: str, url: str, what: str, timeout: float = DEFAULT_TIMEOUT, poll: float = 0.05,
                 supersede_own: bool = False) -> None:
        if timeout is None or not (timeout >= 0):
            raise LongtailError(f"{url}: lock_timeout must be a number >= 0, got {timeout!r}")
        self.fs, self.path, self.url, self.what = fs, path, url, what
        self.timeout, self.poll = float(timeout), float(poll)
        self.supersede_own = supersede_own
        self.token = uuid.uuid4().hex
        self.held = False
        self.superseded = False
        self._body = b""

    def _read(self) -> dict | None:
        """The current holder, ``{}`` for an unreadable lock, or None when there is none."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    @staticmethod
    def describe(holder: dict) -> str:
        if not holder:
            return "an unknown writer (unreadable lock)"
        stamp = holder.get("time")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)) if isinstance(stamp, (int, float)) else "?"
        return f"host {holder.get('host')!r} pid {holder.get('pid')} since {when}"

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lock may be taken over (see the module docstring), or None."""
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return None
        if pid == os.getpid():
            if str(holder.get("token")) not in _HELD:
                return "an earlier writer in this process left it behind"
            return "an earlier writer in this process that was not closed" if self.supersede_own else None
        return None if pid_alive(pid) else "that process is gone"

    def _take_over(self, holder: dict, why: str) -> None:
        """Removes a stale lock if it is still the one we judged (another waiter may have
        replaced it meanwhile); the exclusive create that follows decides who gets it."""
        if self._read() == holder:
            log.warning("%s: taking over the lock of %s (%s): %s", self.what, self.describe(holder), why, self.url)
            old = _HELD.get(str(holder.get("token")))
            if old is not None:
                old.held, old.superseded = False, True
            try:
                self.fs.rm_file(self.path)
            except FileNotFoundError:
                pass

    def acquire(self) -> bool:
        waited = False
        deadline = time.monotonic() + self.timeout
        delay = self.poll
        announced = False
        while True:
            self._body = json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time(), "token": self.token}
            ).encode()
            if create_exclusive(self.fs, self.path, self._body):
                self.held = True
                _HELD[self.token] = self
                return waited
            holder = self._read()
            if holder is None:  # released between our create and our read: try again now
                continue
            why = self._stale(holder) if holder else None
            if why:
                self._take_over(holder, why)
                continue
            if time.monotonic() >= deadline:
                raise LongtailError(
                    f"{self.what} is being written by {self.describe(holder)}; gave up after waiting "
                    f"{self.timeout:g} s (lock_timeout); if that writer is gone, delete {self.url}"
                )
            if not announced:
                log.info("%s: waiting for the writer holding %s (%s)", self.what, self.url, self.describe(holder))
                announced = True
            waited = True
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(1.0, delay * 2)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.pop(self.token, None)
        try:
            if self.fs.cat_file(self.path) == self._body:  # never delete a lock that is not ours
                self.fs.rm_file(self.path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> "WriterLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["DEFAULT_TIMEOUT", "WriterLock", "create_exclusive", "pid_alive"]
