"""Decode-worker side of extraction. Kept apart from extract.py so that spawned workers import
only the DICOM and preprocessing layers, not the store, the catalog or the encoders (and, for
CT, not torch: 0.7 GB of RSS per worker).

A worker (``worker_main``) serves one study at a time over its own pipe to the parent
(``embedstore/_pool.py``):

    parent -> worker   ("task", task_id, study_id, path, modality) | ("grant", task_id) | None
    worker -> parent   ("ready", pid) | ("need", task_id, nbytes) | ("result", task_id, dict)

It dies with its parent (``PR_SET_PDEATHSIG``, and EOF on the pipe), leaves SIGINT/SIGTERM to the
parent, asks the parent for the memory a study needs before it allocates it, and runs each
study under an ``RLIMIT_DATA`` backstop so that a decoder using far more than the headers
declare gets a MemoryError (reason ``out_of_memory``) instead of the machine's OOM killer.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from embedstore import _faults
from embedstore.dicom import DEFAULT_MAX_BYTES, MemoryGate
from embedstore.errors import DicomError, EmbedstoreError
from embedstore.preprocess import PreprocessSpec, load_study

_SPEC: list[PreprocessSpec] = []
_OPTIONS: dict[str, Any] = {"missing_rescale": "refuse", "budget": None}

_PR_SET_PDEATHSIG = 1
#: Address space a study may use before its memory is granted (headers, compressed bytes).
_PRE_GRANT = DEFAULT_MAX_BYTES + (512 << 20)
_SLACK = 256 << 20


def init_worker(
    spec: dict[str, Any],
    threads: int = 1,
    *,
    missing_rescale: str = "refuse",
    budget: int | None = None,
) -> None:
    _SPEC[:] = [PreprocessSpec.from_dict(spec)]
    _OPTIONS.update(missing_rescale=missing_rescale, budget=budget)
    if _SPEC[0].modality == "CXR" or "torch" in sys.modules:
        import torch  # radiographs are resized with torch: load it now, not inside a study

        torch.set_num_threads(threads)  # decode workers must not oversubscribe the cores


def warm_up() -> bool:
    """A no-op task (kept for callers that pre-start a pool)."""
    return True


def prepare(study_id: str, path: str, modality: str, gate: MemoryGate | None = None
            ) -> dict[str, Any]:
    """Read, validate, hash and preprocess one study; failures come back as data, not raises."""
    if gate is None:
        gate = MemoryGate()
        gate.budget = _OPTIONS["budget"]
    try:
        _faults.maybe_fault(study_id)
        loaded = load_study(path, modality, _SPEC[0], missing_rescale=_OPTIONS["missing_rescale"],
                            gate=gate)
        return {"study_id": study_id, "status": "ok", "content_hash": loaded.content_hash,
                "array": loaded.array}
    except (DicomError, EmbedstoreError) as e:
        return {"study_id": study_id, "status": "failed", "reason": e.reason, "message": str(e)}
    except MemoryError:
        return {"study_id": study_id, "status": "failed", "reason": "out_of_memory",
                "message": f"study {study_id}: decoding needed more memory than its headers "
                "declare (the worker's memory backstop stopped it); the file may be damaged or "
                "crafted, or its decoder faulty"}
    except (OSError, ValueError) as e:
        # Anything the reader did not classify: keep going, and say which stage and type.
        return {"study_id": study_id, "status": "failed", "reason": "read_error",
                "message": f"{type(e).__name__} while reading the study"}


# ---------------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _vm_data() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _set_backstop(extra: int | None) -> None:
    """Soft RLIMIT_DATA = what is mapped now + ``extra`` (None: back to the hard limit)."""
    if not hasattr(resource, "RLIMIT_DATA"):
        return
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    soft = hard if extra is None else _vm_data() + extra
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
    except (ValueError, OSError):
        pass


class _PipeGate(MemoryGate):
    """Asks the parent for a study's memory over the pipe and waits for the grant."""

    def __init__(self, conn: Connection, task_id: int, budget: int | None):
        self.conn, self.task_id, self.budget = conn, task_id, budget

    def acquire(self, nbytes: int) -> None:
        self.conn.send(("need", self.task_id, int(nbytes)))
        msg = _recv(self.conn)
        if msg != ("grant", self.task_id):
            raise RuntimeError(f"decode worker: expected a grant, got {msg!r}")
        # a study may use twice what its headers declare before the backstop stops it
        _set_backstop(max(_PRE_GRANT, 2 * int(nbytes) + _SLACK))


def _recv(conn: Connection) -> Any:
    try:
        return conn.recv()
    except (EOFError, OSError):
        os._exit(0)  # the parent is gone


def worker_main(conn: Connection, parent_pid: int, init: dict[str, Any]) -> None:
    """Serve studies until the parent says stop (None) or goes away (EOF)."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group and a scheduler's SIGTERM may too: the parent
    # decides how to stop (it kills its workers); a worker dying of them would look like a
    # poison study.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    init_worker(**init)
    conn.send(("ready", os.getpid()))
    while True:
        msg = _recv(conn)
        if msg is None:
            return
        _, task_id, study_id, path, modality = msg
        gate = _PipeGate(conn, task_id, _OPTIONS["budget"])
        _set_backstop(_PRE_GRANT)
        try:
            res = prepare(study_id, path, modality, gate)
        finally:
            _set_backstop(None)
        conn.send(("result", task_id, res))
        del res
