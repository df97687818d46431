"""Retrieval diagnostics over embeddings: recall@k of the true partner and a shuffled control."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from embedstore.errors import ConfigError
from embedstore.index import _SEARCH_CHUNK_ELEMS, _as_matrix, build_index

__all__ = ["retrieval_metrics", "shuffled_control"]

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
