"""Fault injection beyond kill -9: a full or failing disk at a store write (EMBEDSTORE_CRASH_AT
``<point>:<nth>:enospc|eio``). The write fails after a short write, nothing half-written is
published, the error names the file, and a re-run after "freeing space" gives the clean rows."""

from __future__ import annotations

import errno

import pytest

from embedstore.errors import disk_error_message
from embedstore.store import open_store
from tests.test_store_crash import N, assert_same, clean, run_child  # noqa: F401 (fixture)


@pytest.mark.parametrize("action, code", [("enospc", errno.ENOSPC), ("eio", errno.EIO)])
def test_a_failing_disk_at_a_commit_write_is_a_failed_commit_then_rerun_is_clean(
    tmp_path, clean, action, code  # noqa: F811
):
    root = tmp_path / "store"
    r = run_child(root, crash=f"mid_commit:3:{action}")
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert f"OSError: [Errno {code}]" in r.stderr
    assert str(root) in r.stderr  # the error names the file being written
    store = open_store(root)
    partial = store.load("CXR", "toy-1")
    assert 0 < len(partial) < N - 1  # a committed prefix, the failed commit not among it
    assert store.verify().ok
    assert not [p for p in root.rglob("*") if p.name.endswith((".tmp", ".partial"))]
    r = run_child(root)
    assert r.returncode == 0, r.stderr
    assert_same(root, clean)


def test_disk_error_message_names_the_file_and_the_fix():
    msg = disk_error_message(OSError(errno.ENOSPC, "No space left on device", "/s/part.bin"))
    assert msg == ("No space left on device (errno 28) writing /s/part.bin: free space on that "
                   "file system (or choose another with more room) and re-run; everything "
                   "committed before it is kept.")
    assert "check that disk" in disk_error_message(OSError(errno.EIO, "I/O error", "/x"))
    assert disk_error_message(OSError(errno.ENOENT, "No such file", "/x")) is None


def test_cli_shows_a_full_disk_as_one_error_line_naming_the_file(tmp_path, monkeypatch):
    from embedstore.cli.app import app
    from typer.testing import CliRunner
    root = tmp_path / "store"
    store_cls = type(open_store(root, create=True))
    part = str(root / "segments" / "x.part")

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", part)

    monkeypatch.setattr(store_cls, "gc", full_disk)
    r = CliRunner().invoke(app, ["gc", str(root), "--yes"])
    assert r.exit_code == 1, r.output
    assert r.stderr.strip().splitlines() == [
        "Error: No space left on device (errno 28) writing " + part + ": free space on that file "
        "system (or choose another with more room) and re-run; everything committed before it "
        "is kept."
    ]
    assert "Traceback" not in r.output
