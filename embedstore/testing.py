"""Test and benchmark support: seeded synthetic data that needs no imaging and no store.

Not used by the pipeline itself; ``tests/`` and ``benchmarks/`` import it. Kept in the package
(rather than under tests/) so benchmarks and users' own experiments can make the same data.
"""

from __future__ import annotations

import math

import torch

__all__ = ["surrogate_latents"]


def surrogate_latents(
    n: int = 1000,
    cxr_dim: int = 512,
    ctpa_dim: int = 512,
    *,
    prevalence: float = 0.3,
    latent_dim: int = 16,
    cxr_signal: float = 1.5,
    ctpa_signal: float = 3.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Seeded surrogate paired latents for tests and benchmarks (no imaging involved).

    A shared anatomy latent z (N, latent_dim) and a PE label y drive both modalities:
    ``ctpa = z Wc + ctpa_signal * y * u_c + noise`` and ``cxr = z Wx + cxr_signal * y * u_x +
    noise`` with unit vectors u, unit-variance noise and unit latent variance per dimension, so
    the label separation (d') is ``ctpa_signal / sqrt(2)`` on CTPA and the much weaker
    ``cxr_signal / sqrt(2)`` on CXR. Returns float32 tensors
    ``cxr`` (N, cxr_dim), ``ctpa`` (N, ctpa_dim), ``y`` (N,) and ``z``.
    """
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < prevalence).float()  # (N,)
    z = torch.randn(n, latent_dim, generator=g)  # (N, L)

    def modality(dim: int, signal: float) -> torch.Tensor:
        w = torch.randn(latent_dim, dim, generator=g) / math.sqrt(latent_dim)  # (L, D)
        u = torch.randn(dim, generator=g)
        u = u / u.norm()  # (D,) unit class-mean direction
        noise = torch.randn(n, dim, generator=g)  # (N, D)
        return z @ w + signal * y[:, None] * u[None] + noise  # (N, D)

    ctpa = modality(ctpa_dim, ctpa_signal)
    cxr = modality(cxr_dim, cxr_signal)
    return {"cxr": cxr, "ctpa": ctpa, "y": y, "z": z}
