"""Run by tests/test_dicom_fuzz.py in a fresh process (python tests/fuzz_dicom_driver.py N):
hypothesis edits pydicom's bundled files (bit flips, truncations, insertions, deletions,
overwrites) and feeds each result to the read-and-validate entry point ``read_study``. Every
outcome must be a read or a DicomError whose reason is in REASONS; anything else, a MemoryError
under the address-space cap included, is a failure (exit 1 with hypothesis's minimal example).
A crash of a C decoder ends the process with a signal, which the test reports.
"""

from __future__ import annotations

import resource
import shutil
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from embedstore.dicom import REASONS, read_study
from embedstore.errors import DicomError

# CT_small also as the first slice of a 2-slice series (the CT reader's checks run on it)
FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPEGLSNearLossless_16.dcm",
         "MR_small_jp2klossless.dcm", "rtdose_rle.dcm"]
MAX_BYTES = 16 << 20  # declared images larger than this are refused before allocation
CAP = 1 << 30  # address space the process may add while fuzzing

DATA = {n: Path(get_testdata_file(n, download=False)).read_bytes() for n in FILES}


def _edit() -> st.SearchStrategy[tuple]:
    pos = st.one_of(st.integers(0, 1200), st.integers(0, 1 << 20))  # headers more often
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), pos, st.integers(1, 64)),
        st.tuples(st.just("overwrite"), pos, st.binary(min_size=1, max_size=8)),
    )


def _apply(data: bytes, edits: list[tuple]) -> bytes:
    buf = bytearray(data)
    for kind, pos, *arg in edits:
        pos = pos % (len(buf) + 1)
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= arg[0]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = arg[0]
        elif kind == "delete":
            del buf[pos:pos + arg[0]]
        elif kind == "overwrite":
            buf[pos:pos + len(arg[0])] = arg[0]
    return bytes(buf)


def _read(name: str, data: bytes, work: Path) -> None:
    if name == "CT_small.dcm":
        import pydicom

        series = work / "ct"
        series.mkdir()
        (series / "a.dcm").write_bytes(data)
        ds = pydicom.dcmread(get_testdata_file(name, download=False))
        ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [
            float(ds.ImagePositionPatient[2]) + 5.0]
        ds.save_as(series / "b.dcm")
        read_study(series, "CTPA", max_bytes=MAX_BYTES)
    else:
        path = work / "x.dcm"
        path.write_bytes(data)
        read_study(path, "CXR", max_bytes=MAX_BYTES)


def main(examples: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with open("/proc/self/status") as f:
        vm_data = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
    resource.setrlimit(resource.RLIMIT_DATA, (vm_data + CAP, hard))

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck), print_blob=True)
    @given(name=st.sampled_from(FILES), edits=st.lists(_edit(), min_size=1, max_size=4))
    def check(name: str, edits: list[tuple]) -> None:
        work = Path(tempfile.mkdtemp(prefix="fuzz-"))
        try:
            _read(name, _apply(DATA[name], edits), work)
        except DicomError as e:
            assert e.reason in REASONS, f"reason {e.reason!r} is not in REASONS"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()


if __name__ == "__main__":
    main(int(sys.argv[1]))
