"""``volume25d`` family: a 2.5D CT encoder wrapping any 2D image encoder.

A CT volume ``(B, S, H, W)`` in Hounsfield units is cut into slices (or thick slabs) at a
stride; each slice becomes a 3-channel image of CT windows, the inner encoder embeds the
slices in bounded chunks, and the per-slice embeddings are pooled across slices.

Params::

    inner       {"family": ..., "params": {...}} of an image encoder; it is built with this
                spec's seed and weights (so no "seed"/"weights" keys of its own)
    windows     [[width, level], ...] in HU, 1 or 3 of them (default W700/L100 mediastinum +
                contrast, W1500/L-600 lung, W400/L-800 lung parenchyma / perfusion)
    stride      take every stride-th slab (default 2)
    slab        slices averaged into one thick slab (default 1: single slices)
    pool        "mean" | "max" | "meanmax" (concatenated, embed_dim doubles); default "max"
    chunk       slices per inner forward: bounds memory whatever the volume size (default 64)
    input_size  nominal [S, H, W] that preprocessing should produce (default [64, inner H, W])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from embedstore.models.encoders.registry import (
    EncoderSpec,
    FrozenEncoder,
    _thaw,
    create_encoder,
    loads_weights,
    register_family,
)
from embedstore.models.errors import EncoderError

__all__ = ["Volume25DEncoder", "DEFAULT_WINDOWS", "POOLS", "apply_windows", "slab_starts"]

#: (width, level) in HU: mediastinal/contrast window, lung window, low-density lung window.
#: The last one is where a perfusion defect (oligaemic lung distal to an embolus) shows.
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = ((700.0, 100.0), (1500.0, -600.0), (400.0, -800.0))
POOLS = ("mean", "max", "meanmax")
_PARAMS = ("inner", "windows", "stride", "slab", "pool", "chunk", "input_size")
_INNER_KEYS = ("family", "params", "name")


def apply_windows(hu: torch.Tensor, windows: Sequence[Sequence[float]] = DEFAULT_WINDOWS) -> torch.Tensor:
    """HU ``(..., H, W)`` -> ``(..., C, H, W)`` in [0, 1], one channel per (width, level):
    ``clip((hu - (level - width/2)) / width, 0, 1)``."""
    w = torch.tensor([float(a) for a, _ in windows], dtype=torch.float32, device=hu.device)
    lo = torch.tensor([float(b) - float(a) / 2 for a, b in windows], dtype=torch.float32,
                      device=hu.device)
    hu = hu.float().unsqueeze(-3)  # (..., 1, H, W)
    return ((hu - lo.view(-1, 1, 1)) / w.view(-1, 1, 1)).clamp_(0.0, 1.0)  # (..., C, H, W)


def slab_starts(n_slices: int, slab: int, stride: int) -> list[int]:
    """First slice index of every slab kept: ``range(0, n_slices - slab + 1, stride)``."""
    return list(range(0, n_slices - slab + 1, stride))


def _inner_spec(spec_name: str, params: Mapping[str, Any], seed: int, weights: str | None) -> EncoderSpec:
    inner = params["inner"]
    return EncoderSpec(name="inner", family=inner["family"], params=inner.get("params") or {},
                       weights=weights, seed=seed)


class Volume25DEncoder(FrozenEncoder):
    """CT volume ``(B, S, H, W)`` HU -> ``(B, D)``; ``forward_tokens`` -> ``(B, S', D_inner)``."""

    def __init__(self, spec: EncoderSpec, inner: FrozenEncoder):
        p = spec.params
        self.pool = str(p.get("pool", "max"))
        dim = inner.embed_dim * (2 if self.pool == "meanmax" else 1)
        size = tuple(p.get("input_size") or (64, *inner.input_size))
        super().__init__(spec, embed_dim=dim, input_kind="volume", input_size=size)
        self.inner = inner
        self.windows = tuple((float(a), float(b)) for a, b in p.get("windows", DEFAULT_WINDOWS))
        self.stride = int(p.get("stride", 2))
        self.slab = int(p.get("slab", 1))
        self.chunk = int(p.get("chunk", 64))

    def card_facts(self) -> dict[str, Any]:
        # the inner encoder's normalisation applies to the windowed [0, 1] slices
        inner = self.inner.card_facts()
        facts = {**super().card_facts(), "hu_windows": self.windows}
        facts.update({k: inner[k] for k in ("mean", "std") if k in inner})
        return facts

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EncoderError(
                f"Encoder {self.spec.name!r} takes CT volumes (B, S, H, W) in Hounsfield units; "
                f"got {shape}. Add the batch axis with x[None].",
                reason="bad_input",
            )
        if x.shape[1] < self.slab:
            raise EncoderError(
                f"Encoder {self.spec.name!r}: a volume of {x.shape[1]} slices is thinner than one "
                f"slab ({self.slab} slices). Resample to at least {self.slab} slices.",
                reason="bad_input",
            )
        return x if x.is_floating_point() else x.float()

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slab embeddings ``(B, S', D_inner)``, S' = ``len(slab_starts(S, slab, stride))``."""
        x = self._check(x)
        b = x.shape[0]
        # unfold is a view, (B, S', H, W, slab): only one chunk of slabs is ever copied
        slabs = x.unfold(1, self.slab, self.stride)  # (B, S', H, W, slab)
        n_sl = slabs.shape[1]
        out = torch.empty(b * n_sl, self.inner.embed_dim, dtype=torch.float32, device=x.device)
        for i in range(0, b * n_sl, self.chunk):
            flat = torch.arange(i, min(i + self.chunk, b * n_sl), device=x.device)
            hu = slabs[flat // n_sl, flat % n_sl].float().mean(-1)  # (n, H, W) slab mean in HU
            img = apply_windows(hu, self.windows)  # (n, C, H, W) in [0, 1]
            out[i:i + len(flat)] = self.inner(img).float()  # (n, D_inner)
        return out.view(b, n_sl, -1)  # (B, S', D_inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)  # (B, S', D_inner)
        if self.pool == "mean":
            return tokens.mean(1)  # (B, D)
        if self.pool == "max":
            return tokens.amax(1)  # (B, D)
        return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1)  # (B, 2*D_inner)


def _positive_int(params: Mapping[str, Any], key: str, default: int) -> None:
    v = params.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise EncoderError(
            f"volume25d encoder: params[{key!r}] must be an int >= 1, got {v!r}.", reason="bad_spec"
        )


def _validate(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise EncoderError(
            f"volume25d encoder: unknown params {unknown}. Valid: {', '.join(_PARAMS)}.",
            reason="bad_spec",
        )
    inner = params.get("inner")
    if not isinstance(inner, Mapping) or "family" not in inner:
        raise EncoderError(
            "volume25d encoder: params['inner'] must be {'family': ..., 'params': {...}} of an image "
            f"encoder, e.g. get_encoder_spec('test-tiny-vit') without name/seed/weights; got {_thaw(inner)!r:.80}.",
            reason="bad_spec",
        )
    bad = sorted(set(inner) - set(_INNER_KEYS))
    if bad:
        raise EncoderError(
            f"volume25d encoder: params['inner'] has keys {bad}; allowed: {', '.join(_INNER_KEYS)}. "
            "The inner encoder takes the volume spec's seed and weights.",
            reason="bad_spec",
        )
    if inner["family"] == "volume25d":
        raise EncoderError("volume25d encoder: the inner encoder must be a 2D image encoder, "
                           "not another volume25d.", reason="bad_spec")
    _inner_spec("check", params, 0, None)  # validates the inner family's params
    windows = params.get("windows", DEFAULT_WINDOWS)
    ok = isinstance(windows, Sequence) and len(windows) in (1, 3) and all(
        isinstance(wl, Sequence) and len(wl) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in wl) and wl[0] > 0
        for wl in windows
    )
    if not ok:
        raise EncoderError(
            f"volume25d encoder: windows {_thaw(windows)!r} is invalid; give 1 or 3 [width, level] pairs in "
            "HU with width > 0, e.g. [[700, 100], [1500, -600], [400, -800]].",
            reason="bad_spec",
        )
    for key, default in (("stride", 2), ("slab", 1), ("chunk", 64)):
        _positive_int(params, key, default)
    if params.get("pool", "max") not in POOLS:
        raise EncoderError(
            f"volume25d encoder: pool {params.get('pool')!r} is invalid. Valid: {', '.join(POOLS)}.",
            reason="bad_spec",
        )
    size = params.get("input_size")
    if size is not None and not (
        isinstance(size, Sequence) and len(size) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise EncoderError(
            f"volume25d encoder: input_size {_thaw(size)!r} must be [S, H, W] positive ints.", reason="bad_spec"
        )


def _build(spec: EncoderSpec) -> Volume25DEncoder:
    inner = create_encoder(_inner_spec(spec.name, spec.params, spec.seed, spec.weights))
    if inner.input_kind != "image":
        raise EncoderError(
            f"Encoder {spec.name!r}: its inner encoder ({inner.spec.family}) takes "
            f"{inner.input_kind} input; volume25d needs a 2D image encoder.",
            reason="bad_spec",
        )
    return Volume25DEncoder(spec, inner)


register_family(
    "volume25d",
    _build,
    validate=_validate,
    description="2.5D CT encoder: CT-windowed slices through a 2D encoder, pooled across slices",
    # the inner encoder takes this spec's weights; it may also bring its own (an hf-hub: arch)
    loads_weights=lambda spec: loads_weights(_inner_spec(spec.name, spec.params, spec.seed,
                                                         spec.weights)),
)
