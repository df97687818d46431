"""Maintenance of a store: verify (read everything, change nothing), gc, compaction (by gc and
automatically when a set grows too many segments), and the schema_version 1 -> 2 upgrade.

Compaction, like every other write, never renames a folder and never shows a half-built
segment: the new segment's chunks are written first, then its single commit part is published
(from then on it holds every row it copied, and where a row is in both it wins: same commit
time, newer segment name), then the old segments are removed, commit parts first.
"""

from __future__ import annotations

import json
import os
import socket
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedstore._faults import fault_point
from embedstore._fsio import atomic_write_bytes, tree_size
from embedstore.errors import (
    CorruptStateError,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
from embedstore.store._arrow import bools, from_np, np_of, strings
from embedstore.store._backend import TEMP_SUFFIX, Backend, LocalBackend
from embedstore.store._crc import combine_rows
from embedstore.store._zarr import RowArray, sweep_partials
from embedstore.store.commitlog import (
    COMMIT_SCHEMA,
    PartLog,
    commit_table,
    live_parts,
    merge_parts,
    parse_v1_failures,
    parse_v1_log,
    read_part_info,
    read_parts,
)
from embedstore.store.format import (
    COMMITS_DIR,
    DEFAULT_CONFIG,
    EMBEDDINGS_ARRAY,
    FAILURES_DIR,
    FORMAT_NAME,
    SCHEMA_VERSION,
    SETS_DIR,
    STORE_DOC,
    TOKENS_ARRAY,
    V1_COMMITS_FILE,
    V1_META_FILES,
)
from embedstore.store.lock import Lock, pid_alive
from embedstore.store.segment import (
    Live,
    Segment,
    SetDir,
    Snapshot,
    new_segment_name,
    read_rows_for,
    read_segment_doc,
    resolve_live,
    segment_meta,
    set_dirs,
    write_segment_doc,
)

if TYPE_CHECKING:
    from embedstore.store.reader import Store


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
    # rows of studies missing from the manifest are kept (and only listed) unless asked: a
    # manifest replaced by mistake must not cost the embeddings
    drop_unreferenced: bool = False

    @property
    def nothing_to_do(self) -> bool:
        return not (
            any(self.superseded_rows.values())
            or (self.drop_unreferenced and any(self.unreferenced_rows.values()))
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
# verify
# ------------------------------------------------------------------------------------------------


def verify(store: Store) -> VerifyReport:
    """Check every committed row (checksum, shape, fill value, metadata); modify nothing.

    Linear in the rows: each chunk is read once (the next one is read while the current one is
    checked), each row's CRC-32 is compared with its commit record, and the finite / fill-value
    checks are numpy over the chunk.
    """
    root = store.root
    backend = store.backend
    problems: list[Problem] = []
    rows_checked = 0
    manifest = None
    try:
        manifest = store.read_manifest(["study_id", "modality"])
    except CorruptStateError as e:
        problems.append(Problem("manifest_unreadable", "manifest.parquet", str(e)))
    for sub in (SETS_DIR, FAILURES_DIR):
        for tmp in sweep_partials(root / sub, dry_run=True):
            problems.append(
                Problem("orphan_temp_file", str(tmp.relative_to(root)),
                        "temp file left by a killed writer (removed by the next writer or gc)",
                        "warning")
            )
    for seg in backend.list(FAILURES_DIR):
        prefix = f"{FAILURES_DIR}/{seg}"
        try:
            for _, _, n in live_parts(backend.list(prefix)):
                read_part_info(backend, f"{prefix}/{n}", "failures")
        except StoreCorruptError as e:
            problems.append(Problem("failure_part_unreadable", prefix, str(e)))
    sets = set_dirs(backend)
    with ThreadPoolExecutor(2, thread_name_prefix="embedstore-verify") as pool:
        for sd in sets:
            try:
                doc = sd.doc()
            except (StoreCorruptError, StoreNotFoundError) as e:
                problems.append(Problem("bad_spec", sd.key, str(e)))
                continue
            dim, dtype = int(doc["dim"]), np.dtype(doc["dtype"])
            tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
            for name in sd.segment_names():
                rows_checked += _verify_segment(backend, sd, name, dim, dtype, tshape, manifest,
                                                problems, pool)
    return VerifyReport(tuple(problems), len(sets), rows_checked)


def _segment_parts(backend: Backend, seg_key: str, problems: list[Problem]) -> list | None:
    prefix = f"{seg_key}/{COMMITS_DIR}"
    names = backend.list(prefix)
    try:
        parts = live_parts(names)
    except StoreCorruptError as e:
        problems.append(Problem("commit_parts_overlap", prefix, str(e)))
        return None
    covered = [n for n in names if n.endswith(".parquet") and n not in {p[2] for p in parts}]
    if covered:
        problems.append(Problem("covered_commit_parts", prefix,
                                f"{len(covered)} part(s) covered by a merged part (gc removes them)",
                                "warning"))
    infos = []
    expect = 0
    for first, last, n in parts:
        if first != expect:
            problems.append(Problem("commit_part_missing", f"{prefix}/{n}",
                                    f"parts {expect}..{first - 1} are missing: rows were lost"))
        expect = last + 1
        try:
            infos.append(read_part_info(backend, f"{prefix}/{n}"))
        except StoreCorruptError as e:
            problems.append(Problem("commit_part_unreadable", f"{prefix}/{n}", str(e)))
            return None
    return infos


def _verify_segment(backend, sd, name, dim, dtype, tshape, manifest, problems, pool) -> int:
    key = f"{sd.key}/{name}"
    infos = _segment_parts(backend, key, problems)
    if infos is None:
        return 0
    seg = Segment(key=key, name=name, parts=infos)
    if seg.rows == 0:
        problems.append(Problem("empty_segment", key, "no committed rows (gc removes it)", "warning"))
        return 0
    try:
        t = read_parts(backend, infos, ["array_row", "study_id", "crc32", "tokens_crc32"])
    except (StoreCorruptError, FileNotFoundError) as e:
        problems.append(Problem("commit_part_unreadable", key, str(e)))
        return 0
    n = t.num_rows
    arow = np_of(t["array_row"])
    sids = t["study_id"].combine_chunks()
    order = None  # parts merged in study_id order hold their array rows permuted
    if not np.array_equal(arow, np.arange(n)):
        order = np.argsort(arow, kind="stable")
        if not np.array_equal(arow[order], np.arange(n)):
            problems.append(Problem("offset_mismatch", key,
                                    "commit records do not name rows 0..n-1 once each"))
            return n
        sids = sids.take(from_np(order))  # in array order from here on
    # The manifest check (pyarrow, without the GIL) runs beside the chunk checks.
    membership = None if manifest is None else pool.submit(_membership, sd, key, sids, manifest)
    checks = [(EMBEDDINGS_ARRAY, (dim,), "crc32")]
    if tshape:
        checks.append((TOKENS_ARRAY, tshape, "tokens_crc32"))
    for array_name, row_shape, crc_col in checks:
        akey = f"{key}/{array_name}"
        try:
            arr = RowArray.open(backend, akey)
        except (StoreCorruptError, StoreFormatError) as e:
            problems.append(Problem("array_unreadable", akey, str(e)))
            continue
        if arr.row_shape != tuple(row_shape) or arr.dtype != dtype:
            problems.append(Problem(
                "shape_mismatch", akey,
                f"array rows are {arr.row_shape} {arr.dtype}, spec.json says {tuple(row_shape)} {dtype}"))
            continue
        if n > arr.shape[0]:
            problems.append(Problem("offset_out_of_range", akey,
                                    f"{n} committed rows, array has {arr.shape[0]}"))
            continue
        crc = t[crc_col].combine_chunks()
        if order is not None:
            crc = crc.take(from_np(order))
        crc_np = np_of(crc, np.uint32, null=0)
        has_crc = np_of(crc.is_valid())
        _verify_array(arr, n, crc_np, has_crc, sids, problems, pool)
    if membership is not None:
        problems.extend(membership.result())
    return n


def _verify_array(arr: RowArray, n: int, crc: np.ndarray, has_crc: np.ndarray, sids: pa.Array,
                  problems: list[Problem], pool: ThreadPoolExecutor) -> None:
    """Each chunk read once, by the pool's threads, which also CRC it whole; a full chunk whose
    CRC equals the combination of its rows' commit CRCs holds exactly the committed bytes
    (_crc.py). Any other chunk is checked row by row: checksum, NaN/inf, all fill value."""
    cr, rb = arr.chunk_rows, arr.row_bytes
    n_chunks = -(-n // cr)
    full = n // cr
    expect = None
    if full and has_crc[: full * cr].all():
        expect = combine_rows(crc[: full * cr].reshape(full, cr), rb)  # (full,) chunk CRCs
    depth = 3  # chunks in flight: read and CRC'd by the pool's threads while this one checks
    bufs = [np.empty((cr, *arr.row_shape), dtype=arr.dtype) for _ in range(depth + 1)]

    def read(c: int):
        lo, hi = c * cr, min(n, (c + 1) * cr)
        buf = bufs[c % (depth + 1)][: hi - lo]
        try:
            if arr.fast:
                size = arr.backend.size(arr.chunk_key(c))
                if size != cr * rb:
                    raise StoreCorruptError(f"size {size} != {cr * rb}")
            arr.read_rows(lo, hi, out=buf)
        except (StoreCorruptError, OSError) as e:
            return e, None
        return buf, zlib.crc32(buf)

    pending = [pool.submit(read, c) for c in range(min(depth, n_chunks))]
    for c in range(n_chunks):
        got, whole = pending.pop(0).result()
        if c + depth < n_chunks:
            pending.append(pool.submit(read, c + depth))
        lo, hi = c * cr, min(n, (c + 1) * cr)
        if isinstance(got, BaseException):
            problems.append(Problem("chunk_unreadable", arr.chunk_key(c),
                                    f"{got}; {hi - lo} committed row(s) affected",
                                    study_id=sids[lo].as_py()))
            continue
        flat = got.reshape(hi - lo, -1)  # (rows, elems)
        if expect is not None and c < full and whole == int(expect[c]):
            # Every row is the bytes its writer committed, which were checked finite then.
            continue
        else:  # a partial chunk, or a mismatch to locate: row by row
            mv = memoryview(flat.view(np.uint8)).cast("B")
            row_crc = np.fromiter((zlib.crc32(mv[k * rb : (k + 1) * rb]) for k in range(hi - lo)),
                                  np.uint32, hi - lo)
            bad_crc = (row_crc != crc[lo:hi]) & has_crc[lo:hi]
        finite = np.isfinite(flat).all(axis=1)
        zero = ~flat.any(axis=1)
        for i in np.flatnonzero(bad_crc | ~finite | zero):
            r = lo + int(i)
            sid = sids[r].as_py()
            if not finite[i]:
                problems.append(Problem("non_finite_row", arr.key, f"row {r} holds NaN/inf",
                                        study_id=sid))
            elif zero[i]:
                problems.append(Problem("fill_value_row", arr.key,
                                        f"row {r} is all fill value (zeros)", study_id=sid))
            if bad_crc[i]:
                problems.append(Problem("checksum_mismatch", arr.key,
                                        f"row {r} bytes differ from their commit checksum",
                                        study_id=sid))


def _membership(sd: SetDir, key: str, sids: pa.Array, manifest: pa.Table) -> list[Problem]:
    problems: list[Problem] = []
    ids = manifest["study_id"].combine_chunks()
    pos = pc.index_in(sids, value_set=ids)
    missing = pc.unique(sids.filter(pc.is_null(pos)))
    for sid in missing.to_pylist():
        problems.append(Problem("not_in_manifest", key,
                                "study_id is not in the attached manifest (gc removes it)",
                                "warning", study_id=sid))
    found = pos.filter(pc.is_valid(pos))
    mods = manifest["modality"].combine_chunks().take(found)
    wrong = pc.not_equal(mods, strings([sd.modality])[0])
    if pc.any(wrong).as_py():
        bad = pc.unique(sids.filter(pc.is_valid(pos)).filter(wrong))
        for sid, mod in zip(bad.to_pylist(),
                            mods.filter(wrong).to_pylist()[: len(bad)], strict=False):
            problems.append(Problem("modality_mismatch", key,
                                    f"manifest says {mod}, stored under {sd.modality}",
                                    study_id=sid))
    return problems


# ------------------------------------------------------------------------------------------------
# gc and compaction
# ------------------------------------------------------------------------------------------------


def gc(store: Store, *, dry_run: bool = True, keep_sets: Iterable[str] | None = None,
       drop_unreferenced: bool = False) -> GcReport:
    """See Store.gc."""
    # A damaged manifest refuses gc before the lock is taken, so the refusal writes nothing
    # (it is read again under the lock: another writer may replace it meanwhile).
    store.manifest_schema()
    lock = None if dry_run else Lock(store.root, None).acquire()
    try:
        return _gc(store, dry_run, None if keep_sets is None else {str(k) for k in keep_sets},
                   drop_unreferenced)
    finally:
        if lock is not None:
            lock.release()
            store.refresh()


def _dead_writer(backend: Backend, seg_key: str, host: str) -> bool:
    info = read_segment_doc(backend, seg_key)
    pid = info.get("pid")
    return not (info.get("host") == host and isinstance(pid, int) and pid != os.getpid()
                and pid_alive(pid))


def _gc(store: Store, dry_run: bool, keep: set[str] | None,
        drop_unreferenced: bool = False) -> GcReport:
    root, backend = store.root, store.backend
    manifest_ids = None
    # a damaged manifest refuses gc (ManifestCorruptError): which rows it references is unknown
    manifest = store.read_manifest(["study_id"])
    if manifest is not None:
        manifest_ids = manifest["study_id"].combine_chunks()
    superseded: dict[str, int] = {}
    unreferenced: dict[str, int] = {}
    drop_sets: list[SetDir] = []
    empty: list[str] = []
    compact: list[tuple[SetDir, Snapshot, Live]] = []
    merge: list[SetDir] = []  # one segment in several commit parts: merge them (no vector copy)
    host = socket.gethostname()
    for sd in set_dirs(backend):
        if keep is not None and sd.name not in keep:
            drop_sets.append(sd)
            continue
        snap = sd.snapshot()
        live = resolve_live(backend, snap)
        keep_rows = live
        if manifest_ids is not None:
            mask = np_of(pc.is_in(live.study_id, value_set=manifest_ids))
            keep_rows = _subset(live, mask)
        superseded[sd.name] = live.superseded
        unreferenced[sd.name] = live.n - keep_rows.n
        if not drop_unreferenced:
            keep_rows = live  # listed, not removed
        nonempty = 0
        for seg in snap.segments:
            if seg.rows:
                nonempty += 1
            elif _dead_writer(backend, seg.key, host):
                empty.append(seg.key)
        if live.superseded or (drop_unreferenced and unreferenced[sd.name]) or nonempty > 1:
            compact.append((sd, snap, keep_rows))
        elif any(len(s.parts) > 1 for s in snap.segments):
            merge.append(sd)
    temps = sweep_partials(root / SETS_DIR, dry_run=True)
    temps += _covered_parts(backend)  # left by a merge killed before its cleanup
    temps += sweep_partials(root / FAILURES_DIR, dry_run=True)
    temps += sorted(p for p in root.rglob("*.tmp") if p.is_file())
    freed = 0
    compacted: list[str] = []
    if not dry_run:
        for p in temps:
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
        for sd in drop_sets:
            freed += tree_size(sd.path)
            backend.delete_tree(sd.key)
        for key in empty:
            freed += tree_size(Path(backend.local_path(key)))
            backend.delete_tree(key)
        for sd, snap, rows in compact:
            empty_keys = set(empty)
            snap = Snapshot([s for s in snap.segments if s.key not in empty_keys])
            freed += compact_segments(backend, sd, snap, rows, list(range(len(snap.segments))))
            compacted.append(sd.name)
        for sd in merge:
            for seg in sd.snapshot().segments:
                merge_parts(backend, seg.commits_key)
            compacted.append(sd.name)
        for seg in backend.list(FAILURES_DIR):
            merge_parts(backend, f"{FAILURES_DIR}/{seg}", "failures")
    return GcReport(
        dry_run=dry_run,
        superseded_rows=superseded,
        unreferenced_rows=unreferenced,
        unreferenced_sets=tuple(sd.name for sd in drop_sets),
        drop_unreferenced=drop_unreferenced,
        orphan_temp_files=tuple(str(p.relative_to(root)) for p in temps),
        empty_segments=tuple(empty),
        compacted_sets=tuple(compacted) if not dry_run
        else tuple([sd.name for sd, _, _ in compact] + [sd.name for sd in merge]),
        bytes_freed=freed,
    )


def _covered_parts(backend: Backend) -> list[Path]:
    out = []
    for sd in set_dirs(backend):
        for name in sd.segment_names():
            prefix = f"{sd.key}/{name}/{COMMITS_DIR}"
            names = backend.list(prefix)
            try:
                keep = {n for _, _, n in live_parts(names)}
            except StoreCorruptError:
                continue  # overlapping parts: verify reports them, gc leaves them alone
            out += [Path(backend.local_path(f"{prefix}/{n}")) for n in names
                    if n.endswith(".parquet") and n not in keep]
    return out


def _subset(live: Live, mask: np.ndarray) -> Live:
    return Live(live.study_id.filter(bools(mask)), live.seg[mask], live.array_row[mask],
                live.created_at[mask], live.segments, live.total)


def _slice(live: Live, lo: int, hi: int) -> Live:
    return Live(live.study_id.slice(lo, hi - lo), live.seg[lo:hi], live.array_row[lo:hi],
                live.created_at[lo:hi], live.segments, live.total)


def auto_compact(store: Store, sd: SetDir) -> bool:
    """Automatic maintenance after a writer closed (the caller holds the whole-store lock): merge
    the commit parts of segments with more than ``max_parts`` parts; when the set has more than
    ``max_segments`` segments, compact its smallest ones into one so that ``max_segments // 2``
    remain (each row is rewritten O(log) times over many sessions, not every time)."""
    backend = store.backend
    max_segments, max_parts = store.config["max_segments"], store.config["max_parts"]
    snap = sd.snapshot()
    merged = False
    for seg in snap.segments:
        if len(seg.parts) > max_parts:
            merge_parts(backend, seg.commits_key, sort=not seg.ordered() and seg.rows <= 2_000_000)
            merged = True
    if merged:
        snap = sd.snapshot()
    full = [i for i, s in enumerate(snap.segments) if s.rows]
    if len(full) <= max_segments:
        return False
    k = len(full) - max_segments // 2 + 1
    smallest = sorted(full, key=lambda i: (snap.segments[i].rows, snap.segments[i].name))[:k]
    live = resolve_live(backend, snap)
    mask = np.isin(live.seg, smallest)
    compact_segments(backend, sd, snap, _subset(live, mask), smallest)
    store.refresh()
    return True


def compact_segments(backend: Backend, sd: SetDir, snap: Snapshot, rows: Live,
                     replace: list[int]) -> int:
    """Write ``rows`` (live rows of the set, ordered by study_id, all from the segments
    ``replace`` of ``snap``) into one new segment, then remove those segments. Returns the bytes
    freed. Only rows that are live in the whole set may be given: they keep their commit time,
    so the new segment supersedes exactly what they superseded."""
    doc = sd.doc()
    dtype = np.dtype(doc["dtype"])
    tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
    old = [snap.segments[i] for i in replace]
    before = sum(tree_size(Path(backend.local_path(s.key))) for s in old)
    n = rows.n
    name = new_segment_name()
    key = f"{sd.key}/{name}"
    meta = segment_meta(backend, rows, [c for c in COMMIT_SCHEMA.names
                                        if c not in ("array_row", "study_id", "created_at")])
    if n:
        write_segment_doc(backend, key, "compact")
        for array_name, shape in [(EMBEDDINGS_ARRAY, (int(doc["dim"]),))] + (
                [(TOKENS_ARRAY, tshape)] if tshape else []):
            arr = RowArray.create(backend, f"{key}/{array_name}", row_shape=shape,
                                  dtype=dtype.name, capacity=max(n, 1))
            cr = arr.chunk_rows
            buf = np.empty((cr, *shape), dtype=dtype)  # (chunk rows, *row) stored dtype
            for c in range(-(-n // cr)):
                lo, hi = c * cr, min(n, (c + 1) * cr)
                _gather_live(backend, _slice(rows, lo, hi), array_name, buf[: hi - lo])
                arr.write_chunk(c, buf[: hi - lo])
            arr.sync()
            arr.resize(n)
        table = commit_table({
            "array_row": np.arange(n, dtype=np.int64),
            "study_id": rows.study_id,
            **{c: meta[c] for c in meta.column_names},
            # Each row keeps its original commit time, so supersession order survives.
            "created_at": rows.created_at,
        })
        fault_point("compact_before_publish")
        PartLog(backend, f"{key}/{COMMITS_DIR}", "commits").append(table)
        backend.sync_dir(sd.key)
        fault_point("compact_after_publish")
    for i, s in enumerate(old):
        for p in backend.list(s.commits_key):  # unpublish first: then its rows are gone whole
            backend.delete(f"{s.commits_key}/{p}")
        backend.delete_tree(s.key)
        if i == 0:
            fault_point("compact_mid_delete")
    after = tree_size(Path(backend.local_path(key))) if n else 0
    return max(0, before - after)


def _gather_live(backend: Backend, rows: Live, array_name: str, out: np.ndarray) -> None:
    read_rows_for(backend, rows, array_name, out)


# ------------------------------------------------------------------------------------------------
# upgrade: schema_version 1 -> 2
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UpgradeReport:
    from_version: int | None
    to_version: int
    segments: int = 0
    rows: int = 0
    failure_logs: int = 0
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def upgrade_store(path: str | os.PathLike[str]) -> UpgradeReport:
    """Rewrite a schema_version 1 store in place as schema_version 2 (needs the whole-store lock).

    Each segment's ``commits.jsonl`` becomes one commit part (its meta.parquet / meta.arrow caches
    are deleted); each ``failures/<segment>.jsonl`` one failure part; ``store.json`` is rewritten
    last. Vectors are not touched (their 1 MiB chunks stay readable). Idempotent: a killed upgrade
    is finished by running it again; a store already at version 2 is left alone.
    """
    root = Path(path).expanduser().resolve()
    doc_path = root / STORE_DOC
    if not doc_path.exists():
        raise StoreNotFoundError(f"No embedstore store at {str(root)!r} (no store.json).")
    from embedstore.store.reader import read_store_doc

    doc = read_store_doc(doc_path)
    if doc.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{str(doc_path)!r} does not describe an embedstore store.")
    version = doc.get("schema_version")
    if version == SCHEMA_VERSION:
        return UpgradeReport(version, SCHEMA_VERSION, notes=("already at this version",))
    if version != 1:
        raise StoreFormatError(
            f"Store {str(root)!r} has schema_version {version!r}; `embedstore upgrade` converts "
            f"schema_version 1 to {SCHEMA_VERSION} only.")
    backend = LocalBackend(root)
    lock = Lock(root, None).acquire()
    segments = rows = logs = 0
    notes: list[str] = []
    try:
        for mod in backend.list(SETS_DIR):
            for enc in backend.list(f"{SETS_DIR}/{mod}"):
                sd = SetDir(backend, mod, enc)
                for name in sd.segment_names():
                    seg_key = f"{sd.key}/{name}"
                    log_key = f"{seg_key}/{V1_COMMITS_FILE}"
                    if backend.exists(log_key):
                        table, torn = parse_v1_log(backend.read(log_key))
                        notes += [f"{seg_key}: {t}" for t in torn]
                        prefix = f"{seg_key}/{COMMITS_DIR}"
                        if table.num_rows and not live_parts(backend.list(prefix)):
                            PartLog(backend, prefix, "commits").append(table)
                        rows += table.num_rows
                        segments += 1
                        backend.delete(log_key)
                    for m in V1_META_FILES:
                        backend.delete(f"{seg_key}/{m}")
                    sweep_partials(Path(backend.local_path(seg_key)))
        for name in backend.list(FAILURES_DIR):
            if not name.endswith(".jsonl"):
                continue
            key = f"{FAILURES_DIR}/{name}"
            table = parse_v1_failures(backend.read(key))
            prefix = f"{FAILURES_DIR}/{name[: -len('.jsonl')]}"
            if table.num_rows and not live_parts(backend.list(prefix)):
                PartLog(backend, prefix, "failures").append(table)
            backend.delete(key)
            logs += 1
        doc = {**doc, "schema_version": SCHEMA_VERSION, "config": dict(DEFAULT_CONFIG),
               "upgraded_from": 1}
        atomic_write_bytes(doc_path, json.dumps(doc, indent=2).encode())
    finally:
        lock.release()
    return UpgradeReport(1, SCHEMA_VERSION, segments, rows, logs, tuple(notes))


__all__ = ["Problem", "VerifyReport", "GcReport", "UpgradeReport", "verify", "gc", "auto_compact",
           "compact_segments", "upgrade_store", "TEMP_SUFFIX"]
