"""Advisory writer locks (flock on ``STORE/locks/*.lock``); docs/STORE_FORMAT.md, "Locks"."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
from pathlib import Path

from embedstore.errors import ConfigError, StoreLockedError
from embedstore.store.format import LOCKS_DIR, NAME_RE, iso, utcnow


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HELD: dict[tuple[str, str], list] = {}  # (root, lock name) -> [fd, refcount, mode]
_HELD_GUARD = threading.Lock()


class Lock:
    """Advisory flock locks. Scope None: exclusive on the whole store. A named scope (e.g.
    "shard-1-of-2"): shared on the store + exclusive on the scope, so shards coexist but a
    whole-store writer (or gc) excludes them all. Re-entrant within one process."""

    def __init__(self, root: Path, scope: str | None):
        if scope is not None and not NAME_RE.match(scope):
            raise ConfigError(
                f"Invalid lock scope {scope!r}: use letters, digits and . _ - (e.g. 'shard-1-of-4')."
            )
        self.root = root
        self.scope = scope
        self._taken: list[str] = []

    def _path(self, name: str) -> Path:
        return self.root / LOCKS_DIR / f"{name}.lock"

    def acquire(self) -> Lock:
        (self.root / LOCKS_DIR).mkdir(exist_ok=True)
        if self.scope is None:
            self._take("store", fcntl.LOCK_EX)
        else:
            self._take("store", fcntl.LOCK_SH)
            try:
                self._take(f"scope-{self.scope}", fcntl.LOCK_EX)
            except BaseException:
                self.release()
                raise
        return self

    def _take(self, name: str, mode: int) -> None:
        key = (str(self.root), name)
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                if mode == fcntl.LOCK_EX and held[2] != fcntl.LOCK_EX:
                    raise StoreLockedError(
                        f"This process already writes to store {str(self.root)!r} under a shard "
                        "scope; close that writer before opening a whole-store writer or gc."
                    )
                held[1] += 1
                self._taken.append(name)
                return
            fd = os.open(self._path(name), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError as e:
                os.close(fd)
                raise StoreLockedError(self._locked_message()) from e
            if mode == fcntl.LOCK_EX:
                info = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": iso(utcnow()),
                    "scope": self.scope or "store",
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            _HELD[key] = [fd, 1, mode]
            self._taken.append(name)

    def _locked_message(self) -> str:
        holders = []
        host = socket.gethostname()
        for p in sorted((self.root / LOCKS_DIR).glob("*.lock")):
            try:
                info = json.loads(p.read_text() or "{}")
            except (OSError, ValueError):
                continue
            pid = info.get("pid")
            if not isinstance(pid, int) or pid == os.getpid():
                continue
            if info.get("host") == host and not pid_alive(pid):
                continue
            holders.append(
                f"PID {pid} on {info.get('host')} since {info.get('since')} "
                f"(scope {info.get('scope')!r})"
            )
        who = "; ".join(holders) if holders else "another process"
        what = "the whole store" if self.scope is None else f"scope {self.scope!r}"
        return (
            f"Store {str(self.root)!r} is locked for writing ({what} requested): held by {who}. "
            "Wait for it to finish or, if that process is gone, stop its leftover child processes "
            "(they inherit the lock); flock locks are released when the last holder exits. "
            "Parallel extraction must use distinct lock scopes (--shard K/N)."
        )

    def release(self) -> None:
        with _HELD_GUARD:
            for name in reversed(self._taken):
                key = (str(self.root), name)
                held = _HELD.get(key)
                if held is None:
                    continue
                held[1] -= 1
                if held[1] == 0:
                    fcntl.flock(held[0], fcntl.LOCK_UN)
                    os.close(held[0])
                    del _HELD[key]
            self._taken.clear()
