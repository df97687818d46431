"""Typed errors raised by the library and translated once, at the CLI edge.

Every leaf also subclasses the matching builtin, so callers that only know Python's
exceptions still catch them (``except FileNotFoundError`` catches StoreNotFoundError).
Each error carries a short machine-readable ``reason`` code (written into the store's
failures table) and a human message that names the bad value and the fix. Messages must
never contain patient-identifying DICOM values.
"""

from __future__ import annotations

import errno
import os

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
    "DISK_ERRNOS",
    "disk_error_message",
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

# OSErrors that mean the disk, not the program: the CLI shows them as one line (disk_error_message).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS})


def disk_error_message(e: OSError) -> str | None:
    """One line for a full, failing or read-only disk (naming the file and what to do), or None
    for any other OSError. Every store write is temp + fsync + rename, so nothing is half done."""
    if e.errno not in DISK_ERRNOS:
        return None
    where = f" writing {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that file system (or choose another with more room) and re-run"
    elif e.errno == errno.EROFS:
        fix = "make that file system writable and re-run"
    else:
        fix = "check that disk (dmesg, smartctl) and re-run"
    return (f"{e.strerror or os.strerror(e.errno)} (errno {e.errno}){where}: {fix}; "
            "everything committed before it is kept.")
