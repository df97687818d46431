"""Deterministic baselines for honest ablations of the diffusion prior.

* ``RidgeRegression``: closed-form ridge on standardised inputs, CXR -> CTPA embedding
  (multi-output) or CXR -> teacher logit (single output).
"""

from __future__ import annotations

import torch
from embedstore.models.heads import STD_FLOOR, ModelConfigError
from torch import nn

__all__ = ["RidgeRegression"]



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
