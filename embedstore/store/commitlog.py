"""The commit log of a segment: the only code that encodes or parses a commit record (and a failure
record). Format and write protocol: docs/STORE_FORMAT.md, "Commit parts".

A segment's commit log is a sequence of **parts** under ``<segment>/commits/``: Parquet files named
``<first>-<last>.parquet`` (8-digit sequence numbers), each written once (``Backend.put_once``)
and never changed. A writer's flush publishes one part ``<n>-<n>.parquet``; merging replaces a
run of parts by one part ``<first>-<last>.parquet`` covering them, written before the covered
parts are deleted. A reader uses every part not covered by a wider one, so it sees the same rows
before, during and after a merge. A row exists once the part holding it is published.

Failure records use the same mechanism under ``failures/<segment>/``.

schema_version 1 stores held one JSON line per batch in ``commits.jsonl`` and
``failures/<segment>.jsonl``; `parse_v1_log` / `parse_v1_failures` read them for
``embedstore upgrade`` only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._faults import PutFaults
from embedstore.errors import StoreCorruptError
from embedstore.store._arrow import from_np, sort_indices, strings
from embedstore.store._backend import Backend
from embedstore.store.format import SCHEMA_VERSION, micros

__all__ = [
    "COMMIT_SCHEMA",
    "FAILURES_SCHEMA",
    "PART_META_KEY",
    "CommitRecord",
    "PartInfo",
    "PartLog",
    "commit_table",
    "encode_part",
    "failure_table",
    "live_parts",
    "part_name",
    "read_part_info",
    "read_parquet",
    "read_parts",
    "merge_parts",
    "parse_v1_log",
    "parse_v1_failures",
]

UTC_US = pa.timestamp("us", tz="UTC")
# The commit rows of a segment: one row per committed array row (the part's column order).
COMMIT_SCHEMA = pa.schema(
    [
        ("array_row", pa.int64()),  # row of the segment's arrays
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("cache_key", pa.string()),
        ("content_hash", pa.string()),
        ("source_sig", pa.string()),
        ("crc32", pa.uint32()),  # zlib CRC-32 of the row's stored bytes
        ("tokens_crc32", pa.uint32()),
        ("created_at", UTC_US),
    ]
)
FAILURES_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("modality", pa.string()),
        ("encoder_key", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),
        ("created_at", UTC_US),
        ("segment", pa.string()),
    ]
)
PART_META_KEY = b"embedstore.part"  # Parquet key-value metadata of every part (JSON)
_KINDS = {"commits": COMMIT_SCHEMA, "failures": FAILURES_SCHEMA}
_NAME_RE = re.compile(r"^(\d{8})-(\d{8})\.parquet$")
_ROW_GROUP = 131072
# Per-row hashes do not compress and make dictionaries useless; statistics only where a reader
# prunes with them (study_id ranges, array_row).
_DICT_COLS = {"commits": ["patient_id", "created_at", "tokens_crc32"],
              "failures": ["modality", "encoder_key", "stage", "reason", "segment", "created_at"]}
_STATS_COLS = {"commits": ["study_id", "array_row"], "failures": ["study_id"]}


def part_name(first: int, last: int) -> str:
    return f"{first:08d}-{last:08d}.parquet"


def _parse_name(name: str) -> tuple[int, int] | None:
    m = _NAME_RE.match(name)
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    return (first, last) if first <= last else None


def live_parts(names: Iterable[str]) -> list[tuple[int, int, str]]:
    """The parts a reader uses, as (first, last, name) in sequence order: every part not covered
    by a wider one. Other names (temp files) are ignored. Two parts that overlap without one
    covering the other cannot come from the write protocol: StoreCorruptError."""
    ranges = sorted((r[0], -r[1], n) for n in names if (r := _parse_name(n)) is not None)
    out: list[tuple[int, int, str]] = []
    for first, neg_last, name in ranges:  # by first, widest first
        last = -neg_last
        if out and last <= out[-1][1]:
            continue  # covered by the previous (wider or equal) part
        if out and first <= out[-1][1]:
            raise StoreCorruptError(
                f"Commit parts {out[-1][2]!r} and {name!r} overlap without one covering the "
                "other; run `embedstore verify`."
            )
        out.append((first, last, name))
    return out


@dataclass(frozen=True)
class PartInfo:
    """What a part's footer says: its rows and (commit parts) where they sit and how ordered."""

    key: str
    first: int
    last: int
    rows: int
    row0: int = 0  # array_row of its first row (commit parts)
    sorted: bool = False  # study_id strictly increasing within the part
    min_id: str | None = None
    max_id: str | None = None


