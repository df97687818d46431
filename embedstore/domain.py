"""The domain's words as types: the modalities and splits every layer speaks about.

``Modality`` is defined in ``embedstore.models.domain`` (the lowest layer: encoder cards name it)
and re-exported here.

A ``StrEnum`` compares and serialises as its value, so ``Modality.CXR == "CXR"`` and the
values written into manifests, store folders and run configs stay plain strings.
"""

from __future__ import annotations

from enum import StrEnum

from embedstore.errors import ConfigError
from embedstore.models.domain import Modality  # defined below every layer (encoder cards use it)

__all__ = ["Modality", "Split"]


class Split(StrEnum):
    """A patient-level data split (the manifest's ``split`` column)."""

    TRAIN = "train"
    VAL = "val"
    TEST = "test"

    @classmethod
    def parse(cls, value: str | Split) -> Split:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ConfigError(
                f"Unknown split {value!r}. Valid: {', '.join(s.value for s in cls)}."
            ) from None
