"""`embedstore query`: read-only SQL over a store, as an Arrow table or serialised bytes.

The SQL sandbox itself is the catalog's (``Store.sql``); this module checks the output format,
serialises the result (csv, json records, parquet) and writes ``--out`` files crash-safely.
Showing a table on a terminal is the CLI's job.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError
from embedstore.store import open_store

__all__ = ["FORMATS", "QueryResult", "format_table", "query"]

FORMATS = ("table", "csv", "json", "parquet")


@dataclass(frozen=True)
class QueryResult:
    """A query's rows; ``data`` the serialised form (None for ``table`` to a terminal);
    ``path`` the file it was written to (None for stdout)."""

    table: pa.Table
    fmt: str
    data: bytes | None = None
    path: Path | None = None


def format_table(table: pa.Table, fmt: str) -> bytes:
    """Serialise a result as csv / json (records) / parquet bytes."""
    if fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        return buf.getvalue()
    if fmt == "json":
        return (json.dumps(table.to_pylist(), default=str, indent=1) + "\n").encode()
    if fmt == "parquet":
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    raise ConfigError(f"Unknown format {fmt!r}. Valid: {', '.join(FORMATS)}.")


def query(
    store_path: str | os.PathLike[str],
    sql: str,
    *,
    fmt: str = "table",
    out: str | os.PathLike[str] | None = None,
    timeout_s: float = 30.0,
) -> QueryResult:
    """Run one read-only SELECT; serialise it for ``fmt`` and write it to ``out`` when given.

    ``table`` written to a file is CSV. Parquet is binary, so it needs ``out``."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown format {fmt!r}. Valid: {', '.join(FORMATS)}.")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet needs --out FILE (Parquet is binary).")
    result = open_store(store_path).sql(sql, timeout_s=timeout_s)
    if fmt == "table" and out is None:
        return QueryResult(result, fmt)
    data = format_table(result, "csv" if fmt == "table" else fmt)
    if out is None:
        return QueryResult(result, fmt, data=data)
    path = Path(out)
    atomic_write_bytes(path, data)
    return QueryResult(result, fmt, data=data, path=path)
