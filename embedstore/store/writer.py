"""StoreWriter: appends one writer session's embeddings of one set to a new segment.

Write protocol (docs/STORE_FORMAT.md, "Write protocol"): the batch's chunk files are written to
temp files, fsync'ed and renamed into place (a few in parallel), then one commit part for the
batch is published (written once under its name, fsync'ed). A row is done only once its part is
durable. Nothing is ever appended to or renamed as a folder, so the same protocol works on an
object store (embedstore/store/_backend.py).

Resume checks (which keys / sources are committed) are answered from the commit parts on disk
for the keys asked about, never from a set of every stored key in memory.
"""

from __future__ import annotations

import contextlib
import json
import operator
import socket
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._faults import PutFaults, fault_point
from embedstore.errors import (
    DISK_ERRNOS,
    ConfigError,
    DiskWriteError,
    StoreFormatError,
    StoreLockedError,
    disk_write_error,
)
from embedstore.store._arrow import strings, table
from embedstore.store._zarr import RowArray, chunk_rows_for, sweep_partials
from embedstore.store.commitlog import CommitRecord, PartLog, failure_table, merge_parts
from embedstore.store.format import (
    COMMITS_DIR,
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
    Snapshot,
    new_segment_name,
    read_segment_doc,
    resolve_live,
    segment_meta,
    write_segment_doc,
)

if TYPE_CHECKING:
    from embedstore.store.reader import Store

# A flush writes about this much row data (whole chunks): a few fsyncs per 32 MiB instead of one
# per row batch (measured in benchmarks/bench_store.py: fsync latency, not bandwidth, bounds
# small flushes).
_FLUSH_TARGET_BYTES = 32 << 20
_WRITE_THREADS = 4  # chunk files written (and fsync'ed) at once
_CHUNK_FAULTS = PutFaults(before_publish="mid_chunk_write")
_SCAN_BATCH = 65536
# Sorting a segment's metadata at close holds all of it in memory (~250 B a row): above this
# many rows the parts are left as written and readers sort.
_SORT_MAX_ROWS = 2_000_000


def _chunk_rows(row_elems: int, dtype: np.dtype) -> int:
    return chunk_rows_for(row_elems * np.dtype(dtype).itemsize)


