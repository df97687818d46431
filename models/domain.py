"""The imaging modality as a type, defined in the lowest layer so encoder cards can name it.

``models/`` never imports the rest of embedstore, and an encoder card says which modality its
encoder takes, so ``Modality`` lives here; ``embedstore.domain`` re-exports it beside ``Split``.
A ``StrEnum`` compares and serialises as its value, so ``Modality.CXR == "CXR"`` and the values
written into manifests, store folders, cards and run configs stay plain strings.
"""

from __future__ import annotations

from enum import StrEnum

from embedstore.models.errors import ConfigError

__all__ = ["Modality"]


class Modality(StrEnum):
    """An imaging modality of a study (the manifest's ``modality`` column)."""

    CXR = "CXR"  # chest radiograph (the student's input)
    CTPA = "CTPA"  # CT pulmonary angiogram (the teacher's input)

    @classmethod
    def parse(cls, value: str | Modality) -> Modality:
        """``"cxr"``, ``"CXR"`` or ``Modality.CXR`` -> ``Modality.CXR``; ConfigError otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            raise ConfigError(
                f"Unknown modality {value!r}. Valid: {', '.join(m.value for m in cls)} "
                "(case does not matter)."
            ) from None

    @property
    def input_kind(self) -> str:
        """What an encoder of this modality takes: a 2-D ``image`` or a 3-D ``volume``."""
        return "volume" if self is Modality.CTPA else "image"
