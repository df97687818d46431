"""FAISS indexes over embedding sets: built by streaming, saved with a sidecar, opened by mmap.

An index is a cache of a set of vectors. ``build_index`` reads its source in chunks
(``VectorSource``: a NumPy array or, in ``embedstore.retrieval``, a store set), so it never
holds more than one chunk of source vectors beside the index itself:

1. one pass draws a seeded training sample (``train_size``, default 40 points per IVF list) and
   the recall queries (``recall_sample`` database rows);
2. the coarse quantizer (and PQ / OPQ) is trained on the sample alone;
3. a second pass normalises each chunk in place, adds it, and keeps the exact top-k of the recall
   queries over the chunks seen so far (brute force, the reference);
4. recall@10 of the index against that reference is measured and ``nprobe`` (IVF) or
   ``efSearch`` (HNSW) is doubled until ``target_recall`` is met, the search is exhaustive, or
   recall stops improving (compressed kinds plateau below 1).

Kinds: ``flat`` (exact), ``ivf`` (IVF-Flat), ``ivfpq`` (IVF + product quantisation, ``pq_m``
bytes per vector at 8 bits), ``opq`` (a learned rotation before IVF-PQ), ``hnsw``. ``auto`` is
flat up to ``exact_max`` vectors, IVF-Flat while the vectors fit in ``flat_max_bytes``, IVF-PQ
above. Similarity is cosine by default (inner product on L2-normalised vectors).

On disk: ``<path>`` holds ``faiss.write_index`` bytes, ``<path>.json`` the sidecar (schema
version, file size, sha256 of the whole file and of its two ends, the source checksum, how the
index was built, the build options asked for, the caller's meta). The sidecar is written last,
so a crash leaves a mismatch, which reads as "rebuild", never as a silently wrong index.
``load_index`` memory-maps the file (``faiss.IO_FLAG_MMAP_IFC``: flat codes and inverted lists
are used in place, so opening costs milliseconds whatever the size) after a ``quick`` check
(size and the sha256 of the file's ends); ``verify="full"`` hashes the whole file.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

import faiss
import numpy as np

from embedstore.errors import ConfigError, FaissIndexError

__all__ = [
    "INDEX_SCHEMA_VERSION",
    "KINDS",
    "METRICS",
    "VERIFY_MODES",
    "FLAT_MAX_BYTES",
    "ProgressFn",
    "VectorSource",
    "ArraySource",
    "EmbeddingIndex",
    "default_nlist",
    "build_index",
    "vectors_checksum",
    "sidecar_path",
]

INDEX_SCHEMA_VERSION = 2
KINDS: tuple[str, ...] = ("auto", "flat", "ivf", "ivfpq", "opq", "hnsw")
METRICS: tuple[str, ...] = ("ip", "l2")
VERIFY_MODES: tuple[str, ...] = ("quick", "full")
#: ``auto`` stops storing full vectors (IVF-Flat) above this many bytes of float32 vectors and
#: builds IVF-PQ instead: 8 GiB is 4.2 M x 512 vectors, a third of this 24 GB machine.
FLAT_MAX_BYTES = 8 * 2**30
_FAISS_METRIC = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}
_IVF_KINDS = ("ivf", "ivfpq", "opq")
_COMPRESSED_KINDS = ("ivfpq", "opq")
_RECALL_K = 10
_TRAIN_PER_LIST = 40  # k-means points per IVF list (FAISS warns below 39)
_TRAIN_CAP = 256  # ... and FAISS itself subsamples above 256 per list
_PQ_TRAIN_PER_CODE = 64  # PQ / OPQ training points per codeword (2**nbits codewords)
_PLATEAU = 0.002  # widening stops when recall gains less than this (compressed kinds)
_CHUNK_BYTES = 128 * 2**20  # source rows read (and added) per chunk
_ENDS_BYTES = 1 << 20  # the quick check hashes this many bytes at each end of the file
_SEARCH_CHUNK_ELEMS = 5_000_000  # queries x database entries per full-ranking chunk (~60 MB)
# Options that change how a build runs but not the index it produces.
_RUNTIME_OPTIONS = ("use_gpu", "threads", "chunk_rows", "progress")

#: ``progress(stage, done, total)``: stages "sample", "train", "add", "recall" in that order
#: (``done`` rows or steps of ``total``); the library never prints.
ProgressFn = Callable[[str, int, int], None]


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


# ----------------------------------------------------------------------------- sources


@runtime_checkable
class VectorSource(Protocol):
    """Rows of float32 vectors read in order: ``shape`` (N, D) and ``read(start, stop)``, which
    returns rows [start, stop) as a new (stop - start, D) float32 array the caller may modify."""

    @property
    def shape(self) -> tuple[int, int]: ...

    def read(self, start: int, stop: int) -> np.ndarray: ...


class ArraySource:
    """A ``VectorSource`` over an in-memory (N, D) array (never modified: chunks are copies)."""

    def __init__(self, vectors):
        try:
            a = np.asarray(vectors)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"vectors must be a numeric (N, D) array: {e}", reason="bad_shape") from e
        if a.ndim != 2 or a.shape[1] == 0:
            raise ConfigError(
                f"vectors must be a 2-D (N, D) array with D > 0, got shape {a.shape}.",
                reason="bad_shape",
            )
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ConfigError(f"vectors must be numeric, got dtype {a.dtype}.", reason="bad_shape")
        self._a = a

    @property
    def shape(self) -> tuple[int, int]:
        return int(self._a.shape[0]), int(self._a.shape[1])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.array(self._a[start:stop], dtype=np.float32, order="C", copy=True)


def _as_source(vectors) -> VectorSource:
    if isinstance(vectors, np.ndarray) or not isinstance(vectors, VectorSource):
        return ArraySource(vectors)
    return vectors


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
    _check_finite(a, name)
    return np.ascontiguousarray(a)


def _check_finite(a: np.ndarray, name: str, first_row: int = 0) -> None:
    bad = ~np.all(np.isfinite(a), axis=1)  # (N,)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ConfigError(
            f"{rows.size} rows of {name} contain NaN or infinity (first: row "
            f"{first_row + int(rows[0])}); fix them in the store.",
            reason="bad_scores",
        )


def _l2_normalize(a: np.ndarray) -> np.ndarray:
    """Row-normalised copy; all-zero rows stay zero (cosine 0 with everything)."""
    return _l2_normalize_(np.array(a, dtype=np.float32, order="C", copy=True))


def _l2_normalize_(a: np.ndarray) -> np.ndarray:
    """Normalise the rows of float32 ``a`` in place (zero rows stay zero); returns ``a``."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)  # (N, 1)
    np.divide(a, np.where(norms > 0, norms, 1.0).astype(np.float32), out=a)
    return a


