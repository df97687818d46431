"""Experiment benchmark: the cell pool against running the same cells one after another.

    python -m benchmarks.bench_experiment [--quick]      (part of `make bench`)

On the demo cohort (800 phantom patients, synthesised and extracted once into
benchmarks/.cache/experiment, reused afterwards; --quick: a 60-patient store of random vectors),
an experiment of 5 seeds x 4 label fractions with the default arms runs three times in the same
run, each on a fresh copy of the store: (1) serial (``workers=0``: cells one after another in
one process, the baseline), (2) the spawn process pool (``workers=None``: one cell per core,
one torch thread each), (3) the same command again on (2)'s store: every cell reused. Reported:
wall time, peak RSS of the whole process tree (``ru_maxrss`` of children + self), the pool's
speed-up over serial, the re-run's time, and whether (1) and (2) wrote identical
predictions.parquet files.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache" / "experiment"

__all__ = ["run"]

_CHILD = r"""
import json, resource, sys, time
from embedstore.experiment import ExperimentConfig, run_experiment
store, workers, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
kw = {}
if quick:
    kw = dict(classifier={"epochs": 3, "patience": 2},
              prior={"epochs": 2, "eval_every": 1, "hidden": 16, "depth": 1, "val_samples": 1,
                     "val_steps": 2}, label_fractions=(0.4, 0.6, 0.8, 1.0))
cfg = ExperimentConfig(name="bench", seeds=(10, 11, 12, 13, 14), n_boot=500, **kw)
t = time.perf_counter()
res = run_experiment(store, cfg, workers=None if workers == "pool" else int(workers))
wall = time.perf_counter() - t
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024
print(json.dumps({"wall_s": wall, "peak_rss": rss, "trained": res.cells_trained,
                  "reused": res.cells_reused, "out": str(res.out_dir)}))
"""


def _quick_store(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_train import _manifest, _write_set  # the unit tests' 60-patient vector store

    from embedstore.store import open_store

    store = open_store(root, create=True)
    m = _manifest()
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    _write_set(store, "CTPA", "ct-a", [s for s in ids if s.endswith("-ct")], 1)
    _write_set(store, "CXR", "cx", [s for s in ids if s.endswith("-cx")], 3)
    return root


def _demo_store() -> Path:
    """The demo cohort's store with both embedding sets and no runs (built once, then cached)."""
    store = CACHE / "store"
    if not (store / ".built").exists():
        from embedstore.extract import ExtractConfig, extract
        from embedstore.synth import run_synth

        shutil.rmtree(CACHE, ignore_errors=True)
        res = run_synth(CACHE / "cohort", n_patients=800, seed=0)
        for m in ("cxr", "ctpa"):
            extract(store, res["manifest_path"], ExtractConfig(modality=m))
        (store / ".built").write_text("ok\n")
    return store


def _child(store: Path, workers: str, quick: bool) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _CHILD, str(store), workers, "1" if quick else "0"],
                         capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": "1"} if workers == "0" else None)
    if out.returncode != 0:
        raise RuntimeError(f"experiment child ({workers}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> str:
    """Run the experiment benchmark; return a Markdown section."""
    from benchmarks.run_all import machine

    tmp = Path(tempfile.mkdtemp(prefix="bench-experiment-"))
    try:
        base = _quick_store(tmp / "base") if quick else _demo_store()
        serial_store, pool_store = tmp / "serial", tmp / "pool"
        for d in (serial_store, pool_store):
            shutil.copytree(base, d, ignore=shutil.ignore_patterns("runs", "experiments"))
        serial = _child(serial_store, "0", quick)
        pool = _child(pool_store, "pool", quick)
        again = _child(pool_store, "pool", quick)
        same = Path(serial["out"], "predictions.parquet").read_bytes() == \
            Path(pool["out"], "predictions.parquet").read_bytes()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cells = serial["trained"]
    size = "60 patients of random vectors, 3-epoch heads, label fractions 0.4-1.0 (--quick)" if quick else \
        "demo cohort, 800 patients, default training configs"
    gb = 1024 ** 3
    return "\n".join([
        "## Experiment (`embedstore experiment`)",
        "",
        f"Machine: {machine()}. Command: `make bench` (or `.venv/bin/python -m "
        f"benchmarks.bench_experiment{' --quick' if quick else ''}`). {cells} cells "
        f"(5 seeds x 4 label fractions, arms ctpa_only, cxr_only, distilled, ridge_logit); {size}.",
        "",
        "| run | wall s | peak RSS | vs serial |",
        "| --- | ---: | ---: | ---: |",
        f"| serial, cells one after another (baseline) | {serial['wall_s']:.1f} | "
        f"{serial['peak_rss'] / gb:.2f} GB | 1.00x |",
        f"| process pool, {os.cpu_count()} workers | {pool['wall_s']:.1f} | "
        f"{pool['peak_rss'] / gb:.2f} GB | {serial['wall_s'] / pool['wall_s']:.2f}x faster |",
        f"| second invocation (every cell reused: {again['reused']}/{cells}) | "
        f"{again['wall_s']:.1f} | {again['peak_rss'] / gb:.2f} GB | "
        f"{serial['wall_s'] / again['wall_s']:.0f}x faster |",
        "",
        f"Serial and pool runs wrote {'identical' if same else 'DIFFERENT'} predictions.parquet "
        "files. Peak RSS is the largest single process (the pool's workers each hold one cell).",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    print(run(quick=ap.parse_args().quick))


if __name__ == "__main__":
    main()
