"""Imports flow one way: cli -> embedstore -> models; pydicom stays in the DICOM layer; only cli/
prints."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The DICOM layer: the reader package and the synthetic-cohort writer. Nothing else imports
# pydicom; pseudonymisation (embedstore/pseudonym.py) is deliberately outside it.
DICOM_MODULES = {"embedstore/dicom/", "embedstore/_dicomwrite.py"}


def _in_dicom_layer(rel: str) -> bool:
    return any(rel == m or (m.endswith("/") and rel.startswith(m)) for m in DICOM_MODULES)


def _imports_of(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _imports(path: Path) -> set[str]:
    return _imports_of(path.read_text())


def _py_files(*folders: str) -> list[Path]:
    # os.walk pruning dot folders: never descends into caches (.venv-dalle2, .cache) that a
    # running benchmark may be writing to
    out = []
    for f in folders:
        for dirpath, dirnames, filenames in os.walk(ROOT / f):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")]
    return out


@pytest.mark.parametrize("path", _py_files("models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_models_never_import_the_rest_of_embedstore(path: Path) -> None:
    bad = {m for m in _imports(path)
           if (m == "embedstore" or m.startswith("embedstore.")) and not m.startswith("embedstore.models")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    assert not any(m == "models" or m.startswith("models.") for m in _imports(path)), \
        "import the installed name embedstore.models, not the top-level folder"


@pytest.mark.parametrize("path", _py_files("embedstore", "models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_the_cli(path: Path) -> None:
    assert not {m for m in _imports(path) if m.startswith("embedstore.cli")}


@pytest.mark.parametrize("path", _py_files("embedstore", "models", "cli", "benchmarks"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_pydicom_only_in_the_dicom_layer_and_click_nowhere(path: Path) -> None:
    mods = _imports(path)
    rel = str(path.relative_to(ROOT))
    assert not any(m == "click" or m.startswith("click.") for m in mods), f"{rel} imports click"
    if not _in_dicom_layer(rel) and not rel.startswith("benchmarks/"):  # baselines may use it
        assert not any(m.startswith("pydicom") for m in mods), f"{rel} imports pydicom"


def _module_path(module: str) -> Path | None:
    """The source file of an embedstore module (package -> its __init__.py), else None."""
    parts = module.split(".")
    if parts[0] != "embedstore":
        return None
    if parts[1:2] == ["models"]:
        base, rest = ROOT / "models", parts[2:]
    elif parts[1:2] == ["cli"]:
        base, rest = ROOT / "cli", parts[2:]
    else:
        base, rest = ROOT / "embedstore", parts[1:]
    target = base.joinpath(*rest)
    if (target / "__init__.py").is_file():
        return target / "__init__.py"
    return target.with_suffix(".py") if target.with_suffix(".py").is_file() else None


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _reachable(module: str) -> set[str]:
    """Every module the import of ``module`` can load, following embedstore's own imports
    (function-level ones too, so a lazy import cannot hide a dependency) and parent packages."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = _module_path(mod)
        if path is None:
            continue
        todo.extend(".".join(mod.split(".")[:k]) for k in range(1, mod.count(".") + 1))
        tree = ast.parse(path.read_text(), filename=str(path))
        for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and _type_checking(n)]:
            block.body = []  # `if TYPE_CHECKING:` imports never run
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo.extend(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo.append(node.module)
                # `from embedstore import dicom` imports the submodule embedstore.dicom
                todo.extend(f"{node.module}.{a.name}" for a in node.names
                            if _module_path(f"{node.module}.{a.name}") is not None)
    return seen


def test_the_dicom_layer_is_where_the_rule_says() -> None:
    # guards the rule above against going vacuous after a move
    assert (ROOT / "embedstore" / "dicom" / "__init__.py").is_file()
    assert (ROOT / "embedstore" / "_dicomwrite.py").is_file()
    assert any("pydicom" in _imports(p) for p in _py_files("embedstore/dicom"))


@pytest.mark.parametrize("module", ["embedstore.pseudonym", "embedstore.manifest"])
def test_pseudonymisation_and_the_manifest_never_reach_pydicom(module: str) -> None:
    reached = _reachable(module)
    assert not {m for m in reached if m.startswith(("pydicom", "embedstore.dicom"))}, \
        f"{module} reaches {sorted(m for m in reached if 'dicom' in m)}"


def test_decode_workers_import_only_the_dicom_and_preprocess_layers() -> None:
    # spawned decode workers must not pay for the store, the catalog or the encoders
    allowed = {"embedstore", "embedstore._decode", "embedstore._faults", "embedstore.errors",
               "embedstore.preprocess",
               "embedstore.pseudonym", "embedstore.models", "embedstore.models.errors",
               "embedstore.domain", "embedstore.models.domain"}
    ours = {m for m in _reachable("embedstore._decode") if m.startswith("embedstore")}
    extra = {m for m in ours - allowed if m != "embedstore.dicom" and not m.startswith("embedstore.dicom.")}
    assert "embedstore.dicom.series" in ours  # the walk does follow the package
    assert not extra, f"the decode worker imports {sorted(extra)}"


def test_installed_layout_has_no_generic_top_level_packages() -> None:
    import importlib.util

    import embedstore.cli
    import embedstore.models

    assert Path(embedstore.models.__file__).parent == ROOT / "models"
    assert Path(embedstore.cli.__file__).parent == ROOT / "cli"
    import sys

    saved = list(sys.path)
    try:  # from outside the checkout, nothing called `models` or `cli` is importable
        sys.path[:] = [p for p in sys.path if p not in ("", str(ROOT))]
        assert importlib.util.find_spec("models") is None
        assert importlib.util.find_spec("cli") is None
    finally:
        sys.path[:] = saved


# ------------------------------------------------------------------------------------------------
# The library returns data and reports progress through callbacks; only cli/ prints
# ------------------------------------------------------------------------------------------------

_OUTPUT_MODULES = ("rich", "typer", "click", "tqdm", "pprint")


def _printing(source: str) -> list[str]:
    """What in ``source`` writes to the terminal: print(), sys.stdout/stderr.write, and imports
    of terminal-output packages. Logging and warnings are fine (the caller decides on them)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id == "print":
                found.append(f"print() on line {node.lineno}")
            elif (isinstance(f, ast.Attribute) and f.attr in ("write", "writelines")
                  and isinstance(f.value, ast.Attribute) and f.value.attr in ("stdout", "stderr")
                  and isinstance(f.value.value, ast.Name) and f.value.value.id == "sys"):
                found.append(f"sys.{f.value.attr}.{f.attr}() on line {node.lineno}")
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and node.level == 0:
            found += [f"from sys import {a.name} on line {node.lineno}" for a in node.names
                      if a.name in ("stdout", "stderr")]
    for m in _imports_of(source):
        if m.split(".")[0] in _OUTPUT_MODULES:
            found.append(f"imports {m}")
    return found


@pytest.mark.parametrize("path", _py_files("embedstore", "models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_prints(path: Path) -> None:
    found = _printing(path.read_text())
    assert not found, (f"{path.relative_to(ROOT)}: {found}. Return data, or report through an "
                       "embedstore.progress.Reporter; rendering lives in cli/render.py.")


@pytest.mark.parametrize("snippet", [
    "print('x')",
    "import sys\nsys.stdout.write('x')",
    "import sys\nsys.stderr.write('x')",
    "from sys import stderr",
    "from rich.table import Table",
    "import rich",
    "from tqdm import tqdm",
], ids=["print", "stdout", "stderr", "from-sys", "rich-from", "rich-import", "tqdm"])
def test_the_printing_check_catches(snippet: str) -> None:
    assert _printing(snippet)


def test_the_printing_check_allows_logging_and_strings() -> None:
    assert not _printing("import logging, warnings\nlogging.getLogger(__name__).info('x')\n"
                         "warnings.warn('y')\nhint = 'python -c \"print(1)\"'\nf.write(b'')")


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: about 10 s on 2 cores
def test_the_library_imports_without_loading_rich() -> None:
    """Transitive imports too: every library module loads without rich or typer (the CLI's)."""
    import subprocess
    import sys

    mods = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                   for p in _py_files("embedstore")})
    code = ("import importlib, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('rich', 'typer'))\n"
            "print(loaded)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    assert out.strip() == "[]", out
