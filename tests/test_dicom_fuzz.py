"""Property-based fuzz of the DICOM read-and-validate entry point (issue 10): arbitrary byte
edits of pydicom's bundled files either read or raise DicomError with a code from REASONS,
never another exception, under a 1 GiB address-space cap, and print no warning (pydicom's can
echo tag values). Runs tests/fuzz_dicom_driver.py in a fresh process so that the cap, and a C
decoder that might crash, stay out of this one. It found: a Rust RLE decoder panic (a
BaseException), an unknown VR raised on first access, an element longer than the file
(MemoryError in dcmread), a non-transfer-syntax UID, leaked file handles and warnings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fuzz_dicom_driver.py"


def _fuzz(examples: int, timeout: float) -> None:
    proc = subprocess.run([sys.executable, str(DRIVER), str(examples)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, (
        f"exit {proc.returncode} (negative: killed by that signal, a decoder crashed)\n"
        + out[-6000:])
    assert "Warning" not in out, out[-3000:]


def test_fuzzed_bundled_files_read_or_fail_with_a_reason() -> None:
    _fuzz(150, timeout=180)


@pytest.mark.slow
def test_fuzzed_bundled_files_long_profile() -> None:
    _fuzz(1000, timeout=600)
