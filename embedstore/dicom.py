"""DICOM reading: CT series -> HU volume, radiograph -> [0, 1] image, content hashing, pseudonyms.

This is the only embedstore module that imports pydicom (besides the synthetic-cohort writer).
Every read is validated before any pixel buffer is allocated, every failure is a DicomError with a
reason code (docs/DICOM.md), and no message, warning or returned object carries a DICOM value that
could identify a patient: files are named by their path inside the study folder, nothing else.

pydicom's own warnings and log records are captured during reads (its messages can echo tag values);
the capture uses ``warnings.catch_warnings``, which is process-global, so call these readers from
worker processes rather than from several threads at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder, iter_pixels, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from embedstore.errors import DicomError

__all__ = [
    "DEFAULT_MAX_BYTES",
    "PUBLIC_SYNTHETIC_KEY",
    "REASONS",
    "CTVolume",
    "Radiograph",
    "read_ct_series",
    "read_radiograph",
    "read_study",
    "content_hash",
    "source_signature",
    "pseudonymise",
    "load_pseudonym_key",
]

#: Cap on the declared pixel bytes of one file, and on the float32 HU volume of one series.
DEFAULT_MAX_BYTES: int = 1 << 30
#: Documented public key for the synthetic cohort only: pseudonyms made with it are NOT secret.
PUBLIC_SYNTHETIC_KEY: bytes = b"embedstore-public-synthetic-cohort-key-v1"
#: Version of what content_hash covers; bump it when the hashed attributes change.
CONTENT_HASH_VERSION = 1

#: Every reason code DicomError carries from this module (documented in docs/DICOM.md).
REASONS: tuple[str, ...] = (
    "not_found",
    "not_dicom",
    "truncated",
    "missing_attribute",
    "too_large",
    "unsupported_transfer_syntax",
    "corrupt_pixel_data",
    "no_pixel_data",
    "color_image",
    "no_image_series",
    "multiple_series",
    "missing_slices",
    "nonuniform_spacing",
    "gantry_tilt",
    "empty_series",
    "no_pseudonym_key",
    "bad_pseudonym_key",
)

_KEY_ENV = "EMBEDSTORE_PSEUDONYM_KEY"
_KEY_FILE_ENV = "EMBEDSTORE_PSEUDONYM_KEY_FILE"
_MIN_KEY_BYTES = 16
_HEADER_SLACK = 16 << 20  # a file may exceed its pixel bytes by this much (header, overlays)
_DEFER = 4096  # elements longer than this are read from disk only when accessed
_PIXEL_DATA = 0x7FE00010
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TRUNCATION_WARNING = re.compile(r"end of file|\beof\b|truncat|fewer bytes", re.IGNORECASE)

# pip packages that decode each compressed transfer syntax (pydicom picks them up automatically).
_JPEG = "pylibjpeg pylibjpeg-libjpeg (or pillow for 8-bit baseline)"
_J2K = "pylibjpeg pylibjpeg-openjpeg (or pillow)"
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}


# --------------------------------------------------------------------------------------------
# public results


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


@dataclass(frozen=True, eq=False)
class Radiograph:
    """A projection radiograph in [0, 1], MONOCHROME2 sense (bright = dense)."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1]
    spacing: tuple[float, float] | None  # (dy, dx) mm
    spacing_source: str  # "PixelSpacing" | "ImagerPixelSpacing" | "none"
    photometric: str  # as stored: MONOCHROME1 | MONOCHROME2 | PNG
    warnings: tuple[str, ...] = ()

    def geometry(self) -> dict[str, Any]:
        """JSON-ready geometry (no identifiers)."""
        return {
            "shape": list(self.pixels.shape),
            "spacing": list(self.spacing) if self.spacing else None,
            "spacing_source": self.spacing_source,
            "photometric": self.photometric,
        }


# --------------------------------------------------------------------------------------------
# low-level reading


def _err(reason: str, message: str) -> DicomError:
    return DicomError(message, reason=reason)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Capture pydicom's warnings and silence its logger: its messages can echo tag values."""
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        logger.disabled = was_disabled


