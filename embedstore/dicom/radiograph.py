"""Radiographs (CR/DX or any 2D greyscale DICOM, or PNG) -> [0, 1] image, bright = dense.

DICOM order: modality LUT, then VOI (VOI LUT, else window, else min-max), then MONOCHROME1
inversion. PNG files are recognised by their magic bytes, not their name.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi

from embedstore.dicom.hashing import _hash_init, _pixel_format
from embedstore.dicom.reasons import _err
from embedstore.dicom.validation import (
    _HEADER_SLACK,
    _PIXEL_DATA,
    DEFAULT_MAX_BYTES,
    MemoryGate,
    _check_pixels,
    _decode,
    _file_size,
    _first,
    _float_or,
    _floats,
    _is_image_object,
    _muted,
    _path_name,
    _quiet,
    _raw_pixel_bytes,
    _read,
    _reserve,
)
from embedstore.errors import DicomError

__all__ = ["Radiograph", "read_radiograph"]

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def _read_png(
    path: Path, name: str, *, max_bytes: int, decode: bool, gate: MemoryGate | None = None
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
                _reserve(gate, w * hgt * 12, (hgt, w), f"File {name!r}")
                opened.load()
                im = opened.copy()
        except (DicomError, MemoryError):
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
    """DICOM windowing (PS3.3 C.11.2.1.2) straight to [0, 1], in place on the float32 ``arr``;
    None (``arr`` untouched) when there is no usable window."""
    centers = _str_values(ds.get("WindowCenter"))
    widths = _str_values(ds.get("WindowWidth"))
    if not centers or not widths:
        return None
    c, w = _float_or(centers[0], math.nan), _float_or(widths[0], math.nan)
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0:
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    if func == "SIGMOID":
        arr -= np.float32(c)
        arr *= np.float32(-4.0 / w)
        np.exp(arr, out=arr)
        arr += 1.0
        return np.reciprocal(arr, out=arr)
    if func == "LINEAR_EXACT":
        arr -= np.float32(c)
        arr /= np.float32(w)
        arr += 0.5
        return np.clip(arr, 0.0, 1.0, out=arr)
    if w < 1:
        return None
    if w == 1:
        return (arr > np.float32(c - 0.5)).astype(np.float32)
    arr -= np.float32(c - 0.5)
    arr /= np.float32(w - 1)
    arr += 0.5
    return np.clip(arr, 0.0, 1.0, out=arr)


def _read_dicom_radiograph(
    path: Path, name: str, *, max_bytes: int, decode: bool, gate: MemoryGate | None = None
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
    del raw  # the dataset still holds the bytes for the decoder; dropped right after it
    warn: list[str] = []
    if info.frames > 1:
        warn.append(f"multi-frame radiograph ({info.frames} frames): used the first frame")
    pixels = info.rows * info.cols
    # the frame decoded (and the decoder's own copy), then one float32 image worked in place
    _reserve(gate, 2 * (info.expected // info.frames) + 4 * pixels, (info.rows, info.cols),
             f"File {name!r}")
    stored = _decode(ds, name, 0 if info.frames > 1 else None, info)  # (H, W) stored values
    ds.PixelData = None
    if stored.shape != (info.rows, info.cols):
        raise _err(
            "corrupt_pixel_data",
            f"File {name!r} decoded to shape {stored.shape}, not ({info.rows}, {info.cols}).",
        )
    if stored.min() == stored.max():
        raise _err(
            "blank_image",
            f"File {name!r} decoded to a constant image (every pixel the same value): a blank "
            "image from a failed decoder or an empty export; re-export it.",
        )
    # order matters: modality LUT -> VOI -> MONOCHROME1 inversion -> [0, 1]; float32 in place
    with _quiet():
        try:
            if _first(ds.get("ModalityLUTSequence")) is not None:
                values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
            else:
                values = stored.astype(np.float32)  # (H, W)
                if "RescaleSlope" in ds and "RescaleIntercept" in ds:
                    values *= np.float32(float(ds.RescaleSlope))
                    values += np.float32(float(ds.RescaleIntercept))
            del stored
            voi: np.ndarray | None = None
            lut_item = _first(ds.get("VOILUTSequence"))
            if lut_item is not None and lut_item.get("LUTDescriptor"):
                bits = int(lut_item.LUTDescriptor[2]) or 16
                lut_in = np.rint(values).astype(np.int32)  # LUT indices must be integers
                voi = np.asarray(apply_voi(lut_in, ds), dtype=np.float32) / (2**bits - 1)
        except MemoryError:
            raise
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
        voi = values
        voi -= lo
        voi /= hi - lo if hi > lo else 1.0  # no window in the file: full range
        warn.append("no VOI window in the file: min-max scaled")
    out = np.clip(voi, 0.0, 1.0, out=voi)  # (H, W) float32
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)  # MONOCHROME1 stores dense = dark; bright = dense
    rad = Radiograph(
        pixels=out,
        spacing=spacing,
        spacing_source=source,
        photometric=photometric,
        warnings=tuple(warn),
    )
    return rad, h.hexdigest()


@_muted
def _read_rad(
    path: str | os.PathLike[str], *, max_bytes: int, decode: bool, gate: MemoryGate | None = None
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
        return _read_png(p, name, max_bytes=max_bytes, decode=decode, gate=gate)
    return _read_dicom_radiograph(p, name, max_bytes=max_bytes, decode=decode, gate=gate)


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
