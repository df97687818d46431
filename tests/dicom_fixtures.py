"""Tiny DICOM writers for the dicom/preprocess tests (pydicom, seeded, offline).

Every file carries fake but identifying-looking patient tags (PHI below) so tests can check that
none of them leaks into errors, warnings or results.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

PHI = {
    "PatientName": "Doe^Janet^Q",
    "PatientID": "PID-7391-XQ",
    "PatientBirthDate": "19470312",
    "InstitutionName": "Saint Example Hospital",
    "InstitutionAddress": "12 Fictional Road, Nowhere",
    "AccessionNumber": "ACC-55519",
    "ReferringPhysicianName": "House^Gregory",
}

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_COUNTER = itertools.count()


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _base(sop_class: str, sop_uid: str, phi: dict[str, str] | None) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    for k, v in (PHI if phi is None else phi).items():
        setattr(ds, k, v)
    ds.StudyInstanceUID = _uid("study")
    return ds


def _pixels(ds: Dataset, stored: np.ndarray, signed: bool) -> None:
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = np.int16 if signed else np.uint16
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()


def ct_slice(
    stored: np.ndarray,
    *,
    position: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    series: str = "s1",
    instance: int = 1,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    phi: dict[str, str] | None = None,
) -> FileDataset:
    """One single-frame CT slice; ``stored`` (H, W) are stored values (HU = stored*slope+icpt)."""
    ds = _base(CTImageStorage, _uid(series, instance, tuple(position), next(_COUNTER)), phi)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = _uid("series", series)
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.ImageType = list(image_type)
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.SliceThickness = 2.5
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PhotometricInterpretation = "MONOCHROME2"
    _pixels(ds, stored, signed=True)
    return ds


def hu_volume(shape: tuple[int, int, int] = (6, 8, 10), seed: int = 0) -> np.ndarray:
    """A seeded integer-valued HU volume (S, H, W) in [-1000, 1000]."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1000, 1000, size=shape).astype(np.float32)


def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    *,
    dz: float = 2.5,
    z0: float = -50.0,
    names: Sequence[str] | None = None,
    slopes: Sequence[float] | None = None,
    intercept: float = -1024.0,
    series: str = "s1",
    instances: Sequence[int] | None = None,
    positions: Sequence[Sequence[float]] | None = None,
    **kw: object,
) -> list[Path]:
    """Write ``hu`` (S, H, W, inferior first) as one file per slice; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    n = hu.shape[0]
    names = list(names) if names is not None else [f"IM{k:04d}.dcm" for k in range(n)]
    slopes = list(slopes) if slopes is not None else [1.0] * n
    instances = list(instances) if instances is not None else list(range(1, n + 1))
    out = []
    for k in range(n):
        stored = np.rint((hu[k] - intercept) / slopes[k])
        pos = positions[k] if positions is not None else (-40.0, -30.0, z0 + k * dz)
        ds = ct_slice(
            stored,
            position=pos,
            slope=slopes[k],
            intercept=intercept,
            series=series,
            instance=instances[k],
            **kw,  # type: ignore[arg-type]
        )
        p = folder / names[k]
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def write_enhanced_ct(
    path: Path,
    hu: np.ndarray,
    *,
    order: Sequence[int],
    dz: float = 2.5,
    z0: float = -50.0,
    slopes: Sequence[float],
    intercepts: Sequence[float],
    pixel_spacing: Sequence[float] = (0.8, 0.7),
) -> Path:
    """Enhanced CT: frame i holds slice order[i] with its own rescale in per-frame groups."""
    ds = _base(EnhancedCTImageStorage, _uid("enhanced", str(path)), None)
    ds.Modality = "CT"
    ds.SeriesInstanceUID = _uid("series", "enh")
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = [float(v) for v in pixel_spacing]
    pm.SliceThickness = dz
    po = Dataset()
    po.ImageOrientationPatient = list(AXIAL)
    shared.PixelMeasuresSequence = DicomSequence([pm])
    shared.PlaneOrientationSequence = DicomSequence([po])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames, per_frame = [], []
    for i, k in enumerate(order):
        fg = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = [-40.0, -30.0, z0 + k * dz]
        fg.PlanePositionSequence = DicomSequence([pp])
        pvt = Dataset()
        pvt.RescaleSlope = slopes[i]
        pvt.RescaleIntercept = intercepts[i]
        pvt.RescaleType = "HU"
        fg.PixelValueTransformationSequence = DicomSequence([pvt])
        per_frame.append(fg)
        frames.append(np.rint((hu[k] - intercepts[i]) / slopes[i]))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _pixels(ds, np.stack(frames), signed=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def radiograph(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    pixel_spacing: Sequence[float] | None = None,
    imager_pixel_spacing: Sequence[float] | None = None,
    phi: dict[str, str] | None = None,
) -> FileDataset:
    """A DX 'for presentation' image with 12-bit unsigned stored values (H, W)."""
    ds = _base(DigitalXRayImageStorageForPresentation, _uid("dx", next(_COUNTER)), phi)
    ds.Modality = "DX"
    ds.SeriesInstanceUID = _uid("series", "dx")
    ds.PhotometricInterpretation = photometric
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    _pixels(ds, stored, signed=False)
    return ds


def write(ds: FileDataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
