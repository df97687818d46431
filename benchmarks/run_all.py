"""`make bench`: run every benchmark (each compares against its baseline in the same run) and
assemble docs/BENCHMARKS.md from their Markdown sections.

    python -m benchmarks.run_all            # full sizes (what docs/BENCHMARKS.md reports)
    python -m benchmarks.run_all --quick    # small sizes, a smoke test of the benchmark code
    python -m benchmarks.run_all store      # only some of them
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCHES = ("store", "extract", "prior", "train_scale", "index", "experiment", "interchange")
ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", default=list(BENCHES), help=f"subset of {BENCHES}")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    args = ap.parse_args()
    sections = []
    for name in args.names:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        t0 = time.perf_counter()
        print(f"== bench_{name} ...", flush=True)
        md = mod.run(quick=args.quick)
        print(md, flush=True)
        (ROOT / "docs" / "benchmarks").mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "benchmarks" / f"{name}.md").write_text(md)
        print(f"== bench_{name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    for name in BENCHES:
        f = ROOT / "docs" / "benchmarks" / f"{name}.md"
        if f.exists():
            sections.append(f.read_text().strip())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        "# Benchmarks\n\n"
        "Every number below compares embedstore against a baseline measured **in the same run** on\n"
        "the same machine (medians over repeats; ratios are baseline time / embedstore time).\n"
        "Reproduce with `make bench` (or `.venv/bin/python -m benchmarks.run_all NAME`).\n\n"
        f"Last assembled {stamp} on: {machine()}.\n"
        + ("\n**Quick mode: reduced sizes, not the reported configuration.**\n" if args.quick else "")
    )
    (ROOT / "docs" / "BENCHMARKS.md").write_text(head + "\n\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {ROOT / 'docs' / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
