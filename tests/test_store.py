"""Contract tests for embedstore.store: round trip, dtypes, supersession, cache keys, locks,
verify and gc. Tiny seeded synthetic data; subprocesses only where a second process is the point."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import (
    ConfigError,
    StoreFormatError,
    StoreLockedError,
    StoreNotFoundError,
)
from embedstore.store import make_cache_key, open_store

D = 12
SPEC = {"encoder": {"name": "toy", "weights_sha256": "ab" * 32}, "preprocess": {"size": 64}}


def vec(i: int, d: int = D) -> np.ndarray:
    return np.random.default_rng(1000 + i).standard_normal(d).astype(np.float32)


def sid(i: int) -> str:
    return f"S{i:04d}"


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def manifest(n: int) -> pa.Table:
    return pa.table(
        {
            "patient_id": [f"P{i // 2:04d}" for i in range(n)],
            "study_id": [sid(i) for i in range(n)],
            "modality": ["CXR" if i % 2 == 0 else "CTPA" for i in range(n)],
            "path": [f"img/{i}" for i in range(n)],
            "acquired_at": pa.array(
                [1_700_000_000_000_000 + (i % 2) * 3_600_000_000 for i in range(n)],
                pa.timestamp("us"),
            ),
            "label_pe": pa.array([(i // 2) % 3 == 0 for i in range(n)]).cast(pa.int8()),
            "split": ["train" if (i // 2) % 4 else "test" for i in range(n)],
            "site": ["A" if (i // 2) % 5 else "B" for i in range(n)],
        }
    )


def fill(store, ids, *, modality="CXR", key="toy-1", d=D, dtype="float32", **opts):
    with store.writer(modality, key, dim=d, spec=SPEC, dtype=dtype, **opts) as w:
        for i in ids:
            w.add(study_id=sid(i), patient_id=f"P{i // 2:04d}", cache_key=f"k{i}",
                  content_hash=f"h{i}", vector=vec(i, d))
    return w


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store", create=True)


def test_round_trip_orders_by_study_id_and_is_zarr_readable(store):
    ids = list(np.random.default_rng(0).permutation(40))
    fill(store, ids, chunk_rows=8, flush_rows=7)
    es = store.load("cxr", "toy-1")
    assert es.study_ids == [sid(i) for i in range(40)]
    assert es.vectors.dtype == np.float32 and es.vectors.flags.c_contiguous
    np.testing.assert_array_equal(es.vectors, np.stack([vec(i) for i in range(40)]))
    assert es.meta.column_names == ["row", "study_id", "patient_id", "cache_key", "content_hash",
                                    "created_at"]
    assert es.meta["row"].to_pylist() == list(range(40))
    assert es.meta["cache_key"].to_pylist() == [f"k{i}" for i in range(40)]
    assert es.spec == SPEC
    # The array is an ordinary Zarr v3 array: zarr reads the same rows (in commit order).
    import zarr

    (seg,) = (store.root / "sets" / "CXR" / "toy-1").glob("seg-*")
    z = zarr.open_array(str(seg / "embeddings.zarr"), mode="r")
    assert z.shape == (40, D)
    np.testing.assert_array_equal(z[:], np.stack([vec(i) for i in ids]))


def test_capacity_grows_and_partial_chunks_survive_rewrites(store):
    fill(store, range(101), capacity=4, chunk_rows=16, flush_rows=3)
    es = store.load("CXR", "toy-1")
    np.testing.assert_array_equal(es.vectors, np.stack([vec(i) for i in range(101)]))
    assert store.verify().ok


def test_float16_option(store):
    fill(store, range(10), dtype="float16")
    es = store.load("CXR", "toy-1")
    assert es.vectors.dtype == np.float32
    expect = np.stack([vec(i) for i in range(10)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(es.vectors, expect)
    assert not np.array_equal(es.vectors, np.stack([vec(i) for i in range(10)]))
    assert store.sets()[0].dtype == "float16"
    with pytest.raises(ConfigError, match="float64"):
        store.writer("CXR", "x", dim=D, spec=SPEC, dtype="float64")


def test_tokens_round_trip(store):
    with store.writer("CTPA", "vol-1", dim=D, spec=SPEC, tokens_shape=(3, 4), flush_rows=2) as w:
        for i in range(5):
            w.add(study_id=sid(i), patient_id="P", cache_key=f"k{i}", content_hash="h",
                  vector=vec(i), tokens=np.full((3, 4), i + 1, np.float32))
    es = store.load("CTPA", "vol-1")
    assert es.tokens.shape == (5, 3, 4)
    assert [float(t[0, 0]) for t in es.tokens] == [1, 2, 3, 4, 5]
    assert store.verify().ok


def test_two_encoders_of_same_study_coexist(store):
    fill(store, range(6), key="enc-a")
    fill(store, range(6), key="enc-b", d=5)
    a, b = store.load("CXR", "enc-a"), store.load("CXR", "enc-b")
    assert a.study_ids == b.study_ids and a.vectors.shape == (6, D) and b.vectors.shape == (6, 5)
    got = store.sql("SELECT encoder_key, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1")
    assert got.to_pylist() == [{"encoder_key": "enc-a", "n": 6}, {"encoder_key": "enc-b", "n": 6}]


def test_newer_commit_supersedes(store):
    fill(store, range(5))
    new = np.full(D, 7.0, np.float32)
    with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:
        assert "k2" in w.committed_keys()
        w.add(study_id=sid(2), patient_id="P0001", cache_key="k2-new", content_hash="h2b",
              vector=new)
    es = store.load("CXR", "toy-1")
    assert len(es) == 5
    np.testing.assert_array_equal(es.vectors[2], new)
    assert es.meta["cache_key"][2].as_py() == "k2-new"
    (info,) = store.sets()
    assert (info.count, info.superseded, info.segments) == (5, 1, 2)
    with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:
        keys = w.committed_keys()
    assert "k2-new" in keys and "k2" not in keys


def test_spec_mismatch_and_bad_vectors_are_refused(store):
    fill(store, range(2))
    with pytest.raises(StoreFormatError, match="dim=12"):
        store.writer("CXR", "toy-1", dim=13, spec=SPEC).open()
    with pytest.raises(StoreFormatError, match="spec"):
        store.writer("CXR", "toy-1", dim=D, spec={"other": 1}).open()
    with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:
        with pytest.raises(StoreFormatError, match=r"shape \(3,\)") as e:
            w.add(study_id="x", patient_id="p", cache_key="k", content_hash="h", vector=np.ones(3))
        assert e.value.reason == "bad_vector"
        bad = np.ones(D, np.float32)
        bad[0] = np.nan
        w.add(study_id="nan-study", patient_id="p", cache_key="kn", content_hash="h", vector=bad)
        big = np.full(D, 1e6, np.float32)  # finite in float32, inf once cast to float16
        w.add(study_id="S0009", patient_id="p", cache_key="k9", content_hash="h", vector=vec(9))
    with store.writer("CXR", "half", dim=D, spec=SPEC, dtype="float16") as w:
        w.add(study_id="big", patient_id="p", cache_key="kb", content_hash="h", vector=big)
        w.add(study_id="ok", patient_id="p", cache_key="ko", content_hash="h", vector=vec(1))
    assert store.load("CXR", "half").study_ids == ["ok"]
    f = store.failures().to_pylist()
    assert [(r["study_id"], r["reason"], r["stage"]) for r in f] == [
        ("nan-study", "non_finite_vector", "store"), ("big", "non_finite_vector", "store")]
    with pytest.raises(ConfigError, match="encoder key '../x'"):
        store.writer("CXR", "../x", dim=D, spec=SPEC)
    with pytest.raises(ConfigError, match="modality 'MR'"):
        store.writer("MR", "k", dim=D, spec=SPEC)
    assert store.load("CXR", "toy-1").study_ids == [sid(0), sid(1), sid(9)]


def test_open_store_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="create=True"):
        open_store(tmp_path / "nope")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(StoreFormatError, match="not empty"):
        open_store(tmp_path / "busy", create=True)
    s = open_store(tmp_path / "s", create=True)
    doc = json.loads((s.root / "store.json").read_text())
    doc["schema_version"] = 99
    (s.root / "store.json").write_text(json.dumps(doc))
    with pytest.raises(StoreFormatError, match="schema_version 99.*Upgrade"):
        open_store(s.root)
    with pytest.raises(StoreNotFoundError, match="Available"):
        open_store(tmp_path / "t", create=True).load("CXR", "missing")


def test_cache_key_invalidation():
    base = {"content_hash": "c1", "preprocess": {"size": 224, "window": [-1000, 400]},
            "encoder_fingerprint": "e1"}
    k = make_cache_key(**base)
    assert make_cache_key(**{**base, "preprocess": {"window": [-1000, 400], "size": 224}}) == k
    for change in ({"content_hash": "c2"}, {"preprocess": {"size": 256, "window": [-1000, 400]}},
                   {"encoder_fingerprint": "e2"}, {"schema_version": 2}):
        assert make_cache_key(**{**base, **change}) != k, change


def test_resume_recomputes_exactly_the_affected_rows(store, tmp_path):
    """Keys from file *content*: moving the folder recomputes nothing; changing one file or
    the weights recomputes exactly what changed."""
    src = tmp_path / "images"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.img").write_bytes(bytes([i]) * 100)

    def extract(folder: Path, enc_fp: str) -> list[str]:
        computed = []
        with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:
            done = w.committed_keys()
            for i in range(6):
                content = hashlib.sha256((folder / f"{i}.img").read_bytes()).hexdigest()
                key = make_cache_key(content_hash=content, preprocess={"size": 64},
                                     encoder_fingerprint=enc_fp)
                if key in done:
                    continue
                computed.append(sid(i))
                w.add(study_id=sid(i), patient_id="P", cache_key=key, content_hash=content,
                      vector=vec(i))
        return computed

    assert len(extract(src, "w1")) == 6
    moved = tmp_path / "moved" / "elsewhere"
    shutil.move(str(src), moved)
    assert extract(moved, "w1") == []
    (moved / "3.img").write_bytes(b"changed")
    assert extract(moved, "w1") == [sid(3)]
    assert extract(moved, "w2") == [sid(i) for i in range(6)]
    assert len(store.load("CXR", "toy-1")) == 6


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from embedstore.store import open_store
    s = open_store(sys.argv[1])
    scope = None if sys.argv[2] == "-" else sys.argv[2]
    with s.writer("CXR", "toy-1", dim=4, spec={}, lock_scope=scope):
        print("ready", flush=True)
        sys.stdin.readline()
    """
)


