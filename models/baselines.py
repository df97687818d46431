"""Deterministic baselines for honest ablations of the diffusion prior.

* ``RidgeRegression``: closed-form ridge on standardised inputs, CXR -> CTPA embedding
  (multi-output) or CXR -> teacher logit (single output).
* ``MLPRegressor``: a small MLP, CXR -> CTPA embedding, trained by ``embedstore.fit``.
"""

from __future__ import annotations

import torch
from embedstore.models.heads import STD_FLOOR, ModelConfigError
from torch import nn

__all__ = ["RidgeRegression", "MLPRegressor"]



class RidgeRegression(nn.Module):
    """y = ((x - mean) / std) @ W + b, fitted in closed form; (N, Dx) -> (N, Dy) or (N,)."""

    def __init__(self, in_dim: int, out_dim: int = 1, alpha: float = 1.0, squeeze: bool = True):
        super().__init__()
        if in_dim < 1 or out_dim < 1 or alpha < 0:
            raise ModelConfigError(
                f"RidgeRegression needs in_dim, out_dim >= 1 and alpha >= 0, got {in_dim}, "
                f"{out_dim}, {alpha}."
            )
        self.in_dim, self.out_dim, self.alpha = in_dim, out_dim, float(alpha)
        self.squeeze = bool(squeeze and out_dim == 1)
        self.register_buffer("x_mean", torch.zeros(in_dim))  # (Dx,)
        self.register_buffer("x_std", torch.ones(in_dim))  # (Dx,)
        self.register_buffer("weight", torch.zeros(in_dim, out_dim))  # (Dx, Dy)
        self.register_buffer("bias", torch.zeros(out_dim))  # (Dy,)

    @torch.no_grad()
    def fit(self, x: torch.Tensor, y: torch.Tensor) -> RidgeRegression:
        """Solve the ridge problem on (N, Dx) inputs and (N,) or (N, Dy) targets; returns self."""
        y2 = y[:, None] if y.ndim == 1 else y
        if x.ndim != 2 or x.shape[1] != self.in_dim or y2.shape != (x.shape[0], self.out_dim):
            raise ModelConfigError(
                f"RidgeRegression.fit needs x (N, {self.in_dim}) and y (N,) or (N, {self.out_dim}); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}."
            )
        xd = x.to(torch.float64)
        yd = y2.to(torch.float64)
        mean, std = xd.mean(0), xd.std(0).clamp_min(STD_FLOOR)  # (Dx,)
        xs = (xd - mean) / std  # (N, Dx)
        y_mean = yd.mean(0)  # (Dy,)
        yc = yd - y_mean  # (N, Dy)
        n, d = xs.shape
        if n >= d:  # primal: (X'X + aI) W = X'Y
            a = xs.T @ xs + self.alpha * torch.eye(d, dtype=xs.dtype)  # (Dx, Dx)
            w = torch.linalg.solve(a, xs.T @ yc)  # (Dx, Dy)
        else:  # dual: W = X' (XX' + aI)^-1 Y, cheaper when N < D
            k = xs @ xs.T + self.alpha * torch.eye(n, dtype=xs.dtype)  # (N, N)
            w = xs.T @ torch.linalg.solve(k, yc)  # (Dx, Dy)
        self.x_mean.copy_(mean)
        self.x_std.copy_(std)
        self.weight.copy_(w)
        self.bias.copy_(y_mean)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ModelConfigError(f"RidgeRegression expects (N, {self.in_dim}), got {tuple(x.shape)}.")
        out = ((x - self.x_mean) / self.x_std) @ self.weight + self.bias  # (N, Dy)
        return out.squeeze(-1) if self.squeeze else out


class MLPRegressor(nn.Module):
    """MLP regressor with stored input/target standardisation: (N, Dx) -> (N, Dy)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, depth: int = 2, dropout: float = 0.1):
        super().__init__()
        if min(in_dim, out_dim, hidden, depth) < 1 or not 0 <= dropout < 1:
            raise ModelConfigError(
                f"MLPRegressor needs positive dims/depth and dropout in [0, 1), got in_dim={in_dim}, "
                f"out_dim={out_dim}, hidden={hidden}, depth={depth}, dropout={dropout}."
            )
        self.register_buffer("x_mean", torch.zeros(in_dim))  # (Dx,)
        self.register_buffer("x_std", torch.ones(in_dim))  # (Dx,)
        self.register_buffer("y_mean", torch.zeros(out_dim))  # (Dy,)
        self.register_buffer("y_std", torch.ones(out_dim))  # (Dy,)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    @torch.no_grad()
    def set_standardizer(self, x_train: torch.Tensor, y_train: torch.Tensor) -> None:
        """Store training-split mean/std of inputs and targets (the net works in z-units)."""
        self.x_mean.copy_(x_train.float().mean(0))
        self.x_std.copy_(x_train.float().std(0).clamp_min(STD_FLOOR))
        self.y_mean.copy_(y_train.float().mean(0))
        self.y_std.copy_(y_train.float().std(0).clamp_min(STD_FLOOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net((x - self.x_mean) / self.x_std)  # (N, Dy) standardised
        return z * self.y_std + self.y_mean  # (N, Dy)
