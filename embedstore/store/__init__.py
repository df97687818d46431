"""The embedding store: Zarr v3 segments + fsync'ed commit logs + Parquet metadata.

Layout and guarantees are specified in docs/STORE_FORMAT.md. In short:

    STORE/store.json                      format + schema_version
    STORE/manifest.parquet                the attached cohort manifest (the `studies` view)
    STORE/sets/<MODALITY>/<encoder_key>/  spec.json + one segment per writer session:
        seg-<utc>-<pid>-<rand>/           embeddings.zarr (N, D), [tokens.zarr (N, S, Dt)],
                                          commits.jsonl (truth), meta.parquet + meta.arrow (caches),
                                          segment.json
    STORE/failures/<segment>.jsonl        inputs that could not be embedded
    STORE/locks/*.lock                    advisory writer locks
    STORE/runs/<run_id>/                  training runs (written by embedstore.runs)

A row exists only once its commit record is fsync'ed, and the record is written only after the
row's chunk file was renamed into place and fsync'ed, so a writer killed at any point leaves
either a committed row with its bytes on disk or no row. Loading keeps the newest commit per
study_id and orders rows by study_id, so every crash/resume or sharding pattern yields the same
array.

One module per concern:

    format.py       on-disk names, schema version, name rules, cache keys, timestamps
    lock.py         flock writer locks
    commitlog.py    the commit record: its only encoder and parser, and the appender
    segment.py      sets and segments, live rows, reading rows back, meta caches
    writer.py       StoreWriter
    reader.py       open_store, Store, SetInfo, EmbeddingSet
    maintenance.py  verify, gc, compaction
    _zarr.py        the Zarr v3 row-array backend
    _faults.py      test hook: faults injected at named points of the write path (crash tests)
"""

from embedstore.store.format import DTYPES, SCHEMA_VERSION, make_cache_key
from embedstore.store.maintenance import GcReport, Problem, VerifyReport
from embedstore.store.reader import EmbeddingSet, SetInfo, Store, open_store
from embedstore.store.writer import StoreWriter

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "open_store",
    "make_cache_key",
    "Store",
    "StoreWriter",
    "EmbeddingSet",
    "SetInfo",
    "Problem",
    "VerifyReport",
    "GcReport",
]
