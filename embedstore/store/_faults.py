"""Test hook: faults injected at named points of the store's write path.

Production code only marks the points (``fault_point("before_fsync")``, or ``fault_write(fd,
data, "mid_commit")`` where a write can be cut short); nothing happens unless the environment
variable below is set, which only tests/test_store_crash.py does, in the subprocesses it kills.

    EMBEDSTORE_CRASH_AT="<point>[:<nth>]"

makes the process inject a fault the nth time (default 1) it reaches <point>. The fault today is
always ``kill``: SIGKILL, no cleanup, exactly as `kill -9` would; at a write point the first half
of the data is written first (a torn write). Another kind of fault is one more entry in
``ACTIONS`` plus its branch in ``Fault.strike`` / ``Fault.write``.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from embedstore.errors import ConfigError

__all__ = ["ENV_VAR", "POINTS", "ACTIONS", "Fault", "FaultPlan", "fault_due", "fault_point",
           "fault_write"]

ENV_VAR = "EMBEDSTORE_CRASH_AT"

# Where the writer can be hit, in the order a flush passes them (docs/STORE_FORMAT.md).
POINTS = (
    "before_chunk_write",
    "mid_chunk_write",  # chunk temp file written, not yet renamed into place
    "after_chunk_write",  # chunk files in place, no commit record yet
    "mid_commit",  # half the commit line written
    "before_fsync",  # commit line written, not fsync'ed
    "after_fsync",
)
ACTIONS = ("kill",)


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
        raise RuntimeError(f"internal error: fault action {self.action!r} has no strike")

    def write(self, fd: int, data: bytes) -> None:
        """Act in place of ``os.write(fd, data)``."""
        if self.action == "kill":
            os.write(fd, data[: len(data) // 2])  # a torn write, then the kill
        self.strike()


class FaultPlan:
    """Which fault to inject where, parsed from the ``EMBEDSTORE_CRASH_AT`` syntax; counts visits."""

    def __init__(self, spec: str | None):
        self.point: str | None = None
        self.nth = 1
        self.action = "kill"
        self._visits: dict[str, int] = {}
        if not spec:
            return
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
        self._visits[point] = self._visits.get(point, 0) + 1
        return Fault(point, self.action) if self._visits[point] >= self.nth else None


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


def fault_point(point: str) -> None:
    """Mark a point of the write path; a due fault strikes here."""
    fault = fault_due(point)
    if fault is not None:
        fault.strike()


def fault_write(fd: int, data: bytes, point: str) -> None:
    """``os.write(fd, data)``, unless a fault is due at ``point``: then the fault does the write."""
    fault = fault_due(point)
    if fault is None:
        os.write(fd, data)
    else:
        fault.write(fd, data)
