"""The store's on-disk names and identities (docs/STORE_FORMAT.md): schema version, file and
folder names, which names are valid, cache keys and the timestamp format."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from embedstore.domain import Modality
from embedstore.errors import ConfigError

SCHEMA_VERSION = 2  # the on-disk layout (store.json); 1 = JSON commit logs, read by `upgrade` only
# The version mixed into cache keys: it changes only when what an embedding *means* changes, so a
# layout upgrade (1 -> 2) keeps every cached row valid.
CACHE_KEY_VERSION = 1
FORMAT_NAME = "embedstore"
DTYPES = ("float32", "float16")
# Encoder keys and lock scopes name folders and files.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}$")

# STORE/
STORE_DOC = "store.json"
MANIFEST_FILE = "manifest.parquet"
SETS_DIR = "sets"
FAILURES_DIR = "failures"
LOCKS_DIR = "locks"
RUNS_DIR = "runs"
STORE_SUBDIRS = (SETS_DIR, FAILURES_DIR, LOCKS_DIR, RUNS_DIR)
# STORE/sets/<MODALITY>/<encoder_key>/
SPEC_FILE = "spec.json"
# The member of a set's spec that records how it was made (manifest fingerprint, weights file
# name): written with the set, never compared when the set is reopened.
PROVENANCE_KEY = "provenance"
SEGMENT_PREFIX = "seg-"
COMPACT_PREFIX = ".compact-"  # a segment gc is building; renamed to seg-* when whole
# .../seg-*/
SEGMENT_DOC = "segment.json"
EMBEDDINGS_ARRAY = "embeddings.zarr"
TOKENS_ARRAY = "tokens.zarr"
COMMITS_DIR = "commits"  # <first>-<last>.parquet commit parts, each written once
# schema_version 1 only (read by `embedstore upgrade`, never written):
V1_COMMITS_FILE = "commits.jsonl"
V1_META_FILES = ("meta.parquet", "meta.arrow")

# Parquet schema metadata keys.
MANIFEST_META_KEY = b"embedstore.store"  # on manifest.parquet: pair_max_gap_hours, attached_at

DEFAULT_PAIR_MAX_GAP_HOURS = 48.0  # pairs view: nearest CXR within this many hours of a CTPA

# store.json "config": maintenance thresholds (docs/STORE_FORMAT.md, "Compaction").
DEFAULT_CONFIG = {
    # A set with more segments than this is compacted automatically when a writer closes.
    "max_segments": 8,
    # A closed segment with more commit parts than this has them merged into one.
    "max_parts": 64,
}


def store_config(doc: Mapping[str, Any]) -> dict[str, int]:
    """The maintenance thresholds of a store (store.json "config" over DEFAULT_CONFIG)."""
    cfg = dict(DEFAULT_CONFIG)
    given = doc.get("config") if isinstance(doc, Mapping) else None
    if isinstance(given, Mapping):
        for k in DEFAULT_CONFIG:
            v = given.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                cfg[k] = v
    return cfg


def check_modality(modality: str) -> Modality:
    return Modality.parse(modality)


def compared_spec(spec: Any) -> Any:
    """A set spec without its provenance: what must be equal for a writer to reopen the set."""
    if isinstance(spec, Mapping):
        return {k: v for k, v in spec.items() if k != PROVENANCE_KEY}
    return spec


def check_encoder_key(key: str) -> str:
    if not isinstance(key, str) or not NAME_RE.match(key):
        raise ConfigError(
            f"Invalid encoder key {key!r}: it names a folder, so use 1-128 letters, digits and "
            ". _ @ + = - (starting with a letter or digit)."
        )
    return key


def canonical(obj: Any, what: str) -> Any:
    """``obj`` as JSON would round-trip it (sorted keys), or ConfigError naming ``what``."""
    try:
        return json.loads(json.dumps(obj, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be JSON-serialisable: {e}") from e


def make_cache_key(
    *,
    content_hash: str,
    preprocess: Mapping[str, Any] | str,
    encoder_fingerprint: str,
    schema_version: int = CACHE_KEY_VERSION,
) -> str:
    """sha256 hex identifying one embedding: input content x preprocessing x encoder x schema.

    ``content_hash`` must hash the pixel data and the geometry that affects it, never the path,
    so moving or renaming an image folder recomputes nothing; ``encoder_fingerprint`` must
    include a hash of the weights (``Encoder.fingerprint()``).
    """
    payload = {
        "content": str(content_hash),
        "preprocess": canonical(preprocess, "The preprocessing spec"),
        "encoder": str(encoder_fingerprint),
        "schema_version": int(schema_version),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


# -- time: every timestamp in a store is UTC, ISO 8601 with microseconds and a Z ---------------
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def micros(iso_text: str) -> int:
    """Microseconds since the epoch of an ``iso()`` string (Arrow's timestamp[us] value)."""
    dt = datetime.fromisoformat(iso_text.replace("Z", "+00:00"))
    return (dt - EPOCH) // timedelta(microseconds=1)


def iso_from_micros(us: int) -> str:
    return iso(EPOCH + timedelta(microseconds=us))


def stamp(dt: datetime) -> str:
    """The compact UTC stamp in segment names (sortable)."""
    return dt.strftime("%Y%m%dT%H%M%S%fZ")
