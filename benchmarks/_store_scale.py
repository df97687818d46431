"""The store's scale benchmark (part of benchmarks/bench_store.py): each operation at 10^4, 10^5
and 10^6 rows x 512 float32 beside its baseline, time and peak RSS, every case in a fresh
subprocess (``ru_maxrss`` at its end), medians over repeats.

    python -m benchmarks.bench_store --scale-only [--quick] [--big]
    python -m benchmarks._store_scale CASE WORK_DIR [ARG]     (one case; what the driver runs)

``--big`` adds the 10^7-row float16 check (about 10 GB of vectors; ~15 minutes here).
Generated data lives in a temporary folder (BENCH_TMP or the system's) and is removed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

D = 512
BATCH = 4096  # rows handed to the writer at once (an encoder's output batch)
COHORT_SQL = (
    "SELECT s.study_id, s.patient_id, s.age, e.row FROM studies s "
    "JOIN embeddings e USING (study_id) "
    "WHERE e.encoder_key = 'bench' AND s.split = 'train' AND s.site IN ('A', 'C') "
    "AND s.age BETWEEN 50 AND 70"
)
RAW_SQL = (
    "SELECT s.study_id, s.patient_id, s.age, e.row FROM read_parquet('{manifest}') s "
    "JOIN read_parquet('{meta}') e USING (study_id) "
    "WHERE s.split = 'train' AND s.site IN ('A', 'C') AND s.age BETWEEN 50 AND 70"
)
WHERE_1PCT = "age = 60"  # ~1.3 % of the rows (ages 18..94)


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------


def _hex(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.integers(0, 256, (n, 32), dtype=np.uint8).tobytes().hex()
    return [raw[i * 64 : (i + 1) * 64] for i in range(n)]


def generate(work: Path, n: int, dtype: str = "float32") -> None:
    """x.npy (N, D), rows.parquet (ids, realistic random sha256 keys), manifest.parquet, perm.npy."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=dtype, shape=(n, D))
    for a in range(0, n, 1 << 16):
        b = min(n, a + (1 << 16))
        x[a:b] = rng.standard_normal((b - a, D), dtype=np.float32)
    x.flush()
    del x
    ids = [f"S{i:08d}" for i in range(n)]
    pq.write_table(pa.table({
        "study_id": ids,
        "patient_id": [f"P{i // 2:08d}" for i in range(n)],
        "cache_key": _hex(rng, n),
        "content_hash": _hex(rng, n),
        "source_sig": _hex(rng, n),
    }), work / "rows.parquet")
    n_pat = -(-n // 2)
    pat = np.arange(n) // 2
    pq.write_table(pa.table({
        "patient_id": [f"P{i // 2:08d}" for i in range(n)],
        "study_id": ids,
        "modality": ["CXR"] * n,
        "path": [f"img/{s}" for s in ids],
        "acquired_at": pa.array(1_700_000_000_000_000 + np.arange(n, dtype=np.int64) * 1000,
                                pa.timestamp("us")),
        "label_pe": pa.array(rng.integers(0, 2, n), pa.int8()),
        "split": rng.choice(np.array(["train", "val", "test"]), n_pat, p=[0.6, 0.15, 0.25])[pat],
        "site": rng.choice(np.array(["A", "B", "C", "D"]), n_pat)[pat],
        "age": rng.integers(18, 95, n_pat)[pat],
    }), work / "manifest.parquet")
    np.save(work / "perm.npy", rng.permutation(n))
    new = 100  # the studies an append adds (not in the store)
    pq.write_table(pa.table({
        "study_id": [f"S{n + i:08d}" for i in range(new)],
        "patient_id": [f"P{(n + i) // 2:08d}" for i in range(new)],
        "cache_key": _hex(rng, new),
        "content_hash": _hex(rng, new),
        "source_sig": _hex(rng, new),
    }), work / "new_rows.parquet")


# ------------------------------------------------------------------------------------------------
# cases (each runs in its own process; returns seconds and extras)
# ------------------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def case_np_save(work: Path, arg: str) -> dict:
    x = np.load(work / "x.npy")
    out = work / "copy.npy"
    t = time.perf_counter()
    np.save(out, x)
    _fsync(out)
    dt = time.perf_counter() - t
    out.unlink()
    return {"s": dt, "bytes": x.nbytes}


def case_write(work: Path, arg: str) -> dict:
    """arg: '<store name>:<inorder|shuffled>:<many|add>[:<dtype>]'."""
    import pyarrow.parquet as pq

    from embedstore.store import open_store

    name, order, mode, *rest = arg.split(":")
    dtype = rest[0] if rest else "float32"
    x = np.load(work / "x.npy", mmap_mode="r")
    rows = pq.read_table(work / "rows.parquet")
    cols = {c: rows[c].to_pylist() for c in rows.column_names}
    idx = np.load(work / "perm.npy") if order == "shuffled" else np.arange(len(x))
    n = len(idx)
    store_dir = work / name
    shutil.rmtree(store_dir, ignore_errors=True)
    s = open_store(store_dir, create=True)
    s.attach_manifest(pq.read_table(work / "manifest.parquet"))
    # Batches in the order written, prepared before the clock starts (an encoder's output).
    batches = []
    for a in range(0, n, BATCH):
        sel = idx[a : a + BATCH]
        vec = np.ascontiguousarray(x[np.sort(sel)] if order == "inorder" else x[sel])
        batches.append((sel, vec))
    t = time.perf_counter()
    s = open_store(store_dir)
    with s.writer("CXR", "bench", dim=D, spec={"bench": True}, capacity=n, dtype=dtype) as w:
        for sel, vec in batches:
            sid = [cols["study_id"][i] for i in sel]
            pid = [cols["patient_id"][i] for i in sel]
            key = [cols["cache_key"][i] for i in sel]
            hsh = [cols["content_hash"][i] for i in sel]
            sig = [cols["source_sig"][i] for i in sel]
            if mode == "many":
                w.add_many(study_ids=sid, patient_ids=pid, cache_keys=key, content_hashes=hsh,
                           source_sigs=sig, vectors=vec)
            else:
                for j in range(len(sel)):
                    w.add(study_id=sid[j], patient_id=pid[j], cache_key=key[j],
                          content_hash=hsh[j], source_sig=sig[j], vector=vec[j])
    dt = time.perf_counter() - t
    return {"s": dt, "bytes": n * D * np.dtype(dtype).itemsize}


def case_np_load(work: Path, arg: str) -> dict:
    t = time.perf_counter()
    x = np.load(work / "x.npy")
    dt = time.perf_counter() - t
    return {"s": dt, "bytes": x.nbytes}


def case_load(work: Path, arg: str) -> dict:
    from embedstore.store import open_store

    t = time.perf_counter()
    es = open_store(work / arg).load("CXR", "bench")
    dt = time.perf_counter() - t
    assert es.vectors.dtype == np.float32 and es.vectors.shape[1] == D
    return {"s": dt, "bytes": es.vectors.nbytes, "rows": len(es)}


def case_load_where(work: Path, arg: str) -> dict:
    from embedstore.store import open_store

    name, _, where = arg.partition(":")
    t = time.perf_counter()
    es = open_store(work / name).load("CXR", "bench", where=where or WHERE_1PCT)
    dt = time.perf_counter() - t
    return {"s": dt, "bytes": es.vectors.nbytes, "rows": len(es)}


def case_mmap_where(work: Path, arg: str) -> dict:
    """Baseline: the cohort's rows of the in-order .npy through a memory map."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = time.perf_counter()
    age = pq.read_table(work / "manifest.parquet", columns=["age"])["age"]
    idx = np.flatnonzero(pc.equal(age, 60).to_numpy(zero_copy_only=False))
    x = np.load(work / "x.npy", mmap_mode="r")
    out = np.ascontiguousarray(x[idx], dtype=np.float32)
    dt = time.perf_counter() - t
    return {"s": dt, "bytes": out.nbytes, "rows": len(out)}


def case_query(work: Path, arg: str) -> dict:
    from embedstore.store import open_store

    t = time.perf_counter()
    got = open_store(work / arg).sql(COHORT_SQL)
    dt = time.perf_counter() - t
    return {"s": dt, "rows": got.num_rows}


def case_query_raw(work: Path, arg: str) -> dict:
    import duckdb

    t = time.perf_counter()
    con = duckdb.connect(":memory:", config={"threads": 2})
    got = con.sql(RAW_SQL.format(manifest=work / "manifest.parquet",
                                 meta=work / "raw_meta.parquet")).to_arrow_table()
    dt = time.perf_counter() - t
    return {"s": dt, "rows": got.num_rows}


def case_append(work: Path, arg: str) -> dict:
    """Open the store and add 100 new studies as extract does: resume checks for their ids on
    disk, then the rows."""
    import pyarrow.parquet as pq

    from embedstore.store import open_store

    new = pq.read_table(work / "new_rows.parquet").to_pylist()
    vec = np.random.default_rng(7).standard_normal((len(new), D)).astype(np.float32)
    ids = [r["study_id"] for r in new]
    t = time.perf_counter()
    s = open_store(work / arg, create=True)
    with s.writer("CXR", "bench", dim=D, spec={"bench": True}, capacity=len(new)) as w:
        done = w.committed_sources(ids)
        keys = w.committed_keys(ids)
        for r, v in zip(new, vec, strict=True):
            if (r["study_id"], r["source_sig"]) in done or r["cache_key"] in keys:
                continue
            w.add(study_id=r["study_id"], patient_id=r["patient_id"], cache_key=r["cache_key"],
                  content_hash=r["content_hash"], source_sig=r["source_sig"], vector=v)
    dt = time.perf_counter() - t
    return {"s": dt, "rows": w.rows_written, "segment": w.segment_name}


def case_verify(work: Path, arg: str) -> dict:
    from embedstore.store import open_store

    t = time.perf_counter()
    rep = open_store(work / arg).verify()
    dt = time.perf_counter() - t
    if not rep.ok:
        raise RuntimeError(f"verify found problems: {rep.problems[:3]}")
    return {"s": dt, "rows": rep.rows_checked}


def case_read_crc(work: Path, arg: str) -> dict:
    """Baseline: read every chunk file of the store's set once and CRC-32 it whole."""
    files = sorted((work / arg / "sets").rglob("embeddings.zarr/c.*"))
    buf = bytearray(max((f.stat().st_size for f in files), default=0))
    mv = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            got = fh.readinto(mv)
        zlib.crc32(mv[:got])
        total += got
    dt = time.perf_counter() - t
    return {"s": dt, "bytes": total}


def case_info(work: Path, arg: str) -> dict:
    from embedstore.store import open_store

    t = time.perf_counter()
    s = open_store(work / arg)
    sets = s.sets()
    dt = time.perf_counter() - t
    return {"s": dt, "rows": sum(x.count for x in sets)}


CASES: dict[str, Callable[[Path, str], dict]] = {
    "np_save": case_np_save, "write": case_write, "np_load": case_np_load, "load": case_load,
    "load_where": case_load_where, "mmap_where": case_mmap_where, "query": case_query,
    "query_raw": case_query_raw, "append": case_append, "verify": case_verify,
    "read_crc": case_read_crc, "info": case_info,
}


def peak_rss() -> int:
    """Peak resident memory of this process, in bytes: VmHWM, the high-water mark of its own
    address space. ru_maxrss would do, except that Linux keeps it across fork + exec, so a case
    started by a big driver would report the driver's RSS."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> None:
    case, work, arg = argv[0], Path(argv[1]), (argv[2] if len(argv) > 2 else "")
    out = CASES[case](work, arg)
    out["rss"] = peak_rss()
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def run_case(case: str, work: Path, arg: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    r = subprocess.run([sys.executable, "-m", "benchmarks._store_scale", case, str(work), arg],
                       capture_output=True, text=True, env=env, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark case {case} {arg} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def median_case(case: str, work: Path, arg: str, reps: int,
                after: Callable[[dict], None] | None = None) -> dict:
    runs = []
    for _ in range(reps):
        got = run_case(case, work, arg)
        if after is not None:
            after(got)
        runs.append(got)
    s = statistics.median(r["s"] for r in runs)
    rss = statistics.median(r["rss"] for r in runs)
    return {**runs[-1], "s": s, "rss": rss, "runs": [r["s"] for r in runs]}


def _dir_bytes(root: Path, want: Callable[[Path], bool]) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and want(p))


def _is_chunk(p: Path) -> bool:
    return p.parent.name.endswith(".zarr") and p.name.startswith("c.")


def write_raw_meta(work: Path, store: str) -> None:
    """The baseline's Parquet: the store's live rows as one plain file (what a user keeping
    .npy files next to a metadata table would have)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    del store  # the in-order store's rows are rows.parquet in order: row i = study i
    rows = pq.read_table(work / "rows.parquet")
    pq.write_table(pa.table({
        "study_id": rows["study_id"], "patient_id": rows["patient_id"],
        "cache_key": rows["cache_key"], "content_hash": rows["content_hash"],
        "row": pa.array(np.arange(rows.num_rows, dtype=np.int64)),
    }), work / "raw_meta.parquet", compression="zstd")


def scale_at(work: Path, n: int, reps: int, log: Callable[[str], None]) -> dict:
    """Every case at n rows; returns {name: result}."""
    t0 = time.perf_counter()
    generate(work, n)
    log(f"  generated {n:,} rows in {time.perf_counter() - t0:.0f} s")
    r: dict[str, dict] = {}
    r["np_save"] = median_case("np_save", work, "", reps)
    r["write_many"] = median_case("write", work, "inorder:inorder:many", reps)
    r["write_shuffled"] = median_case("write", work, "shuffled:shuffled:many", reps)
    r["write_add"] = median_case("write", work, "added:inorder:add", 1)
    shutil.rmtree(work / "added", ignore_errors=True)
    log(f"  writes done ({time.perf_counter() - t0:.0f} s)")
    r["np_load"] = median_case("np_load", work, "", reps)
    r["load_inorder"] = median_case("load", work, "inorder", reps)
    r["load_shuffled"] = median_case("load", work, "shuffled", reps)
    r["mmap_where"] = median_case("mmap_where", work, "", reps)
    r["load_where"] = median_case("load_where", work, "inorder", reps)
    r["load_where_shuffled"] = median_case("load_where", work, "shuffled", reps)
    write_raw_meta(work, "inorder")
    r["query_raw"] = median_case("query_raw", work, "", reps)
    r["query"] = median_case("query", work, "inorder", reps)
    r["query_shuffled"] = median_case("query", work, "shuffled", reps)
    r["info"] = median_case("info", work, "inorder", reps)

    def drop_segment(store: str) -> Callable[[dict], None]:
        def after(got: dict) -> None:  # undo the append, so every repeat sees the same store
            shutil.rmtree(work / store / "sets" / "CXR" / "bench" / got["segment"])
        return after

    r["append_empty"] = median_case("append", work, "empty", reps, drop_segment("empty"))
    r["append"] = median_case("append", work, "inorder", reps, drop_segment("inorder"))
    r["append_shuffled"] = median_case("append", work, "shuffled", reps, drop_segment("shuffled"))
    shutil.rmtree(work / "empty", ignore_errors=True)
    r["read_crc"] = median_case("read_crc", work, "inorder", reps)
    r["verify"] = median_case("verify", work, "inorder", reps)
    store = work / "inorder"
    r["bytes"] = {
        "vectors": n * D * 4,
        "chunks": _dir_bytes(store / "sets", _is_chunk),
        "metadata": _dir_bytes(store / "sets", lambda p: not _is_chunk(p)),
        "commit_parts": _dir_bytes(store / "sets", lambda p: p.parent.name == "commits"),
        "manifest": (store / "manifest.parquet").stat().st_size,
    }
    log(f"  {n:,} rows done in {time.perf_counter() - t0:.0f} s")
    for name in ("inorder", "shuffled"):
        shutil.rmtree(work / name, ignore_errors=True)
    for f in work.iterdir():
        if f.is_file():
            f.unlink()
    return r


def big_check(work: Path, log: Callable[[str], None]) -> dict:
    """10^7 rows x 512 float16 (~10 GB): write once, then open + sets, a cohort query, a 10^5-row
    cohort load, verify; and verify of a 10^6-row float16 store for the growth ratio."""
    out: dict[str, dict] = {}
    for n, name in ((10**6, "f16-1m"), (10**7, "f16-10m")):
        t0 = time.perf_counter()
        generate(work, n, dtype="float16")
        log(f"  generated {n:,} float16 rows in {time.perf_counter() - t0:.0f} s")
        out[f"write_{name}"] = run_case("write", work, f"{name}:inorder:many:float16")
        (work / "x.npy").unlink()
        out[f"verify_{name}"] = run_case("verify", work, name)
        if n == 10**7:
            out["info"] = run_case("info", work, name)
            out["query"] = run_case("query", work, name)
            out["load_cohort"] = run_case("load_where", work, f"{name}:age = 60")
            out["bytes"] = {"chunks": _dir_bytes(work / name / "sets", _is_chunk),
                            "metadata": _dir_bytes(work / name / "sets", lambda p: not _is_chunk(p))}
        shutil.rmtree(work / name, ignore_errors=True)
        for f in work.iterdir():
            if f.is_file():
                f.unlink()
        log(f"  {name} done in {time.perf_counter() - t0:.0f} s")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
