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
    """x.npy (N, D), rows.parquet (ids, realistic random sha256 keys), manifest.parquet, perm.npy,
    and the ids two appends add; written in blocks, so 10^7 rows fit in memory."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    block = 1 << 20
    x = np.lib.format.open_memmap(work / "x.npy", mode="w+", dtype=dtype, shape=(n, D))
    for a in range(0, n, 1 << 16):
        b = min(n, a + (1 << 16))
        x[a:b] = rng.standard_normal((b - a, D), dtype=np.float32)
    x.flush()
    del x
    n_pat = -(-n // 2)
    split = rng.choice(np.array(["train", "val", "test"]), n_pat, p=[0.6, 0.15, 0.25])
    site = rng.choice(np.array(["A", "B", "C", "D"]), n_pat)
    age = rng.integers(18, 95, n_pat)
    rows_w = man_w = None
    try:
        for a in range(0, n, block):
            b = min(n, a + block)
            idx = np.arange(a, b)
            ids = [f"S{i:08d}" for i in idx]
            pids = [f"P{i // 2:08d}" for i in idx]
            rows = pa.table({"study_id": ids, "patient_id": pids, "cache_key": _hex(rng, b - a),
                             "content_hash": _hex(rng, b - a), "source_sig": _hex(rng, b - a)})
            man = pa.table({
                "patient_id": pids, "study_id": ids, "modality": ["CXR"] * (b - a),
                "path": [f"img/{s}" for s in ids],
                "acquired_at": pa.array(1_700_000_000_000_000 + idx * 1000, pa.timestamp("us")),
                "label_pe": pa.array(rng.integers(0, 2, b - a), pa.int8()),
                "split": split[idx // 2], "site": site[idx // 2], "age": age[idx // 2],
            })
            if rows_w is None:
                rows_w = pq.ParquetWriter(work / "rows.parquet", rows.schema)
                man_w = pq.ParquetWriter(work / "manifest.parquet", man.schema)
            rows_w.write_table(rows)
            man_w.write_table(man)
    finally:
        for w in (rows_w, man_w):
            if w is not None:
                w.close()
    np.save(work / "perm.npy", rng.permutation(n))
    new = 100  # the studies an append adds (not in the store)
    for name, ids_new in (
        ("new_rows.parquet", [f"S{n + i:08d}" for i in range(new)]),  # after every stored id
        # between stored ids: no part can be skipped by its id range
        ("new_rows_inside.parquet", [f"S{i:08d}x" for i in sorted(rng.choice(n, new, False))]),
    ):
        pq.write_table(pa.table({
            "study_id": ids_new,
            "patient_id": [f"Q{i:08d}" for i in range(new)],
            "cache_key": _hex(rng, new),
            "content_hash": _hex(rng, new),
            "source_sig": _hex(rng, new),
        }), work / name)


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
    n = len(x)
    store_dir = work / name
    shutil.rmtree(store_dir, ignore_errors=True)
    s = open_store(store_dir, create=True)
    s.attach_manifest(pq.read_table(work / "manifest.parquet"))
    stream = n > 2_000_000  # 10^7: read the inputs while writing (they do not fit in memory)

    def batches():
        if stream:
            pf = pq.ParquetFile(work / "rows.parquet")
            a = 0
            for rb in pf.iter_batches(batch_size=BATCH):
                c = rb.to_pydict()
                yield c, np.ascontiguousarray(x[a : a + rb.num_rows])
                a += rb.num_rows
            return
        rows = pq.read_table(work / "rows.parquet")
        cols = {c: rows[c].to_pylist() for c in rows.column_names}
        idx = np.load(work / "perm.npy") if order == "shuffled" else np.arange(n)
        for a in range(0, n, BATCH):
            sel = idx[a : a + BATCH]
            yield ({k: [v[i] for i in sel] for k, v in cols.items()},
                   np.ascontiguousarray(x[np.sort(sel)] if order == "inorder" else x[sel]))

    # Small sizes: batches prepared before the clock starts (an encoder's output).
    prepared = None if stream else list(batches())
    t = time.perf_counter()
    s = open_store(store_dir)
    with s.writer("CXR", "bench", dim=D, spec={"bench": True}, capacity=n, dtype=dtype) as w:
        for c, vec in (batches() if stream else prepared):
            if mode == "many":
                w.add_many(study_ids=c["study_id"], patient_ids=c["patient_id"],
                           cache_keys=c["cache_key"], content_hashes=c["content_hash"],
                           source_sigs=c["source_sig"], vectors=vec)
            else:
                for j in range(len(vec)):
                    w.add(study_id=c["study_id"][j], patient_id=c["patient_id"][j],
                          cache_key=c["cache_key"][j], content_hash=c["content_hash"][j],
                          source_sig=c["source_sig"][j], vector=vec[j])
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
    import embedstore.catalog  # noqa: F401 - imports (DuckDB) outside the clock
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
    import embedstore.catalog  # noqa: F401 - imports (DuckDB) outside the clock, as for the baseline
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

    arg, _, where = arg.partition(":")
    new = pq.read_table(work / ("new_rows_inside.parquet" if where == "inside"
                                else "new_rows.parquet")).to_pylist()
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
    r["append_inside"] = median_case("append", work, "inorder:inside", reps, drop_segment("inorder"))
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
        out[f"read_crc_{name}"] = run_case("read_crc", work, name)
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


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def _t(s: float) -> str:
    return f"{s * 1e3:,.0f} ms" if s < 10 else f"{s:,.1f} s"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.0f} MB"


GROWTH_ROWS = [  # (label, store case, baseline case or None)
    ("write (add_many, in order)", "write_many", "np_save"),
    ("write (add_many, shuffled order)", "write_shuffled", "np_save"),
    ("write (add per row)", "write_add", "np_save"),
    ("full load, written in order", "load_inorder", "np_load"),
    ("full load, written shuffled", "load_shuffled", "np_load"),
    ("load(where=age = 60), ~1.3 %", "load_where", "mmap_where"),
    ("load(where=...), shuffled store", "load_where_shuffled", "mmap_where"),
    ("first cohort query (open + catalog + SQL)", "query", "query_raw"),
    ("first cohort query, shuffled store", "query_shuffled", "query_raw"),
    ("open + sets() (counts)", "info", None),
    ("append 100 rows (new ids after the range)", "append", "append_empty"),
    ("append 100 rows (new ids inside the range)", "append_inside", "append_empty"),
    ("verify", "verify", "read_crc"),
]
BASELINE_NAMES = {
    "np_save": "np.save + fsync", "np_load": "np.load", "mmap_where": "np.load(mmap)[rows]",
    "query_raw": "DuckDB on raw Parquet", "append_empty": "same on an empty store",
    "read_crc": "read + CRC-32 of the chunk files",
}


def goals(r: dict) -> list[tuple[str, str, str, bool]]:
    """(goal, measured, target, met) at the largest size measured."""
    vec = r["bytes"]["vectors"]
    thr = r["np_save"]["s"] / r["write_many"]["s"]
    out = [("write throughput vs np.save + fsync", f"{thr:.2f}x", ">= 0.5x", thr >= 0.5)]
    for key, what in (("load_inorder", "in order"), ("load_shuffled", "shuffled")):
        sp = r["np_load"]["s"] / r[key]["s"]
        rss = r[key]["rss"] / vec
        out.append((f"full load ({what}) speed vs np.load", f"{sp:.2f}x", ">= 0.8x", sp >= 0.8))
        out.append((f"full load ({what}) peak RSS / array", f"{rss:.3f}x", "<= 1.1x", rss <= 1.1))
    q = r["query"]["s"] / r["query_raw"]["s"]
    out.append(("first cohort query time vs DuckDB on raw Parquet", f"{q:.2f}x", "<= 2x", q <= 2))
    out.append(("first cohort query peak RSS", _gb(r["query"]["rss"]), "<= 0.5 GB",
                r["query"]["rss"] <= 0.5e9))
    for key, what in (("append", "after the range"), ("append_inside", "inside the range")):
        a = r[key]["s"] / r["append_empty"]["s"]
        out.append((f"append 100 rows ({what}) vs empty store", f"{a:.2f}x", "<= 2x", a <= 2))
    m = r["bytes"]["metadata"] / vec
    out.append(("metadata on disk / vector bytes", f"{m:.1%}", "<= 10 %", m <= 0.10))
    v = r["verify"]["s"] / r["read_crc"]["s"]
    out.append(("verify vs read + CRC of the same bytes", f"{v:.2f}x", "<= 1.5x", v <= 1.5))
    return out


def render(results: dict[int, dict], reps: int, big: dict | None, quick: bool) -> str:
    sizes = sorted(results)
    top = results[sizes[-1]]
    lines = [
        "## Embedding store at scale" + (" (quick run: small sizes)" if quick else ""),
        "",
        f"Rows x {D} float32 with realistic metadata (random sha256 cache keys, content hashes and "
        "source signatures). Every case runs in a fresh subprocess (imports outside the clock, "
        "on both sides); time is the median of "
        f"{reps} runs, peak RSS is the process's VmHWM at its end (ru_maxrss would carry the "
        "driver's RSS across fork + exec). Page cache warm. Command: `python -m "
        "benchmarks.bench_store --scale-only` (part of `make bench`).",
        "",
        f"### Goals at {sizes[-1]:,} rows (issue 14)",
        "",
        "| goal | measured | target | met |",
        "|---|---|---|---|",
    ]
    for g, m, t, ok in goals(top):
        lines.append(f"| {g} | {m} | {t} | {'yes' if ok else '**no**'} |")
    lines += ["", "### Growth: time / peak RSS (baseline in the same run)", "",
              "| operation | " + " | ".join(f"{n:,} rows" for n in sizes) + " | baseline |",
              "|---|" + "---|" * len(sizes) + "---|"]
    for label, case, base in GROWTH_ROWS:
        cells = []
        for n in sizes:
            rr = results[n]
            if case not in rr:
                cells.append("-")
                continue
            c = f"{_t(rr[case]['s'])} / {_gb(rr[case]['rss'])}"
            if base:
                c += f" (vs {_t(rr[base]['s'])} / {_gb(rr[base]['rss'])})"
            cells.append(c)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {BASELINE_NAMES.get(base, '-')} |")
    cells = []
    for n in sizes:
        b = results[n]["bytes"]
        cells.append(f"{_gb(b['metadata'])} ({b['metadata'] / b['vectors']:.1%})")
    lines.append("| metadata on disk (share of vectors) | " + " | ".join(cells) + " | - |")
    if big:
        v6, v7 = big["verify_f16-1m"]["s"], big["verify_f16-10m"]["s"]
        lines += [
            "", "### 10^7 rows x 512 float16 (generated, ~10 GB of vectors)", "",
            "| check | measured | target | met |", "|---|---|---|---|",
            f"| write 10^7 rows (add_many, in order) | {_t(big['write_f16-10m']['s'])} | - | - |",
            f"| open + sets() | {_t(big['info']['s'])} / {_gb(big['info']['rss'])} | "
            f"within 0.5 GB | {'yes' if big['info']['rss'] <= 0.5e9 else '**no**'} |",
            f"| first cohort query | {_t(big['query']['s'])} / {_gb(big['query']['rss'])} | "
            f"within 0.5 GB | {'yes' if big['query']['rss'] <= 0.5e9 else '**no**'} |",
            f"| load a {big['load_cohort']['rows']:,}-row cohort (where age = 60) | "
            f"{_t(big['load_cohort']['s'])} / {_gb(big['load_cohort']['rss'])} "
            f"({_gb(big['load_cohort']['bytes'])} of vectors) | within 0.5 GB + the cohort | "
            f"{'yes' if big['load_cohort']['rss'] <= 0.5e9 + big['load_cohort']['bytes'] else '**no**'} |",
            f"| verify 10^7 vs 10^6 (float16) | {_t(v7)} vs {_t(v6)}: {v7 / v6:.1f}x | <= 12x | "
            f"{'yes' if v7 / v6 <= 12 else '**no**'} |",
            f"| verify / (read + CRC) at 10^6 and 10^7 | "
            f"{v6 / big['read_crc_f16-1m']['s']:.2f}x and {v7 / big['read_crc_f16-10m']['s']:.2f}x"
            " | (info: the 10^7 chunks do not fit in the page cache) | - |",
            f"| metadata on disk | {_gb(big['bytes']['metadata'])} "
            f"({big['bytes']['metadata'] / big['bytes']['chunks']:.1%} of the chunks) | - | - |",
        ]
    return "\n".join(lines) + "\n"


def run_scale(quick: bool = False, big: bool = False, log: Callable[[str], None] = print) -> str:
    sizes = (1_000, 10_000) if quick else (10_000, 100_000, 1_000_000)
    reps = 1 if quick else 3
    base = Path(os.environ.get("BENCH_TMP") or "/tmp")
    work = Path(__import__("tempfile").mkdtemp(prefix="bench-store-scale-", dir=base))
    try:
        results = {}
        for n in sizes:
            log(f"store scale: {n:,} rows")
            results[n] = scale_at(work / f"n{n}", n, reps, log)
        big_r = None
        if big:
            log("store scale: 10^7 float16 check")
            big_r = big_check(work / "big", log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "store_scale.json").write_text(
        json.dumps({"sizes": results, "big": big_r}, indent=1, default=str))
    return render(results, reps, big_r, quick)


if __name__ == "__main__":
    main(sys.argv[1:])
