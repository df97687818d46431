"""The synthetic phantom cohort written as real DICOM, with a manifest and a preview figure.

Layout of ``OUT``::

    OUT/manifest.parquet, OUT/manifest.csv     one row per study (CTPA series folder, CXR file)
    OUT/.synth.json                            seed + phantom spec of the cohort in OUT
    OUT/dicom/SYN-0001/ctpa/<hash>.dcm         one file per axial slice, names in shuffled order
    OUT/dicom/SYN-0001/cxr.dcm                 the radiograph (DX, or CR when MONOCHROME1)
    OUT/dicom/SYN-0001/patient.json            findings and ground truth of the case

Each patient is written into a temporary folder and renamed into place, so a patient folder
that exists is complete; an interrupted run is resumed by running the same command again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from embedstore._dicomwrite import (
    SyntheticPatient,
    read_ct_series_hu,
    read_radiograph,
    write_ct_series,
    write_radiograph,
)
from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError
from embedstore.manifest import assign_splits, load_manifest, write_manifest
from embedstore.phantom import PHANTOM_VERSION, PhantomSpec, generate_case, patient_rng, window
from embedstore.progress import Bar, NullBar, Reporter, reporter_or_null

__all__ = ["SynthResult", "synthesize_cohort", "render_preview", "run_synth", "patient_id", "GENERATOR"]

GENERATOR = "embedstore.synth"
MARKER = ".synth.json"
FINDING_COLUMNS = (
    "n_clots", "occlusive", "westermark", "hampton_hump", "enlarged_pa", "elevated_diaphragm",
    "effusion", "consolidation", "emphysema", "cardiomegaly",
)
# Fake sites; each has its own scanner rescale intercept so readers must apply the modality LUT.
_SITES = ("SITE-A", "SITE-B", "SITE-C")
_SITE_INTERCEPT = {"SITE-A": -1024, "SITE-B": -1000, "SITE-C": -1024}
_EPOCH = datetime(2021, 1, 1, 8, 0, 0)


@dataclass(frozen=True)
class SynthResult:
    """What ``synthesize_cohort`` did. ``files_written`` counts DICOM files written by this call."""

    out_dir: Path
    manifest_path: Path
    n_patients: int
    n_positive: int
    seconds: float
    files_written: int
    patients_reused: int


def patient_id(index: int) -> str:
    """Synthetic patient id of cohort member ``index`` (0-based): ``SYN-0001`` ..."""
    return f"SYN-{index + 1:04d}"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("embedstore")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def _identity(seed: int, spec: PhantomSpec) -> dict[str, Any]:
    return {
        "generator": GENERATOR,
        "phantom_version": PHANTOM_VERSION,
        "seed": int(seed),
        "spec_fingerprint": spec.fingerprint(),
        "phantom_spec": spec.to_dict(),
    }


def _check_out_dir(out: Path, ident: dict[str, Any]) -> None:
    """Refuse an OUT that holds anything but this same cohort (same seed, spec, version)."""
    if not out.exists() or not any(out.iterdir()):
        return
    found: dict[str, Any] | None = None
    if (out / MARKER).exists():
        try:
            found = json.loads((out / MARKER).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(
                f"{str(out / MARKER)!r} is unreadable ({e}); delete {str(out)!r} or pick a new folder."
            ) from e
    elif (out / "manifest.parquet").exists():
        try:
            found = dict(load_manifest(out / "manifest.parquet", check_paths=False).metadata)
        except Exception as e:  # noqa: BLE001 - any unreadable manifest means "not ours"
            raise ConfigError(
                f"Output folder {str(out)!r} holds a manifest that is not a synthetic cohort ({e}). "
                "Pick an empty folder."
            ) from e
    if not found or found.get("generator") != GENERATOR:
        raise ConfigError(
            f"Output folder {str(out)!r} is not empty and holds no synthetic cohort. "
            "Pick an empty or new folder."
        )
    for key in ("phantom_version", "seed", "spec_fingerprint"):
        if found.get(key) != ident[key]:
            raise ConfigError(
                f"Output folder {str(out)!r} holds a different synthetic cohort "
                f"({key}={found.get(key)!r}, asked for {ident[key]!r}). Use a new folder, or delete "
                "the old cohort first."
            )


def _demographics(seed: int, index: int, spec: PhantomSpec) -> dict[str, Any]:
    # a stream separate from the phantom's, so demographics never shift the anatomy
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index), 1)))
    site = _SITES[int(rng.integers(0, len(_SITES)))]
    ctpa_at = _EPOCH + timedelta(days=int(rng.integers(0, 730)), seconds=int(rng.integers(0, 36000)))
    cxr_at = ctpa_at - timedelta(seconds=int(rng.integers(1800, 48 * 3600)))  # 0.5-48 h before
    return {
        "age": int(rng.integers(25, 91)),
        "sex": "M" if rng.random() < 0.5 else "F",
        "site": site,
        "ctpa_at": ctpa_at,
        "cxr_at": cxr_at,
        "monochrome1": bool(rng.random() < spec.frac_monochrome1),
        "rescale_intercept": _SITE_INTERCEPT[site],
    }


def _write_patient(out_dir: str, index: int, seed: int, spec_dict: dict[str, Any]) -> dict[str, Any]:
    """Generate and write one patient (runs in a worker process). Returns its patient.json."""
    spec = PhantomSpec.from_dict(spec_dict)
    pid = patient_id(index)
    final = Path(out_dir) / "dicom" / pid
    if (final / "patient.json").exists():
        return json.loads((final / "patient.json").read_text()) | {"_files": 0}
    case = generate_case(spec, patient_rng(seed, index))
    dem = _demographics(seed, index, spec)
    who = SyntheticPatient(patient_id=pid, sex=dem["sex"], age=dem["age"], site=dem["site"])
    key = f"{spec.fingerprint()[:16]}/{seed}/{pid}"
    tmp = Path(out_dir) / "dicom" / f".tmp-{pid}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    ct_files = write_ct_series(tmp / "ctpa", case.ctpa_hu, spacing_mm=spec.spacing_mm,
                               patient=who, when=dem["ctpa_at"], uid_key=key,
                               rescale_intercept=dem["rescale_intercept"])
    fov = max(spec.shape[0] * spec.spacing_mm[0], spec.shape[2] * spec.spacing_mm[2])
    write_radiograph(tmp / "cxr.dcm", case.drr, pixel_spacing_mm=fov / spec.drr_size,
                     patient=who, when=dem["cxr_at"], uid_key=key, monochrome1=dem["monochrome1"])
    info = {
        "patient_id": pid,
        "index": index,
        "label_pe": case.label_pe,
        "age": dem["age"],
        "sex": dem["sex"],
        "site": dem["site"],
        "ctpa_at": dem["ctpa_at"].isoformat(),
        "cxr_at": dem["cxr_at"].isoformat(),
        "photometric": "MONOCHROME1" if dem["monochrome1"] else "MONOCHROME2",
        "rescale_intercept": dem["rescale_intercept"],
        "findings": case.findings,
        "truth": case.truth,
    }
    (tmp / "patient.json").write_text(json.dumps(info, indent=1, sort_keys=True))
    try:
        os.replace(tmp, final)  # atomic: the patient folder appears complete or not at all
    except OSError:
        if not (final / "patient.json").exists():
            raise
        shutil.rmtree(tmp)  # a concurrent run finished this patient first
        return json.loads((final / "patient.json").read_text()) | {"_files": 0}
    return info | {"_files": len(ct_files) + 1}


def _run(out: Path, todo: list[int], seed: int, spec: PhantomSpec, workers: int,
         bar: Bar) -> Iterator[dict[str, Any]]:
    spec_dict = spec.to_dict()
    if workers <= 1:
        for i in todo:
            yield _write_patient(str(out), i, seed, spec_dict)
            bar.advance()
    else:
        # spawn: the parent may already hold torch/OpenMP threads, which fork would copy
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futs = [pool.submit(_write_patient, str(out), i, seed, spec_dict) for i in todo]
            for f in as_completed(futs):
                yield f.result()
                bar.advance()


def synthesize_cohort(
    out_dir: str | os.PathLike[str],
    n_patients: int = 200,
    seed: int = 0,
    spec: PhantomSpec | None = None,
    workers: int | None = None,
    reporter: Reporter | None = None,
) -> SynthResult:
    """Write ``n_patients`` synthetic patients (CTPA series + radiograph) and the manifest to OUT.

    Deterministic per (seed, spec), whatever ``workers`` is: patient ``i`` is drawn from its own
    generator. Re-running over the same cohort reuses the complete patients already there (and
    can extend it to more patients); an OUT holding anything else is refused with ConfigError.
    ``reporter`` gets a bar over the patients still to write (none when all are there).
    """
    spec = PhantomSpec() if spec is None else spec
    if not isinstance(n_patients, int) or n_patients < 1:
        raise ConfigError(f"n_patients must be a positive integer, got {n_patients!r}.")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"workers must be a positive integer or None (all cores), got {workers!r}.")
    t0 = time.perf_counter()
    out = Path(out_dir)
    ident = _identity(seed, spec)
    _check_out_dir(out, ident)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER, json.dumps(ident, sort_keys=True, indent=1).encode())
    for stale in (out / "dicom").glob(".tmp-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    infos: dict[int, dict[str, Any]] = {}
    todo = []
    for i in range(n_patients):
        pj = out / "dicom" / patient_id(i) / "patient.json"
        if pj.exists():
            infos[i] = json.loads(pj.read_text())
        else:
            todo.append(i)
    reused = len(infos)
    n_workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    files = 0
    with (reporter_or_null(reporter).bar("synthesizing patients", len(todo)) if todo
          else nullcontext(NullBar())) as bar:
        for info in _run(out, todo, seed, spec, n_workers, bar):
            files += int(info.pop("_files", 0))
            infos[int(info["index"])] = info

    ids = [patient_id(i) for i in range(n_patients)]
    splits = assign_splits(ids, seed=seed)
    rows: list[dict[str, Any]] = []
    for i in range(n_patients):
        info = infos[i]
        pid = info["patient_id"]
        common = {
            "patient_id": pid,
            "label_pe": int(info["label_pe"]),
            "split": splits[pid],
            "pair_id": pid,
            "age": int(info["age"]),
            "sex": info["sex"],
            "site": info["site"],
            **{k: info["findings"][k] for k in FINDING_COLUMNS},
        }
        rows.append({"study_id": f"{pid}-CTPA", "modality": "CTPA",
                     "path": f"dicom/{pid}/ctpa", "acquired_at": info["ctpa_at"], **common,
                     "photometric": None})
        rows.append({"study_id": f"{pid}-CXR", "modality": "CXR",
                     "path": f"dicom/{pid}/cxr.dcm", "acquired_at": info["cxr_at"], **common,
                     "photometric": info["photometric"]})
    meta = {**ident, "n_patients": n_patients, "version": _package_version()}
    mpath = write_manifest(rows, out, metadata=meta)
    return SynthResult(
        out_dir=out,
        manifest_path=mpath,
        n_patients=n_patients,
        n_positive=sum(int(infos[i]["label_pe"]) for i in range(n_patients)),
        seconds=time.perf_counter() - t0,
        files_written=files,
        patients_reused=reused,
    )


def _describe(info: dict[str, Any]) -> str:
    f = info["findings"]
    pe = f"PE+ ({f['n_clots']} clot{'s' if f['n_clots'] != 1 else ''})" if info["label_pe"] else "PE-"
    signs = [k.replace("_", " ") for k in FINDING_COLUMNS[1:] if f.get(k)]
    return f"{info['patient_id']}  {pe}" + (f"\n{', '.join(signs)}" if signs else "\nno other findings")


def render_preview(
    out_dir: str | os.PathLike[str], png_path: str | os.PathLike[str], n_cases: int = 4
) -> Path:
    """Render ``n_cases`` patients of a cohort to one PNG: mediastinal and lung windows, DRR.

    Positive and negative cases alternate; the CT slices pass through a clot (mediastinal
    window W400/L40) and the largest perfusion defect (lung window W1500/L-600) when present.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(n_cases, int) or n_cases < 1:
        raise ConfigError(f"n_cases must be a positive integer, got {n_cases!r}.")
    out = Path(out_dir)
    man = load_manifest(out)
    if man.metadata.get("generator") != GENERATOR:
        raise ConfigError(f"{str(out)!r} does not hold a synthetic cohort (no {GENERATOR} metadata).")
    pids = sorted(set(man.table["patient_id"].to_pylist()))
    infos = [json.loads((out / "dicom" / p / "patient.json").read_text()) for p in pids]
    pos = [i for i in infos if i["label_pe"]]
    neg = [i for i in infos if not i["label_pe"]]
    chosen: list[dict[str, Any]] = []
    while len(chosen) < min(n_cases, len(infos)):
        for pool in (pos, neg):
            if pool and len(chosen) < n_cases:
                chosen.append(pool.pop(0))
    fig, axes = plt.subplots(len(chosen), 3, figsize=(10.5, 3.9 * len(chosen)), squeeze=False)
    for row, info in zip(axes, chosen, strict=True):
        hu, _ = read_ct_series_hu(out / "dicom" / info["patient_id"] / "ctpa")
        clots = info["truth"]["clots"]
        z_med = clots[0]["slice"] if clots else info["truth"]["focus_slice"]
        z_lung = info["truth"]["focus_slice"]
        drr = read_radiograph(out / "dicom" / info["patient_id"] / "cxr.dcm")
        row[0].imshow(window(hu[z_med], 400, 40), cmap="gray", vmin=0, vmax=1)
        row[0].set_title(f"CTPA slice {z_med}, W400/L40", fontsize=9, loc="left")
        row[1].imshow(window(hu[z_lung], 1500, -600), cmap="gray", vmin=0, vmax=1)
        row[1].set_title(f"CTPA slice {z_lung}, W1500/L-600", fontsize=9)
        lo, hi = np.percentile(drr, [1, 99])
        row[2].imshow(drr, cmap="gray", vmin=lo, vmax=hi)
        row[2].set_title(f"DRR ({info['photometric']} on disk)", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].text(0.0, 1.09, _describe(info).replace("\n", ": "), transform=row[0].transAxes,
                    fontsize=10, fontweight="bold", ha="left", va="bottom")
    fig.suptitle("embedstore synthetic phantom cohort (image left = patient right)", fontsize=11,
                 y=1 - 0.15 / fig.get_figheight())
    # fixed margins: tight_layout would shrink the images to fit the case captions
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - 0.85 / fig.get_figheight(), bottom=0.01,
                        hspace=0.32, wspace=0.04)
    png = Path(png_path)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return png


def run_synth(
    out_dir: str | os.PathLike[str],
    *,
    n_patients: int = 200,
    seed: int = 0,
    spec: PhantomSpec | None = None,
    workers: int | None = None,
    preview: bool = True,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """``synthesize_cohort`` plus an optional ``preview.png``; a JSON-able summary (CLI, demo)."""
    res = synthesize_cohort(out_dir, n_patients=n_patients, seed=seed, spec=spec, workers=workers,
                            reporter=reporter)
    out: dict[str, Any] = {
        "manifest_path": str(res.manifest_path), "n_patients": res.n_patients,
        "n_positive": res.n_positive, "seconds": round(res.seconds, 2),
        "files_written": res.files_written, "patients_reused": res.patients_reused,
        "reused": res.files_written == 0 and res.patients_reused == res.n_patients,
    }
    if preview:
        png = Path(out_dir) / "preview.png"
        if not png.exists() or res.files_written:
            render_preview(out_dir, png)
        out["preview_path"] = str(png)
    return out
