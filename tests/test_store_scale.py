"""The store mechanisms that keep it lean at scale (issue 14): selective and out-of-order loads
read only what they return, resume checks answered from the parts on disk, the ordered fast path
and the general path agree, automatic compaction keeps every row, verify's whole-chunk CRC,
lazy metadata, the schema_version 1 upgrade, and catalog views that read Parquet in place.
Tiny seeded data; the sizes that matter are measured in benchmarks/bench_store.py."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore.errors import StoreCorruptError, StoreFormatError
from embedstore.store import open_store, upgrade_store
from embedstore.store._backend import LocalBackend
from embedstore.store._crc import combine_rows
from embedstore.store._zarr import RowArray

D = 8
SPEC = {"encoder": "toy"}


def vec(i: int, version: int = 0) -> np.ndarray:
    return np.random.default_rng(10_000 * version + i).standard_normal(D).astype(np.float32)


def sid(i: int) -> str:
    return f"S{i:04d}"


def fill(store, ids, *, key="toy", version=0, **opts):
    with store.writer("CXR", key, dim=D, spec=SPEC, **opts) as w:
        for i in ids:
            w.add(study_id=sid(i), patient_id=f"P{i // 2}", cache_key=f"k{i}.{version}",
                  content_hash=f"h{i}", source_sig=f"sig{i}" if i % 2 else None,
                  vector=vec(i, version))
    return w


class CountingBackend(LocalBackend):
    """Counts the bytes read from chunk files."""

    def __init__(self, root):
        super().__init__(root)
        self.chunk_bytes = 0

    def read_into(self, key, offset, buf):
        got = super().read_into(key, offset, buf)
        if "/c." in key:
            self.chunk_bytes += got
        return got


@pytest.fixture
def store(tmp_path):
    return open_store(tmp_path / "store", create=True)


def test_gather_reads_any_row_pattern_into_place(tmp_path):
    rng = np.random.default_rng(0)
    b = LocalBackend(tmp_path)
    for dtype in ("float32", "float16"):
        arr = RowArray.create(b, f"a-{dtype}", row_shape=(D,), dtype=dtype, capacity=100,
                              chunk_rows=16)
        data = rng.standard_normal((100, D)).astype(dtype)
        for c in range(arr.n_chunks()):
            arr.write_chunk(c, data[c * 16 : (c + 1) * 16])
        patterns = [np.arange(100), rng.permutation(100), np.sort(rng.choice(100, 7, False)),
                    rng.choice(100, 60, False), np.arange(30, 47)[::-1]]
        for rows in patterns:
            out = np.full((len(rows) + 3, D), np.nan, np.float32)
            pos = rng.permutation(len(rows) + 3)[: len(rows)]
            arr.gather(rows, out, pos)
            np.testing.assert_array_equal(out[pos], data[rows].astype(np.float32))
            assert np.isnan(np.delete(out, pos, axis=0)).all()  # nothing else written


def test_selective_and_shuffled_loads_read_about_the_bytes_they_return(store):
    order = list(np.random.default_rng(1).permutation(200))
    fill(store, order, chunk_rows=16, flush_rows=32)
    counting = CountingBackend(store.root)
    store.backend = counting
    want = sorted(np.random.default_rng(2).choice(200, 20, replace=False).tolist())
    es = store.load("CXR", "toy", study_ids=[sid(i) for i in want] + ["not-stored"])
    assert es.study_ids == [sid(i) for i in want]
    np.testing.assert_array_equal(es.vectors, np.stack([vec(i) for i in want]))
    assert counting.chunk_bytes <= 1.2 * es.vectors.nbytes
    counting.chunk_bytes = 0
    full = store.load("CXR", "toy")  # rows were written in shuffled order
    np.testing.assert_array_equal(full.vectors, np.stack([vec(i) for i in range(200)]))
    assert counting.chunk_bytes <= 1.2 * full.vectors.nbytes


def test_resume_checks_are_answered_from_disk_for_the_keys_asked(store):
    fill(store, range(10))
    with store.writer("CXR", "toy", dim=D, spec=SPEC) as w:  # supersedes S0003
        w.add(study_id=sid(3), patient_id="P1", cache_key="k3.new", content_hash="h",
              vector=vec(3, 1))
    with store.writer("CXR", "toy", dim=D, spec=SPEC) as w:
        assert w.committed(["k1.0", "k3.0", "k3.new", "absent"]) == {"k1.0", "k3.new"}
        assert w.committed_keys([sid(3), sid(5), "S9999"]) == {"k3.new", "k5.0"}
        assert w.committed_sources([sid(1), sid(2), sid(3)]) == {(sid(1), "sig1"): "k1.0"}
        w.add(study_id=sid(20), patient_id="P", cache_key="k20", content_hash="h", vector=vec(20))
        assert w.committed(["k20"]) == set()  # buffered, not committed
        w.flush()
        assert w.committed(["k20"]) == {"k20"}  # this session's flushed rows count
        assert w.committed_keys([sid(20)]) == {"k20"}
        # The whole-set forms still exist (they hold every key in memory: small sets only).
        assert w.committed_keys() == {f"k{i}.0" for i in range(10) if i != 3} | {"k3.new", "k20"}


def test_ordered_and_unordered_sets_agree_on_rows_and_catalog_row_numbers(tmp_path):
    ids = list(range(60))
    shuffled = list(np.random.default_rng(3).permutation(60))
    layouts = {  # name: (sessions, flush_rows, ordered?)
        "in-order": ([ids[:25], ids[25:]], 16, True),  # disjoint increasing ranges
        "interleaved": ([ids[0::2], ids[1::2]], 16, False),  # shards: overlapping ranges
        "shuffled": ([shuffled], 16, True),  # parts merged in study_id order at close
        "shuffled-one-part": ([shuffled], 100, False),  # one part, left as written
        "superseded": ([ids, [5, 40]], 16, False),
    }
    results = {}
    for name, (sessions, flush_rows, want_ordered) in layouts.items():
        s = open_store(tmp_path / name, create=True)
        for k, sess in enumerate(sessions):
            fill(s, sess, chunk_rows=8, flush_rows=flush_rows,
                 version=k if name == "superseded" else 0)
        sd = s._set("CXR", "toy")
        assert (sd.snapshot().ordered_segments() is not None) == want_ordered, name
        es = s.load("CXR", "toy")
        cat = s.sql("SELECT study_id, row FROM embeddings ORDER BY row")
        assert cat["study_id"].to_pylist() == es.study_ids == [sid(i) for i in ids], name
        assert cat["row"].to_pylist() == list(range(60))
        assert s.sets()[0].count == 60
        assert s.verify().ok
        results[name] = es.vectors
    for name in ("interleaved", "shuffled", "shuffled-one-part"):
        np.testing.assert_array_equal(results["in-order"], results[name])
    expect = results["in-order"].copy()
    expect[[5, 40]] = np.stack([vec(5, 1), vec(40, 1)])
    np.testing.assert_array_equal(results["superseded"], expect)
    sup = open_store(tmp_path / "superseded")
    assert sup.sets()[0].superseded == 2
    assert sup.sql("SELECT count(*) AS n FROM commits")["n"][0].as_py() == 62
    meta = open_store(tmp_path / "shuffled").load("CXR", "toy", study_ids=[sid(7), sid(50)]).meta
    assert meta["cache_key"].to_pylist() == ["k7.0", "k50.0"]  # through the permuted part


def _set_config(store, **config):
    doc = json.loads((store.root / "store.json").read_text())
    doc["config"] = {**doc.get("config", {}), **config}
    (store.root / "store.json").write_text(json.dumps(doc))
    return open_store(store.root)


def test_automatic_compaction_merges_the_small_segments_and_keeps_every_row(store):
    store = _set_config(store, max_segments=4)
    fill(store, range(40))  # the big segment: never rewritten by the automatic policy
    expect = {i: vec(i) for i in range(40)}
    for k, ids in enumerate([[3, 41], [42], [43, 7], [44]], start=1):
        w = fill(store, ids, version=k)
        expect.update({i: vec(i, k) for i in ids})
        segs = sorted((store.root / "sets/CXR/toy").glob("seg-*"))
        assert w.compacted == (k == 4)
    assert len(segs) == 2  # 5 > 4: the 4 smallest became one
    es = store.load("CXR", "toy")
    assert es.study_ids == [sid(i) for i in sorted(expect)]
    np.testing.assert_array_equal(es.vectors, np.stack([expect[i] for i in sorted(expect)]))
    assert store.verify().ok
    assert store.sets()[0].superseded == 2  # S0003, S0007 in the big segment
    store.gc(dry_run=False)
    assert len(list((store.root / "sets/CXR/toy").glob("seg-*"))) == 1
    again = store.load("CXR", "toy")
    np.testing.assert_array_equal(again.vectors, es.vectors)
    assert again.meta["created_at"].equals(es.meta["created_at"])


def test_many_commit_parts_are_merged_when_the_writer_closes(store):
    store = _set_config(store, max_parts=3)
    fill(store, range(50), chunk_rows=8, flush_rows=8)
    (seg,) = (store.root / "sets/CXR/toy").glob("seg-*")
    assert [p.name for p in (seg / "commits").iterdir()] == ["00000000-00000006.parquet"]
    np.testing.assert_array_equal(store.load("CXR", "toy").vectors,
                                  np.stack([vec(i) for i in range(50)]))


def test_verify_compares_whole_chunks_and_names_the_bad_row(store):
    fill(store, range(40), chunk_rows=16, flush_rows=16)
    assert store.verify().ok
    (seg,) = (store.root / "sets/CXR/toy").glob("seg-*")
    c1 = seg / "embeddings.zarr" / "c.1.0"  # a full chunk: rows 16..31
    raw = bytearray(c1.read_bytes())
    raw[5 * D * 4 + 1] ^= 0x01  # one bit of row 21
    c1.write_bytes(bytes(raw))
    bad = [(p.kind, p.study_id) for p in store.verify().problems]
    assert bad == [("checksum_mismatch", sid(21))]
    parts = sorted((seg / "commits").iterdir())
    parts[1].unlink()  # a lost commit part in the middle
    kinds = {p.kind for p in store.verify().problems}
    assert "commit_part_missing" in kinds and not store.verify().ok


def test_chunk_crc_is_the_combination_of_row_crcs():
    rng = np.random.default_rng(4)
    for row_bytes, k in ((4, 1), (24, 8), (2048, 64)):
        data = rng.integers(0, 256, (3, k, row_bytes), dtype=np.uint8)
        rows = np.array([[zlib.crc32(r.tobytes()) for r in block] for block in data], np.uint32)
        want = np.array([zlib.crc32(block.tobytes()) for block in data], np.uint32)
        np.testing.assert_array_equal(combine_rows(rows, row_bytes), want)


def test_meta_is_read_lazily_and_survives_a_compaction(store):
    fill(store, range(12))
    fill(store, [20, 21])
    es = store.load("CXR", "toy")
    fresh = store.load("CXR", "toy").meta
    store.gc(dry_run=False)  # removes the parts es was loaded from
    assert es.meta.equals(fresh)
    assert es.meta.column_names == ["row", "study_id", "patient_id", "cache_key",
                                    "content_hash", "created_at"]
    stale = store.load("CXR", "toy")
    fill(store, [3], version=1)  # supersedes a loaded row ...
    store.gc(dry_run=False)  # ... and removes the version that was loaded
    with pytest.raises(StoreCorruptError, match="load the set again"):
        _ = stale.meta


def test_add_many_is_add_in_bulk(tmp_path):
    a, b = (open_store(tmp_path / n, create=True) for n in "ab")
    ids = [5, 1, 9, 2, 7]
    fill(a, ids, chunk_rows=4, flush_rows=3)
    bad = vec(99)
    bad[0] = np.inf
    with b.writer("CXR", "toy", dim=D, spec=SPEC, chunk_rows=4, flush_rows=3) as w:
        w.add_many(study_ids=[sid(i) for i in ids], patient_ids=[f"P{i // 2}" for i in ids],
                   cache_keys=[f"k{i}.0" for i in ids], content_hashes=[f"h{i}" for i in ids],
                   source_sigs=[f"sig{i}" if i % 2 else None for i in ids],
                   vectors=np.stack([vec(i) for i in ids]))
        w.add_many(study_ids=["inf"], patient_ids=["P"], cache_keys=["ki"], content_hashes=["h"],
                   vectors=bad[None])
        with pytest.raises(StoreFormatError, match="shape"):
            w.add_many(study_ids=["x"], patient_ids=["P"], cache_keys=["k"], content_hashes=["h"],
                       vectors=np.zeros((2, D)))
    ea, eb = a.load("CXR", "toy"), b.load("CXR", "toy")
    np.testing.assert_array_equal(ea.vectors, eb.vectors)
    assert ea.meta.drop(["created_at"]).equals(eb.meta.drop(["created_at"]))
    assert b.failures()["study_id"].to_pylist() == ["inf"]


def test_catalog_views_read_the_parquet_files_in_place(store):
    fill(store, range(5))
    with store.writer("CXR", "toy", dim=D, spec=SPEC) as w:
        w.record_failure(study_id="x", modality="CXR", stage="decode", reason="truncated",
                         message="m")
    got = store.sql("SELECT table_name AS t, table_type AS k FROM information_schema.tables")
    kinds = dict(zip(got["t"].to_pylist(), got["k"].to_pylist(), strict=True))
    assert kinds["runs"] == "BASE TABLE"
    for view in ("studies", "embeddings", "commits", "failures", "pairs"):
        if view != "studies":  # no manifest attached: studies is an empty placeholder table
            assert kinds[view] == "VIEW", view
    assert store.sql("SELECT count(*) AS n FROM failures")["n"][0].as_py() == 1


def _to_v1(root: Path) -> None:
    """Rewrite a schema_version 2 store as schema_version 1 wrote it (for the upgrade test)."""
    for seg in (root / "sets").glob("*/*/seg-*"):
        t = pq.read_table(next((seg / "commits").iterdir()))
        created = t["created_at"].cast("int64").to_pylist()
        from embedstore.store.format import iso_from_micros

        rec = {"offset0": 0, "n": t.num_rows, "created_at": iso_from_micros(created[0]),
               "study_id": t["study_id"].to_pylist(), "patient_id": t["patient_id"].to_pylist(),
               "cache_key": t["cache_key"].to_pylist(),
               "content_hash": t["content_hash"].to_pylist(), "crc32": t["crc32"].to_pylist()}
        if any(s is not None for s in t["source_sig"].to_pylist()):
            rec["source_sig"] = t["source_sig"].to_pylist()
        (seg / "commits.jsonl").write_text(json.dumps(rec, separators=(",", ":")) + "\n")
        (seg / "meta.parquet").write_bytes(b"an old cache")
        shutil.rmtree(seg / "commits")
    for part_dir in (root / "failures").iterdir():
        rows = pq.read_table(next(part_dir.iterdir())).to_pylist()
        from embedstore.store.format import iso

        lines = [json.dumps({**r, "created_at": iso(r["created_at"])}) for r in rows]
        (root / "failures" / f"{part_dir.name}.jsonl").write_text("\n".join(lines) + "\n")
        shutil.rmtree(part_dir)
    doc = json.loads((root / "store.json").read_text())
    doc["schema_version"] = 1
    doc.pop("config")
    (root / "store.json").write_text(json.dumps(doc))


def test_a_v1_store_is_refused_with_the_upgrade_command_then_upgraded_in_place(store):
    fill(store, range(6))
    with store.writer("CXR", "toy", dim=D, spec=SPEC) as w:
        w.add(study_id=sid(2), patient_id="P1", cache_key="k2.new", content_hash="h",
              vector=vec(2, 1))
        w.record_failure(study_id="bad", modality="CXR", stage="decode", reason="truncated",
                         message="short")
    before = store.load("CXR", "toy")
    before_meta = before.meta
    root = store.root
    _to_v1(root)
    with pytest.raises(StoreFormatError) as e:
        open_store(root)
    assert f"Upgrade it in place with `embedstore upgrade {root}`" in str(e.value)
    r = CliRunner().invoke(app, ["info", str(root)])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "embedstore upgrade" in r.output
    r = CliRunner().invoke(app, ["upgrade", str(root)])
    assert r.exit_code == 0, r.output
    assert "7 rows in 2 segments" in r.output
    after = open_store(root)
    got = after.load("CXR", "toy")
    np.testing.assert_array_equal(got.vectors, before.vectors)
    assert got.meta.equals(before_meta)
    assert after.failures()["reason"].to_pylist() == ["truncated"]
    assert after.verify().ok
    assert not list(root.rglob("*.jsonl")) and not list(root.rglob("meta.*"))
    assert upgrade_store(root).notes == ("already at this version",)
