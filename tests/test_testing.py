"""embedstore.testing: the seeded surrogate latents that tests and benchmarks share."""

from __future__ import annotations

import torch

from embedstore.testing import surrogate_latents


def _dprime(x: torch.Tensor, y: torch.Tensor) -> float:
    """Label separation along the class-mean difference, in pooled standard deviations."""
    diff = x[y == 1].mean(0) - x[y == 0].mean(0)  # (D,)
    proj = x @ (diff / diff.norm())  # (N,)
    pooled = ((proj[y == 1].var() + proj[y == 0].var()) / 2).sqrt()
    return float((proj[y == 1].mean() - proj[y == 0].mean()) / pooled)


def test_surrogate_latents_shapes_seed_and_signal():
    d = surrogate_latents(2000, 24, 32, latent_dim=4, cxr_signal=1.0, ctpa_signal=3.0, seed=5)
    assert d["cxr"].shape == (2000, 24) and d["ctpa"].shape == (2000, 32)
    assert d["y"].shape == (2000,) and d["z"].shape == (2000, 4)
    assert 0.25 < float(d["y"].mean()) < 0.35  # prevalence 0.3
    again = surrogate_latents(2000, 24, 32, latent_dim=4, cxr_signal=1.0, ctpa_signal=3.0, seed=5)
    assert all(torch.equal(d[k], again[k]) for k in d)
    other = surrogate_latents(2000, 24, 32, latent_dim=4, cxr_signal=1.0, ctpa_signal=3.0, seed=6)
    assert not torch.equal(d["cxr"], other["cxr"])
    # the documented separations: signal / sqrt(2) (unit noise + unit latent variance per dim)
    assert 1.9 < _dprime(d["ctpa"], d["y"]) < 2.5  # 3 / sqrt(2) = 2.12
    assert 0.45 < _dprime(d["cxr"], d["y"]) < 0.95  # 1 / sqrt(2) = 0.71


def test_surrogate_latents_not_in_the_library_api():
    import embedstore.fit as fit

    assert not hasattr(fit, "surrogate_latents")
