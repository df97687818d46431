"""embedstore._fsio: a replaced file is the old one or the new one, and no temp file is left."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedstore._fsio import atomic_path, atomic_write_bytes, tree_size


def test_atomic_write_bytes_replaces_and_leaves_nothing_beside(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new", tmp_suffix=".partial")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["doc.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp(tmp_path: Path) -> None:
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            assert tmp.parent == tmp_path and tmp.name.endswith(".tmp")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]
    with atomic_path(target, durable=False) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    assert tree_size(tmp_path) == 5
