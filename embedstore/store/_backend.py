"""The few file operations the store's data path needs, behind one small interface.

Everything below ``sets/`` and ``failures/`` (chunk files, Zarr metadata, commit parts, segment
and set documents) is written and read through a ``Backend``, addressed by keys relative to the
store root with ``/`` separators (``sets/CXR/k/seg-.../commits/00000000-00000000.parquet``).
The operations are the ones an object store also has, so an fsspec / ``s3://`` backend is one
more class:

    put(key, data)        atomic whole-object write, replacing any old version: a reader sees the
                          old bytes or the new ones, never a mix (local: temp + fsync + rename;
                          an object store's PUT is atomic by itself)
    put_once(key, data)   the same for write-once names: refused if the key exists (local: temp +
                          fsync + link, which cannot overwrite; object stores: a conditional PUT
                          with If-None-Match)
    open_write(key)       a file to stream a large object into; published like put_once when
                          the block ends without an error (object stores: a multipart upload,
                          completed only then)
    read / read_into      whole object / a byte range into a caller's buffer
    list(prefix)          child names under a "folder" (sorted; [] when there is none)
    exists / size / delete / delete_tree
    sync_dir(prefix)      make the renames in a folder durable (local: fsync the folder; object
                          stores: nothing to do)

The store never renames a folder and never appends to a file through this interface, since
object stores can do neither: a segment is published by its commit parts, not by a rename
(docs/STORE_FORMAT.md, "Write protocol"). Locks, ``store.json``, the attached manifest and run
folders still use the local file system directly.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol

from embedstore._faults import PutFaults, fault_point, fault_write
from embedstore.errors import DISK_ERRNOS, DiskWriteError, disk_write_error

__all__ = ["Backend", "LocalBackend", "TEMP_SUFFIX"]

# Temp files of atomic writes end with this; a killed writer's leftovers are swept by name.
TEMP_SUFFIX = ".partial"

Buffer = bytes | bytearray | memoryview
_NO_FAULTS = PutFaults()


class Backend(Protocol):
    """What the store needs from where its files live (keys are relative, ``/``-separated)."""

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, size: int | None = None,
            durable: bool = True, sync_dir: bool = True, faults: PutFaults = _NO_FAULTS) -> None:
        """Write ``data`` as the whole object ``key`` (zero-padded to ``size`` bytes when given),
        atomically; ``durable``: on stable storage before returning (``sync_dir=False`` leaves
        the folder entry to one later ``sync_dir`` call for a batch of puts)."""
        ...

    def put_once(self, key: str, data: Buffer, *, durable: bool = True,
                 faults: PutFaults = _NO_FAULTS) -> None:
        """``put`` for a write-once name; FileExistsError when ``key`` exists."""
        ...

    def open_write(self, key: str, *, faults: PutFaults = _NO_FAULTS
                   ) -> contextlib.AbstractContextManager[BinaryIO]:
        """A binary file to stream the write-once object ``key`` into; published (durably) when
        the block ends without an error, discarded otherwise."""
        ...

    def read(self, key: str) -> bytes: ...

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from byte ``offset`` of ``key``; returns the bytes read (short at the end)."""
        ...

    def list(self, prefix: str) -> list[str]: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def delete_tree(self, prefix: str) -> None: ...

    def sync_dir(self, prefix: str) -> None: ...

    def local_path(self, key: str) -> str:
        """A path pyarrow and DuckDB can open (an fsspec backend returns its URL instead)."""
        ...


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _disk_errors(path: str) -> Iterator[None]:
    """A full disk or a failing device while writing ``path`` -> one typed error naming it."""
    try:
        yield
    except DiskWriteError:
        raise
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_write_error(e, path) from e
        raise


class LocalBackend:
    """A store on a local (POSIX) file system."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._root = str(self.root)

    def __repr__(self) -> str:
        return f"LocalBackend({self._root!r})"

    def _path(self, key: str) -> str:
        return os.path.join(self._root, key) if key else self._root

    def local_path(self, key: str) -> str:
        return self._path(key)

    def _write_temp(self, path: str, data: Buffer | Sequence[Buffer], size: int | None,
                    durable: bool, faults: PutFaults) -> str:
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            expected = 0
            for i, part in enumerate(parts):
                fault_write(fd, part, faults.mid_write if i == 0 else None)
                expected += memoryview(part).nbytes
            written = os.fstat(fd).st_size
            if written != expected:  # a short write that did not say so: never publish it
                raise OSError(errno.EIO, f"short write ({written} of {expected} bytes reached "
                              "the disk)", tmp)
            if size is not None:
                os.ftruncate(fd, size)  # zero padding; a hole on file systems that have them
            fault_point(faults.before_fsync)
            if durable:
                os.fsync(fd)  # an fsync error (EIO) is a failed write, never a published one
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        try:
            fault_point(faults.before_publish)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, size: int | None = None,
            durable: bool = True, sync_dir: bool = True, faults: PutFaults = _NO_FAULTS) -> None:
        path = self._path(key)
        with _disk_errors(path):
            tmp = self._write_temp(path, data, size, durable, faults)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink(tmp)
                raise
            if durable and sync_dir:
                _fsync_dir(os.path.dirname(path))
        fault_point(faults.after_publish)

    def put_once(self, key: str, data: Buffer, *, durable: bool = True,
                 faults: PutFaults = _NO_FAULTS) -> None:
        path = self._path(key)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "write-once object exists", path)
        with _disk_errors(path):
            tmp = self._write_temp(path, data, None, durable, faults)
            try:
                os.link(tmp, path)  # unlike rename, a link never replaces an existing name
            finally:
                _unlink(tmp)
            if durable:
                _fsync_dir(os.path.dirname(path))
        fault_point(faults.after_publish)

    @contextmanager
    def open_write(self, key: str, *, faults: PutFaults = _NO_FAULTS) -> Iterator[BinaryIO]:
        path = self._path(key)
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "write-once object exists", path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        with _disk_errors(path):
            try:
                with open(tmp, "xb") as f:
                    yield f
                    f.flush()
                    fault_point(faults.before_fsync)
                    os.fsync(f.fileno())
                fault_point(faults.before_publish)
                os.link(tmp, path)
            finally:
                _unlink(tmp)
        _fsync_dir(os.path.dirname(path))
        fault_point(faults.after_publish)

    def read(self, key: str) -> bytes:
        with open(self._path(key), "rb") as f:
            return f.read()

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        fd = os.open(self._path(key), os.O_RDONLY)
        try:
            got = 0
            while got < len(buf):
                n = os.preadv(fd, [buf[got:]], offset + got)
                if n == 0:
                    break
                got += n
            return got
        finally:
            os.close(fd)

    def list(self, prefix: str) -> list[str]:
        try:
            return sorted(os.listdir(self._path(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self, key: str) -> bool:
        return os.path.exists(self._path(key))

    def size(self, key: str) -> int:
        return os.stat(self._path(key)).st_size

    def delete(self, key: str) -> None:
        _unlink(self._path(key))

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def sync_dir(self, prefix: str) -> None:
        _fsync_dir(self._path(prefix))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
