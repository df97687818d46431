"""Mutation testing of chosen modules with mutmut (a developer tool; `make mutation`).

Usage:  python tests/mutation.py [-j N] [GLOB ...]

N mutants run in parallel (default 2); GLOB defaults to the modules docs/TESTING.md lists. The
test set is the fast suite (not slow, not gpu).

Copies the tracked files of the checkout into a scratch folder, writes a ``[tool.mutmut]``
section that mutates only the given files, runs ``mutmut run`` there (its progress goes to
``mutmut.log`` in the scratch folder, not the terminal) and prints, per module, how many mutants
were killed, survived, had no covering test or timed out, and the survival rate
``survived / (killed + survived + timeout)``. The scratch folder is kept (its path is printed) so
``mutmut results`` / ``mutmut show NAME`` can be run there to read the survivors.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["embedstore/store/*", "embedstore/extract.py", "embedstore/train.py",
           "embedstore/catalog.py", "embedstore/manifest.py"]


def main(argv: list[str]) -> int:
    children = 2
    if argv[:1] == ["-j"]:
        children, argv = int(argv[1]), argv[2:]
    patterns = argv or DEFAULT
    work = Path(tempfile.mkdtemp(prefix="embedstore-mutation-"))
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        dst = work / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst)
    quoted = ", ".join(f'"{p}"' for p in patterns)
    with open(work / "pyproject.toml", "a") as fh:
        fh.write(
            "\n[tool.mutmut]\n"
            'source_paths = ["embedstore/"]\n'
            f"only_mutate = [{quoted}]\n"
            'also_copy = ["models/", "cli/", "data_manifests/", "docs/", "README.md", '
            '"benchmarks/"]\n'
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not slow and not gpu", '
            '"--deselect", '
            '"tests/test_layering.py::test_installed_layout_has_no_generic_top_level_packages"]\n'
            'pytest_add_cli_args_test_selection = ["-m", "not slow and not gpu", "tests/"]\n'
        )
    # (the deselected test checks where the *installed* package lives, which is the checkout,
    # not mutmut's copy; every other test runs against the mutated copy)
    mutmut = Path(sys.executable).with_name("mutmut")
    print(f"mutating {patterns} in {work} (log: {work / 'mutmut.log'}) ...", flush=True)
    with open(work / "mutmut.log", "w") as log:
        subprocess.run([str(mutmut), "run", "--max-children", str(children)], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                       check=False)
    res = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=work,
                         capture_output=True, text=True, check=False).stdout
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for line in res.splitlines():
        m = re.match(r"\s*(embedstore\.[\w.]+?)\.x_\w+__mutmut_\d+: (.+)$", line)
        if m:
            per[m.group(1)][m.group(2).strip()] += 1
    total: Counter[str] = Counter()
    print(f"\n{'module':40} {'killed':>7} {'survived':>9} {'no tests':>9} {'timeout':>8} "
          f"{'survival':>9}")
    for mod in sorted(per):
        c = per[mod]
        total.update(c)
        print(_row(mod, c))
    print(_row("all", total))
    print(f"\nsurvivors: cd {work} && {mutmut} results   (mutmut show NAME for a diff)")
    return 0


def _row(name: str, c: Counter[str]) -> str:
    tested = c["killed"] + c["survived"] + c["timeout"]
    rate = c["survived"] / tested if tested else float("nan")
    return (f"{name:40} {c['killed']:7d} {c['survived']:9d} {c['no tests']:9d} {c['timeout']:8d} "
            f"{rate:9.1%}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
