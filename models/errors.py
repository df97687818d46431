"""Errors of the pure-torch layer. ``models/`` never imports the rest of embedstore, so these
have their own root; ``embedstore.errors`` re-exports them and the CLI reports them cleanly."""

from __future__ import annotations

__all__ = ["ModelError", "EncoderError", "UnknownEncoderError", "CheckpointError"]


class ModelError(Exception):
    reason: str = "model_error"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class EncoderError(ModelError, ValueError):
    reason = "encoder_error"


class UnknownEncoderError(ModelError, KeyError):
    reason = "unknown_encoder"

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


class CheckpointError(ModelError, ValueError):
    reason = "bad_checkpoint"
