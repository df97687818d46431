"""Embedding sets and their segments: where a set's rows live and which of them are live.

A set is ``STORE/sets/<MODALITY>/<encoder_key>/`` (spec.json + segments); a segment is one
writer session's ``seg-*`` folder (arrays + commit parts); docs/STORE_FORMAT.md.

Which rows are live (the newest commit per study_id wins) is decided here from the commit parts,
reading only the columns it needs (study_id, created_at, array_row), part by part, optionally
keeping only the rows of a given set of study ids -- never a table of every row's metadata. A set
whose parts are each in study_id order and do not overlap (one in-order session, or any set
after compaction) is *ordered*: its live rows are its rows in part order, found from the parts'
footers alone.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore.errors import StoreCorruptError, StoreNotFoundError
from embedstore.statefile import read_json_state
from embedstore.store._arrow import bools, from_np, np_of, sort_indices, strings
from embedstore.store._backend import Backend
from embedstore.store._zarr import RowArray
from embedstore.store.commitlog import (
    PartInfo,
    live_parts,
    read_parquet,
    read_part_info,
    read_parts,
)
from embedstore.store.format import (
    COMMITS_DIR,
    SCHEMA_VERSION,
    SEGMENT_DOC,
    SEGMENT_PREFIX,
    SETS_DIR,
    SPEC_FILE,
    iso,
    stamp,
    utcnow,
)

# Live-row resolution reads parts in batches of this many rows (bounded memory at any size).
_SCAN_BATCH = 65536


def new_segment_name() -> str:
    """``seg-<utc>-<pid>-<rand8>``: sorts by creation time, unique across processes."""
    return f"{SEGMENT_PREFIX}{stamp(utcnow())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_segment_doc(backend: Backend, seg_key: str, scope: str | None) -> None:
    """``segment.json``: who writes this segment (so others can tell a dead writer's leftovers)."""
    info = {
        "schema_version": SCHEMA_VERSION,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "scope": scope,
        "created_at": iso(utcnow()),
    }
    backend.put(f"{seg_key}/{SEGMENT_DOC}", json.dumps(info, indent=2).encode())


def read_segment_doc(backend: Backend, seg_key: str) -> dict:
    """The segment's ``segment.json``, or {} when it is missing or unreadable."""
    try:
        doc = json.loads(backend.read(f"{seg_key}/{SEGMENT_DOC}"))
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


@dataclass
class Segment:
    """One segment as listed at one moment: its name and live commit parts (immutable files)."""

    key: str  # sets/<MOD>/<key>/seg-...
    name: str
    parts: list[PartInfo] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def commits_key(self) -> str:
        return f"{self.key}/{COMMITS_DIR}"

    def array(self, backend: Backend, name: str) -> RowArray:
        return RowArray.open(backend, f"{self.key}/{name}")

    def ordered(self) -> bool:
        """Rows strictly increasing by study_id in array_row order (parts sorted, in sequence)."""
        prev = None
        for p in self.parts:
            if not p.sorted:
                return False
            if prev is not None and p.rows and not prev < p.min_id:
                return False
            if p.rows:
                prev = p.max_id
        return True

    def min_id(self) -> str | None:
        return next((p.min_id for p in self.parts if p.rows), None)

    def max_id(self) -> str | None:
        return next((p.max_id for p in reversed(self.parts) if p.rows), None)


@dataclass
class Snapshot:
    """A set's segments and parts as listed at one moment; later reads use exactly these files."""

    segments: list[Segment]

    @property
    def total(self) -> int:
        return sum(s.rows for s in self.segments)

    def ordered_segments(self) -> list[int] | None:
        """Segment indices in study_id order when the whole set is ordered (every segment
        ordered, their id ranges disjoint), else None. Then row r of the set is row r - base of
        its segment: no sort and no supersession to resolve."""
        live = [i for i, s in enumerate(self.segments) if s.rows]
        if not all(self.segments[i].ordered() for i in live):
            return None
        live.sort(key=lambda i: self.segments[i].min_id())
        for a, b in zip(live, live[1:], strict=False):
            if not self.segments[a].max_id() < self.segments[b].min_id():
                return None
        return live


@dataclass
class Live:
    """The live rows of a set (or of a cohort of it), ordered by study_id."""

    study_id: pa.Array  # (N,) string
    seg: np.ndarray  # (N,) int32 index into segments
    array_row: np.ndarray  # (N,) int64 row of that segment's arrays
    created_at: np.ndarray  # (N,) int64 microseconds since the epoch
    segments: list[Segment]
    total: int  # committed rows of the set, superseded included

    @property
    def n(self) -> int:
        return len(self.study_id)

    @property
    def superseded(self) -> int:
        return self.total - self.n


class SetDir:
    """The folder of one embedding set."""

    def __init__(self, backend: Backend, modality: str, encoder_key: str):
        self.backend = backend
        self.modality = modality
        self.encoder_key = encoder_key
        self.key = f"{SETS_DIR}/{modality}/{encoder_key}"

    @property
    def name(self) -> str:
        return f"{self.modality}/{self.encoder_key}"

    @property
    def path(self):
        from pathlib import Path

        return Path(self.backend.local_path(self.key))

    def exists(self) -> bool:
        return self.backend.exists(f"{self.key}/{SPEC_FILE}")

    def doc(self) -> dict:
        key = f"{self.key}/{SPEC_FILE}"
        try:
            data = self.backend.read(key)
        except FileNotFoundError as e:
            raise StoreNotFoundError(
                f"Embedding set {self.name!r} has no spec.json in {str(self.path)!r}."
            ) from e
        return read_json_state(
            self.backend.local_path(key), f"Spec of embedding set {self.name!r}",
            read=lambda: data, error=StoreCorruptError, required=("dim", "dtype", "spec"),
            fix=(f"Restore it from a backup, or move the set folder {self.path} away and extract "
                 "that encoder again (`embedstore extract`); other sets are unaffected."))

    def segment_names(self) -> list[str]:
        return [n for n in self.backend.list(self.key) if n.startswith(SEGMENT_PREFIX)]

    def segment(self, name: str) -> Segment:
        """A segment with its live parts, from their footers (missing parts: listed then gone,
        i.e. merged meanwhile: listed again)."""
        seg = Segment(key=f"{self.key}/{name}", name=name)
        for _attempt in range(3):
            try:
                names = self.backend.list(seg.commits_key)
                seg.parts = [read_part_info(self.backend, f"{seg.commits_key}/{n}")
                             for _, _, n in live_parts(names)]
                return seg
            except FileNotFoundError:
                continue
        raise StoreCorruptError(f"Commit parts of {seg.key!r} keep vanishing while read.")

    def snapshot(self) -> Snapshot:
        return Snapshot([self.segment(n) for n in self.segment_names()])

    def live(self, study_ids: pa.Array | None = None, snap: Snapshot | None = None) -> Live:
        """The live rows (of ``study_ids`` only, when given), ordered by study_id."""
        snap = snap or self.snapshot()
        return resolve_live(self.backend, snap, study_ids)


def set_dirs(backend: Backend) -> list[SetDir]:
    """Every set of the store (folders with a spec.json), sorted by name."""
    out = []
    for mod in backend.list(SETS_DIR):
        for key in backend.list(f"{SETS_DIR}/{mod}"):
            sd = SetDir(backend, mod, key)
            if sd.exists():
                out.append(sd)
    return out


_LIVE_COLS = ["study_id", "created_at", "array_row"]


def _scan(backend: Backend, seg: Segment, wanted: pa.Array | None,
          wanted_range: tuple[str, str] | None) -> list[pa.Table]:
    """study_id, created_at, array_row of a segment's rows (of ``wanted`` ids only)."""
    out = []
    for p in seg.parts:
        if not p.rows:
            continue
        if wanted_range is not None and p.min_id is not None and (
                p.max_id < wanted_range[0] or p.min_id > wanted_range[1]):
            continue  # no wanted id can be in this part
        path = backend.local_path(p.key)
        if wanted is None:
            out.append(read_parquet(path, _LIVE_COLS))
            continue
        for rb in pq.ParquetFile(path).iter_batches(batch_size=_SCAN_BATCH, columns=_LIVE_COLS):
            keep = pc.is_in(rb.column(0), value_set=wanted)
            if pc.any(keep).as_py():
                out.append(pa.Table.from_batches([rb.filter(keep)]))
    return out


def resolve_live(backend: Backend, snap: Snapshot, study_ids: pa.Array | None = None) -> Live:
    """Live rows of a snapshot, ordered by study_id: newest created_at, then newest segment
    name, then highest array_row wins for each study_id."""
    segs = snap.segments
    wanted = None
    rng = None
    if study_ids is not None:
        wanted = pc.unique(strings(list(study_ids)) if not isinstance(study_ids, pa.Array)
                           else study_ids.cast(pa.string()))
        wanted = wanted.filter(pc.is_valid(wanted))
        if len(wanted):
            mm = pc.min_max(wanted).as_py()
            rng = (mm["min"], mm["max"])
    order = snap.ordered_segments()
    if wanted is not None and len(wanted) == 0:
        order = []
    seg_idx: list[np.ndarray] = []
    tables: list[pa.Table] = []
    for i in order if order is not None else range(len(segs)):
        for t in _scan(backend, segs[i], wanted, rng):
            tables.append(t)
            seg_idx.append(np.full(t.num_rows, i, np.int32))
    if not tables:
        return Live(strings([]), np.zeros(0, np.int32), np.zeros(0, np.int64),
                    np.zeros(0, np.int64), segs, snap.total)
    t = pa.concat_tables(tables).combine_chunks()
    seg = np.concatenate(seg_idx)
    sid = t["study_id"].combine_chunks()
    created = np_of(t["created_at"])
    arow = np_of(t["array_row"])
    if order is None:  # an unordered set: sort by study_id, then keep the newest of each
        n = len(sid)
        if n > 1 and not pc.all(pc.less(sid[:-1], sid[1:])).as_py():
            idx = sort_indices(sid)  # stable: ties keep scan order
            sid, seg, arow, created = sid.take(from_np(idx)), seg[idx], arow[idx], created[idx]
            dup = np_of(pc.equal(sid[1:], sid[:-1]))  # (n-1,) row i+1 repeats row i's id
            if dup.any():
                # Only the rows of repeated ids need a decision: newest created_at, then newest
                # segment name (segments are listed in name order), then highest array_row.
                grp = np.concatenate(([0], np.cumsum(~dup)))  # group number of each row
                in_dup = np.zeros(n, dtype=bool)
                in_dup[1:] |= dup
                in_dup[:-1] |= dup
                cand = np.flatnonzero(in_dup)
                o = np.lexsort((arow[cand], seg[cand], created[cand], grp[cand]))
                cand = cand[o]
                last = np.ones(cand.size, dtype=bool)
                last[:-1] = grp[cand[1:]] != grp[cand[:-1]]
                keep = ~in_dup
                keep[cand[last]] = True
                sid, seg, arow, created = (sid.filter(bools(keep)), seg[keep], arow[keep],
                                           created[keep])
    return Live(sid, seg, arow, created, segs, snap.total)


def read_rows_for(backend: Backend, live: Live, array_name: str, out: np.ndarray) -> int:
    """Fill ``out`` (N, ...) with the live rows from each segment's array; returns bytes read.
    Rows that land out of order are scattered into ``out``: its pages are faulted in first,
    in order (random first touches of 4 KiB pages cost more than the copy itself here)."""
    read = 0
    if live.n == 0:
        return 0
    if out.nbytes >= (64 << 20) and not (np.diff(live.array_row) == 1).all():
        flat = out.reshape(-1).view(np.uint8)
        flat[:: 4096] = 0
    if len(live.segments) == 1 or (np.diff(live.seg) == 0).all():
        k = int(live.seg[0])
        return live.segments[k].array(backend, array_name).gather(live.array_row, out)
    order = np.argsort(live.seg, kind="stable")
    bounds = np.flatnonzero(np.diff(live.seg[order])) + 1
    for grp in np.split(order, bounds):
        k = int(live.seg[grp[0]])
        read += live.segments[k].array(backend, array_name).gather(live.array_row[grp], out, grp)
    return read


def segment_meta(backend: Backend, live: Live, columns: Sequence[str]) -> pa.Table:
    """``columns`` of the commit rows of ``live`` (row-aligned with it), read from the parts
    that hold them (a part with none of the rows is not opened)."""
    n = live.n
    if n == 0:
        return read_parts(backend, [], columns)
    pieces: list[pa.Table] = []
    out_idx: list[np.ndarray] = []
    for k in np.unique(live.seg):
        grp = np.flatnonzero(live.seg == k)
        rows = live.array_row[grp]
        order = np.argsort(rows, kind="stable")
        grp, rows = grp[order], rows[order]
        for p in live.segments[int(k)].parts:
            a, b = np.searchsorted(rows, [p.row0, p.row0 + p.rows])
            if a == b:
                continue
            t = read_parts(backend, [p], ["array_row", *columns])
            arow = np_of(t["array_row"]) - p.row0
            if (arow == np.arange(p.rows)).all():
                at = rows[a:b] - p.row0  # part row of each wanted array row
            else:  # a part sorted by study_id: its array rows are a permutation of the range
                inv = np.full(p.rows, -1, np.int64)
                if arow.min() < 0 or arow.max() >= p.rows:
                    raise StoreCorruptError(f"Commit part {p.key!r} names rows outside its range.")
                inv[arow] = np.arange(p.rows)
                at = inv[rows[a:b] - p.row0]
                if (at < 0).any():
                    raise StoreCorruptError(f"Commit part {p.key!r} does not hold its rows.")
            pieces.append(t.select(list(columns)).take(from_np(at)))
            out_idx.append(grp[a:b])
    order = np.concatenate(out_idx)
    if order.size != n:
        raise StoreCorruptError("Some loaded rows are in no commit part of their segment.")
    out = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = np.arange(n)
    return out.take(from_np(inverse)).combine_chunks()
