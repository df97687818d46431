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
    MemoryGate,
    _check_pixels,
    _decode,
    _first,
    _float_or,
    _floats,
    _floats_raw,
    _is_image_object,
    _iter_frames,
    _list_files,
    _muted,
    _number,
    _PixelInfo,
    _raw_pixel_bytes,
    _read,
    _reserve,
)
from embedstore.errors import DicomError

__all__ = ["CTVolume", "StoredCT", "MISSING_RESCALE_POLICIES", "read_ct_series"]

#: What to do with CT slices that lack RescaleSlope/RescaleIntercept (docs/DICOM.md):
#: refuse (``missing_rescale``), or assume slope 1 with intercept -1024 or 0 (recorded in the
#: content hash and the study's warnings).
MISSING_RESCALE_POLICIES: dict[str, float | None] = {
    "refuse": None,
    "assume-1024": -1024.0,
    "assume-0": 0.0,
}


def _check_policy(policy: str) -> str:
    if policy not in MISSING_RESCALE_POLICIES:
        raise ValueError(
            f"Unknown missing_rescale policy {policy!r}; valid: {sorted(MISSING_RESCALE_POLICIES)}."
        )
    return policy


@dataclass(frozen=True, eq=False)
class CTVolume:
    """A CT series as Hounsfield units, slices ordered inferior -> superior along the normal."""

    hu: np.ndarray  # (S, H, W) float32 HU
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    origin: tuple[float, float, float]  # ImagePositionPatient of hu[0]
    orientation: tuple[float, ...]  # 6 direction cosines (row, column)
    n_files: int
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]

    def hu_slab(self, start: int, stop: int) -> np.ndarray:
        """HU of slices ``start:stop`` as float32 (S', H, W) (a view)."""
        return self.hu[start:stop]

    def geometry(self) -> dict[str, Any]:
        """JSON-ready geometry (no identifiers): shape, spacing, origin, orientation, files."""
        return {
            "shape": list(self.hu.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "orientation": list(self.orientation),
            "n_files": self.n_files,
        }


@dataclass(frozen=True, eq=False)
class StoredCT:
    """A CT series as its decoded stored values plus each slice's rescale: one array of the
    stored dtype (int16 for usual CT, half the bytes of float32 HU), filled slice by slice.
    HU = stored * slope + intercept in float32, per slice, exactly as ``CTVolume.hu``."""

    stored: np.ndarray  # (S, H, W) stored dtype (int16/uint16/int8/uint8)
    slopes: np.ndarray  # (S,) float32
    intercepts: np.ndarray  # (S,) float32
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    orientation: tuple[float, ...]
    n_files: int
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.stored.shape)  # type: ignore[return-value]

    def hu_slab(self, start: int, stop: int) -> np.ndarray:
        """HU of slices ``start:stop`` as a new float32 array (S', H, W)."""
        out = self.stored[start:stop].astype(np.float32)
        out *= self.slopes[start:stop, None, None]
        out += self.intercepts[start:stop, None, None]
        return out

    def geometry(self) -> dict[str, Any]:
        return {
            "shape": list(self.stored.shape),
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
    pixel_spacing: tuple[float, float]  # as stored: checked once the series is chosen
    slope: float | None  # None: absent (policy decides); NaN: not a number
    intercept: float | None
    localizer: bool
    tie: tuple[Any, ...]  # header-only tie-break for duplicates (independent of file names)
    d: float = 0.0  # position along the slice normal
    thickness: tuple[str, float] | None = None  # (attribute, value) of an invalid slice spacing
    rescale_assumed: str | None = None  # the missing_rescale policy that supplied the rescale


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
        top_slope = _number(ds.get("RescaleSlope"))
        top_intercept = _number(ds.get("RescaleIntercept"))
        for i, pf in enumerate(per_frames):
            pos_item = _fg_item(pf, shared, "PlanePositionSequence")
            ori_item = _fg_item(pf, shared, "PlaneOrientationSequence")
            pm_item = _fg_item(pf, shared, "PixelMeasuresSequence")
            pvt = _fg_item(pf, shared, "PixelValueTransformationSequence")
            ftype = _fg_item(pf, shared, "CTImageFrameTypeSequence")
            pos = _floats(pos_item.get("ImagePositionPatient") if pos_item else None, 3)
            ori = _floats(ori_item.get("ImageOrientationPatient") if ori_item else None, 6)
            ps = _floats_raw(pm_item.get("PixelSpacing") if pm_item else None, 2)
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
            slope = _number(pvt.get("RescaleSlope")) if pvt is not None else None
            intercept = _number(pvt.get("RescaleIntercept")) if pvt is not None else None
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
                    top_slope if slope is None else slope,
                    top_intercept if intercept is None else intercept,
                    frame_local,
                    (*tie, i),
                    thickness=_bad_thickness(pm_item, ds),
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
    ps = _floats_raw(ds.get("PixelSpacing"), 2)
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
            _number(ds.get("RescaleSlope")),
            _number(ds.get("RescaleIntercept")),
            localizer,
            (*tie, 0),
            thickness=_bad_thickness(ds),
        )
    ]