def _hold(store, scope):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store.root), scope or "-"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _release(p):
    p.communicate("\n", timeout=30)  # also closes the pipes
    assert p.returncode == 0


def test_second_writer_is_refused_with_the_holders_pid(store):
    p = _hold(store, None)
    try:
        with pytest.raises(StoreLockedError, match=rf"PID {p.pid} on .* since") as e:
            store.writer("CXR", "toy-1", dim=4, spec={}).open()
        assert isinstance(e.value, BlockingIOError)
        with pytest.raises(StoreLockedError, match=f"PID {p.pid}"):
            store.writer("CTPA", "other", dim=4, spec={}, lock_scope="shard-1-of-2").open()
        with pytest.raises(StoreLockedError, match=f"PID {p.pid}"):
            store.gc(dry_run=False)
    finally:
        _release(p)
    with store.writer("CXR", "toy-1", dim=4, spec={}):  # free again once the holder exits
        pass


def test_shard_scopes_coexist_but_exclude_whole_store_writers(store):
    p = _hold(store, "shard-0-of-2")
    try:
        with store.writer("CXR", "toy-1", dim=4, spec={}, lock_scope="shard-1-of-2") as w:
            w.add(study_id="a", patient_id="p", cache_key="k", content_hash="h", vector=np.ones(4))
        with pytest.raises(StoreLockedError, match=f"PID {p.pid}"):
            store.writer("CXR", "toy-1", dim=4, spec={}, lock_scope="shard-0-of-2").open()
        with pytest.raises(StoreLockedError, match=f"PID {p.pid}.*shard-0-of-2"):
            store.writer("CXR", "toy-1", dim=4, spec={}).open()
    finally:
        _release(p)


