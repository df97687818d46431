"""The embedding store: Zarr v3 segments + fsync'ed commit logs + Parquet metadata.

Layout and guarantees are specified in docs/STORE_FORMAT.md. In short:

    STORE/store.json                      format + schema_version
    STORE/manifest.parquet                the attached cohort manifest (the `studies` view)
    STORE/sets/<MODALITY>/<encoder_key>/  spec.json + one segment per writer session:
        seg-<utc>-<pid>-<rand>/           embeddings.zarr (N, D), [tokens.zarr (N, S, Dt)],
                                          commits.jsonl (truth), meta.parquet + meta.arrow (caches),
                                          segment.json
    STORE/failures/<segment>.jsonl        inputs that could not be embedded
    STORE/locks/*.lock                    advisory writer locks
    STORE/runs/<run_id>/                  training runs (written by embedstore.runs)

A row exists only once its commit record is fsync'ed, and the record is written only after the
row's chunk file was renamed into place and fsync'ed, so a writer killed at any point leaves
either a committed row with its bytes on disk or no row. Loading keeps the newest commit per
study_id and orders rows by study_id, so every crash/resume or sharding pattern yields the same
array.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._zarr import RowArray, fsync_dir, sweep_partials
from embedstore.catalog import (
    DEFAULT_PAIR_MAX_GAP_HOURS,
    EMBEDDINGS_SCHEMA,
    FAILURES_SCHEMA,
    Catalog,
    read_runs,
)
from embedstore.errors import (
    ConfigError,
    ManifestError,
    StoreCorruptError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
)

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "open_store",
    "make_cache_key",
    "Store",
    "StoreWriter",
    "EmbeddingSet",
    "SetInfo",
    "Problem",
    "VerifyReport",
    "GcReport",
]

SCHEMA_VERSION = 1
FORMAT_NAME = "embedstore"
DTYPES = ("float32", "float16")
_MODALITIES = ("CXR", "CTPA")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")
_MANIFEST_META_KEY = b"embedstore.store"
_META_LOG_BYTES_KEY = b"embedstore.commits_bytes"

_COMMIT_SCHEMA = pa.schema(
    [
        ("offset", pa.int64()),
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("cache_key", pa.string()),
        ("content_hash", pa.string()),
        ("source_sig", pa.string()),
        ("crc32", pa.int64()),
        ("tokens_crc32", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ]
)
_META_COLUMNS = ("row", "study_id", "patient_id", "cache_key", "content_hash", "created_at")

# Test hook (tests/test_store_crash.py): EMBEDSTORE_CRASH_AT="<point>[:<nth>]" makes the writing
# process SIGKILL itself the nth time it reaches <point>. Points: before_chunk_write,
# mid_chunk_write (temp file written, not renamed), after_chunk_write, mid_commit (half a commit
# line written), before_fsync, after_fsync.
_CRASH_AT = os.environ.get("EMBEDSTORE_CRASH_AT")
_crash_counts: dict[str, int] = {}


def _crash_due(point: str) -> bool:
    if _CRASH_AT is None:
        return False
    name, _, nth = _CRASH_AT.partition(":")
    if name != point:
        return False
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    return _crash_counts[point] >= int(nth or 1)


def _crash(point: str) -> None:
    if _crash_due(point):
        os.kill(os.getpid(), 9)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _micros(iso: str) -> int:
    dt = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return (dt - _EPOCH) // timedelta(microseconds=1)


def _canonical(obj: Any, what: str) -> Any:
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serialisable: {e}") from e


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_cache_key(
    *,
    content_hash: str,
    preprocess: Mapping[str, Any] | str,
    encoder_fingerprint: str,
    schema_version: int = SCHEMA_VERSION,
) -> str:
    """sha256 hex identifying one embedding: input content x preprocessing x encoder x schema.

    ``content_hash`` must hash the pixel data and the geometry that affects it, never the path,
    so moving or renaming an image folder recomputes nothing; ``encoder_fingerprint`` must
    include a hash of the weights (``Encoder.fingerprint()``).
    """
    payload = {
        "content": str(content_hash),
        "preprocess": _canonical(preprocess, "The preprocessing spec"),
        "encoder": str(encoder_fingerprint),
        "schema_version": int(schema_version),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# ------------------------------------------------------------------------------------------------
# Public value types
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SetInfo:
    """One embedding set: all rows of one (modality, encoder key)."""

    modality: str
    encoder_key: str
    dim: int
    dtype: str
    count: int
    spec: dict
    tokens_shape: tuple[int, ...] | None = None
    segments: int = 0
    superseded: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_shape"] = list(self.tokens_shape) if self.tokens_shape else None
        return d


@dataclass(frozen=True)
class EmbeddingSet:
    """Loaded embeddings: ``vectors`` (N, D) float32, row-aligned ``meta``, ordered by study_id."""

    modality: str
    encoder_key: str
    vectors: np.ndarray
    meta: pa.Table
    spec: dict
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def study_ids(self) -> list[str]:
        return self.meta["study_id"].to_pylist()


@dataclass(frozen=True)
class Problem:
    """One finding of verify(); ``severity`` is "error" (data at risk) or "warning"."""

    kind: str
    path: str
    detail: str
    severity: str = "error"
    study_id: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    problems: tuple[Problem, ...]
    sets_checked: int
    rows_checked: int

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "sets_checked": self.sets_checked,
            "rows_checked": self.rows_checked,
            "problems": [asdict(p) for p in self.problems],
        }


@dataclass(frozen=True)
class GcReport:
    """What gc found (dry run) or removed. Paths are relative to the store root."""

    dry_run: bool
    superseded_rows: dict[str, int] = field(default_factory=dict)
    unreferenced_rows: dict[str, int] = field(default_factory=dict)
    unreferenced_sets: tuple[str, ...] = ()
    orphan_temp_files: tuple[str, ...] = ()
    empty_segments: tuple[str, ...] = ()
    compacted_sets: tuple[str, ...] = ()
    bytes_freed: int = 0

    @property
    def nothing_to_do(self) -> bool:
        return not (
            any(self.superseded_rows.values())
            or any(self.unreferenced_rows.values())
            or self.unreferenced_sets
            or self.orphan_temp_files
            or self.empty_segments
            or self.compacted_sets
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["nothing_to_do"] = self.nothing_to_do
        return d


# ------------------------------------------------------------------------------------------------
# Locks
# ------------------------------------------------------------------------------------------------

_HELD: dict[tuple[str, str], list] = {}  # (root, lock name) -> [fd, refcount, mode]
_HELD_GUARD = threading.Lock()


class _Lock:
    """Advisory flock locks. Scope None: exclusive on the whole store. A named scope (e.g.
    "shard-1-of-2"): shared on the store + exclusive on the scope, so shards coexist but a
    whole-store writer (or gc) excludes them all. Re-entrant within one process."""

    def __init__(self, root: Path, scope: str | None):
        if scope is not None and not _NAME_RE.match(scope):
            raise ConfigError(
                f"Invalid lock scope {scope!r}: use letters, digits and . _ - (e.g. 'shard-1-of-4')."
            )
        self.root = root
        self.scope = scope
        self._taken: list[str] = []

    def _path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def acquire(self) -> _Lock:
        (self.root / "locks").mkdir(exist_ok=True)
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
                    "since": _iso(_utcnow()),
                    "scope": self.scope or "store",
                }
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            _HELD[key] = [fd, 1, mode]
            self._taken.append(name)

    def _locked_message(self) -> str:
        holders = []
        host = socket.gethostname()
        for p in sorted((self.root / "locks").glob("*.lock")):
            try:
                info = json.loads(p.read_text() or "{}")
            except (OSError, ValueError):
                continue
            pid = info.get("pid")
            if not isinstance(pid, int) or pid == os.getpid():
                continue
            if info.get("host") == host and not _pid_alive(pid):
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


# ------------------------------------------------------------------------------------------------
# Segments and sets (private)
# ------------------------------------------------------------------------------------------------


def _parse_commit_log(path: Path) -> tuple[pa.Table, int, list[str]]:
    """Commit records of one segment -> (rows table, bytes consumed, notes about a torn tail).

    A torn (incomplete) last line is a writer killed mid-append: its rows were never committed
    and it is ignored. A bad line followed by more lines is corruption.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _COMMIT_SCHEMA.empty_table(), 0, []
    lines = data.split(b"\n")
    cols: dict[str, list] = {n: [] for n in _COMMIT_SCHEMA.names}
    notes: list[str] = []
    consumed = 0
    for i, line in enumerate(lines):
        if not line.strip():
            consumed += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            rec = json.loads(line)
            n = int(rec["n"])
            off0 = int(rec["offset0"])
            created = rec["created_at"]
            batch = {k: rec[k] for k in ("study_id", "patient_id", "cache_key", "content_hash")}
            if any(len(v) != n for v in batch.values()) or len(rec["crc32"]) != n:
                raise ValueError("column lengths differ from n")
        except (ValueError, KeyError, TypeError) as e:
            rest = b"".join(lines[i + 1 :]).strip()
            if rest:
                raise StoreCorruptError(
                    f"Commit log {str(path)!r} line {i + 1} is damaged ({e}) and is followed by "
                    "more records; run `embedstore verify`."
                ) from e
            notes.append(f"torn last commit line ({len(line)} bytes) ignored")
            break
        consumed += len(line) + (1 if i < len(lines) - 1 else 0)
        cols["offset"].extend(range(off0, off0 + n))
        for k, v in batch.items():
            cols[k].extend(v)
        cols["source_sig"].extend(rec.get("source_sig") or [None] * n)
        cols["crc32"].extend(rec["crc32"])
        cols["tokens_crc32"].extend(rec.get("tokens_crc32") or [None] * n)
        if isinstance(created, list):
            cols["created_at"].extend(_micros(c) for c in created)
        else:
            cols["created_at"].extend([_micros(created)] * n)
    arrays = [
        pa.array(cols[f.name], type=pa.int64() if f.name == "created_at" else f.type)
        for f in _COMMIT_SCHEMA
    ]
    arrays[-1] = arrays[-1].cast(_COMMIT_SCHEMA.field("created_at").type)
    return pa.Table.from_arrays(arrays, schema=_COMMIT_SCHEMA), consumed, notes


