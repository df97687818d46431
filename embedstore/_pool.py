"""The decode worker pool of extraction (parent side; the worker side is ``_decode.py``).

Why not ``ProcessPoolExecutor``: when one of its workers dies it breaks the whole pool and
cannot say which task killed it. Here each worker holds at most one study and the parent knows
which, so a death (OOM killer, a segfault in a decoder) quarantines exactly that study as a
``worker_died`` failure and a fresh worker takes the dead one's place.

* Workers are ``spawn``ed (torch is imported in the parent: never fork it) right when the pool
  is made, so their imports overlap the parent's encoder loading.
* At most ``max_in_flight`` studies are between submission and the consumer; results come back
  in submission order.
* Memory: before it allocates, a worker asks for the bytes its study needs (decode +
  preprocessing, from the headers). The pool grants them while the grants outstanding plus the
  decoded arrays waiting for the encoder stay within ``budget`` (``--max-memory``), and always
  when nothing else is granted, so a study no larger than the budget always makes progress.
* Lifetime: workers die with the parent (``PR_SET_PDEATHSIG``, EOF on their pipe) and ignore
  SIGINT/SIGTERM; ``close`` stops them, ``kill=True`` at once. The multiprocessing resource
  tracker that ``spawn`` starts holds nothing of ours and exits when its last holder (the
  parent and the workers, which inherit its pipe) is gone.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from typing import Any

from embedstore import _decode
from embedstore.errors import EmbedstoreError

__all__ = ["DecodePool"]

# Each worker decodes on one core: its numerical libraries must not start a thread per core.
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_MAX_START_FAILURES = 3  # workers dying before they are ready, in a row: give up


@dataclass
class _Worker:
    proc: Any
    conn: Connection
    ready: bool = False
    task: int | None = None
    need: int | None = None  # bytes asked for and not granted yet
    granted: int = 0


@dataclass
class _State:
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    held: int = 0  # bytes of decoded arrays received and not released by the consumer


@contextlib.contextmanager
def _worker_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _WORKER_ENV}
    os.environ.update(_WORKER_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _exit_text(code: int | None) -> str:
    if code is None:
        return "an unknown cause"
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class DecodePool:
    """``n`` spawned decode workers, one study each, results in submission order."""

    def __init__(self, n: int, init: dict[str, Any], *, budget: int, max_in_flight: int):
        self._ctx = get_context("spawn")
        self._init = init
        self.budget = int(budget)
        self.max_in_flight = max(1, int(max_in_flight))
        self._workers: list[_Worker] = []
        self._start_failures = 0
        self.deaths = 0
        self._state = _State()
        for _ in range(max(1, n)):
            self._spawn()

    # -- workers --------------------------------------------------------------------------
    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_decode.worker_main, args=(child, os.getpid(), self._init),
                                 daemon=True, name="embedstore-decode")
        with _worker_env():
            proc.start()
        child.close()  # the worker holds the only other end: its death is EOF here
        self._workers.append(_Worker(proc, parent))

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    def _died(self, w: _Worker) -> None:
        """Record the death of ``w``: quarantine its study, free its memory, replace it."""
        w.proc.join(timeout=1.0)
        code = w.proc.exitcode
        with contextlib.suppress(OSError):
            w.conn.close()
        self._workers.remove(w)
        self.deaths += 1
        if w.task is not None:
            self._state.results[w.task] = {
                "status": "failed", "reason": "worker_died", "stage": "decode",
                "message": f"the decode worker died ({_exit_text(code)}) while decoding this "
                "study (out of memory, or a crash in a decoder); it is quarantined: re-runs "
                "skip it unless `extract --retry-failed`",
            }
        elif not w.ready:
            self._start_failures += 1
            if self._start_failures >= _MAX_START_FAILURES:
                raise EmbedstoreError(
                    f"Decode workers die while starting ({_exit_text(code)}, "
                    f"{self._start_failures} times in a row); run with --workers 0 to see the "
                    "error in this process.", reason="worker_start_failed")
        self._spawn()

    # -- memory ---------------------------------------------------------------------------
    def release(self, nbytes: int) -> None:
        """The consumer is done with a result's array of ``nbytes``."""
        self._state.held = max(0, self._state.held - int(nbytes))

    def _grant(self) -> None:
        waiting = sorted((w for w in self._workers if w.need is not None),
                         key=lambda w: w.task if w.task is not None else -1)
        for w in waiting:
            granted = sum(x.granted for x in self._workers)
            need = int(w.need or 0)
            if granted == 0 or granted + self._state.held + need <= self.budget:
                try:
                    w.conn.send(("grant", w.task))
                except OSError:
                    continue  # it died: its sentinel reports it
                w.granted, w.need = need, None

    # -- the loop -------------------------------------------------------------------------
    def map(
        self, tasks: list[tuple[str, str, str]], should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[dict[str, Any]]:
        """Results of ``_decode.prepare(*task)`` in task order; stops early when
        ``should_stop()`` turns true (checked at least every 0.2 s)."""
        st = self._state
        submitted = 0
        for nxt in range(len(tasks)):
            while nxt not in st.results:
                if should_stop():
                    return
                for w in self._workers:
                    if (w.ready and w.task is None and submitted < len(tasks)
                            and submitted - nxt < self.max_in_flight):
                        try:
                            w.conn.send(("task", submitted, *tasks[submitted]))
                        except OSError:
                            continue
                        w.task = submitted
                        submitted += 1
                self._grant()
                self._poll(0.2)
            res = st.results.pop(nxt)
            res.setdefault("study_id", tasks[nxt][0])
            yield res

    def _poll(self, timeout: float) -> None:
        by_handle: dict[Any, _Worker] = {}
        for w in self._workers:
            by_handle[w.conn] = w
            by_handle[w.proc.sentinel] = w
        ready = wait(list(by_handle), timeout=timeout)
        dead: list[_Worker] = []
        for h in ready:
            w = by_handle[h]
            if h is w.conn:
                if not self._drain(w) and w not in dead:
                    dead.append(w)
            elif w not in dead:
                self._drain(w)  # a result sent just before it exited still counts
                dead.append(w)
        for w in dead:
            if w in self._workers:
                self._died(w)

    def _drain(self, w: _Worker) -> bool:
        """Read every message waiting from ``w``; False when its pipe is closed."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                kind = msg[0]
                if kind == "ready":
                    w.ready = True
                    self._start_failures = 0
                elif kind == "need":
                    w.need = int(msg[2])
                elif kind == "result":
                    res = msg[2]
                    arr = res.get("array")
                    self._state.held += int(getattr(arr, "nbytes", 0))
                    self._state.results[msg[1]] = res
                    w.task, w.granted, w.need = None, 0, None
        except (EOFError, OSError):
            return False
        return True

    def close(self, *, kill: bool = False) -> None:
        """Stop every worker (``kill``: at once, without letting a study finish)."""
        for w in self._workers:
            if not kill:
                with contextlib.suppress(OSError):
                    w.conn.send(None)
            else:
                with contextlib.suppress(OSError, ValueError):
                    w.proc.kill()
        deadline = time.monotonic() + (0.5 if kill else 5.0)
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.proc.exitcode is None:
                with contextlib.suppress(OSError, ValueError):
                    w.proc.kill()
                w.proc.join(timeout=1.0)
            with contextlib.suppress(OSError):
                w.conn.close()
        self._workers.clear()