def test_failures_are_recorded(store):
    with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:
        w.record_failure(study_id=sid(1), modality="cxr", stage="decode", reason="truncated",
                         message="pixel data shorter than declared")
        w.record_failure(study_id=sid(2), modality="CXR", stage="decode", reason="truncated",
                         message="x")
    f = store.failures()
    assert f["study_id"].to_pylist() == [sid(1), sid(2)]
    assert set(f["encoder_key"].to_pylist()) == {"toy-1"} and f["modality"][0].as_py() == "CXR"
    assert store.info()["failures"] == {"total": 2, "by_reason": {"truncated": 2}}
    got = store.sql("SELECT reason, count(*) AS n FROM failures GROUP BY 1").to_pylist()
    assert got == [{"reason": "truncated", "n": 2}]


def test_where_cohort_filter(store):
    m = manifest(40)
    store.attach_manifest(m)
    fill(store, range(0, 40, 2))
    es = store.load("CXR", "toy-1", where="split = 'train' AND site = 'A'")
    rows = m.to_pylist()
    expect = sorted(r["study_id"] for r in rows
                    if r["modality"] == "CXR" and r["split"] == "train" and r["site"] == "A")
    assert es.study_ids == expect and 0 < len(expect) < 20
    idx = [int(s[1:]) for s in expect]
    np.testing.assert_array_equal(es.vectors, np.stack([vec(i) for i in idx]))
    assert es.meta["row"].to_pylist() == list(range(len(expect)))
    sub = store.load("CXR", "toy-1", where="split = 'train'", study_ids=expect[:2])
    assert sub.study_ids == expect[:2]


