"""Private Zarr v3 backend: arrays chunked along rows only, raw little-endian chunks.

The arrays are ordinary Zarr v3 arrays (``zarr.open_array`` reads them), created through zarr
itself. Because the layout is fixed here -- regular grid chunked on the first axis only, the
``bytes`` codec and nothing else (no compression, no sharding), ``default`` chunk keys with a
``.`` separator so every chunk file of an array lives in one folder -- a chunk file is exactly
``chunk_rows * row_bytes`` bytes and we can read and write it directly. That is ~10x faster than
going through zarr's async codec pipeline for whole-array reads (measured in
benchmarks/bench_store.py) and lets the writer fsync chunk files, which zarr does not do.

Chunk writes use zarr's own temp-file convention (``<key>.<hex>.partial`` then rename), so a
chunk is whole or absent and `sweep_partials` can remove what a killed writer left behind.
Arrays with any other layout are still read, through zarr.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import StoreCorruptError, StoreFormatError

__all__ = ["RowArray", "sweep_partials", "chunk_rows_for"]

_CHUNK_TARGET_BYTES = 1 << 20  # ~1 MiB chunks: few files, cheap partial-chunk rewrites


def chunk_rows_for(row_bytes: int) -> int:
    """Rows per chunk so that a chunk holds about 1 MiB (a power of two in [1, 4096])."""
    rows = max(1, _CHUNK_TARGET_BYTES // max(1, row_bytes))
    p = 1
    while p * 2 <= min(rows, 4096):
        p *= 2
    return p


def sweep_partials(root: Path, *, dry_run: bool = False) -> list[Path]:
    """Find (and unless dry_run, delete) orphaned ``*.partial`` temp files below root."""
    found = sorted(p for p in root.rglob("*.partial") if p.is_file())
    if not dry_run:
        for p in found:
            p.unlink(missing_ok=True)
    return found


class RowArray:
    """A Zarr v3 array of shape (capacity, *row_shape) chunked along rows only."""

    def __init__(self, path: Path, meta: dict):
        self.path = Path(path)
        self._meta = meta
        self.shape: tuple[int, ...] = tuple(int(s) for s in meta["shape"])
        self.row_shape: tuple[int, ...] = self.shape[1:]
        self.dtype = np.dtype(meta["data_type"])
        chunk = tuple(int(c) for c in meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.chunk_rows = chunk[0]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        cke = meta.get("chunk_key_encoding", {})
        sep = cke.get("configuration", {}).get("separator", "/")
        codecs = meta.get("codecs", [])
        self.fast = (
            chunk[1:] == self.row_shape
            and cke.get("name") == "default"
            and sep == "."
            and len(codecs) == 1
            and codecs[0].get("name") == "bytes"
            and codecs[0].get("configuration", {}).get("endian", "little") == "little"
            and not meta.get("storage_transformers")
        )
        self._zarr = None  # lazily opened zarr array for layouts we do not read directly

    # -- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        *,
        row_shape: Sequence[int],
        dtype: str,
        capacity: int,
        chunk_rows: int | None = None,
    ) -> RowArray:
        import zarr  # imported lazily: readers never need it

        row_shape = tuple(int(s) for s in row_shape)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = chunk_rows or chunk_rows_for(row_bytes)
        capacity = max(rows, -(-int(capacity) // rows) * rows)
        zarr.create_array(
            str(path),
            shape=(capacity, *row_shape),
            chunks=(rows, *row_shape),
            dtype=dtype,
            fill_value=0,
            compressors=None,
            filters=None,
            chunk_key_encoding={"name": "default", "separator": "."},
            zarr_format=3,
        )
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> RowArray:
        meta_path = Path(path) / "zarr.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError as e:
            raise StoreCorruptError(
                f"Zarr array metadata {str(meta_path)!r} is missing; run `embedstore verify`.",
            ) from e
        except (OSError, json.JSONDecodeError) as e:
            raise StoreCorruptError(
                f"Zarr array metadata {str(meta_path)!r} is unreadable ({e}); run `embedstore verify`."
            ) from e
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise StoreFormatError(f"{str(path)!r} is not a Zarr v3 array (zarr_format 3 expected).")
        return cls(Path(path), meta)

    def resize(self, capacity: int) -> None:
        """Change the number of rows: rewrite zarr.json atomically and durably, since rows
        committed beyond the old shape would otherwise be lost with it (chunk files are
        untouched; callers never shrink below a written chunk)."""
        self._meta["shape"] = [int(capacity), *self.row_shape]
        self.shape = (int(capacity), *self.row_shape)
        # A `.partial` temp, like chunk writes, so the sweep of a killed writer removes it.
        atomic_write_bytes(
            self.path / "zarr.json", json.dumps(self._meta, indent=2).encode(), tmp_suffix=".partial"
        )

    # -- chunk files --------------------------------------------------------------------------
    def chunk_path(self, i: int) -> Path:
        return self.path / ".".join(["c", str(i)] + ["0"] * len(self.row_shape))

    def n_chunks(self, rows: int | None = None) -> int:
        return -(-(self.shape[0] if rows is None else rows) // self.chunk_rows)

    def write_chunk(self, i: int, data: np.ndarray, *, fsync: bool = True, before_rename=None) -> None:
        """Atomically write chunk i from ``data`` (<= chunk_rows rows; the rest is fill value)."""
        if not self.fast:
            raise StoreFormatError(f"Array {str(self.path)!r} has a layout this writer does not write.")
        data = np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("<"))
        pad = (self.chunk_rows - data.shape[0]) * self.row_bytes  # edge chunks are stored whole
        dst = self.chunk_path(i)
        tmp = dst.with_name(f"{dst.name}.{uuid.uuid4().hex}.partial")
        with open(tmp, "wb") as f:
            f.write(memoryview(data.reshape(-1).view(np.uint8)))
            if pad:
                f.write(bytes(pad))
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, dst)

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) as an array of the stored dtype (into ``out`` when given).

        A chunk file that is absent or short raises StoreCorruptError: callers only read rows
        that a commit record says were written, so a missing chunk is damage, never fill value.
        """
        n = stop - start
        if out is None:
            out = np.empty((n, *self.row_shape), dtype=self.dtype)  # (n, *row)
        if n <= 0:
            return out
        if stop > self.shape[0]:
            raise StoreCorruptError(
                f"Rows [{start}, {stop}) lie beyond the array {str(self.path)!r} of {self.shape[0]} "
                "rows; run `embedstore verify`."
            )
        if not self.fast:
            if self._zarr is None:
                import zarr

                self._zarr = zarr.open_array(str(self.path), mode="r")
            out[...] = self._zarr[start:stop]
            return out
        view = memoryview(out.reshape(n, -1).view(np.uint8)).cast("B")
        rb, cr = self.row_bytes, self.chunk_rows
        r = start
        while r < stop:
            ci, within = divmod(r, cr)
            take = min(stop - r, cr - within)
            path = self.chunk_path(ci)
            try:
                with open(path, "rb", buffering=0) as f:
                    if within:
                        f.seek(within * rb)
                    got = f.readinto(view[(r - start) * rb : (r - start + take) * rb])
            except FileNotFoundError as e:
                raise StoreCorruptError(
                    f"Chunk file {str(path)!r} is missing but rows in it are committed; "
                    "run `embedstore verify` and re-extract the affected studies."
                ) from e
            if got != take * rb:
                raise StoreCorruptError(
                    f"Chunk file {str(path)!r} is truncated ({got} of {take * rb} bytes expected); "
                    "run `embedstore verify` and re-extract the affected studies."
                )
            r += take
        return out
