"""DICOM reading: CT series -> HU volume, radiograph -> [0, 1] image, content hashing.

With the synthetic-cohort writer ``embedstore/_dicomwrite.py``, this package is the only code
that imports pydicom. Every read is validated before any pixel buffer is allocated, every failure
is a DicomError with a reason code (``REASONS``, docs/DICOM.md), and no message, warning or
returned object carries a DICOM value that could identify a patient: files are named by their
path inside the study folder, nothing else.

One module per concern:
  reasons.py     the reason codes (``REASONS``: code -> meaning) and ``_err``
  validation.py  the safe reading layer: parse, size caps, truncation, pixel checks, decode
  hashing.py     content-hash primitives (``CONTENT_HASH_VERSION``) and ``source_signature``
  series.py      CT series: scan, series choice, slice order, geometry, ``read_ct_series``
  radiograph.py  CR/DX and PNG: LUT/VOI/MONOCHROME1, ``read_radiograph``
  study.py       dispatch by modality: ``read_study``, ``content_hash``
Pseudonymisation has no pydicom in it and lives in ``embedstore/pseudonym.py``; it is re-exported
here so that ``from embedstore.dicom import pseudonymise`` keeps working.
"""

from embedstore.dicom.hashing import CONTENT_HASH_VERSION as CONTENT_HASH_VERSION
from embedstore.dicom.hashing import source_signature
from embedstore.dicom.radiograph import Radiograph, read_radiograph
from embedstore.dicom.reasons import REASONS
from embedstore.dicom.series import MISSING_RESCALE_POLICIES, CTVolume, StoredCT, read_ct_series
from embedstore.dicom.study import content_hash, read_study
from embedstore.dicom.validation import DEFAULT_MAX_BYTES, MemoryGate
from embedstore.pseudonym import PUBLIC_SYNTHETIC_KEY, load_pseudonym_key, pseudonymise

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MISSING_RESCALE_POLICIES",
    "MemoryGate",
    "StoredCT",
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
