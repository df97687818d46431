"""DRRs from real CT: a frontal radiograph rendered from every validated CT series of a manifest.

RSPECT has CT only; the paper's RSPECT experiment used digitally reconstructed radiographs as its
"CXR". ``run_drr`` reads each selected CTPA series with ``embedstore.dicom.read_ct_series`` (HU +
geometry), projects it with the phantom's renderer (``phantom.line_integrals`` +
``phantom.frontal_image``) along the patient's anterior-posterior axis, writes a DICOM DX per
series through ``_dicomwrite.write_dx`` and a manifest in which each DRR is the CXR of its CT:

    OUT/.drr.json              generator, DRR_VERSION and the DrrSpec (a different spec is refused)
    OUT/dicom/<study_id>.dcm   one DX per CT series (MONOCHROME2, PixelSpacing), atomic writes
    OUT/manifest.parquet/.csv  the selected CT rows + one CXR row per DRR (``source = 'drr'``)
    OUT/drr_failures.jsonl     the series that could not be rendered in the last run (reason codes)

The DRR is a deterministic function of the HU volume and the spec: no noise, no blur, no random
pose (the phantom's detector model is what makes the synthetic cohort varied; real CT brings its
own variation). Geometry is honoured: the anterior-posterior axis is found from the direction
cosines (any axial, coronal or sagittal stacking), line integrals use its voxel spacing, and the
image is resampled onto square pixels in display orientation (top = superior, image left = patient
right). Re-running resumes: a DX that exists is complete (atomic writes) and is reused.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError, DicomError, EmbedstoreError
from embedstore.manifest import Manifest, load_manifest, write_manifest
from embedstore.phantom import PHANTOM_VERSION
from embedstore.progress import Reporter, reporter_or_null
from embedstore.projection import frontal_image, frontal_pixel_mm, line_integrals, to_12bit

__all__ = [
    "DRR_VERSION",
    "GENERATOR",
    "DrrSpec",
    "DrrImage",
    "DrrFailure",
    "DrrSummary",
    "render_frontal",
    "drr_study_id",
    "run_drr",
    "run_drr_source",
]

#: Bumped whenever the same CT and spec would render different pixels.
DRR_VERSION = 1
GENERATOR = "embedstore.drr"
MARKER = ".drr.json"
FAILURES_FILE = "drr_failures.jsonl"
DRR_SUFFIX = "-DRR"
#: Reason code (beside the DICOM reader's) for a series no axis of which is near the AP axis.
UNSUPPORTED_ORIENTATION = "unsupported_orientation"
# An axis more than this far from its patient axis is projected anyway, with a warning.
_OBLIQUE_WARN_DEG = 10.0
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,100}$")


@dataclass(frozen=True)
class DrrSpec:
    """How a DRR is rendered. ``size``: pixels of the square image, which covers the larger of
    the series' superior-inferior and left-right extents (pixel spacing = extent / size);
    ``view``: the ViewPosition written (a parallel projection is the same image either way)."""

    size: int = 512
    view: str = "AP"

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or not 32 <= self.size <= 4096:
            raise ConfigError(f"DRR size must be an integer in [32, 4096] pixels, got {self.size!r}.")
        if self.view not in ("AP", "PA"):
            raise ConfigError(f"DRR view must be 'AP' or 'PA', got {self.view!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "view": self.view, "drr_version": DRR_VERSION,
                "phantom_version": PHANTOM_VERSION}


@dataclass(frozen=True, eq=False)
class DrrImage:
    """A rendered DRR: ``pixels`` (size, size) uint16 12-bit, MONOCHROME2, display orientation."""

    pixels: np.ndarray
    pixel_spacing_mm: float
    ap_axis: int  # the volume axis integrated over (0 slices, 1 rows, 2 columns)
    warnings: tuple[str, ...] = ()


class _Unsupported(EmbedstoreError, ValueError):
    reason = UNSUPPORTED_ORIENTATION


def _slice_normal(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """The direction in which the slice index grows: the reader sorts slices along the normal
    flipped to point superior (embedstore/dicom/series.py ``_normal``, same rule)."""
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    n = n / norm
    if n[2] < -1e-6 or (abs(n[2]) <= 1e-6 and n.sum() < 0):
        n = -n
    return n


def _axis_directions(orientation: tuple[float, ...]) -> np.ndarray:
    """(3, 3): row k is the LPS direction in which index k of the (S, H, W) volume grows."""
    row = np.asarray(orientation[:3], np.float64)  # along a row: the column index (W) grows
    col = np.asarray(orientation[3:6], np.float64)  # down a column: the row index (H) grows
    row = row / max(float(np.linalg.norm(row)), 1e-9)
    col = col / max(float(np.linalg.norm(col)), 1e-9)
    return np.stack([_slice_normal(row, col), col, row])


def render_frontal(hu: np.ndarray, spacing: tuple[float, float, float],
                   orientation: tuple[float, ...], size: int = 512) -> DrrImage:
    """Frontal DRR of a HU volume ``(S, H, W)`` with the reader's geometry (``CTVolume``):
    ``spacing`` (dz, dy, dx) mm and the six ImageOrientationPatient cosines.

    Line integrals run along the volume axis closest to the patient's y (anterior-posterior)
    with that axis' spacing; the remaining two are placed as superior-inferior (rows, top =
    superior) and right-left (columns, image left = patient right) and resampled onto a square
    image of square pixels. Raises an ``unsupported_orientation`` error when the axes cannot be
    matched to the patient's (an oblique series with no axis within 45 degrees of one).
    """
    dirs = _axis_directions(orientation)  # (3 volume axes, 3 patient axes x y z)
    patient_axis = np.argmax(np.abs(dirs), axis=1)  # (3,) which of x, y, z each axis follows
    if sorted(patient_axis.tolist()) != [0, 1, 2]:
        raise _Unsupported(
            "The CT series is oblique: its axes cannot be matched to the patient's "
            "left-right, anterior-posterior and superior-inferior axes, so no frontal "
            "projection is defined. Reslice it to an axial grid first."
        )
    warnings: list[str] = []
    for k in range(3):
        dev = math.degrees(math.acos(min(1.0, abs(float(dirs[k, patient_axis[k]])))))
        if dev > _OBLIQUE_WARN_DEG:
            warnings.append(f"volume axis {k} is {dev:.0f} degrees off its patient axis: "
                            "projected along the nearest axis")
    ap = int(np.flatnonzero(patient_axis == 1)[0])
    si = int(np.flatnonzero(patient_axis == 2)[0])
    lr = int(np.flatnonzero(patient_axis == 0)[0])
    line = line_integrals(hu, ap, float(spacing[ap]))  # the volume without its AP axis
    rest = [k for k in range(3) if k != ap]  # the two axes left, in volume order
    if rest.index(si) != 0:
        line = line.T  # -> (SI, LR)
    if dirs[si, 2] < 0:
        line = line[::-1]  # rows: inferior -> superior, as frontal_image expects
    if dirs[lr, 0] < 0:
        line = line[:, ::-1]  # columns: patient right -> left (+x in LPS)
    line = np.ascontiguousarray(line)
    sz, sx = float(spacing[si]), float(spacing[lr])
    nz, nx = line.shape
    px = frontal_pixel_mm(nz, nx, sz, sx, size)
    img = to_12bit(frontal_image(line, sz, sx, size))  # (size, size)
    return DrrImage(pixels=img, pixel_spacing_mm=px, ap_axis=ap, warnings=tuple(warnings))


def drr_study_id(ct_study_id: str) -> str:
    """The study id of the DRR rendered from CT study ``ct_study_id``."""
    return f"{ct_study_id}{DRR_SUFFIX}"


def _file_name(study_id: str) -> str:
    # study ids are pseudonyms, but a manifest may hold any string: hash what is not file-safe
    if _SAFE_NAME.match(study_id):
        return f"{study_id}.dcm"
    return hashlib.sha256(study_id.encode()).hexdigest()[:32] + ".dcm"


@dataclass(frozen=True)
class DrrFailure:
    study_id: str
    reason: str  # a DICOM reason code (docs/DICOM.md) or unsupported_orientation
    message: str


@dataclass
class DrrSummary:
    """What ``run_drr`` did (also the progress bar's status while it runs)."""

    out_dir: Path
    manifest_path: Path | None = None
    selected: int = 0
    written: int = 0
    reused: int = 0
    failed: int = 0
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    failures: list[DrrFailure] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["manifest_path"] = None if self.manifest_path is None else str(self.manifest_path)
        return d


# ----------------------------------------------------------------------------------------------
# One series (runs in a worker process)
# ----------------------------------------------------------------------------------------------


def _render_one(ct_path: str, out_file: str, patient_id: str, drr_sid: str,
                spec: dict[str, Any]) -> dict[str, Any]:
    """Read, render and write one DRR; a failure comes back as data (the run goes on)."""
    from embedstore._dicomwrite import write_dx
    from embedstore.dicom import read_ct_series

    try:
        vol = read_ct_series(ct_path)
        img = render_frontal(vol.hu, vol.spacing, vol.orientation, int(spec["size"]))
        del vol
        write_dx(out_file, img.pixels, pixel_spacing_mm=img.pixel_spacing_mm,
                 patient_id=patient_id, uid_key=f"{GENERATOR}/{DRR_VERSION}/{drr_sid}",
                 view=str(spec["view"]),
                 derivation=f"DRR: parallel projection of a CT series along its anterior-"
                            f"posterior axis ({GENERATOR} {DRR_VERSION})")
    except (DicomError, _Unsupported) as e:
        return {"status": "failed", "reason": e.reason, "message": e.message}
    except MemoryError:
        return {"status": "failed", "reason": "over_memory_budget",
                "message": "rendering the series ran out of memory; use fewer --workers"}
    return {"status": "ok", "warnings": list(img.warnings)}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _check_out_dir(out: Path, ident: dict[str, Any]) -> None:
    """Refuse an OUT that holds anything but DRRs of this same spec."""
    if not out.exists() or not any(out.iterdir()):
        return
    try:
        found = json.loads((out / MARKER).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"Output folder {str(out)!r} is not empty and holds no DRRs (no {MARKER}). Pick an "
            "empty or new folder (never the cohort's own folder: its manifest would be replaced)."
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(out / MARKER)!r} is unreadable ({e}); pick a new folder.") from e
    if not isinstance(found, dict) or found.get("generator") != GENERATOR:
        raise ConfigError(f"Output folder {str(out)!r} holds no DRRs of {GENERATOR}; pick a new folder.")
    if found.get("spec") != ident["spec"]:
        raise ConfigError(
            f"Output folder {str(out)!r} holds DRRs rendered with {found.get('spec')!r}, not "
            f"{ident['spec']!r}. Use a new folder, or delete the old DRRs first."
        )


def _select(manifest: Manifest, where: str | None) -> pa.Table:
    """The manifest's CTPA rows, filtered by a SQL predicate over ``studies``."""
    table = manifest.table
    ct = table.filter(pc.equal(table["modality"], "CTPA"))
    if where is None:
        return ct
    from embedstore.catalog import EMBEDDINGS_SCHEMA, FAILURES_SCHEMA, RUNS_SCHEMA, Catalog

    with tempfile.TemporaryDirectory(prefix="embedstore-drr-") as tmp:
        path = Path(tmp) / "manifest.parquet"
        pq.write_table(table, path)
        cat = Catalog(Path(tmp), manifest_path=path, embeddings=EMBEDDINGS_SCHEMA.empty_table(),
                      failures=FAILURES_SCHEMA.empty_table(), runs=RUNS_SCHEMA.empty_table())
        try:
            keep = cat.sql(f"SELECT DISTINCT study_id FROM studies WHERE {where}")["study_id"]
        finally:
            cat.close()
    return ct.filter(pc.is_in(ct["study_id"], value_set=keep.combine_chunks()))


def _tasks(todo: list[tuple[str, str, str, str, str]], spec: dict[str, Any], workers: int
           ) -> Iterator[tuple[str, dict[str, Any]]]:
    if workers <= 1:
        for sid, *args in todo:
            yield sid, _render_one(*args, spec)
        return
    # spawn: the parent may already hold torch/OpenMP threads, which fork would copy
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futs = {pool.submit(_render_one, *args, spec): sid for sid, *args in todo}
        for f in as_completed(futs):
            yield futs[f], f.result()


def _rel_path(manifest: Manifest, path: str, out: Path) -> str:
    """A CT row's path as seen from OUT (absolute paths stay absolute)."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(manifest.resolve(path), out.resolve())


def _column(table: pa.Table, name: str, values: list[Any], typ: pa.DataType) -> pa.Table:
    arr = pa.array(values, typ)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("embedstore")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"


def run_drr(
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    where: str | None = None,
    workers: int | None = 1,
    spec: DrrSpec | None = None,
    reporter: Reporter | None = None,
) -> DrrSummary:
    """Render a frontal DRR of every selected CTPA series and write the DRR manifest to OUT.

    ``where``: SQL predicate over ``studies`` (the manifest) choosing the CT series. The new
    manifest holds the selected CT rows and one CXR row per DRR: same patient, study id
    ``<ct study_id>-DRR``, ``acquired_at`` and every other column of its CT, a ``pair_id``
    linking the two (``drr:<ct study_id>``, also set on the CT row) and ``source = 'drr'``
    (CT rows keep their own ``source`` or get ``'original'``). The input's CXR rows are not
    carried over: this manifest is the DRR experiment's. Series that fail are counted by reason
    code in the summary and ``OUT/drr_failures.jsonl``; the run goes on.
    """
    t0 = time.perf_counter()
    spec = DrrSpec() if spec is None else spec
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"--workers must be a positive integer, got {workers!r}.")
    manifest = load_manifest(manifest_path, check_paths=False)
    out = Path(out_dir)
    ident = {"generator": GENERATOR, "spec": spec.to_dict()}
    _check_out_dir(out, ident)
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / MARKER, json.dumps(ident, sort_keys=True, indent=1).encode())
    for stale in (out / "dicom").glob("*.tmp"):  # left by an interrupted run
        stale.unlink(missing_ok=True)

    ct = _select(manifest, where)
    if ct.num_rows == 0:
        raise ConfigError(
            "The manifest has no CTPA series" + (f" matching --where {where!r}" if where else "")
            + "; nothing to render. DRRs are made from the CTPA rows."
        )
    from embedstore._dicomwrite import check_pseudonymous_id

    for pid in set(ct["patient_id"].to_pylist()):  # before any file is written
        check_pseudonymous_id(str(pid), "manifest's patient_id of a CTPA row")
    summary = DrrSummary(out_dir=out, selected=ct.num_rows)
    rows = ct.to_pylist()
    todo: list[tuple[str, str, str, str, str]] = []
    for r in rows:
        sid = str(r["study_id"])
        drr_sid = drr_study_id(sid)
        target = out / "dicom" / _file_name(drr_sid)
        if target.exists():
            summary.reused += 1
            continue
        todo.append((sid, str(manifest.resolve(str(r["path"]))), str(target),
                     str(r["patient_id"]), drr_sid))
    ok = {str(r["study_id"]) for r in rows} - {t[0] for t in todo}  # reused
    n_workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    with reporter_or_null(reporter).bar("drr", len(todo)) as bar:
        bar.update(0, total=len(todo), status=summary)
        for i, (sid, res) in enumerate(_tasks(todo, spec.to_dict(), n_workers)):
            if res["status"] == "ok":
                summary.written += 1
                ok.add(sid)
                if res["warnings"]:
                    summary.warnings[sid] = list(res["warnings"])
            else:
                summary.failed += 1
                summary.failures_by_reason[res["reason"]] = (
                    summary.failures_by_reason.get(res["reason"], 0) + 1)
                summary.failures.append(DrrFailure(sid, res["reason"], res["message"]))
            bar.update(i + 1, status=summary)
    summary.failures.sort(key=lambda f: f.study_id)
    atomic_write_bytes(out / FAILURES_FILE, "".join(
        json.dumps(asdict(f), sort_keys=True) + "\n" for f in summary.failures).encode())

    # the manifest: CT rows (paths seen from OUT) + one CXR row per DRR
    sids = [str(s) for s in ct["study_id"].to_pylist()]
    ct_rows = _column(ct, "path", [_rel_path(manifest, str(p), out) for p in ct["path"].to_pylist()],
                      pa.string())
    ct_rows = _column(ct_rows, "pair_id", [f"drr:{s}" for s in sids], pa.string())
    old_source = (ct["source"].to_pylist() if "source" in ct.column_names else [None] * len(sids))
    ct_rows = _column(ct_rows, "source", [str(s) if s is not None else "original"
                                          for s in old_source], pa.string())
    keep = [i for i, s in enumerate(sids) if s in ok]
    drr = ct_rows.take(pa.array(keep, pa.int64()))
    drr_ids = [sids[i] for i in keep]
    drr = _column(drr, "study_id", [drr_study_id(s) for s in drr_ids], pa.string())
    drr = _column(drr, "modality", ["CXR"] * len(keep), pa.string())
    drr = _column(drr, "path", [f"dicom/{_file_name(drr_study_id(s))}" for s in drr_ids], pa.string())
    drr = _column(drr, "source", ["drr"] * len(keep), pa.string())
    if "photometric" in drr.column_names:
        drr = _column(drr, "photometric", ["MONOCHROME2"] * len(keep), pa.string())
    table = pa.concat_tables([ct_rows, drr.select(ct_rows.column_names)],
                             promote_options="default").replace_schema_metadata(None)
    meta = {
        "generator": GENERATOR,
        "drr_spec": spec.to_dict(),
        "source_manifest_fingerprint": manifest.fingerprint,
        "where": where,
        "version": _package_version(),
    }
    summary.manifest_path = write_manifest(table, out, metadata=meta, check_paths=False)
    summary.seconds = time.perf_counter() - t0
    return summary


def _is_manifest_source(source: Path) -> bool:
    if source.is_file():
        return True
    return any((source / n).is_file() for n in ("manifest.parquet", "manifest.csv"))


def run_drr_source(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    patient_id: str | None = None,
    study_id: str | None = None,
    split: str = "test",
    where: str | None = None,
    workers: int | None = 1,
    spec: DrrSpec | None = None,
    reporter: Reporter | None = None,
) -> DrrSummary:
    """``embedstore drr SOURCE OUT``: SOURCE is a manifest (or a folder holding
    ``manifest.parquet``/``.csv``), rendered with :func:`run_drr`, or one CT series folder.

    A lone series has no manifest to take pseudonymous ids from, so ``patient_id`` (a
    pseudonym, checked; never read from the DICOM) is required and ``study_id`` defaults to
    ``<patient_id>-CT``; the series gets a one-row manifest (``split``, no label, no time) and
    OUT's manifest points at it by absolute path.
    """
    src = Path(source)
    if not src.exists():
        raise ConfigError(f"DRR source {str(src)!r} does not exist. Give a manifest, a folder "
                          "holding manifest.parquet, or a CT series folder.")
    if _is_manifest_source(src):
        if patient_id is not None or study_id is not None:
            raise ConfigError("--patient-id and --study-id are for a lone CT series folder; a "
                              "manifest brings its own ids.")
        return run_drr(src, out_dir, where=where, workers=workers, spec=spec, reporter=reporter)
    if where is not None:
        raise ConfigError("--where selects rows of a manifest; the source is one CT series folder.")
    if patient_id is None:
        raise ConfigError(
            f"{src.name!r} is a folder without a manifest, so it is read as one CT series; pass "
            "--patient-id PSEUDONYM (identifiers are never read from the DICOM), or give a "
            "manifest.")
    from embedstore._dicomwrite import check_pseudonymous_id

    check_pseudonymous_id(patient_id, "--patient-id")
    sid = check_pseudonymous_id(study_id or f"{patient_id}-CT", "--study-id")
    row = {"patient_id": patient_id, "study_id": sid, "modality": "CTPA",
           "path": str(src.resolve()), "acquired_at": None, "label_pe": None, "split": split}
    with tempfile.TemporaryDirectory(prefix="embedstore-drr-series-") as tmp:
        man = write_manifest([row], tmp, metadata={"generator": GENERATOR, "lone_series": True})
        return run_drr(man, out_dir, workers=workers, spec=spec, reporter=reporter)
