"""embedstore: an embedding store and feature cache for cross-modal CXR/CTPA research.

``import embedstore`` is cheap: the public modules below load on first attribute access
(``embedstore.store``), so the CLI and a first query do not pay for torch. Data flow, one module
per stage: manifest -> dicom -> preprocess -> extract -> store -> catalog/query/index -> train ->
evaluate -> experiment. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from importlib import import_module
from importlib import metadata as _metadata
from types import ModuleType

try:
    __version__ = _metadata.version("embedstore")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

#: The public modules; everything else (``_*``, helpers such as ``fit`` or ``experiment_stats``) is
#: internal and may change without notice.
PUBLIC_MODULES = (
    "catalog", "dicom", "drr", "encoders", "errors", "evaluate", "experiment", "extract", "index",
    "manifest", "metrics", "models", "preprocess", "pseudonym", "query", "runs", "store", "synth",
    "train",
)

__all__ = ["PUBLIC_MODULES", "__version__", *PUBLIC_MODULES]


def __getattr__(name: str) -> ModuleType:
    if name in PUBLIC_MODULES:
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'embedstore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
