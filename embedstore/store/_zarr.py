"""Private Zarr v3 backend: arrays chunked along rows only, raw little-endian chunks.

The arrays are ordinary Zarr v3 arrays (``zarr.open_array`` reads them). Their layout is fixed
here -- regular grid chunked on the first axis only, the ``bytes`` codec and nothing else (no
compression, no sharding), ``default`` chunk keys with a ``.`` separator so every chunk file of
an array lives in one folder -- so a chunk file is exactly ``chunk_rows * row_bytes`` bytes and
the store reads and writes it directly through its Backend: one positional read per run of
wanted rows (~10x faster than zarr's codec pipeline), fsync'ed atomic writes (which zarr does
not do), and no zarr import on the write or read path. ``zarr.json`` is written here too, as
zarr itself writes it. Arrays with any other layout are still read, through zarr.

Chunk writes are atomic (``Backend.put``: ``<key>.<hex>.partial`` then rename), so a chunk is
whole or absent and `sweep_partials` can remove what a killed writer left behind.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from embedstore._faults import PutFaults
from embedstore.errors import StoreCorruptError, StoreFormatError
from embedstore.statefile import read_json_state
from embedstore.store._backend import TEMP_SUFFIX, Backend, LocalBackend

__all__ = ["RowArray", "sweep_partials", "chunk_rows_for", "CHUNK_TARGET_BYTES"]

# ~8 MiB chunks: a flush writes a few whole chunk files, each fsync'ed once. fsync costs ~3-5 ms
# a file here, so 1 MiB chunks capped writes at ~0.2 GB/s against ~0.6 GB/s for one big file
# (benchmarks/bench_store.py). Edge chunks are sparse on disk (the padding is a hole).
CHUNK_TARGET_BYTES = 8 << 20
_MAX_CHUNK_ROWS = 16384
# A run of wanted rows read as one span when they fill at least this share of it; sparser rows
# are read run by run, so a load never reads more than ~1/0.85 = 1.18x the bytes it returns.
_DENSE = 0.85
_PIECE_ROWS_BYTES = 1 << 19  # scatter reads go through a ~512 KiB scratch buffer (cache-sized)
_PARALLEL_BYTES = 32 << 20  # loads at least this large read with _READ_THREADS threads
_READ_THREADS = 2
_POOL: ThreadPoolExecutor | None = None
_POOL_GUARD = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_GUARD:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="embedstore-read")
        return _POOL


def chunk_rows_for(row_bytes: int) -> int:
    """Rows per chunk so that a chunk holds about 8 MiB (a power of two in [1, 16384])."""
    rows = max(1, CHUNK_TARGET_BYTES // max(1, row_bytes))
    p = 1
    while p * 2 <= min(rows, _MAX_CHUNK_ROWS):
        p *= 2
    return p


def sweep_partials(root: Path, *, dry_run: bool = False) -> list[Path]:
    """Find (and unless dry_run, delete) orphaned ``*.partial`` temp files below root."""
    found = sorted(p for p in Path(root).rglob(f"*{TEMP_SUFFIX}") if p.is_file())
    if not dry_run:
        for p in found:
            p.unlink(missing_ok=True)
    return found


def _zarr_doc(shape: Sequence[int], chunk_rows: int, dtype: np.dtype) -> dict:
    """zarr.json exactly as zarr 3 writes it for this layout."""
    return {
        "shape": [int(s) for s in shape],
        "data_type": np.dtype(dtype).name,
        "chunk_grid": {"name": "regular",
                       "configuration": {"chunk_shape": [int(chunk_rows), *shape[1:]]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": 0.0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        "attributes": {},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


class RowArray:
    """A Zarr v3 array of shape (capacity, *row_shape) chunked along rows only."""

    def __init__(self, backend: Backend, key: str, meta: dict):
        self.backend = backend
        self.key = key
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
        self._suffix = ".0" * len(self.row_shape)
        self._zarr = None  # lazily opened zarr array for layouts we do not read directly

    @property
    def path(self) -> Path:
        return Path(self.backend.local_path(self.key))

    # -- creation / opening -------------------------------------------------------------------
    @classmethod
    def create(cls, backend: Backend, key: str, *, row_shape: Sequence[int], dtype: str,
               capacity: int, chunk_rows: int | None = None) -> RowArray:
        row_shape = tuple(int(s) for s in row_shape)
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        rows = chunk_rows or chunk_rows_for(row_bytes)
        capacity = max(rows, -(-int(capacity) // rows) * rows)
        meta = _zarr_doc((capacity, *row_shape), rows, np.dtype(dtype))
        arr = cls(backend, key, meta)
        arr._write_meta()
        return arr

    @classmethod
    def open(cls, backend: Backend, key: str) -> RowArray:
        meta_key = f"{key}/zarr.json"
        meta = read_json_state(
            backend.local_path(meta_key), "Zarr array metadata", read=lambda: backend.read(meta_key),
            error=StoreCorruptError,
            fix=("`embedstore verify` lists the rows it holds; move that segment folder away and "
                 "extract its studies again (the other segments are unaffected)."))
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise StoreFormatError(
                f"{backend.local_path(key)!r} is not a Zarr v3 array (zarr_format 3 expected).")
        return cls(backend, key, meta)

    def _write_meta(self) -> None:
        # A `.partial` temp, like chunk writes, so the sweep of a killed writer removes it.
        self.backend.put(f"{self.key}/zarr.json", json.dumps(self._meta, indent=2).encode())

    def resize(self, capacity: int) -> None:
        """Change the number of rows: rewrite zarr.json atomically and durably, since rows
        committed beyond the old shape would otherwise be lost with it (chunk files are
        untouched; callers never shrink below a written chunk)."""
        self._meta["shape"] = [int(capacity), *self.row_shape]
        self.shape = (int(capacity), *self.row_shape)
        self._write_meta()

    # -- chunk files --------------------------------------------------------------------------
    def chunk_key(self, i: int) -> str:
        return f"{self.key}/c.{i}{self._suffix}"

    def chunk_path(self, i: int) -> Path:
        return Path(self.backend.local_path(self.chunk_key(i)))

    def n_chunks(self, rows: int | None = None) -> int:
        return -(-(self.shape[0] if rows is None else rows) // self.chunk_rows)

    def write_chunk(self, i: int, data: np.ndarray, *, fsync: bool = True,
                    faults: PutFaults | None = None) -> None:
        """Atomically write chunk i from ``data`` (<= chunk_rows rows; the rest is fill value).
        The folder entry is not fsync'ed here: the caller fsyncs the folder once per batch."""
        if not self.fast:
            raise StoreFormatError(
                f"Array {self.backend.local_path(self.key)!r} has a layout this writer does not write.")
        data = np.ascontiguousarray(data, dtype=self.dtype.newbyteorder("<"))
        self.backend.put(
            self.chunk_key(i), memoryview(data.reshape(-1).view(np.uint8)),
            size=self.chunk_rows * self.row_bytes,  # edge chunks are stored whole
            durable=fsync, sync_dir=False, faults=faults or PutFaults(),
        )

    def sync(self) -> None:
        """fsync the chunk folder (the renames of the chunk files written since the last call)."""
        self.backend.sync_dir(self.key)

    def _check_rows(self, stop: int) -> None:
        if stop > self.shape[0]:
            raise StoreCorruptError(
                f"Rows up to {stop} lie beyond the array {self.backend.local_path(self.key)!r} of "
                f"{self.shape[0]} rows; run `embedstore verify`."
            )

    def _read_span(self, ci: int, r0: int, r1: int, buf: memoryview) -> None:
        """Rows [r0, r1) of chunk ci into ``buf`` (exactly (r1 - r0) * row_bytes bytes)."""
        rb = self.row_bytes
        key = self.chunk_key(ci)
        try:
            got = self.backend.read_into(key, r0 * rb, buf)
        except FileNotFoundError as e:
            raise StoreCorruptError(
                f"Chunk file {self.backend.local_path(key)!r} is missing but rows in it are "
                "committed; run `embedstore verify` and re-extract the affected studies."
            ) from e
        if got != (r1 - r0) * rb:
            raise StoreCorruptError(
                f"Chunk file {self.backend.local_path(key)!r} is truncated ({r0 * rb + got} bytes, "
                f"rows up to {r1} need {r1 * rb}); run `embedstore verify` and re-extract the "
                "affected studies."
            )

    def _zarr_rows(self, start: int, stop: int) -> np.ndarray:
        if self._zarr is None:
            import zarr

            self._zarr = zarr.open_array(self.backend.local_path(self.key), mode="r")
        return np.asarray(self._zarr[start:stop])

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
        self._check_rows(stop)
        if not self.fast:
            out[...] = self._zarr_rows(start, stop)
            return out
        if out.dtype != self.dtype or not out.flags.c_contiguous:
            out[...] = self.read_rows(start, stop)
            return out
        view = memoryview(out.reshape(n, -1).view(np.uint8)).cast("B")
        rb, cr = self.row_bytes, self.chunk_rows
        r = start
        while r < stop:
            ci, within = divmod(r, cr)
            take = min(stop - r, cr - within)
            self._read_span(ci, within, within + take, view[(r - start) * rb : (r - start + take) * rb])
            r += take
        return out

    def gather(self, rows: np.ndarray, out: np.ndarray, pos: np.ndarray | None = None) -> int:
        """``out[pos[j]] = self[rows[j]]`` for every j (pos defaults to 0..len-1), reading only
        the wanted rows: each run of consecutive rows once (straight into ``out`` when it is also
        consecutive there and of the stored dtype), a dense run as one span through a scratch
        buffer of at most one chunk. ``out`` may have another dtype (float16 -> float32 casts).
        Returns the bytes read."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.arange(rows.size, dtype=np.int64) if pos is None else np.asarray(pos, np.int64)
        if rows.size == 0:
            return 0
        if not (np.diff(rows) > 0).all():  # visit the file in row order
            order = np.argsort(rows, kind="stable")
            rows, pos = rows[order], pos[order]
        self._check_rows(int(rows[-1]) + 1)
        if not self.fast:
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            out[pos] = self._zarr_rows(lo, hi)[rows - lo]
            return (hi - lo) * self.row_bytes
        rb, cr = self.row_bytes, self.chunk_rows
        piece_rows = max(1, _PIECE_ROWS_BYTES // rb)
        direct = out.dtype == self.dtype and out.flags.c_contiguous
        out_bytes = memoryview(out.reshape(out.shape[0], -1).view(np.uint8)).cast("B") if direct else None
        # Split into runs of rows that are consecutive in the file and lie in one chunk.
        brk = np.flatnonzero((np.diff(rows) != 1) | (np.diff(rows // cr) != 0)) + 1
        starts = np.concatenate(([0], brk))
        ends = np.concatenate((brk, [rows.size]))
        # Merge neighbouring runs of one chunk into spans while they stay dense.
        spans: list[tuple[int, int]] = []  # index ranges [a, b) into rows
        a = 0
        for k in range(1, starts.size + 1):
            if k < starts.size:
                s = int(starts[k])
                same_chunk = rows[s] // cr == rows[a] // cr
                width = int(rows[ends[k] - 1] - rows[a]) + 1
                if same_chunk and (int(ends[k]) - a) >= _DENSE * width:
                    continue
            b = int(ends[k - 1])
            spans.append((a, b))
            if k < starts.size:
                a = int(starts[k])
        local = threading.local()

        def do_span(span: tuple[int, int]) -> int:
            a, b = span
            r0, r1 = int(rows[a]), int(rows[b - 1]) + 1
            ci = r0 // cr
            p = pos[a:b]
            n = r1 - r0
            if direct and n == b - a and int(p[-1]) - int(p[0]) + 1 == n and (np.diff(p) == 1).all():
                p0 = int(p[0])
                self._read_span(ci, r0 - ci * cr, r1 - ci * cr, out_bytes[p0 * rb : (p0 + n) * rb])
                return n * rb
            # Through a scratch buffer (one per thread), a cache-sized piece at a time.
            scratch = getattr(local, "scratch", None)
            if scratch is None:
                scratch = local.scratch = np.empty((min(cr, piece_rows), *self.row_shape),
                                                   dtype=self.dtype)
            want = rows[a:b] - r0  # (k,) rows of the span wanted, ascending
            for q0 in range(0, n, piece_rows):
                q1 = min(n, q0 + piece_rows)
                i0, i1 = np.searchsorted(want, [q0, q1])
                if i0 == i1:
                    continue
                buf = scratch[: q1 - q0]
                self._read_span(ci, r0 - ci * cr + q0, r0 - ci * cr + q1,
                                memoryview(buf.reshape(q1 - q0, -1).view(np.uint8)).cast("B"))
                if i1 - i0 == q1 - q0:  # every row of the piece is wanted
                    out[p[i0:i1]] = buf
                else:
                    out[p[i0:i1]] = buf[want[i0:i1] - q0]
            return n * rb

        # Spans touch disjoint rows of ``out``: large loads read them two at a time (reads from
        # the page cache release the GIL; measured ~1.6x here over one thread).
        if rows.size * rb >= _PARALLEL_BYTES and len(spans) > 1:
            read = sum(_pool().map(do_span, spans))
        else:
            read = sum(map(do_span, spans))
        return read


def open_local(path: str | os.PathLike[str]) -> RowArray:
    """A RowArray at a local path (tests and tools)."""
    p = Path(path)
    return RowArray.open(LocalBackend(p.parent), p.name)
