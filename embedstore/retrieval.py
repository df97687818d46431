"""Store-level FAISS use: one index per embedding set under STORE/index/, neighbours for review.

``STORE/index/<modality>-<encoder_key>.faiss`` (+ ``.json`` sidecar) indexes the set's live rows
in the order ``Store.load`` returns them (by study_id). The index is a cache: it is rebuilt when
it is missing, corrupt, or *stale*. Stale means the set's live rows changed, detected without
reading a vector: the set digest is a sha256 over the live rows' study ids, cache keys and
per-row CRC-32s (the commit log's checksum of each stored vector), so it changes whenever a row
is added, superseded, removed or rewritten with other bytes, and costs ~20 ms at 10^6 rows on
top of listing the live rows, which any read of the set does anyway. The bytes behind each CRC
are the store's to check (``embedstore verify``).

Building streams the set in chunks through ``Store.load(study_ids=...)`` (``StoreSource``), so
memory is the index plus one chunk, never the whole set beside it. ``neighbors`` opens the index
by memory map after a quick check (file size and the hash of its ends), fetches the one query
vector through ``Store.load(study_ids=[...])`` and the hits' manifest rows in one SQL query.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedstore.errors import ConfigError, FaissIndexError, StoreFormatError, StoreNotFoundError
from embedstore.index import EmbeddingIndex, ProgressFn
from embedstore.index_io import get_or_build_index, read_sidecar
from embedstore.store import Store, open_store
from embedstore.store.format import check_modality
from embedstore.store.segment import SetDir, set_dirs

__all__ = [
    "INDEX_DIR",
    "SetRows",
    "StoreSource",
    "index_path",
    "resolve_set",
    "store_index",
    "build_store_index",
    "neighbors",
]

INDEX_DIR = "index"
_DIGEST_VERSION = b"embedstore-set-digest/2"


# ----------------------------------------------------------------------------- set identity


def _hash_column(h: Any, col: pa.ChunkedArray | pa.Array) -> None:
    """Feed one column's values (not its memory layout) to ``h``."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    h.update(f"|{arr.type}|{len(arr)}|{arr.null_count}|".encode())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        bufs = arr.buffers()
        width = np.int32 if pa.types.is_string(arr.type) else np.int64
        offs = np.frombuffer(bufs[1], dtype=width)[arr.offset : arr.offset + len(arr) + 1]
        h.update((offs - offs[0]).astype(np.int64).tobytes())  # (N + 1,) string boundaries
        if bufs[2] is not None:
            h.update(memoryview(bufs[2])[int(offs[0]) : int(offs[-1])])
    else:
        h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())


class SetRows:
    """The live rows of one set, read once: their study ids (sorted, the index's position
    order) and, on demand, the set digest that identifies them."""

    def __init__(self, store: Store, modality: str, encoder_key: str):
        sd = SetDir(store.backend, check_modality(modality), str(encoder_key))
        if not sd.exists():
            have = [s.name for s in set_dirs(store.backend)]
            raise StoreNotFoundError(
                f"No embedding set {sd.name!r} in store {str(store.root)!r}. "
                f"Available: {have or 'none (run `embedstore extract` first)'}."
            )
        doc = sd.doc()
        live = sd.live()
        self.modality, self.encoder_key = sd.modality, sd.encoder_key
        self.dim, self.dtype = int(doc["dim"]), str(doc["dtype"])
        # keep only what identifies the rows: study id, the (immutable) segment and array row
        # each live row sits in, and when it was written
        seg_names = np.array([sg.name for sg in live.segments], dtype=object)
        self._study_ids = live.study_id
        self._ident = [
            pa.array(seg_names[live.seg] if len(live.segments) else [], pa.string()),
            pa.array(np.asarray(live.array_row, dtype=np.int64)),
            pa.array(np.asarray(live.created_at, dtype=np.int64)),
        ]
        self._digest: str | None = None

    @property
    def n(self) -> int:
        return len(self._study_ids)

    @property
    def study_ids(self) -> pa.Array:
        return self._study_ids

    def position(self, study_id: str) -> int | None:
        i = pc.index(self.study_ids, pa.scalar(str(study_id), self.study_ids.type)).as_py()
        return None if i < 0 else int(i)

    @property
    def digest(self) -> str:
        """sha256 over the set's name, dim, dtype and live (study_id, segment, array row, created_at) rows."""
        if self._digest is None:
            h = hashlib.sha256(_DIGEST_VERSION)
            h.update(f"|{self.modality}|{self.encoder_key}|{self.dim}|{self.dtype}|".encode())
            for col in (self._study_ids, *self._ident):
                _hash_column(h, col)
            self._digest = h.hexdigest()
        return self._digest

    def describe(self) -> dict:
        return {"modality": self.modality, "encoder_key": self.encoder_key, "rows": self.n,
                "dim": self.dim, "dtype": self.dtype, "digest": self.digest}


