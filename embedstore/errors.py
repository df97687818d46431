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
    "CorruptStateError",
    "StoreDocCorruptError",
    "ManifestCorruptError",
    "QueryRefusedError",
    "QueryError",
    "InterchangeError",
    "DicomError",
    "ModelError",
    "EncoderError",
    "UnknownEncoderError",
    "CheckpointError",
    "USER_ERRORS",
    "RunNotFoundError",
    "IncompatibleRunError",
    "FaissIndexError",
    "DiskWriteError",
    "DISK_ERRNOS",
    "disk_write_error",
]


class ManifestError(EmbedstoreError, ValueError):
    reason = "bad_manifest"


class StoreNotFoundError(EmbedstoreError, FileNotFoundError):
    reason = "store_not_found"


class StoreFormatError(EmbedstoreError, ValueError):
    reason = "store_format"


class StoreLockedError(EmbedstoreError, BlockingIOError):
    reason = "store_locked"


class CorruptStateError(EmbedstoreError, ValueError):
    """A state file (store.json, spec.json, manifest.parquet, a run's config.json, ...) is
    missing, empty, truncated, garbled, of the wrong type or version (embedstore/statefile.py).

    ``reason`` is one of ``embedstore.statefile.REASONS``; ``path`` is the file; ``fix`` the
    remedy that the message ends with.
    """

    reason = "corrupt_state"

    def __init__(self, message: str, *, reason: str | None = None, path: str | None = None,
                 fix: str | None = None):
        super().__init__(message, reason=reason)
        self.path, self.fix = path, fix


class StoreCorruptError(CorruptStateError):
    """A file inside the store is damaged; ``embedstore verify`` lists such problems."""

    reason = "store_corrupt"


class StoreDocCorruptError(StoreCorruptError, StoreFormatError):
    """``store.json`` is unreadable (a StoreFormatError too, as it was before the loader)."""


class ManifestCorruptError(CorruptStateError, ManifestError):
    """The store's copy of the manifest is unreadable (a ManifestError too)."""


class QueryRefusedError(EmbedstoreError, PermissionError):
    reason = "query_refused"


class QueryError(EmbedstoreError, ValueError):
    reason = "query_error"


class InterchangeError(EmbedstoreError, ValueError):
    """An embeddings file given to ``import-embeddings`` is unreadable, malformed or does not
    match the store (ids, modality, dimension, dtype, non-finite values). docs/INTERCHANGE.md."""

    reason = "bad_embeddings_file"


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


class DiskWriteError(EmbedstoreError, OSError):
    """A write failed for lack of space or a failing device (ENOSPC, EDQUOT, EIO, EROFS)."""

    reason = "disk_write_failed"

    def __str__(self) -> str:  # the message, not OSError's "[Errno n] strerror: filename"
        return str(self.args[0]) if self.args else super().__str__()


#: The errnos that mean "the disk, not the data": a re-run after freeing space succeeds.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS)


def disk_write_error(e: OSError, path: object, *, maintenance: bool = False) -> DiskWriteError:
    """The typed error for a failed write of ``path`` (keeps the errno and the path).

    ``maintenance``: the failure hit the tidying that follows a commit (merging commit parts,
    compacting segments); the rows are committed and only that tidying is left to ``gc``."""
    what = e.strerror or os.strerror(e.errno or errno.EIO)
    fix = ("Free space on that file system" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "Check or replace the device (or remount it writable)")
    then = ("The rows written are committed; only tidying the set (merging or compacting) is "
            f"unfinished. {fix}, then run `embedstore gc STORE` to finish it." if maintenance
            else f"{fix}, then re-run the same command: everything committed before is kept.")
    err = DiskWriteError(f"Could not write {path}: {what}. {then}")
    err.errno, err.strerror, err.filename = e.errno, what, str(path)
    return err


#: Everything the CLI reports as ``Error: <message>`` with exit code 1 (never a traceback).
USER_ERRORS: tuple[type[Exception], ...] = (EmbedstoreError,)
