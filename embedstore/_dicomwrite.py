"""Writing DICOM (private; with embedstore/dicom/ the only pydicom user): the synthetic cohort
and DRRs rendered from CT (``write_dx``, used by ``embedstore drr``).

Only synthetic or pseudonymous identifiers ever reach these files: :class:`SyntheticPatient`
refuses any patient id that is not of the ``SYN-`` form, and ``write_dx`` takes nothing from a
source study but the pseudonymous patient id the manifest already holds (no name, dates, UIDs,
institution or device). UIDs come from ``pydicom.uid.generate_uid`` with a deterministic entropy
source, so the same inputs write byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from embedstore._fsio import atomic_path, atomic_write_bytes
from embedstore.errors import ConfigError

__all__ = [
    "SyntheticPatient",
    "synthetic_uid",
    "write_ct_series",
    "write_radiograph",
    "write_dx",
    "check_pseudonymous_id",
    "read_ct_series_hu",
    "read_radiograph",
]

_SYN_ID = re.compile(r"^SYN-\d{4,}$")
INSTITUTION = "embedstore synthetic"
MANUFACTURER = "embedstore phantom"
RADIOGRAPH_MAX = 4095  # 12 bits stored


@dataclass(frozen=True)
class SyntheticPatient:
    """Obviously fake demographics; ``patient_id`` must look like ``SYN-0001``."""

    patient_id: str
    sex: str  # "M" | "F"
    age: int
    site: str

    def __post_init__(self) -> None:
        if not _SYN_ID.match(self.patient_id):
            raise ConfigError(
                f"Synthetic patient ids must look like 'SYN-0001', got {self.patient_id!r}: "
                "the synthetic writer never writes other identifiers."
            )
        if self.sex not in ("M", "F"):
            raise ConfigError(f"Synthetic patient sex must be 'M' or 'F', got {self.sex!r}.")

    @property
    def name(self) -> str:
        return "SYNTHETIC^" + self.patient_id.split("-", 1)[1]


def synthetic_uid(*parts: object) -> str:
    """A valid, deterministic DICOM UID under pydicom's root from the given parts."""
    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient_study(ds: Dataset, patient: SyntheticPatient, when: datetime, study_uid: str,
                   description: str, study_id: str) -> None:
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = ""  # never a date of birth, not even a fake one
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{int(patient.age):03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = study_id
    ds.StudyDescription = description
    ds.InstitutionName = INSTITUTION
    ds.StationName = patient.site
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "phantom"
    ds.BodyPartExamined = "CHEST"


def _atomic_write(ds: Dataset, path: Path) -> None:
    # not fsync'ed: a synthetic cohort is regenerated, not recovered, after a power loss
    with atomic_path(path, durable=False) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def write_ct_series(
    folder: str | os.PathLike[str],
    hu: np.ndarray,
    *,
    spacing_mm: Sequence[float],
    patient: SyntheticPatient,
    when: datetime,
    uid_key: str,
    rescale_intercept: int = -1024,
) -> list[Path]:
    """Write an integer HU volume (S, H, W), slices inferior -> superior, one file per slice.

    File names are a hash of the slice key, so their lexical order is not the slice order: a
    reader must sort by ImagePositionPatient. Stored values are ``HU - rescale_intercept``.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3 or not np.issubdtype(hu.dtype, np.integer):
        raise ConfigError(f"write_ct_series needs an integer (S, H, W) HU volume, got {hu.dtype} {hu.shape}.")
    stored = hu.astype(np.int32) - int(rescale_intercept)  # (S, H, W)
    if stored.min() < -32768 or stored.max() > 32767:
        raise ConfigError(
            f"HU range [{hu.min()}, {hu.max()}] does not fit int16 with intercept {rescale_intercept}."
        )
    stored = stored.astype(np.int16)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sz, sy, sx = (float(s) for s in spacing_mm)
    ns, nr, nc = hu.shape
    x0 = -(nc - 1) / 2.0 * sx  # grid centred on the origin (the phantom's frame)
    y0 = -(nr - 1) / 2.0 * sy
    z0 = -(ns - 1) / 2.0 * sz
    study_uid = synthetic_uid(uid_key, "ctpa-study")
    series_uid = synthetic_uid(uid_key, "ctpa-series")
    for_uid = synthetic_uid(uid_key, "ctpa-frame")

    ds = Dataset()
    _patient_study(ds, patient, when, study_uid, "CTPA (synthetic phantom)", "1")
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDescription = "CTPA axial"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ContrastBolusAgent = "synthetic iodinated contrast"
    ds.KVP = 100
    ds.PatientPosition = "FFS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]  # rows along +x (left), columns along +y
    ds.PixelSpacing = [sy, sx]  # (row spacing, column spacing)
    ds.SliceThickness = sz
    ds.SpacingBetweenSlices = sz
    ds.Rows, ds.Columns = nr, nc
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1  # signed int16
    ds.RescaleIntercept = int(rescale_intercept)
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    paths: list[Path] = []
    for k in range(ns):
        sop_uid = synthetic_uid(uid_key, "ctpa-slice", k)
        ds.file_meta = _file_meta(CTImageStorage, sop_uid)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        z = z0 + k * sz
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), round(z, 4)]
        ds.SliceLocation = round(z, 4)
        ds.PixelData = stored[k].tobytes()
        name = hashlib.sha256(f"{uid_key}/slice/{k}".encode()).hexdigest()[:16] + ".dcm"
        p = folder / name
        _atomic_write(ds, p)
        paths.append(p)
    return paths


def write_radiograph(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    pixel_spacing_mm: float,
    patient: SyntheticPatient,
    when: datetime,
    uid_key: str,
    monochrome1: bool = False,
) -> Path:
    """Write a 12-bit PA radiograph given in MONOCHROME2 sense (bright = dense).

    MONOCHROME2 files are DX (For Presentation); MONOCHROME1 files are CR with stored values
    ``4095 - image`` and the window centre mirrored, so a reader that inverts MONOCHROME1
    recovers exactly ``image``.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint16 or int(img.max(initial=0)) > RADIOGRAPH_MAX:
        raise ConfigError(
            f"write_radiograph needs a (H, W) uint16 image in [0, {RADIOGRAPH_MAX}], got "
            f"{img.dtype} {img.shape}."
        )
    stored = (RADIOGRAPH_MAX - img).astype(np.uint16) if monochrome1 else img
    sop_class = ComputedRadiographyImageStorage if monochrome1 else DigitalXRayImageStorageForPresentation
    sop_uid = synthetic_uid(uid_key, "cxr-image")
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    _patient_study(ds, patient, when, synthetic_uid(uid_key, "cxr-study"),
                   "Chest PA (synthetic DRR)", "2")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CR" if monochrome1 else "DX"
    ds.SeriesInstanceUID = synthetic_uid(uid_key, "cxr-series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    ds.ImagerPixelSpacing = [float(pixel_spacing_mm), float(pixel_spacing_mm)]
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    lo, hi = np.percentile(img, [1.0, 99.0])
    center = float(round((lo + hi) / 2.0))
    ds.WindowCenter = (RADIOGRAPH_MAX - center) if monochrome1 else center
    ds.WindowWidth = float(max(round(hi - lo), 1))
    if not monochrome1:
        ds.PresentationLUTShape = "IDENTITY"  # required by the DX IOD for MONOCHROME2
    ds.PixelData = stored.tobytes()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(ds, p)
    return p


# A pseudonymous id from a manifest (``anon-<hex>``, ``SYN-0001``, ...): short, no spaces, no
# carets (a DICOM person name), so a real name or a free-text value cannot pass for one.
_PSEUDONYM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_pseudonymous_id(value: str, what: str) -> str:
    """``value`` if it looks like a pseudonymous id (1-64 of ``A-Z a-z 0-9 . _ -``), else
    ConfigError (the message does not repeat the value: it may be identifying)."""
    if not isinstance(value, str) or not _PSEUDONYM.match(value):
        raise ConfigError(
            f"The {what} is not a pseudonymous id (1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit); only pseudonymised manifests can be rendered. "
            "Import the cohort with `embedstore manifest import-*`, which pseudonymises ids."
        )
    return value


def write_dx(
    path: str | os.PathLike[str],
    image: np.ndarray,
    *,
    pixel_spacing_mm: float,
    patient_id: str,
    uid_key: str,
    view: str = "AP",
    derivation: str = "DRR: parallel projection of a CT series",
) -> Path:
    """Write a 12-bit frontal DX (For Presentation, MONOCHROME2) derived from another study.

    ``image`` is (H, W) uint16 in [0, 4095], display orientation (top = superior, image left =
    patient right), bright = dense. Identifying attributes are present but empty (type 2) or
    absent; the patient id is the manifest's pseudonym (checked by ``check_pseudonymous_id``);
    UIDs derive from ``uid_key``. PixelSpacing and ImagerPixelSpacing are both
    ``pixel_spacing_mm`` (a parallel projection has no magnification). Written atomically
    (temp + fsync + rename): a file that exists is complete.
    """
    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint16 or int(img.max(initial=0)) > RADIOGRAPH_MAX:
        raise ConfigError(
            f"write_dx needs a (H, W) uint16 image in [0, {RADIOGRAPH_MAX}], got "
            f"{img.dtype} {img.shape}."
        )
    if not (float(pixel_spacing_mm) > 0 and np.isfinite(pixel_spacing_mm)):
        raise ConfigError(f"write_dx: pixel_spacing_mm must be positive, got {pixel_spacing_mm!r}.")
    if view not in ("AP", "PA"):
        raise ConfigError(f"write_dx: view must be 'AP' or 'PA', got {view!r}.")
    check_pseudonymous_id(patient_id, "patient id")
    sop_class = DigitalXRayImageStorageForPresentation
    sop_uid = synthetic_uid(uid_key, "dx-image")
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    # patient / study: the pseudonym only; type 2 attributes present and empty
    ds.PatientName = ""
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "embedstore: derived image; only the pseudonymous patient id kept"
    ds.StudyInstanceUID = synthetic_uid(uid_key, "dx-study")
    ds.StudyDate = ""  # the acquisition time lives in the manifest (acquired_at), not here
    ds.StudyTime = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.StudyDescription = "Chest frontal DRR (derived from CT)"
    ds.Manufacturer = "embedstore"
    ds.ManufacturerModelName = "drr"
    ds.BodyPartExamined = "CHEST"
    ds.Modality = "DX"
    ds.SeriesInstanceUID = synthetic_uid(uid_key, "dx-series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = derivation
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"]  # rows run to the patient's left, columns to the feet
    sp = float(pixel_spacing_mm)
    ds.PixelSpacing = [sp, sp]
    ds.ImagerPixelSpacing = [sp, sp]
    ds.Rows, ds.Columns = img.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    lo, hi = np.percentile(img, [1.0, 99.0])
    ds.WindowCenter = float(round((lo + hi) / 2.0))
    ds.WindowWidth = float(max(round(hi - lo), 1))
    ds.PresentationLUTShape = "IDENTITY"  # required by the DX IOD for MONOCHROME2
    ds.PixelData = img.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, buf.getvalue())
    return p


def read_ct_series_hu(folder: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read back a series this module wrote: (S, H, W) float32 HU sorted by z, and the z's (S,).

    A minimal reader for previews and tests; the general reader with validation is embedstore.dicom.
    """
    slices = []
    for p in sorted(Path(folder).glob("*.dcm")):
        ds = pydicom.dcmread(p)
        z = float(ds.ImagePositionPatient[2])  # sort by position, never by file name
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        slices.append((z, hu))
    slices.sort(key=lambda s: s[0])
    return np.stack([s[1] for s in slices]), np.array([s[0] for s in slices])


def read_radiograph(path: str | os.PathLike[str]) -> np.ndarray:
    """Read back a radiograph this module wrote, in MONOCHROME2 sense: (H, W) uint16."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.int32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = (2 ** int(ds.BitsStored) - 1) - arr  # MONOCHROME1: bright = low values
    return arr.astype(np.uint16)
