"""The commit record (embedstore.store.commitlog): its Parquet part format, how parts cover each
other, its parser, and that it has exactly one home; the schema_version 1 parser kept for
`embedstore upgrade`; and the crash-test hook (embedstore._faults)."""

from __future__ import annotations

import json
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedstore._faults import FaultPlan
from embedstore.errors import ConfigError, StoreCorruptError
from embedstore.store import open_store
from embedstore.store._backend import LocalBackend
from embedstore.store.commitlog import (
    COMMIT_SCHEMA,
    PART_META_KEY,
    CommitRecord,
    encode_part,
    live_parts,
    merge_parts,
    parse_v1_log,
    read_part_info,
    read_parts,
)

ROOT = Path(__file__).resolve().parents[1]
WHEN = "2025-01-01T12:00:00.123456Z"


def record(**over) -> CommitRecord:
    fields = dict(
        offset0=4, study_id=["S1", "S2"], patient_id=["P1", "P2"], cache_key=["k1", "k2"],
        content_hash=["h1", "h2"], crc32=[1, 2], created_at=WHEN, source_sig=[None, "sig"],
        tokens_crc32=[3, 4],
    )
    return CommitRecord(**{**fields, **over})


def test_part_is_the_documented_format(tmp_path: Path) -> None:
    # Pinned on purpose: the column names, types and order, and the footer's key-value
    # metadata, are the schema_version 2 format (docs/STORE_FORMAT.md, "Commit parts").
    assert [(f.name, str(f.type)) for f in COMMIT_SCHEMA] == [
        ("array_row", "int64"), ("study_id", "string"), ("patient_id", "string"),
        ("cache_key", "string"), ("content_hash", "string"), ("source_sig", "string"),
        ("crc32", "uint32"), ("tokens_crc32", "uint32"), ("created_at", "timestamp[us, tz=UTC]"),
    ]
    (tmp_path / "seg" / "commits").mkdir(parents=True)
    key = "seg/commits/00000003-00000003.parquet"
    (tmp_path / key).write_bytes(encode_part(record().to_table(), "commits", 3, 3).to_pybytes())
    md = pq.read_metadata(tmp_path / key)
    assert json.loads(md.metadata[PART_META_KEY]) == {
        "kind": "commits", "schema_version": 2, "first": 3, "last": 3, "rows": 2, "row0": 4,
        "sorted": True, "min": "S1", "max": "S2",
    }
    info = read_part_info(LocalBackend(tmp_path), key)
    assert (info.first, info.last, info.rows, info.row0, info.sorted) == (3, 3, 2, 4, True)
    t = read_parts(LocalBackend(tmp_path), [info])
    assert t.equals(record().to_table())
    assert t["array_row"].to_pylist() == [4, 5]
    assert t["source_sig"].to_pylist() == [None, "sig"]
    assert t["created_at"].to_pylist() == [datetime(2025, 1, 1, 12, 0, 0, 123456,
                                                    tzinfo=timezone.utc)] * 2
    unsorted = record(study_id=["S2", "S1"]).to_table()
    (tmp_path / "seg/commits/00000004-00000004.parquet").write_bytes(
        encode_part(unsorted, "commits", 4, 4).to_pybytes())
    assert not read_part_info(LocalBackend(tmp_path), "seg/commits/00000004-00000004.parquet").sorted


def test_parts_cover_each_other_and_overlap_is_damage() -> None:
    singles = [f"{i:08d}-{i:08d}.parquet" for i in range(4)]
    assert [p[2] for p in live_parts(singles + ["x.tmp", "00000000-00000000.parquet.a1.partial"])
            ] == singles
    merged = "00000000-00000002.parquet"
    assert [p[2] for p in live_parts(singles + [merged])] == [merged, singles[3]]
    with pytest.raises(StoreCorruptError, match="overlap"):
        live_parts(["00000000-00000002.parquet", "00000001-00000003.parquet"])


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "wrong_name"],
)
def test_a_damaged_part_is_corruption_not_a_torn_tail(tmp_path: Path, damage: str) -> None:
    # A part is published whole (write-once under its name), so a bad one is damage.
    b = LocalBackend(tmp_path)
    data = encode_part(record().to_table(), "commits", 0, 0).to_pybytes()
    name = "00000000-00000000.parquet"
    if damage == "garbage":
        data = b"PAR1 not really"
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        name = "00000001-00000001.parquet"  # the footer says part 0
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / name).write_bytes(data)
    with pytest.raises(StoreCorruptError, match="run `embedstore verify`"):
        read_part_info(b, f"c/{name}")


def test_merge_publishes_first_then_removes_what_it_covers(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path)
    (tmp_path / "c").mkdir()
    tables = []
    for i in range(3):
        t = record(offset0=2 * i, study_id=[f"S{2 * i}", f"S{2 * i + 1}"]).to_table()
        tables.append(t)
        (tmp_path / "c" / f"{i:08d}-{i:08d}.parquet").write_bytes(
            encode_part(t, "commits", i, i).to_pybytes())
    assert merge_parts(b, "c") == 3
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["00000000-00000002.parquet"]
    (info,) = [read_part_info(b, f"c/{n}") for _, _, n in live_parts(b.list("c"))]
    assert (info.rows, info.sorted, info.min_id, info.max_id) == (6, True, "S0", "S5")
    assert read_parts(b, [info]).equals(pa.concat_tables(tables))


