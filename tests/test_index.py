"""FAISS index build / save / verify / rebuild and retrieval metrics vs brute-force numpy."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

import embedstore.index as index_mod
from embedstore.errors import ConfigError, FaissIndexError
from embedstore.index import build_index, sidecar_path, vectors_checksum
from embedstore.index_io import get_or_build_index, load_index, save_index
from embedstore.retrieval_metrics import retrieval_metrics, shuffled_control


def _clustered(n: int, d: int, seed: int, n_clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d))
    x = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.normal(size=(n, d))
    return x.astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a.astype(np.float64) @ b.astype(np.float64).T


def _brute_retrieval(q, db, true, ks=(1, 5, 10)):
    s = _cosine(q, db)  # (Q, N)
    s_true = s[np.arange(len(true)), true]
    rank = 1 + (s > s_true[:, None]).sum(axis=1)
    out = {f"recall@{k}": float(np.mean(rank <= k)) for k in ks}
    out["median_rank"] = float(np.median(rank))
    out["mean_rank"] = float(rank.mean())
    return out


def test_flat_search_matches_numpy_cosine():
    x = _clustered(300, 16, seed=0)
    idx = build_index(x, use_gpu=False)
    assert idx.kind == "flat" and idx.ntotal == 300 and idx.dim == 16
    q = _clustered(7, 16, seed=1)
    scores, pos = idx.search(q, 5)
    assert scores.shape == (7, 5) and pos.dtype == np.int64
    ref = _cosine(q, x)
    want = np.argsort(-ref, axis=1)[:, :5]
    np.testing.assert_array_equal(pos, want)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, want, axis=1), atol=1e-5)
    with pytest.raises(FaissIndexError, match="between 1 and the index size 300"):
        idx.search(q, 301)
    with pytest.raises(ConfigError, match="dimension 8"):
        idx.search(q[:, :8], 3)


def test_retrieval_recall_equals_brute_force():
    rng = np.random.default_rng(3)
    db = rng.normal(size=(120, 24)).astype(np.float32)
    true = rng.permutation(120)[:50]
    q = db[true] + 1.2 * rng.normal(size=(50, 24)).astype(np.float32)  # noisy partners
    got = retrieval_metrics(q, db, true)
    want = _brute_retrieval(q, db, true)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert got["n"] == 50 and got["n_db"] == 120
    assert 0 < got["recall@1"] < 1  # the noise level leaves something to measure


def test_retrieval_ties_count_as_chance_not_success():
    db = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    q = np.zeros((10, 8), dtype=np.float32)  # a collapsed generator: cosine 0 with everything
    got = retrieval_metrics(q, db, np.arange(10))
    assert got["recall@1"] == pytest.approx(1 / 40)
    assert got["recall@10"] == pytest.approx(10 / 40)
    assert got["median_rank"] == pytest.approx((40 + 1) / 2)


def test_shuffled_control_is_near_chance_and_seeded():
    rng = np.random.default_rng(5)
    db = rng.normal(size=(200, 32)).astype(np.float32)
    true = np.arange(200)
    q = db + 0.3 * rng.normal(size=db.shape).astype(np.float32)
    real = retrieval_metrics(q, db, true)
    ctrl = shuffled_control(q, db, true, seed=1)
    assert real["recall@1"] > 0.9
    assert ctrl["recall@10"] < 0.15  # chance is 10/200 = 0.05
    assert ctrl == shuffled_control(q, db, true, seed=1)
    assert ctrl != shuffled_control(q, db, true, seed=2)


def test_retrieval_rejects_bad_partner_index():
    db = np.ones((5, 4), dtype=np.float32)
    with pytest.raises(ConfigError, match=r"\[0, 4\]"):
        retrieval_metrics(db, db, np.array([0, 1, 2, 3, 5]))
    with pytest.raises(ConfigError, match="one integer row per query"):
        retrieval_metrics(db, db, np.array([0, 1]))


def test_ivf_recall_is_checked_against_flat():
    x_all = _clustered(4200, 32, seed=2)
    x, q = x_all[:4000], x_all[4000:]  # held-out queries from the same clusters
    ivf = build_index(
        x, kind="ivf", nlist=64, nprobe=1, use_gpu=False, target_recall=0.9, recall_sample=300
    )
    flat = build_index(x, kind="flat", use_gpu=False)
    rc = ivf.recall_check
    assert ivf.kind == "ivf" and rc["met"] and rc["recall@10"] >= 0.9
    assert rc["history"][0]["nprobe"] == 1  # started narrow, widened until the target was met
    assert ivf.params["nprobe"] == rc["history"][-1]["nprobe"]
    # independent recall of the returned IVF against the flat index on fresh queries
    _, a = ivf.search(q, 10)
    _, e = flat.search(q, 10)
    recall = np.mean([len(set(r) & set(s)) / 10 for r, s in zip(a, e, strict=True)])
    assert recall >= 0.85
    assert flat.recall_check is None


def test_auto_kind_switches_above_exact_max():
    x = _clustered(2000, 8, seed=4)
    assert build_index(x, use_gpu=False).kind == "flat"
    idx = build_index(x, use_gpu=False, exact_max=1000, recall_sample=100)
    assert idx.kind == "ivf" and idx.recall_check["n_queries"] == 100


def test_hnsw_builds_and_records_recall():
    x = _clustered(1500, 16, seed=6)
    idx = build_index(x, kind="hnsw", use_gpu=False, recall_sample=200)
    assert idx.kind == "hnsw" and idx.recall_check["recall@10"] >= 0.95


def test_save_load_roundtrip(tmp_path):
    x = _clustered(500, 16, seed=7)
    ids = [f"S{i:04d}" for i in range(500)]
    idx = build_index(x, kind="ivf", nlist=8, use_gpu=False, ids=ids, recall_sample=100)
    path = save_index(
        idx,
        tmp_path / "cxr.faiss",
        source_checksum=vectors_checksum(x, ids),
        meta={"encoder": "demo"},
    )
    side = json.loads(sidecar_path(path).read_text())
    assert side["meta"] == {"encoder": "demo"} and side["build"]["kind"] == "ivf"
    back = load_index(path, expected_source_checksum=vectors_checksum(x, ids), use_gpu=False)
    assert back.kind == "ivf" and back.params["nprobe"] == idx.params["nprobe"]
    q = x[:5]
    np.testing.assert_array_equal(back.search(q, 3)[1], idx.search(q, 3)[1])
    assert back.id_of(back.search(q, 1)[1]) == ids[:5]


def test_checksum_changes_with_values_shape_and_ids():
    x = _clustered(10, 4, seed=0)
    base = vectors_checksum(x)
    assert base == vectors_checksum(x.copy())
    y = x.copy()
    y[3, 2] += 1e-6
    assert vectors_checksum(y) != base
    assert vectors_checksum(x.reshape(4, 10)) != base
    assert vectors_checksum(x, ["a"] * 10) != vectors_checksum(x, ["b"] * 10)


def test_checksum_mismatch_triggers_rebuild(tmp_path):
    path = tmp_path / "idx.faiss"
    a = _clustered(300, 8, seed=1)
    b = a.copy()
    b[0] += 1.0
    idx, rebuilt = get_or_build_index(path, a, use_gpu=False)
    assert rebuilt and idx.rebuild_reason == "index_missing"
    idx, rebuilt = get_or_build_index(path, a, use_gpu=False)
    assert not rebuilt and idx.rebuild_reason is None
    with pytest.raises(FaissIndexError) as e:
        load_index(path, expected_source_checksum=vectors_checksum(b))
    assert e.value.reason == "index_stale"
    idx, rebuilt = get_or_build_index(path, b, use_gpu=False)
    assert rebuilt and idx.rebuild_reason == "index_stale"
    np.testing.assert_array_equal(idx.search(b[:1], 1)[1], [[0]])
    # asking for another kind does not silently reuse the flat index
    idx, rebuilt = get_or_build_index(path, b, use_gpu=False, kind="hnsw", recall_sample=50)
    assert rebuilt and idx.kind == "hnsw" and idx.rebuild_reason == "settings_changed"


def test_corrupted_index_file_is_detected_and_rebuilt(tmp_path):
    path = tmp_path / "idx.faiss"
    x = _clustered(200, 8, seed=2)
    get_or_build_index(path, x, use_gpu=False)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside the stored vectors
    path.write_bytes(bytes(raw))
    with pytest.raises(FaissIndexError, match="corrupt") as e:
        load_index(path, expected_source_checksum=vectors_checksum(x))
    assert e.value.reason == "index_corrupt"
    idx, rebuilt = get_or_build_index(path, x, use_gpu=False)
    assert rebuilt and idx.rebuild_reason == "index_corrupt"
    load_index(path, expected_source_checksum=vectors_checksum(x))  # verifies again


def test_truncated_file_with_matching_sidecar_is_refused_by_faiss(tmp_path):
    # even if someone rewrites the sidecar hash, FAISS's own reader refuses a truncated file
    path = tmp_path / "idx.faiss"
    x = _clustered(200, 8, seed=3)
    get_or_build_index(path, x, use_gpu=False)
    path.write_bytes(path.read_bytes()[:100])
    side = json.loads(sidecar_path(path).read_text())
    import hashlib

    side["index_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    side["index_bytes"] = 100
    side["index_ends_sha256"] = index_mod._sha256_ends(path)
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(FaissIndexError, match="FAISS cannot read") as e:
        load_index(path, expected_source_checksum=vectors_checksum(x))
    assert e.value.reason == "index_corrupt"


def test_garbage_sidecar_and_missing_files(tmp_path):
    path = tmp_path / "idx.faiss"
    with pytest.raises(FaissIndexError, match="does not exist") as e:
        load_index(path, expected_source_checksum="0" * 64)
    assert e.value.reason == "index_missing"
    x = _clustered(50, 4, seed=0)
    get_or_build_index(path, x, use_gpu=False)
    sidecar_path(path).write_text("{not json")
    with pytest.raises(FaissIndexError, match="not valid JSON.*reason: not_json"):
        load_index(path, expected_source_checksum=vectors_checksum(x))
    _, rebuilt = get_or_build_index(path, x, use_gpu=False)
    assert rebuilt


def test_build_rejects_bad_input():
    with pytest.raises(ConfigError, match="Unknown index kind 'annoy'"):
        build_index(np.ones((3, 2)), kind="annoy")
    with pytest.raises(ConfigError, match="NaN"):
        build_index(np.array([[1.0, np.nan]]))
    with pytest.raises(ConfigError, match="2-D"):
        build_index(np.ones(4))
    if faiss.get_num_gpus() == 0:
        with pytest.raises(FaissIndexError, match="faiss-gpu") as e:
            build_index(np.ones((3, 2)), use_gpu=True)
        assert e.value.reason == "no_gpu"


@pytest.mark.gpu
def test_gpu_index_matches_cpu():
    if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        pytest.skip("needs faiss-gpu and a CUDA device")
    x = _clustered(2000, 32, seed=8)
    gpu = build_index(x, use_gpu=True)
    cpu = build_index(x, use_gpu=False)
    assert gpu.on_gpu and not cpu.on_gpu
    np.testing.assert_array_equal(gpu.search(x[:20], 5)[1], cpu.search(x[:20], 5)[1])


def test_retrieval_chunking_does_not_change_results(monkeypatch):
    import embedstore.index as index_mod

    rng = np.random.default_rng(4)
    db = rng.normal(size=(60, 8)).astype(np.float32)
    true = rng.integers(0, 60, 25)
    q = db[true] + rng.normal(size=(25, 8)).astype(np.float32)
    whole = retrieval_metrics(q, db, true)
    monkeypatch.setattr(index_mod, "_SEARCH_CHUNK_ELEMS", 130)  # 2 queries per chunk
    assert retrieval_metrics(q, db, true) == whole
