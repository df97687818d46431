"""pyproject.toml lists packages explicitly: every package folder must be in that list, or a
non-editable install silently lacks it (an editable one, which the tests use, still works)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / folder for name, folder in tool["package-dir"].items()}
    found = set()
    for name, folder in dirs.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if not any(p.startswith(".") or p == "__pycache__" for p in rel):
                found.add(".".join((name, *rel)))
    assert found - set(tool["packages"]) == set(), "add these to [tool.setuptools] packages"