def _segment_rows(seg: Path) -> pa.Table:
    """Commit rows of a segment, from the meta.arrow cache when it reflects the whole log."""
    log = seg / "commits.jsonl"
    try:
        log_size = log.stat().st_size
    except FileNotFoundError:
        return _COMMIT_SCHEMA.empty_table()
    cache = seg / "meta.arrow"
    if cache.exists():
        try:
            with pa.OSFile(str(cache), "rb") as f:
                t = pa.ipc.open_file(f).read_all()
            if (t.schema.metadata or {}).get(_META_LOG_BYTES_KEY) == str(log_size).encode():
                return t.replace_schema_metadata(None)
        except (OSError, pa.ArrowInvalid):
            pass  # a derived cache: fall back to the commit log, which is the truth
    return _parse_commit_log(log)[0]


def _write_meta(seg: Path, table: pa.Table) -> None:
    """Materialise a segment's commits as meta.parquet (for tools) and meta.arrow (fast cache),
    both stamped with the commit log size they reflect."""
    size = (seg / "commits.jsonl").stat().st_size
    table = table.replace_schema_metadata({_META_LOG_BYTES_KEY: str(size).encode()})
    tag = uuid.uuid4().hex
    pq.write_table(table, seg / f"meta.parquet.{tag}.tmp")
    with pa.OSFile(str(seg / f"meta.arrow.{tag}.tmp"), "wb") as f:
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    os.replace(seg / f"meta.parquet.{tag}.tmp", seg / "meta.parquet")
    os.replace(seg / f"meta.arrow.{tag}.tmp", seg / "meta.arrow")