def _truncation_warned(caught: list[warnings.WarningMessage]) -> bool:
    return any(_TRUNCATION_WARNING.search(str(w.message)) for w in caught)


def _file_size(path: Path, name: str) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise _err("not_found", f"File {name!r} cannot be read ({type(e).__name__}).") from None


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return UID(str(ts))
    # a dataset read without file meta: the encoding pydicom detected is the transfer syntax
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _looks_like_raw_dataset(head: bytes) -> bool:
    """First tag of a DICOM dataset without preamble: group 0002 or 0008, either endianness."""
    return head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def _plausible_image(ds: Dataset) -> bool:
    try:
        return (
            len(ds) >= 5
            and all(k in ds for k in ("Rows", "Columns", "BitsAllocated"))
            and int(ds.Rows) > 0
            and int(ds.Columns) > 0
            and int(ds.BitsAllocated) in (1, 8, 16, 32, 64)
        )
    except Exception:  # a forced parse of junk can raise anything on value conversion
        return False


def _read(path: Path, name: str, *, max_bytes: int) -> Dataset:
    """Parse one file; pixel data stays on disk (deferred) unless it is encapsulated."""
    size = _file_size(path, name)
    if size == 0:
        raise _err("not_dicom", f"File {name!r} is empty, not DICOM.")
    if size > max_bytes + _HEADER_SLACK:
        raise _err(
            "too_large",
            f"File {name!r} is {size} bytes, over the limit of {max_bytes} pixel bytes; "
            "raise max_bytes if this image is genuine.",
        )
    with open(path, "rb") as f:
        head = f.read(132)
    has_magic = head[128:132] == b"DICM"
    with _quiet() as caught:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except InvalidDicomError:
            ds = None
        except Exception as e:  # pydicom raises many types on malformed input
            # pydicom's message can contain element values: keep only the type
            reason = "truncated" if has_magic else "not_dicom"
            raise _err(
                reason,
                f"File {name!r} could not be parsed as DICOM ({type(e).__name__}); "
                "check that it is a complete DICOM file.",
            ) from None
        if ds is None:
            # no preamble/'DICM': allowed only when it parses into a plausible image
            ds = _forced_read(path, name, head)
    if _truncation_warned(caught):
        raise _err(
            "truncated",
            f"File {name!r} ends before its data does (truncated copy); re-copy or re-export it.",
        )
    if has_magic and len(ds) == 0:
        raise _err(
            "truncated",
            f"File {name!r} holds only its file meta header (truncated copy); re-copy it.",
        )
    ds.file_meta.TransferSyntaxUID = _transfer_syntax(ds)
    return ds


def _forced_read(path: Path, name: str, head: bytes) -> Dataset:
    junk = _err(
        "not_dicom",
        f"File {name!r} is not DICOM (no 'DICM' header and no readable image dataset); "
        "remove it from the study or point the manifest at the right file.",
    )
    if not _looks_like_raw_dataset(head):
        raise junk
    try:
        ds = pydicom.dcmread(path, force=True, defer_size=_DEFER)
    except Exception:
        raise junk from None
    if not _plausible_image(ds):
        raise junk
    return ds


def _sop_class(ds: Dataset) -> UID | None:
    uid = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    return UID(str(uid)) if uid else None


def _is_image_object(ds: Dataset) -> bool:
    uid = _sop_class(ds)
    return "Rows" in ds or (uid is not None and "Image Storage" in uid.name)


