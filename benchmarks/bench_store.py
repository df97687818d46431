"""Store benchmark: embedstore vs the per-file .npy layout of the published method, side by side,
and the store at scale (10^4, 10^5, 10^6 rows; benchmarks/_store_scale.py).

    python -m benchmarks.bench_store [--quick] [--scale-only] [--big]   (part of `make bench`)

``--big`` (or EMBEDSTORE_BENCH_BIG=1 under `make bench`) adds the 10^7-row float16 check: ~10 GB
on disk and about 15 minutes here.

(1) writing 20 000 x 512 float32 embeddings: StoreWriter.add per row vs one np.save per row;
(2) loading the full set: Store.load vs a per-sample np.load Dataset + DataLoader epoch, and vs
    one np.load of a single contiguous array;
(3) a cohort SQL filter + join over a 10^6-row manifest: Store.sql vs pandas read + filter + merge
    (skipped when pandas is not installed; pyarrow read + filter + join is shown as a reference).
Medians over repeats, all in one run on one machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedstore.store import open_store

__all__ = ["run"]

COHORT_SQL = (
    "SELECT s.study_id, s.patient_id, s.age, e.row FROM studies s "
    "JOIN embeddings e USING (study_id) "
    "WHERE e.encoder_key = 'bench' AND s.split = 'train' AND s.site IN ('A', 'C') "
    "AND s.age BETWEEN 50 AND 70"
)


def _median(fn: Callable[[], object], repeats: int, setup: Callable[[], None] | None = None) -> float:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> str:
    import duckdb
    import zarr

    out = [f"Python {platform.python_version()}", f"numpy {np.__version__}",
           f"zarr {zarr.__version__}", f"duckdb {duckdb.__version__}", f"pyarrow {pa.__version__}"]
    try:
        import torch

        out.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    return ", ".join(out)


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _bench_write_load(work: Path, n: int, d: int, reps: int) -> list[tuple]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)  # (N, D)
    ids = [f"S{i:07d}" for i in range(n)]
    keys = [f"{i:064x}" for i in range(n)]
    store_dir, npy_dir = work / "store", work / "npy"

    def reset_store() -> None:
        shutil.rmtree(store_dir, ignore_errors=True)

    def write_store(durability: str = "full") -> None:
        s = open_store(store_dir, create=True)
        with s.writer("CXR", "bench", dim=d, spec={"bench": True}, capacity=n,
                      durability=durability) as w:
            add = w.add
            for i in range(n):
                add(study_id=ids[i], patient_id=ids[i], cache_key=keys[i], content_hash=keys[i],
                    vector=x[i])

    def reset_npy() -> None:
        shutil.rmtree(npy_dir, ignore_errors=True)
        npy_dir.mkdir(parents=True)

    def write_npy() -> None:
        for i in range(n):
            np.save(npy_dir / f"{ids[i]}.npy", x[i])

    t_commit = _median(lambda: write_store("commit"), reps, reset_store)
    t_write = _median(write_store, reps, reset_store)
    t_npsave = _median(write_npy, reps, reset_npy)

    # Load: the store vs a per-sample Dataset epoch vs one contiguous np.load.
    got = open_store(store_dir).load("CXR", "bench").vectors
    if not np.array_equal(got, x):
        raise RuntimeError("benchmark store round trip differs from its input")
    np.save(work / "all.npy", x)
    t_load = _median(lambda: open_store(store_dir).load("CXR", "bench"), 2 * reps + 1)
    t_one = _median(lambda: np.load(work / "all.npy"), 2 * reps + 1)
    rows = [
        (f"Write {n:,} x {d} float32, durability='full' (default)",
         f"{_ms(t_write)} (StoreWriter.add per row; chunks + commits fsync'ed)",
         f"{_ms(t_npsave)} (np.save per row, no fsync)", t_npsave / t_write, ">= 15x"),
        (f"Write {n:,} x {d} float32, durability='commit'",
         f"{_ms(t_commit)} (StoreWriter.add per row; commits fsync'ed)",
         f"{_ms(t_npsave)} (np.save per row, no fsync)", t_npsave / t_commit, ">= 15x"),
    ]
    try:
        import torch
        from torch.utils.data import DataLoader, Dataset

        files = [npy_dir / f"{i}.npy" for i in ids]

        class PerFile(Dataset):
            def __len__(self) -> int:
                return len(files)

            def __getitem__(self, i: int) -> torch.Tensor:
                return torch.from_numpy(np.load(files[i]))

        def epoch() -> None:
            for _ in DataLoader(PerFile(), batch_size=64, shuffle=False, num_workers=0):
                pass

        t_dl = _median(epoch, max(1, reps))
        rows.append(("Load full set (vs per-sample Dataset)", f"{_ms(t_load)} (Store.load)",
                     f"{_ms(t_dl)} (np.load Dataset + DataLoader epoch, bs 64)", t_dl / t_load,
                     ">= 200x"))
    except ImportError:
        rows.append(("Load full set (vs per-sample Dataset)", _ms(t_load),
                     "skipped: torch not installed", None, ">= 200x"))
    rows.append(("Load full set (vs one contiguous array)", f"{_ms(t_load)} (Store.load)",
                 f"{_ms(t_one)} (np.load of one .npy)", t_one / t_load, ">= 0.5x"))
    return rows


def _bench_cohort(work: Path, n_manifest: int, reps: int) -> tuple[list[tuple], list[str]]:
    rng = np.random.default_rng(1)
    n_pat = n_manifest // 2
    pat = np.repeat(np.arange(n_pat), 2)
    study = [f"S{i:08d}" for i in range(n_manifest)]
    patient = [f"P{p:07d}" for p in pat]
    split_of = rng.choice(np.array(["train", "val", "test"]), n_pat, p=[0.6, 0.15, 0.25])
    table = pa.table({
        "patient_id": patient,
        "study_id": study,
        "modality": np.where(np.arange(n_manifest) % 2 == 0, "CXR", "CTPA"),
        "path": [f"img/{s}" for s in study],
        "acquired_at": pa.array(1_700_000_000_000_000 + (np.arange(n_manifest) % 2) * 3_600_000_000,
                                pa.timestamp("us")),
        "label_pe": pa.array(rng.integers(0, 2, n_manifest), pa.int8()),
        "split": split_of[pat],
        "site": rng.choice(np.array(["A", "B", "C", "D"]), n_pat)[pat],
        "age": rng.integers(18, 95, n_pat)[pat],
    })
    store_dir = work / "cohort-store"
    s = open_store(store_dir, create=True)
    s.attach_manifest(table)
    cxr = np.flatnonzero(np.arange(n_manifest) % 2 == 0)
    vec = np.zeros(8, np.float32)
    with s.writer("CXR", "bench", dim=8, spec={}, capacity=len(cxr)) as w:
        for i in cxr:
            vec[0] = i + 1
            w.add(study_id=study[i], patient_id=patient[i], cache_key=study[i],
                  content_hash=study[i], vector=vec)
    emb_meta = work / "embeddings_meta.parquet"  # what a pandas user would keep next to the .npy files
    pq.write_table(pa.table({"study_id": [study[i] for i in cxr],
                             "row": np.arange(len(cxr))}), emb_meta)

    t = time.perf_counter()
    cold = open_store(store_dir).sql(COHORT_SQL)
    t_cold = time.perf_counter() - t
    warm_store = open_store(store_dir)
    warm_store.sql("SELECT 1")
    t_sql = _median(lambda: warm_store.sql(COHORT_SQL), 2 * reps + 3)
    n_hits = cold.num_rows

    def arrow_way() -> pa.Table:
        m = pq.read_table(store_dir / "manifest.parquet")
        mask = pc.and_(pc.and_(pc.equal(m["split"], "train"), pc.is_in(m["site"], pa.array(["A", "C"]))),
                       pc.and_(pc.greater_equal(m["age"], 50), pc.less_equal(m["age"], 70)))
        return m.filter(mask).join(pq.read_table(emb_meta), "study_id", join_type="inner")

    if arrow_way().num_rows != n_hits:
        raise RuntimeError("pyarrow reference and SQL disagree on the cohort size")
    t_arrow = _median(arrow_way, reps)
    label = f"Cohort filter + join, {n_manifest:,}-row manifest ({n_hits:,} rows out)"
    rows = []
    notes = [f"Cold (open store + build catalog + first query): {_ms(t_cold)}."]
    try:
        import pandas as pd

        def pandas_way() -> object:
            m = pd.read_parquet(store_dir / "manifest.parquet")
            m = m[(m["split"] == "train") & m["site"].isin(["A", "C"]) & m["age"].between(50, 70)]
            return m.merge(pd.read_parquet(emb_meta), on="study_id")

        if len(pandas_way()) != n_hits:
            raise RuntimeError("pandas and SQL disagree on the cohort size")
        t_pd = _median(pandas_way, reps)
        rows.append((label, f"{_ms(t_sql)} (Store.sql)", f"{_ms(t_pd)} (pandas read + filter + merge)",
                     t_pd / t_sql, ">= 20x and < 100 ms"))
    except ImportError:
        rows.append((label, f"{_ms(t_sql)} (Store.sql)",
                     "pandas not installed: skipped", None, ">= 20x and < 100 ms"))
    rows.append((label + ", reference", f"{_ms(t_sql)} (Store.sql)",
                 f"{_ms(t_arrow)} (pyarrow read + filter + join)", t_arrow / t_sql, "(info)"))
    notes.append(f"Warm Store.sql median: {_ms(t_sql)} (goal < 100 ms: "
                 f"{'met' if t_sql < 0.1 else 'NOT met'}).")
    return rows, notes


def run(quick: bool = False, *, scale_only: bool = False, big: bool | None = None) -> str:
    """Run the benchmarks and return Markdown sections: the small side-by-side one, then scale."""
    from benchmarks._store_scale import run_scale

    big = os.environ.get("EMBEDSTORE_BENCH_BIG") == "1" if big is None else big
    scale = run_scale(quick=quick, big=big)
    return scale if scale_only else _run_small(quick) + "\n" + scale


def _run_small(quick: bool = False) -> str:
    """The small benchmark: a Markdown section (machine, command, table)."""
    n, d = (2000, 512) if quick else (20000, 512)
    n_manifest = 100_000 if quick else 1_000_000
    reps = 1 if quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-store-", dir=os.environ.get("BENCH_TMP")))
    try:
        rows = _bench_write_load(work, n, d, reps)
        cohort_rows, notes = _bench_cohort(work, n_manifest, reps)
        rows += cohort_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        "## Embedding store" + (" (quick run: smaller sizes, not the reference numbers)" if quick else ""),
        "",
        f"Machine: {_cpu()}, {os.cpu_count()} logical cores, {platform.system()} "
        f"{platform.release()}; {_versions()}.",
        "",
        "Command: `make bench` (this section alone: `python -m benchmarks.bench_store"
        + (" --quick" if quick else "") + "`). Medians over repeats; page cache warm; "
        "temporary folder on the same disk for both sides.",
        "",
        "| Task | embedstore | baseline | speed-up | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for task, ours, base, ratio, goal in rows:
        if ratio is None:
            r, met = "n/a", "n/a"
        else:
            r = f"{ratio:,.1f}x" if ratio >= 1 else f"{ratio:.2f}x"
            want = float(goal.split("x")[0].replace(">=", "").strip()) if goal.startswith(">=") else None
            met = "-" if want is None else ("yes" if ratio >= want else "**no**")
        lines.append(f"| {task} | {ours} | {base} | {r} | {goal} | {met} |")
    lines += ["", *notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ap.add_argument("--scale-only", action="store_true", help="only the scale section")
    ap.add_argument("--big", action="store_true", help="add the 10^7-row float16 check (~15 min)")
    args = ap.parse_args(argv)
    md = run(quick=args.quick, scale_only=args.scale_only, big=args.big)
    print(md)
    out = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "store.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.scale_only and out.exists():  # keep the small section, replace the scale one
        old = out.read_text()
        cut = old.find("## Embedding store at scale")
        md = (old[:cut] if cut >= 0 else old + "\n") + md
    out.write_text(md)


if __name__ == "__main__":
    sys.exit(main())