@dataclass
class _Live:
    """The live rows of a set, ordered by study_id: which segment and offset each comes from."""

    table: pa.Table  # _COMMIT_SCHEMA + "_seg" (int32 index into segments)
    segments: list[Path]
    total: int  # committed rows, superseded included

    @property
    def superseded(self) -> int:
        return self.total - self.table.num_rows


class _SetDir:
    def __init__(self, root: Path, modality: str, encoder_key: str):
        self.root = root
        self.modality = modality
        self.encoder_key = encoder_key
        self.path = root / "sets" / modality / encoder_key

    @property
    def name(self) -> str:
        return f"{self.modality}/{self.encoder_key}"

    def doc(self) -> dict:
        try:
            return json.loads((self.path / "spec.json").read_text())
        except FileNotFoundError as e:
            raise StoreNotFoundError(
                f"Embedding set {self.name!r} has no spec.json in {str(self.path)!r}."
            ) from e
        except (OSError, ValueError) as e:
            raise StoreCorruptError(
                f"spec.json of set {self.name!r} is unreadable ({e}); run `embedstore verify`."
            ) from e

    def segments(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        return sorted(p for p in self.path.iterdir() if p.is_dir() and p.name.startswith("seg-"))

    def live(self) -> _Live:
        segs = self.segments()
        parts = []
        for i, seg in enumerate(segs):
            t = _segment_rows(seg)
            if t.num_rows:
                parts.append(t.append_column("_seg", pa.array(np.full(t.num_rows, i, np.int32))))
        if not parts:
            empty = _COMMIT_SCHEMA.empty_table().append_column("_seg", pa.array([], pa.int32()))
            return _Live(empty, segs, 0)
        allrows = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        total = allrows.num_rows
        sid = allrows["study_id"]
        if total < 2 or pc.all(pc.less(sid[:-1], sid[1:])).as_py():
            pass  # already unique and in study_id order (a session written in order)
        elif pc.count_distinct(allrows["study_id"]).as_py() != total:
            # Newest commit per study_id wins: created_at, then segment name, then offset.
            order = pc.sort_indices(
                allrows,
                sort_keys=[
                    ("study_id", "ascending"),
                    ("created_at", "descending"),
                    ("_seg", "descending"),
                    ("offset", "descending"),
                ],
            )
            allrows = allrows.take(order)
            sid = allrows["study_id"].combine_chunks()
            first = np.ones(total, dtype=bool)
            if total > 1:
                first[1:] = pc.not_equal(sid[1:], sid[:-1]).to_numpy(zero_copy_only=False)
            allrows = allrows.filter(pa.array(first))
        else:
            allrows = allrows.take(pc.sort_indices(allrows, sort_keys=[("study_id", "ascending")]))
        return _Live(allrows.combine_chunks(), segs, total)


def _read_rows_for(
    live: pa.Table, segments: list[Path], array_name: str, out: np.ndarray
) -> None:
    """Fill ``out`` (N, ...) with the rows of ``live`` from each segment's array."""
    if live.num_rows == 0:
        return
    seg_idx = live["_seg"].to_numpy()
    offsets = live["offset"].to_numpy()
    for k in np.unique(seg_idx):
        pos = np.flatnonzero(seg_idx == k)
        offs = offsets[pos]
        arr = RowArray.open(segments[int(k)] / array_name)
        lo, hi = int(offs.min()), int(offs.max()) + 1
        contiguous = (
            hi - lo == pos.size
            and pos[-1] - pos[0] + 1 == pos.size
            and np.all(np.diff(offs) == 1)
        )
        if contiguous and arr.dtype == out.dtype:
            arr.read_rows(lo, hi, out=out[pos[0] : pos[-1] + 1])  # straight into place
        else:
            buf = arr.read_rows(lo, hi)  # (hi - lo, ...) stored dtype
            out[pos] = buf[offs - lo]


# ------------------------------------------------------------------------------------------------
# Writer
# ------------------------------------------------------------------------------------------------


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
        self.modality = _check_modality(modality)
        self.encoder_key = _check_encoder_key(encoder_key)
        if not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ConfigError(f"dim must be a positive integer, got {dim!r}.")
        if dtype not in DTYPES:
            raise ConfigError(f"Unknown store dtype {dtype!r}. Available: {list(DTYPES)}.")
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.spec = _canonical(dict(spec), "The embedding set spec")
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
        self._set = _SetDir(store.root, self.modality, self.encoder_key)
        self._lock = _Lock(store.root, lock_scope)
        self.lock_scope = lock_scope
        stamp = _utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        self.segment_name = f"seg-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seg: Path | None = None
        self._arr: RowArray | None = None
        self._tok: RowArray | None = None
        self._log_fd: int | None = None
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
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
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
        _crash("before_chunk_write")
        first_chunk = start // self._cr
        full = self.durability == "full"
        for j in range(-(-used // self._cr)):
            self._arr.write_chunk(
                first_chunk + j,
                self._buf[j * self._cr : min(used, (j + 1) * self._cr)],
                fsync=full,
                before_rename=lambda: _crash("mid_chunk_write"),
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
        _crash("after_chunk_write")
        rows = self._buf[self._tail : used]
        crc = [zlib.crc32(r) for r in rows]
        cols = list(zip(*self._pending, strict=True))
        names = ("study_id", "patient_id", "cache_key", "content_hash")
        p = {name: list(map(str, col)) for name, col in zip(names, cols[:4], strict=True)}
        p["source_sig"] = [None if x is None else str(x) for x in cols[4]]
        created = _iso(_utcnow())
        rec: dict[str, Any] = {
            "offset0": start,
            "n": n_new,
            "created_at": created,
            "study_id": p["study_id"],
            "patient_id": p["patient_id"],
            "cache_key": p["cache_key"],
            "content_hash": p["content_hash"],
            "crc32": crc,
        }
        if any(s is not None for s in p["source_sig"]):
            rec["source_sig"] = p["source_sig"]
        tcrc = None
        if self._tbuf is not None:
            tcrc = [zlib.crc32(t) for t in self._tbuf[self._tail : used]]
            rec["tokens_crc32"] = tcrc
        line = (json.dumps(rec, separators=(",", ":")) + "\n").encode()
        if self._log_fd is None:
            self._log_fd = os.open(
                self._seg / "commits.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
            )
            fsync_dir(self._seg)
        if _crash_due("mid_commit"):
            os.write(self._log_fd, line[: len(line) // 2])
            os.kill(os.getpid(), 9)
        os.write(self._log_fd, line)
        _crash("before_fsync")
        os.fsync(self._log_fd)
        _crash("after_fsync")
        # Committed: update the session's view.
        micros = _micros(created)
        self._batches.append(
            pa.table(
                {
                    "offset": pa.array(np.arange(start, end, dtype=np.int64)),
                    "study_id": pa.array(p["study_id"], pa.string()),
                    "patient_id": pa.array(p["patient_id"], pa.string()),
                    "cache_key": pa.array(p["cache_key"], pa.string()),
                    "content_hash": pa.array(p["content_hash"], pa.string()),
                    "source_sig": pa.array(p["source_sig"], pa.string()),
                    "crc32": pa.array(crc, pa.int64()),
                    "tokens_crc32": pa.array(tcrc if tcrc else [None] * n_new, pa.int64()),
                    "created_at": pa.array(np.full(n_new, micros, np.int64)).cast(
                        _COMMIT_SCHEMA.field("created_at").type
                    ),
                },
                schema=_COMMIT_SCHEMA,
            )
        )
        self._keys.update(p["cache_key"])
        for sid, sig, key in zip(p["study_id"], p["source_sig"], p["cache_key"], strict=True):
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
            "modality": _check_modality(modality),
            "encoder_key": self.encoder_key,
            "stage": str(stage),
            "reason": str(reason),
            "message": str(message),
            "created_at": _iso(_utcnow()),
            "segment": self.segment_name,
        }
        fdir = self.store.root / "failures"
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
        spec_path = self._set.path / "spec.json"
        if not spec_path.exists():
            self._set.path.mkdir(parents=True, exist_ok=True)
            _atomic_write(spec_path, json.dumps(doc, indent=2, sort_keys=True).encode())
        have = self._set.doc()
        for k in ("dim", "dtype", "tokens_shape", "spec"):
            if have.get(k) != doc[k]:
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
                try:
                    info = json.loads((seg / "segment.json").read_text())
                except (OSError, ValueError):
                    info = {}
                pid = info.get("pid")
                if info.get("host") != host or not isinstance(pid, int) or _pid_alive(pid):
                    continue
            sweep_partials(seg)

    def _create_segment(self, capacity: int) -> None:
        seg = self._set.path / self.segment_name
        seg.mkdir()
        info = {
            "schema_version": SCHEMA_VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "scope": self.lock_scope,
            "created_at": _iso(_utcnow()),
        }
        _atomic_write(seg / "segment.json", json.dumps(info, indent=2).encode())
        self._arr = RowArray.create(
            seg / "embeddings.zarr",
            row_shape=(self.dim,),
            dtype=self.dtype.name,
            capacity=capacity,
            chunk_rows=self._cr,
        )
        if self.tokens_shape is not None:
            self._tok = RowArray.create(
                seg / "tokens.zarr",
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
        table = pa.concat_tables(self._batches) if self._batches else _COMMIT_SCHEMA.empty_table()
        _write_meta(self._seg, table)


def _chunk_rows(row_elems: int, dtype: np.dtype) -> int:
    from embedstore._zarr import chunk_rows_for

    return chunk_rows_for(row_elems * np.dtype(dtype).itemsize)


def _check_modality(modality: str) -> str:
    m = str(modality).upper()
    if m not in _MODALITIES:
        raise ConfigError(f"Unknown modality {modality!r}. Valid: {list(_MODALITIES)}.")
    return m


def _check_encoder_key(key: str) -> str:
    if not isinstance(key, str) or not _NAME_RE.match(key):
        raise ConfigError(
            f"Invalid encoder key {key!r}: it names a folder, so use 1-128 letters, digits and "
            ". _ @ + = - (starting with a letter or digit)."
        )
    return key


# ------------------------------------------------------------------------------------------------
# Store
# ------------------------------------------------------------------------------------------------


def open_store(path: str | os.PathLike[str], *, create: bool = False) -> Store:
    """Open the store at ``path`` (creating an empty one when ``create``).

    Raises StoreNotFoundError when there is no store and ``create`` is false, and
    StoreFormatError when ``store.json`` is not an embedstore store of a readable schema_version.
    """
    root = Path(path).expanduser().resolve()
    doc_path = root / "store.json"
    if not doc_path.exists():
        if not create:
            raise StoreNotFoundError(
                f"No embedstore store at {str(root)!r} (no store.json). Create one with "
                "`embedstore extract STORE ...` or open_store(path, create=True)."
            )
        if root.exists() and not root.is_dir():
            raise StoreFormatError(f"Store path {str(root)!r} exists and is not a folder.")
        if root.is_dir() and any(root.iterdir()) and not doc_path.exists():  # (another creator?)
            raise StoreFormatError(
                f"Folder {str(root)!r} is not empty and is not an embedstore store; "
                "choose an empty or new folder."
            )
    if not doc_path.exists():
        # Build the skeleton beside the target and rename it into place: two processes creating
        # the same store at once (sharded extraction) then agree on one, and neither sees the
        # other's half-made folder as "not a store".
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for sub in ("sets", "failures", "locks", "runs"):
            (tmp / sub).mkdir()
        doc = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created_at": _iso(_utcnow()),
        }
        _atomic_write(tmp / "store.json", json.dumps(doc, indent=2).encode())
        try:
            os.rename(tmp, root)  # replaces a missing or empty folder atomically
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not doc_path.exists():
                raise StoreFormatError(
                    f"Folder {str(root)!r} is not empty and is not an embedstore store; "
                    "choose an empty or new folder."
                ) from None
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{str(doc_path)!r} is unreadable ({e}).") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{str(doc_path)!r} does not describe an embedstore store.")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise StoreFormatError(
            f"Store {str(root)!r} has schema_version {version!r}; this embedstore reads "
            f"schema_version {SCHEMA_VERSION}. "
            + ("Upgrade embedstore." if newer else "Re-extract into a new store.")
        )
    return Store(root, doc)


class Store:
    """An opened store folder. Cheap to create; reads nothing until asked."""

    def __init__(self, root: Path, doc: dict):
        self.root = root
        self.doc = doc
        self._catalogs: dict[tuple[str, int], tuple[tuple, Catalog]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def runs_dir(self) -> Path:
        d = self.root / "runs"
        d.mkdir(exist_ok=True)
        return d

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    # -- manifest -----------------------------------------------------------------------------
    def attach_manifest(self, table: Any, *, pair_max_gap_hours: float | None = None) -> None:
        """Copy a manifest (pyarrow.Table or Manifest) into the store; it backs `studies`/`pairs`."""
        from embedstore.manifest import validate_manifest

        if hasattr(table, "table") and isinstance(table.table, pa.Table):
            table = table.table
        if not isinstance(table, pa.Table):
            raise ManifestError(f"attach_manifest wants a pyarrow.Table, got {type(table).__name__}.")
        table = validate_manifest(table, check_paths=False)
        gap = DEFAULT_PAIR_MAX_GAP_HOURS if pair_max_gap_hours is None else float(pair_max_gap_hours)
        if not gap > 0:
            raise ConfigError(f"pair_max_gap_hours must be positive, got {pair_max_gap_hours!r}.")
        meta = {"pair_max_gap_hours": gap, "attached_at": _iso(_utcnow())}
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), _MANIFEST_META_KEY: json.dumps(meta).encode()}
        )
        tmp = self.root / f"manifest.parquet.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.manifest_path)
        fsync_dir(self.root)

    def _manifest_meta(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        md = pq.read_schema(self.manifest_path).metadata or {}
        try:
            return json.loads(md.get(_MANIFEST_META_KEY, b"{}"))
        except ValueError:
            return {}

    # -- writing ------------------------------------------------------------------------------
    def writer(
        self,
        modality: str,
        encoder_key: str,
        *,
        dim: int,
        spec: Mapping[str, Any],
        dtype: str = "float32",
        capacity: int | None = None,
        lock_scope: str | None = None,
        tokens_shape: tuple[int, ...] | None = None,
        **options: Any,
    ) -> StoreWriter:
        """A writer for one set (context manager). ``options``: chunk_rows, flush_rows,
        flush_interval_s, durability ("full" | "commit"). Raises StoreLockedError when another process holds the lock scope."""
        return StoreWriter(
            self,
            modality,
            encoder_key,
            dim=dim,
            spec=spec,
            dtype=dtype,
            capacity=capacity,
            lock_scope=lock_scope,
            tokens_shape=tokens_shape,
            **options,
        )

    # -- reading ------------------------------------------------------------------------------
    def _set_dirs(self) -> list[_SetDir]:
        out = []
        sets = self.root / "sets"
        if sets.is_dir():
            for mdir in sorted(p for p in sets.iterdir() if p.is_dir()):
                for kdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
                    if (kdir / "spec.json").exists():
                        out.append(_SetDir(self.root, mdir.name, kdir.name))
        return out

    def _set(self, modality: str, encoder_key: str) -> _SetDir:
        sd = _SetDir(self.root, _check_modality(modality), str(encoder_key))
        if not (sd.path / "spec.json").exists():
            have = [s.name for s in self._set_dirs()]
            raise StoreNotFoundError(
                f"No embedding set {sd.name!r} in store {str(self.root)!r}. "
                f"Available: {have or 'none (run `embedstore extract` first)'}."
            )
        return sd

    def load(
        self,
        modality: str,
        encoder_key: str,
        *,
        where: str | None = None,
        study_ids: Iterable[str] | None = None,
    ) -> EmbeddingSet:
        """Load a set (optionally a cohort) as one contiguous float32 array, ordered by study_id.

        ``where`` is a SQL predicate over the ``studies`` view; ``study_ids`` restricts further.
        """
        sd = self._set(modality, encoder_key)
        doc = sd.doc()
        live = sd.live()
        table = live.table
        if where is not None:
            ids = self.sql(f"SELECT DISTINCT study_id FROM studies WHERE {where}")["study_id"]
            table = table.filter(pc.is_in(table["study_id"], value_set=ids.combine_chunks()))
        if study_ids is not None:
            wanted = pa.array([str(s) for s in study_ids], pa.string())
            table = table.filter(pc.is_in(table["study_id"], value_set=wanted))
        n = table.num_rows
        vectors = np.empty((n, int(doc["dim"])), dtype=np.float32)  # (N, D)
        _read_rows_for(table, live.segments, "embeddings.zarr", vectors)
        tokens = None
        if doc.get("tokens_shape"):
            tokens = np.empty((n, *doc["tokens_shape"]), dtype=np.float32)  # (N, S, Dt)
            _read_rows_for(table, live.segments, "tokens.zarr", tokens)
        meta = pa.table(
            {
                "row": pa.array(np.arange(n, dtype=np.int64)),
                "study_id": table["study_id"],
                "patient_id": table["patient_id"],
                "cache_key": table["cache_key"],
                "content_hash": table["content_hash"],
                "created_at": table["created_at"],
            }
        )
        return EmbeddingSet(sd.modality, sd.encoder_key, vectors, meta, doc.get("spec", {}), tokens)

    def sets(self) -> list[SetInfo]:
        """Every embedding set with its live row count."""
        out = []
        for sd in self._set_dirs():
            doc = sd.doc()
            live = sd.live()
            out.append(
                SetInfo(
                    modality=sd.modality,
                    encoder_key=sd.encoder_key,
                    dim=int(doc["dim"]),
                    dtype=str(doc["dtype"]),
                    count=live.table.num_rows,
                    spec=doc.get("spec", {}),
                    tokens_shape=tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None,
                    segments=len(live.segments),
                    superseded=live.superseded,
                )
            )
        return out

    def failures(self) -> pa.Table:
        """Every failure record (torn last lines of a killed writer are skipped)."""
        rows = []
        fdir = self.root / "failures"
        if fdir.is_dir():
            for p in sorted(fdir.glob("*.jsonl")):
                for line in p.read_bytes().split(b"\n"):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    rec["created_at"] = _micros(rec["created_at"]) if rec.get("created_at") else None
                    rows.append(rec)
        cols = {}
        for f in FAILURES_SCHEMA:
            vals = [r.get(f.name) for r in rows]
            if f.name == "created_at":
                cols[f.name] = pa.array(vals, pa.int64()).cast(f.type)
            else:
                cols[f.name] = pa.array([None if v is None else str(v) for v in vals], f.type)
        return pa.table(cols, schema=FAILURES_SCHEMA)

    # -- SQL ----------------------------------------------------------------------------------
    def _signature(self) -> tuple:
        sig: list = []
        for p in [self.manifest_path]:
            st = p.stat() if p.exists() else None
            sig.append(None if st is None else (st.st_mtime_ns, st.st_size))
        for sd in self._set_dirs():
            for seg in sd.segments():
                log = seg / "commits.jsonl"
                sig.append((seg.name, log.stat().st_size if log.exists() else -1))
        for sub in ("failures", "runs"):
            d = self.root / sub
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    q = p / "config.json" if p.is_dir() else p
                    try:
                        st = q.stat()
                        sig.append((p.name, st.st_mtime_ns, st.st_size))
                    except FileNotFoundError:
                        sig.append((p.name,))
        return tuple(sig)

    def _embeddings_table(self) -> pa.Table:
        parts = []
        for sd in self._set_dirs():
            t = sd.live().table
            n = t.num_rows
            parts.append(
                pa.table(
                    {
                        "study_id": t["study_id"],
                        "patient_id": t["patient_id"],
                        "modality": pa.array([sd.modality] * n, pa.string()),
                        "encoder_key": pa.array([sd.encoder_key] * n, pa.string()),
                        "content_hash": t["content_hash"],
                        "cache_key": t["cache_key"],
                        "row": pa.array(np.arange(n, dtype=np.int64)),
                        "created_at": t["created_at"],
                    },
                    schema=EMBEDDINGS_SCHEMA,
                )
            )
        return pa.concat_tables(parts) if parts else EMBEDDINGS_SCHEMA.empty_table()

    def catalog(self, *, memory_limit: str = "2GB", threads: int = 2) -> Catalog:
        """The sandboxed DuckDB catalog, rebuilt when the store's files changed."""
        key = (str(memory_limit), int(threads))
        sig = self._signature()
        cached = self._catalogs.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        if cached is not None:
            cached[1].close()
        gap = self._manifest_meta().get("pair_max_gap_hours", DEFAULT_PAIR_MAX_GAP_HOURS)
        cat = Catalog(
            self.root,
            manifest_path=self.manifest_path if self.manifest_path.exists() else None,
            embeddings=self._embeddings_table(),
            failures=self.failures(),
            runs=read_runs(self.root / "runs"),
            pair_max_gap_hours=float(gap),
            memory_limit=memory_limit,
            threads=threads,
        )
        self._catalogs[key] = (sig, cat)
        return cat

    def sql(self, sql: str, *, timeout_s: float = 30, memory_limit: str = "2GB") -> pa.Table:
        """Run one read-only SELECT over the catalog views; QueryRefusedError / QueryError."""
        return self.catalog(memory_limit=memory_limit).sql(sql, timeout_s=timeout_s)

    def refresh(self) -> None:
        """Drop the cached catalogs (they are also rebuilt automatically when files change)."""
        for _, cat in self._catalogs.values():
            cat.close()
        self._catalogs.clear()

    # -- info / verify / gc -------------------------------------------------------------------
    def info(self) -> dict:
        """What is in the store: sets with specs and counts, failures by reason, size on disk."""
        size = 0
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                try:
                    size += os.lstat(os.path.join(dirpath, f)).st_size
                except FileNotFoundError:
                    pass
        fails = self.failures()
        by_reason: dict[str, int] = {}
        for r in fails["reason"].to_pylist():
            by_reason[r] = by_reason.get(r, 0) + 1
        sets = self.sets()
        manifest_rows = pq.read_metadata(self.manifest_path).num_rows if self.manifest_path.exists() else None
        runs = self.root / "runs"
        return {
            "root": str(self.root),
            "schema_version": self.doc.get("schema_version"),
            "created_at": self.doc.get("created_at"),
            "manifest_rows": manifest_rows,
            "modalities": sorted({s.modality for s in sets}),
            "encoder_keys": sorted({s.encoder_key for s in sets}),
            "sets": [s.to_dict() for s in sets],
            "segments": sum(s.segments for s in sets),
            "embeddings": sum(s.count for s in sets),
            "failures": {"total": fails.num_rows, "by_reason": dict(sorted(by_reason.items()))},
            "runs": sum(1 for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else 0,
            "size_bytes": size,
        }

    def verify(self) -> VerifyReport:
        """Check every committed row (checksum, shape, fill value, metadata); modify nothing."""
        problems: list[Problem] = []
        rows_checked = 0
        manifest_mod: dict[str, str] = {}
        if self.manifest_path.exists():
            m = pq.read_table(self.manifest_path, columns=["study_id", "modality"])
            manifest_mod = dict(zip(m["study_id"].to_pylist(), m["modality"].to_pylist(), strict=True))
        for tmp in sweep_partials(self.root / "sets", dry_run=True):
            problems.append(
                Problem("orphan_temp_file", str(tmp.relative_to(self.root)),
                        "temp file left by a killed writer (removed by the next writer or gc)",
                        "warning")
            )
        set_dirs = self._set_dirs()
        for sd in set_dirs:
            try:
                doc = sd.doc()
            except (StoreCorruptError, StoreNotFoundError) as e:
                problems.append(Problem("bad_spec", str(sd.path.relative_to(self.root)), str(e)))
                continue
            dim, dtype = int(doc["dim"]), np.dtype(doc["dtype"])
            tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
            for seg in sd.segments():
                rows_checked += self._verify_segment(sd, seg, dim, dtype, tshape, manifest_mod, problems)
        return VerifyReport(tuple(problems), len(set_dirs), rows_checked)

    def _verify_segment(self, sd, seg, dim, dtype, tshape, manifest_mod, problems) -> int:
        rel = str(seg.relative_to(self.root))
        try:
            t, _, notes = _parse_commit_log(seg / "commits.jsonl")
        except StoreCorruptError as e:
            problems.append(Problem("commit_log_damaged", rel, str(e)))
            return 0
        for note in notes:
            problems.append(Problem("torn_commit_line", rel, note, "warning"))
        if t.num_rows == 0:
            problems.append(Problem("empty_segment", rel, "no committed rows (gc removes it)", "warning"))
            return 0
        for meta in (seg / "meta.parquet", seg / "meta.arrow"):
            if not meta.exists():
                continue
            try:
                if meta.suffix == ".arrow":
                    with pa.OSFile(str(meta), "rb") as f:
                        mt = pa.ipc.open_file(f).read_all()
                else:
                    mt = pq.read_table(meta)
                mt = mt.replace_schema_metadata(None)
                if mt.num_rows == t.num_rows and not mt.equals(t):
                    problems.append(Problem("meta_mismatch", rel, f"{meta.name} differs from commits.jsonl"))
            except (OSError, pa.ArrowInvalid) as e:
                problems.append(Problem("meta_unreadable", rel, f"{meta.name} unreadable: {e}", "warning"))
        offsets = t["offset"].to_numpy()
        if len(np.unique(offsets)) != len(offsets):
            problems.append(Problem("duplicate_offset", rel, "two commits name the same row offset"))
        checks = [("embeddings.zarr", (dim,), "crc32")]
        if tshape:
            checks.append(("tokens.zarr", tshape, "tokens_crc32"))
        sids = t["study_id"].to_pylist()
        for name, row_shape, crc_col in checks:
            try:
                arr = RowArray.open(seg / name)
            except (StoreCorruptError, StoreFormatError) as e:
                problems.append(Problem("array_unreadable", f"{rel}/{name}", str(e)))
                continue
            if arr.row_shape != tuple(row_shape) or arr.dtype != dtype:
                problems.append(Problem(
                    "shape_mismatch", f"{rel}/{name}",
                    f"array rows are {arr.row_shape} {arr.dtype}, spec.json says {tuple(row_shape)} {dtype}"))
                continue
            if offsets.max() >= arr.shape[0]:
                problems.append(Problem("offset_out_of_range", f"{rel}/{name}",
                                        f"commit offset {int(offsets.max())} >= array rows {arr.shape[0]}"))
                continue
            crcs = t[crc_col].to_pylist()
            cr = arr.chunk_rows
            for c in np.unique(offsets // cr):
                cpath = arr.chunk_path(int(c))
                in_chunk = np.flatnonzero(offsets // cr == c)
                try:
                    if arr.fast and cpath.stat().st_size != cr * arr.row_bytes:
                        raise StoreCorruptError(f"size {cpath.stat().st_size} != {cr * arr.row_bytes}")
                    lo = int(c) * cr
                    block = arr.read_rows(lo, min(arr.shape[0], lo + cr))
                except (StoreCorruptError, OSError) as e:
                    problems.append(Problem("chunk_unreadable", str(cpath.relative_to(self.root)),
                                            f"{e}; {in_chunk.size} committed row(s) affected",
                                            study_id=sids[int(in_chunk[0])]))
                    continue
                for i in in_chunk:
                    row = block[offsets[i] - lo]
                    sid = sids[int(i)]
                    if not np.isfinite(row).all():
                        problems.append(Problem("non_finite_row", f"{rel}/{name}",
                                                f"row {int(offsets[i])} holds NaN/inf", study_id=sid))
                    elif not row.any():
                        problems.append(Problem("fill_value_row", f"{rel}/{name}",
                                                f"row {int(offsets[i])} is all fill value (zeros)", study_id=sid))
                    if crcs[i] is not None and zlib.crc32(np.ascontiguousarray(row)) != crcs[i]:
                        problems.append(Problem("checksum_mismatch", f"{rel}/{name}",
                                                f"row {int(offsets[i])} bytes differ from their commit checksum",
                                                study_id=sid))
        if manifest_mod:
            for sid in set(sids):
                mod = manifest_mod.get(sid)
                if mod is None:
                    problems.append(Problem("not_in_manifest", rel,
                                            "study_id is not in the attached manifest (gc removes it)",
                                            "warning", study_id=sid))
                elif mod != sd.modality:
                    problems.append(Problem("modality_mismatch", rel,
                                            f"manifest says {mod}, stored under {sd.modality}", study_id=sid))
        return t.num_rows

    def gc(self, *, dry_run: bool = True, keep_sets: Iterable[str] | None = None) -> GcReport:
        """List (dry run) or remove superseded rows, rows/sets no longer referenced, orphan temp
        files and empty segments. ``keep_sets``: "MODALITY/encoder_key" names to keep; when
        given, every other set is unreferenced. Removal needs the whole-store lock."""
        lock = None if dry_run else _Lock(self.root, None).acquire()
        try:
            return self._gc(dry_run, None if keep_sets is None else {str(k) for k in keep_sets})
        finally:
            if lock is not None:
                lock.release()
                self.refresh()

    def _gc(self, dry_run: bool, keep: set[str] | None) -> GcReport:
        manifest_ids = None
        if self.manifest_path.exists():
            manifest_ids = pq.read_table(self.manifest_path, columns=["study_id"])["study_id"]
        superseded: dict[str, int] = {}
        unreferenced: dict[str, int] = {}
        drop_sets: list[_SetDir] = []
        empty: list[Path] = []
        compact: list[tuple[_SetDir, _Live, pa.Table]] = []
        host = socket.gethostname()
        for sd in self._set_dirs():
            if keep is not None and sd.name not in keep:
                drop_sets.append(sd)
                continue
            live = sd.live()
            table = live.table
            if manifest_ids is not None:
                table = table.filter(pc.is_in(table["study_id"], value_set=manifest_ids.combine_chunks()))
            superseded[sd.name] = live.superseded
            unreferenced[sd.name] = live.table.num_rows - table.num_rows
            used = set(np.unique(live.table["_seg"].to_numpy()).tolist())
            nonempty = 0
            for i, seg in enumerate(live.segments):
                if i in used or _segment_rows(seg).num_rows:
                    nonempty += 1
                    continue
                try:
                    info = json.loads((seg / "segment.json").read_text())
                except (OSError, ValueError):
                    info = {}
                pid = info.get("pid")
                if info.get("host") == host and isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid):
                    continue  # a live writer's fresh segment
                empty.append(seg)
            if live.superseded or unreferenced[sd.name] or nonempty > 1:
                compact.append((sd, live, table))
        temps = sweep_partials(self.root / "sets", dry_run=True)
        temps += sorted(p for p in self.root.rglob("*.tmp") if p.is_file())
        rel = lambda p: str(p.relative_to(self.root))  # noqa: E731
        freed = 0
        compacted: list[str] = []
        if not dry_run:
            for p in temps:
                freed += p.stat().st_size
                p.unlink(missing_ok=True)
            for sd in drop_sets:
                freed += _tree_size(sd.path)
                shutil.rmtree(sd.path)
            for seg in empty:
                freed += _tree_size(seg)
                shutil.rmtree(seg)
            for sd, live, table in compact:
                freed += self._compact(sd, live, table)
                compacted.append(sd.name)
        return GcReport(
            dry_run=dry_run,
            superseded_rows=superseded,
            unreferenced_rows=unreferenced,
            unreferenced_sets=tuple(sd.name for sd in drop_sets),
            orphan_temp_files=tuple(rel(p) for p in temps),
            empty_segments=tuple(rel(p) for p in empty),
            compacted_sets=tuple(compacted) if not dry_run else tuple(sd.name for sd, _, _ in compact),
            bytes_freed=freed,
        )

    def _compact(self, sd: _SetDir, live: _Live, table: pa.Table) -> int:
        """Rewrite ``table``'s rows into one new segment, then delete the old segments."""
        doc = sd.doc()
        dtype = np.dtype(doc["dtype"])
        tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
        old = [s for s in live.segments if s.exists()]
        before = sum(_tree_size(s) for s in old)
        n = table.num_rows
        stamp = _utcnow().strftime("%Y%m%dT%H%M%S%fZ")
        name = f"seg-{stamp}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmpdir = sd.path / f".compact-{name}"
        tmpdir.mkdir()
        info = {"schema_version": SCHEMA_VERSION, "pid": os.getpid(), "host": socket.gethostname(),
                "scope": "gc", "created_at": _iso(_utcnow())}
        _atomic_write(tmpdir / "segment.json", json.dumps(info, indent=2).encode())
        rec: dict[str, Any] = {"offset0": 0, "n": n}
        for name_, shape, crc_col in [("embeddings.zarr", (int(doc["dim"]),), "crc32")] + (
            [("tokens.zarr", tshape, "tokens_crc32")] if tshape else []
        ):
            data = np.empty((n, *shape), dtype=dtype)
            _read_rows_for(table, live.segments, name_, data)
            arr = RowArray.create(tmpdir / name_, row_shape=shape, dtype=dtype.name, capacity=max(n, 1))
            for c in range(-(-n // arr.chunk_rows)):
                arr.write_chunk(c, data[c * arr.chunk_rows : (c + 1) * arr.chunk_rows])
            arr.resize(n)
            fsync_dir(arr.path)
            rec[crc_col] = [zlib.crc32(r) for r in data]
        for col in ("study_id", "patient_id", "cache_key", "content_hash", "source_sig"):
            rec[col] = table[col].to_pylist()
        created = table["created_at"].cast(pa.int64()).to_pylist()
        rec["created_at"] = [_iso(_EPOCH + timedelta(microseconds=us)) for us in created]
        with open(tmpdir / "commits.jsonl", "wb") as f:
            f.write((json.dumps(rec, separators=(",", ":")) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        _write_meta(tmpdir, _parse_commit_log(tmpdir / "commits.jsonl")[0])
        fsync_dir(tmpdir)
        new = sd.path / name
        os.replace(tmpdir, new)  # the swap: from here on the new segment holds every live row
        fsync_dir(sd.path)
        for s in old:
            shutil.rmtree(s)
        return max(0, before - _tree_size(new))


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total