class StoreWriter:
    """Appends embeddings of one (modality, encoder key) to a new segment; use as a context manager.

    Rows are buffered and become durable in batches (every ``flush_rows`` rows -- by default
    about 32 MiB of vectors --, every ``flush_interval_s`` seconds, on flush() and on close):
    chunk files are written (and with ``durability="full"``, the default, fsync'ed), then one
    commit part for the batch is published and fsync'ed. ``durability="commit"`` skips the chunk
    fsyncs: still safe against a killed process (the page cache survives it), while after a power
    loss `verify` flags any committed row whose bytes did not reach the disk. Failure records
    become durable with the next flush, like rows.

    On close, when the set has more segments than the store's ``max_segments`` (or a segment
    more commit parts than ``max_parts``), the writer compacts it, if no other writer is active.
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
        flush_rows: int | None = None,
        flush_interval_s: float = 5.0,
        durability: str = "full",
        auto_compact: bool = True,
    ):
        self.store = store
        self.backend = store.backend
        if durability not in ("full", "commit"):
            raise ConfigError(
                f"Unknown durability {durability!r}. Available: 'full' (fsync chunk files and the "
                "commit parts) or 'commit' (fsync the commit parts only)."
            )
        self.durability = durability
        self.modality = check_modality(modality)
        self.encoder_key = check_encoder_key(encoder_key)
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
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
        self.flush_rows = None if flush_rows is None else max(1, int(flush_rows))
        self.flush_interval_s = float(flush_interval_s)
        self.auto_compact = bool(auto_compact)
        self._set = SetDir(self.backend, self.modality, self.encoder_key)
        self._lock = Lock(store.root, lock_scope)
        self.lock_scope = lock_scope
        self.segment_name = new_segment_name()
        self._seg_key = f"{self._set.key}/{self.segment_name}"
        self._arr: RowArray | None = None
        self._tok: RowArray | None = None
        self._log: PartLog | None = None
        self._flog: PartLog | None = None
        self._pool: ThreadPoolExecutor | None = None  # chunk files, a few at once
        self._committer: ThreadPoolExecutor | None = None  # commit parts, in order
        self._inflight: Future | None = None  # the batch being committed
        self._open = False
        self._broken = False
        self._n_rows = 0  # rows handed to a commit in this segment (the next row's offset)
        self._failures: list[dict] = []
        self.rows_written = 0
        self.failures_recorded = 0
        self.compacted: bool = False

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
        except BaseException:
            self._lock.release()
            raise
        self._cr = self.chunk_rows or _chunk_rows(self.dim, self.dtype)
        self._tcr = _chunk_rows(int(np.prod(self.tokens_shape)), self.dtype) if self.tokens_shape else 0
        row_bytes = self.dim * self.dtype.itemsize
        flush_rows = self.flush_rows or max(self._cr, _FLUSH_TARGET_BYTES // row_bytes)
        cap = -(-flush_rows // self._cr) * self._cr + self._cr
        # Two buffers: one fills while the other's batch is written and committed.
        self._bufs = [np.zeros((cap, self.dim), dtype=self.dtype) for _ in range(2)]
        self._buf = self._bufs[0]  # (cap, D) from a chunk boundary
        self._tbuf = (  # tokens: flushed synchronously, one buffer
            np.zeros((cap, *self.tokens_shape), dtype=self.dtype) if self.tokens_shape else None
        )
        self._flush_every = flush_rows
        self._tail = 0  # committed rows of the current partial chunk, at the front of _buf
        # Pending rows' metadata, column by column.
        self._p_sid: list[str] = []
        self._p_pid: list[str] = []
        self._p_key: list[str] = []
        self._p_hash: list[str] = []
        self._p_sig: list[str | None] = []
        self._sorted = True  # every study_id so far greater than the previous one
        self._last_sid: str | None = None
        self._vshape = (self.dim,)
        self._f16 = self.dtype == np.float16
        self._flush_at = min(flush_rows, cap)  # buffer index that triggers a flush
        self._last_flush = time.monotonic()
        self._open = True
        return self

    def close(self) -> None:
        """Flush, trim the array to its rows, release the lock, then compact the set when it has
        grown too many segments (only if no other writer holds the store)."""
        if not self._open:
            return
        try:
            if not self._broken:
                self.flush()
                self._finalise()
                with _maintenance_disk_errors(f"{self.store.root}/{self._set.key}"):
                    self._tidy_parts()
        finally:
            for ex in (self._committer, self._pool):
                if ex is not None:
                    ex.shutdown(wait=True)
            self._committer = self._pool = None
            self._open = False
            self._lock.release()
        if self.auto_compact and not self._broken:
            self._maintain()

    # -- queries ------------------------------------------------------------------------------
    def _live_of(self, snap: Snapshot, study_ids: pa.Array, columns: Sequence[str]) -> pa.Table:
        """study_id + ``columns`` of the live rows of ``study_ids``: a filtered scan of the
        commit parts (parts whose study_id range misses every id are not opened; the other
        columns are read only from the parts that hold a live row)."""
        live = resolve_live(self.backend, snap, study_ids)
        meta = segment_meta(self.backend, live, list(columns))
        return table({"study_id": live.study_id, **{c: meta[c] for c in columns}})

    def committed(self, cache_keys: Iterable[str]) -> set[str]:
        """Which of ``cache_keys`` belong to live rows of the set (an anti-join on disk: memory
        grows with the keys asked about, not with the store)."""
        keys = pc.unique(strings([str(k) for k in cache_keys]))
        if len(keys) == 0:
            return set()
        snap = self._set.snapshot()
        studies: list[pa.Array] = []
        for seg in snap.segments:
            for p in seg.parts:
                pf = pq.ParquetFile(self.backend.local_path(p.key))
                for rb in pf.iter_batches(batch_size=_SCAN_BATCH, columns=["study_id", "cache_key"]):
                    hit = pc.is_in(rb.column(1), value_set=keys)
                    if pc.any(hit).as_py():
                        studies.append(rb.column(0).filter(hit))
        if not studies:
            return set()
        # A key is live only if no newer commit of its study replaced it.
        t = self._live_of(snap, pa.concat_arrays(studies), ["cache_key"])
        return set(t["cache_key"].filter(pc.is_in(t["cache_key"], value_set=keys)).to_pylist())

    def committed_keys(self, study_ids: Iterable[str] | None = None) -> set[str]:
        """Cache keys of the live rows of ``study_ids`` (this session's flushed rows included).
        Without ``study_ids``: of every live row, which holds them all in memory -- fine for a
        small set, avoid it for a large one."""
        snap = self._set.snapshot()
        if study_ids is None:
            live = resolve_live(self.backend, snap)
            return set(segment_meta(self.backend, live, ["cache_key"])["cache_key"].to_pylist())
        ids = strings([str(s) for s in study_ids])
        return set(self._live_of(snap, ids, ["cache_key"])["cache_key"].to_pylist())

    def committed_sources(self, study_ids: Iterable[str] | None = None
                          ) -> dict[tuple[str, str], str]:
        """(study_id, source_sig) -> cache_key of the live rows of ``study_ids`` that recorded a
        source signature (of every live row when None: memory grows with the set)."""
        snap = self._set.snapshot()
        ids = None if study_ids is None else strings([str(s) for s in study_ids])
        if ids is None:
            live = resolve_live(self.backend, snap)
            meta = segment_meta(self.backend, live, ["source_sig", "cache_key"])
            t = table({"study_id": live.study_id, "source_sig": meta["source_sig"],
                       "cache_key": meta["cache_key"]})
        else:
            t = self._live_of(snap, ids, ["source_sig", "cache_key"])
        return {(s, g): k for s, g, k in zip(t["study_id"].to_pylist(), t["source_sig"].to_pylist(),
                                             t["cache_key"].to_pylist(), strict=True)
                if g is not None}

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
        i = self._tail + len(self._p_sid)
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
            self._put_tokens(i, study_id, tokens)
        sid = str(study_id)
        if self._sorted and self._last_sid is not None and not self._last_sid < sid:
            self._sorted = False
        self._last_sid = sid
        self._p_sid.append(sid)
        self._p_pid.append(str(patient_id))
        self._p_key.append(str(cache_key))
        self._p_hash.append(str(content_hash))
        self._p_sig.append(None if source_sig is None else str(source_sig))
        if i + 1 >= self._flush_at:
            self._start_flush()
        elif time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def add_many(
        self,
        *,
        study_ids: Sequence[str],
        patient_ids: Sequence[str],
        cache_keys: Sequence[str],
        content_hashes: Sequence[str],
        vectors: np.ndarray,
        source_sigs: Sequence[str | None] | None = None,
        tokens: np.ndarray | None = None,
    ) -> None:
        """Buffer a batch: ``vectors`` (B, D) row-aligned with the id lists (``add`` per row, in
        bulk; the same flush and non-finite rules)."""
        if not self._open:
            raise ConfigError("StoreWriter is not open: use it as `with store.writer(...) as w:`.")
        vectors = np.asarray(vectors)
        b = len(study_ids)
        if vectors.shape != (b, self.dim):
            raise StoreFormatError(
                f"add_many got vectors of shape {vectors.shape} for {b} studies; this set stores "
                f"({b}, {self.dim}).", reason="bad_vector")
        for name, col in (("patient_ids", patient_ids), ("cache_keys", cache_keys),
                          ("content_hashes", content_hashes)):
            if len(col) != b:
                raise StoreFormatError(f"add_many: {name} has {len(col)} entries for {b} studies.",
                                       reason="bad_vector")
        if source_sigs is not None and len(source_sigs) != b:
            raise StoreFormatError(f"add_many: source_sigs has {len(source_sigs)} entries for {b} "
                                   "studies.", reason="bad_vector")
        if (tokens is None) != (self._tbuf is None) or (
                tokens is not None and np.shape(tokens) != (b, *self.tokens_shape)):
            raise StoreFormatError(
                f"add_many: tokens must be {'None' if self._tbuf is None else (b, *self.tokens_shape)}"
                f", got {None if tokens is None else np.shape(tokens)}.", reason="bad_vector")
        j = 0
        while j < b:
            i = self._tail + len(self._p_sid)
            take = min(b - j, self._flush_at - i)
            with np.errstate(over="ignore"):
                self._buf[i : i + take] = vectors[j : j + take]
                if tokens is not None:
                    self._tbuf[i : i + take] = tokens[j : j + take]
            sids = list(map(str, study_ids[j : j + take]))
            if self._sorted and sids:
                prev = self._last_sid
                if (prev is not None and not prev < sids[0]) or not all(
                        map(operator.lt, sids, sids[1:])):
                    self._sorted = False
            if sids:
                self._last_sid = sids[-1]
            self._p_sid.extend(sids)
            self._p_pid.extend(map(str, patient_ids[j : j + take]))
            self._p_key.extend(map(str, cache_keys[j : j + take]))
            self._p_hash.extend(map(str, content_hashes[j : j + take]))
            if source_sigs is None:
                self._p_sig.extend([None] * take)
            else:
                sigs = source_sigs[j : j + take]
                self._p_sig.extend(map(str, sigs) if None not in sigs else
                                   (None if g is None else str(g) for g in sigs))
            j += take
            if i + take >= self._flush_at:
                self._start_flush()
        if time.monotonic() - self._last_flush >= self.flush_interval_s:
            self.flush()

    def _put_tokens(self, i: int, study_id: str, tokens: np.ndarray | None) -> None:
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

    def flush(self) -> None:
        """Make every buffered row (and failure record) durable: chunk files first, then one
        commit part. When this returns, the rows exist."""
        self._start_flush()
        try:
            self._wait_commit()
            if self._failures:
                self._flush_failures()
        except BaseException:
            self._broken = True
            raise

    def _start_flush(self) -> None:
        """Hand the buffered rows to the committer (automatic flushes do not wait for it)."""
        self._last_flush = time.monotonic()
        if not self._open:
            return
        try:
            if self._p_sid:
                self._drop_non_finite()
            if self._p_sid:
                self._flush(len(self._p_sid))
        except BaseException:
            self._broken = True
            raise
        self._flush_at = min(self._tail + self._flush_every, self._buf.shape[0])

    def _wait_commit(self) -> None:
        if self._inflight is not None:
            fut, self._inflight = self._inflight, None
            try:
                fut.result()
            except BaseException:
                self._broken = True
                raise

    def _drop_non_finite(self) -> None:
        n = len(self._p_sid)
        rows = self._buf[self._tail : self._tail + n]  # (n, D) store dtype
        ok = np.isfinite(rows).all(axis=1)
        if self._tbuf is not None:
            ok &= np.isfinite(self._tbuf[self._tail : self._tail + n]).reshape(n, -1).all(axis=1)
        if ok.all():
            return
        for j in np.flatnonzero(~ok):
            self.record_failure(
                study_id=self._p_sid[j], modality=self.modality, stage="store",
                reason="non_finite_vector",
                message=f"embedding holds NaN or inf after casting to {self.dtype}; not stored",
            )
        keep = np.flatnonzero(ok)
        rows[: keep.size] = rows[keep]
        if self._tbuf is not None:
            t = self._tbuf[self._tail : self._tail + n]
            t[: keep.size] = t[keep]
        for name in ("_p_sid", "_p_pid", "_p_key", "_p_hash", "_p_sig"):
            col = getattr(self, name)
            setattr(self, name, [col[j] for j in keep])

    def _flush(self, n_new: int) -> None:
        # The previous batch must be committed first: its chunk files may share a chunk with
        # this one, parts are published in order, and its buffer is the one we fill next.
        self._wait_commit()
        if self._arr is None:
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
        full = self.durability == "full"
        buf = self._buf
        fault_point("before_chunk_write")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(_WRITE_THREADS, thread_name_prefix="embedstore-write")
            self._committer = ThreadPoolExecutor(1, thread_name_prefix="embedstore-commit")
        first_chunk = start // self._cr
        futures = [
            self._pool.submit(self._arr.write_chunk, first_chunk + j,
                              buf[j * self._cr : min(used, (j + 1) * self._cr)],
                              fsync=full, faults=_CHUNK_FAULTS)
            for j in range(-(-used // self._cr))
        ]
        # While the chunk files are written and fsync'ed: checksums of the new rows.
        crc32 = np.fromiter(map(zlib.crc32, buf[self._tail : used]), np.uint32, n_new)
        tok_crc = None
        if self._tbuf is not None:
            tok_crc = np.fromiter(map(zlib.crc32, self._tbuf[self._tail : used]), np.uint32, n_new)
            self._write_tokens(start, end, full)
        record = CommitRecord(
            offset0=start,
            study_id=self._p_sid,
            patient_id=self._p_pid,
            cache_key=self._p_key,
            content_hash=self._p_hash,
            crc32=crc32,
            created_at=iso(utcnow()),
            source_sig=self._p_sig,
            tokens_crc32=tok_crc,
        )
        if self._log is None:
            self._log = PartLog(self.backend, f"{self._seg_key}/{COMMITS_DIR}", "commits")
        self._inflight = self._committer.submit(self._commit, futures, record, full)
        if self._tbuf is not None:
            self._wait_commit()  # tokens reuse one buffer: commit before it refills
        self._n_rows = end
        # The next batch fills the other buffer, from the rows of the last, partial chunk.
        keep = used % self._cr
        nxt = self._bufs[1] if buf is self._bufs[0] else self._bufs[0]
        if keep:
            nxt[:keep] = buf[used - keep : used]
            if self._tbuf is not None:
                self._tbuf[:keep] = self._tbuf[used - keep : used]
        self._buf = nxt
        self._tail = keep
        self._p_sid, self._p_pid, self._p_key, self._p_hash, self._p_sig = [], [], [], [], []

    def _commit(self, futures: list[Future], record: CommitRecord, full: bool) -> None:
        """(committer thread) Once the batch's chunk files are in place, publish its part."""
        for f in futures:
            f.result()
        if full:
            self._arr.sync()
        fault_point("after_chunk_write")
        self._log.append(record.to_table())
        self.rows_written += record.n

    def _write_tokens(self, start: int, end: int, full: bool) -> None:
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
            self._tok.sync()

    def record_failure(
        self, *, study_id: str, modality: str, stage: str, reason: str, message: str
    ) -> None:
        """Record one input that could not be embedded (``failures/<segment>/``); durable at the
        next flush, like rows."""
        self._failures.append({
            "study_id": str(study_id),
            "modality": check_modality(modality),
            "encoder_key": self.encoder_key,
            "stage": str(stage),
            "reason": str(reason),
            "message": str(message),
            "created_at": iso(utcnow()),
            "segment": self.segment_name,
        })
        self.failures_recorded += 1
        if self._open and not self._broken and (
                time.monotonic() - self._last_flush >= self.flush_interval_s):
            self.flush()

    def _flush_failures(self) -> None:
        if self._flog is None:
            self._flog = PartLog(self.backend, f"{FAILURES_DIR}/{self.segment_name}", "failures")
        self._flog.append(failure_table(self._failures))
        self._failures = []

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
        spec_key = f"{self._set.key}/{SPEC_FILE}"
        if not self.backend.exists(spec_key):
            self.backend.put(spec_key, json.dumps(doc, indent=2, sort_keys=True).encode())
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
        for name in self._set.segment_names():
            key = f"{self._set.key}/{name}"
            if not exclusive:
                info = read_segment_doc(self.backend, key)
                pid = info.get("pid")
                if info.get("host") != host or not isinstance(pid, int) or pid_alive(pid):
                    continue
            sweep_partials(self._set.path / name)

    def _create_segment(self, capacity: int) -> None:
        write_segment_doc(self.backend, self._seg_key, self.lock_scope)
        self._arr = RowArray.create(
            self.backend, f"{self._seg_key}/{EMBEDDINGS_ARRAY}",
            row_shape=(self.dim,), dtype=self.dtype.name, capacity=capacity, chunk_rows=self._cr,
        )
        if self.tokens_shape is not None:
            self._tok = RowArray.create(
                self.backend, f"{self._seg_key}/{TOKENS_ARRAY}",
                row_shape=self.tokens_shape, dtype=self.dtype.name, capacity=capacity,
                chunk_rows=self._tcr,
            )
        self.backend.sync_dir(self._set.key)

    def _finalise(self) -> None:
        if self._arr is None:
            return
        self._arr.resize(self._n_rows)
        if self._tok is not None:
            self._tok.resize(self._n_rows)

    def _tidy_parts(self) -> None:
        """A finished segment written out of study_id order gets its commit parts merged into
        one part in study_id order (readers then need no sort); one with more than
        ``max_parts`` parts gets them merged. Crash-safe (commitlog.merge_parts)."""
        if self._arr is None:
            return
        seg = self._set.segment(self.segment_name)
        unsorted = not seg.ordered() and seg.rows <= _SORT_MAX_ROWS
        if len(seg.parts) > 1 and (unsorted or len(seg.parts) > self.store.config["max_parts"]):
            merge_parts(self.backend, seg.commits_key, sort=unsorted)

    def _maintain(self) -> None:
        """Automatic compaction (maintenance.auto_compact) under the whole-store lock, taken
        without waiting: skipped while any other writer is active."""
        from embedstore.store import maintenance

        try:
            lock = Lock(self.store.root, None).acquire()
        except StoreLockedError:
            return
        try:
            with _maintenance_disk_errors(f"{self.store.root}/{self._set.key}"):
                self.compacted = maintenance.auto_compact(self.store, self._set)
        finally:
            lock.release()


@contextlib.contextmanager
def _maintenance_disk_errors(set_key: str) -> Iterator[None]:
    """A full disk or failing device while tidying a set after its rows were committed: one typed
    error that says the rows are safe and that ``gc`` finishes the tidying."""
    try:
        yield
    except DiskWriteError as e:
        raise disk_write_error(e, e.filename or set_key, maintenance=True) from e
    except OSError as e:
        if e.errno in DISK_ERRNOS:
            raise disk_write_error(e, getattr(e, "filename", None) or set_key, maintenance=True) from e
        raise
