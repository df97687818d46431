"""The DuckDB catalog: views, pairing, runs, rebuild on change, and the read-only sandbox."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedstore.errors import QueryError, QueryRefusedError
from embedstore.store import open_store

H = 3_600_000_000  # one hour in microseconds
T0 = 1_700_000_000_000_000


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _manifest() -> pa.Table:
    rows = [
        # patient A: two CXRs 30 h and 10 h before the CTPA -> the 10 h one pairs
        ("A", "a-cxr1", "CXR", T0 - 30 * H, None, None),
        ("A", "a-cxr2", "CXR", T0 - 10 * H, None, None),
        ("A", "a-ct", "CTPA", T0, 1, None),
        # patient B: CXR 100 h away -> no pair within 48 h
        ("B", "b-cxr", "CXR", T0 - 100 * H, None, None),
        ("B", "b-ct", "CTPA", T0, 0, None),
        # patient C: an explicit pair_id 200 h apart is outside the rule (dropped, counted);
        # the near CXR is no candidate, because the CTPA names its pair
        ("C", "c-cxr-far", "CXR", T0 - 200 * H, None, "pair-c"),
        ("C", "c-cxr-near", "CXR", T0 - 1 * H, None, None),
        ("C", "c-ct", "CTPA", T0, 1, "pair-c"),
    ]
    return pa.table(
        {
            "patient_id": [r[0] for r in rows],
            "study_id": [r[1] for r in rows],
            "modality": [r[2] for r in rows],
            "path": [f"img/{r[1]}" for r in rows],
            "acquired_at": pa.array([r[3] for r in rows], pa.timestamp("us")),
            "label_pe": pa.array([r[4] for r in rows], pa.int8()),
            "split": ["train", "train", "train", "val", "val", "test", "test", "test"],
            "pair_id": pa.array([r[5] for r in rows], pa.string()),
            "age": [70, 70, 70, 55, 55, 61, 61, 61],
        }
    )


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store", create=True)
    s.attach_manifest(_manifest())
    with s.writer("CXR", "enc", dim=4, spec={}) as w:
        for i, sid in enumerate(["a-cxr2", "a-cxr1", "b-cxr"]):
            w.add(study_id=sid, patient_id=sid[0].upper(), cache_key=f"k{i}", content_hash="h",
                  vector=np.full(4, i + 1, np.float32))
        w.record_failure(study_id="c-cxr-far", modality="CXR", stage="decode", reason="truncated",
                         message="pixel data too short")
    return s


def test_views_hold_manifest_columns_embeddings_and_failures(store):
    cols = store.sql("DESCRIBE studies")["column_name"].to_pylist()
    assert {"patient_id", "study_id", "modality", "split", "age", "pair_id"} <= set(cols)
    emb = store.sql("SELECT * FROM embeddings ORDER BY row")
    assert emb.column_names == ["study_id", "patient_id", "modality", "encoder_key",
                                "content_hash", "cache_key", "row", "created_at"]
    assert emb["study_id"].to_pylist() == ["a-cxr1", "a-cxr2", "b-cxr"]  # row = load order
    assert emb["row"].to_pylist() == [0, 1, 2]
    f = store.sql("SELECT study_id, stage, reason, message FROM failures").to_pylist()
    assert f == [{"study_id": "c-cxr-far", "stage": "decode", "reason": "truncated",
                  "message": "pixel data too short"}]
    got = store.sql(
        "SELECT e.study_id, s.age FROM embeddings e JOIN studies s USING (study_id) "
        "WHERE s.split = 'train' ORDER BY 1"
    ).to_pylist()
    assert got == [{"study_id": "a-cxr1", "age": 70}, {"study_id": "a-cxr2", "age": 70}]


def test_pairs_explicit_then_nearest_within_gap(store):
    pairs = store.sql("SELECT * FROM pairs ORDER BY patient_id").to_pylist()
    assert [(p["patient_id"], p["cxr_study_id"], p["ctpa_study_id"]) for p in pairs] == [
        ("A", "a-cxr2", "a-ct"),
    ]
    assert pairs[0]["gap_hours"] == pytest.approx(10.0) and pairs[0]["pair_id"] == "auto:a-ct"
    assert (pairs[0]["split"], pairs[0]["label_pe"]) == ("train", 1)
    dropped = store.sql("SELECT cxr_study_id, drop_reason FROM pair_candidates "
                        "WHERE ctpa_study_id = 'c-ct'").to_pylist()
    assert dropped == [{"cxr_study_id": "c-cxr-far", "drop_reason": "over_max_gap"}]
    store.attach_manifest(_manifest(), pair_max_gap_hours=120)
    got = store.sql("SELECT ctpa_study_id, cxr_study_id FROM pairs ORDER BY 1").to_pylist()
    assert {"ctpa_study_id": "b-ct", "cxr_study_id": "b-cxr"} in got
    assert {"ctpa_study_id": "c-ct", "cxr_study_id": "c-cxr-far"} not in got
    store.attach_manifest(_manifest(), pair_max_gap_hours=240)
    got = store.sql("SELECT ctpa_study_id, cxr_study_id, pair_id FROM pairs ORDER BY 1").to_pylist()
    assert {"ctpa_study_id": "c-ct", "cxr_study_id": "c-cxr-far", "pair_id": "pair-c"} in got


def test_runs_view_tolerates_partial_runs(store):
    good = store.runs_dir / "prior-1"
    good.mkdir()
    (good / "config.json").write_text(json.dumps(
        {"run_id": "prior-1", "kind": "prior", "created_at": "2025-01-01T00:00:00+00:00",
         "cxr_encoder": "enc", "ctpa_encoder": "vol"}))
    (good / "metrics.json").write_text(json.dumps({"val_auc": 0.81}))
    half = store.runs_dir / "teacher-2"
    half.mkdir()
    (half / "config.json").write_text('{"kind": "tea')  # another process is still writing it
    (store.runs_dir / ".tmp-cxr-3").mkdir()
    runs = store.sql("SELECT run_id, kind, encoder_keys, val_auc, config FROM runs").to_pylist()
    assert len(runs) == 1
    r = runs[0]
    assert (r["run_id"], r["kind"], r["val_auc"]) == ("prior-1", "prior", 0.81)
    assert r["encoder_keys"] == ["enc", "vol"] and json.loads(r["config"])["kind"] == "prior"


def test_catalog_is_rebuilt_when_files_change_and_never_persisted(store):
    assert store.sql("SELECT count(*) AS n FROM embeddings")["n"][0].as_py() == 3
    with store.writer("CTPA", "vol", dim=2, spec={}) as w:
        w.add(study_id="a-ct", patient_id="A", cache_key="kc", content_hash="h",
              vector=np.ones(2, np.float32))
    got = store.sql("SELECT modality, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1")
    assert got.to_pylist() == [{"modality": "CTPA", "n": 1}, {"modality": "CXR", "n": 3}]
    # No catalog file exists to go stale: deleting every derived file changes nothing.
    assert not [p for p in store.root.rglob("*") if p.suffix in (".duckdb", ".db", ".wal")]
    for p in store.root.rglob("meta.*"):
        p.unlink()
    fresh = open_store(store.root)
    assert fresh.sql("SELECT modality, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1"
                     ).equals(got)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM studies",
        "WITH x AS (SELECT study_id FROM embeddings) SELECT count(*) FROM x",
        "VALUES (1, 2)",
        "DESCRIBE embeddings",
        "FROM pairs",
        "SUMMARIZE studies",
    ],
)
def test_read_only_statements_pass(store, sql):
    assert isinstance(store.sql(sql), pa.Table)


FORBIDDEN = [
    ("COPY studies TO '{out}'", "COPY"),
    ("COPY (SELECT 1) TO '{inside}'", "COPY"),
    ("EXPORT DATABASE '{outdir}'", "EXPORT"),
    ("ATTACH '{db}' AS other", "ATTACH"),
    ("INSTALL httpfs", "LOAD"),
    ("LOAD httpfs", "LOAD"),
    ("SET threads = 8", "SET"),
    ("PRAGMA memory_limit = '100GB'", "SET"),
    ("RESET memory_limit", "SET"),
    ("USE memory", "SET"),
    ("CREATE TABLE t AS SELECT 1", "CREATE"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE"),
    ("CREATE MACRO m(x) AS x + 1", "CREATE"),
    ("INSERT INTO failures (study_id) VALUES ('x')", "INSERT"),
    ("UPDATE embeddings SET row = 0", "UPDATE"),
    ("DELETE FROM embeddings", "DELETE"),
    ("DROP VIEW studies", "DROP"),
    ("ALTER TABLE embeddings RENAME TO e2", "ALTER"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CALL"),
    ("EXPLAIN ANALYZE COPY studies TO '{out}'", "EXPLAIN"),
    ("SELECT 1; COPY studies TO '{out}'", "2 statements"),
    ("SELECT * FROM read_csv('/etc/passwd')", "outside the store"),
    ("SELECT * FROM read_text('/etc/hostname')", "outside the store"),
    ("SELECT * FROM read_parquet('{outside_parquet}')", "outside the store"),
    ("SELECT * FROM glob('/etc/*')", "outside the store"),
    ("SELECT * FROM '{outside_parquet}'", "outside the store"),
]


@pytest.mark.parametrize("template,what", FORBIDDEN, ids=[t for t, _ in FORBIDDEN])
def test_forbidden_statements_are_refused_and_change_nothing(store, tmp_path, template, what):
    outside = tmp_path / "outside"
    outside.mkdir()
    pq.write_table(pa.table({"secret": [42]}), outside / "data.parquet")
    sql = template.format(
        out=outside / "out.csv", inside=store.root / "x.csv", outdir=outside / "exp",
        db=outside / "x.duckdb", outside_parquet=outside / "data.parquet",
    )
    store.sql("SELECT 1")  # build the catalog first so only the statement can change things
    before_store, before_out = tree_hash(store.root), tree_hash(outside)
    with pytest.raises(QueryRefusedError) as e:
        store.sql(sql)
    assert what in str(e.value)
    assert isinstance(e.value, PermissionError)
    assert tree_hash(store.root) == before_store and tree_hash(outside) == before_out
    # The sandbox still works afterwards and its settings are unchanged.
    assert store.sql("SELECT current_setting('threads') AS t")["t"][0].as_py() == 2
    assert store.sql("SELECT count(*) AS n FROM embeddings")["n"][0].as_py() == 3


def test_files_inside_the_store_may_be_read(store):
    got = store.sql(f"SELECT count(*) AS n FROM read_parquet('{store.root / 'manifest.parquet'}')")
    assert got["n"][0].as_py() == 8


def test_sql_errors_carry_duckdbs_message(store):
    with pytest.raises(QueryError, match="no_such_column") as e:
        store.sql("SELECT no_such_column FROM studies")
    assert not isinstance(e.value, QueryRefusedError)
    with pytest.raises(QueryError, match="SQL error"):
        store.sql("SELEC 1")


def test_timeout_interrupts_long_queries(store):
    t = time.perf_counter()
    with pytest.raises(QueryError, match="time limit") as e:
        store.sql("SELECT count(*) FROM range(100000000000) a, range(100) b", timeout_s=0.3)
    assert e.value.reason == "query_timeout"
    assert time.perf_counter() - t < 10
    assert store.sql("SELECT 42 AS x")["x"][0].as_py() == 42  # no stray interrupt afterwards


def test_memory_limit_is_enforced(store):
    with pytest.raises(QueryError) as e:
        store.sql("SELECT list(range) AS l FROM range(200000000)", memory_limit="64MB")
    assert e.value.reason == "query_memory"


def test_where_injection_is_still_sandboxed(store):
    with pytest.raises(QueryRefusedError, match="2 statements"):
        store.load("CXR", "enc", where="true; DROP VIEW studies")
    assert len(store.load("CXR", "enc", where="age > 60")) == 2


def test_sql_helpers_quote_and_conjoin() -> None:
    from embedstore.sql import conjoin, literal

    assert literal("O'Brien") == "'O''Brien'"
    # a user's OR stays inside its parentheses
    assert conjoin("split = 'train'", None, "", "age > 60 OR sex = 'F'") == \
        "(split = 'train') AND (age > 60 OR sex = 'F')"
    assert conjoin() == "TRUE"
