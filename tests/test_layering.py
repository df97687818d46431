"""Imports flow one way: cli -> embedstore -> models; pydicom stays in the DICOM layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DICOM_MODULES = {"embedstore/dicom.py", "embedstore/_dicomwrite.py"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _py_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((ROOT / f).rglob("*.py"))
            if not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]


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
    if rel not in DICOM_MODULES and not rel.startswith("benchmarks/"):  # baselines may use it
        assert not any(m.startswith("pydicom") for m in mods), f"{rel} imports pydicom"


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
