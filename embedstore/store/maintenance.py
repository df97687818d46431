"""Maintenance of a store: verify (read everything, change nothing), gc and compaction."""

from __future__ import annotations

import os
import shutil
import socket
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._fsio import fsync_dir, tree_size
from embedstore.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError
from embedstore.store._zarr import RowArray, sweep_partials
from embedstore.store.commitlog import CommitRecord, parse_commit_log, write_commit_log
from embedstore.store.format import (
    COMMITS_FILE,
    COMPACT_PREFIX,
    EMBEDDINGS_ARRAY,
    META_ARROW,
    META_PARQUET,
    SETS_DIR,
    TOKENS_ARRAY,
    iso_from_micros,
)
from embedstore.store.lock import Lock, pid_alive
from embedstore.store.segment import (
    Live,
    SetDir,
    new_segment_name,
    read_rows_for,
    read_segment_doc,
    segment_rows,
    set_dirs,
    write_meta,
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
# verify
# ------------------------------------------------------------------------------------------------


def verify(store: Store) -> VerifyReport:
    """Check every committed row (checksum, shape, fill value, metadata); modify nothing."""
    root = store.root
    problems: list[Problem] = []
    rows_checked = 0
    manifest_mod: dict[str, str] = {}
    if store.manifest_path.exists():
        m = pq.read_table(store.manifest_path, columns=["study_id", "modality"])
        manifest_mod = dict(zip(m["study_id"].to_pylist(), m["modality"].to_pylist(), strict=True))
    for tmp in sweep_partials(root / SETS_DIR, dry_run=True):
        problems.append(
            Problem("orphan_temp_file", str(tmp.relative_to(root)),
                    "temp file left by a killed writer (removed by the next writer or gc)",
                    "warning")
        )
    sets = set_dirs(root)
    for sd in sets:
        try:
            doc = sd.doc()
        except (StoreCorruptError, StoreNotFoundError) as e:
            problems.append(Problem("bad_spec", str(sd.path.relative_to(root)), str(e)))
            continue
        dim, dtype = int(doc["dim"]), np.dtype(doc["dtype"])
        tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
        for seg in sd.segments():
            rows_checked += _verify_segment(root, sd, seg, dim, dtype, tshape, manifest_mod, problems)
    return VerifyReport(tuple(problems), len(sets), rows_checked)


def _verify_segment(root, sd, seg, dim, dtype, tshape, manifest_mod, problems) -> int:
    rel = str(seg.relative_to(root))
    try:
        t, _, notes = parse_commit_log(seg / COMMITS_FILE)
    except StoreCorruptError as e:
        problems.append(Problem("commit_log_damaged", rel, str(e)))
        return 0
    for note in notes:
        problems.append(Problem("torn_commit_line", rel, note, "warning"))
    if t.num_rows == 0:
        problems.append(Problem("empty_segment", rel, "no committed rows (gc removes it)", "warning"))
        return 0
    for meta in (seg / META_PARQUET, seg / META_ARROW):
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
    checks = [(EMBEDDINGS_ARRAY, (dim,), "crc32")]
    if tshape:
        checks.append((TOKENS_ARRAY, tshape, "tokens_crc32"))
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
                problems.append(Problem("chunk_unreadable", str(cpath.relative_to(root)),
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


# ------------------------------------------------------------------------------------------------
# gc and compaction
# ------------------------------------------------------------------------------------------------


def gc(store: Store, *, dry_run: bool = True, keep_sets: Iterable[str] | None = None) -> GcReport:
    """See Store.gc."""
    lock = None if dry_run else Lock(store.root, None).acquire()
    try:
        return _gc(store, dry_run, None if keep_sets is None else {str(k) for k in keep_sets})
    finally:
        if lock is not None:
            lock.release()
            store.refresh()


def _gc(store: Store, dry_run: bool, keep: set[str] | None) -> GcReport:
    root = store.root
    manifest_ids = None
    if store.manifest_path.exists():
        manifest_ids = pq.read_table(store.manifest_path, columns=["study_id"])["study_id"]
    superseded: dict[str, int] = {}
    unreferenced: dict[str, int] = {}
    drop_sets: list[SetDir] = []
    empty: list[Path] = []
    compact: list[tuple[SetDir, Live, pa.Table]] = []
    host = socket.gethostname()
    for sd in set_dirs(root):
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
            if i in used or segment_rows(seg).num_rows:
                nonempty += 1
                continue
            info = read_segment_doc(seg)
            pid = info.get("pid")
            if info.get("host") == host and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
                continue  # a live writer's fresh segment
            empty.append(seg)
        if live.superseded or unreferenced[sd.name] or nonempty > 1:
            compact.append((sd, live, table))
    temps = sweep_partials(root / SETS_DIR, dry_run=True)
    temps += sorted(p for p in root.rglob("*.tmp") if p.is_file())
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    freed = 0
    compacted: list[str] = []
    if not dry_run:
        for p in temps:
            freed += p.stat().st_size
            p.unlink(missing_ok=True)
        for sd in drop_sets:
            freed += tree_size(sd.path)
            shutil.rmtree(sd.path)
        for seg in empty:
            freed += tree_size(seg)
            shutil.rmtree(seg)
        for sd, live, table in compact:
            freed += _compact(sd, live, table)
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


def _compact(sd: SetDir, live: Live, table: pa.Table) -> int:
    """Rewrite ``table``'s rows into one new segment, then delete the old segments."""
    doc = sd.doc()
    dtype = np.dtype(doc["dtype"])
    tshape = tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None
    old = [s for s in live.segments if s.exists()]
    before = sum(tree_size(s) for s in old)
    n = table.num_rows
    name = new_segment_name()
    tmpdir = sd.path / f"{COMPACT_PREFIX}{name}"
    tmpdir.mkdir()
    write_segment_doc(tmpdir, "gc")
    crcs: dict[str, list[int]] = {}
    for array_name, shape, crc_col in [(EMBEDDINGS_ARRAY, (int(doc["dim"]),), "crc32")] + (
        [(TOKENS_ARRAY, tshape, "tokens_crc32")] if tshape else []
    ):
        data = np.empty((n, *shape), dtype=dtype)  # (n, *row) stored dtype
        read_rows_for(table, live.segments, array_name, data)
        arr = RowArray.create(tmpdir / array_name, row_shape=shape, dtype=dtype.name, capacity=max(n, 1))
        for c in range(-(-n // arr.chunk_rows)):
            arr.write_chunk(c, data[c * arr.chunk_rows : (c + 1) * arr.chunk_rows])
        arr.resize(n)
        fsync_dir(arr.path)
        crcs[crc_col] = [zlib.crc32(r) for r in data]
    record = CommitRecord(
        offset0=0,
        study_id=table["study_id"].to_pylist(),
        patient_id=table["patient_id"].to_pylist(),
        cache_key=table["cache_key"].to_pylist(),
        content_hash=table["content_hash"].to_pylist(),
        source_sig=table["source_sig"].to_pylist(),
        crc32=crcs["crc32"],
        tokens_crc32=crcs.get("tokens_crc32"),
        # Each row keeps its original commit time, so supersession order survives compaction.
        created_at=[iso_from_micros(us) for us in table["created_at"].cast(pa.int64()).to_pylist()],
    )
    write_commit_log(tmpdir / COMMITS_FILE, [record])
    write_meta(tmpdir, record.to_table())
    fsync_dir(tmpdir)
    new = sd.path / name
    os.replace(tmpdir, new)  # the swap: from here on the new segment holds every live row
    fsync_dir(sd.path)
    for s in old:
        shutil.rmtree(s)
    return max(0, before - tree_size(new))
