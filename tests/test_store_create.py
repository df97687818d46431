"""Creating a store is atomic: concurrent creators (sharded jobs) all end up in one store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from embedstore.errors import StoreFormatError
from embedstore.store import open_store


def test_concurrent_creation_of_one_store(tmp_path: Path) -> None:
    for attempt in range(5):
        target = tmp_path / f"store{attempt}"
        errors: list[BaseException] = []
        barrier = threading.Barrier(6)

        def create(target: Path = target, barrier: threading.Barrier = barrier,
                   errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                open_store(target, create=True)
            except BaseException as e:  # noqa: BLE001 - collected and asserted below
                errors.append(e)

        threads = [threading.Thread(target=create) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert (target / "store.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folders left"


def test_creation_refuses_a_foreign_folder_and_accepts_an_empty_one(tmp_path: Path) -> None:
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(StoreFormatError, match="not empty and is not an embedstore store"):
        open_store(tmp_path / "foreign", create=True)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    assert open_store(tmp_path / "empty", create=True).root == (tmp_path / "empty").resolve()
