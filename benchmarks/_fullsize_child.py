"""One full-size measurement in a fresh interpreter (bench_extract's full-size section).

Imports only what the measured path imports, so the peak RSS it prints is that path's own.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np


def main(kind: str, folder: str) -> None:
    """Runs in a fresh interpreter: one read of ``folder`` by ``kind``; prints JSON."""

    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    if kind == "bare":
        import pydicom  # noqa: PLC0415 - the baseline

        base = status("VmRSS")
        t0 = time.perf_counter()
        files = sorted(os.listdir(folder))
        vol = np.stack([pydicom.dcmread(os.path.join(folder, f)).pixel_array for f in files])
        seconds = time.perf_counter() - t0
        shape = list(vol.shape)
    else:
        from embedstore import _decode
        from embedstore.preprocess import PreprocessSpec

        _decode.init_worker(PreprocessSpec(modality="CTPA", ct_shape=(64, 128, 128)).to_dict())
        base = status("VmRSS")
        t0 = time.perf_counter()
        res = _decode.prepare("bench", folder, "CTPA")
        seconds = time.perf_counter() - t0
        if res["status"] != "ok":
            raise SystemExit(f"worker path failed: {res['reason']}: {res['message']}")
        shape = list(res["array"].shape)
    print(json.dumps({"seconds": seconds, "peak": status("VmHWM"), "base": base,
                      "shape": shape}))