def _bad_thickness(*items: Dataset | None) -> tuple[str, float] | None:
    """The first SliceThickness / SpacingBetweenSlices present that is not a positive number."""
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        for item in items:
            value = _number(item.get(keyword)) if item is not None else None
            if value is not None:
                if not (math.isfinite(value) and value > 0):
                    return keyword, value
                break
    return None


def _check_chosen(chosen: list[_Slice], policy: str, warn: list[str]) -> None:
    """Spacing and rescale of the slices that form the volume (others are skipped anyway)."""
    for s in chosen:
        if not all(math.isfinite(v) and v > 0 for v in s.pixel_spacing):
            raise _err(
                "invalid_spacing",
                f"File {s.name!r} has PixelSpacing {list(s.pixel_spacing)}: pixel spacing must be "
                "positive and finite. Re-export the series with its real geometry.",
            )
        if s.thickness is not None:
            keyword, value = s.thickness
            raise _err(
                "invalid_spacing",
                f"File {s.name!r} has {keyword} {value}: it must be positive and finite. "
                "Re-export the series with its real geometry.",
            )
    missing = [s for s in chosen if s.slope is None or s.intercept is None]
    if missing:
        assumed = MISSING_RESCALE_POLICIES[policy]
        if assumed is None:
            raise _err(
                "missing_rescale",
                f"{_plural(len(missing), 'slice')} of {len(chosen)} (e.g. {missing[0].name!r}) "
                "lack RescaleSlope/RescaleIntercept, so their values are not known to be HU. "
                "Re-export the series with its rescale, or, if the scanner's convention is known, "
                "set missing_rescale to 'assume-1024' or 'assume-0' (extract --missing-rescale).",
            )
        for s in missing:
            s.slope = 1.0 if s.slope is None else s.slope
            s.intercept = assumed if s.intercept is None else s.intercept
            s.rescale_assumed = policy
        warn.append(
            f"{_plural(len(missing), 'slice')} without RescaleSlope/RescaleIntercept: assumed "
            f"slope 1, intercept {assumed:g} (missing_rescale={policy})"
        )
    for s in chosen:
        slope, intercept = float(s.slope or 0.0), float(s.intercept or 0.0)
        if not (math.isfinite(slope) and slope != 0 and math.isfinite(intercept)):
            raise _err(
                "invalid_rescale",
                f"File {s.name!r} has RescaleSlope {s.slope} and RescaleIntercept {s.intercept}: "
                "a zero or non-numeric slope maps every voxel to one value. Re-export the series.",
            )


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
    missing_rescale: str = "refuse",
) -> _Scan:
    _check_policy(missing_rescale)
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
    _check_chosen(chosen, missing_rescale, warn)
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
        "slope": _r(s.slope or 0.0, 8),
        "intercept": _r(s.intercept or 0.0, 6),
        **_pixel_format(ds, info),
        # only when a policy supplied the rescale, so other slices keep their hash
        **({"rescale_assumed": s.rescale_assumed} if s.rescale_assumed else {}),
    }


def _stored_dtype(files: dict[str, tuple[Dataset, _PixelInfo]]) -> Any:
    """The one integer dtype every used file decodes to, or None (then decode to float32 HU)."""
    kinds = {(info.bits, int(ds.PixelRepresentation)) for ds, info in files.values()}
    if len(kinds) != 1:
        return None
    bits, signed = kinds.pop()
    return {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}.get(
        (bits, signed)
    )


