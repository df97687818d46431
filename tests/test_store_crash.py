"""Crash safety: a writer SUBPROCESS SIGKILLs itself at a chosen point of a flush, of a
compaction or of a commit-part merge (EMBEDSTORE_CRASH_AT test hook), then a resumed run (or gc)
must give the same rows and bytes as an uninterrupted run -- no holes, no duplicates, no stray
temp files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from embedstore.store import open_store

N = 37
CHILD = textwrap.dedent(
    """
    import sys
    import numpy as np
    from embedstore.store import open_store

    root, scope, shard, n_shards = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    store = open_store(root, create=True)
    with store.writer("CXR", "toy-1", dim=6, spec={"e": 1}, chunk_rows=8, flush_rows=5,
                      capacity=4, lock_scope=None if scope == "-" else scope) as w:
        done = w.committed_keys()
        for i in range(N_ROWS):
            if i % n_shards != shard or f"key-{i}" in done:
                continue
            v = np.random.default_rng(i).standard_normal(6).astype(np.float32)
            w.add(study_id=f"S{i:03d}", patient_id=f"P{i // 3}", cache_key=f"key-{i}",
                  content_hash=f"h{i}", vector=v)
    """
).replace("N_ROWS", str(N))


def run_child(root: Path, crash: str | None = None, scope="-", shard=0, n_shards=1):
    env = {k: v for k, v in os.environ.items() if k != "EMBEDSTORE_CRASH_AT"}
    if crash:
        env["EMBEDSTORE_CRASH_AT"] = crash
    cmd = [sys.executable, "-c", CHILD, str(root), scope, str(shard), str(n_shards)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean") / "store"
    r = run_child(root)
    assert r.returncode == 0, r.stderr
    return open_store(root).load("CXR", "toy-1")


def assert_same(root: Path, clean) -> None:
    store = open_store(root)
    got = store.load("CXR", "toy-1")
    assert got.study_ids == clean.study_ids == [f"S{i:03d}" for i in range(N)]
    assert len(set(got.meta["cache_key"].to_pylist())) == N
    assert got.vectors.tobytes() == clean.vectors.tobytes()
    assert got.meta["cache_key"].equals(clean.meta["cache_key"])
    assert store.verify().ok
    assert not list(root.rglob("*.partial"))


@pytest.mark.parametrize(
    "point",
    [
        "before_chunk_write:2",
        "mid_chunk_write:3",  # temp chunk written, not renamed: leaves an orphan *.partial
        "after_chunk_write:2",  # chunk in place, no commit record: rows must not count
        "mid_commit:3",  # half a commit part's temp file: never published
        "before_fsync:2",
        "before_publish:3",  # part fsync'ed under its temp name only
        "after_fsync:4",
    ],
)
def test_kill_at_point_then_resume_equals_clean_run(tmp_path, clean, point):
    root = tmp_path / "store"
    r = run_child(root, crash=point)
    assert r.returncode == -9, (r.returncode, r.stderr)
    store = open_store(root)
    partial = store.load("CXR", "toy-1")
    # What survived is a committed, verifiable prefix of the work: no holes inside rows.
    assert 0 < len(partial) < N - 1
    assert set(partial.study_ids) <= set(clean.study_ids)
    assert store.verify().ok
    if point.startswith("mid_chunk_write"):
        assert list(root.rglob("*.partial"))
    r = run_child(root)
    assert r.returncode == 0, r.stderr
    assert_same(root, clean)


def test_killed_twice_and_resumed(tmp_path, clean):
    root = tmp_path / "store"
    assert run_child(root, crash="after_chunk_write:3").returncode == -9
    assert run_child(root, crash="mid_commit:2").returncode == -9
    assert run_child(root).returncode == 0
    assert_same(root, clean)
    gc = open_store(root).gc(dry_run=False)
    assert gc.compacted_sets == ("CXR/toy-1",)
    assert_same(root, clean)


def test_two_shards_in_parallel_equal_clean_run(tmp_path, clean):
    root = tmp_path / "store"
    open_store(root, create=True)
    env = {k: v for k, v in os.environ.items() if k != "EMBEDSTORE_CRASH_AT"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(root), f"shard-{k}-of-2", str(k), "2"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for k in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert len(list((root / "sets" / "CXR" / "toy-1").glob("seg-*"))) == 2
    assert_same(root, clean)
    np.testing.assert_array_equal(open_store(root).load("CXR", "toy-1").vectors, clean.vectors)


# Three sessions (the third supersedes S005) with max_segments = 2: the third writer's close
# compacts the set; or one session in many parts with max_parts = 2: its close merges them.
CHILD_MAINTAIN = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from embedstore.store import open_store

    root, what = sys.argv[1], sys.argv[2]
    store = open_store(root, create=True)
    doc = json.loads((store.root / "store.json").read_text())
    doc["config"] = {"max_segments": 2, "max_parts": 2}
    (store.root / "store.json").write_text(json.dumps(doc))
    store = open_store(root)
    sessions = [range(0, 20), range(20, 30), [*range(30, N_ROWS), 5]] if what == "compact" \
        else [range(N_ROWS)]
    for k, ids in enumerate(sessions):
        with store.writer("CXR", "toy-1", dim=6, spec={"e": 1}, chunk_rows=8, flush_rows=5) as w:
            for i in ids:
                v = np.random.default_rng(i + 1000 * (k == 2 and i == 5)).standard_normal(6).astype(np.float32)
                w.add(study_id=f"S{i:03d}", patient_id=f"P{i // 3}", cache_key=f"key-{i}-{k}",
                      content_hash=f"h{i}", vector=v)
    """
).replace("N_ROWS", str(N))


def _expected_vectors(what: str) -> np.ndarray:
    rows = [np.random.default_rng(i).standard_normal(6).astype(np.float32) for i in range(N)]
    if what == "compact":
        rows[5] = np.random.default_rng(1005).standard_normal(6).astype(np.float32)
    return np.stack(rows)


@pytest.mark.parametrize(
    ("what", "point"),
    [
        ("compact", "compact_before_publish"),  # new segment's chunks written, not published
        ("compact", "compact_after_publish"),  # new and old segments both visible
        ("compact", "compact_mid_delete"),  # some old segments removed
        ("merge", "merge_after_publish"),  # merged part and the parts it covers both there
    ],
)
def test_kill_during_maintenance_loses_nothing(tmp_path, what, point):
    root = tmp_path / "store"
    env = {**os.environ, "EMBEDSTORE_CRASH_AT": point}
    r = subprocess.run([sys.executable, "-c", CHILD_MAINTAIN, str(root), what], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stderr)
    store = open_store(root)
    got = store.load("CXR", "toy-1")
    assert got.study_ids == [f"S{i:03d}" for i in range(N)]
    np.testing.assert_array_equal(got.vectors, _expected_vectors(what))
    assert store.verify().ok
    store.gc(dry_run=False)
    assert len(list((root / "sets" / "CXR" / "toy-1").glob("seg-*"))) == 1
    (seg,) = (root / "sets" / "CXR" / "toy-1").glob("seg-*")
    assert len(list((seg / "commits").iterdir())) == 1
    again = store.load("CXR", "toy-1")
    np.testing.assert_array_equal(again.vectors, _expected_vectors(what))
    assert store.verify().ok and not store.verify().problems
    assert not list(root.rglob("*.partial"))
