"""The project's error root, defined in the lowest layer so every layer can derive from it.

``models/`` is pure torch and never imports the rest of embedstore, so the root lives here and
``embedstore.errors`` re-exports it: ``except EmbedstoreError`` catches everything the project
raises on purpose, from the torch modules to the CLI's library calls.
"""

from __future__ import annotations

__all__ = [
    "EmbedstoreError",
    "ConfigError",
    "ModelError",
    "EncoderError",
    "UnknownEncoderError",
    "CheckpointError",
]


class EmbedstoreError(Exception):
    """Root of every error embedstore raises on purpose.

    ``reason`` is a short machine-readable code (written into the store's failures table);
    the message names the bad value and the fix, and never contains patient-identifying values.
    """

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class ConfigError(EmbedstoreError, ValueError):
    """A bad option, spec or setting (defined here so the domain types below every layer can
    raise it; ``embedstore.errors`` re-exports it)."""

    reason = "bad_config"


class ModelError(EmbedstoreError):
    """An error of the pure-torch layer (encoders, heads, prior, checkpoints)."""

    reason = "model_error"


class EncoderError(ModelError, ValueError):
    reason = "encoder_error"


class UnknownEncoderError(ModelError, KeyError):
    reason = "unknown_encoder"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class CheckpointError(ModelError, ValueError):
    reason = "bad_checkpoint"
