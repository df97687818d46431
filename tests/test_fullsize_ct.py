"""Full-size studies in bounded memory (issues 10 item 5 and 13): a CT series is decoded into
one array of its stored dtype and preprocessed slab by slab, the decode worker for CT never
loads torch, a radiograph is worked on in float32 in place, and a study over the memory budget
is refused before anything is allocated. Peak memory is measured in a fresh process each time.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import hu_volume, radiograph, write, write_ct_series
from scipy import ndimage

from embedstore.dicom import MemoryGate, StoredCT, read_ct_series, read_study
from embedstore.errors import DicomError
from embedstore.preprocess import AIR_HU, PreprocessSpec, load_study, preprocess_ct

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the same numbers as before


def _reference(hu: np.ndarray, spacing: tuple[float, float, float], spec: PreprocessSpec
               ) -> np.ndarray:
    """The previous implementation: whole-volume clip, block mean, scipy affine_transform."""
    if spec.ct_clip is not None:
        hu = np.clip(hu, *spec.ct_clip)
    src_n, src_sp = np.array(hu.shape, float), np.array(spacing, float)
    out_n = np.array(spec.ct_shape, float)
    out_sp = src_sp * src_n / out_n if spec.ct_spacing is None else np.array(spec.ct_spacing)
    scale = out_sp / src_sp
    if np.array_equal(src_n, out_n) and np.allclose(scale, 1.0):
        return hu
    factors = tuple(max(1, math.floor(f)) for f in scale) if spec.ct_antialias else (1, 1, 1)
    if any(f > 1 for f in factors):
        s, h, w = (n // f * f for n, f in zip(hu.shape, factors, strict=True))
        fz, fy, fx = factors
        hu = hu[:s, :h, :w].reshape(s // fz, fz, h // fy, fy, w // fx, fx).mean(
            axis=(1, 3, 5), dtype=np.float32)
        f = np.array(factors, float)
        offset = ((src_n - 1) / 2 - (f - 1) / 2) / f - scale / f * (out_n - 1) / 2
        scale = scale / f
    else:
        offset = (src_n - 1) / 2 - scale * (out_n - 1) / 2
    fit = spec.ct_spacing is None
    return ndimage.affine_transform(hu, scale, offset=offset, output_shape=spec.ct_shape,
                                    output=np.float32, order=1, prefilter=False,
                                    mode="nearest" if fit else "constant", cval=AIR_HU)


@pytest.mark.parametrize("shape, out, ct_spacing, antialias", list(itertools.product(
    [(37, 50, 61), (8, 16, 16)], [(16, 24, 20), (5, 7, 9), (8, 16, 16)],
    [None, (3.0, 1.0, 1.1)], [True, False])))
def test_slab_preprocessing_matches_the_whole_volume_reference(
        shape: tuple[int, int, int], out: tuple[int, int, int],
        ct_spacing: tuple[float, float, float] | None, antialias: bool) -> None:
    rng = np.random.default_rng(sum(shape) + sum(out))
    stored = rng.integers(-2000, 3000, size=shape).astype(np.int16)  # (S, H, W)
    slopes = rng.choice([1.0, 0.5], size=shape[0]).astype(np.float32)
    intercepts = np.full(shape[0], -1024.0, dtype=np.float32)
    spacing = (2.5, 0.7, 0.8)
    vol = StoredCT(stored=stored, slopes=slopes, intercepts=intercepts, spacing=spacing,
                   origin=(0.0, 0.0, 0.0), orientation=(1, 0, 0, 0, 1, 0), n_files=1)
    hu = stored.astype(np.float32) * slopes[:, None, None] + intercepts[:, None, None]
    spec = PreprocessSpec(modality="CTPA", ct_shape=out, ct_spacing=ct_spacing,
                          ct_antialias=antialias)
    got = preprocess_ct(vol, spec)
    assert got.shape == out and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(hu, spacing, spec), rtol=0, atol=2e-3)


def test_stored_dtype_decode_gives_the_float_volume_bit_for_bit(tmp_path: Path) -> None:
    hu = hu_volume((6, 8, 10), seed=4)
    write_ct_series(tmp_path / "ct", hu, slopes=[1.0, 0.5, 1.0, 2.0, 1.0, 1.0])
    full = read_ct_series(tmp_path / "ct")
    compact, key = read_study(tmp_path / "ct", "CTPA", compact=True)
    assert isinstance(compact, StoredCT) and compact.stored.dtype == np.int16
    np.testing.assert_array_equal(compact.hu_slab(0, 6), full.hu)
    assert key == read_study(tmp_path / "ct", "CTPA")[1]


class _Budget(MemoryGate):
    def __init__(self, budget: int):
        self.budget, self.asked = budget, []

    def acquire(self, nbytes: int) -> None:
        self.asked.append(nbytes)


def test_a_study_over_the_memory_budget_is_refused_before_decoding(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", hu_volume((6, 64, 64), seed=5))
    spec = PreprocessSpec(modality="CTPA", ct_shape=(4, 16, 16))
    ok = _Budget(64 << 20)
    load_study(tmp_path / "ct", "CTPA", spec, gate=ok)
    (asked,) = ok.asked
    assert 6 * 64 * 64 * 2 < asked < 6 * 64 * 64 * 16  # the int16 volume, not float64 copies
    with pytest.raises(DicomError) as info:
        load_study(tmp_path / "ct", "CTPA", spec, gate=_Budget(asked - 1))
    assert info.value.reason == "over_memory_budget" and "--max-memory" in str(info.value)


# ------------------------------------------------------------------ peak memory, fresh processes

_MEASURE = r"""
import json, sys
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

