"""CT series -> HU volume: file scan, series choice, slice order, geometry checks, enhanced CT.

``_scan_ct`` reads headers only (pixel data stays deferred on disk) and decides which slices
form the volume; ``_read_ct`` then hashes each used file's pixel bytes and, when decoding,
rescales every slice (or enhanced-CT frame) to HU with its own slope and intercept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from embedstore.dicom.hashing import _hash_init, _pixel_format, _r
from embedstore.dicom.reasons import _err
from embedstore.dicom.validation import (
    _PIXEL_DATA,
    DEFAULT_MAX_BYTES,
    _check_pixels,
    _decode,
    _first,
    _float_or,
    _floats,
    _is_image_object,
    _iter_frames,
    _list_files,
    _PixelInfo,
    _raw_pixel_bytes,
    _read,
)
from embedstore.errors import DicomError

__all__ = ["CTVolume", "read_ct_series"]


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as Hounsfield units, slices ordered inferior -> superior along the normal."""

    hu: np.ndarray  # (S, H, W) float32 HU
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # ImagePositionPatient of hu[0]
    orientation: tuple[float, ...]  # 6 direction cosines (row, column)
    n_files: int
    warnings: tuple[str, ...] = ()

    def geometry(self) -> dict[str, Any]:
        """JSON-ready geometry (no identifiers): shape, spacing, origin, orientation, files."""
        return {
            "shape": list(self.hu.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "orientation": list(self.orientation),
            "n_files": self.n_files,
        }


@dataclass
class _Slice:
    name: str  # file path inside the study folder
    frame: int | None  # frame index in an enhanced multi-frame file
    series: str
    position: np.ndarray  # (3,) ImagePositionPatient
    orientation: tuple[float, ...]
    rows: int
    cols: int
    pixel_spacing: tuple[float, float]
    slope: float
    intercept: float
    localizer: bool
    tie: tuple[Any, ...]  # header-only tie-break for duplicates (independent of file names)
    d: float = 0.0  # position along the slice normal


@dataclass
class _Scan:
    slices: list[_Slice]
    files: dict[str, tuple[Dataset, _PixelInfo]]
    spacing: tuple[float, float, float]
    orientation: tuple[float, ...]
    warnings: list[str] = field(default_factory=list)


def _fg_item(per_frame: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional-group macro item: the per-frame one, else the shared one."""
    for group in (per_frame, shared):
        if group is not None and keyword in group:
            item = _first(group.get(keyword))
            if item is not None:
                return item
    return None


def _is_localizer(image_type: Any) -> bool:
    try:
        values = [str(v).upper() for v in image_type] if image_type else []
    except TypeError:
        values = [str(image_type).upper()]
    return "LOCALIZER" in values or "SCOUT" in values


def _slices_of(ds: Dataset, name: str, info: _PixelInfo) -> list[_Slice]:
    series = str(ds.get("SeriesInstanceUID", ""))
    tie = (
        _float_or(ds.get("AcquisitionNumber"), 0.0),
        _float_or(ds.get("InstanceNumber"), 0.0),
        str(ds.get("SOPInstanceUID", "")),
    )
    localizer = _is_localizer(ds.get("ImageType"))
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    per_frames = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frames is not None or shared is not None:
        if per_frames is None or len(per_frames) != info.frames:
            raise _err(
                "missing_attribute",
                f"File {name!r} is an enhanced multi-frame image whose "
                f"PerFrameFunctionalGroupsSequence does not have one item per frame "
                f"({info.frames} frames); re-export it.",
            )
        out = []
        top_slope = _float_or(ds.get("RescaleSlope"), 1.0)
        top_intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
        for i, pf in enumerate(per_frames):
            pos_item = _fg_item(pf, shared, "PlanePositionSequence")
            ori_item = _fg_item(pf, shared, "PlaneOrientationSequence")
            pm_item = _fg_item(pf, shared, "PixelMeasuresSequence")
            pvt = _fg_item(pf, shared, "PixelValueTransformationSequence")
            ftype = _fg_item(pf, shared, "CTImageFrameTypeSequence")
            pos = _floats(pos_item.get("ImagePositionPatient") if pos_item else None, 3)
            ori = _floats(ori_item.get("ImageOrientationPatient") if ori_item else None, 6)
            ps = _floats(pm_item.get("PixelSpacing") if pm_item else None, 2)
            if pos is None or ori is None or ps is None:
                missing = [
                    k
                    for k, v in (
                        ("PlanePositionSequence/ImagePositionPatient", pos),
                        ("PlaneOrientationSequence/ImageOrientationPatient", ori),
                        ("PixelMeasuresSequence/PixelSpacing", ps),
                    )
                    if v is None
                ]
                raise _err(
                    "missing_attribute",
                    f"File {name!r} frame {i + 1} lacks {', '.join(missing)} in its functional "
                    "groups; the frame cannot be placed in the volume.",
                )
            # per-frame rescale: pydicom's apply_modality_lut would ignore it
            slope = _float_or(pvt.get("RescaleSlope"), top_slope) if pvt else top_slope
            intercept = (
                _float_or(pvt.get("RescaleIntercept"), top_intercept) if pvt else top_intercept
            )
            frame_local = localizer or _is_localizer(ftype.get("FrameType") if ftype else None)
            out.append(
                _Slice(
                    name,
                    i,
                    series,
                    np.array(pos),
                    ori,
                    info.rows,
                    info.cols,
                    ps,
                    slope,
                    intercept,
                    frame_local,
                    (*tie, i),
                )
            )
        return out
    if info.frames != 1:
        raise _err(
            "missing_attribute",
            f"File {name!r} holds {info.frames} frames without per-frame functional groups, so "
            "the frames cannot be positioned; export the series as single-frame or enhanced CT.",
        )
    pos = _floats(ds.get("ImagePositionPatient"), 3)
    ori = _floats(ds.get("ImageOrientationPatient"), 6)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if pos is None or ori is None or ps is None:
        if localizer:  # scouts often lack full geometry; they are skipped anyway
            pos, ori, ps = pos or (0.0, 0.0, 0.0), ori or (1, 0, 0, 0, 1, 0), ps or (1.0, 1.0)
        else:
            missing = [
                k
                for k, v in (
                    ("ImagePositionPatient", pos),
                    ("ImageOrientationPatient", ori),
                    ("PixelSpacing", ps),
                )
                if v is None
            ]
            raise _err(
                "missing_attribute",
                f"File {name!r} lacks {', '.join(missing)}; the slice cannot be placed in the "
                "volume. Re-export the series with its geometry.",
            )
    slope = _float_or(ds.get("RescaleSlope"), 1.0)
    intercept = _float_or(ds.get("RescaleIntercept"), 0.0)
    return [
        _Slice(
            name,
            None,
            series,
            np.array(pos, dtype=np.float64),
            tuple(float(v) for v in ori),
            info.rows,
            info.cols,
            ps,
            slope,
            intercept,
            localizer,
            (*tie, 0),
        )
    ]


def _geometry_key(s: _Slice) -> tuple[Any, ...]:
    return (
        tuple(round(v, 3) for v in s.orientation),
        s.rows,
        s.cols,
        tuple(round(v, 4) for v in s.pixel_spacing),
    )


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    n = np.cross(row, col)  # (3,) slice normal
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        return np.array([0.0, 0.0, 1.0])
    n = n / norm
    # inferior -> superior: +z in the patient (LPS) frame; flip a normal that points down
    if n[2] < -1e-6 or (abs(n[2]) <= 1e-6 and n.sum() < 0):
        n = -n
    return n


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _scan_ct(
    folder: str | os.PathLike[str],
    *,
    max_bytes: int,
    max_gap_factor: float,
    spacing_tolerance: float,
    max_tilt_deg: float,
) -> _Scan:
    root = Path(folder)
    if not root.exists():
        raise _err(
            "not_found",
            "The CT series folder does not exist; check the manifest path (relative paths "
            "resolve against the manifest's folder).",
        )
    entries = _list_files(root)
    if not entries:
        raise _err("empty_series", "The CT series folder holds no files; re-export the series.")
    skipped: Counter[str] = Counter()
    files: dict[str, tuple[Dataset, _PixelInfo]] = {}
    slices: list[_Slice] = []
    modalities: Counter[str] = Counter()
    for path, name in entries:
        try:
            ds = _read(path, name, max_bytes=max_bytes)
        except DicomError as e:
            if e.reason == "not_dicom":
                skipped["non-DICOM file"] += 1
                continue
            raise
        if _PIXEL_DATA not in ds:
            if _is_image_object(ds):
                raise _err(
                    "truncated",
                    f"File {name!r} is an image object that ends before its pixel data "
                    "(truncated copy); re-copy or re-export the series.",
                )
            skipped["non-image object"] += 1
            continue
        modality = str(ds.get("Modality", "")).upper() or "unknown"
        modalities[modality] += 1
        if modality != "CT":
            skipped[f"non-CT ({modality}) image"] += 1
            continue
        try:
            info = _check_pixels(ds, name, max_bytes=max_bytes)
        except DicomError as e:
            if e.reason == "color_image":
                skipped["colour image"] += 1
                continue
            raise
        files[name] = (ds, info)
        slices.extend(_slices_of(ds, name, info))

    warn: list[str] = []
    n_local = sum(s.localizer for s in slices)
    slices = [s for s in slices if not s.localizer]
    if not slices:
        what = ", ".join(f"{_plural(n, k)}" for k, n in sorted(skipped.items()))
        if n_local:
            what = ", ".join(x for x in (what, _plural(n_local, "localizer")) if x)
        if skipped and set(skipped) == {"non-DICOM file"}:
            raise _err(
                "not_dicom",
                f"None of the {len(entries)} files in the CT series folder is DICOM; point the "
                "manifest at the folder that holds the series.",
            )
        raise _err(
            "no_image_series",
            f"The folder holds no CT image series (found: {what or 'nothing usable'}); point the "
            "manifest at the folder of the axial CT series.",
        )

    # group by series, then keep each series' majority geometry: other orientations are scouts
    by_series: dict[str, list[_Slice]] = {}
    for s in slices:
        by_series.setdefault(s.series, []).append(s)
    candidates: list[list[_Slice]] = []
    n_off_orient = n_other_size = 0
    for group in by_series.values():
        keys = Counter(_geometry_key(s) for s in group)
        best = max(keys.items(), key=lambda kv: (kv[1], kv[0]))[0]
        keep = [s for s in group if _geometry_key(s) == best]
        for s in group:
            k = _geometry_key(s)
            if k != best:
                if k[0] != best[0]:
                    n_off_orient += 1
                else:
                    n_other_size += 1
        candidates.append(keep)
    n_local += n_off_orient
    candidates.sort(key=lambda g: -len(g))
    if len(candidates) > 1:
        if len(candidates[0]) == len(candidates[1]):
            sizes = ", ".join(str(len(g)) for g in candidates)
            raise _err(
                "multiple_series",
                f"The folder holds {len(candidates)} CT series with equally many slices "
                f"({sizes}); the choice is ambiguous. Put each series in its own folder and "
                "list the one to use in the manifest.",
            )
        ignored = sum(len(g) for g in candidates[1:])
        warn.append(
            f"folder holds {len(candidates)} CT series: used the largest "
            f"({len(candidates[0])} slices), ignored {_plural(ignored, 'slice')}"
        )
    chosen = candidates[0]
    if n_local:
        warn.append(f"skipped {_plural(n_local, 'localizer')}")
    if n_other_size:
        warn.append(f"skipped {_plural(n_other_size, 'slice')} with a different size or spacing")
    for what, n in sorted(skipped.items()):
        warn.append(f"skipped {_plural(n, what)}")

    # order by position along the slice normal (never InstanceNumber or file name)
    orientation = chosen[0].orientation
    normal = _normal(orientation)
    for s in chosen:
        s.d = float(s.position @ normal)
    chosen.sort(key=lambda s: (s.d, s.tie))
    ps = chosen[0].pixel_spacing
    tol = max(1e-3, 1e-3 * min(ps))
    deduped: list[_Slice] = []
    for s in chosen:
        if deduped and abs(s.d - deduped[-1].d) <= tol:
            continue  # same position: keep the first by (acquisition, instance, SOP UID)
        deduped.append(s)
    n_dup = len(chosen) - len(deduped)
    if n_dup:
        warn.append(f"{_plural(n_dup, 'duplicate slice')} removed")
    if len(deduped) < 2:
        raise _err(
            "empty_series",
            f"The CT series has {len(deduped)} usable slice(s); a volume needs at least 2. "
            "Re-export the complete series.",
        )

    d = np.array([s.d for s in deduped])
    gaps = np.diff(d)  # (S-1,) mm between neighbours
    dz = float(np.median(gaps))
    worst = int(np.argmax(gaps))
    if gaps[worst] > max_gap_factor * dz:
        missing = round(gaps[worst] / dz) - 1
        raise _err(
            "missing_slices",
            f"The CT series has a gap of {gaps[worst]:.2f} mm between {deduped[worst].name!r} "
            f"and {deduped[worst + 1].name!r} (median spacing {dz:.2f} mm): about "
            f"{_plural(max(missing, 1), 'slice')} missing. Re-export the complete series (to "
            f"stack it anyway, raise max_gap_factor, now {max_gap_factor}, and "
            "spacing_tolerance).",
        )
    dev = np.abs(gaps - dz) / dz
    if float(dev.max()) > spacing_tolerance:
        i = int(np.argmax(dev))
        raise _err(
            "nonuniform_spacing",
            f"The CT series has non-uniform slice spacing: {gaps[i]:.3f} mm between "
            f"{deduped[i].name!r} and {deduped[i + 1].name!r} vs a median of {dz:.3f} mm "
            f"(tolerance {spacing_tolerance:.0%}). Re-export with a constant slice increment, "
            "or raise spacing_tolerance.",
        )
    if float(dev.max()) > 0.01:
        warn.append(f"slice spacing varies by up to {float(dev.max()):.1%} of {dz:.3f} mm")

    # gantry tilt: slice centres advance along a direction that is not the normal
    step = deduped[-1].position - deduped[0].position
    tilt = math.degrees(
        math.acos(min(1.0, abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-9)))
    )
    if tilt > max_tilt_deg:
        raise _err(
            "gantry_tilt",
            f"The CT series is acquired with a gantry tilt of {tilt:.1f} degrees (limit "
            f"{max_tilt_deg}); reslice it to an untilted grid first, or raise max_tilt_deg.",
        )
    if tilt > 0.5:
        warn.append(
            f"gantry tilt {tilt:.1f} degrees: slices stacked along the normal without shear "
            "correction"
        )
    if abs(normal[2]) < 0.9:
        warn.append("series is not axial: slices stacked along their own normal")
    used = {s.name for s in deduped}
    return _Scan(
        slices=deduped,
        files={k: v for k, v in files.items() if k in used},
        spacing=(dz, float(ps[0]), float(ps[1])),
        orientation=tuple(float(v) for v in orientation),
        warnings=warn,
    )


def _slice_record(s: _Slice, info: _PixelInfo, ds: Dataset) -> dict[str, Any]:
    return {
        "frame": s.frame,
        "position": [_r(v) for v in s.position],
        "orientation": [_r(v, 6) for v in s.orientation],
        "pixel_spacing": [_r(v, 6) for v in s.pixel_spacing],
        "rows": s.rows,
        "cols": s.cols,
        "slope": _r(s.slope, 8),
        "intercept": _r(s.intercept, 6),
        **_pixel_format(ds, info),
    }


def _read_ct(
    folder: str | os.PathLike[str],
    *,
    max_bytes: int,
    max_gap_factor: float,
    spacing_tolerance: float,
    max_tilt_deg: float,
    decode: bool,
    hash_pixels: bool = True,
) -> tuple[CTVolume | None, str]:
    scan = _scan_ct(
        folder,
        max_bytes=max_bytes,
        max_gap_factor=max_gap_factor,
        spacing_tolerance=spacing_tolerance,
        max_tilt_deg=max_tilt_deg,
    )
    s_count, rows, cols = len(scan.slices), scan.slices[0].rows, scan.slices[0].cols
    out_bytes = s_count * rows * cols * 4
    if decode and out_bytes > max_bytes:
        raise _err(
            "too_large",
            f"The CT series would decode to {s_count} x {rows} x {cols} float32 = {out_bytes} "
            f"bytes, over the limit of {max_bytes}; raise max_bytes if it is genuine.",
        )
    h = _hash_init("CTPA")
    digests: dict[str, str] = {}
    hu = np.empty((s_count, rows, cols), dtype=np.float32) if decode else None  # (S, H, W)
    # one read per file; slices of an enhanced file are filled from the same decode
    where: dict[str, list[tuple[int, _Slice]]] = {}
    for k, s in enumerate(scan.slices):
        where.setdefault(s.name, []).append((k, s))
    for name, placed in where.items():
        ds, info = scan.files[name]
        raw = _raw_pixel_bytes(ds, name, info)
        digests[name] = hashlib.sha256(raw).hexdigest() if hash_pixels else ""
        del raw
        if hu is None:
            ds.PixelData = None  # drop the bytes: hashing holds one file at a time
            continue
        if placed[0][1].frame is None:
            frames: Iterator[tuple[int, np.ndarray]] = iter(
                [(placed[0][0], _decode(ds, name, None))]
            )
        else:
            frame_to_k = {s.frame: k for k, s in placed}
            wanted = sorted(frame_to_k)
            frames = (
                (frame_to_k[f], arr)
                for f, arr in zip(wanted, _iter_frames(ds, name, wanted), strict=True)
            )
        for k, arr in frames:
            s = scan.slices[k]
            if arr.shape != (rows, cols):
                raise _err(
                    "corrupt_pixel_data",
                    f"File {name!r} decoded to shape {arr.shape}, not the declared "
                    f"({rows}, {cols}); re-export it.",
                )
            # rescale per slice (and per frame): slopes and intercepts may differ
            hu[k] = arr.astype(np.float32) * np.float32(s.slope) + np.float32(s.intercept)
        ds.PixelData = None  # drop the bytes: memory stays one volume plus one file
    for s in scan.slices:
        ds, info = scan.files[s.name]
        h.update(json.dumps(_slice_record(s, info, ds), sort_keys=True).encode())
        h.update(digests[s.name].encode())
    first = scan.slices[0]
    vol = (
        CTVolume(
            hu=hu,
            spacing=scan.spacing,
            origin=tuple(float(v) for v in first.position),
            orientation=scan.orientation,
            n_files=len(where),
            warnings=tuple(scan.warnings),
        )
        if hu is not None
        else None
    )
    return vol, h.hexdigest()


def read_ct_series(
    folder: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_gap_factor: float = 1.5,
    spacing_tolerance: float = 0.1,
    max_tilt_deg: float = 5.0,
) -> CTVolume:
    """Read the CT series in ``folder`` (or one enhanced multi-frame file) into HU.

    Files are grouped by SeriesInstanceUID; localizers, other orientations, non-image objects and
    non-DICOM files are skipped (counted in ``warnings``); slices are sorted by their position on
    the slice normal, duplicates dropped, gaps over ``max_gap_factor`` x the median spacing
    rejected (``missing_slices``), spacing deviating by more than ``spacing_tolerance`` rejected
    (``nonuniform_spacing``), a gantry tilt over ``max_tilt_deg`` rejected (``gantry_tilt``,
    smaller tilts are warned). Raises DicomError with a reason code from docs/DICOM.md.
    """
    vol, _ = _read_ct(
        folder,
        max_bytes=max_bytes,
        max_gap_factor=max_gap_factor,
        spacing_tolerance=spacing_tolerance,
        max_tilt_deg=max_tilt_deg,
        decode=True,
        hash_pixels=False,  # the key is not returned: skip hashing the pixel bytes
    )
    if vol is None:  # decode=True always builds it
        raise RuntimeError("internal error: vol was not set")
    return vol
