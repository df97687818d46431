"""Opening a store and reading it: open_store, Store, and the values it returns."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore._fsio import atomic_path, atomic_write_bytes, tree_size
from embedstore.errors import (
    ConfigError,
    ManifestCorruptError,
    ManifestError,
    QueryError,
    StoreCorruptError,
    StoreDocCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
from embedstore.statefile import parquet_state_schema, read_json_state, read_parquet_state
from embedstore.store import maintenance
from embedstore.store._arrow import from_np, strings, table
from embedstore.store._backend import LocalBackend
from embedstore.store.commitlog import FAILURES_SCHEMA, PartInfo, live_parts, read_parts
from embedstore.store.format import (
    DEFAULT_CONFIG,
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
    store_config,
    utcnow,
)
from embedstore.store.segment import Live, SetDir, read_rows_for, segment_meta, set_dirs
from embedstore.store.writer import StoreWriter

if TYPE_CHECKING:
    from embedstore.catalog import Catalog

_META_COLS = ["patient_id", "cache_key", "content_hash"]


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


class EmbeddingSet:
    """Loaded embeddings: ``vectors`` (N, D) float32, row-aligned ``meta``, ordered by study_id.

    ``meta`` (row, study_id, patient_id, cache_key, content_hash, created_at) is read from the
    commit parts the first time it is used: most callers only need the vectors and study ids,
    and at 10^6 rows the full table would add ~8 % to the memory of the vectors.
    """

    __slots__ = ("modality", "encoder_key", "vectors", "spec", "tokens", "_meta", "_sid",
                 "_load_meta")

    def __init__(self, modality: str, encoder_key: str, vectors: np.ndarray,
                 meta: pa.Table | None, spec: dict, tokens: np.ndarray | None = None, *,
                 study_id: pa.Array | None = None,
                 load_meta: Callable[[], pa.Table] | None = None):
        if meta is None and (study_id is None or load_meta is None):
            raise ValueError("EmbeddingSet needs meta, or study_id and load_meta")
        self.modality = modality
        self.encoder_key = encoder_key
        self.vectors = vectors
        self.spec = spec
        self.tokens = tokens
        self._meta = meta
        self._sid = meta["study_id"].combine_chunks() if meta is not None else study_id
        self._load_meta = load_meta

    def __repr__(self) -> str:
        return (f"EmbeddingSet({self.modality}/{self.encoder_key}, vectors={self.vectors.shape}, "
                f"tokens={None if self.tokens is None else self.tokens.shape})")

    @property
    def meta(self) -> pa.Table:
        if self._meta is None:
            self._meta = self._load_meta()
            self._load_meta = None
        return self._meta

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def study_ids(self) -> list[str]:
        return self._sid.to_pylist()


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
            "config": dict(DEFAULT_CONFIG),
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
    doc = read_store_doc(doc_path)
    if doc.get("format") != FORMAT_NAME:
        raise StoreFormatError(f"{str(doc_path)!r} does not describe an embedstore store.")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        newer = isinstance(version, int) and version > SCHEMA_VERSION
        if version == 1:
            raise StoreFormatError(
                f"Store {str(root)!r} has schema_version 1 (JSON commit logs); this embedstore "
                f"reads schema_version {SCHEMA_VERSION}. Upgrade it in place with `embedstore "
                f"upgrade {root}` (rewrites the commit logs as Parquet parts; vectors are not "
                "copied; the store stays readable by nothing older afterwards)."
            )
        raise StoreFormatError(
            f"Store {str(root)!r} has schema_version {version!r}; this embedstore reads "
            f"schema_version {SCHEMA_VERSION}. "
            + ("Upgrade embedstore." if newer else "Re-extract into a new store."),
            reason="bad_version",
        )
    return Store(root, doc)


def read_store_doc(doc_path: Path) -> dict:
    """``store.json`` through the state-file loader (StoreDocCorruptError, a StoreFormatError)."""
    fix = ("Restore it from a backup, or write it again as "
           f'{{"format": "{FORMAT_NAME}", "schema_version": {SCHEMA_VERSION}, "config": {{}}}} '
           "(it holds no data: vectors, commit parts and runs are untouched).")
    return read_json_state(doc_path, "Store document", fix=fix, error=StoreDocCorruptError,
                           required=("format", "schema_version"))


#: What the user does about a damaged store manifest (extract without --shard replaces it).
MANIFEST_FIX = ("Attach the cohort's manifest again: `embedstore extract STORE --manifest "
                "<your manifest> ...` replaces the store's copy (committed embeddings are kept and "
                "not computed again).")
#: Columns every attached manifest has (validate_manifest checked them when it was attached).
MANIFEST_STATE_COLUMNS = ("patient_id", "study_id", "modality")


class Store:
    """An opened store folder. Cheap to create; reads nothing until asked."""

    def __init__(self, root: Path, doc: dict):
        self.root = root
        self.doc = doc
        self.backend = LocalBackend(root)
        self.config = store_config(doc)
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
    def attach_manifest(
        self, table: Any, *, pair_max_gap_hours: float | None = None, pairing: Any = None,
    ) -> None:
        """Copy a manifest (pyarrow.Table or Manifest) into the store; it backs `studies`/`pairs`.

        ``pairing`` (an embedstore.pairing.PairingRule) or ``pair_max_gap_hours`` sets the rule of
        the ``pairs`` view; with neither, the rule already stored is kept (a re-extraction does
        not reset what `embedstore pairs` set), else the default rule applies.
        """
        from embedstore.manifest import validate_manifest
        from embedstore.pairing import PairingRule

        if hasattr(table, "table") and isinstance(table.table, pa.Table):
            table = table.table
        if not isinstance(table, pa.Table):
            raise ManifestError(f"attach_manifest wants a pyarrow.Table, got {type(table).__name__}.")
        table = validate_manifest(table, check_paths=False)
        if pairing is not None and pair_max_gap_hours is not None:
            raise ConfigError("Give pairing or pair_max_gap_hours, not both.")
        if pairing is None:
            try:
                rule = self.pairing_rule()
            except ManifestCorruptError:
                rule = PairingRule()  # the damaged copy's rule cannot be read: the default
            if pair_max_gap_hours is not None:
                if not (isinstance(pair_max_gap_hours, int | float) and pair_max_gap_hours > 0):
                    raise ConfigError(
                        f"pair_max_gap_hours must be positive, got {pair_max_gap_hours!r}.")
                rule = PairingRule(**{**rule.to_dict(), "max_gap_hours": pair_max_gap_hours})
        elif isinstance(pairing, PairingRule):
            rule = pairing
        else:
            raise ConfigError(f"pairing must be a PairingRule, got {type(pairing).__name__}.")
        self._write_manifest(table, rule)

    def _write_manifest(self, table: pa.Table, rule: Any) -> None:
        """The one write path of STORE/manifest.parquet: the table plus the store's metadata
        (pairing rule, attach time) in one atomic replace."""
        meta = {"pair_max_gap_hours": rule.max_gap_hours, "pairing": rule.to_dict(),
                "attached_at": iso(utcnow())}
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), MANIFEST_META_KEY: json.dumps(meta).encode()}
        )
        with atomic_path(self.manifest_path) as tmp:
            pq.write_table(table, tmp)

    def manifest_schema(self) -> tuple[pa.Schema, int] | None:
        """The attached manifest's Arrow schema and row count from its footer (None when no
        manifest is attached); ManifestCorruptError with a reason when it is damaged."""
        if not self.manifest_path.exists():
            return None
        return parquet_state_schema(self.manifest_path, "The store's manifest", fix=MANIFEST_FIX,
                                    required=MANIFEST_STATE_COLUMNS, error=ManifestCorruptError)

    def read_manifest(self, columns: Iterable[str] | None = None) -> pa.Table | None:
        """The attached manifest (or its ``columns``); None when none is attached."""
        if not self.manifest_path.exists():
            return None
        return read_parquet_state(self.manifest_path, "The store's manifest", fix=MANIFEST_FIX,
                                  required=MANIFEST_STATE_COLUMNS, error=ManifestCorruptError,
                                  columns=None if columns is None else list(columns))

    def _manifest_meta(self) -> dict:
        got = self.manifest_schema()
        if got is None:
            return {}
        md = got[0].metadata or {}
        try:
            return json.loads(md.get(MANIFEST_META_KEY, b"{}"))
        except ValueError:
            return {}

    def pairing_rule(self) -> Any:
        """The PairingRule of the `pairs` view (the default one without a stored rule)."""
        from embedstore.pairing import PairingRule

        meta = self._manifest_meta()
        return PairingRule.from_dict(meta.get("pairing") or meta)

    def set_pairing_rule(self, rule: Any) -> None:
        """Replace the `pairs` rule: under the whole-store writer lock (StoreLockedError while
        another process writes), the manifest rewritten atomically with the new rule."""
        from embedstore.pairing import PairingRule
        from embedstore.store.lock import Lock

        if not isinstance(rule, PairingRule):
            raise ConfigError(f"set_pairing_rule wants a PairingRule, got {type(rule).__name__}.")
        lock = Lock(self.root, None).acquire()
        try:
            if not self.manifest_path.exists():
                raise ManifestError(
                    f"Store {str(self.root)!r} has no manifest, so it has no pairs to rule; "
                    "attach one first (`embedstore extract STORE -m MANIFEST ...`).")
            self._write_manifest(pq.read_table(self.manifest_path), rule)
        finally:
            lock.release()

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
        sd = SetDir(self.backend, check_modality(modality), str(encoder_key))
        if not sd.exists():
            have = [s.name for s in set_dirs(self.backend)]
            raise StoreNotFoundError(
                f"No embedding set {sd.name!r} in store {str(self.root)!r}. "
                f"Available: {have or 'none (run `embedstore extract` first)'}."
            )
        return sd

    def _cohort(self, where: str | None, study_ids: Iterable[str] | None) -> pa.Array | None:
        ids = None
        if where is not None:
            ids = self.sql(f"SELECT DISTINCT study_id FROM studies WHERE {where}")["study_id"]
            ids = ids.combine_chunks().cast(pa.string())
        if study_ids is not None:
            wanted = strings([str(s) for s in study_ids])
            ids = wanted if ids is None else wanted.filter(pc.is_in(wanted, value_set=ids))
        return ids

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
        Only the selected rows are read (the commit parts' study_id column to find them, then
        their bytes into one preallocated array); ``meta`` is read on first use.
        """
        sd = self._set(modality, encoder_key)
        doc = sd.doc()
        cohort = self._cohort(where, study_ids)
        for attempt in range(2):
            try:
                snap = sd.snapshot()
                live = sd.live(cohort, snap)
                n = live.n
                # Hand the Parquet decode buffers back to the OS before the vectors need the
                # memory (pyarrow's allocator keeps freed pages otherwise: ~60 MB at 10^6 rows).
                pa.default_memory_pool().release_unused()
                vectors = np.empty((n, int(doc["dim"])), dtype=np.float32)  # (N, D)
                read_rows_for(self.backend, live, EMBEDDINGS_ARRAY, vectors)
                tokens = None
                if doc.get("tokens_shape"):
                    tokens = np.empty((n, *doc["tokens_shape"]), dtype=np.float32)  # (N, S, Dt)
                    read_rows_for(self.backend, live, TOKENS_ARRAY, tokens)
            except (StoreCorruptError, FileNotFoundError):
                # A compaction or part merge that finished after the snapshot removes what it
                # replaced: read the new files. Damage is reported the second time.
                if attempt == 0:
                    continue
                raise
            break
        return EmbeddingSet(sd.modality, sd.encoder_key, vectors, None, doc.get("spec", {}),
                            tokens, study_id=live.study_id,
                            load_meta=lambda: self._meta_of(sd, live))

    def _meta_of(self, sd: SetDir, live: Live) -> pa.Table:
        """The meta table of loaded rows, from the parts they were loaded from; when a gc removed
        those parts meanwhile, from the current parts holding the same rows (same study_id and
        commit time), or StoreCorruptError telling to load again."""
        try:
            t = segment_meta(self.backend, live, _META_COLS)
        except FileNotFoundError:
            now = sd.live(live.study_id)
            if now.n != live.n or not (now.created_at == live.created_at).all() or \
                    not now.study_id.equals(live.study_id):
                raise StoreCorruptError(
                    f"Rows of set {sd.name!r} were superseded and garbage-collected after they "
                    "were loaded; load the set again.") from None
            t = segment_meta(self.backend, now, _META_COLS)
        created = from_np(live.created_at, pa.timestamp("us", tz="UTC"))
        return table({
            "row": from_np(np.arange(live.n, dtype=np.int64)),
            "study_id": live.study_id,
            "patient_id": t["patient_id"],
            "cache_key": t["cache_key"],
            "content_hash": t["content_hash"],
            "created_at": created,
        })

    def sets(self) -> list[SetInfo]:
        """Every embedding set with its live row count (from the parts' footers when the set is
        ordered; otherwise from a scan of its study_id column)."""
        out = []
        for sd in set_dirs(self.backend):
            doc = sd.doc()
            snap = sd.snapshot()
            if snap.ordered_segments() is not None:
                count = snap.total
            else:
                count = sd.live(snap=snap).n
            out.append(
                SetInfo(
                    modality=sd.modality,
                    encoder_key=sd.encoder_key,
                    dim=int(doc["dim"]),
                    dtype=str(doc["dtype"]),
                    count=count,
                    spec=doc.get("spec", {}),
                    tokens_shape=tuple(doc["tokens_shape"]) if doc.get("tokens_shape") else None,
                    segments=len(snap.segments),
                    superseded=snap.total - count,
                )
            )
        return out

    def failure_parts(self) -> list[PartInfo]:
        out = []
        for seg in self.backend.list(FAILURES_DIR):
            prefix = f"{FAILURES_DIR}/{seg}"
            out += [PartInfo(key=f"{prefix}/{n}", first=a, last=b, rows=0)
                    for a, b, n in live_parts(self.backend.list(prefix))]
        return out

    def failures(self, columns: list[str] | None = None) -> pa.Table:
        """Every failure record (durable ones: a killed writer's unflushed records are lost)."""
        for _attempt in range(3):
            try:
                return read_parts(self.backend, self.failure_parts(), columns, kind="failures")
            except FileNotFoundError:
                continue  # merged meanwhile: list again
        return FAILURES_SCHEMA.empty_table()

    # -- SQL ----------------------------------------------------------------------------------
    def catalog(self, *, memory_limit: str = "2GB", threads: int = 2) -> Catalog:
        """The sandboxed DuckDB catalog, rebuilt when the store's files changed."""
        from embedstore.catalog import Catalog, read_experiments, read_runs
        from embedstore.store.views import catalog_sources

        key = (str(memory_limit), int(threads))
        src = catalog_sources(self.backend)
        sig = (self._manifest_sig(), src.signature, self._runs_sig(), self._experiments_sig())
        cached = self._catalogs.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        if cached is not None:
            cached[1].close()
        cat = Catalog(
            self.root,
            manifest_path=self.manifest_path if self.manifest_path.exists() else None,
            views=src.views,
            tables={"runs": read_runs(self.root / RUNS_DIR),
                    "experiments": read_experiments(self.root / "experiments")},
            pairing=self.pairing_rule(),
            memory_limit=memory_limit,
            threads=threads,
        )
        self._catalogs[key] = (sig, cat)
        return cat

    def _manifest_sig(self) -> tuple | None:
        try:
            st = self.manifest_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _experiments_sig(self) -> tuple:
        d = self.root / "experiments"
        out = []
        if d.is_dir():
            for p in sorted(d.iterdir()):
                try:
                    st = (p / "summary.json").stat()
                    out.append((p.name, st.st_mtime_ns, st.st_size))
                except (FileNotFoundError, NotADirectoryError):
                    pass
        return tuple(out)

    def _runs_sig(self) -> tuple:
        sig = []
        d = self.root / RUNS_DIR
        if d.is_dir():
            for p in sorted(d.iterdir()):
                try:
                    st = (p / "config.json").stat()
                    sig.append((p.name, st.st_mtime_ns, st.st_size))
                    st = (p / "metrics.json").stat()
                    sig.append((st.st_mtime_ns, st.st_size))
                except (FileNotFoundError, NotADirectoryError):
                    sig.append((p.name,))
        return tuple(sig)

    def sql(self, sql: str, *, timeout_s: float = 30, memory_limit: str = "2GB") -> pa.Table:
        """Run one read-only SELECT over the catalog views; QueryRefusedError / QueryError."""
        try:
            return self.catalog(memory_limit=memory_limit).sql(sql, timeout_s=timeout_s)
        except QueryError as e:
            if e.reason != "files_changed":
                raise
        self.refresh()  # a gc replaced files the views named: build them again
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
        fails = self.failures(["reason"])
        by_reason: dict[str, int] = {}
        for r in fails["reason"].to_pylist():
            by_reason[r] = by_reason.get(r, 0) + 1
        sets = self.sets()
        got = self.manifest_schema()
        manifest_rows = None if got is None else got[1]
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
        self, *, dry_run: bool = True, keep_sets: Iterable[str] | None = None,
        drop_unreferenced: bool = False,
    ) -> maintenance.GcReport:
        """List (dry run) or remove superseded rows, orphan temp files and empty segments.
        Rows of studies missing from the manifest are listed and kept unless
        ``drop_unreferenced`` (a replaced manifest must not silently cost embeddings).
        ``keep_sets``: "MODALITY/encoder_key" names to keep; when given, every other set is
        removed. Removal needs the whole-store lock."""
        return maintenance.gc(self, dry_run=dry_run, keep_sets=keep_sets,
                              drop_unreferenced=drop_unreferenced)
