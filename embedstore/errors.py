"""Typed errors raised by the library and translated once, at the CLI edge.

Every leaf also subclasses the matching builtin, so callers that only know Python's
exceptions still catch them (``except FileNotFoundError`` catches StoreNotFoundError).
Each error carries a short machine-readable ``reason`` code (written into the store's
failures table) and a human message that names the bad value and the fix. Messages must
never contain patient-identifying DICOM values.
"""

from __future__ import annotations

# The root is defined in the lowest layer (models/ never imports the rest of embedstore) and
# re-exported here, so one ``except EmbedstoreError`` catches every error the project raises.
from embedstore.models.errors import (
    CheckpointError,
    ConfigError,
    EmbedstoreError,
    EncoderError,
    ModelError,
    UnknownEncoderError,
)

__all__ = [
    "EmbedstoreError",
    "ConfigError",
    "ManifestError",
    "StoreNotFoundError",
    "StoreFormatError",
    "StoreLockedError",
    "StoreCorruptError",
    "QueryRefusedError",
    "QueryError",
    "DicomError",
    "ModelError",
    "EncoderError",
    "UnknownEncoderError",
    "CheckpointError",
    "USER_ERRORS",
    "RunNotFoundError",
    "IncompatibleRunError",
    "FaissIndexError",
]


class ManifestError(EmbedstoreError, ValueError):
    reason = "bad_manifest"


class StoreNotFoundError(EmbedstoreError, FileNotFoundError):
    reason = "store_not_found"


class StoreFormatError(EmbedstoreError, ValueError):
    reason = "store_format"


class StoreLockedError(EmbedstoreError, BlockingIOError):
    reason = "store_locked"


class StoreCorruptError(EmbedstoreError, ValueError):
    reason = "store_corrupt"


class QueryRefusedError(EmbedstoreError, PermissionError):
    reason = "query_refused"


class QueryError(EmbedstoreError, ValueError):
    reason = "query_error"


class DicomError(EmbedstoreError, ValueError):
    """A study could not be read. ``reason`` is one of the codes in docs/DICOM.md."""

    reason = "dicom_error"


class RunNotFoundError(EmbedstoreError, FileNotFoundError):
    reason = "run_not_found"


class IncompatibleRunError(EmbedstoreError, ValueError):
    reason = "incompatible_run"


class FaissIndexError(EmbedstoreError, RuntimeError):
    """A FAISS index problem: missing, corrupt, of another format, or asked for a bad k."""

    reason = "index_error"


#: Everything the CLI reports as ``Error: <message>`` with exit code 1 (never a traceback).
USER_ERRORS: tuple[type[Exception], ...] = (EmbedstoreError,)
