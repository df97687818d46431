"""TEST-ONLY fault injection for the decode workers. Nothing in production sets it.

``EMBEDSTORE_TEST_FAULT="<kind>:<study_id>[,<kind>:<study_id>...]"`` makes a decode worker
misbehave when it starts on that study (tests/test_extract_faults.py):

  exit   ``os._exit(137)``, as a worker killed by the OOM killer looks to its parent
  segv   SIGSEGV to itself, as a crash inside a C decoder
  hog    allocate 8 GiB in 64 MiB blocks, untouched (address space, not RSS): the worker's
         memory backstop must turn it into a MemoryError; without one it simply succeeds
  hang   sleep for an hour (a decoder stuck in a loop); first creates the file named by
         ``EMBEDSTORE_TEST_FAULT_MARK`` if set, so a test knows the worker got there

The variable is read when the worker reaches a study, so a test sets it in the environment of
the process that starts the workers. It lives here, apart from the production constants, so
that no code path can reach it by accident: ``maybe_fault`` returns at once when it is unset.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV", "maybe_fault"]

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