def read_part_info(backend: Backend, key: str, kind: str = "commits") -> PartInfo:
    """A part's footer (no data pages read); StoreCorruptError when it is not a part of ``kind``."""
    path = backend.local_path(key)
    name = key.rsplit("/", 1)[-1]
    rng = _parse_name(name)
    try:
        md = pq.read_metadata(path)
        kv = json.loads((md.metadata or {})[PART_META_KEY])
        schema = md.schema.to_arrow_schema()
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError, pa.ArrowException) as e:
        raise StoreCorruptError(
            f"Part {path!r} is unreadable ({type(e).__name__}: {e}); run `embedstore verify`."
        ) from e
    want = _KINDS[kind]
    if (rng is None or kv.get("kind") != kind or [kv.get("first"), kv.get("last")] != list(rng)
            or kv.get("rows") != md.num_rows
            or [(f.name, f.type) for f in schema] != [(f.name, f.type) for f in want]):
        raise StoreCorruptError(
            f"Part {path!r} does not match its name or the {kind} schema; run `embedstore verify`."
        )
    return PartInfo(key=key, first=rng[0], last=rng[1], rows=md.num_rows,
                    row0=int(kv.get("row0", 0)), sorted=bool(kv.get("sorted", False)),
                    min_id=kv.get("min"), max_id=kv.get("max"))