def test_meta_parquet_is_a_rebuildable_cache(store):
    fill(store, range(30), chunk_rows=8, flush_rows=4)
    before = store.load("CXR", "toy-1")
    for p in store.root.rglob("meta.*"):
        p.unlink()
    after = store.load("CXR", "toy-1")
    np.testing.assert_array_equal(before.vectors, after.vectors)
    assert before.meta.equals(after.meta)
    assert store.verify().ok


def _chunk_files(store):
    (seg,) = (store.root / "sets" / "CXR" / "toy-1").glob("seg-*")
    return sorted((seg / "embeddings.zarr").glob("c.*"))


def test_verify_detects_corrupted_chunk_and_fill_value_row_without_modifying(store):
    fill(store, range(20), chunk_rows=8)
    assert store.verify().ok and store.verify().rows_checked == 20
    c0, c1, c2 = _chunk_files(store)
    raw = bytearray(c0.read_bytes())
    raw[5] ^= 0xFF  # flip bits inside row 0
    c0.write_bytes(bytes(raw))
    raw = bytearray(c1.read_bytes())
    raw[D * 4 * 2 : D * 4 * 3] = bytes(D * 4)  # row 10 -> all fill value
    c1.write_bytes(bytes(raw))
    c2.write_bytes(c2.read_bytes()[:10])  # truncated chunk
    h = tree_hash(store.root)
    rep = store.verify()
    assert tree_hash(store.root) == h
    assert not rep.ok
    kinds = {(p.kind, p.study_id) for p in rep.problems}
    assert ("checksum_mismatch", sid(0)) in kinds
    assert ("fill_value_row", sid(10)) in kinds
    assert ("chunk_unreadable", sid(16)) in kinds
    assert json.loads(json.dumps(rep.to_dict()))["ok"] is False