class StoreSource:
    """A ``VectorSource`` over a set's live rows, read in chunks through ``Store.load``."""

    def __init__(self, store: Store, rows: SetRows):
        self._store, self._rows = store, rows

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows.n, self._rows.dim

    def read(self, start: int, stop: int) -> np.ndarray:
        want = self._rows.study_ids[start:stop]
        es = self._store.load(self._rows.modality, self._rows.encoder_key,
                              study_ids=want.to_pylist())
        got = es.meta["study_id"].combine_chunks()
        if len(got) != len(want) or not got.equals(want):
            raise StoreFormatError(
                f"Embedding set {self._rows.modality}/{self._rows.encoder_key} changed while its "
                "index was being built (rows were added or superseded); run the command again.")
        return es.vectors  # (stop - start, D) float32, ours to modify


# ----------------------------------------------------------------------------- the set's index


def index_path(store: Store, modality: str, encoder_key: str) -> Path:
    """``STORE/index/<modality>-<encoder_key>.faiss``."""
    return store.root / INDEX_DIR / f"{check_modality(modality).lower()}-{encoder_key}.faiss"


def resolve_set(store: Store, *, encoder_key: str | None, modality: str | None) -> tuple[str, str]:
    """(modality, encoder_key) of one embedding set; the only one when a choice is not given."""
    sets = [(sd.modality, sd.encoder_key) for sd in set_dirs(store.backend)]
    hits = [(m, e) for m, e in sets
            if (encoder_key is None or e == encoder_key)
            and (modality is None or m.upper() == modality.upper())]
    if len(hits) == 1:
        return hits[0]
    avail = ", ".join(f"{m}/{e}" for m, e in sets) or "none (run `embedstore extract`)"
    if not hits:
        raise ConfigError(f"No embedding set matches modality={modality!r} encoder={encoder_key!r}. "
                          f"Available: {avail}.")
    raise ConfigError(f"Several embedding sets match; pass --encoder (and --modality). Available: {avail}.")


def store_index(store: Store, modality: str, encoder_key: str, *, rows: SetRows | None = None,
                verify: str = "full", progress: ProgressFn | None = None, **build_kwargs: Any
                ) -> tuple[EmbeddingIndex, bool, Path, pa.Array]:
    """The checked (or freshly rebuilt) index of a set: index, rebuilt, path, study ids by
    position. With no ``build_kwargs``, a rebuild reuses the options the previous index was
    built with (``index build --kind ivfpq`` stays IVF-PQ after new rows arrive)."""
    rows = rows or SetRows(store, modality, encoder_key)
    if rows.n == 0:
        raise StoreFormatError(f"Embedding set {rows.modality}/{rows.encoder_key} has no committed rows.")
    path = index_path(store, rows.modality, rows.encoder_key)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not build_kwargs:
        try:
            build_kwargs = dict(read_sidecar(path).get("options") or {})
        except FaissIndexError:
            build_kwargs = {}
    meta = {"store_set": rows.describe()}
    index, rebuilt = get_or_build_index(path, StoreSource(store, rows), None, meta,
                                        source_checksum=rows.digest, verify=verify,
                                        progress=progress, **build_kwargs)
    return index, rebuilt, path, rows.study_ids


def build_store_index(store_path: str | os.PathLike[str], *, encoder_key: str,
                      modality: str | None = None, kind: str | None = None,
                      nlist: int | None = None, pq_m: int | None = None,
                      pq_nbits: int | None = None, nprobe: int | None = None,
                      train_size: int | None = None, threads: int | None = None,
                      progress: ProgressFn | None = None) -> dict[str, Any]:
    """Build (or fully verify and reuse) the index of one set. Options left None keep what the
    existing index was built with (``auto`` for a first build). Returns what was done and how
    the index was built (the sidecar's build section)."""
    store = open_store(store_path)
    mod, key = resolve_set(store, encoder_key=encoder_key, modality=modality)
    asked = {"kind": kind, "nlist": nlist, "pq_m": pq_m, "pq_nbits": pq_nbits, "nprobe": nprobe,
             "train_size": train_size}
    build_kwargs = {k: v for k, v in asked.items() if v is not None}
    if threads is not None:
        build_kwargs["threads"] = threads
    index, rebuilt, path, _ = store_index(store, mod, key, verify="full", progress=progress,
                                          **build_kwargs)
    return {"rebuilt": rebuilt, "rebuild_reason": index.rebuild_reason, "kind": index.kind,
            "ntotal": index.ntotal, "path": str(path), **index.describe()}