@_muted
def _read_ct(
    folder: str | os.PathLike[str],
    *,
    max_bytes: int,
    max_gap_factor: float,
    spacing_tolerance: float,
    max_tilt_deg: float,
    decode: bool,
    hash_pixels: bool = True,
    missing_rescale: str = "refuse",
    compact: bool = False,
    gate: MemoryGate | None = None,
) -> tuple[CTVolume | StoredCT | None, str]:
    """Scan, hash and (``decode``) read the series. ``compact``: a StoredCT (stored dtype, one
    array filled slice by slice) instead of a float32 HU CTVolume; ``gate`` is asked for the
    memory before the volume is allocated."""
    scan = _scan_ct(
        folder,
        max_bytes=max_bytes,
        max_gap_factor=max_gap_factor,
        spacing_tolerance=spacing_tolerance,
        max_tilt_deg=max_tilt_deg,
        missing_rescale=missing_rescale,
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
    stored_dtype = _stored_dtype(scan.files) if compact else None
    out_dtype = np.dtype(stored_dtype if stored_dtype is not None else np.float32)
    buf: np.ndarray | None = None  # (S, H, W): stored values (compact) or float32 HU
    if decode:
        # one volume + the largest file twice (its raw bytes and its decoded frames) + a slice
        biggest = max(info.expected for _, info in scan.files.values())
        need = s_count * rows * cols * out_dtype.itemsize + 2 * biggest + rows * cols * 8
        _reserve(gate, need, (s_count, rows, cols), "The CT series", scan.spacing)
        buf = np.empty((s_count, rows, cols), dtype=out_dtype)
    slopes = np.array([s.slope for s in scan.slices], dtype=np.float32)  # (S,)
    intercepts = np.array([s.intercept for s in scan.slices], dtype=np.float32)  # (S,)
    lo, hi = math.inf, -math.inf  # HU range seen, for the blank-image check
    # one read per file; slices of an enhanced file are filled from the same decode
    where: dict[str, list[tuple[int, _Slice]]] = {}
    for k, s in enumerate(scan.slices):
        where.setdefault(s.name, []).append((k, s))
    for name, placed in where.items():
        ds, info = scan.files[name]
        raw = _raw_pixel_bytes(ds, name, info)
        digests[name] = hashlib.sha256(raw).hexdigest() if hash_pixels else ""
        del raw
        if buf is None:
            ds.PixelData = None  # drop the bytes: hashing holds one file at a time
            continue
        if placed[0][1].frame is None:
            frames: Iterator[tuple[int, np.ndarray]] = iter(
                [(placed[0][0], _decode(ds, name, None, info))]
            )
        else:
            frame_to_k = {s.frame: k for k, s in placed}
            wanted = sorted(frame_to_k)
            frames = (
                (frame_to_k[f], arr)
                for f, arr in zip(wanted, _iter_frames(ds, name, wanted, info), strict=True)
            )
        for k, arr in frames:
            if arr.shape != (rows, cols):
                raise _err(
                    "corrupt_pixel_data",
                    f"File {name!r} decoded to shape {arr.shape}, not the declared "
                    f"({rows}, {cols}); re-export it.",
                )
            if stored_dtype is not None:
                if arr.dtype != buf.dtype and not np.can_cast(arr.dtype, buf.dtype):
                    raise _err(
                        "corrupt_pixel_data",
                        f"File {name!r} decoded to {arr.dtype} values, not the {buf.dtype} its "
                        "header declares; re-export it.",
                    )
                buf[k] = arr
                ends = np.float32(arr.min()) * slopes[k], np.float32(arr.max()) * slopes[k]
                ends = ends[0] + intercepts[k], ends[1] + intercepts[k]
            else:
                # rescale per slice (and per frame): slopes and intercepts may differ
                np.multiply(arr, slopes[k], out=buf[k], dtype=np.float32, casting="unsafe")
                buf[k] += intercepts[k]
                ends = buf[k].min(), buf[k].max()
            lo, hi = min(lo, float(min(ends))), max(hi, float(max(ends)))
            del arr
        ds.PixelData = None  # drop the bytes: memory stays one volume plus one file
    if buf is not None and lo == hi:
        raise _err(
            "blank_image",
            f"The CT series decoded to a constant volume ({lo:g} HU in every voxel): a blank "
            "image from a failed decoder or an empty export; re-export the series.",
        )
    for s in scan.slices:
        ds, info = scan.files[s.name]
        h.update(json.dumps(_slice_record(s, info, ds), sort_keys=True).encode())
        h.update(digests[s.name].encode())
    first = scan.slices[0]
    if buf is None:
        return None, h.hexdigest()
    common = dict(
        spacing=scan.spacing,
        origin=tuple(float(v) for v in first.position),
        orientation=scan.orientation,
        n_files=len(where),
        warnings=tuple(scan.warnings),
    )
    if stored_dtype is not None:
        return StoredCT(stored=buf, slopes=slopes, intercepts=intercepts, **common), h.hexdigest()
    return CTVolume(hu=buf, **common), h.hexdigest()


def read_ct_series(
    folder: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_gap_factor: float = 1.5,
    spacing_tolerance: float = 0.1,
    max_tilt_deg: float = 5.0,
    missing_rescale: str = "refuse",
) -> CTVolume:
    """Read the CT series in ``folder`` (or one enhanced multi-frame file) into HU.

    Files are grouped by SeriesInstanceUID; localizers, other orientations, non-image objects and
    non-DICOM files are skipped (counted in ``warnings``); slices are sorted by their position on
    the slice normal, duplicates dropped, gaps over ``max_gap_factor`` x the median spacing
    rejected (``missing_slices``), spacing deviating by more than ``spacing_tolerance`` rejected
    (``nonuniform_spacing``), a gantry tilt over ``max_tilt_deg`` rejected (``gantry_tilt``,
    smaller tilts are warned). Slices without RescaleSlope/Intercept follow ``missing_rescale``
    (``MISSING_RESCALE_POLICIES``). Raises DicomError with a reason code from docs/DICOM.md.
    """
    vol, _ = _read_ct(
        folder,
        max_bytes=max_bytes,
        max_gap_factor=max_gap_factor,
        spacing_tolerance=spacing_tolerance,
        max_tilt_deg=max_tilt_deg,
        decode=True,
        hash_pixels=False,  # the key is not returned: skip hashing the pixel bytes
        missing_rescale=missing_rescale,
    )
    if not isinstance(vol, CTVolume):  # decode=True without compact always builds one
        raise RuntimeError("internal error: vol was not set")
    return vol
