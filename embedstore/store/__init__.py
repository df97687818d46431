"""The embedding store: Zarr v3 segments + write-once Parquet commit parts.

Layout and guarantees are specified in docs/STORE_FORMAT.md. In short:

    STORE/store.json                      format + schema_version (2) + maintenance config
    STORE/manifest.parquet                the attached cohort manifest (the `studies` view)
    STORE/sets/<MODALITY>/<encoder_key>/  spec.json + one segment per writer session:
        seg-<utc>-<pid>-<rand>/           embeddings.zarr (N, D), [tokens.zarr (N, S, Dt)],
                                          commits/<first>-<last>.parquet (the truth), segment.json
    STORE/failures/<segment>/             failure parts: inputs that could not be embedded
    STORE/locks/*.lock                    advisory writer locks
    STORE/runs/<run_id>/                  training runs (written by embedstore.runs)

A row exists only once its commit part is published (written once under its name, fsync'ed),
and the part is written only after the row's chunk file was renamed into place and fsync'ed, so
a writer killed at any point leaves either a committed row with its bytes on disk or no row.
Nothing is appended to and no folder is renamed, so the protocol also fits object stores
(_backend.py). Loading keeps the newest commit per study_id and orders rows by study_id, so every
crash/resume or sharding pattern yields the same array.

One module per concern:

    format.py       on-disk names, schema version, config, name rules, cache keys, timestamps
    lock.py         flock writer locks
    commitlog.py    commit and failure records: their only encoder and parser (Parquet parts)
    segment.py      sets and segments, which rows are live, reading rows and their metadata
    views.py        the catalog's SQL views over the Parquet files
    writer.py       StoreWriter (and the resume checks: committed / committed_keys / _sources)
    reader.py       open_store, Store, SetInfo, EmbeddingSet
    maintenance.py  verify, gc, compaction (automatic too), upgrade from schema_version 1
    _backend.py     the file operations the data path needs (local; an object store next)
    _zarr.py        the Zarr v3 row-array backend
    _faults.py      test hook: faults injected at named points of the write path (crash tests)
"""

from embedstore.store.format import DTYPES, SCHEMA_VERSION, make_cache_key
from embedstore.store.maintenance import (
    GcReport,
    Problem,
    UpgradeReport,
    VerifyReport,
    upgrade_store,
)
from embedstore.store.reader import EmbeddingSet, SetInfo, Store, open_store
from embedstore.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "open_store",
    "upgrade_store",
    "make_cache_key",
    "Store",
    "StoreWriter",
    "EmbeddingSet",
    "SetInfo",
    "Problem",
    "VerifyReport",
    "GcReport",
    "UpgradeReport",
]