from embedstore import _decode
from embedstore.preprocess import PreprocessSpec

modality = sys.argv[2]
shape = (64, 128, 128) if modality == "CTPA" else (224, 224)
field = "ct_shape" if modality == "CTPA" else "cxr_size"
_decode.init_worker(PreprocessSpec(modality=modality, **{field: shape}).to_dict())
base = status("VmRSS")
res = _decode.prepare("s", sys.argv[1], modality)
print(json.dumps({"status": res["status"], "reason": res.get("reason"), "torch": "torch" in
                  sys.modules, "growth": status("VmHWM") - base, "shape": list(res.get("array",
                  [[]]).shape) if res["status"] == "ok" else None}))
"""


def _worker_peak(path: Path, modality: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), modality], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True,
                         env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ct_worker_peak_is_about_one_series_and_loads_no_torch(tmp_path: Path) -> None:
    # 48 slices of 512 x 512 int16 (24 MiB): before, float32 HU + a clipped copy + float64
    # resampling grew the worker by > 4x the series and torch added 0.7 GB to every worker
    folder = tmp_path / "ct"
    rng = np.random.default_rng(0)
    write_ct_series(folder, rng.integers(-1000, 1000, size=(48, 512, 512)).astype(np.float32),
                    dz=1.0)
    series_bytes = 48 * 512 * 512 * 2
    m = _worker_peak(folder, "CTPA")
    assert m["status"] == "ok" and m["shape"] == [64, 128, 128]
    assert not m["torch"]
    assert m["growth"] < 1.6 * series_bytes, m["growth"] / series_bytes


def _rle_radiograph(path: Path, n: int) -> Path:
    """A valid RLE radiograph of n x n uint16 that compresses to a few MB."""
    from pydicom.uid import RLELossless

    row = (np.arange(n, dtype=np.uint16) // 512) * 200  # runs of 512 equal pixels
    arr = np.repeat(row[None, :], n, axis=0)
    arr[::97] += 7
    ds = radiograph(arr)
    ds.compress(RLELossless, arr, encoding_plugin="pylibjpeg")
    return write(ds, path)


@pytest.mark.parametrize("n", [4096, pytest.param(8192, marks=pytest.mark.slow)])
def test_a_small_rle_file_declaring_a_large_image_stays_bounded(tmp_path: Path, n: int) -> None:
    # 8192: a 2 MB file declaring 128 MiB of pixels grew a worker by 1.9 GB (15x) before
    path = _rle_radiograph(tmp_path / "big.dcm", n)
    declared = n * n * 2
    assert path.stat().st_size < declared / 16
    m = _worker_peak(path, "CXR")
    assert m["status"] == "ok" and m["shape"] == [224, 224]
    assert m["growth"] < 4 * declared, m["growth"] / declared