def test_writer_and_compaction_write_parts_in_the_one_format(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", create=True)
    vecs = np.arange(6, dtype=np.float32).reshape(3, 2) + 1  # (3, D=2)
    for session in (range(2), range(1, 3)):  # the second supersedes S1
        with store.writer("CXR", "toy-1", dim=2, spec={"e": 1}) as w:
            for i in session:
                w.add(study_id=f"S{i}", patient_id=f"P{i}", cache_key=f"k{i}", content_hash=f"h{i}",
                      vector=vecs[i], source_sig="x" if i == 2 else None)
    set_dir = tmp_path / "store" / "sets" / "CXR" / "toy-1"
    parts = sorted(set_dir.glob("seg-*/commits/*.parquet"))
    assert [p.name for p in parts] == ["00000000-00000000.parquet"] * 2
    first = pq.read_table(parts[0])
    assert first.schema.remove_metadata() == COMMIT_SCHEMA
    assert first.select(["array_row", "study_id", "cache_key", "crc32"]).to_pylist() == [
        {"array_row": 0, "study_id": "S0", "cache_key": "k0", "crc32": zlib.crc32(vecs[0])},
        {"array_row": 1, "study_id": "S1", "cache_key": "k1", "crc32": zlib.crc32(vecs[1])},
    ]
    times = [pq.read_table(p)["created_at"][0].as_py() for p in parts]
    store.gc(dry_run=False)
    (part,) = set_dir.glob("seg-*/commits/*.parquet")
    merged = pq.read_table(part)
    assert merged.schema.remove_metadata() == COMMIT_SCHEMA
    assert merged["study_id"].to_pylist() == ["S0", "S1", "S2"]
    assert merged["array_row"].to_pylist() == [0, 1, 2]
    assert merged["created_at"].to_pylist() == [times[0], times[1], times[1]]  # kept per row
    assert merged["source_sig"].to_pylist() == [None, None, "x"]
    assert merged["crc32"].to_pylist() == [zlib.crc32(v) for v in vecs]
    # Nothing else describes the rows: no JSON log, no cache beside the parts.
    assert sorted(p.name for p in part.parent.parent.iterdir()) == [
        "commits", "embeddings.zarr", "segment.json"]


def test_v1_log_parser_reads_the_old_bytes() -> None:
    # The schema_version 1 line format, pinned: `embedstore upgrade` must read these bytes.
    line = (
        b'{"offset0":4,"n":2,"created_at":"2025-01-01T12:00:00.123456Z","study_id":["S1","S2"],'
        b'"patient_id":["P1","P2"],"cache_key":["k1","k2"],"content_hash":["h1","h2"],'
        b'"crc32":[1,2],"source_sig":[null,"sig"],"tokens_crc32":[3,4]}\n'
    )
    per_row = (
        b'{"offset0":0,"n":1,"created_at":["2025-01-02T00:00:00.000001Z"],"study_id":["S0"],'
        b'"patient_id":["P0"],"cache_key":["k0"],"content_hash":["h0"],"crc32":[9]}\n'
    )
    table, notes = parse_v1_log(per_row + line + b'{"offset0":6,"n":3,"stu')  # torn tail
    assert len(notes) == 1
    assert table.schema == COMMIT_SCHEMA
    assert table["array_row"].to_pylist() == [0, 4, 5]
    assert table.slice(1).equals(record().to_table())
    with pytest.raises(StoreCorruptError, match="line 1 is damaged"):
        parse_v1_log(b'{"offset0":0,"n":2,"study_id":["x"]}\n' + line)


def _library_files_containing(pattern: str, folder: str = "embedstore") -> list[str]:
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / folder).rglob("*.py")
        if re.search(pattern, p.read_text())
    )


def test_the_commit_record_and_the_crash_hook_each_have_one_home() -> None:
    assert _library_files_containing(r'b"embedstore\.part"|"offset0"') == [
        "embedstore/store/commitlog.py"]
    # In the store, only commitlog.py writes Parquet (besides the attached manifest).
    assert _library_files_containing(r"pq\.write_table|ParquetWriter", "embedstore/store") == [
        "embedstore/store/commitlog.py", "embedstore/store/reader.py"]
    assert _library_files_containing(r"EMBEDSTORE_CRASH_AT|_CRASH_AT") == [
        "embedstore/_faults.py"
    ]


def test_fault_plan_counts_visits_of_its_point_only() -> None:
    plan = FaultPlan("mid_commit:3")
    seen = [plan.due(p) for p in ["before_fsync", "mid_commit", "mid_commit", "after_fsync"]]
    assert seen == [None, None, None, None]
    fault = plan.due("mid_commit")
    assert fault is not None and (fault.point, fault.action) == ("mid_commit", "kill")
    assert FaultPlan("before_fsync").due("before_fsync") is not None  # nth defaults to 1
    assert FaultPlan(None).due("before_fsync") is None
    with pytest.raises(RuntimeError, match="unknown fault point"):
        plan.due("no_such_point")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("mid_comit:2", "Unknown EMBEDSTORE_CRASH_AT point 'mid_comit'. Valid: "),
     ("mid_commit:two", "must be an integer")],
)
def test_fault_plan_refuses_a_typo(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        FaultPlan(spec)
