"""Crash-safe file writes: a temp file beside the target, fsync, rename over it, fsync the folder.

A reader (or a process started after a crash or power loss) then sees the old file or the new
one, never a mix. Temp names are ``<name>.<hex><tmp_suffix>`` in the target's folder, so the
rename never crosses a file system and leftovers are easy to find (gc removes ``*.tmp``; the
store's writers sweep ``*.partial``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from embedstore.errors import DISK_ERRNOS, DiskWriteError, disk_write_error

__all__ = ["atomic_path", "atomic_write_bytes", "fsync_dir", "fsync_file", "tree_size"]


def fsync_dir(path: Path) -> None:
    """fsync a directory so renames and new entries in it survive a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written (and closed) by someone else, e.g. by pyarrow."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_beside(path: Path, tmp_suffix: str) -> Path:
    return path.with_name(f"{path.name}.{uuid.uuid4().hex}{tmp_suffix}")


def atomic_write_bytes(
    path: Path, data: bytes, *, tmp_suffix: str = ".tmp", durable: bool = True
) -> None:
    """Replace ``path`` by ``data`` atomically. ``durable=False`` skips the fsyncs: still atomic
    against a killed process, for caches that a reader checks and rebuilds."""
    path = Path(path)
    tmp = _tmp_beside(path, tmp_suffix)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_ERRNOS and not isinstance(e, DiskWriteError):
            raise disk_write_error(e, path) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


@contextmanager
def atomic_path(path: Path, *, tmp_suffix: str = ".tmp", durable: bool = True) -> Iterator[Path]:
    """A temp path for a library that writes files itself (pyarrow, pydicom); when the block
    ends without an error the file is fsync'ed and renamed over ``path``, else removed."""
    path = Path(path)
    tmp = _tmp_beside(path, tmp_suffix)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.errno in DISK_ERRNOS and not isinstance(e, DiskWriteError):
            raise disk_write_error(e, path) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def tree_size(path: Path) -> int:
    """Bytes of every file below ``path`` (files vanishing meanwhile are skipped)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total
