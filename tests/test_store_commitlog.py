"""The commit record (embedstore.store.commitlog): its byte format, its parser, and that it has
exactly one home; and the crash-test hook (embedstore.store._faults)."""

from __future__ import annotations

import json
import re
import zlib
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import ConfigError, StoreCorruptError
from embedstore.store import open_store
from embedstore.store._faults import FaultPlan
from embedstore.store.commitlog import CommitRecord, parse_commit_log

ROOT = Path(__file__).resolve().parents[1]
WHEN = "2025-01-01T12:00:00.123456Z"


def record(**over) -> CommitRecord:
    fields = dict(
        offset0=4, study_id=["S1", "S2"], patient_id=["P1", "P2"], cache_key=["k1", "k2"],
        content_hash=["h1", "h2"], crc32=[1, 2], created_at=WHEN, source_sig=[None, "sig"],
        tokens_crc32=[3, 4],
    )
    return CommitRecord(**{**fields, **over})


def test_record_line_is_the_documented_byte_format() -> None:
    # Pinned on purpose: these are the bytes schema_version 1 stores hold (docs/STORE_FORMAT.md),
    # so a change here is a format change, not a refactor.
    assert record().to_line() == (
        b'{"offset0":4,"n":2,"created_at":"2025-01-01T12:00:00.123456Z","study_id":["S1","S2"],'
        b'"patient_id":["P1","P2"],"cache_key":["k1","k2"],"content_hash":["h1","h2"],'
        b'"crc32":[1,2],"source_sig":[null,"sig"],"tokens_crc32":[3,4]}\n'
    )
    # Optional columns are left out when they carry nothing.
    line = record(source_sig=[None, None], tokens_crc32=None).to_line()
    assert list(json.loads(line)) == [
        "offset0", "n", "created_at", "study_id", "patient_id", "cache_key", "content_hash", "crc32"
    ]


def test_record_round_trips_and_its_table_is_what_the_parser_gives(tmp_path: Path) -> None:
    per_row = record(created_at=[WHEN, "2025-01-02T00:00:00.000001Z"], source_sig=None,
                     tokens_crc32=None, offset0=0)
    for r in (record(), per_row):
        assert CommitRecord.from_line(r.to_line()) == r
    log = tmp_path / "commits.jsonl"
    log.write_bytes(per_row.to_line() + record().to_line())
    table, consumed, notes = parse_commit_log(log)
    assert (consumed, notes) == (log.stat().st_size, [])
    assert table.equals(pa.concat_tables([per_row.to_table(), record().to_table()]))
    assert table["offset"].to_pylist() == [0, 1, 4, 5]
    assert table["source_sig"].to_pylist() == [None, None, None, "sig"]
    utc = timezone.utc
    assert table["created_at"].to_pylist() == [
        datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=utc),
        datetime(2025, 1, 2, 0, 0, 0, 1, tzinfo=utc),
        datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=utc),
        datetime(2025, 1, 1, 12, 0, 0, 123456, tzinfo=utc),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        {"source_sig": ["only-one"]},  # a per-row column shorter than n
        {"tokens_crc32": [1, 2, 3]},
        {"created_at": [WHEN]},
        {"created_at": 17},
        {"created_at": "not a time"},
    ],
)
def test_inconsistent_record_is_damage_unless_it_is_the_torn_tail(tmp_path: Path, bad) -> None:
    rec = json.loads(record().to_line())
    broken = (json.dumps({**rec, **bad}) + "\n").encode()
    with pytest.raises(ValueError):
        CommitRecord.from_line(broken)
    log = tmp_path / "commits.jsonl"
    log.write_bytes(record().to_line() + broken)  # last line: a killed writer's, ignored
    table, _, notes = parse_commit_log(log)
    assert table.num_rows == 2 and len(notes) == 1
    log.write_bytes(broken + record().to_line())  # followed by more: corruption
    with pytest.raises(StoreCorruptError, match="line 1 is damaged"):
        parse_commit_log(log)


def test_writer_and_compaction_write_records_in_the_one_format(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", create=True)
    vecs = np.arange(6, dtype=np.float32).reshape(3, 2) + 1  # (3, D=2)
    for session in (range(2), range(1, 3)):  # the second supersedes S1
        with store.writer("CXR", "toy-1", dim=2, spec={"e": 1}) as w:
            for i in session:
                w.add(study_id=f"S{i}", patient_id=f"P{i}", cache_key=f"k{i}", content_hash=f"h{i}",
                      vector=vecs[i], source_sig="x" if i == 2 else None)
    logs = sorted((tmp_path / "store" / "sets" / "CXR" / "toy-1").glob("seg-*/commits.jsonl"))
    first = re.sub(rb'"created_at":"[^"]*"', b'"created_at":"T"', logs[0].read_bytes())
    crc = [zlib.crc32(vecs[i]) for i in range(2)]
    assert first == (
        b'{"offset0":0,"n":2,"created_at":"T","study_id":["S0","S1"],"patient_id":["P0","P1"],'
        b'"cache_key":["k0","k1"],"content_hash":["h0","h1"],"crc32":[%d,%d]}\n' % tuple(crc)
    )
    times = [CommitRecord.from_line(p.read_bytes()).created_at for p in logs]
    store.gc(dry_run=False)
    (log,) = (tmp_path / "store" / "sets" / "CXR" / "toy-1").glob("seg-*/commits.jsonl")
    merged = CommitRecord.from_line(log.read_bytes())
    assert merged.to_line() == log.read_bytes()
    assert merged.study_id == ["S0", "S1", "S2"]
    assert merged.created_at == [times[0], times[1], times[1]]  # each row keeps its commit time
    assert merged.source_sig == [None, None, "x"]
    assert merged.crc32 == [zlib.crc32(v) for v in vecs]


def _library_files_containing(pattern: str) -> list[str]:
    return sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "embedstore").rglob("*.py")
        if re.search(pattern, p.read_text())
    )


def test_the_commit_record_and_the_crash_hook_each_have_one_home() -> None:
    assert _library_files_containing(r'"offset0"') == ["embedstore/store/commitlog.py"]
    assert _library_files_containing(r"EMBEDSTORE_CRASH_AT|_CRASH_AT") == [
        "embedstore/store/_faults.py"
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
