"""One error root: everything the project raises on purpose derives from EmbedstoreError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import embedstore
from embedstore.errors import USER_ERRORS, EmbedstoreError, ModelError


def _modules() -> list[str]:
    names = ["embedstore"]
    for info in pkgutil.walk_packages(embedstore.__path__, "embedstore."):
        if not info.name.startswith("embedstore.cli"):
            names.append(info.name)
    return names


def test_every_project_exception_class_derives_from_the_root() -> None:
    found = []
    for name in _modules():
        mod = importlib.import_module(name)
        for _, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__.startswith("embedstore"):
                found.append(obj)
                assert issubclass(obj, EmbedstoreError), f"{obj.__module__}.{obj.__name__}"
    assert ModelError in found and len(found) > 10


def test_the_cli_treats_the_root_as_a_user_error() -> None:
    assert issubclass(ModelError, EmbedstoreError)
    assert USER_ERRORS == (EmbedstoreError,)
