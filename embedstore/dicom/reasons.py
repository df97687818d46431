"""The reason codes a DicomError carries, with their one-line meaning (the table in docs/DICOM.md).

A test keeps three lists equal: the codes raised in ``embedstore/dicom/`` and
``embedstore/pseudonym.py``, the keys of ``REASONS``, and the rows of the docs table (whose
"when" column is ``REASONS[code]`` word for word, markdown aside).
"""

from __future__ import annotations

from embedstore.errors import DicomError

__all__ = ["REASONS"]

#: Every reason code DicomError carries from the DICOM layer -> when it is raised.
REASONS: dict[str, str] = {
    "not_found": "the path does not exist / cannot be stat'ed",
    "not_dicom": "file is not DICOM (or no file in a CT folder is)",
    "truncated": (
        "file cut in its header (an image object without PixelData), in uncompressed pixel data "
        "(length < Rows x Columns x Frames x Bits/8), or in encapsulated data (pydicom's "
        "end-of-file warning)"
    ),
    "malformed_header": (
        "a header element pydicom cannot interpret (unknown VR, a value it cannot convert)"
    ),
    "missing_attribute": (
        "Rows, Columns, BitsAllocated, BitsStored, PixelRepresentation, "
        "PhotometricInterpretation missing or impossible; CT slice without "
        "position/orientation/PixelSpacing; enhanced CT without one functional-group item per "
        "frame"
    ),
    "too_large": (
        "declared pixel bytes of a file, or the float32 HU volume, over max_bytes (default "
        "1 GiB); checked before any allocation"
    ),
    "unsupported_transfer_syntax": (
        "compressed syntax without an installed decoder, or a variant the installed one rejects "
        "(12-bit JPEG in pillow)"
    ),
    "corrupt_pixel_data": "the decoder failed, or decoded to another shape",
    "blank_image": (
        "the decoded image (radiograph) or volume (CT series) has one value in every pixel: a "
        "decoder that silently returned a blank image, or an empty export"
    ),
    "missing_rescale": (
        "CT slices of the chosen series without RescaleSlope/RescaleIntercept, under the "
        "default missing_rescale policy 'refuse'"
    ),
    "invalid_rescale": "CT RescaleSlope zero or not a number, or RescaleIntercept not a number",
    "invalid_spacing": (
        "CT PixelSpacing, SliceThickness or SpacingBetweenSlices zero, negative or not finite"
    ),
    "over_memory_budget": (
        "decoding and preprocessing the study would need more memory than one study may use "
        "(the extraction's --max-memory); checked from the headers before any allocation"
    ),
    "no_pixel_data": (
        "DICOM without an image (report, plan, presentation state) given as a radiograph, or "
        "empty PixelData"
    ),
    "color_image": (
        "SamplesPerPixel != 1 or PhotometricInterpretation not MONOCHROME1/2 (RGB, YBR, PALETTE "
        "COLOR), colour/palette PNG"
    ),
    "no_image_series": (
        "a CT folder holds DICOM but no CT image slice (only localizers, other modalities, "
        "non-images)"
    ),
    "multiple_series": "several CT series with equally many slices (ambiguous)",
    "missing_slices": "a gap > max_gap_factor x median spacing",
    "nonuniform_spacing": (
        "a spacing deviating more than spacing_tolerance (10 %) from the median"
    ),
    "gantry_tilt": "tilt > max_tilt_deg (5 degrees)",
    "empty_series": "folder with no files, or fewer than 2 usable slices",
    "no_pseudonym_key": "real data without a pseudonymisation key",
    "bad_pseudonym_key": "key file unreadable, or a key shorter than 16 bytes",
}


def _err(reason: str, message: str) -> DicomError:
    return DicomError(message, reason=reason)
