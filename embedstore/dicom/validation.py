"""The safe reading layer: parse one file and validate its pixel module before any allocation.

Everything here raises DicomError through ``_err`` with a code from ``reasons.REASONS``. File
names in messages are paths inside the study folder; pydicom exceptions are never chained
(``from None``) and its warnings and log records are captured, because their text can echo tag
values. The capture uses ``warnings.catch_warnings``, which is process-global: call the readers
from worker processes rather than from several threads at once.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, iter_pixels, pixel_array
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from embedstore.dicom.reasons import _err
from embedstore.errors import DicomError

#: Cap on the declared pixel bytes of one file, and on the float32 HU volume of one series.
DEFAULT_MAX_BYTES: int = 1 << 30

_HEADER_SLACK = 16 << 20  # a file may exceed its pixel bytes by this much (header, overlays)
_DEFER = 4096  # elements longer than this are read from disk only when accessed
_PIXEL_DATA = 0x7FE00010
_TRUNCATION_WARNING = re.compile(r"end of file|\beof\b|truncat|fewer bytes", re.IGNORECASE)

# pip packages that decode each compressed transfer syntax (pydicom picks them up automatically).
_JPEG = "pylibjpeg pylibjpeg-libjpeg (GPL-3; for 8-bit also python-gdcm or pillow)"
_J2K = "pylibjpeg pylibjpeg-openjpeg (or pillow)"
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _JPEG,
    "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": "python-gdcm (or pylibjpeg pylibjpeg-libjpeg, GPL-3)",
    "1.2.840.10008.1.2.4.70": "python-gdcm (or pylibjpeg pylibjpeg-libjpeg, GPL-3)",
    "1.2.840.10008.1.2.4.80": "pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.81": "pyjpegls (or pylibjpeg pylibjpeg-libjpeg)",
    "1.2.840.10008.1.2.4.90": _J2K,
    "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",
}

# Which pydicom decoding plugin decodes each compressed syntax, in order of preference: the first
# one installed is used, and only that one (no silent fallback), so the decoder that made the
# pixels is known without decoding and enters the content hash (``_PixelInfo.decoder``).
# pyjpegls before pylibjpeg for JPEG-LS (measured 3.8x faster); pylibjpeg-rle before pydicom's
# own RLE (5.7x faster); pylibjpeg (libjpeg) first for JPEG when the user installed it (GPL-3,
# not a dependency: docs/DECISIONS.md), else GDCM.
_PLUGIN_ORDER: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("pylibjpeg", "gdcm", "pillow"),
    "1.2.840.10008.1.2.4.51": ("pylibjpeg", "gdcm", "pillow"),
    "1.2.840.10008.1.2.4.57": ("pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.4.70": ("pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "pylibjpeg", "gdcm"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "gdcm", "pillow"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "gdcm", "pillow"),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),
}
_J2K_UIDS = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
             "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}


def _plugin_distributions(plugin: str, ts: UID) -> tuple[str, ...]:
    """The pip distributions whose code decodes ``ts`` through pydicom plugin ``plugin``."""
    if plugin == "pylibjpeg":
        if str(ts) == "1.2.840.10008.1.2.5":
            return ("pylibjpeg", "pylibjpeg-rle")
        if str(ts) in _J2K_UIDS:
            return ("pylibjpeg", "pylibjpeg-openjpeg")
        return ("pylibjpeg", "pylibjpeg-libjpeg")
    return {"gdcm": ("python-gdcm",), "pillow": ("pillow",), "pyjpegls": ("pyjpegls",),
            "pydicom": ("pydicom",)}.get(plugin, (plugin,))


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=64)
def _choose_decoder(ts: UID) -> tuple[str, str] | None:
    """(pydicom plugin name, "dist version + ...") that will decode ``ts``; None if none is."""
    try:
        available = get_decoder(ts).available_plugins
    except NotImplementedError:
        return None
    order = _PLUGIN_ORDER.get(str(ts), ()) + tuple(sorted(available))
    for plugin in order:
        if plugin in available:
            dists = _plugin_distributions(plugin, ts)
            return plugin, " + ".join(f"{d} {_version(d)}" for d in dists)
    return None


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


def _muted(fn: Any) -> Any:
    """Run a reader with pydicom's warnings and log muted (they can echo tag values, e.g. an
    invalid UID when a dataset is modified), however deep the access that raises them."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _quiet():
            return fn(*args, **kwargs)

    return wrapper


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
            # our own handle: pydicom leaves its file open when parsing fails (an fd per bad
            # file in a long-lived worker); deferred elements are re-read by file name
            with open(path, "rb") as fp:
                ds = pydicom.dcmread(fp, defer_size=_DEFER)
        except InvalidDicomError:
            ds = None
        except MemoryError:
            # the file is at most max_bytes + 16 MiB and large values stay deferred, so this
            # is an element whose declared length exceeds the file (seen in fuzzing)
            raise _err(
                "malformed_header",
                f"File {name!r} declares an element longer than the file itself; the file is "
                "damaged, re-copy or re-export it.",
            ) from None
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
    with _quiet():
        _convert_all(ds, name)  # muted: a value must never reach a warning or a message
    ts = _transfer_syntax(ds)
    if not ts.is_transfer_syntax:
        raise _err(
            "unsupported_transfer_syntax",
            f"File {name!r} declares a transfer syntax UID that is not a known transfer syntax; "
            "re-export it with a standard one.",
        )
    ds.file_meta.TransferSyntaxUID = ts
    return ds


