"""Deterministic baselines for honest ablations of the diffusion prior.

* ``RidgeRegression``: closed-form ridge on standardised inputs, CXR -> CTPA embedding
  (multi-output) or CXR -> teacher logit (single output).
* ``RidgePath``: every ridge penalty from one pass over the data (a centred Gram matrix and its
  eigendecomposition), so a penalty search over 10^5 pairs costs one matrix product, not one
  solve per penalty.
"""

from __future__ import annotations

import torch
from embedstore.models.heads import STD_FLOOR, ModelConfigError
from torch import nn

__all__ = ["RidgePath", "RidgeRegression"]



class RidgePath:
    """All ridge solutions of centred ``y ~ x`` from sufficient statistics gathered in one pass.

    ``x`` (N, Dx), ``y`` (N, Dy) are read ``chunk_rows`` at a time in float64 (peak extra memory:
    one chunk plus the (Dx, Dx) Gram matrix), centred by their means; with ``standardize`` the
    columns of ``x`` are also scaled by their standard deviation (floored at ``STD_FLOOR``).
    Then, with G = X'X = Q diag(lam) Q' and B = Q'X'Y, for any penalty ``alpha``:
    W = Q diag(1 / (lam + alpha)) B, and the residual sum of squares and the effective degrees
    of freedom (for generalised cross-validation) need no pass over the data. Directions with
    lam + alpha ~ 0 get weight 0 (the minimum-norm solution when alpha = 0 and N < Dx).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, standardize: bool = False,
                 chunk_rows: int = 8192):
        y2 = y[:, None] if y.ndim == 1 else y
        if x.ndim != 2 or y2.ndim != 2 or x.shape[0] != y2.shape[0] or x.shape[0] < 2:
            raise ModelConfigError(
                f"RidgePath needs x (N>=2, Dx) and y (N,) or (N, Dy) with the same N; got "
                f"{tuple(x.shape)} and {tuple(y.shape)}."
            )
        n, dx, dy = x.shape[0], x.shape[1], y2.shape[1]
        f64 = dict(dtype=torch.float64, device=x.device)
        # products in the inputs' precision (float32 for embeddings: half the time of float64),
        # of centred chunks (no cancellation), accumulated in float64
        work = torch.promote_types(x.dtype, torch.float32)
        mx, my = torch.zeros(dx, **f64), torch.zeros(dy, **f64)  # (Dx,), (Dy,)
        for lo in range(0, n, chunk_rows):
            mx += x[lo : lo + chunk_rows].sum(0, dtype=torch.float64)
            my += y2[lo : lo + chunk_rows].sum(0, dtype=torch.float64)
        mx, my = mx / n, my / n
        g, xy = torch.zeros(dx, dx, **f64), torch.zeros(dx, dy, **f64)  # (Dx, Dx), (Dx, Dy)
        yy = torch.zeros((), **f64)
        mxw, myw = mx.to(work), my.to(work)
        for lo in range(0, n, chunk_rows):
            xc = x[lo : lo + chunk_rows].to(work) - mxw  # (c, Dx) centred
            yc = y2[lo : lo + chunk_rows].to(work) - myw  # (c, Dy)
            g += (xc.T @ xc).double()
            xy += (xc.T @ yc).double()
            yy += (yc * yc).sum(dtype=torch.float64)
        var = (torch.diagonal(g) / (n - 1)).clamp_min(0)
        scale = var.sqrt().clamp_min(STD_FLOOR) if standardize else torch.ones(dx, **f64)
        g = g / torch.outer(scale, scale)
        xy = xy / scale[:, None]
        lam, q = torch.linalg.eigh(g)  # ascending; tiny negatives are rounding
        self.n, self.x_mean, self.y_mean, self.x_scale = n, mx, my, scale
        self.lam = lam.clamp_min(0)  # (Dx,)
        self.q = q  # (Dx, Dx)
        self.b = q.T @ xy  # (Dx, Dy)
        self.yy = float(yy)

    def _inv(self, alpha: float) -> torch.Tensor:
        d = self.lam + float(alpha)  # (Dx,)
        tol = 1e-12 * max(float(self.lam.max()), 1.0)
        return torch.where(d > tol, 1.0 / d.clamp_min(tol), torch.zeros_like(d))

    def weight(self, alpha: float) -> torch.Tensor:
        """W (Dx, Dy) for inputs centred (and scaled, with ``standardize``), float64."""
        return self.q @ (self._inv(alpha)[:, None] * self.b)

    def intercept(self, weight: torch.Tensor) -> torch.Tensor:
        """b (Dy,) so that x / x_scale @ W + b predicts y for uncentred x (with centred inputs,
        (x - x_mean) / x_scale @ W + y_mean, the intercept is ``y_mean``)."""
        return self.y_mean - (self.x_mean / self.x_scale) @ weight

    def rss(self, alpha: float) -> float:
        """Training residual sum of squares of W(alpha)."""
        inv = self._inv(alpha)
        bb = (self.b * self.b).sum(1)  # (Dx,)
        return float(self.yy - ((2 * inv - self.lam * inv * inv) * bb).sum())

    def df(self, alpha: float) -> float:
        """Effective degrees of freedom tr(H(alpha))."""
        return float((self.lam * self._inv(alpha)).sum())

    def gcv(self, alpha: float) -> float:
        """Generalised cross-validation score RSS / (N (1 - df/N)^2) (lower is better)."""
        return self.rss(alpha) / (self.n * max(1.0 - self.df(alpha) / self.n, 1e-6) ** 2)


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
        return self.set_from_path(self._path(x, y), self.alpha)

    def _path(self, x: torch.Tensor, y: torch.Tensor) -> RidgePath:
        y2 = y[:, None] if y.ndim == 1 else y
        if x.ndim != 2 or x.shape[1] != self.in_dim or y2.shape != (x.shape[0], self.out_dim):
            raise ModelConfigError(
                f"RidgeRegression.fit needs x (N, {self.in_dim}) and y (N,) or (N, {self.out_dim}); "
                f"got {tuple(x.shape)} and {tuple(y.shape)}."
            )
        return RidgePath(x, y2, standardize=True)

    @torch.no_grad()
    def set_from_path(self, path: RidgePath, alpha: float) -> RidgeRegression:
        """Set the weights to ``path``'s solution at ``alpha`` (a path fitted with standardize)."""
        self.alpha = float(alpha)
        w = path.weight(alpha)  # (Dx, Dy)
        self.x_mean.copy_(path.x_mean)
        self.x_std.copy_(path.x_scale)
        self.weight.copy_(w)
        self.bias.copy_(path.y_mean)
        return self

    @classmethod
    @torch.no_grad()
    def fit_path(cls, x: torch.Tensor, y: torch.Tensor, alphas: list[float] | tuple[float, ...],
                 squeeze: bool = True) -> list[RidgeRegression]:
        """One model per penalty in ``alphas``, all from one pass over (x, y)."""
        out_dim = 1 if y.ndim == 1 else int(y.shape[1])
        first = cls(int(x.shape[1]), out_dim, alpha=float(alphas[0]), squeeze=squeeze)
        path = first._path(x, y)
        return [cls(first.in_dim, out_dim, alpha=float(a), squeeze=squeeze).set_from_path(path, a)
                for a in alphas]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ModelConfigError(f"RidgeRegression expects (N, {self.in_dim}), got {tuple(x.shape)}.")
        out = ((x - self.x_mean) / self.x_std) @ self.weight + self.bias  # (N, Dy)
        return out.squeeze(-1) if self.squeeze else out
