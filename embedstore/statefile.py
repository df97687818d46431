"""One loader for every state file: JSON documents and Parquet tables the store and runs keep.

A state file that is missing, empty, cut short by a torn write, garbled, of the wrong JSON
type, missing a key or column, or of another schema version becomes one ``CorruptStateError``
(or the caller's subclass of it) whose ``reason`` is one of ``REASONS`` and whose message names
the file, the reason and the fix the caller knows to be true. Nothing here writes or deletes.

``read`` lets a caller pass the bytes' source (a store backend's ``read``); local files are read
directly. Files that may legitimately be missing are the caller's business: check first, or
catch ``reason == "missing"``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa

from embedstore.errors import CorruptStateError

__all__ = ["REASONS", "read_json_state", "read_parquet_state", "parquet_state_schema"]

#: Every ``reason`` a state file error can carry (docs/RELIABILITY.md lists what each means).
REASONS = ("missing", "empty", "truncated", "not_json", "not_parquet", "wrong_type",
           "missing_key", "missing_column", "bad_version")

_PAR1 = b"PAR1"
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON array", str: "a JSON string",
               int: "a JSON integer", float: "a JSON number", bool: "true/false",
               type(None): "null"}


def _raise(error: type[CorruptStateError], what: str, path: object, reason: str, detail: str,
           fix: str, cause: BaseException | None = None) -> NoReturn:
    err = error(f"{what} {path} {detail}; reason: {reason}. {fix}", reason=reason,
                path=str(path), fix=fix)
    raise err from cause


def _read_bytes(path: str | os.PathLike[str], read: Callable[[], bytes] | None,
                error: type[CorruptStateError], what: str, fix: str) -> bytes:
    try:
        return read() if read is not None else Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError) as e:
        _raise(error, what, path, "missing", "does not exist", fix, e)
    except IsADirectoryError as e:
        _raise(error, what, path, "wrong_type", "is a folder, not a file", fix, e)


# What may follow the last point the decoder accepted when the text is a prefix of valid JSON:
# nothing, or the start of one token (a string without its closing quote, a partial number, the
# first letters of true / false / null).
_TOKEN_PREFIX = re.compile(r'("(?:[^"\\]|\\.)*\\?|-?\d*\.?\d*(?:[eE][+-]?\d*)?'
                           r"|t(?:r(?:ue?)?)?|f(?:a(?:l(?:se?)?)?)?|n(?:u(?:ll?)?)?)")


def _looks_truncated(text: str, e: json.JSONDecodeError) -> bool:
    """The text is a prefix of a JSON document (the decoder accepted everything before ``e.pos``
    and what is left is at most the start of one token): the tail of a torn write."""
    body = text.rstrip()
    if not body or body[0] not in "{[":
        return False
    return _TOKEN_PREFIX.fullmatch(body[e.pos:]) is not None


def _type_name(t: type | tuple[type, ...]) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in ts)


def read_json_state(
    path: str | os.PathLike[str],
    what: str,
    *,
    fix: str,
    expect: type | tuple[type, ...] = dict,
    required: Sequence[str] = (),
    version_key: str | None = None,
    versions: Collection[Any] = (),
    error: type[CorruptStateError] = CorruptStateError,
    read: Callable[[], bytes] | None = None,
) -> Any:
    """Parse the JSON state file at ``path``; ``what`` names it for the user ("Run config").

    Checks, in order: it exists (``missing``), is not blank (``empty``), is UTF-8 JSON
    (``truncated`` when the text stops mid-document, else ``not_json``), is of type ``expect``
    (``wrong_type``), has every ``required`` key (``missing_key``) and, when ``versions`` is
    given, ``doc[version_key]`` is one of them (``bad_version``). ``fix`` ends every message.
    """
    data = _read_bytes(path, read, error, what, fix)
    if not data.strip():
        _raise(error, what, path, "empty", f"is empty ({len(data)} bytes)", fix)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        _raise(error, what, path, "not_json", f"is not JSON text (byte {e.start} is not UTF-8)",
               fix, e)
    if "\x00" in text:
        # a torn write on some file systems leaves zero-filled blocks
        _raise(error, what, path, "not_json", f"is not JSON text (NUL byte at {text.index(chr(0))})",
               fix)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if _looks_truncated(text, e):
            _raise(error, what, path, "truncated",
                   f"ends mid-document after {len(data)} bytes (a torn or interrupted write)",
                   fix, e)
        _raise(error, what, path, "not_json", f"is not valid JSON ({e})", fix, e)
    except RecursionError as e:
        _raise(error, what, path, "not_json", "is not valid JSON (nested too deeply)", fix, e)
    if not isinstance(doc, expect) or (isinstance(doc, bool) and bool not in
                                       (expect if isinstance(expect, tuple) else (expect,))):
        _raise(error, what, path, "wrong_type",
               f"holds {_type_name(type(doc))}, not {_type_name(expect)}", fix)
    if isinstance(doc, dict):
        missing = [k for k in required if k not in doc]
        if missing:
            _raise(error, what, path, "missing_key",
                   f"has no {', '.join(repr(k) for k in missing)} key", fix)
        if versions and version_key is not None and doc.get(version_key) not in versions:
            _raise(error, what, path, "bad_version",
                   f"has {version_key} {doc.get(version_key)!r}; this embedstore reads "
                   f"{', '.join(map(repr, versions))}", fix)
    return doc


def _open_parquet(path: str | os.PathLike[str], what: str, fix: str,
                  error: type[CorruptStateError]) -> Any:
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        size = p.stat().st_size
    except (FileNotFoundError, NotADirectoryError) as e:
        _raise(error, what, path, "missing", "does not exist", fix, e)
    if p.is_dir():
        _raise(error, what, path, "wrong_type", "is a folder, not a file", fix)
    if size == 0:
        _raise(error, what, path, "empty", "is empty (0 bytes)", fix)
    with p.open("rb") as f:
        head = f.read(4)
        f.seek(max(0, size - 4))
        tail = f.read(4)
    if head != _PAR1:
        _raise(error, what, path, "not_parquet",
               "is not a Parquet file (no PAR1 magic at its start)", fix)
    if tail != _PAR1 or size < 12:
        _raise(error, what, path, "truncated",
               f"ends after {size} bytes without a Parquet footer (a torn or interrupted write)",
               fix)
    try:
        return pq.ParquetFile(str(p))
    except (OSError, pa.ArrowException) as e:
        _raise(error, what, path, "not_parquet", f"has an unreadable Parquet footer ({e})", fix, e)


def _check_columns(schema: pa.Schema, required: Sequence[str], path: object, what: str, fix: str,
                   error: type[CorruptStateError]) -> None:
    missing = [c for c in required if c not in schema.names]
    if missing:
        _raise(error, what, path, "missing_column",
               f"has no {', '.join(repr(c) for c in missing)} column", fix)


def parquet_state_schema(
    path: str | os.PathLike[str], what: str, *, fix: str, required: Sequence[str] = (),
    error: type[CorruptStateError] = CorruptStateError,
) -> tuple[pa.Schema, int]:
    """The Arrow schema and row count of a Parquet state file, from its footer only (cheap);
    the same checks and reasons as ``read_parquet_state`` up to the data pages."""
    with _open_parquet(path, what, fix, error) as pf:
        try:
            schema, rows = pf.schema_arrow, pf.metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            _raise(error, what, path, "not_parquet", f"has an unreadable schema ({e})", fix, e)
    _check_columns(schema, required, path, what, fix, error)
    return schema, rows


def read_parquet_state(
    path: str | os.PathLike[str], what: str, *, fix: str, required: Sequence[str] = (),
    columns: Sequence[str] | None = None, error: type[CorruptStateError] = CorruptStateError,
) -> pa.Table:
    """Read a Parquet state file (``columns``, default all) after checking it exists
    (``missing``), is not empty (``empty``), starts and ends with Parquet's magic (``not_parquet``
    / ``truncated``), has every ``required`` column (``missing_column``) and its pages decode
    (``not_parquet``)."""
    with _open_parquet(path, what, fix, error) as pf:
        try:
            schema = pf.schema_arrow
        except (OSError, pa.ArrowException) as e:
            _raise(error, what, path, "not_parquet", f"has an unreadable schema ({e})", fix, e)
        _check_columns(schema, required, path, what, fix, error)
        try:
            return pf.read(columns=list(columns) if columns is not None else None)
        except (OSError, pa.ArrowException) as e:
            _raise(error, what, path, "not_parquet", f"has unreadable data pages ({e})", fix, e)
