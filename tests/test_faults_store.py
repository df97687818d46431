"""Disk faults on the store's write path: a full disk, a failing device and a write that comes
back short without saying so. Each must end the writer with one typed error naming the path,
publish nothing half-written, and let a re-run finish to the clean run's rows and bytes
(EMBEDSTORE_CRASH_AT="<point>[:<nth>]@<action>", embedstore/_faults.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_store_crash import N, assert_same, clean, run_child  # noqa: F401  (clean: fixture)

from embedstore.store import open_store


@pytest.mark.parametrize("fault", [
    "mid_commit:2@short",  # half a commit part reached the disk and the write said nothing
    "mid_commit:2@enospc",
    "mid_chunk_write:3@enospc",
    "before_fsync:2@eio",  # fsync fails: the part was never durable, so it is not published
])
def test_a_disk_fault_fails_the_commit_and_a_rerun_completes(tmp_path: Path, clean, fault: str):  # noqa: F811
    root = tmp_path / "store"
    r = run_child(root, crash=fault)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("embedstore.errors.DiskWriteError: Could not write "), last
    assert "re-run the same command" in last
    store = open_store(root)
    got = store.load("CXR", "toy-1")
    assert 0 < len(got) < N  # what was committed before the fault, no more
    assert store.verify().ok
    r = run_child(root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same(root, clean)


def test_cli_reports_a_full_disk_as_one_error_line(tmp_path: Path) -> None:
    from embedstore.phantom import PhantomSpec
    from embedstore.synth import synthesize_cohort

    cohort = tmp_path / "cohort"
    synthesize_cohort(cohort, n_patients=4, seed=1, spec=PhantomSpec.with_shape((8, 32, 32)),
                      workers=1)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "embedstore.cli.app", "extract", str(store), "-m",
           str(cohort / "manifest.parquet"), "--modality", "cxr", "--encoder", "test-tiny-vit",
           "--workers", "0"]
    env = {**os.environ, "EMBEDSTORE_CRASH_AT": "mid_commit@enospc"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Could not write" in errors[0], r.stderr[-2000:]
    assert "No space left on device" in errors[0] and "Free space" in errors[0]
    env.pop("EMBEDSTORE_CRASH_AT")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (info,) = open_store(store).sets()
    assert len(open_store(store).load("CXR", info.encoder_key)) == 4


# ENOSPC / EIO at every maintenance point (compaction of segments, merge of commit parts). The rows
# were committed before maintenance started, so a failing maintenance must lose none of them, leave
# a store that verifies, and be finished by the next gc.
@pytest.mark.slow
@pytest.mark.parametrize("action", ["enospc", "eio"])
@pytest.mark.parametrize(("what", "point"), [
    ("compact", "compact_before_publish"),
    ("compact", "compact_after_publish"),
    ("compact", "compact_mid_delete"),
    ("merge", "merge_after_publish"),
])
def test_a_disk_fault_during_maintenance_loses_nothing(tmp_path: Path, what: str, point: str,
                                                        action: str) -> None:
    from test_store_crash import CHILD_MAINTAIN, _expected_vectors

    root = tmp_path / "store"
    env = {**os.environ, "EMBEDSTORE_CRASH_AT": f"{point}@{action}"}
    r = subprocess.run([sys.executable, "-c", CHILD_MAINTAIN, str(root), what], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    last = r.stderr.strip().splitlines()[-1]  # typed, says the rows are safe and what finishes it
    assert last.startswith("embedstore.errors.DiskWriteError: Could not write "), last
    assert "rows written are committed" in last and "embedstore gc" in last, last
    store = open_store(root)
    got = store.load("CXR", "toy-1")
    assert got.study_ids == [f"S{i:03d}" for i in range(N)]
    assert store.verify().ok
    store.gc(dry_run=False)
    set_dir = root / "sets" / "CXR" / "toy-1"
    assert len(list(set_dir.glob("seg-*"))) == 1
    (seg,) = set_dir.glob("seg-*")
    assert len(list((seg / "commits").iterdir())) == 1
    import numpy as np

    np.testing.assert_array_equal(store.load("CXR", "toy-1").vectors, _expected_vectors(what))
    assert store.verify().ok and not list(root.rglob("*.partial"))