def read_parquet(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """One Parquet file (or its ``columns``). ``pq.ParquetFile`` rather than ``pq.read_table``:
    the latter imports pyarrow.dataset, ~0.5 s on the first call of every process."""
    with pq.ParquetFile(path) as pf:
        return pf.read(columns=list(columns) if columns is not None else None)


def read_parts(backend: Backend, parts: Sequence[PartInfo], columns: Sequence[str] | None = None,
               kind: str = "commits") -> pa.Table:
    """The rows of ``parts`` (in order) as one table of the ``kind`` schema (or ``columns``)."""
    schema = _KINDS[kind]
    cols = list(columns) if columns is not None else schema.names
    tables = []
    for p in parts:
        path = backend.local_path(p.key)
        try:
            t = read_parquet(path, cols)
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StoreCorruptError(f"Part {path!r} is unreadable ({e}); run `embedstore verify`.") from e
        tables.append(t.replace_schema_metadata(None))
    if not tables:
        return pa.schema([schema.field(c) for c in cols]).empty_table()
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _table_meta(table: pa.Table, kind: str, first: int, last: int) -> dict:
    meta: dict = {"kind": kind, "schema_version": SCHEMA_VERSION, "first": first, "last": last,
                  "rows": table.num_rows}
    if kind == "commits":
        sid = table["study_id"]
        n = table.num_rows
        meta["row0"] = int(pc.min(table["array_row"]).as_py()) if n else 0
        meta["sorted"] = bool(n < 2 or pc.all(pc.less(sid[:-1], sid[1:])).as_py())
        if n:
            mm = pc.min_max(sid).as_py()
            meta["min"], meta["max"] = mm["min"], mm["max"]
    return meta


def encode_part(table: pa.Table, kind: str, first: int, last: int) -> pa.Buffer:
    """A part's bytes: ``table`` (of the kind's schema) as Parquet with its key-value metadata."""
    schema = _KINDS[kind]
    if table.schema.remove_metadata() != schema:
        raise ValueError(f"internal error: a {kind} part needs schema {schema}, got {table.schema}")
    meta = _table_meta(table, kind, first, last)
    table = table.replace_schema_metadata({PART_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=_ROW_GROUP,
                   use_dictionary=_DICT_COLS[kind], write_statistics=_STATS_COLS[kind])
    return sink.getvalue()


@dataclass(frozen=True)
class CommitRecord:
    """One committed batch: rows ``offset0 .. offset0 + n - 1`` of the segment's arrays."""

    offset0: int
    study_id: list[str]
    patient_id: list[str]
    cache_key: list[str]
    content_hash: list[str]
    crc32: Sequence[int]  # zlib CRC-32 of each row's stored bytes
    created_at: str | list[str]  # one ISO time for the batch, or one per row
    source_sig: list[str | None] | None = None
    tokens_crc32: Sequence[int] | None = None

    @property
    def n(self) -> int:
        return len(self.study_id)

    def to_table(self) -> pa.Table:
        """The record's rows as a COMMIT_SCHEMA table."""
        n = self.n
        if isinstance(self.created_at, list):
            created = np.array([micros(c) for c in self.created_at], np.int64)
        else:
            created = np.full(n, micros(self.created_at), np.int64)
        cols = [
            from_np(np.arange(self.offset0, self.offset0 + n, dtype=np.int64)),
            strings(self.study_id),
            strings(self.patient_id),
            strings(self.cache_key),
            strings(self.content_hash),
            strings(self.source_sig if self.source_sig is not None else [None] * n),
            from_np(np.asarray(self.crc32, dtype=np.uint32)),
            (pa.nulls(n, pa.uint32()) if self.tokens_crc32 is None
             else from_np(np.asarray(self.tokens_crc32, dtype=np.uint32))),
            from_np(created, UTC_US),
        ]
        if any(len(c) != n for c in cols):
            raise ValueError("commit record columns differ in length")
        return pa.Table.from_arrays(cols, schema=COMMIT_SCHEMA)


def _column(values, type: pa.DataType) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if values.type == type else values.cast(type)
    if isinstance(values, np.ndarray):
        return from_np(values, type)
    if pa.types.is_string(type):
        return strings(values)
    return pa.array(values, type)


def commit_table(columns: dict) -> pa.Table:
    """A COMMIT_SCHEMA table from columns (Arrow or numpy arrays, or lists), cast to its types
    (created_at may be int64 microseconds)."""
    return pa.Table.from_arrays([_column(columns[f.name], f.type) for f in COMMIT_SCHEMA],
                                schema=COMMIT_SCHEMA)


def failure_table(rows: Sequence[dict]) -> pa.Table:
    """A FAILURES_SCHEMA table from failure dicts (``created_at`` an ISO time string)."""
    cols = []
    for f in FAILURES_SCHEMA:
        vals = [r.get(f.name) for r in rows]
        if f.name == "created_at":
            cols.append(from_np(np.array([micros(v) for v in vals], np.int64), UTC_US))
        else:
            cols.append(strings([None if v is None else str(v) for v in vals]))
    return pa.Table.from_arrays(cols, schema=FAILURES_SCHEMA)


# Faults at the steps of a commit part's publication (tests/test_store_crash.py).
_COMMIT_FAULTS = PutFaults(mid_write="mid_commit", before_fsync="before_fsync",
                           before_publish="before_publish", after_publish="after_fsync")


class PartLog:
    """The parts of one writer session under ``prefix``: each append publishes the next one."""

    def __init__(self, backend: Backend, prefix: str, kind: str):
        self.backend = backend
        self.prefix = prefix
        self.kind = kind
        self.seq = 0
        self.published: list[PartInfo] = []

    def append(self, table: pa.Table) -> PartInfo:
        """Publish ``table`` as the next part; when this returns, its rows exist."""
        data = encode_part(table, self.kind, self.seq, self.seq)
        key = f"{self.prefix}/{part_name(self.seq, self.seq)}"
        self.backend.put_once(key, memoryview(data),
                              faults=_COMMIT_FAULTS if self.kind == "commits" else PutFaults())
        info = PartInfo(key=key, first=self.seq, last=self.seq, rows=table.num_rows,
                        row0=int(table["array_row"][0].as_py()) if self.kind == "commits"
                        and table.num_rows else 0)
        self.published.append(info)
        self.seq += 1
        return info


_MERGE_FAULTS = PutFaults(after_publish="merge_after_publish")


def merge_parts(backend: Backend, prefix: str, kind: str = "commits", *,
                sort: bool = False) -> int:
    """Replace the live parts under ``prefix`` by one part covering them all. Crash-safe: the
    merged part is published before the parts it covers are deleted, and a reader uses either.
    Streams part by part (memory: one part); with ``sort`` (commit parts), writes the rows in
    study_id order instead (memory: every row's metadata), so that readers need no sort.
    Returns the number of files removed."""
    names = backend.list(prefix)
    parts = [read_part_info(backend, f"{prefix}/{n}", kind) for _, _, n in live_parts(names)]
    if len(parts) < 2:
        return 0
    first, last = parts[0].first, parts[-1].last
    key = f"{prefix}/{part_name(first, last)}"
    if sort:
        table = read_parts(backend, parts, kind=kind)
        table = table.take(from_np(sort_indices(table["study_id"].combine_chunks())))
        data = encode_part(table, kind, first, last)
        backend.put_once(key, memoryview(data), faults=_MERGE_FAULTS)
    else:
        meta: dict = {"kind": kind, "schema_version": SCHEMA_VERSION, "first": first,
                      "last": last, "rows": sum(p.rows for p in parts)}
        if kind == "commits":
            full = [p for p in parts if p.rows]
            meta["row0"] = min((p.row0 for p in full), default=0)
            meta["sorted"] = all(p.sorted for p in full) and all(
                a.max_id < b.min_id for a, b in zip(full, full[1:], strict=False))
            if full:
                meta["min"] = min(p.min_id for p in full)
                meta["max"] = max(p.max_id for p in full)
        schema = _KINDS[kind].with_metadata(
            {PART_META_KEY: json.dumps(meta, sort_keys=True).encode()})
        with backend.open_write(key, faults=_MERGE_FAULTS) as f:
            with pq.ParquetWriter(f, schema, compression="zstd", use_dictionary=_DICT_COLS[kind],
                                  write_statistics=_STATS_COLS[kind]) as w:
                for p in parts:
                    w.write_table(read_parts(backend, [p], kind=kind), row_group_size=_ROW_GROUP)
    removed = 0
    for n in names:  # everything the merged part covers, including older covered leftovers
        r = _parse_name(n)
        if r is not None and first <= r[0] and r[1] <= last and (r[0], r[1]) != (first, last):
            backend.delete(f"{prefix}/{n}")
            removed += 1
    return removed


# -- schema_version 1 (read by `embedstore upgrade` only) ---------------------------------------
_V1_ID_COLUMNS = ("study_id", "patient_id", "cache_key", "content_hash")


def _v1_record(line: bytes) -> dict:
    rec = json.loads(line)
    n = int(rec["n"])
    cols = {k: list(rec[k]) for k in (*_V1_ID_COLUMNS, "crc32")}
    for k in ("source_sig", "tokens_crc32"):
        cols[k] = list(rec[k]) if rec.get(k) else [None] * n
    created = rec["created_at"]
    created = [micros(c) for c in created] if isinstance(created, list) else [micros(created)] * n
    if any(len(v) != n for v in (*cols.values(), created)):
        raise ValueError("column lengths differ from n")
    off0 = int(rec["offset0"])
    return {"array_row": list(range(off0, off0 + n)), **cols, "created_at": created}


def parse_v1_log(data: bytes) -> tuple[pa.Table, list[str]]:
    """A schema_version 1 ``commits.jsonl`` -> (COMMIT_SCHEMA rows, notes about a torn tail).
    A damaged line followed by more lines is corruption (StoreCorruptError)."""
    lines = data.split(b"\n")
    cols: dict[str, list] = {f.name: [] for f in COMMIT_SCHEMA}
    notes: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = _v1_record(line)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if b"".join(lines[i + 1 :]).strip():
                raise StoreCorruptError(
                    f"schema_version 1 commit log line {i + 1} is damaged ({e}) and is followed "
                    "by more records."
                ) from e
            notes.append(f"torn last commit line ({len(line)} bytes) ignored")
            break
        for k, v in rec.items():
            cols[k].extend(v)
    cols["created_at"] = pa.array(cols["created_at"], pa.int64()).cast(UTC_US)
    return commit_table(cols), notes


def parse_v1_failures(data: bytes) -> pa.Table:
    """A schema_version 1 ``failures/<segment>.jsonl`` (torn or bad lines skipped)."""
    rows = []
    for line in data.split(b"\n"):
        try:
            rec = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(rec, dict):
            rows.append(rec)
    return failure_table(rows)