def test_gc_dry_run_lists_then_removes(store):
    store.attach_manifest(manifest(40))
    fill(store, range(0, 10, 2))
    fill(store, [2, 4, 38])  # supersedes 2 and 4; adds 38
    with store.writer("CXR", "toy-1", dim=D, spec=SPEC) as w:  # S0099 is not in the manifest
        w.add(study_id="S0099", patient_id="P", cache_key="k99", content_hash="h", vector=vec(99))
    fill(store, range(4), key="old-encoder")
    seg_dir = store.root / "sets" / "CXR" / "toy-1"
    empty = seg_dir / "seg-20000101T000000000000Z-999999999-deadbeef"  # a crashed, empty session
    empty.mkdir()
    (empty / "segment.json").write_text(json.dumps({"pid": 999999999, "host": "elsewhere"}))
    orphan = sorted(seg_dir.glob("seg-*/embeddings.zarr"))[0] / "c.0.0.0123abcd.partial"
    orphan.write_bytes(b"junk")
    expect = store.load("CXR", "toy-1", where="true")
    h = tree_hash(store.root)

    rep = store.gc(dry_run=True, keep_sets=["CXR/toy-1"])
    assert tree_hash(store.root) == h
    assert rep.superseded_rows == {"CXR/toy-1": 2}
    assert rep.unreferenced_rows == {"CXR/toy-1": 1}
    assert rep.unreferenced_sets == ("CXR/old-encoder",)
    assert rep.empty_segments == (str(empty.relative_to(store.root)),)
    assert rep.orphan_temp_files == (str(orphan.relative_to(store.root)),)
    assert not rep.nothing_to_do

    done = store.gc(dry_run=False, keep_sets=["CXR/toy-1"], drop_unreferenced=True)
    assert done.bytes_freed > 0 and done.compacted_sets == ("CXR/toy-1",)
    assert not empty.exists() and not orphan.exists()
    assert not (store.root / "sets" / "CXR" / "old-encoder").exists()
    assert len(list(seg_dir.glob("seg-*"))) == 1
    got = store.load("CXR", "toy-1")
    assert got.study_ids == expect.study_ids and "S0099" not in got.study_ids
    np.testing.assert_array_equal(got.vectors, expect.vectors)
    assert got.meta["created_at"].equals(expect.meta["created_at"])
    assert store.verify().ok
    assert store.gc(dry_run=True, keep_sets=["CXR/toy-1"]).nothing_to_do


def test_info_reports_sets_and_size(store):
    fill(store, range(7))
    fill(store, range(3), modality="CTPA", key="vol", d=4)
    info = store.info()
    assert info["modalities"] == ["CTPA", "CXR"] and info["embeddings"] == 10
    assert {(s["modality"], s["count"], s["dim"]) for s in info["sets"]} == {("CXR", 7, D),
                                                                            ("CTPA", 3, 4)}
    on_disk = sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
    assert info["size_bytes"] == on_disk
    json.dumps(info)
    assert os.path.isdir(store.runs_dir)


def test_gc_keeps_rows_missing_from_a_replaced_manifest_unless_told(store):
    # issue 10, item 1: a manifest replaced by mistake (or by a refused writer) must not let a
    # plain `gc --yes` delete every committed row; the rows come back with the right manifest
    store.attach_manifest(manifest(40))
    fill(store, range(0, 40, 2))
    expect = store.load("CXR", "toy-1")
    store.attach_manifest(manifest(40).slice(20))  # studies 0-19 are gone from the manifest
    rep = store.gc(dry_run=False)
    assert rep.unreferenced_rows == {"CXR/toy-1": 10} and not rep.drop_unreferenced
    assert rep.compacted_sets == ()
    store.attach_manifest(manifest(40))
    got = store.load("CXR", "toy-1")
    assert got.study_ids == expect.study_ids
    np.testing.assert_array_equal(got.vectors, expect.vectors)
    # asked explicitly, they go
    store.attach_manifest(manifest(40).slice(20))
    assert store.gc(dry_run=False, drop_unreferenced=True).compacted_sets == ("CXR/toy-1",)
    store.attach_manifest(manifest(40))
    assert store.load("CXR", "toy-1").study_ids == [sid(i) for i in range(20, 40, 2)]
