"""Embedding sets and their segments: where a set's rows live and which of them are live.

A set is ``STORE/sets/<MODALITY>/<encoder_key>/`` (spec.json + segments); a segment is one
writer session's ``seg-*`` folder (arrays, commit log, meta caches); docs/STORE_FORMAT.md.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._fsio import atomic_path, atomic_write_bytes
from embedstore.errors import StoreCorruptError, StoreNotFoundError
from embedstore.store._zarr import RowArray
from embedstore.store.commitlog import COMMIT_SCHEMA, parse_commit_log
from embedstore.store.format import (
    COMMITS_FILE,
    META_ARROW,
    META_LOG_BYTES_KEY,
    META_PARQUET,
    SCHEMA_VERSION,
    SEGMENT_DOC,
    SEGMENT_PREFIX,
    SETS_DIR,
    SPEC_FILE,
    iso,
    stamp,
    utcnow,
)


def new_segment_name() -> str:
    """``seg-<utc>-<pid>-<rand8>``: sorts by creation time, unique across processes."""
    return f"{SEGMENT_PREFIX}{stamp(utcnow())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_segment_doc(seg: Path, scope: str | None) -> None:
    """``segment.json``: who writes this segment (so others can tell a dead writer's leftovers)."""
    info = {
        "schema_version": SCHEMA_VERSION,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "scope": scope,
        "created_at": iso(utcnow()),
    }
    atomic_write_bytes(seg / SEGMENT_DOC, json.dumps(info, indent=2).encode())


def read_segment_doc(seg: Path) -> dict:
    """The segment's ``segment.json``, or {} when it is missing or unreadable."""
    try:
        return json.loads((seg / SEGMENT_DOC).read_text())
    except (OSError, ValueError):
        return {}


def segment_rows(seg: Path) -> pa.Table:
    """Commit rows of a segment, from the meta.arrow cache when it reflects the whole log."""
    log = seg / COMMITS_FILE
    try:
        log_size = log.stat().st_size
    except FileNotFoundError:
        return COMMIT_SCHEMA.empty_table()
    cache = seg / META_ARROW
    if cache.exists():
        try:
            with pa.OSFile(str(cache), "rb") as f:
                t = pa.ipc.open_file(f).read_all()
            if (t.schema.metadata or {}).get(META_LOG_BYTES_KEY) == str(log_size).encode():
                return t.replace_schema_metadata(None)
        except (OSError, pa.ArrowInvalid):
            pass  # a derived cache: fall back to the commit log, which is the truth
    return parse_commit_log(log)[0]


def write_meta(seg: Path, table: pa.Table) -> None:
    """Materialise a segment's commits as meta.parquet (for tools) and meta.arrow (fast cache),
    both stamped with the commit log size they reflect. Caches, so not fsync'ed: a reader checks
    the stamp and falls back to the log."""
    size = (seg / COMMITS_FILE).stat().st_size
    table = table.replace_schema_metadata({META_LOG_BYTES_KEY: str(size).encode()})
    with atomic_path(seg / META_PARQUET, durable=False) as tmp:
        pq.write_table(table, tmp)
    with atomic_path(seg / META_ARROW, durable=False) as tmp:
        with pa.OSFile(str(tmp), "wb") as f:
            with pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)


@dataclass
class Live:
    """The live rows of a set, ordered by study_id: which segment and offset each comes from."""

    table: pa.Table  # COMMIT_SCHEMA + "_seg" (int32 index into segments)
    segments: list[Path]
    total: int  # committed rows, superseded included

    @property
    def superseded(self) -> int:
        return self.total - self.table.num_rows


class SetDir:
    """The folder of one embedding set."""

    def __init__(self, root: Path, modality: str, encoder_key: str):
        self.root = root
        self.modality = modality
        self.encoder_key = encoder_key
        self.path = root / SETS_DIR / modality / encoder_key

    @property
    def name(self) -> str:
        return f"{self.modality}/{self.encoder_key}"

    def exists(self) -> bool:
        return (self.path / SPEC_FILE).exists()

    def doc(self) -> dict:
        try:
            return json.loads((self.path / SPEC_FILE).read_text())
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
        return sorted(
            p for p in self.path.iterdir() if p.is_dir() and p.name.startswith(SEGMENT_PREFIX)
        )

    def live(self) -> Live:
        segs = self.segments()
        parts = []
        for i, seg in enumerate(segs):
            t = segment_rows(seg)
            if t.num_rows:
                parts.append(t.append_column("_seg", pa.array(np.full(t.num_rows, i, np.int32))))
        if not parts:
            empty = COMMIT_SCHEMA.empty_table().append_column("_seg", pa.array([], pa.int32()))
            return Live(empty, segs, 0)
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
        return Live(allrows.combine_chunks(), segs, total)


def set_dirs(root: Path) -> list[SetDir]:
    """Every set of the store at ``root`` (folders with a spec.json), sorted by name."""
    out = []
    sets = root / SETS_DIR
    if sets.is_dir():
        for mdir in sorted(p for p in sets.iterdir() if p.is_dir()):
            for kdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
                if (kdir / SPEC_FILE).exists():
                    out.append(SetDir(root, mdir.name, kdir.name))
    return out


def read_rows_for(live: pa.Table, segments: list[Path], array_name: str, out: np.ndarray) -> None:
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
