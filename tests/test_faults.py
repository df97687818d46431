"""A full disk met outside the store's own writes (here: inside gc) is still one `Error:` line
naming the file; the store-write faults themselves are in tests/test_faults_store.py."""

from __future__ import annotations

import errno

from embedstore.store import open_store


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
        f"Error: Could not write {part}: No space left on device. Free space on that file "
        "system, then re-run the same command: everything committed before is kept."
    ]
    assert "Traceback" not in r.output
