"""Test hook: faults injected at named points of the store's write path.

Production code only marks the points (``fault_point("before_fsync")``, or ``fault_write(fd,
data, "mid_commit")`` where a write can be cut short); nothing happens unless the environment
variable below is set, which only tests/test_store_crash.py does, in the subprocesses it kills.

    EMBEDSTORE_CRASH_AT="<point>[:<nth>[:<action>]]"

makes the process inject a fault the nth time (default 1) it reaches <point>. Actions:
``kill`` (default): SIGKILL, no cleanup, exactly as `kill -9` would; at a write point the first
half of the data is written first (a torn write). ``enospc`` / ``eio``: raise the OSError a full
disk / a failing disk gives; at a write point after a short write of half the data. Another kind
of fault is one more entry in ``ACTIONS`` plus its branch in ``Fault.strike`` / ``Fault.write``.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
from dataclasses import dataclass

from embedstore.errors import ConfigError

__all__ = ["ENV_VAR", "POINTS", "ACTIONS", "Fault", "FaultPlan", "PutFaults", "fault_due",
           "fault_point", "fault_write"]

ENV_VAR = "EMBEDSTORE_CRASH_AT"

# Where a store write can be hit, in the order each operation passes them (docs/STORE_FORMAT.md).
POINTS = (
    # a writer's flush
    "before_chunk_write",
    "mid_chunk_write",  # chunk temp file written, not yet renamed into place
    "after_chunk_write",  # chunk files in place, no commit part yet
    "mid_commit",  # half the commit part's temp file written
    "before_fsync",  # commit part temp written, not fsync'ed
    "before_publish",  # commit part temp fsync'ed, not yet under its name
    "after_fsync",  # commit part published and its folder fsync'ed: the rows exist
    # compaction (gc, or automatic when a writer closes)
    "compact_before_publish",  # new segment's chunks written, its commit part not yet
    "compact_after_publish",  # new segment published, old segments not yet removed
    "compact_mid_delete",  # some old segments removed, others not
    # merging a segment's commit parts into one
    "merge_after_publish",  # merged part published, the parts it covers not yet removed
)
ACTIONS = ("kill", "enospc", "eio")
_ERRNO = {"enospc": errno.ENOSPC, "eio": errno.EIO}


@dataclass(frozen=True)
class Fault:
    """A fault due now at ``point``."""

    point: str
    action: str = "kill"

    def strike(self) -> None:
        """Act at a point that writes nothing."""
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # does not return
            return
        if self.action in _ERRNO:
            code = _ERRNO[self.action]
            raise OSError(code, os.strerror(code))
        raise RuntimeError(f"internal error: fault action {self.action!r} has no strike")

    def write(self, fd: int, data: bytes) -> None:
        """Act in place of ``os.write(fd, data)``."""
        os.write(fd, data[: len(data) // 2])  # a torn (short) write, then the fault
        self.strike()


@dataclass(frozen=True)
class PutFaults:
    """The fault points of one atomic file write (names from POINTS, None = not a point)."""

    mid_write: str | None = None  # the temp file is half written
    before_fsync: str | None = None  # the temp file is written, not fsync'ed
    before_publish: str | None = None  # fsync'ed, not yet renamed / linked under its name
    after_publish: str | None = None  # under its name and the folder fsync'ed


class FaultPlan:
    """Which fault to inject where, parsed from the ``EMBEDSTORE_CRASH_AT`` syntax; counts visits
    (thread-safe: a writer's chunk files are written by a small thread pool)."""

    def __init__(self, spec: str | None):
        self.point: str | None = None
        self.nth = 1
        self.action = "kill"
        self._visits: dict[str, int] = {}
        self._guard = threading.Lock()
        if not spec:
            return
        point, _, rest = spec.partition(":")
        nth, _, action = rest.partition(":")
        if point not in POINTS:
            raise ConfigError(f"Unknown {ENV_VAR} point {point!r}. Valid: {list(POINTS)}.")
        try:
            self.nth = int(nth or 1)
        except ValueError:
            raise ConfigError(
                f"{ENV_VAR}={spec!r}: the count after ':' must be an integer (e.g. '{point}:2')."
            ) from None
        if action and action not in ACTIONS:
            raise ConfigError(
                f"{ENV_VAR}={spec!r}: unknown action {action!r}. Valid: {list(ACTIONS)}."
            )
        self.action = action or "kill"
        self.point = point

    def due(self, point: str) -> Fault | None:
        if point not in POINTS:  # a call site naming a point this module does not list
            raise RuntimeError(f"internal error: unknown fault point {point!r}")
        if point != self.point:
            return None
        with self._guard:
            self._visits[point] = self._visits.get(point, 0) + 1
            due = self._visits[point] >= self.nth
        return Fault(point, self.action) if due else None


_SPEC = os.environ.get(ENV_VAR)  # read once, when the store is imported
_plan: FaultPlan | None = None


def fault_due(point: str) -> Fault | None:
    """The fault to inject at ``point`` now, or None (always None unless the env var is set)."""
    global _plan
    if _SPEC is None:
        return None
    if _plan is None:
        _plan = FaultPlan(_SPEC)  # parsed on first use so a typo is a ConfigError, not an ImportError
    return _plan.due(point)


def fault_point(point: str | None) -> None:
    """Mark a point of the write path; a due fault strikes here."""
    if point is None:
        return
    fault = fault_due(point)
    if fault is not None:
        fault.strike()


def fault_write(fd: int, data, point: str | None) -> None:
    """Write all of ``data`` to ``fd`` (looping over short writes), unless a fault is due at
    ``point``: then the fault does the write."""
    fault = None if point is None else fault_due(point)
    if fault is not None:
        try:
            fault.write(fd, bytes(data))
        except OSError as e:
            raise OSError(e.errno, e.strerror, _fd_path(fd)) from None
        return
    view = memoryview(data).cast("B")
    try:
        while view:
            n = os.write(fd, view)
            if n <= 0:  # never for a regular file; guards an infinite loop
                raise OSError(errno.EIO, f"write returned {n}")
            view = view[n:]
    except OSError as e:
        if e.filename is None:  # os.write names no file: name it, so the user knows what to free
            raise OSError(e.errno, e.strerror, _fd_path(fd)) from e
        raise


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
