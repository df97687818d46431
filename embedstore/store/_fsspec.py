"""A ``Backend`` over any fsspec file system (``memory://``, ``s3://`` ...); docs/S3_PLAN.md.

Not wired into the store yet (locks, store creation and DuckDB still assume a local path).
``put`` is one whole-object write (a single PUT is atomic on S3). ``put_once`` and
``open_write`` check for the name first and then write: on a generic fsspec file system that
is a race between two writers of the same name (S3's ``If-None-Match`` PUT would close it;
not done yet). ``open_write`` buffers the object in memory and publishes it in one write only
when the block ends without an error, so a failed writer leaves nothing behind.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import BinaryIO

from embedstore._faults import PutFaults, fault_point
from embedstore.store._backend import Buffer

__all__ = ["FsspecBackend"]

_NO_FAULTS = PutFaults()


class FsspecBackend:
    """A store rooted at an fsspec URL."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self._root = fsspec.core.url_to_fs(self.url)
        self._root = self._root.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecBackend({self.url!r})"

    def _path(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    def local_path(self, key: str) -> str:
        return f"{self.url}/{key}" if key else self.url

    def put(self, key: str, data: Buffer | Sequence[Buffer], *, size: int | None = None,
            durable: bool = True, sync_dir: bool = True, faults: PutFaults = _NO_FAULTS) -> None:
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
        blob = b"".join(bytes(p) for p in parts)
        if size is not None:
            blob = blob[:size] + b"\0" * max(0, size - len(blob))
        fault_point(faults.before_publish)
        self.fs.pipe_file(self._path(key), blob)
        fault_point(faults.after_publish)

    def put_once(self, key: str, data: Buffer, *, durable: bool = True,
                 faults: PutFaults = _NO_FAULTS) -> None:
        if self.exists(key):
            raise FileExistsError(errno.EEXIST, "write-once object exists", self.local_path(key))
        self.put(key, data, faults=faults)

    @contextmanager
    def open_write(self, key: str, *, faults: PutFaults = _NO_FAULTS) -> Iterator[BinaryIO]:
        if self.exists(key):
            raise FileExistsError(errno.EEXIST, "write-once object exists", self.local_path(key))
        buf = io.BytesIO()
        yield buf
        self.put(key, buf.getbuffer(), faults=faults)

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        size = self.size(key)
        end = min(size, offset + len(buf))
        if end <= offset:
            return 0
        got = self.fs.cat_file(self._path(key), start=offset, end=end)
        buf[: len(got)] = got
        return len(got)

    def list(self, prefix: str) -> list[str]:
        path = self._path(prefix)
        try:
            if not self.fs.isdir(path):
                return []
            names = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def delete(self, key: str) -> None:
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def delete_tree(self, prefix: str) -> None:
        try:
            self.fs.rm(self._path(prefix), recursive=True)
        except FileNotFoundError:
            pass

    def sync_dir(self, prefix: str) -> None:
        """Nothing to do: an object store has no folder entries to make durable."""
