"""Extraction pipeline benchmark (issue: DICOM ingest and `embedstore extract`).

In one run, on the synthetic cohort's CTPA series (64 slices of 128x128 int16 each):
  1. decode: a serial pydicom loop (dcmread + pixel_array + sort + rescale) vs our validated
     reader in a 2-process pool; the voxels are compared bit for bit;
  2. stages alone vs the overlapped pipeline: decode+preprocess alone, encode alone (arrays in
     RAM), and `extract` end to end; the pipeline should reach >= 0.9x the slowest stage;
  3. resume: `extract` again on the complete store, as a fraction of the full extraction;
  4. full-size CT (issue 13): generated 300- and 600-slice 512x512 int16 series, the decode
     worker's side (validate + decode + hash + preprocess to demo-ctpa's grid, as `_decode` runs
     it) vs a bare `dcmread` loop + `np.stack`, each in a fresh process per measurement:
     series/s and peak RSS (VmHWM) / series bytes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from embedstore.models.encoders import create_encoder

from embedstore.extract import ExtractConfig, extract
from embedstore.manifest import load_manifest
from embedstore.preprocess import PreprocessSpec, load_study
from embedstore.synth import synthesize_cohort


def _pydicom_loop(folder: str) -> np.ndarray:
    """The usual hand-written loop: read every file, sort by z, apply rescale."""
    import pydicom  # noqa: PLC0415 - benchmark baseline only

    slices = [pydicom.dcmread(os.path.join(folder, f)) for f in os.listdir(folder)]
    slices.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope)
                     + float(d.RescaleIntercept) for d in slices])


def _ours(folder: str) -> np.ndarray:
    from embedstore.dicom import read_ct_series

    return read_ct_series(folder).hu


def _init() -> None:
    torch.set_num_threads(1)


def _median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(quick: bool = False) -> str:
    n_patients = 12 if quick else 160
    repeats = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        synthesize_cohort(work / "cohort", n_patients=n_patients, seed=11, workers=2)
        man = load_manifest(work / "cohort" / "manifest.parquet")
        folders = [str(man.resolve(r["path"])) for r in man.rows("CTPA")]
        n = len(folders)

        # 1. decode: serial pydicom loop vs our reader on 2 processes (bit-for-bit equal voxels)
        t_serial = _median_time(lambda: [_pydicom_loop(f) for f in folders], repeats)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init) as ex:
            list(ex.map(_ours, folders[:2]))  # warm the workers (imports) outside the timing
            t_par = _median_time(lambda: list(ex.map(_ours, folders)), repeats)
            ours = list(ex.map(_ours, folders))
        same = all(np.array_equal(a, _pydicom_loop(f)) for a, f in zip(ours, folders, strict=True))

        # 2. stage speeds and the overlapped pipeline
        enc = create_encoder("demo-ctpa")
        spec = PreprocessSpec(modality="CTPA", ct_shape=tuple(enc.input_size))  # type: ignore[arg-type]
        with ProcessPoolExecutor(2, mp_context=ctx, initializer=_init) as ex:
            list(ex.map(load_study, folders[:2], ["CTPA"] * 2, [spec] * 2))
            t_dec = _median_time(lambda: list(ex.map(load_study, folders, ["CTPA"] * n,
                                                     [spec] * n)), repeats)
            arrays = [s.array for s in ex.map(load_study, folders, ["CTPA"] * n, [spec] * n)]
        torch.set_num_threads(os.cpu_count() or 2)

        def encode_all() -> None:
            with torch.inference_mode():
                for i in range(0, n, 16):
                    enc(torch.from_numpy(np.stack(arrays[i:i + 16])))

        t_enc = _median_time(encode_all, repeats)
        e2e, resume = [], []
        for r in range(repeats):
            store = work / f"store{r}"
            t0 = time.perf_counter()
            s = extract(store, work / "cohort" / "manifest.parquet",
                        ExtractConfig(modality="ctpa"))
            e2e.append(time.perf_counter() - t0)
            assert s.done == n, s
            t0 = time.perf_counter()
            s2 = extract(store, work / "cohort" / "manifest.parquet",
                         ExtractConfig(modality="ctpa"))
            resume.append(time.perf_counter() - t0)
            assert s2.cached == n and s2.done == 0
        t_e2e, t_resume = statistics.median(e2e), statistics.median(resume)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    slowest = min(n / t_dec, n / t_enc)
    rows = [
        ("Decode CT series: serial pydicom loop", f"{n / t_serial:.1f}", "1.00x", "baseline"),
        ("Decode CT series: embedstore reader, 2 processes", f"{n / t_par:.1f}",
         f"{t_serial / t_par:.2f}x", f">= 1.8x; voxels bit-for-bit equal: {same}"),
        ("Stage alone: decode + validate + preprocess (2 processes)", f"{n / t_dec:.1f}", "", ""),
        ("Stage alone: encode (demo-ctpa, arrays in RAM)", f"{n / t_enc:.1f}", "", ""),
        ("Pipeline: `extract` end to end (incl. process start-up)", f"{n / t_e2e:.1f}",
         f"{(n / t_e2e) / slowest:.2f}x of slowest stage", ">= 0.9x"),
        ("Resume on a complete store", f"{t_resume:.2f} s total",
         f"{100 * t_resume / t_e2e:.1f}% of full", "<= 2%"),
    ]
    lines = [
        "## Extraction pipeline (`benchmarks/bench_extract.py`)",
        "",
        f"{n} synthetic CTPA series (64 slices of 128x128 int16, one file per slice), median of "
        f"{repeats} repeat(s). Items are series per second.",
        "",
        "| measurement | series/s | ratio | goal / note |",
        "|---|---:|---:|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        run_fullsize(quick),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Full-size CT: one fresh process per measurement, so each peak RSS is that path's own
# ---------------------------------------------------------------------------------------------

_FULL_HW = 512


def _write_fullsize_series(folder: Path, n_slices: int) -> int:
    """A 512x512 int16 series of ``n_slices`` (body ellipse, lungs, noise); returns its bytes."""
    from datetime import datetime, timezone

    from embedstore._dicomwrite import SyntheticPatient, write_ct_series

    rng = np.random.default_rng(n_slices)
    yy, xx = np.mgrid[0:_FULL_HW, 0:_FULL_HW]
    c = (_FULL_HW - 1) / 2
    body = ((yy - c) / 200) ** 2 + ((xx - c) / 240) ** 2 <= 1
    lungs = (((yy - c) / 120) ** 2 + ((np.abs(xx - c) - 100) / 70) ** 2) <= 1
    base = np.where(body, 40, -1000).astype(np.int16)
    base[lungs] = -800
    hu = np.empty((n_slices, _FULL_HW, _FULL_HW), dtype=np.int16)  # (S, H, W)
    for k in range(n_slices):
        hu[k] = base + rng.integers(-20, 20, size=base.shape, dtype=np.int16)
    patient = SyntheticPatient("SYN-9000", "F", 60, "bench")
    write_ct_series(folder, hu, spacing_mm=(1.0, 0.7, 0.7), patient=patient,
                    when=datetime(2024, 1, 1, tzinfo=timezone.utc), uid_key=f"bench-{n_slices}")
    return int(hu.nbytes)


def _measure(kind: str, folder: Path) -> dict:
    # a light module of its own: importing this one would load torch and the encoders
    code = "import sys; from benchmarks._fullsize_child import main; main(sys.argv[1], sys.argv[2])"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, kind, str(folder)], check=True,
                         capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_fullsize(quick: bool = False) -> str:
    sizes = (30, 60) if quick else (300, 600)
    repeats = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-fullsize-"))
    rows = []
    try:
        for n in sizes:
            folder = work / f"ct{n}"
            nbytes = _write_fullsize_series(folder, n)
            res = {k: [_measure(k, folder) for _ in range(repeats)] for k in ("bare", "ours")}
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak", "base")}
                   for k, v in res.items()}
            shutil.rmtree(folder)
            for k, label in (("bare", "bare `dcmread` loop + `np.stack` (int16, no checks)"),
                             ("ours", "decode worker: validate + decode + hash + preprocess")):
                m = med[k]
                rows.append((f"{n} x 512 x 512: {label}", f"{1 / m['seconds']:.2f}",
                             f"{med['bare']['seconds'] / m['seconds']:.2f}x",
                             f"{m['peak'] / nbytes:.2f}x",
                             f"{(m['peak'] - m['base']) / nbytes:.2f}x",
                             f"{m['peak'] / 2**20:.0f} MiB"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "### Full-size CT series (issue 13)",
        "",
        f"Generated int16 series, one uncompressed file per 512x512 slice, median of {repeats} "
        "fresh process(es) per cell. Peak RSS is the process's VmHWM; 'growth' subtracts its RSS "
        "after imports (the decode worker's imports: numpy, pydicom, scipy; no torch). Goal: "
        "peak RSS per worker <= 2.5x the series bytes.",
        "",
        "| series and path | series/s | speed vs bare | peak RSS / series bytes | "
        "growth / series bytes | peak RSS |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {' | '.join(r)} |" for r in rows],
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    md = run()
    print(md)
    out = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "extract.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