def _int_attr(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is not None:
            return default
        raise _err(
            "missing_attribute",
            f"File {name!r} lacks the required attribute {keyword}; it is not a usable image.",
        )
    try:
        return int(value)
    except (TypeError, ValueError):
        raise _err(
            "missing_attribute",
            f"File {name!r} has an unusable {keyword} (not an integer); re-export the image.",
        ) from None


@dataclass(frozen=True)
class _PixelInfo:
    rows: int
    cols: int
    frames: int
    bits: int
    expected: int  # declared pixel bytes
    ts: UID


def _check_pixels(ds: Dataset, name: str, *, max_bytes: int) -> _PixelInfo:
    """Validate the Image Pixel module and the PixelData length without reading pixels."""
    rows = _int_attr(ds, "Rows", name)
    cols = _int_attr(ds, "Columns", name)
    bits = _int_attr(ds, "BitsAllocated", name)
    _int_attr(ds, "BitsStored", name)
    _int_attr(ds, "PixelRepresentation", name)
    samples = _int_attr(ds, "SamplesPerPixel", name, default=1)
    frames = _int_attr(ds, "NumberOfFrames", name, default=1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise _err(
            "missing_attribute",
            f"File {name!r} lacks PhotometricInterpretation; it is not a usable image.",
        )
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise _err(
            "color_image",
            f"File {name!r} is a {photometric} image with {samples} sample(s) per pixel; only "
            "greyscale (MONOCHROME1/MONOCHROME2) images are supported. Use the original "
            "greyscale acquisition, not a colour or palette rendering.",
        )
    if rows < 1 or cols < 1 or frames < 1 or bits not in (8, 16, 32):
        raise _err(
            "missing_attribute",
            f"File {name!r} declares an impossible image ({rows} x {cols}, {frames} frame(s), "
            f"{bits} bits allocated); re-export it.",
        )
    # compare the declared size with the cap BEFORE anything is decoded or allocated
    expected = rows * cols * frames * (bits // 8)
    if expected > max_bytes:
        raise _err(
            "too_large",
            f"File {name!r} declares {rows} x {cols} x {frames} frame(s) x {bits} bits = "
            f"{expected} bytes of pixels, over the limit of {max_bytes}; raise max_bytes if "
            "this image is genuine.",
        )
    ts = _transfer_syntax(ds)
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            packages = _DECODER_PACKAGES.get(str(ts))
            fix = (
                f"pip install {packages}"
                if packages
                else "decompress it first (e.g. dcmdjpeg, gdcmconv --raw)"
            )
            raise _err(
                "unsupported_transfer_syntax",
                f"File {name!r} uses transfer syntax '{ts.name}' ({ts}) and no installed "
                f"package decodes it: {fix}.",
            )
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise _err("no_pixel_data", f"File {name!r} has no pixel data.")
    length = getattr(elem, "length", None)
    if elem.value is None and length == 0xFFFFFFFF:
        # deferred encapsulated data: pydicom already walked it to its delimiter (a truncated
        # one warns during dcmread); its length is checked when it is read
        length = None
    elif elem.value is None and length is not None:
        # deferred, defined length: the bytes must really be in the file
        tell = getattr(elem, "value_tell", 0) or 0
        size = _file_size(Path(ds.filename), name) if ds.filename else None
        if size is not None and tell + length > size:
            raise _err(
                "truncated",
                f"File {name!r} is truncated: its pixel data needs {length} bytes but the file "
                f"ends {tell + length - size} bytes early; re-copy or re-export it.",
            )
    else:
        length = len(elem.value) if elem.value is not None else 0
    if length is None:
        pass
    elif not ts.is_encapsulated:
        if length < expected:
            raise _err(
                "truncated",
                f"File {name!r} holds {length} bytes of pixel data but its header declares "
                f"{expected}; the file is truncated or damaged, re-copy or re-export it.",
            )
    elif length == 0:
        raise _err("no_pixel_data", f"File {name!r} has empty encapsulated pixel data.")
    return _PixelInfo(rows, cols, frames, bits, expected, ts)


def _raw_pixel_bytes(ds: Dataset, name: str, info: _PixelInfo) -> bytes:
    """The stored PixelData bytes (read from disk if deferred), length-checked again."""
    with _quiet() as caught:
        try:
            data = ds.PixelData
        except Exception as e:
            raise _err(
                "truncated", f"File {name!r} could not be re-read ({type(e).__name__})."
            ) from None
    if data is None or _truncation_warned(caught):
        raise _err("truncated", f"File {name!r} changed or was cut while it was being read.")
    if info.ts.is_encapsulated and len(data) == 0:
        raise _err("no_pixel_data", f"File {name!r} has empty encapsulated pixel data.")
    if not info.ts.is_encapsulated and len(data) < info.expected:
        raise _err(
            "truncated",
            f"File {name!r} holds {len(data)} bytes of pixel data but its header declares "
            f"{info.expected}; re-copy or re-export it.",
        )
    return data


def _decode_failure(ds: Dataset, name: str, e: Exception) -> DicomError:
    ts = _transfer_syntax(ds)
    if ts.is_compressed and re.search(r"not support|unsupported", str(e), re.IGNORECASE):
        # an installed plugin exists but cannot handle this variant (e.g. 12-bit JPEG in pillow)
        packages = _DECODER_PACKAGES.get(str(ts), "a decoder plugin for it")
        return _err(
            "unsupported_transfer_syntax",
            f"File {name!r} uses transfer syntax '{ts.name}' ({ts}) in a variant the installed "
            f"decoders do not support: pip install {packages}.",
        )
    return _err(
        "corrupt_pixel_data",
        f"File {name!r}: pixel data could not be decoded ({type(e).__name__}); the file is "
        "damaged or its compressed stream is invalid, re-export it.",
    )


def _decode(ds: Dataset, name: str, index: int | None) -> np.ndarray:
    with _quiet():
        try:
            return pixel_array(ds, index=index)
        except Exception as e:
            raise _decode_failure(ds, name, e) from None


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in (value if isinstance(value, list | tuple) else list(value)))
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _float_or(value: Any, default: float) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def _path_name(path: Path) -> str:
    return path.name


# --------------------------------------------------------------------------------------------
# CT series


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


def _list_files(root: Path) -> list[tuple[Path, str]]:
    """All non-hidden files under root, sorted by their path inside it."""
    if root.is_file():
        return [(root, root.name)]
    out: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in filenames:
            if fn.startswith("."):
                continue  # OS metadata such as .DS_Store
            p = Path(dirpath) / fn
            out.append((p, p.relative_to(root).as_posix()))
    out.sort(key=lambda t: t[1])
    return out


def _first(seq: Any) -> Dataset | None:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


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


def _r(v: float, nd: int = 4) -> float:
    out = round(float(v), nd)
    return 0.0 if out == 0 else out  # no "-0.0" in the hash


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


def _pixel_format(ds: Dataset, info: _PixelInfo) -> dict[str, Any]:
    return {
        "ts": str(info.ts),
        "bits_allocated": info.bits,
        "bits_stored": int(ds.BitsStored),
        "high_bit": int(ds.get("HighBit", int(ds.BitsStored) - 1)),
        "pixel_representation": int(ds.PixelRepresentation),
        "photometric": str(ds.PhotometricInterpretation),
        "frames": info.frames,
    }


def _hash_init(modality: str) -> Any:
    h = hashlib.sha256()
    h.update(f"embedstore-content-v{CONTENT_HASH_VERSION}\0{modality}\0".encode())
    return h


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


def _iter_frames(ds: Dataset, name: str, indices: list[int]) -> Iterator[np.ndarray]:
    with _quiet():
        try:
            yield from iter_pixels(ds, indices=indices)
        except DicomError:
            raise
        except Exception as e:
            raise _decode_failure(ds, name, e) from None


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


# --------------------------------------------------------------------------------------------
# radiographs


def _read_png(
    path: Path, name: str, *, max_bytes: int, decode: bool
) -> tuple[Radiograph | None, str]:
    from PIL import Image

    data = path.read_bytes()
    h = _hash_init("CXR")
    h.update(b"png\0")
    h.update(hashlib.sha256(data).digest())
    if not decode:
        return None, h.hexdigest()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        try:
            with Image.open(path) as opened:
                w, hgt = opened.size
                if w * hgt * 4 > max_bytes:  # checked before the pixels are decoded
                    raise _err(
                        "too_large",
                        f"File {name!r} declares {hgt} x {w} pixels, over the limit of "
                        f"{max_bytes} bytes; raise max_bytes if it is genuine.",
                    )
                opened.load()
                im = opened.copy()
        except DicomError:
            raise
        except Exception as e:
            raise _err(
                "truncated",
                f"File {name!r} is a PNG that could not be decoded ({type(e).__name__}); it is "
                "truncated or damaged, re-export it.",
            ) from None
    warn: list[str] = []
    mode = im.mode
    if mode in ("L", "LA"):
        arr = np.asarray(im.getchannel(0), dtype=np.float32) / 255.0  # (H, W)
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float32) / 65535.0  # (H, W) 16-bit grey
    elif mode == "1":
        arr = np.asarray(im, dtype=np.float32)
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(im.convert("RGB"))  # (H, W, 3)
        grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        if not grey:
            raise _err(
                "color_image",
                f"File {name!r} is a colour PNG ({mode}); only greyscale radiographs are supported.",
            )
        arr = rgb[..., 0].astype(np.float32) / 255.0
        warn.append("RGB PNG with identical channels read as grey")
    else:
        raise _err(
            "color_image",
            f"File {name!r} is a {mode} PNG (palette or colour); only greyscale radiographs are "
            "supported.",
        )
    rad = Radiograph(
        pixels=np.clip(arr, 0.0, 1.0).astype(np.float32),
        spacing=None,
        spacing_source="none",
        photometric="PNG",
        warnings=tuple(warn),
    )
    return rad, h.hexdigest()


def _lut_record(seq: Any) -> list[Any] | None:
    item = _first(seq)
    if item is None:
        return None
    lut = item.get("LUTData")
    raw = lut if isinstance(lut, bytes) else str(list(lut) if lut is not None else []).encode()
    return [list(item.get("LUTDescriptor", [])), hashlib.sha256(raw).hexdigest()]


def _str_values(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    try:
        return [str(v) for v in value] if not isinstance(value, str | int | float) else [str(value)]
    except TypeError:
        return [str(value)]


def _window(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """DICOM windowing (PS3.3 C.11.2.1.2) straight to [0, 1]; None when no usable window."""
    centers = _str_values(ds.get("WindowCenter"))
    widths = _str_values(ds.get("WindowWidth"))
    if not centers or not widths:
        return None
    c, w = _float_or(centers[0], math.nan), _float_or(widths[0], math.nan)
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    if func == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - c) / w))
    if func == "LINEAR_EXACT":
        return np.clip((arr - c) / w + 0.5, 0.0, 1.0)
    if w < 1:
        return None
    return np.clip((arr - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0) if w > 1 else (arr > c - 0.5) * 1.0


def _read_dicom_radiograph(
    path: Path, name: str, *, max_bytes: int, decode: bool
) -> tuple[Radiograph | None, str]:
    ds = _read(path, name, max_bytes=max_bytes)
    if _PIXEL_DATA not in ds:
        if _is_image_object(ds):
            raise _err(
                "truncated",
                f"File {name!r} is an image object that ends before its pixel data (truncated "
                "copy); re-copy or re-export it.",
            )
        raise _err(
            "no_pixel_data",
            f"File {name!r} is DICOM but holds no image (e.g. a report or presentation state); "
            "point the manifest at the radiograph itself.",
        )
    info = _check_pixels(ds, name, max_bytes=max_bytes)
    raw = _raw_pixel_bytes(ds, name, info)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    spacing: tuple[float, float] | None = None
    source = "none"
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        sp = _floats(ds.get(keyword), 2)
        if sp is not None and min(sp) > 0:
            spacing, source = (sp[0], sp[1]), keyword
            break
    record = {
        **_pixel_format(ds, info),
        "rows": info.rows,
        "cols": info.cols,
        "slope": _str_values(ds.get("RescaleSlope")),
        "intercept": _str_values(ds.get("RescaleIntercept")),
        "modality_lut": _lut_record(ds.get("ModalityLUTSequence")),
        "voi_lut": _lut_record(ds.get("VOILUTSequence")),
        "window_center": _str_values(ds.get("WindowCenter")),
        "window_width": _str_values(ds.get("WindowWidth")),
        "voi_function": _str_values(ds.get("VOILUTFunction")),
        "spacing": list(spacing) if spacing else None,
        "spacing_source": source,
    }
    h = _hash_init("CXR")
    h.update(json.dumps(record, sort_keys=True).encode())
    h.update(hashlib.sha256(raw).digest())
    if not decode:
        return None, h.hexdigest()
    warn: list[str] = []
    if info.frames > 1:
        warn.append(f"multi-frame radiograph ({info.frames} frames): used the first frame")
    stored = _decode(ds, name, 0 if info.frames > 1 else None)  # (H, W) stored values
    ds.PixelData = None
    if stored.shape != (info.rows, info.cols):
        raise _err(
            "corrupt_pixel_data",
            f"File {name!r} decoded to shape {stored.shape}, not ({info.rows}, {info.cols}).",
        )
    # order matters: modality LUT -> VOI -> MONOCHROME1 inversion -> [0, 1]
    with _quiet():
        try:
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
            voi: np.ndarray | None = None
            lut_item = _first(ds.get("VOILUTSequence"))
            if lut_item is not None and lut_item.get("LUTDescriptor"):
                bits = int(lut_item.LUTDescriptor[2]) or 16
                lut_in = np.rint(values).astype(np.int64)  # LUT indices must be integers
                voi = np.asarray(apply_voi(lut_in, ds), dtype=np.float64) / (2**bits - 1)
        except Exception as e:
            raise _err(
                "corrupt_pixel_data",
                f"File {name!r}: its modality or VOI LUT could not be applied "
                f"({type(e).__name__}); re-export it.",
            ) from None
    if voi is None:
        voi = _window(values, ds)
    if voi is None:
        lo, hi = float(values.min()), float(values.max())
        if hi > lo:
            voi = (values - lo) / (hi - lo)  # no window in the file: full range
        else:
            voi = np.zeros_like(values)
            warn.append("constant image")
        warn.append("no VOI window in the file: min-max scaled")
    out = np.clip(voi, 0.0, 1.0).astype(np.float32)  # (H, W)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1 stores dense = dark; the contract is bright = dense
    rad = Radiograph(
        pixels=out,
        spacing=spacing,
        spacing_source=source,
        photometric=photometric,
        warnings=tuple(warn),
    )
    return rad, h.hexdigest()


def _read_rad(
    path: str | os.PathLike[str], *, max_bytes: int, decode: bool
) -> tuple[Radiograph | None, str]:
    p = Path(path)
    name = _path_name(p)
    if not p.is_file():
        raise _err(
            "not_found",
            f"Radiograph file {name!r} does not exist or is not a file; check the manifest path.",
        )
    size = _file_size(p, name)
    with open(p, "rb") as f:
        head = f.read(8)
    if head == _PNG_MAGIC:
        if size > max_bytes + _HEADER_SLACK:
            raise _err(
                "too_large", f"File {name!r} is {size} bytes, over the limit of {max_bytes}."
            )
        return _read_png(p, name, max_bytes=max_bytes, decode=decode)
    return _read_dicom_radiograph(p, name, max_bytes=max_bytes, decode=decode)


def read_radiograph(
    path: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES
) -> Radiograph:
    """Read a CR/DX (or any 2D greyscale) DICOM file, or a PNG, into [0, 1] MONOCHROME2 sense.

    DICOM: modality LUT (rescale or LUT), then VOI (VOI LUT, else window, else min-max), then
    MONOCHROME1 inversion. PNG: grey levels divided by the bit-depth maximum. Raises DicomError.
    """
    rad, _ = _read_rad(path, max_bytes=max_bytes, decode=True)
    if rad is None:  # internal invariant
        raise RuntimeError("internal error: rad was not set")
    return rad


def _check_modality(modality: str) -> str:
    m = str(modality).upper()
    if m not in ("CXR", "CTPA"):
        raise ValueError(f"Unknown modality {modality!r}; expected 'CXR' or 'CTPA'.")
    return m


def read_study(
    path: str | os.PathLike[str], modality: str, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[CTVolume | Radiograph, str]:
    """Read a study once and return it with its content hash (equal to ``content_hash``)."""
    if _check_modality(modality) == "CTPA":
        vol, h = _read_ct(
            path,
            max_bytes=max_bytes,
            max_gap_factor=1.5,
            spacing_tolerance=0.1,
            max_tilt_deg=5.0,
            decode=True,
        )
        if vol is None:  # internal invariant
            raise RuntimeError("internal error: vol was not set")
        return vol, h
    rad, h = _read_rad(path, max_bytes=max_bytes, decode=True)
    if rad is None:  # internal invariant
        raise RuntimeError("internal error: rad was not set")
    return rad, h


def content_hash(
    path: str | os.PathLike[str], modality: str, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> str:
    """sha256 hex of what determines the decoded image, without decoding pixels.

    Covers the raw PixelData bytes and the attributes that change the decoded image (geometry,
    rescale, LUTs/window, photometric, pixel format, transfer syntax) of the slices that
    ``read_ct_series`` would use, in position order; never the path, UIDs or patient tags.
    ``"CTPA"``: a series folder; ``"CXR"``: one file. Raises DicomError like the readers.
    """
    if _check_modality(modality) == "CTPA":
        return _read_ct(
            path,
            max_bytes=max_bytes,
            max_gap_factor=1.5,
            spacing_tolerance=0.1,
            max_tilt_deg=5.0,
            decode=False,
        )[1]
    return _read_rad(path, max_bytes=max_bytes, decode=False)[1]


def source_signature(path: str | os.PathLike[str]) -> str:
    """Cheap change detector: names inside the folder + sizes + mtime_ns (no file contents).

    Moving or renaming the study folder keeps it; touching, adding, removing or renaming a file
    inside changes it. For a single file: its size and mtime_ns only.
    """
    root = Path(path)
    if not root.exists():
        raise _err("not_found", "The study path does not exist; check the manifest path.")
    h = hashlib.sha256(b"embedstore-source-sig-v1\0")
    if root.is_file():
        st = root.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()
    for p, name in _list_files(root):
        st = p.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# pseudonymisation


def pseudonymise(value: str, key: bytes) -> str:
    """Keyed pseudonym ``anon-<16 hex>``: HMAC-SHA256 of the stripped UTF-8 value.

    The same value and key always give the same pseudonym; without the key it cannot be reversed
    or recomputed from a guess of the value.
    """
    if not isinstance(key, bytes | bytearray) or len(key) < _MIN_KEY_BYTES:
        raise _err(
            "bad_pseudonym_key",
            f"The pseudonym key must be at least {_MIN_KEY_BYTES} bytes; generate one with "
            '`python -c "import secrets; print(secrets.token_hex(32))"`.',
        )
    digest = hmac.new(bytes(key), str(value).strip().encode("utf-8"), hashlib.sha256)
    return "anon-" + digest.hexdigest()[:16]


def load_pseudonym_key(*, synthetic: bool) -> bytes:
    """The pseudonymisation key: env EMBEDSTORE_PSEUDONYM_KEY, else the file named by
    EMBEDSTORE_PSEUDONYM_KEY_FILE, else (synthetic cohorts only) PUBLIC_SYNTHETIC_KEY.

    Real data without a key raises DicomError(reason="no_pseudonym_key").
    """
    value = os.environ.get(_KEY_ENV)
    if value:
        key = value.strip().encode("utf-8")
        source = f"${_KEY_ENV}"
    elif os.environ.get(_KEY_FILE_ENV):
        key_path = Path(os.environ[_KEY_FILE_ENV])
        try:
            key = key_path.read_bytes().strip()
        except OSError as e:
            raise _err(
                "bad_pseudonym_key",
                f"${_KEY_FILE_ENV} names a key file that cannot be read ({type(e).__name__}); "
                "point it at a readable file outside the store.",
            ) from None
        source = f"the file named by ${_KEY_FILE_ENV}"
    elif synthetic:
        return PUBLIC_SYNTHETIC_KEY
    else:
        raise _err(
            "no_pseudonym_key",
            f"No pseudonymisation key: refusing to process real data. Set ${_KEY_ENV} to a "
            f"secret of at least {_MIN_KEY_BYTES} bytes, or ${_KEY_FILE_ENV} to a file holding "
            'one (kept outside the store), e.g. `python -c "import secrets; '
            'print(secrets.token_hex(32))" > ~/.embedstore_key`.',
        )
    if len(key) < _MIN_KEY_BYTES:
        raise _err(
            "bad_pseudonym_key",
            f"The key from {source} is {len(key)} bytes; use at least {_MIN_KEY_BYTES}.",
        )
    return key
