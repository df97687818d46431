"""Classifier heads on cached embeddings: logistic (linear) and a small MLP.

Each head stores the standardisation statistics of its training split as buffers, so a
checkpoint (state dict -> safetensors) carries everything needed to score raw embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from embedstore.models.errors import ModelError
from torch import nn

__all__ = [
    "ModelConfigError",
    "HeadConfig",
    "LinearHead",
    "MLPHead",
    "create_head",
    "HEAD_KINDS",
]

HEAD_KINDS = ("linear", "mlp")
STD_FLOOR = 1e-6  # every standardiser's floor: constant dimensions would divide by zero


class ModelConfigError(ModelError, ValueError):
    """A model configuration value is invalid (the message names it and the valid range)."""

    reason = "bad_config"


class _JsonConfig:
    """JSON round trip for frozen config dataclasses; unknown keys are refused, not dropped."""

    SCHEMA: ClassVar[str] = ""
    #: The error raised for bad input; layers above models/ substitute their own typed error.
    _error: ClassVar[type[Exception]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise cls._error(
                f"Unknown {cls.__name__} field(s) {unknown}. Valid fields: {sorted(names)}."
            )
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise cls._error(f"{cls.__name__} JSON is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise cls._error(f"{cls.__name__} JSON must be an object, got {type(data).__name__}.")
        return cls.from_dict(data)


_JsonConfig._error = ModelConfigError


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ModelConfigError(message)


@dataclass(frozen=True)
class HeadConfig(_JsonConfig):
    """Architecture of a classifier head: ``kind`` 'linear' (logistic) or 'mlp'."""

    dim: int
    kind: Literal["linear", "mlp"] = "linear"
    hidden: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        _check(self.kind in HEAD_KINDS, f"Unknown head kind {self.kind!r}. Available: {list(HEAD_KINDS)}.")
        _check(isinstance(self.dim, int) and self.dim > 0, f"Head dim must be a positive int, got {self.dim!r}.")
        _check(self.hidden > 0, f"Head hidden must be > 0, got {self.hidden!r}.")
        _check(0.0 <= self.dropout < 1.0, f"Head dropout must be in [0, 1), got {self.dropout!r}.")


class _StandardizedHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))  # (D,)
        self.register_buffer("std", torch.ones(dim))  # (D,)

    @torch.no_grad()
    def set_standardizer(self, x_train: torch.Tensor) -> None:
        """Fit the stored standardisation (per-dimension mean/std) on the training split."""
        if x_train.ndim != 2 or x_train.shape[1] != self.mean.shape[0] or x_train.shape[0] < 2:
            raise ModelConfigError(
                f"set_standardizer needs an (N>=2, {self.mean.shape[0]}) tensor, got "
                f"{tuple(x_train.shape)}."
            )
        x = x_train.to(self.mean.device, torch.float32)
        self.mean.copy_(x.mean(0))  # (D,)
        self.std.copy_(x.std(0).clamp_min(STD_FLOOR))  # (D,)

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ModelConfigError(
                f"{type(self).__name__} expects (B, {self.mean.shape[0]}) embeddings, got "
                f"{tuple(x.shape)}. Use the encoder the head was trained on."
            )
        return (x - self.mean) / self.std  # (B, D)


class LinearHead(_StandardizedHead):
    """Logistic regression on standardised embeddings: (B, D) -> (B,) logits."""

    def __init__(self, dim: int):
        super().__init__(dim)
        self.config = HeadConfig(dim=dim, kind="linear")
        self.fc = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self._standardize(x)).squeeze(-1)  # (B,)


class MLPHead(_StandardizedHead):
    """One-hidden-layer MLP on standardised embeddings: (B, D) -> (B,) logits."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__(dim)
        self.config = HeadConfig(dim=dim, kind="mlp", hidden=hidden, dropout=dropout)
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._standardize(x)).squeeze(-1)  # (B,)


def create_head(cfg: HeadConfig) -> LinearHead | MLPHead:
    """Build an untrained head from its config (the inverse of ``head.config``)."""
    if cfg.kind == "linear":
        head = LinearHead(cfg.dim)
        head.config = cfg  # hidden/dropout are unused by a linear head but kept for round trips
        return head
    return MLPHead(cfg.dim, hidden=cfg.hidden, dropout=cfg.dropout)
