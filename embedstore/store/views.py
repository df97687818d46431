"""The catalog's views over the store's Parquet files, as SQL (run by embedstore.catalog).

Nothing is copied into DuckDB: each view reads the commit parts (or failure parts) in place, so a
query reads only the columns and row groups it needs (projection and filter pushdown) and the
first query costs what DuckDB on the raw Parquet costs. Views:

    commits     every committed row of every set, superseded ones included:
                modality, encoder_key, segment, array_row, study_id, patient_id, cache_key,
                content_hash, source_sig, crc32, tokens_crc32, created_at
    embeddings  the live rows (newest commit per study_id) with ``row`` = their row in
                Store.load of the full set (study_id order)
    failures    every failure record

A set whose parts are in study_id order and do not overlap (`Snapshot.ordered_segments`) needs
no window for supersession or ``row``: each part is a plain scan with ``row = base +
file_row_number``. Any other set's branch ranks its rows with two window functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from embedstore.sql import literal
from embedstore.store._backend import Backend
from embedstore.store.commitlog import live_parts
from embedstore.store.format import FAILURES_DIR
from embedstore.store.segment import SetDir, Snapshot, set_dirs

_COMMIT_COLS = ("array_row, study_id, patient_id, cache_key, content_hash, source_sig, crc32, "
                "tokens_crc32, created_at")
_EMPTY_COMMITS = (
    "SELECT NULL::VARCHAR AS modality, NULL::VARCHAR AS encoder_key, NULL::VARCHAR AS segment, "
    "NULL::BIGINT AS array_row, NULL::VARCHAR AS study_id, NULL::VARCHAR AS patient_id, "
    "NULL::VARCHAR AS cache_key, NULL::VARCHAR AS content_hash, NULL::VARCHAR AS source_sig, "
    "NULL::UINTEGER AS crc32, NULL::UINTEGER AS tokens_crc32, NULL::TIMESTAMPTZ AS created_at "
    "LIMIT 0"
)
_EMPTY_EMBEDDINGS = (
    "SELECT NULL::VARCHAR AS study_id, NULL::VARCHAR AS patient_id, NULL::VARCHAR AS modality, "
    "NULL::VARCHAR AS encoder_key, NULL::VARCHAR AS content_hash, NULL::VARCHAR AS cache_key, "
    "NULL::BIGINT AS row, NULL::TIMESTAMPTZ AS created_at LIMIT 0"
)
_EMPTY_FAILURES = (
    "SELECT NULL::VARCHAR AS study_id, NULL::VARCHAR AS modality, NULL::VARCHAR AS encoder_key, "
    "NULL::VARCHAR AS stage, NULL::VARCHAR AS reason, NULL::VARCHAR AS message, "
    "NULL::TIMESTAMPTZ AS created_at, NULL::VARCHAR AS segment LIMIT 0"
)




def _files(backend: Backend, keys: Sequence[str]) -> str:
    return "[" + ", ".join(literal(backend.local_path(k)) for k in keys) + "]"


@dataclass
class CatalogSources:
    """The files the catalog reads, and the views over them."""

    signature: tuple
    views: dict[str, str]


def _set_sql(backend: Backend, sd: SetDir, snap: Snapshot) -> tuple[list[str], str | None]:
    """(commits branches, embeddings branch) of one set."""
    mod, key = literal(sd.modality), literal(sd.encoder_key)
    commits = []
    for seg in snap.segments:
        if not seg.parts:
            continue
        commits.append(
            f"SELECT {mod} AS modality, {key} AS encoder_key, {literal(seg.name)} AS segment, "
            f"{_COMMIT_COLS} FROM read_parquet({_files(backend, [p.key for p in seg.parts])})"
        )
    if not commits:
        return [], None
    order = snap.ordered_segments()
    if order is not None:
        # Parts in study_id order, ranges disjoint: a part's rows are rows base .. base + n - 1
        # of the set, in file order.
        branches, base = [], 0
        for i in order:
            for p in snap.segments[i].parts:
                if not p.rows:
                    continue
                branches.append(
                    f"SELECT study_id, patient_id, {mod} AS modality, {key} AS encoder_key, "
                    f"content_hash, cache_key, CAST(file_row_number + {base} AS BIGINT) AS row, "
                    f"created_at FROM read_parquet({literal(backend.local_path(p.key))}, "
                    "file_row_number = true)"
                )
                base += p.rows
        return commits, " UNION ALL ".join(branches)
    rows = " UNION ALL ".join(commits)
    emb = (
        "SELECT study_id, patient_id, modality, encoder_key, content_hash, cache_key, "
        "CAST(row_number() OVER (ORDER BY study_id) - 1 AS BIGINT) AS row, created_at FROM ("
        f"SELECT * FROM ({rows}) QUALIFY row_number() OVER (PARTITION BY study_id "
        "ORDER BY created_at DESC, segment DESC, array_row DESC) = 1)"
    )
    return commits, emb


def catalog_sources(backend: Backend) -> CatalogSources:
    """The views over the store's current files and a signature of those files (listing only:
    part names are write-once, so the same names mean the same contents)."""
    sig: list = []
    commits: list[str] = []
    embeddings: list[str] = []
    for sd in set_dirs(backend):
        snap = sd.snapshot()
        sig.append((sd.name, tuple((s.name, tuple(p.key for p in s.parts)) for s in snap.segments)))
        c, e = _set_sql(backend, sd, snap)
        commits += c
        if e is not None:
            embeddings.append(e)
    failure_keys = []
    for seg in backend.list(FAILURES_DIR):
        prefix = f"{FAILURES_DIR}/{seg}"
        failure_keys += [f"{prefix}/{n}" for _, _, n in live_parts(backend.list(prefix))]
    sig.append(tuple(failure_keys))
    views = {
        "commits": " UNION ALL ".join(commits) if commits else _EMPTY_COMMITS,
        "embeddings": " UNION ALL ".join(f"({e})" for e in embeddings) if embeddings
        else _EMPTY_EMBEDDINGS,
        "failures": (f"SELECT * FROM read_parquet({_files(backend, failure_keys)})"
                     if failure_keys else _EMPTY_FAILURES),
    }
    return CatalogSources(tuple(sig), views)
