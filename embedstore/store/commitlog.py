"""The commit log of a segment (``commits.jsonl``): the only code that encodes or parses a commit
record. Format and write protocol: docs/STORE_FORMAT.md, "Commit log".

One JSON line per flushed batch, column-oriented. A row exists once the line holding it is
fsync'ed; a torn last line (a writer killed mid-append) commits nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from embedstore._fsio import fsync_dir
from embedstore.errors import StoreCorruptError
from embedstore.store._faults import fault_point, fault_write
from embedstore.store.format import micros

# The commit rows of a segment as a table: one row per committed array row.
COMMIT_SCHEMA = pa.schema(
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
_ID_COLUMNS = ("study_id", "patient_id", "cache_key", "content_hash")


@dataclass(frozen=True)
class CommitRecord:
    """One committed batch: rows ``offset0 .. offset0 + n - 1`` of the segment's arrays."""

    offset0: int
    study_id: list[str]
    patient_id: list[str]
    cache_key: list[str]
    content_hash: list[str]
    crc32: list[int]  # zlib CRC-32 of each row's stored bytes
    created_at: str | list[str]  # one time for the batch, or one per row (gc compaction)
    source_sig: list[str | None] | None = None
    tokens_crc32: list[int] | None = None

    @property
    def n(self) -> int:
        return len(self.study_id)

    def to_line(self) -> bytes:
        """The record as one commit-log line (the key order is part of the byte format)."""
        rec: dict = {
            "offset0": int(self.offset0),
            "n": self.n,
            "created_at": self.created_at,
            "study_id": self.study_id,
            "patient_id": self.patient_id,
            "cache_key": self.cache_key,
            "content_hash": self.content_hash,
            "crc32": self.crc32,
        }
        if self.source_sig is not None and any(s is not None for s in self.source_sig):
            rec["source_sig"] = self.source_sig
        if self.tokens_crc32 is not None:
            rec["tokens_crc32"] = self.tokens_crc32
        return (json.dumps(rec, separators=(",", ":")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes) -> CommitRecord:
        """Parse one line; ValueError when it is not one whole, consistent record."""
        try:
            rec = json.loads(line)
            n = int(rec["n"])
            cols = {k: list(rec[k]) for k in (*_ID_COLUMNS, "crc32")}
            optional = {k: rec.get(k) or None for k in ("source_sig", "tokens_crc32")}
            created = rec["created_at"]
            per_row = [*cols.values(), *(v for v in optional.values() if v is not None)]
            if isinstance(created, list):
                per_row.append(created)
            if any(len(v) != n for v in per_row):
                raise ValueError("column lengths differ from n")
            record = cls(offset0=int(rec["offset0"]), created_at=created, **cols, **optional)
            record.created_micros()  # a malformed time is a damaged line too
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{type(e).__name__}: {e}") from e
        return record

    def created_micros(self) -> list[int]:
        if isinstance(self.created_at, list):
            return [micros(c) for c in self.created_at]
        return [micros(self.created_at)] * self.n

    def to_table(self) -> pa.Table:
        """The record's rows as a COMMIT_SCHEMA table (what parse_commit_log gives for it)."""
        return _Columns().add(self).table()


class _Columns:
    """Accumulates records column by column into one COMMIT_SCHEMA table."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {name: [] for name in COMMIT_SCHEMA.names}

    def add(self, r: CommitRecord) -> _Columns:
        n, c = r.n, self.cols
        c["offset"].extend(range(r.offset0, r.offset0 + n))
        for k in _ID_COLUMNS:
            c[k].extend(getattr(r, k))
        c["source_sig"].extend(r.source_sig or [None] * n)
        c["crc32"].extend(r.crc32)
        c["tokens_crc32"].extend(r.tokens_crc32 or [None] * n)
        c["created_at"].extend(r.created_micros())
        return self

    def table(self) -> pa.Table:
        arrays = [
            pa.array(self.cols[f.name], type=pa.int64() if f.name == "created_at" else f.type)
            for f in COMMIT_SCHEMA
        ]
        arrays[-1] = arrays[-1].cast(COMMIT_SCHEMA.field("created_at").type)
        return pa.Table.from_arrays(arrays, schema=COMMIT_SCHEMA)


def parse_commit_log(path: Path) -> tuple[pa.Table, int, list[str]]:
    """Commit records of one segment -> (rows table, bytes consumed, notes about a torn tail).

    A torn (incomplete) last line is a writer killed mid-append: its rows were never committed
    and it is ignored. A bad line followed by more lines is corruption.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return COMMIT_SCHEMA.empty_table(), 0, []
    lines = data.split(b"\n")
    cols = _Columns()
    notes: list[str] = []
    consumed = 0
    for i, line in enumerate(lines):
        if not line.strip():
            consumed += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            record = CommitRecord.from_line(line)
        except ValueError as e:
            rest = b"".join(lines[i + 1 :]).strip()
            if rest:
                raise StoreCorruptError(
                    f"Commit log {str(path)!r} line {i + 1} is damaged ({e}) and is followed by "
                    "more records; run `embedstore verify`."
                ) from e
            notes.append(f"torn last commit line ({len(line)} bytes) ignored")
            break
        consumed += len(line) + (1 if i < len(lines) - 1 else 0)
        cols.add(record)
    return cols.table(), consumed, notes


class CommitLog:
    """A segment's log, appended to by its one writer session; opened on the first append."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def append(self, record: CommitRecord) -> None:
        """Append one record and fsync it: when this returns, the record's rows exist."""
        line = record.to_line()
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            fsync_dir(self.path.parent)
        fault_write(self._fd, line, "mid_commit")
        fault_point("before_fsync")
        os.fsync(self._fd)
        fault_point("after_fsync")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_commit_log(path: Path, records: list[CommitRecord]) -> None:
    """Write a whole new log (gc compaction builds one in a folder it renames into place)."""
    with open(path, "wb") as f:
        f.write(b"".join(r.to_line() for r in records))
        f.flush()
        os.fsync(f.fileno())
