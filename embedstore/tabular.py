"""Presenting store content: query results in several formats, info / verify / gc reports.

The CLI calls one function here per command; these functions do the printing so that the
library's own objects (pyarrow tables, report dataclasses) stay free of presentation.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from rich import box
from rich.table import Table

from embedstore.errors import ConfigError
from embedstore.progress import console
from embedstore.store import open_store

__all__ = [
    "FORMATS",
    "format_table",
    "query_to_output",
    "rich_table",
    "show_info",
    "show_verify",
    "show_gc",
    "show_encoders",
]

FORMATS = ("table", "csv", "json", "parquet")


def _emit_json(obj: Any) -> None:
    """Raw JSON on stdout (rich would wrap long lines and break it)."""
    console.file.write(json.dumps(obj, indent=2, default=str) + "\n")


def rich_table(table: pa.Table, *, title: str | None = None, max_rows: int = 200) -> Table:
    t = Table(title=title, show_lines=False)
    for name in table.column_names:
        t.add_column(name, overflow="fold")
    for row in table.slice(0, max_rows).to_pylist():
        t.add_row(*("" if v is None else _cell(v) for v in row.values()))
    if table.num_rows > max_rows:
        t.caption = f"{table.num_rows - max_rows} more rows not shown (use --format csv --out FILE)"
    return t


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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


def query_to_output(
    store_path: str | os.PathLike[str],
    sql: str,
    *,
    fmt: str = "table",
    out: Path | None = None,
    timeout_s: float = 30.0,
) -> pa.Table:
    """Run read-only SQL on the store and print or write the result."""
    if fmt not in FORMATS:
        raise ConfigError(f"Unknown format {fmt!r}. Valid: {', '.join(FORMATS)}.")
    if fmt == "parquet" and out is None:
        raise ConfigError("--format parquet needs --out FILE (Parquet is binary).")
    result = open_store(store_path).sql(sql, timeout_s=timeout_s)
    if fmt == "table" and out is None:
        console.print(rich_table(result))
        return result
    data = format_table(result, "csv" if fmt == "table" else fmt)
    if out is None:
        console.file.write(data.decode())
    else:
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, out)
        console.print(f"Wrote {result.num_rows} rows to {out}")
    return result


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def show_info(store_path: str | os.PathLike[str], *, as_json: bool = False) -> dict[str, Any]:
    info = _jsonable(open_store(store_path).info())
    if as_json:
        _emit_json(info)
        return info
    t = Table(title=f"embedstore {info.get('root', store_path)}", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("modality", "encoder key", "family", "dim", "dtype", "rows", "old rows"):
        t.add_column(col, no_wrap=True)
    for s in info.get("sets", []):
        t.add_row(str(s.get("modality")), str(s.get("encoder_key")),
                  str((s.get("spec") or {}).get("encoder", {}).get("family", "")),
                  str(s.get("dim")), str(s.get("dtype")), str(s.get("count")),
                  str(s.get("superseded", 0)))
    console.print(t)
    extra = [f"studies in manifest: {info.get('manifest_rows', 0)}",
             f"runs: {info.get('runs', 0)}",
             f"size on disk: {_size(float(info.get('size_bytes', 0)))}",
             f"schema_version: {info.get('schema_version')}"]
    fails = (info.get("failures") or {}).get("by_reason") or {}
    if fails:
        extra.append("failures: " + ", ".join(f"{k} x{v}" for k, v in fails.items()))
    console.print("; ".join(extra))
    return info


def show_verify(store_path: str | os.PathLike[str], *, as_json: bool = False) -> bool:
    """Print the verify report; return True when the store has no errors."""
    rep = open_store(store_path).verify()
    d = rep.to_dict()
    if as_json:
        _emit_json(d)
    elif d["problems"]:
        console.print(f"{len(d['problems'])} problem(s) in {d['rows_checked']} committed rows of "
                      f"{d['sets_checked']} set(s) (nothing was modified):")
        for p in d["problems"]:
            console.print("  - " + ", ".join(f"{k}={v}" for k, v in p.items() if v not in (None, "")),
                          markup=False)
    else:
        console.print(f"OK: {d['rows_checked']} committed rows in {d['sets_checked']} set(s) "
                      "verified, no problems.")
    return rep.ok


def show_gc(store_path: str | os.PathLike[str], *, apply: bool) -> dict[str, Any]:
    """Print what gc would remove (dry run) or removed."""
    rep = open_store(store_path).gc(dry_run=not apply)
    d = rep.to_dict()
    if rep.nothing_to_do:
        console.print("Nothing to collect: no superseded rows, unreferenced sets or orphan files.")
        return d
    verb = "Removed" if apply else "Would remove"
    items: list[str] = []
    for key, label in (("superseded_rows", "superseded rows"),
                       ("unreferenced_rows", "rows of studies no longer in the manifest")):
        for set_name, n in d[key].items():
            if n:
                items.append(f"{n} {label} in {set_name}")
    for key, label in (("unreferenced_sets", "unreferenced set"), ("orphan_temp_files", "orphan temp file"),
                       ("empty_segments", "empty segment of a crashed writer")):
        items += [f"{label}: {x}" for x in d[key]]
    console.print(f"{verb}:")
    for it in items:
        console.print(f"  - {it}", markup=False)
    if apply:
        console.print(f"Freed {_size(float(d.get('bytes_freed', 0)))}.")
    else:
        console.print("Dry run: nothing was changed. Re-run with --yes to remove them.")
    return d


def show_encoders(*, as_json: bool = False) -> list[dict[str, Any]]:
    from embedstore.models.encoders import get_encoder_spec, list_encoders

    rows = []
    for name in list_encoders():
        spec = get_encoder_spec(name)
        rows.append({"name": name, "family": spec.family, "params": spec.to_dict().get("params", {})})
    if as_json:
        _emit_json(rows)
        return rows
    t = Table(title="registered encoders (random-init unless you pass --weights)")
    for col in ("name", "family", "params"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["name"], r["family"], json.dumps(r["params"], default=str))
    console.print(t)
    return rows
