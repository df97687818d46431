"""Keyed pseudonyms for patient and study identifiers, and where the key comes from.

Pure stdlib: the manifest importers use it without loading pydicom. Failures are DicomError with
the reason codes ``no_pseudonym_key`` / ``bad_pseudonym_key`` (docs/DICOM.md), as before the move.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from embedstore.errors import DicomError

__all__ = [
    "PUBLIC_SYNTHETIC_KEY",
    "KEY_ENV",
    "KEY_FILE_ENV",
    "MIN_KEY_BYTES",
    "pseudonymise",
    "load_pseudonym_key",
]

#: Documented public key for the synthetic cohort only: pseudonyms made with it are NOT secret.
PUBLIC_SYNTHETIC_KEY: bytes = b"embedstore-public-synthetic-cohort-key-v1"
#: Environment variable holding the key itself (its UTF-8 bytes).
KEY_ENV = "EMBEDSTORE_PSEUDONYM_KEY"
#: Environment variable naming a file that holds the key (kept outside the store).
KEY_FILE_ENV = "EMBEDSTORE_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16


def _err(reason: str, message: str) -> DicomError:
    return DicomError(message, reason=reason)


def pseudonymise(value: str, key: bytes) -> str:
    """Keyed pseudonym ``anon-<16 hex>``: HMAC-SHA256 of the stripped UTF-8 value.

    The same value and key always give the same pseudonym; without the key it cannot be reversed
    or recomputed from a guess of the value.
    """
    if not isinstance(key, bytes | bytearray) or len(key) < MIN_KEY_BYTES:
        raise _err(
            "bad_pseudonym_key",
            f"The pseudonym key must be at least {MIN_KEY_BYTES} bytes; generate one with "
            '`python -c "import secrets; print(secrets.token_hex(32))"`.',
        )
    digest = hmac.new(bytes(key), str(value).strip().encode("utf-8"), hashlib.sha256)
    return "anon-" + digest.hexdigest()[:16]


def load_pseudonym_key(*, synthetic: bool) -> bytes:
    """The pseudonymisation key: env EMBEDSTORE_PSEUDONYM_KEY, else the file named by
    EMBEDSTORE_PSEUDONYM_KEY_FILE, else (synthetic cohorts only) PUBLIC_SYNTHETIC_KEY.

    Real data without a key raises DicomError(reason="no_pseudonym_key").
    """
    value = os.environ.get(KEY_ENV)
    if value:
        key = value.strip().encode("utf-8")
        source = f"${KEY_ENV}"
    elif os.environ.get(KEY_FILE_ENV):
        key_path = Path(os.environ[KEY_FILE_ENV])
        try:
            key = key_path.read_bytes().strip()
        except OSError as e:
            raise _err(
                "bad_pseudonym_key",
                f"${KEY_FILE_ENV} names a key file that cannot be read ({type(e).__name__}); "
                "point it at a readable file outside the store.",
            ) from None
        source = f"the file named by ${KEY_FILE_ENV}"
    elif synthetic:
        return PUBLIC_SYNTHETIC_KEY
    else:
        raise _err(
            "no_pseudonym_key",
            f"No pseudonymisation key: refusing to process real data. Set ${KEY_ENV} to a "
            f"secret of at least {MIN_KEY_BYTES} bytes, or ${KEY_FILE_ENV} to a file holding "
            'one (kept outside the store), e.g. `python -c "import secrets; '
            'print(secrets.token_hex(32))" > ~/.embedstore_key`.',
        )
    if len(key) < MIN_KEY_BYTES:
        raise _err(
            "bad_pseudonym_key",
            f"The key from {source} is {len(key)} bytes; use at least {MIN_KEY_BYTES}.",
        )
    return key
