"""TEST-ONLY fault injection: the one module that makes embedstore misbehave on purpose.

Production code only marks where faults can strike; nothing happens unless one of two environment
variables is set, which only tests do, in the subprocesses they start (docs/RELIABILITY.md lists
every fault and the test that injects it).

1. Write-path faults, at named points of the store's writes (tests/test_faults_store.py,
   tests/test_store_crash.py): ``fault_point("before_fsync")``, or ``fault_write(fd, data,
   "mid_commit")`` where a write can be cut short::

       EMBEDSTORE_CRASH_AT="<point>[:<nth>][@<action>]"

   injects a fault the nth time (default 1) the process reaches <point>, and every time after.
   Actions: ``kill`` (default): SIGKILL, no cleanup, exactly as `kill -9` would; at a write point
   the first half of the data is written first (a torn write). ``short``: at a write point, only
   half the data is written and the write returns as if it had succeeded (a lying short write;
   the writer's length check must catch it). ``enospc`` / ``eio``: the write or the point raises
   ``OSError`` with that errno (a full disk, a failing device). Another kind of fault is one more
   entry in ``ACTIONS`` plus its branch in ``Fault.strike`` / ``Fault.write``.

2. Decode-worker faults (tests/test_extract_faults.py)::

       EMBEDSTORE_TEST_FAULT="<kind>:<study_id>[,<kind>:<study_id>...]"

   makes a decode worker misbehave when it starts on that study:

     exit   ``os._exit(137)``, as a worker killed by the OOM killer looks to its parent
     segv   SIGSEGV to itself, as a crash inside a C decoder
     hog    allocate 8 GiB in 64 MiB blocks, untouched (address space, not RSS): the worker's
            memory backstop must turn it into a MemoryError; without one it simply succeeds
     hang   sleep for an hour (a decoder stuck in a loop); first creates the file named by
            ``EMBEDSTORE_TEST_FAULT_MARK`` if set, so a test knows the worker got there

   The variable is read when the worker reaches a study, so a test sets it in the environment of
   the process that starts the workers; ``maybe_fault`` returns at once when it is unset.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass

from embedstore.errors import ConfigError

__all__ = ["ACTIONS", "ENV", "ENV_VAR", "MARK_ENV", "POINTS", "Fault", "FaultPlan", "PutFaults",
           "fault_due", "fault_point", "fault_write", "maybe_fault"]

# ------------------------------------------------------------------ 1. write-path faults
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
ACTIONS = ("kill", "short", "enospc", "eio")
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
        if self.action == "short":
            return  # nothing is written at a point that writes nothing
        raise RuntimeError(f"internal error: fault action {self.action!r} has no strike")

    def write(self, fd: int, data: bytes) -> None:
        """Act in place of ``os.write(fd, data)``."""
        if self.action in ("kill", "short"):
            os.write(fd, data[: len(data) // 2])  # a torn write, then the kill (or nothing)
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
        spec, _, action = spec.partition("@")
        if action:
            if action not in ACTIONS:
                raise ConfigError(f"Unknown {ENV_VAR} action {action!r}. Valid: {list(ACTIONS)}.")
            self.action = action
        point, _, nth = spec.partition(":")
        if point not in POINTS:
            raise ConfigError(f"Unknown {ENV_VAR} point {point!r}. Valid: {list(POINTS)}.")
        try:
            self.nth = int(nth or 1)
        except ValueError:
            raise ConfigError(
                f"{ENV_VAR}={spec!r}: the count after ':' must be an integer (e.g. '{point}:2')."
            ) from None
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
        fault.write(fd, bytes(data))
        return
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:  # never for a regular file; guards an infinite loop
            raise OSError(f"write returned {n}")
        view = view[n:]


# ------------------------------------------------------------------ 2. decode-worker faults
ENV = "EMBEDSTORE_TEST_FAULT"
MARK_ENV = "EMBEDSTORE_TEST_FAULT_MARK"


def _faults() -> dict[str, str]:
    spec = os.environ.get(ENV, "")
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        kind, _, study = item.partition(":")
        out[study] = kind
    return out


def maybe_fault(study_id: str) -> None:
    """Misbehave as told for ``study_id``; a no-op unless the test variable names it."""
    if ENV not in os.environ:
        return
    kind = _faults().get(study_id)
    if kind == "exit":
        os._exit(137)
    elif kind == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(10)  # the signal is delivered asynchronously
    elif kind == "hog":
        import numpy as np

        blocks = [np.empty(64 << 20, dtype=np.uint8) for _ in range(128)]  # noqa: F841
    elif kind == "hang":
        mark = os.environ.get(MARK_ENV)
        if mark:
            with open(mark, "w") as f:
                f.write(str(os.getpid()))
        time.sleep(3600)
