"""FAISS indexes over embedding sets, saved with checksums, and retrieval diagnostics.

An index is a cache: it is rebuilt from the store's vectors whenever its file, its sidecar or
the checksum of the vectors it was built from disagree (``get_or_build_index``). Similarity is
cosine by default (inner product on L2-normalised vectors). Exact ``IndexFlatIP`` serves
cohorts up to ``exact_max`` vectors; above that an IVF (or HNSW) index is built and its
recall@10 against exact search on a seeded sample is measured and recorded, widening the search
(``nprobe`` / ``efSearch``) until ``target_recall`` is met.

On disk: ``<path>`` holds ``faiss.serialize_index`` bytes, ``<path>.json`` the sidecar (schema
version, sha256 of the index file, checksum of the source vectors and ids, build parameters,
recall check, caller's meta). The sidecar is written last, so a crash leaves a mismatch, which
reads as "rebuild", never as a silently wrong index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import faiss
import numpy as np

from embedstore._fsio import atomic_write_bytes
from embedstore.errors import ConfigError, FaissIndexError

__all__ = [
    "INDEX_SCHEMA_VERSION",
    "KINDS",
    "METRICS",
    "EmbeddingIndex",
    "build_index",
    "save_index",
    "load_index",
    "get_or_build_index",
    "vectors_checksum",
    "sidecar_path",
    "retrieval_metrics",
    "shuffled_control",
]

INDEX_SCHEMA_VERSION = 1
KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "hnsw")
METRICS: tuple[str, ...] = ("ip", "l2")
_FAISS_METRIC = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_RECALL_K = 10
_SEARCH_CHUNK_ELEMS = 5_000_000  # queries x database entries per full-ranking chunk (~60 MB)


# ----------------------------------------------------------------------------- helpers


def _as_matrix(x, name: str, dim: int | None = None) -> np.ndarray:
    """float32, C-contiguous (N, D) copy-if-needed, finite, as FAISS requires."""
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{name} must be a numeric (N, D) array: {e}", reason="bad_shape") from e
    if a.ndim != 2 or a.shape[1] == 0:
        raise ConfigError(
            f"{name} must be a 2-D (N, D) array with D > 0, got shape {a.shape}.",
            reason="bad_shape",
        )
    if dim is not None and a.shape[1] != dim:
        raise ConfigError(
            f"{name} have dimension {a.shape[1]} but the index holds {dim}-d vectors; query with "
            "embeddings from the same encoder.",
            reason="dim_mismatch",
        )
    if not np.all(np.isfinite(a)):
        n_bad = int(np.sum(~np.all(np.isfinite(a), axis=1)))
        raise ConfigError(
            f"{n_bad} of {a.shape[0]} rows of {name} contain NaN or infinity; fix them in the store.",
            reason="bad_scores",
        )
    return np.ascontiguousarray(a)


def _l2_normalize(a: np.ndarray) -> np.ndarray:
    """Row-normalised copy; all-zero rows stay zero (cosine 0 with everything)."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # (N, 1)
    return np.ascontiguousarray(a / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def vectors_checksum(vectors, ids: Sequence[str] | None = None) -> str:
    """sha256 hex over the shape and float32 bytes of ``vectors`` (and the ids, when given)."""
    a = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    h = hashlib.sha256()
    h.update(f"float32:{a.shape}".encode())
    h.update(a.tobytes())
    if ids is not None:
        h.update(b"\x00ids\x00")
        h.update("\x1f".join(str(i) for i in ids).encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar next to an index file: ``<path>.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _resolve_gpu(use_gpu: bool | str) -> bool:
    if use_gpu == "auto":
        return _gpu_available()
    if use_gpu is True:
        if not _gpu_available():
            raise FaissIndexError(
                "use_gpu=True but FAISS sees no GPU (faiss-cpu installed or no CUDA device); "
                "install faiss-gpu instead of faiss-cpu, or pass use_gpu='auto'.",
                reason="no_gpu",
            )
        return True
    if use_gpu is False:
        return False
    raise ConfigError(f"use_gpu must be True, False or 'auto', got {use_gpu!r}.")


# ----------------------------------------------------------------------------- the index


class EmbeddingIndex:
    """A FAISS index plus how it was built. Positions 0..N-1 follow the source vectors' order;
    ``ids`` (optional) maps positions to external ids such as study ids."""

    def __init__(
        self,
        index,
        *,
        kind: str,
        metric: str,
        normalize: bool,
        params: Mapping | None = None,
        recall_check: Mapping | None = None,
        ids: Sequence[str] | None = None,
        source_checksum: str | None = None,
        gpu_resources=None,
    ):
        self._index = index
        self._gpu_resources = gpu_resources  # keep alive as long as the GPU index
        self.kind = kind
        self.metric = metric
        self.normalize = normalize
        self.params = dict(params or {})
        self.recall_check = dict(recall_check) if recall_check else None
        self.ids = list(ids) if ids is not None else None
        self.source_checksum = source_checksum
        self.rebuild_reason: str | None = None
        if self.ids is not None and len(self.ids) != index.ntotal:
            raise ConfigError(
                f"Got {len(self.ids)} ids for {index.ntotal} vectors; pass one id per vector.",
                reason="bad_shape",
            )

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    @property
    def faiss_index(self):
        """The underlying FAISS index (for advanced use; prefer ``search``)."""
        return self._index

    def _prepare(self, queries) -> np.ndarray:
        q = _as_matrix(queries, "queries", dim=self.dim)
        return _l2_normalize(q) if self.normalize else q

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, positions (Q, k) int64), best first. Scores are cosine
        similarities for metric 'ip' with normalize=True, squared L2 distances for 'l2'."""
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
            raise FaissIndexError(
                f"k must be an integer between 1 and the index size {self.ntotal}, got {k!r}.",
                reason="bad_k",
            )
        q = self._prepare(queries)  # (Q, D)
        scores, pos = self._index.search(q, int(k))  # (Q, k), (Q, k)
        return scores, pos

    def id_of(self, positions) -> list:
        """External ids for positions returned by ``search`` (positions if no ids were given)."""
        pos = np.asarray(positions).ravel()
        if self.ids is None:
            return [int(p) for p in pos]
        return [self.ids[int(p)] for p in pos]

    def _cpu_index(self):
        return faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index

    def describe(self) -> dict:
        """JSON-ready description (the sidecar's build section)."""
        return {
            "kind": self.kind,
            "metric": self.metric,
            "normalize": self.normalize,
            "dim": self.dim,
            "ntotal": self.ntotal,
            "params": self.params,
            "recall_check": self.recall_check,
        }

    def __repr__(self) -> str:
        where = "gpu" if self.on_gpu else "cpu"
        return f"EmbeddingIndex(kind={self.kind!r}, metric={self.metric!r}, ntotal={self.ntotal}, dim={self.dim}, {where})"


def _default_nlist(n: int) -> int:
    # ~4 sqrt(N) lists, a power of two, with >= 39 training points per centroid (FAISS warns below)
    target = 2 ** int(round(math.log2(max(1.0, 4 * math.sqrt(n)))))
    return int(max(1, min(target, n // 39)))


def _measure_recall(
    index, data: np.ndarray, metric: int, *, sample: int, seed: int
) -> tuple[float, int]:
    """recall@10 of ``index`` vs exact search, on a seeded sample of database rows as queries.

    Each query's own row is dropped from both result lists: it is always found (it sits in its
    own IVF cell), and counting it would inflate recall by up to 1/k."""
    rng = np.random.default_rng(seed)
    n = data.shape[0]
    rows = rng.choice(n, size=min(sample, n), replace=False)  # (S,)
    q = data[rows]  # (S, D)
    k = min(_RECALL_K, n - 1)
    if k < 1:
        return 1.0, int(q.shape[0])
    _, exact = faiss.knn(q, data, k + 1, metric=metric)  # (S, k + 1) brute force, no index copy
    _, approx = index.search(q, k + 1)  # (S, k + 1)
    hits = 0
    for self_id, a, e in zip(rows.tolist(), approx.tolist(), exact.tolist(), strict=True):
        a = [i for i in a if i != self_id][:k]
        e = [i for i in e if i != self_id][:k]
        hits += len(set(a) & set(e))
    return hits / (q.shape[0] * k), int(q.shape[0])


def build_index(
    vectors,
    *,
    kind: str = "auto",
    metric: str = "ip",
    normalize: bool = True,
    use_gpu: bool | str = "auto",
    seed: int = 0,
    ids: Sequence[str] | None = None,
    exact_max: int = 100_000,
    nlist: int | None = None,
    nprobe: int | None = None,
    hnsw_m: int = 32,
    target_recall: float = 0.95,
    recall_sample: int = 1000,
) -> EmbeddingIndex:
    """Index ``vectors`` (N, D). ``kind='auto'`` is exact flat up to ``exact_max`` rows, IVF above.

    Approximate kinds get a recall@10 check against exact search on ``recall_sample`` seeded
    database rows; ``nprobe`` (IVF) or ``efSearch`` (HNSW) doubles until ``target_recall`` is met
    or the search is exhaustive (``target_recall=0`` measures without widening), and the result
    lands in ``index.recall_check``."""
    if kind not in KINDS:
        raise ConfigError(f"Unknown index kind {kind!r}. Available: {', '.join(KINDS)}.")
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}. Available: {', '.join(METRICS)}.")
    if not 0.0 <= target_recall <= 1.0:
        raise ConfigError(
            f"target_recall must lie in [0, 1] (0 = measure only, never widen), got {target_recall}."
        )
    data = _as_matrix(vectors, "vectors")
    if normalize:
        data = _l2_normalize(data)
    n, d = data.shape
    fmetric = _FAISS_METRIC[metric]
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    gpu = _resolve_gpu(use_gpu) and kind != "hnsw"  # FAISS has no GPU HNSW
    params: dict = {"seed": int(seed)}
    t0 = time.perf_counter()

    if kind == "flat":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    elif kind == "ivf":
        nl = int(nlist) if nlist is not None else _default_nlist(n)
        if not 1 <= nl <= n:
            raise ConfigError(f"nlist must lie in [1, N={n}], got {nl}; use fewer lists.")
        quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index = faiss.IndexIVFFlat(quantizer, d, nl, fmetric)
        index.cp.seed = int(seed)  # k-means init is seeded: same vectors + seed -> same index
        index.train(data)
        index.nprobe = int(nprobe) if nprobe is not None else max(1, min(64, nl // 32))
        params.update(nlist=nl)
    else:  # hnsw
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), fmetric)
        index.hnsw.efSearch = 64
        params.update(hnsw_m=int(hnsw_m), ef_construction=int(index.hnsw.efConstruction))
    index.add(data)
    params["build_s"] = round(time.perf_counter() - t0, 4)

    recall_check = None
    if kind in ("ivf", "hnsw"):
        history = []
        while True:
            recall, n_q = _measure_recall(index, data, fmetric, sample=recall_sample, seed=seed)
            knob = index.nprobe if kind == "ivf" else index.hnsw.efSearch
            history.append(
                {"nprobe" if kind == "ivf" else "ef_search": int(knob), "recall@10": recall}
            )
            if recall >= target_recall:
                break
            if kind == "ivf":
                if index.nprobe >= index.nlist:
                    break
                index.nprobe = min(index.nlist, index.nprobe * 2)
            else:
                if index.hnsw.efSearch >= n:
                    break
                index.hnsw.efSearch = min(n, index.hnsw.efSearch * 2)
        recall_check = {
            "recall@10": recall,
            "target": target_recall,
            "met": bool(recall >= target_recall),
            "n_queries": n_q,
            "seed": int(seed),
            "history": history,
        }
        if kind == "ivf":
            params["nprobe"] = int(index.nprobe)
        else:
            params["ef_search"] = int(index.hnsw.efSearch)

    resources = None
    if gpu:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    return EmbeddingIndex(
        index,
        kind=kind,
        metric=metric,
        normalize=normalize,
        params=params,
        recall_check=recall_check,
        ids=ids,
        source_checksum=vectors_checksum(vectors, ids),
        gpu_resources=resources,
    )


# ----------------------------------------------------------------------------- persistence


def save_index(
    index: EmbeddingIndex,
    path: str | os.PathLike,
    *,
    source_checksum: str,
    meta: Mapping | None = None,
) -> Path:
    """Write the index file, then its sidecar JSON (the commit point). Returns the index path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = faiss.serialize_index(index._cpu_index())  # (bytes,) uint8
    atomic_write_bytes(path, blob.tobytes())
    side = {
        "schema_version": INDEX_SCHEMA_VERSION,
        "format": "faiss.serialize_index",
        "faiss_version": faiss.__version__,
        "index_file": path.name,
        "index_sha256": _sha256_file(path),
        "index_bytes": int(blob.size),
        "source_checksum": source_checksum,
        "build": index.describe(),
        "ids": index.ids,
        "meta": dict(meta or {}),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        text = json.dumps(side, indent=1, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Index meta must be JSON-serialisable: {e}", reason="bad_config") from e
    atomic_write_bytes(sidecar_path(path), text.encode())
    index.source_checksum = source_checksum
    return path


def load_index(
    path: str | os.PathLike,
    *,
    expected_source_checksum: str,
    use_gpu: bool | str = "auto",
) -> EmbeddingIndex:
    """Load and verify an index: sidecar schema, file sha256, source checksum, size and dim.

    Raises FaissIndexError with reason ``index_missing``, ``index_corrupt``, ``index_format`` or
    ``index_stale`` (built from other vectors); the fix is always to rebuild from the store."""
    path = Path(path)
    side_p = sidecar_path(path)
    for p in (path, side_p):
        if not p.is_file():
            raise FaissIndexError(
                f"Index file {p} does not exist; build it with build_index/get_or_build_index.",
                reason="index_missing",
            )
    try:
        side = json.loads(side_p.read_text())
        build = side["build"]
        want_sha = side["index_sha256"]
        version = side["schema_version"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FaissIndexError(
            f"Index sidecar {side_p} is unreadable ({type(e).__name__}: {e}); delete it and rebuild.",
            reason="index_corrupt",
        ) from e
    if version != INDEX_SCHEMA_VERSION:
        raise FaissIndexError(
            f"Index {path} has schema version {version!r}, this embedstore reads "
            f"{INDEX_SCHEMA_VERSION}; rebuild it.",
            reason="index_format",
        )
    got_sha = _sha256_file(path)
    if got_sha != want_sha:
        raise FaissIndexError(
            f"Index file {path} is corrupt: sha256 {got_sha[:12]}... does not match the sidecar's "
            f"{str(want_sha)[:12]}...; rebuild it from the store.",
            reason="index_corrupt",
        )
    if side.get("source_checksum") != expected_source_checksum:
        raise FaissIndexError(
            f"Index {path} was built from other vectors (source checksum "
            f"{str(side.get('source_checksum'))[:12]}... != expected {expected_source_checksum[:12]}...); "
            "rebuild it from the current store.",
            reason="index_stale",
        )
    try:
        raw = faiss.deserialize_index(np.frombuffer(path.read_bytes(), dtype=np.uint8))
    except RuntimeError as e:
        raise FaissIndexError(
            f"FAISS cannot read {path}: {str(e).splitlines()[0][:200]}; rebuild it.",
            reason="index_corrupt",
        ) from e
    if raw.ntotal != build.get("ntotal") or raw.d != build.get("dim"):
        raise FaissIndexError(
            f"Index {path} holds {raw.ntotal} x {raw.d} vectors but its sidecar says "
            f"{build.get('ntotal')} x {build.get('dim')}; rebuild it.",
            reason="index_corrupt",
        )
    params = build.get("params", {})
    if build.get("kind") == "ivf" and "nprobe" in params:
        faiss.extract_index_ivf(raw).nprobe = int(params["nprobe"])
    if build.get("kind") == "hnsw" and "ef_search" in params:
        faiss.downcast_index(raw).hnsw.efSearch = int(params["ef_search"])
    resources = None
    if _resolve_gpu(use_gpu) and build.get("kind") != "hnsw":
        resources = faiss.StandardGpuResources()
        raw = faiss.index_cpu_to_gpu(resources, 0, raw)
    return EmbeddingIndex(
        raw,
        kind=build["kind"],
        metric=build["metric"],
        normalize=bool(build["normalize"]),
        params=params,
        recall_check=build.get("recall_check"),
        ids=side.get("ids"),
        source_checksum=side["source_checksum"],
        gpu_resources=resources,
    )


def get_or_build_index(
    path: str | os.PathLike,
    vectors,
    ids: Sequence[str] | None = None,
    meta: Mapping | None = None,
    **build_kwargs,
) -> tuple[EmbeddingIndex, bool]:
    """(index, rebuilt): load ``path`` when it verifies against these vectors and ids and was built
    with the requested kind/metric/normalisation; otherwise build, save and return it.

    ``index.rebuild_reason`` says why a rebuild happened (the FaissIndexError reason or
    ``settings_changed``); it is None when the saved index was used."""
    checksum = vectors_checksum(vectors, ids)
    use_gpu = build_kwargs.get("use_gpu", "auto")
    reason: str | None
    try:
        idx = load_index(path, expected_source_checksum=checksum, use_gpu=use_gpu)
    except FaissIndexError as e:
        if e.reason == "no_gpu":
            raise
        reason = e.reason
    else:
        wanted = {
            "metric": build_kwargs.get("metric", "ip"),
            "normalize": build_kwargs.get("normalize", True),
        }
        if build_kwargs.get("kind", "auto") != "auto":
            wanted["kind"] = build_kwargs["kind"]
        if all(getattr(idx, k) == v for k, v in wanted.items()):
            return idx, False
        reason = "settings_changed"
    idx = build_index(vectors, ids=ids, **build_kwargs)
    save_index(idx, path, source_checksum=checksum, meta=meta)
    idx.rebuild_reason = reason
    return idx, True


# ----------------------------------------------------------------------------- retrieval


def retrieval_metrics(
    query_vecs,
    db_vecs,
    true_index,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """How well each query finds its own partner among the database vectors (cosine, exact).

    ``true_index[i]`` is the row of ``db_vecs`` that belongs with ``query_vecs[i]``. The rank of
    the partner is 1 + the number of rows scoring strictly higher + half the other rows scoring
    exactly the same (ties broken at random in expectation); recall@k is the probability that the
    partner lands in the top k under that random tie-break, so a collapsed generator that emits
    one constant vector scores chance, not perfection. Returns recall@k for each k, median_rank,
    mean_rank, n (queries) and n_db."""
    q = _as_matrix(query_vecs, "query vectors")
    db = _as_matrix(db_vecs, "database vectors", dim=q.shape[1])
    true = np.asarray(true_index)
    n_db = db.shape[0]
    if true.shape != (q.shape[0],) or not np.issubdtype(true.dtype, np.integer):
        raise ConfigError(
            f"true_index must be one integer row per query, shape ({q.shape[0]},), got "
            f"{true.dtype} {true.shape}.",
            reason="bad_shape",
        )
    if true.size and (true.min() < 0 or true.max() >= n_db):
        raise ConfigError(
            f"true_index values must lie in [0, {n_db - 1}], got [{true.min()}, {true.max()}].",
            reason="bad_shape",
        )
    ks = tuple(int(k) for k in ks)
    if any(k < 1 for k in ks):
        raise ConfigError(f"ks must be positive integers, got {list(ks)}.")
    index = build_index(db, kind="flat", metric="ip", normalize=True, use_gpu=False)
    n_greater = np.empty(q.shape[0], dtype=np.int64)  # (Q,)
    n_equal = np.empty(q.shape[0], dtype=np.int64)  # (Q,) ties other than the partner itself
    chunk = max(1, _SEARCH_CHUNK_ELEMS // n_db)
    for start in range(0, q.shape[0], chunk):
        stop = min(q.shape[0], start + chunk)
        scores, pos = index.search(q[start:stop], n_db)  # (C, N) full ranking per query
        hit = pos == true[start:stop, None]  # (C, N) exactly one True per row
        s_true = scores[hit]  # (C,) partner's cosine
        n_greater[start:stop] = (scores > s_true[:, None]).sum(axis=1)
        n_equal[start:stop] = (scores == s_true[:, None]).sum(axis=1) - 1
    rank = 1.0 + n_greater + n_equal / 2.0  # (Q,)
    out: dict = {}
    for k in ks:
        p_top = np.clip((k - n_greater) / (1.0 + n_equal), 0.0, 1.0)  # (Q,)
        out[f"recall@{k}"] = float(p_top.mean()) if q.shape[0] else float("nan")
    out["median_rank"] = float(np.median(rank)) if q.shape[0] else float("nan")
    out["mean_rank"] = float(rank.mean()) if q.shape[0] else float("nan")
    out["n"] = int(q.shape[0])
    out["n_db"] = int(n_db)
    return out


def shuffled_control(
    query_vecs,
    db_vecs,
    true_index,
    ks: Sequence[int] = (1, 5, 10),
    *,
    seed: int = 0,
) -> dict:
    """``retrieval_metrics`` with the partners permuted by a seeded random permutation: what the
    numbers look like when queries carry no information about their own partner."""
    true = np.asarray(true_index)
    perm = np.random.default_rng(seed).permutation(true.shape[0])
    out = retrieval_metrics(query_vecs, db_vecs, true[perm], ks)
    out["control"] = "shuffled"
    out["seed"] = int(seed)
    return out
