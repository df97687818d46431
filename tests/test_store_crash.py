"""Crash safety: a writer SUBPROCESS SIGKILLs itself at a chosen point of a flush
(EMBEDSTORE_CRASH_AT test hook), then a resumed run must give the same rows and bytes as an
uninterrupted run -- no holes, no duplicates, no stray temp files."""

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
        "mid_commit:3",  # half a commit line: torn tail ignored
        "before_fsync:2",
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
