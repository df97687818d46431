"""The public API is declared once, in ``__all__``, and every declared name resolves."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["embedstore", "embedstore.models", "embedstore.cli", "embedstore.store", "embedstore.dicom",
            "embedstore.models.encoders"]


def _init_path(pkg: str) -> Path:
    rel = {"embedstore.models": "models", "embedstore.cli": "cli"}.get(pkg.split(".encoders")[0])
    if pkg == "embedstore.models.encoders":
        return ROOT / "models" / "encoders" / "__init__.py"
    return ROOT / (rel or pkg.replace(".", "/")) / "__init__.py"


@pytest.mark.parametrize("pkg", PACKAGES)
def test_package_declares_all_and_every_name_resolves(pkg: str) -> None:
    tree = ast.parse(_init_path(pkg).read_text())
    assigned = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                if isinstance(t, ast.Name)}
    assert "__all__" in assigned, f"{pkg}/__init__.py has no __all__"
    mod = importlib.import_module(pkg)
    for name in mod.__all__:
        try:
            getattr(mod, name)
        except AttributeError:
            importlib.import_module(f"{pkg}.{name}")  # a submodule named in __all__


def test_public_modules_have_all() -> None:
    import embedstore

    for name in embedstore.PUBLIC_MODULES:
        mod = getattr(embedstore, name)
        assert isinstance(getattr(mod, "__all__", None), list | tuple), f"embedstore.{name} lacks __all__"
        for sym in mod.__all__:
            assert hasattr(mod, sym) or importlib.util.find_spec(f"{mod.__name__}.{sym}"), \
                f"embedstore.{name}.__all__ names missing {sym!r}"


def test_unknown_attribute_is_an_attribute_error() -> None:
    import embedstore

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        embedstore.nope  # noqa: B018


def test_import_embedstore_is_cheap() -> None:
    code = "import sys, embedstore; print(embedstore.__version__); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    version, torch_loaded = out.split()
    assert version != "0+unknown"
    assert torch_loaded == "False"
