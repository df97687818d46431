"""FsspecBackend on fsspec's in-memory file system (no S3 server needed)."""

import uuid

import pytest

pytest.importorskip("fsspec")

from embedstore.store._fsspec import FsspecBackend  # noqa: E402


@pytest.fixture
def backend():
    b = FsspecBackend(f"memory://es-{uuid.uuid4().hex}/store")
    yield b
    b.delete_tree("")


def test_put_read_list_size_delete(backend):
    backend.put("sets/a/x.bin", [b"ab", b"cd"], size=6)
    backend.put("sets/a/y.bin", b"z")
    assert backend.read("sets/a/x.bin") == b"abcd\0\0"
    assert backend.size("sets/a/x.bin") == 6
    assert backend.list("sets/a") == ["x.bin", "y.bin"]
    assert backend.list("nowhere") == []
    buf = memoryview(bytearray(4))
    assert backend.read_into("sets/a/x.bin", 1, buf) == 4
    assert bytes(buf) == b"bcd\0"
    assert backend.read_into("sets/a/x.bin", 4, memoryview(bytearray(8))) == 2
    backend.delete("sets/a/y.bin")
    assert not backend.exists("sets/a/y.bin")
    backend.delete_tree("sets")
    assert backend.list("sets/a") == []


def test_write_once_names_are_refused_when_present(backend):
    backend.put_once("commits/p1", b"one")
    with pytest.raises(FileExistsError):
        backend.put_once("commits/p1", b"two")
    with pytest.raises(FileExistsError):
        with backend.open_write("commits/p1"):
            pass
    assert backend.read("commits/p1") == b"one"


def test_open_write_publishes_only_on_clean_exit(backend):
    with pytest.raises(RuntimeError):
        with backend.open_write("parts/bad") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not backend.exists("parts/bad")
    with backend.open_write("parts/good") as f:
        f.write(b"whole")
    assert backend.read("parts/good") == b"whole"
