"""Typed errors raised by the library and translated once, at the CLI edge.

Every leaf also subclasses the matching builtin, so callers that only know Python's
exceptions still catch them (``except FileNotFoundError`` catches StoreNotFoundError).
Each error carries a short machine-readable ``reason`` code (written into the store's
failures table) and a human message that names the bad value and the fix. Messages must
never contain patient-identifying DICOM values.
"""

from __future__ import annotations

# models/ is pure torch and may not import embedstore, so its errors have their own root;
# they are re-exported here and the CLI treats both roots as user errors.
from embedstore.models.errors import CheckpointError, EncoderError, ModelError, UnknownEncoderError

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
    "IndexError_",
]


class EmbedstoreError(Exception):
    """Root of every error embedstore raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(EmbedstoreError, ValueError):
    reason = "bad_config"


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


class IndexError_(EmbedstoreError, RuntimeError):
    """A FAISS index problem (named with a trailing underscore to avoid the builtin)."""

    reason = "index_error"


#: Everything the CLI reports as ``Error: <message>`` with exit code 1 (never a traceback).
USER_ERRORS: tuple[type[Exception], ...] = (EmbedstoreError, ModelError)