def vectors_checksum(vectors, ids: Sequence[str] | None = None) -> str:
    """sha256 hex over the shape and float32 bytes of ``vectors`` (and the ids, when given).

    For in-memory arrays. A store set is identified without reading its vectors (the digest
    of its live rows' ids and CRC-32s, ``embedstore.retrieval``)."""
    a = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    h = hashlib.sha256()
    h.update(f"float32:{a.shape}".encode())
    h.update(memoryview(a).cast("B"))
    if ids is not None:
        h.update(b"\x00ids\x00")
        h.update("\x1f".join(str(i) for i in ids).encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_ends(path: Path) -> str:
    """sha256 of the first and last ``_ENDS_BYTES`` of a file (all of it when shorter)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"size:{size}".encode())
    with open(path, "rb") as f:
        if size <= 2 * _ENDS_BYTES:
            h.update(f.read())
        else:
            h.update(f.read(_ENDS_BYTES))
            f.seek(size - _ENDS_BYTES)
            h.update(f.read(_ENDS_BYTES))
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextmanager
def _omp_threads(n: int | None) -> Iterator[int]:
    """FAISS's OpenMP threads set to ``n`` (default: the cores this process may use)."""
    before = faiss.omp_get_max_threads()
    want = int(n) if n is not None else _cores()
    if want < 1:
        raise ConfigError(f"threads must be >= 1, got {n}.")
    faiss.omp_set_num_threads(want)
    try:
        yield want
    finally:
        faiss.omp_set_num_threads(before)


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
        options: Mapping | None = None,
        mmapped: bool = False,
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
        self.options = dict(options or {})
        self.mmapped = mmapped
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
        similarities for metric 'ip' with normalize=True, squared L2 distances for 'l2'
        (estimated from the codes for ivfpq / opq). Positions are -1 where fewer than k
        vectors were reached (IVF with a small nprobe)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.ntotal:
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
        return (f"EmbeddingIndex(kind={self.kind!r}, metric={self.metric!r}, ntotal={self.ntotal}, "
                f"dim={self.dim}, {where})")


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: the power of two nearest sqrt(n), with >= 39 training points
    per list (FAISS warns below). 10^5 -> 256, 10^6 -> 1024, 10^7 -> 4096. sqrt(n) keeps both
    the k-means and the per-query scan (nprobe lists of ~sqrt(n) vectors) cheap on 2 cores."""
    target = 2 ** int(round(math.log2(max(1.0, math.sqrt(n)))))
    return int(max(1, min(target, n // 39 if n >= 39 else 1)))


def _default_pq_m(d: int) -> int:
    """Sub-quantizers for IVF-PQ: the largest divisor of d that is <= d / 8 (64 for 512-d:
    64 bytes per vector at 8 bits, 1/32 of float32)."""
    target = max(1, d // 8)
    return max(m for m in range(1, target + 1) if d % m == 0)


class _TopK:
    """Exact running top-k of a few queries over database chunks (the recall reference).

    Scores are "larger is better": q.x for inner product, 2 q.x - |x|^2 for L2 (the query's own
    norm is the same for every candidate)."""

    def __init__(self, queries: np.ndarray, k: int, metric: str):
        self.q = queries  # (S, D)
        self.k = k
        self.metric = metric
        s = queries.shape[0]
        self.scores = np.full((s, k), -np.inf, dtype=np.float32)  # (S, k), sorted descending
        self.pos = np.full((s, k), -1, dtype=np.int64)  # (S, k)

    def add(self, x: np.ndarray, first_row: int) -> None:
        s = self.q @ x.T  # (S, m)
        if self.metric == "l2":
            s = 2.0 * s - np.einsum("ij,ij->i", x, x)[None, :]
        if np.isneginf(self.scores[:, -1]).any():
            # Not full yet (the first chunk): every entry would pass the threshold below, so take
            # each query's k best of the chunk directly, without an (S x m) index list.
            k = min(self.k, s.shape[1])
            top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else \
                np.broadcast_to(np.arange(s.shape[1]), (s.shape[0], s.shape[1]))
            sc = np.concatenate([self.scores, np.take_along_axis(s, top, axis=1)], axis=1)
            ps = np.concatenate([self.pos, top.astype(np.int64) + first_row], axis=1)
            order = np.argsort(-sc, axis=1, kind="stable")[:, : self.k]
            self.scores = np.take_along_axis(sc, order, axis=1)
            self.pos = np.take_along_axis(ps, order, axis=1)
            return
        thr = self.scores[:, -1]  # (S,) the k-th best so far
        rows, cols = np.nonzero(s > thr[:, None])  # the few entries that can enter a top-k
        if rows.size == 0:
            return
        bounds = np.searchsorted(rows, np.arange(self.q.shape[0] + 1))
        for i in np.flatnonzero(np.diff(bounds)):
            c = cols[bounds[i] : bounds[i + 1]]
            sc = np.concatenate([self.scores[i], s[i, c]])
            ps = np.concatenate([self.pos[i], c.astype(np.int64) + first_row])
            top = np.argsort(-sc, kind="stable")[: self.k]
            self.scores[i], self.pos[i] = sc[top], ps[top]


def _recall_at_k(approx: np.ndarray, exact: np.ndarray, self_rows: np.ndarray, k: int) -> float:
    """Mean overlap of the top-k lists, each query's own row dropped from both (it is always
    found, and counting it would inflate recall by up to 1/k)."""
    hits = 0
    for me, a, e in zip(self_rows.tolist(), approx.tolist(), exact.tolist(), strict=True):
        a = [i for i in a if i != me and i >= 0][:k]
        e = [i for i in e if i != me and i >= 0][:k]
        hits += len(set(a) & set(e))
    return hits / (len(self_rows) * k) if len(self_rows) else 1.0


def _resolve_kind(kind: str, n: int, d: int, exact_max: int, flat_max_bytes: int) -> str:
    if kind != "auto":
        return kind
    if n <= exact_max:
        return "flat"
    return "ivf" if n * d * 4 <= flat_max_bytes else "ivfpq"


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
    flat_max_bytes: int = FLAT_MAX_BYTES,
    nlist: int | None = None,
    nprobe: int | None = None,
    pq_m: int | None = None,
    pq_nbits: int = 8,
    hnsw_m: int = 32,
    train_size: int | None = None,
    target_recall: float = 0.95,
    recall_sample: int = 500,
    chunk_rows: int | None = None,
    threads: int | None = None,
    progress: ProgressFn | None = None,
) -> EmbeddingIndex:
    """Index ``vectors``: an (N, D) array or any ``VectorSource`` (read twice, in chunks).

    ``kind='auto'`` is exact flat up to ``exact_max`` rows, IVF-Flat while N x D x 4 bytes fit in
    ``flat_max_bytes``, IVF-PQ above. IVF kinds train on ``train_size`` seeded rows (default
    40 x nlist, at least 64 x 2**pq_nbits for PQ); ``nlist`` defaults to ``default_nlist(N)``,
    ``pq_m`` to the largest divisor of D <= D / 8. Approximate kinds get a recall@10 check on
    ``recall_sample`` seeded database rows against exact search, widening ``nprobe`` /
    ``efSearch`` until ``target_recall`` is met (``target_recall=0`` measures without widening);
    the result lands in ``index.recall_check``, timings and sizes in ``index.params``.
    ``progress(stage, done, total)`` is called as the build advances."""
    if kind not in KINDS:
        raise ConfigError(f"Unknown index kind {kind!r}. Available: {', '.join(KINDS)}.")
    if metric not in METRICS:
        raise ConfigError(f"Unknown metric {metric!r}. Available: {', '.join(METRICS)}.")
    if not 0.0 <= target_recall <= 1.0:
        raise ConfigError(
            f"target_recall must lie in [0, 1] (0 = measure only, never widen), got {target_recall}."
        )
    if recall_sample < 1:
        raise ConfigError(f"recall_sample must be >= 1, got {recall_sample}.")
    src = _as_source(vectors)
    n, d = src.shape
    if n < 1:
        raise ConfigError("Cannot index an empty set of vectors.", reason="bad_shape")
    kind = _resolve_kind(kind, n, d, exact_max, flat_max_bytes)
    progress = progress or _no_progress
    fmetric = _FAISS_METRIC[metric]
    gpu = _resolve_gpu(use_gpu) and kind != "hnsw"  # FAISS has no GPU HNSW
    step = int(chunk_rows) if chunk_rows else max(1024, _CHUNK_BYTES // (4 * d))
    if step < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}.")
    params: dict = {"seed": int(seed), "chunk_rows": step}
    t_start = time.perf_counter()

    # ---- what to train: the index skeleton and its sample size
    nl = 0
    if kind in _IVF_KINDS:
        nl = int(nlist) if nlist is not None else default_nlist(n)
        if not 1 <= nl <= n:
            raise ConfigError(f"nlist must lie in [1, N={n}], got {nl}; use fewer lists.")
        params["nlist"] = nl
    if kind in _COMPRESSED_KINDS:
        m = int(pq_m) if pq_m is not None else _default_pq_m(d)
        if m < 1 or d % m:
            divisors = [x for x in (8, 16, 32, 64, 128) if d % x == 0]
            raise ConfigError(
                f"pq_m={m} must divide the dimension {d} (e.g. {', '.join(map(str, divisors))}).")
        if not 1 <= int(pq_nbits) <= 16:
            raise ConfigError(f"pq_nbits must lie in [1, 16], got {pq_nbits}.")
        params.update(pq_m=m, pq_nbits=int(pq_nbits), code_bytes=int(math.ceil(m * pq_nbits / 8)),
                      opq=kind == "opq")
    n_train = 0
    if kind in _IVF_KINDS:
        default_train = _TRAIN_PER_LIST * nl
        if kind in _COMPRESSED_KINDS:
            default_train = max(default_train, _PQ_TRAIN_PER_CODE * 2 ** int(pq_nbits))
        n_train = int(train_size) if train_size is not None else default_train
        if n_train < nl:
            raise ConfigError(f"train_size={n_train} is below nlist={nl}: k-means needs at least "
                              "one point per list (40 per list is the default).")
        n_train = min(n, n_train, _TRAIN_CAP * nl if kind == "ivf" else n)
        params["train_size"] = n_train

    with _omp_threads(threads) as n_threads:
        params["threads"] = n_threads
        rng = np.random.default_rng(seed)
        train_rows = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train else np.empty(0, np.int64)
        approximate = kind != "flat"
        q_rows = (np.sort(rng.choice(n, size=min(recall_sample, n), replace=False))
                  if approximate else np.empty(0, np.int64))

        # ---- pass 1: the training sample and the recall queries
        t0 = time.perf_counter()
        xt = np.empty((train_rows.size, d), dtype=np.float32)  # (T, D)
        xq = np.empty((q_rows.size, d), dtype=np.float32)  # (S, D)
        if train_rows.size or q_rows.size:
            for start in range(0, n, step):
                stop = min(n, start + step)
                ti = np.searchsorted(train_rows, [start, stop])
                qi = np.searchsorted(q_rows, [start, stop])
                if ti[0] == ti[1] and qi[0] == qi[1]:
                    continue
                x = _read(src, start, stop, d)
                xt[ti[0] : ti[1]] = x[train_rows[ti[0] : ti[1]] - start]
                xq[qi[0] : qi[1]] = x[q_rows[qi[0] : qi[1]] - start]
                del x
                progress("sample", stop, n)
        if normalize:
            _l2_normalize_(xt)
            _l2_normalize_(xq)
        params["sample_s"] = round(time.perf_counter() - t0, 3)

        # ---- train on the sample alone
        t0 = time.perf_counter()
        index = _make_index(kind, d, fmetric, nl, params, hnsw_m, seed)
        if n_train:
            progress("train", 0, 1)
            index.train(xt)
            progress("train", 1, 1)
        del xt
        params["train_s"] = round(time.perf_counter() - t0, 3)

        # ---- pass 2: add in chunks, exact top-k of the recall queries alongside
        t0 = time.perf_counter()
        k_ref = min(_RECALL_K, n - 1) + 1  # one more: each query finds itself
        ref = _TopK(xq, k_ref, metric) if approximate else None
        for start in range(0, n, step):
            stop = min(n, start + step)
            x = _read(src, start, stop, d)  # (m, D)
            if normalize:
                _l2_normalize_(x)
            if ref is not None:
                ref.add(x, start)
            index.add(x)
            del x
            progress("add", stop, n)
        if index.ntotal != n:
            raise FaissIndexError(f"Index holds {index.ntotal} vectors after adding {n}.",
                                  reason="index_corrupt")
        params["add_s"] = round(time.perf_counter() - t0, 3)

        # ---- recall check, widening the search until the target
        recall_check = None
        t0 = time.perf_counter()
        if approximate:
            recall_check = _tune_recall(index, kind, xq, q_rows, ref, n, target_recall,
                                        nprobe, progress)
            recall_check["seed"] = int(seed)
            if kind in _IVF_KINDS:
                params["nprobe"] = int(faiss.extract_index_ivf(index).nprobe)
            else:
                params["ef_search"] = int(index.hnsw.efSearch)
        params["recall_s"] = round(time.perf_counter() - t0, 3)
    params["build_s"] = round(time.perf_counter() - t_start, 3)
    params["index_bytes_in_ram"] = _index_ram_bytes(index, kind, params)

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
        gpu_resources=resources,
    )


def _read(src: VectorSource, start: int, stop: int, d: int) -> np.ndarray:
    x = src.read(start, stop)
    if not isinstance(x, np.ndarray) or x.shape != (stop - start, d):
        raise ConfigError(
            f"Vector source returned shape {getattr(x, 'shape', None)} for rows [{start}, {stop}); "
            f"expected ({stop - start}, {d}).",
            reason="bad_shape",
        )
    if x.dtype != np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
        x = np.array(x, dtype=np.float32, order="C", copy=True)
    _check_finite(x, "vectors", first_row=start)
    return x


def _make_index(kind: str, d: int, fmetric: int, nl: int, params: dict, hnsw_m: int, seed: int):
    if kind == "flat":
        return faiss.IndexFlatIP(d) if fmetric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), fmetric)
        index.hnsw.efSearch = 64
        params.update(hnsw_m=int(hnsw_m), ef_construction=int(index.hnsw.efConstruction))
        return index
    quantizer = faiss.IndexFlatIP(d) if fmetric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(d)
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(quantizer, d, nl, fmetric)
    else:
        ivf = faiss.IndexIVFPQ(quantizer, d, nl, params["pq_m"], params["pq_nbits"], fmetric)
        # PQ k-means on 64 points per codeword and 10 iterations: 25 iterations on 256 per
        # codeword (FAISS's defaults) took minutes on 2 cores for no recall gain measured here.
        ivf.pq.cp.max_points_per_centroid = _PQ_TRAIN_PER_CODE
        ivf.pq.cp.niter = 10
        ivf.pq.cp.seed = int(seed)
    ivf.cp.seed = int(seed)  # k-means init is seeded: same vectors + seed -> same index
    if kind != "opq":
        return ivf
    opq = faiss.OPQMatrix(d, params["pq_m"])
    # FAISS's defaults (50 outer iterations, 40 PQ iterations first) took 4-8 minutes on 2 cores.
    opq.niter, opq.niter_pq_0, opq.niter_pq = 8, 10, 4
    opq.max_train_points = _PQ_TRAIN_PER_CODE * 2 ** params["pq_nbits"]
    return faiss.IndexPreTransform(opq, ivf)  # the Python wrappers keep opq and ivf alive


def _tune_recall(index, kind: str, xq: np.ndarray, q_rows: np.ndarray, ref: _TopK, n: int,
                 target: float, nprobe: int | None, progress: ProgressFn) -> dict:
    k = min(_RECALL_K, n - 1)
    if k < 1:
        return {"recall@10": 1.0, "target": target, "met": True, "n_queries": int(q_rows.size),
                "k": 0, "history": []}
    ivf = faiss.extract_index_ivf(index) if kind in _IVF_KINDS else None
    if ivf is not None:
        ivf.nprobe = int(nprobe) if nprobe is not None else max(1, min(ivf.nlist, ivf.nlist // 128))
        if not 1 <= ivf.nprobe <= ivf.nlist:
            raise ConfigError(f"nprobe must lie in [1, nlist={ivf.nlist}], got {ivf.nprobe}.")
    history: list[dict] = []
    knob_name = "nprobe" if ivf is not None else "ef_search"
    max_steps = 1 + int(math.ceil(math.log2(max(2, ivf.nlist if ivf is not None else n))))
    recall, plateau = 0.0, False
    for i in range(max_steps):
        knob = ivf.nprobe if ivf is not None else index.hnsw.efSearch
        _, approx = index.search(xq, k + 1)  # (S, k + 1)
        recall = _recall_at_k(approx, ref.pos, q_rows, k)
        history.append({knob_name: int(knob), "recall@10": recall})
        progress("recall", i + 1, max_steps)
        if recall >= target:
            break
        if len(history) >= 2 and kind in _COMPRESSED_KINDS and \
                recall - history[-2]["recall@10"] < _PLATEAU:
            plateau = True  # PQ's own error bounds recall: a wider search buys nothing
            break
        if ivf is not None:
            if ivf.nprobe >= ivf.nlist:
                break
            ivf.nprobe = min(ivf.nlist, ivf.nprobe * 2)
        else:
            if index.hnsw.efSearch >= n:
                break
            index.hnsw.efSearch = min(n, index.hnsw.efSearch * 2)
    if plateau and ivf is not None:
        ivf.nprobe = history[-2]["nprobe"]  # the narrower search did as well
        recall = history[-2]["recall@10"]
    progress("recall", max_steps, max_steps)
    return {
        "recall@10": recall,
        "target": target,
        "met": bool(recall >= target),
        "plateau": plateau,
        "n_queries": int(q_rows.size),
        "k": k,
        "history": history,
    }


def _index_ram_bytes(index, kind: str, params: dict) -> int:
    """Approximate bytes of the index's payload (vectors or codes + ids)."""
    n, d = int(index.ntotal), int(index.d)
    if kind == "flat":
        return n * d * 4
    if kind == "hnsw":
        return n * d * 4 + n * int(params.get("hnsw_m", 32)) * 2 * 4
    per = d * 4 if kind == "ivf" else int(params["code_bytes"])
    return n * (per + 8) + int(params.get("nlist", 0)) * d * 4