# ----------------------------------------------------------------------------- neighbours


def _manifest_rows(store: Store, study_ids: list[str]) -> dict[str, dict]:
    """Manifest rows of a few studies, in one SQL query over manifest.parquet (the ``studies``
    view's source) rather than building the whole catalog for k rows."""
    if not study_ids or store.manifest_schema() is None:  # (ManifestCorruptError if damaged)
        return {}
    import duckdb

    con = duckdb.connect(":memory:", config={"threads": 2, "memory_limit": "512MB",
                                             "autoload_known_extensions": False,
                                             "autoinstall_known_extensions": False})
    try:
        t = con.sql("SELECT * FROM read_parquet($path) WHERE study_id IN (SELECT unnest($ids))",
                    params={"path": str(store.manifest_path), "ids": study_ids}).to_arrow_table()
    finally:
        con.close()
    return {str(r["study_id"]): r for r in t.to_pylist()}


def neighbors(store_path: str | os.PathLike[str], study_id: str, *, k: int = 10,
              encoder_key: str | None = None) -> list[dict[str, Any]]:
    """The k nearest stored studies (cosine) to ``study_id``: one dict per neighbour with
    ``rank``, ``study_id``, ``cosine`` and every manifest column but ``path``."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise FaissIndexError(f"k must be a positive integer, got {k!r}.", reason="bad_k")
    store = open_store(store_path)
    options = []
    for sd in set_dirs(store.backend):
        if encoder_key in (None, sd.encoder_key):
            rows = SetRows(store, sd.modality, sd.encoder_key)
            if rows.position(study_id) is not None:
                options.append(rows)
    if not options:
        raise ConfigError(f"Study {study_id!r} has no stored embedding"
                          + (f" for encoder {encoder_key!r}" if encoder_key else "") + ".")
    if len(options) > 1:
        raise ConfigError(f"Study {study_id!r} has embeddings from several encoders "
                          f"({', '.join(r.encoder_key for r in options)}); pass --encoder.")
    rows = options[0]
    if k > rows.n - 1:
        raise FaissIndexError(
            f"k={k} but set {rows.modality}/{rows.encoder_key} holds {rows.n} studies, "
            f"{rows.n - 1} besides {study_id!r}; ask for -k {max(1, rows.n - 1)} or fewer.",
            reason="bad_k")
    index, _, _, ids = store_index(store, rows.modality, rows.encoder_key, rows=rows, verify="quick")
    q = store.load(rows.modality, rows.encoder_key, study_ids=[study_id]).vectors  # (1, D)
    while True:
        scores, pos = index.search(q, k + 1)  # (1, k + 1): the study itself is usually first
        keep = [(int(p), float(s)) for p, s in zip(pos[0], scores[0], strict=True) if p >= 0]
        names = ids.take(pa.array([p for p, _ in keep], pa.int64())).to_pylist() if keep else []
        hits = [(h, s) for h, (_, s) in zip(names, keep, strict=True) if h != study_id][:k]
        ivf = _ivf_of(index)
        if len(hits) >= k or ivf is None or ivf.nprobe >= ivf.nlist:
            break
        ivf.nprobe = min(ivf.nlist, 2 * ivf.nprobe)  # the probed lists held fewer than k + 1
    meta = _manifest_rows(store, [h for h, _ in hits])
    return [{"rank": i + 1, "study_id": h, "cosine": round(s, 4), **{
        c: v for c, v in meta.get(h, {}).items() if c not in ("study_id", "path")}}
        for i, (h, s) in enumerate(hits)]


def _ivf_of(index: EmbeddingIndex) -> Any:
    if index.kind not in ("ivf", "ivfpq", "opq") or index.on_gpu:
        return None
    import faiss

    return faiss.extract_index_ivf(index.faiss_index)
