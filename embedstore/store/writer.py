"""StoreWriter: appends one writer session's embeddings of one set to a new segment.

Write protocol (docs/STORE_FORMAT.md, "Write protocol"): chunk files are written to a temp file,
fsync'ed and renamed into place, then one commit record for the batch is appended to the
segment's log and fsync'ed. A row is done only once its record is durable.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from embedstore._fsio import atomic_write_bytes, fsync_dir
from embedstore.errors import ConfigError, StoreFormatError
from embedstore.store._faults import fault_point
from embedstore.store._zarr import RowArray, chunk_rows_for, sweep_partials
from embedstore.store.commitlog import COMMIT_SCHEMA, CommitLog, CommitRecord
from embedstore.store.format import (
    COMMITS_FILE,
    DTYPES,
    EMBEDDINGS_ARRAY,
    FAILURES_DIR,
    SCHEMA_VERSION,
    SPEC_FILE,
    TOKENS_ARRAY,
    canonical,
    check_encoder_key,
    check_modality,
    compared_spec,
    iso,
    utcnow,
)
from embedstore.store.lock import Lock, pid_alive
from embedstore.store.segment import (
    SetDir,
    new_segment_name,
    read_segment_doc,
    write_meta,
    write_segment_doc,
)

if TYPE_CHECKING:
    from embedstore.store.reader import Store


def _chunk_rows(row_elems: int, dtype: np.dtype) -> int:
    return chunk_rows_for(row_elems * np.dtype(dtype).itemsize)


class StoreWriter:
    """Appends embeddings of one (modality, encoder key) to a new segment; use as a context manager.

    Rows are buffered and become durable in batches (every ``flush_rows`` rows, every
    ``flush_interval_s`` seconds, on flush() and on close): chunk files are written (and with
    ``durability="full"``, the default, fsync'ed), then one commit record for the batch is
    appended and fsync'ed. ``durability="commit"`` skips the chunk fsyncs: still safe against a
    killed process (the page cache survives it), while after a power loss `verify` flags any
    committed row whose bytes did not reach the disk.
    """

    def __init__(
        self,
        store: Store,
        modality: str,
        encoder_key: str,
        *,
        dim: int,
        spec: Mapping[str, Any],
        dtype: str = "float32",
        capacity: int | None = None,
        lock_scope: str | None = None,
        tokens_shape: tuple[int, ...] | None = None,
        chunk_rows: int | None = None,
        flush_rows: int = 4096,
        flush_interval_s: float = 5.0,
        durability: str = "full",
    ):
        self.store = store
        if durability not in ("full", "commit"):
            raise ConfigError(
                f"Unknown durability {durability!r}. Available: 'full' (fsync chunk files and the "
                "commit log) or 'commit' (fsync the commit log only)."
            )
        self.durability = durability
        self.modality = check_modality(modality)
        self.encoder_key = check_encoder_key(encoder_key)
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ConfigError(f"dim must be a positive integer, got {dim!r}.")
        if dtype not in DTYPES:
            raise ConfigError(f"Unknown store dtype {dtype!r}. Available: {list(DTYPES)}.")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.spec = canonical(dict(spec), "The embedding set spec")
        self.tokens_shape = tuple(int(s) for s in tokens_shape) if tokens_shape else None
        if self.tokens_shape is not None and (
            len(self.tokens_shape) != 2 or min(self.tokens_shape) <= 0
        ):
            raise ConfigError(
                f"tokens_shape must be (S, D_tokens) with positive sizes, got {tokens_shape!r}."
            )
        self.capacity = int(capacity) if capacity else 1024
        self.chunk_rows = chunk_rows
        self.flush_rows = max(1, int(flush_rows))
        self.flush_interval_s = float(flush_interval_s)
        self._set = SetDir(store.root, self.modality, self.encoder_key)
        self._lock = Lock(store.root, lock_scope)
        self.lock_scope = lock_scope
        self.segment_name = new_segment_name()
        self._seg: Path | None = None
        self._arr: RowArray | None = None
        self._tok: RowArray | None = None
        self._log: CommitLog | None = None
        self._open = False
        self._broken = False
        self._keys: set[str] = set()
        self._sources: dict[tuple[str, str], str] = {}
        self._n_rows = 0  # rows committed in this segment
        self._batches: list[pa.Table] = []
        self.rows_written = 0
        self.failures_recorded = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def open(self) -> StoreWriter:
        self._lock.acquire()
        try:
            self._ensure_set()
            self._sweep()
            live = self._set.live()
            self._keys = set(live.table["cache_key"].to_pylist())
            for sid, sig, key in zip(
                live.table["study_id"].to_pylist(),
                live.table["source_sig"].to_pylist(),
                live.table["cache_key"].to_pylist(),
                strict=True,
            ):
                if sig is not None:
                    self._sources[(sid, sig)] = key
        except BaseException:
            self._lock.release()
            raise
        self._cr = self.chunk_rows or _chunk_rows(self.dim, self.dtype)
        self._tcr = _chunk_rows(int(np.prod(self.tokens_shape)), self.dtype) if self.tokens_shape else 0
        cap = -(-self.flush_rows // self._cr) * self._cr + self._cr
        self._buf = np.zeros((cap, self.dim), dtype=self.dtype)  # (cap, D) from a chunk boundary
        self._tbuf = (
            np.zeros((cap, *self.tokens_shape), dtype=self.dtype) if self.tokens_shape else None
        )
        self._tail = 0  # committed rows of the current partial chunk, at the front of _buf
        self._pending: list[tuple] = []  # (study_id, patient_id, cache_key, content_hash, sig)
        self._vshape = (self.dim,)
        self._f16 = self.dtype == np.float16
        self._flush_at = min(self.flush_rows, cap)  # buffer index that triggers a flush
        self._last_flush = time.monotonic()
        self._open = True
        return self

    def close(self) -> None:
        """Flush, materialise meta.parquet/.arrow, trim the array to its rows and release the lock."""
        if not self._open:
            return
        try:
            if not self._broken:
                self.flush()
                self._finalise()
        finally:
            if self._log is not None:
                self._log.close()
            self._open = False
            self._lock.release()

    # -- queries ------------------------------------------------------------------------------
    def committed_keys(self) -> set[str]:
        """Cache keys of the set's live rows (all segments), including this session's flushed rows."""
        return set(self._keys)

    def committed_sources(self) -> dict[tuple[str, str], str]:
        """(study_id, source_sig) -> cache_key of live rows that recorded a source signature."""
        return dict(self._sources)

    # -- writing ------------------------------------------------------------------------------
    def add(
        self,
        *,
        study_id: str,
        patient_id: str,
        cache_key: str,
        content_hash: str,
        vector: np.ndarray,
        source_sig: str | None = None,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Buffer one embedding; it is committed at the next flush.

        A vector with NaN/inf (after casting to the store dtype) is not stored: the flush records
        it as a failure (stage "store", reason "non_finite_vector") and commits the other rows.
        """
        if not self._open:
            raise ConfigError("StoreWriter is not open: use it as `with store.writer(...) as w:`.")
        i = self._tail + len(self._pending)
        v = np.asarray(vector)
        if v.shape != self._vshape:
            raise StoreFormatError(
                f"Vector for study {study_id!r} has shape {v.shape}; this set stores ({self.dim},).",
                reason="bad_vector",
            )
        if self._f16:
            with np.errstate(over="ignore"):  # overflow -> inf, caught at flush
                self._buf[i] = v
        else:
            self._buf[i] = v
        if tokens is not None or self._tbuf is not None:
            if self._tbuf is None:
                raise StoreFormatError(
                    f"Tokens given for study {study_id!r} but the set was opened without "
                    "tokens_shape.",
                    reason="bad_vector",
                )
            if tokens is None or np.shape(tokens) != self.tokens_shape:
                raise StoreFormatError(
                    f"Tokens for study {study_id!r} must have shape {self.tokens_shape}, got "
                    f"{None if tokens is None else np.shape(tokens)}.",
                    reason="bad_vector",
                )
            with np.errstate(over="ignore"):
                self._tbuf[i] = tokens
        self._pending.append((study_id, patient_id, cache_key, content_hash, source_sig))
        if (
            i + 1 >= self._flush_at
            or time.monotonic() - self._last_flush >= self.flush_interval_s
        ):
            self.flush()

    def flush(self) -> None:
        """Make every buffered row durable: chunk files first, then one fsync'ed commit record."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        try:
            self._drop_non_finite()
            if self._pending:
                self._flush(len(self._pending))
        except BaseException:
            self._broken = True
            raise
        self._flush_at = min(self._tail + self.flush_rows, self._buf.shape[0])

    def _drop_non_finite(self) -> None:
        n = len(self._pending)
        rows = self._buf[self._tail : self._tail + n]  # (n, D) store dtype
        ok = np.isfinite(rows).all(axis=1)
        if self._tbuf is not None:
            ok &= np.isfinite(self._tbuf[self._tail : self._tail + n]).reshape(n, -1).all(axis=1)
        if ok.all():
            return
        for j in np.flatnonzero(~ok):
            self.record_failure(
                study_id=self._pending[j][0], modality=self.modality, stage="store",
                reason="non_finite_vector",
                message=f"embedding holds NaN or inf after casting to {self.dtype}; not stored",
            )
        keep = np.flatnonzero(ok)
        rows[: keep.size] = rows[keep]
        if self._tbuf is not None:
            t = self._tbuf[self._tail : self._tail + n]
            t[: keep.size] = t[keep]
        self._pending = [self._pending[j] for j in keep]

    def _flush(self, n_new: int) -> None:
        if self._seg is None:
            self._create_segment(max(self.capacity, self._n_rows + n_new))
        if self._arr is None:  # internal invariant
            raise RuntimeError("internal error: self._arr was not set")
        start = self._n_rows  # first new row's offset
        end = start + n_new
        if end > self._arr.shape[0]:
            new_cap = max(2 * self._arr.shape[0], end)
            self._arr.resize(-(-new_cap // self._arr.chunk_rows) * self._arr.chunk_rows)
            if self._tok is not None:
                self._tok.resize(-(-new_cap // self._tok.chunk_rows) * self._tok.chunk_rows)
        used = self._tail + n_new  # rows of _buf from the chunk boundary
        fault_point("before_chunk_write")
        first_chunk = start // self._cr
        full = self.durability == "full"
        for j in range(-(-used // self._cr)):
            self._arr.write_chunk(
                first_chunk + j,
                self._buf[j * self._cr : min(used, (j + 1) * self._cr)],
                fsync=full,
                before_rename=lambda: fault_point("mid_chunk_write"),
            )
        if self._tok is not None:
            tcr = self._tok.chunk_rows
            for c in range(start // tcr, -(-end // tcr)):
                lo, hi = c * tcr, min(end, (c + 1) * tcr)
                blk = np.zeros((hi - lo, *self.tokens_shape), dtype=self.dtype)
                if lo < start:  # rows committed earlier in this chunk
                    blk[: start - lo] = self._tok.read_rows(lo, start)
                src_lo = max(lo, start)
                blk[src_lo - lo :] = self._tbuf[self._tail + src_lo - start : self._tail + hi - start]
                self._tok.write_chunk(c, blk, fsync=full)
            if full:
                fsync_dir(self._tok.path)
        if full:
            fsync_dir(self._arr.path)
        fault_point("after_chunk_write")
        cols = list(zip(*self._pending, strict=True))
        sigs = [None if x is None else str(x) for x in cols[4]]
        record = CommitRecord(
            offset0=start,
            study_id=list(map(str, cols[0])),
            patient_id=list(map(str, cols[1])),
            cache_key=list(map(str, cols[2])),
            content_hash=list(map(str, cols[3])),
            crc32=[zlib.crc32(r) for r in self._buf[self._tail : used]],
            created_at=iso(utcnow()),
            source_sig=sigs,
            tokens_crc32=(
                None
                if self._tbuf is None
                else [zlib.crc32(t) for t in self._tbuf[self._tail : used]]
            ),
        )
        if self._log is None:
            self._log = CommitLog(self._seg / COMMITS_FILE)
        self._log.append(record)
        # Committed: update the session's view.
        self._batches.append(record.to_table())
        self._keys.update(record.cache_key)
        for sid, sig, key in zip(record.study_id, sigs, record.cache_key, strict=True):
            if sig is not None:
                self._sources[(sid, sig)] = key
        self._n_rows = end
        self.rows_written += n_new
        # Keep the rows of the last, partial chunk at the front of the buffer for the next flush.
        keep = used % self._cr
        if keep:
            self._buf[:keep] = self._buf[used - keep : used]
            if self._tbuf is not None:
                self._tbuf[:keep] = self._tbuf[used - keep : used]
        self._tail = keep
        self._pending = []

    def record_failure(
        self, *, study_id: str, modality: str, stage: str, reason: str, message: str
    ) -> None:
        """Append (and fsync) one failure record to ``failures/<segment>.jsonl``."""
        rec = {
            "study_id": str(study_id),
            "modality": check_modality(modality),
            "encoder_key": self.encoder_key,
            "stage": str(stage),
            "reason": str(reason),
            "message": str(message),
            "created_at": iso(utcnow()),
            "segment": self.segment_name,
        }
        fdir = self.store.root / FAILURES_DIR
        fdir.mkdir(exist_ok=True)
        fd = os.open(fdir / f"{self.segment_name}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.failures_recorded += 1

    # -- internals ----------------------------------------------------------------------------
    def _ensure_set(self) -> None:
        doc = {
            "schema_version": SCHEMA_VERSION,
            "modality": self.modality,
            "encoder_key": self.encoder_key,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "tokens_shape": list(self.tokens_shape) if self.tokens_shape else None,
            "spec": self.spec,
        }
        spec_path = self._set.path / SPEC_FILE
        if not spec_path.exists():
            self._set.path.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(spec_path, json.dumps(doc, indent=2, sort_keys=True).encode())
        have = self._set.doc()
        for k in ("dim", "dtype", "tokens_shape", "spec"):
            if compared_spec(have.get(k)) != compared_spec(doc[k]):  # provenance is not identity
                raise StoreFormatError(
                    f"Embedding set {self._set.name!r} already exists with {k}={have.get(k)!r}, "
                    f"but this writer has {k}={doc[k]!r}. A changed encoder or preprocessing "
                    "needs a new encoder key (its fingerprint), or remove the old set with gc."
                )

    def _sweep(self) -> None:
        """Remove temp files left by killed writers, without touching live writers' segments."""
        exclusive = self.lock_scope is None
        host = socket.gethostname()
        for seg in self._set.segments():
            if not exclusive:
                info = read_segment_doc(seg)
                pid = info.get("pid")
                if info.get("host") != host or not isinstance(pid, int) or pid_alive(pid):
                    continue
            sweep_partials(seg)

    def _create_segment(self, capacity: int) -> None:
        seg = self._set.path / self.segment_name
        seg.mkdir()
        write_segment_doc(seg, self.lock_scope)
        self._arr = RowArray.create(
            seg / EMBEDDINGS_ARRAY,
            row_shape=(self.dim,),
            dtype=self.dtype.name,
            capacity=capacity,
            chunk_rows=self._cr,
        )
        if self.tokens_shape is not None:
            self._tok = RowArray.create(
                seg / TOKENS_ARRAY,
                row_shape=self.tokens_shape,
                dtype=self.dtype.name,
                capacity=capacity,
                chunk_rows=self._tcr,
            )
        fsync_dir(self._set.path)
        self._seg = seg

    def _finalise(self) -> None:
        if self._seg is None:
            return
        self._arr.resize(self._n_rows)
        if self._tok is not None:
            self._tok.resize(self._n_rows)
        table = pa.concat_tables(self._batches) if self._batches else COMMIT_SCHEMA.empty_table()
        write_meta(self._seg, table)