#: The elements the readers look at (sequences: with everything inside). Only these are
#: converted up front: converting every element doubled the parse time of a small slice.
_USED = frozenset(
    Tag(k) for k in (
        "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
        "SamplesPerPixel", "NumberOfFrames", "PhotometricInterpretation", "Modality",
        "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "ImageType", "AcquisitionNumber",
        "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
        "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices", "RescaleSlope",
        "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction",
        "ModalityLUTSequence", "VOILUTSequence", "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    )
)


def _convert_all(ds: Dataset, name: str, depth: int = 0) -> None:
    """Convert the elements the readers use now (inside sequences: all; deferred large values
    excepted), so that a header pydicom cannot interpret fails here with a reason instead of
    wherever it is first read."""
    try:
        for tag in list(ds.keys()):
            if depth == 0 and tag not in _USED:
                continue
            raw = ds.get_item(tag, keep_deferred=True)
            if tag == _PIXEL_DATA or (raw is not None and raw.value is None and raw.length):
                continue  # deferred (> 4 KiB): binary data, read only if ever needed
            elem = ds[tag]
            if elem.VR == "SQ" and depth < 8 and elem.value is not None:
                for item in elem.value:
                    _convert_all(item, name, depth + 1)
    except DicomError:
        raise
    except (OSError, EOFError):  # a sequence parsed on access runs into the end of the file
        raise _err(
            "truncated",
            f"File {name!r} ends inside a header element (truncated copy); re-copy or "
            "re-export it.",
        ) from None
    except Exception as e:  # unknown VR, a value pydicom cannot convert, ...
        raise _err(
            "malformed_header",
            f"File {name!r} has a header element that cannot be parsed ({type(e).__name__}); "
            "the file is damaged or non-conformant, re-export it.",
        ) from None


def _forced_read(path: Path, name: str, head: bytes) -> Dataset:
    junk = _err(
        "not_dicom",
        f"File {name!r} is not DICOM (no 'DICM' header and no readable image dataset); "
        "remove it from the study or point the manifest at the right file.",
    )
    if not _looks_like_raw_dataset(head):
        raise junk
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, force=True, defer_size=_DEFER)
    except Exception:  # MemoryError included: a forced parse of junk declared a huge length
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
    plugin: str = ""  # pydicom decoding plugin for a compressed syntax ("" = native)
    decoder: str = ""  # its distributions and versions (part of the content hash)


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
    plugin = decoder = ""
    if ts.is_compressed:
        chosen = _choose_decoder(ts)
        if chosen is not None:
            plugin, decoder = chosen
        else:
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
    return _PixelInfo(rows, cols, frames, bits, expected, ts, plugin, decoder)


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


def _decoder_panic(ds: Dataset, name: str, e: BaseException) -> BaseException:
    """A Rust decoder's panic (pyo3's PanicException) derives from BaseException, not
    Exception: found by tests/test_dicom_fuzz.py on a damaged RLE stream. Interrupts pass."""
    if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
        return e
    return _decode_failure(ds, name, e)  # type: ignore[arg-type]


def _decode(ds: Dataset, name: str, index: int | None, info: _PixelInfo) -> np.ndarray:
    with _quiet():
        try:
            return pixel_array(ds, index=index, decoding_plugin=info.plugin)
        except MemoryError:
            raise  # the worker's memory backstop: reported as out_of_memory, never as corrupt
        except Exception as e:
            raise _decode_failure(ds, name, e) from None
        except BaseException as e:
            raise _decoder_panic(ds, name, e) from None


class MemoryGate:
    """How a reader asks for memory before it allocates (the decode worker's side of the
    extraction's memory budget). ``budget``: the most one study may use; ``extra(shape)``: bytes
    the caller needs on top of the decode for an image of ``shape`` (preprocessing);
    ``acquire(nbytes)``: blocks until the bytes are granted. The default grants everything."""

    budget: int | None = None

    def extra(self, shape: tuple[int, ...], spacing: tuple[float, ...] | None = None) -> int:
        return 0

    def acquire(self, nbytes: int) -> None:
        return None


def _reserve(
    gate: MemoryGate | None,
    decode_bytes: int,
    shape: tuple[int, ...],
    what: str,
    spacing: tuple[float, ...] | None = None,
) -> int:
    """Check ``decode_bytes`` (+ the caller's extra) against the budget, then wait for it."""
    if gate is None:
        return decode_bytes
    total = int(decode_bytes) + int(gate.extra(shape, spacing))
    if gate.budget is not None and total > gate.budget:
        raise _err(
            "over_memory_budget",
            f"{what} needs about {total} bytes to decode and preprocess, over the memory budget "
            f"of {gate.budget} bytes per study; raise --max-memory (ExtractConfig.max_memory) if "
            "it is genuine.",
        )
    gate.acquire(total)
    return total


def _floats_raw(value: Any, n: int) -> tuple[float, ...] | None:
    """``n`` numbers, non-finite ones included; None when absent, of another count or not numeric."""
    if value is None or value == "":
        return None
    try:
        out = tuple(float(v) for v in (value if isinstance(value, list | tuple) else list(value)))
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _number(value: Any) -> float | None:
    """A single number (non-finite kept: the caller refuses it); None when absent; NaN if junk."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


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


def _iter_frames(
    ds: Dataset, name: str, indices: list[int], info: _PixelInfo
) -> Iterator[np.ndarray]:
    with _quiet():
        try:
            yield from iter_pixels(ds, indices=indices, decoding_plugin=info.plugin)
        except (DicomError, MemoryError):
            raise
        except Exception as e:
            raise _decode_failure(ds, name, e) from None
        except BaseException as e:
            raise _decoder_panic(ds, name, e) from None
