"""One study by modality: ``read_study`` (pixels and content hash in one read) and
``content_hash`` (the same hash without decoding pixels)."""

from __future__ import annotations

import os

from embedstore.dicom.radiograph import Radiograph, _read_rad
from embedstore.dicom.series import CTVolume, StoredCT, _read_ct
from embedstore.dicom.validation import DEFAULT_MAX_BYTES, MemoryGate
from embedstore.domain import Modality

__all__ = ["read_study", "content_hash"]


def _check_modality(modality: str | Modality) -> Modality:
    return Modality.parse(modality)  # ConfigError (a ValueError) names the choices


def read_study(
    path: str | os.PathLike[str],
    modality: str | Modality,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    missing_rescale: str = "refuse",
    compact: bool = False,
    gate: MemoryGate | None = None,
) -> tuple[CTVolume | StoredCT | Radiograph, str]:
    """Read a study once and return it with its content hash (equal to ``content_hash``).

    ``missing_rescale``: policy for CT slices without rescale (``MISSING_RESCALE_POLICIES``);
    ``compact``: a CT series comes back as a ``StoredCT`` (stored dtype, half the memory of
    float32 HU); ``gate``: asked for the decode's memory before anything is allocated.
    """
    if _check_modality(modality) is Modality.CTPA:
        vol, h = _read_ct(
            path,
            max_bytes=max_bytes,
            max_gap_factor=1.5,
            spacing_tolerance=0.1,
            max_tilt_deg=5.0,
            decode=True,
            missing_rescale=missing_rescale,
            compact=compact,
            gate=gate,
        )
        if vol is None:  # internal invariant
            raise RuntimeError("internal error: vol was not set")
        return vol, h
    rad, h = _read_rad(path, max_bytes=max_bytes, decode=True, gate=gate)
    if rad is None:  # internal invariant
        raise RuntimeError("internal error: rad was not set")
    return rad, h


def content_hash(
    path: str | os.PathLike[str],
    modality: str | Modality,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    missing_rescale: str = "refuse",
) -> str:
    """sha256 hex of what determines the decoded image, without decoding pixels.

    Covers the raw PixelData bytes and the attributes that change the decoded image (geometry,
    rescale, LUTs/window, photometric, pixel format, transfer syntax) of the slices that
    ``read_ct_series`` would use, in position order; never the path, UIDs or patient tags.
    ``"CTPA"``: a series folder; ``"CXR"``: one file. Raises DicomError like the readers.
    """
    if _check_modality(modality) is Modality.CTPA:
        return _read_ct(
            path,
            max_bytes=max_bytes,
            max_gap_factor=1.5,
            spacing_tolerance=0.1,
            max_tilt_deg=5.0,
            decode=False,
            missing_rescale=missing_rescale,
        )[1]
    return _read_rad(path, max_bytes=max_bytes, decode=False)[1]
