"""Opening a store and reading it: open_store, Store, and the values it returns."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._fsio import atomic_path, atomic_write_bytes, tree_size
from embedstore.catalog import (
    DEFAULT_PAIR_MAX_GAP_HOURS,
    EMBEDDINGS_SCHEMA,
    FAILURES_SCHEMA,
    Catalog,
    read_runs,
)
from embedstore.errors import (
    ConfigError,
    ManifestError,
    StoreFormatError,
    StoreNotFoundError,
)
from embedstore.store import maintenance
from embedstore.store.format import (
    COMMITS_FILE,
    EMBEDDINGS_ARRAY,
    FAILURES_DIR,
    FORMAT_NAME,
    MANIFEST_FILE,
    MANIFEST_META_KEY,
    RUNS_DIR,
    SCHEMA_VERSION,
    STORE_DOC,
    STORE_SUBDIRS,
    TOKENS_ARRAY,
    check_modality,
    iso,
    micros,
    utcnow,
)
from embedstore.store.segment import SetDir, read_rows_for, set_dirs
from embedstore.store.writer import StoreWriter


@dataclass(frozen=True)
class SetInfo:
    """One embedding set: all rows of one (modality, encoder key)."""

    modality: str
    encoder_key: str
    dim: int
    dtype: str
    count: int
    spec: dict
    tokens_shape: tuple[int, ...] | None = None
    segments: int = 0
    superseded: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_shape"] = list(self.tokens_shape) if self.tokens_shape else None
        return d


@dataclass(frozen=True)
class EmbeddingSet:
    """Loaded embeddings: ``vectors`` (N, D) float32, row-aligned ``meta``, ordered by study_id."""

    modality: str
    encoder_key: str
    vectors: np.ndarray
    meta: pa.Table
    spec: dict
    tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def study_ids(self) -> list[str]:
        return self.meta["study_id"].to_pylist()


def open_store(path: str | os.PathLike[str], *, create: bool = False) -> Store:
    """Open the store at ``path`` (creating an empty one when ``create``).

    Raises StoreNotFoundError when there is no store and ``create`` is false, and
    StoreFormatError when ``store.json`` is not an embedstore store of a readable schema_version.
    """
    root = Path(path).expanduser().resolve()
    doc_path = root / STORE_DOC
    if not doc_path.exists():
        if not create:
            raise StoreNotFoundError(
                f"No embedstore store at {str(root)!r} (no store.json). Create one with "
                "`embedstore extract STORE ...` or open_store(path, create=True)."
            )
        if root.exists() and not root.is_dir():
            raise StoreFormatError(f"Store path {str(root)!r} exists and is not a folder.")
        if root.is_dir() and any(root.iterdir()) and not doc_path.exists():  # (another creator?)
            raise StoreFormatError(
                f"Folder {str(root)!r} is not empty and is not an embedstore store; "
                "choose an empty or new folder."
            )
    if not doc_path.exists():
        # Build the skeleton beside the target and rename it into place: two processes creating
        # the same store at once (sharded extraction) then agree on one, and neither sees the
        # other's half-made folder as "not a store".
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for sub in STORE_SUBDIRS:
            (tmp / sub).mkdir()
        doc = {
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "created_at": iso(utcnow()),
        }
        atomic_write_bytes(tmp / STORE_DOC, json.dumps(doc, indent=2).encode())
        try:
            os.rename(tmp, root)  # replaces a missing or empty folder atomically
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not doc_path.exists():
                raise StoreFormatError(
                    f"Folder {str(root)!r} is not empty and is not an embedstore store; "
                    "choose an empty or new folder."
                ) from None
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{str(doc_path)!r} is unreadable ({e}).") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{str(doc_path)!r} does not describe an embedstore store.")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        raise StoreFormatError(
            f"Store {str(root)!r} has schema_version {version!r}; this embedstore reads "
            f"schema_version {SCHEMA_VERSION}. "
            + ("Upgrade embedstore." if newer else "Re-extract into a new store.")
        )
    return Store(root, doc)


class Store:
    """An opened store folder. Cheap to create; reads nothing until asked."""

    def __init__(self, root: Path, doc: dict):
        self.root = root
        self.doc = doc
        self._catalogs: dict[tuple[str, int], tuple[tuple, Catalog]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    @property
    def runs_dir(self) -> Path:
        d = self.root / RUNS_DIR
        d.mkdir(exist_ok=True)
        return d

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_FILE

    # -- manifest -----------------------------------------------------------------------------
    def attach_manifest(self, table: Any, *, pair_max_gap_hours: float | None = None) -> None:
        """Copy a manifest (pyarrow.Table or Manifest) into the store; it backs `studies`/`pairs`."""
        from embedstore.manifest import validate_manifest

        if hasattr(table, "table") and isinstance(table.table, pa.Table):
            table = table.table
        if not isinstance(table, pa.Table):
            raise ManifestError(f"attach_manifest wants a pyarrow.Table, got {type(table).__name__}.")
        table = validate_manifest(table, check_paths=False)
        gap = DEFAULT_PAIR_MAX_GAP_HOURS if pair_max_gap_hours is None else float(pair_max_gap_hours)
        if not gap > 0:
            raise ConfigError(f"pair_max_gap_hours must be positive, got {pair_max_gap_hours!r}.")
        meta = {"pair_max_gap_hours": gap, "attached_at": iso(utcnow())}
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), MANIFEST_META_KEY: json.dumps(meta).encode()}
        )
        with atomic_path(self.manifest_path) as tmp:
            pq.write_table(table, tmp)

    def _manifest_meta(self) -> dict:
        if not self.manifest_path.exists():
            return {}
        md = pq.read_schema(self.manifest_path).metadata or {}
        try:
            return json.loads(md.get(MANIFEST_META_KEY, b"{}"))
        except ValueError:
            return {}

    # -- writing ------------------------------------------------------------------------------
    def writer(
        self,
        modality: str,
        encoder_key: str,
        *,
        dim: int,
        spec: Mapping[str, Any],
        dtype: str = "float32",
        capacity: int | None = None,
        lock_scope: str | None = None,
        tokens_shape: tuple[int, ...] | None = None,
        **options: Any,
    ) -> StoreWriter:
        """A writer for one set (context manager). ``options``: chunk_rows, flush_rows,
        flush_interval_s, durability ("full" | "commit"). Raises StoreLockedError when another process holds the lock scope."""
        return StoreWriter(
            self,
            modality,
            encoder_key,
            dim=dim,
            spec=spec,
            dtype=dtype,
            capacity=capacity,
            lock_scope=lock_scope,
            tokens_shape=tokens_shape,
            **options,
        )

    # -- reading ------------------------------------------------------------------------------
    def _set(self, modality: str, encoder_key: str) -> SetDir:
        sd = SetDir(self.root, check_modality(modality), str(encoder_key))
        if not sd.exists():
            have = [s.name for s in set_dirs(self.root)]
            raise StoreNotFoundError(
                f"No embedding set {sd.name!r} in store {str(self.root)!r}. "
                f"Available: {have or 'none (run `embedstore extract` first)'}."
            )
        return sd

    def load(
        self,
        modality: str,
        encoder_key: str,
        *,
        where: str | None = None,
        study_ids: Iterable[str] | None = None,
    ) -> EmbeddingSet:
        """Load a set (optionally a cohort) as one contiguous float32 array, ordered by study_id.

        ``where`` is a SQL predicate over the ``studies`` view; ``study_ids`` restricts further.
        """
        sd = self._set(modality, encoder_key)
        doc = sd.doc()
        live = sd.live()
        table = live.table
        if where is not None:
            ids = self.sql(f"SELECT DISTINCT study_id FROM studies WHERE {where}")["study_id"]
            table = table.filter(pc.is_in(table["study_id"], value_set=ids.combine_chunks()))
        if study_ids is not None:
            wanted = pa.array([str(s) for s in study_ids], pa.string())
            table = table.filter(pc.is_in(table["study_id"], value_set=wanted))
        n = table.num_rows
        vectors = np.empty((n, int(doc["dim"])), dtype=np.float32)  # (N, D)
        read_rows_for(table, live.segments, EMBEDDINGS_ARRAY, vectors)
        tokens = None
        if doc.get("tokens_shape"):
            tokens = np.empty((n, *doc["tokens_shape"]), dtype=np.float32)  # (N, S, Dt)
            read_rows_for(table, live.segments, TOKENS_ARRAY, tokens)
        meta = pa.table(
            {
                "row": pa.array(np.arange(n, dtype=np.int64)),
                "study_id": table["study_id"],
                "patient_id": table["patient_id"],
                "cache_key": table["cache_key"],
                "content_hash": table["content_hash"],
                "created_at": table["created_at"],
            }
        )
        return EmbeddingSet(sd.modality, sd.encoder_key, vectors, meta, doc.get("spec", {}), tokens)

    def sets(self) -> list[SetInfo]:
        """Every embedding set with its live row count."""
        out = []
        for sd in set_dirs(self.root):
            doc = sd.doc()
            live = sd.live()
            out.append(
                SetInfo(
                    modality=sd.modality,
                    encoder_key=sd.encoder_key,
                    dim=int(doc["dim"]),
                    dtype=str(doc["dtype"]),
                    count=live.table.num_rows,
                    spec=doc.get("spec", {}),
                    tokens_shape=tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None,
                    segments=len(live.segments),
                    superseded=live.superseded,
                )
            )
        return out

    def failures(self) -> pa.Table:
        """Every failure record (torn last lines of a killed writer are skipped)."""
        rows = []
        fdir = self.root / FAILURES_DIR
        if fdir.is_dir():
            for p in sorted(fdir.glob("*.jsonl")):
                for line in p.read_bytes().split(b"\n"):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    rec["created_at"] = micros(rec["created_at"]) if rec.get("created_at") else None
                    rows.append(rec)
        cols = {}
        for f in FAILURES_SCHEMA:
            vals = [r.get(f.name) for r in rows]
            if f.name == "created_at":
                cols[f.name] = pa.array(vals, pa.int64()).cast(f.type)
            else:
                cols[f.name] = pa.array([None if v is None else str(v) for v in vals], f.type)
        return pa.table(cols, schema=FAILURES_SCHEMA)

    # -- SQL ----------------------------------------------------------------------------------
    def _signature(self) -> tuple:
        sig: list = []
        for p in [self.manifest_path]:
            st = p.stat() if p.exists() else None
            sig.append(None if st is None else (st.st_mtime_ns, st.st_size))
        for sd in set_dirs(self.root):
            for seg in sd.segments():
                log = seg / COMMITS_FILE
                sig.append((seg.name, log.stat().st_size if log.exists() else -1))
        for sub in (FAILURES_DIR, RUNS_DIR):
            d = self.root / sub
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    q = p / "config.json" if p.is_dir() else p
                    try:
                        st = q.stat()
                        sig.append((p.name, st.st_mtime_ns, st.st_size))
                    except FileNotFoundError:
                        sig.append((p.name,))
        return tuple(sig)

    def _embeddings_table(self) -> pa.Table:
        parts = []
        for sd in set_dirs(self.root):
            t = sd.live().table
            n = t.num_rows
            parts.append(
                pa.table(
                    {
                        "study_id": t["study_id"],
                        "patient_id": t["patient_id"],
                        "modality": pa.array([sd.modality] * n, pa.string()),
                        "encoder_key": pa.array([sd.encoder_key] * n, pa.string()),
                        "content_hash": t["content_hash"],
                        "cache_key": t["cache_key"],
                        "row": pa.array(np.arange(n, dtype=np.int64)),
                        "created_at": t["created_at"],
                    },
                    schema=EMBEDDINGS_SCHEMA,
                )
            )
        return pa.concat_tables(parts) if parts else EMBEDDINGS_SCHEMA.empty_table()

    def catalog(self, *, memory_limit: str = "2GB", threads: int = 2) -> Catalog:
        """The sandboxed DuckDB catalog, rebuilt when the store's files changed."""
        key = (str(memory_limit), int(threads))
        sig = self._signature()
        cached = self._catalogs.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        if cached is not None:
            cached[1].close()
        gap = self._manifest_meta().get("pair_max_gap_hours", DEFAULT_PAIR_MAX_GAP_HOURS)
        cat = Catalog(
            self.root,
            manifest_path=self.manifest_path if self.manifest_path.exists() else None,
            embeddings=self._embeddings_table(),
            failures=self.failures(),
            runs=read_runs(self.root / RUNS_DIR),
            pair_max_gap_hours=float(gap),
            memory_limit=memory_limit,
            threads=threads,
        )
        self._catalogs[key] = (sig, cat)
        return cat

    def sql(self, sql: str, *, timeout_s: float = 30, memory_limit: str = "2GB") -> pa.Table:
        """Run one read-only SELECT over the catalog views; QueryRefusedError / QueryError."""
        return self.catalog(memory_limit=memory_limit).sql(sql, timeout_s=timeout_s)

    def refresh(self) -> None:
        """Drop the cached catalogs (they are also rebuilt automatically when files change)."""
        for _, cat in self._catalogs.values():
            cat.close()
        self._catalogs.clear()

    # -- info / verify / gc -------------------------------------------------------------------
    def info(self) -> dict:
        """What is in the store: sets with specs and counts, failures by reason, size on disk."""
        size = tree_size(self.root)
        fails = self.failures()
        by_reason: dict[str, int] = {}
        for r in fails["reason"].to_pylist():
            by_reason[r] = by_reason.get(r, 0) + 1
        sets = self.sets()
        manifest_rows = pq.read_metadata(self.manifest_path).num_rows if self.manifest_path.exists() else None
        runs = self.root / RUNS_DIR
        return {
            "root": str(self.root),
            "schema_version": self.doc.get("schema_version"),
            "created_at": self.doc.get("created_at"),
            "manifest_rows": manifest_rows,
            "modalities": sorted({s.modality for s in sets}),
            "encoder_keys": sorted({s.encoder_key for s in sets}),
            "sets": [s.to_dict() for s in sets],
            "segments": sum(s.segments for s in sets),
            "embeddings": sum(s.count for s in sets),
            "failures": {"total": fails.num_rows, "by_reason": dict(sorted(by_reason.items()))},
            "runs": sum(1 for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else 0,
            "size_bytes": size,
        }

    def verify(self) -> maintenance.VerifyReport:
        """Check every committed row (checksum, shape, fill value, metadata); modify nothing."""
        return maintenance.verify(self)

    def gc(
        self, *, dry_run: bool = True, keep_sets: Iterable[str] | None = None
    ) -> maintenance.GcReport:
        """List (dry run) or remove superseded rows, rows/sets no longer referenced, orphan temp
        files and empty segments. ``keep_sets``: "MODALITY/encoder_key" names to keep; when
        given, every other set is unreferenced. Removal needs the whole-store lock."""
        return maintenance.gc(self, dry_run=dry_run, keep_sets=keep_sets)
