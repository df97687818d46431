"""The published prior recipe (a DALLE2-pytorch copy), as far as it can be stated on embeddings.

A causal transformer in the DALLE2 style over, in token order::

    [null_1 .. null_P] [condition] [time] [noisy target] [learned query]

with a causal mask (a token attends to itself and to earlier tokens) and the query's final state
projected to the target dimension as the x0 prediction. ``null_tokens=77`` reproduces the
published 81-token layout: DALLE2's 77 text-token slots, which the published run never fills
(no text encodings), so they always hold the learned null encodings. ``null_tokens=0`` is the
4-token variant.

Because those null tokens come first and do not depend on the input, under the causal mask their
hidden states are the same for every sample at every layer. ``forward`` therefore computes them
once per call (batch 1) and lets the four input tokens attend to their keys and values: the same
function as running all 81 tokens for every sample (``cache_prefix=False``; a test checks they
agree) at about the cost of the 4-token layout.

Diffusion: T = 64 steps, cosine schedule (diffusers' ``squaredcos_cap_v2`` is DALLE2's cosine
schedule, betas capped at 0.999), x0 prediction, DDPM sampling. Targets are min-max scaled to
[-1, 1] per dimension and multiplied by sqrt(d) (DALLE2 scales its unit-norm CLIP embeddings by
sqrt(d); the published copy min-maxed instead), or z-scored; statistics come from the training
split and are buffers, so ``state_dict()`` (-> safetensors) plus ``config.to_json()`` is the
whole checkpoint. The loss is ``paper_loss``: 0.8 MSE + 0.2 BCE through the frozen teacher.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from embedstore.models.heads import ModelConfigError, _check, _JsonConfig
from torch import nn
from torch.nn import functional as F

__all__ = [
    "PaperPriorConfig",
    "PaperPrior",
    "WarmupEMA",
    "paper_loss",
    "select_best_of",
    "NORMALIZATIONS",
    "BEST_OF_SPACES",
    "PUBLISHED_NULL_TOKENS",
]

NORMALIZATIONS = ("minmax", "zscore")
#: How best-of-n picks among candidates, by cosine between the condition and each candidate:
#: "projected" -- in the prior's own token space (condition and target input projections, both
#: of width ``width``; works for any pair of dims); "raw" -- raw embeddings, as DALLE2 does with
#: CLIP's shared text/image space (only when cond_dim == target_dim); "first" -- no selection.
BEST_OF_SPACES = ("projected", "raw", "first")
#: DALLE2's max_text_len: 77 null text tokens + condition + time + noisy target + query = 81.
PUBLISHED_NULL_TOKENS = 77
_RANGE_FLOOR = 1e-6


@dataclass(frozen=True)
class PaperPriorConfig(_JsonConfig):
    """Architecture, diffusion, normalisation and EMA of a PaperPrior (JSON round trip)."""

    cond_dim: int
    target_dim: int
    width: int = 512
    layers: int = 12
    heads: int = 8
    ff_mult: int = 4
    null_tokens: int = 0
    dropout: float = 0.0
    num_train_timesteps: int = 64
    normalization: str = "minmax"
    cond_drop_prob: float = 0.0
    # EMA as DALLE2's trainer gets it from ema_pytorch: copy for the first `update_after_step`
    # steps, then decay 1 - (1 + n)^-power capped at `ema_beta`, applied every `update_every`
    ema_beta: float = 0.9999
    ema_update_after_step: int = 100
    ema_update_every: int = 10
    ema_power: float = 2 / 3
    best_of_space: str = "projected"

    def __post_init__(self) -> None:
        for name in ("cond_dim", "target_dim", "width", "layers", "heads", "ff_mult",
                     "ema_update_every"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"PaperPriorConfig.{name} must be a positive int, got {v!r}.")
        for name in ("null_tokens", "ema_update_after_step"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"PaperPriorConfig.{name} must be an int >= 0, got {v!r}.")
        _check(self.width % self.heads == 0,
               f"PaperPriorConfig.width ({self.width}) must be divisible by heads ({self.heads}).")
        _check(self.num_train_timesteps >= 2,
               f"num_train_timesteps must be >= 2, got {self.num_train_timesteps!r}.")
        _check(self.normalization in NORMALIZATIONS,
               f"Unknown normalization {self.normalization!r}. Available: {list(NORMALIZATIONS)}.")
        _check(self.best_of_space in BEST_OF_SPACES,
               f"Unknown best_of_space {self.best_of_space!r}. Available: {list(BEST_OF_SPACES)}.")
        _check(self.best_of_space != "raw" or self.cond_dim == self.target_dim,
               f"best_of_space='raw' needs cond_dim == target_dim (got {self.cond_dim} and "
               f"{self.target_dim}); use 'projected' or 'first'.")
        _check(0.0 <= self.dropout < 1.0, f"PaperPriorConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        _check(0.0 <= self.cond_drop_prob < 1.0,
               f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob!r}.")
        _check(0.0 <= self.ema_beta < 1.0, f"ema_beta must be in [0, 1), got {self.ema_beta!r}.")
        _check(self.ema_power > 0, f"ema_power must be > 0, got {self.ema_power!r}.")

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the transformer: null tokens + condition, time, target, query."""
        return self.null_tokens + 4


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)  # (B, 2*(dim/2))
    return F.pad(emb, (0, dim - emb.shape[1]))  # (B, dim)


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()  # (n, n) True = may attend


class _Block(nn.Module):
    """Pre-norm transformer block (multi-head self-attention + GELU MLP), as in diffusers'
    BasicTransformerBlock; ``prefix_kv`` lets a suffix attend to a cached prefix."""

    def __init__(self, width: int, heads: int, ff_mult: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, ff_mult * width), nn.GELU(), nn.Linear(ff_mult * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        h: torch.Tensor,
        mask: torch.Tensor,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        b, s, w = h.shape
        q, k, v = (
            x.view(b, s, self.heads, w // self.heads).transpose(1, 2)
            for x in self.qkv(self.norm1(h)).chunk(3, dim=-1)
        )  # (B, nh, S, dh) each
        kv = (k, v)  # this block's keys/values, for a suffix to attend to
        if prefix_kv is not None:
            pk, pv = prefix_kv  # (1, nh, P, dh): computed once, shared by every sample
            k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)  # (B, nh, P+S, dh)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        p = self.drop.p if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, S, dh)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(b, s, w)))  # (B, S, W)
        h = h + self.drop(self.ff(self.norm2(h)))  # (B, S, W)
        return h, kv


class _CausalPriorNet(nn.Module):
    """The denoiser: normalised (x_t (B, Dc), t (B,), cond (B, Dx)) -> x0 estimate (B, Dc)."""

    def __init__(self, cfg: PaperPriorConfig):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.cond_in = nn.Linear(cfg.cond_dim, w)
        self.target_in = nn.Linear(cfg.target_dim, w)
        self.time_in = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.query = nn.Parameter(torch.randn(w))  # DALLE2's learned query
        # DALLE2's null text encodings: learned, never replaced by input (randn init as there)
        self.null = nn.Parameter(torch.randn(cfg.null_tokens, w))  # (P, W); (0, W) for 4 tokens
        self.null_cond = nn.Parameter(torch.randn(w))  # condition token under condition dropout
        self.pos = nn.Parameter(torch.randn(cfg.num_tokens, w) * 0.02)  # (S, W)
        self.blocks = nn.ModuleList(
            _Block(w, cfg.heads, cfg.ff_mult, cfg.dropout) for _ in range(cfg.layers)
        )
        self.norm_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, cfg.target_dim)

    def input_tokens(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The four input-dependent tokens with their positions: (B, 4, W)."""
        c = self.cond_in(cond)  # (B, W)
        if drop is not None:
            c = torch.where(drop[:, None], self.null_cond.to(c.dtype)[None], c)
        tt = self.time_in(_timestep_embedding(t, self.cfg.width).to(c.dtype))  # (B, W)
        q = self.query.to(c.dtype).expand(x_t.shape[0], -1)  # (B, W)
        toks = torch.stack([c, tt, self.target_in(x_t), q], dim=1)  # (B, 4, W)
        return toks + self.pos[self.cfg.null_tokens:].to(toks.dtype)

    def prefix_tokens(self) -> torch.Tensor:
        """The null tokens with their positions: (1, P, W), the same for every sample."""
        return (self.null + self.pos[: self.cfg.null_tokens])[None]

    def sequence(self, x_t, t, cond, drop=None) -> torch.Tensor:
        """The whole transformer input, (B, num_tokens, W): null tokens then the four inputs."""
        main = self.input_tokens(x_t, t, cond, drop)  # (B, 4, W)
        pre = self.prefix_tokens().to(main.dtype).expand(main.shape[0], -1, -1)  # (B, P, W)
        return torch.cat([pre, main], dim=1)  # (B, S, W)

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """Run the causal transformer on a whole sequence: (B, S, W) -> final states (B, S, W)."""
        mask = _causal_mask(seq.shape[1], seq.device)
        h = seq
        for block in self.blocks:
            h, _ = block(h, mask)
        return h

    def forward(self, x_t, t, cond, drop=None, *, cache_prefix: bool = True) -> torch.Tensor:
        p = self.cfg.null_tokens
        if p == 0 or not cache_prefix:
            h = self.encode(self.sequence(x_t, t, cond, drop))[:, -1]  # (B, W) the query's state
        else:
            main = self.input_tokens(x_t, t, cond, drop)  # (B, 4, W)
            pre = self.prefix_tokens().to(main.dtype)  # (1, P, W)
            pre_mask = _causal_mask(p, main.device)  # (P, P)
            # (4, P+4): every input token sees all null tokens, and the inputs causally
            main_mask = torch.cat(
                [torch.ones(4, p, dtype=torch.bool, device=main.device), _causal_mask(4, main.device)], dim=1
            )
            for block in self.blocks:
                new_pre, kv = block(pre, pre_mask)  # the prefix never sees the inputs (causal)
                main, _ = block(main, main_mask, prefix_kv=kv)
                pre = new_pre
            h = main[:, -1]  # (B, W)
        return self.out(self.norm_out(h))  # (B, Dc)


class WarmupEMA(nn.Module):
    """EMA of a module's weights with ema_pytorch's schedule (what DALLE2's trainer uses).

    Step s (0-based) updates only when s % every == 0; up to ``after`` it copies the weights;
    later it moves with decay ``min(beta, 1 - (1 + n)^-power)``, n = s - after (ema_pytorch
    counts the step before computing the decay). With beta = 0.9999 and a few hundred steps the
    warm-up, not beta, sets the decay (0.98 after 500 steps).
    """

    def __init__(self, model: nn.Module, beta: float, after: int, every: int, power: float):
        super().__init__()
        self.beta, self.after, self.every, self.power = float(beta), int(after), int(every), float(power)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> WarmupEMA:
        super().train(mode)
        self.module.eval()  # the averaged copy is only ever used for inference
        return self

    def decay_at(self, step: int) -> float:
        """The decay used by the update at 0-based ``step`` (0.0 means copy)."""
        n = step + 1 - self.after - 1
        if n <= 0:
            return 0.0
        return min(self.beta, 1.0 - (1.0 + n) ** -self.power)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        s = int(self.step)
        self.step.add_(1)
        if s % self.every != 0:
            return
        d = 0.0 if s <= self.after else self.decay_at(s)
        for p_ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to ``model``'s current weights."""
        self.module.load_state_dict(model.state_dict())


def select_best_of(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Pick, per row, the candidate with the highest score: (N, n), (N, n, D) -> (N, D)."""
    idx = scores.argmax(dim=1)  # (N,)
    return candidates[torch.arange(candidates.shape[0], device=candidates.device), idx]


class PaperPrior(nn.Module):
    """The published-recipe prior with stored normalisation and EMA weights.

    ``prior(x_t, t, cond)`` works on *normalised* tensors (``normalize_cond`` /
    ``normalize_target`` once on the training set); ``sample`` takes and returns raw embeddings.
    """

    def __init__(self, cfg: PaperPriorConfig):
        super().__init__()
        if not isinstance(cfg, PaperPriorConfig):
            raise ModelConfigError(f"PaperPrior needs a PaperPriorConfig, got {type(cfg).__name__}.")
        self.config = cfg
        self.net = _CausalPriorNet(cfg)
        self.ema = WarmupEMA(self.net, cfg.ema_beta, cfg.ema_update_after_step, cfg.ema_update_every,
                             cfg.ema_power)
        # normalised = (raw - shift) / scale * gain; gain is sqrt(Dc) for min-max targets
        self.register_buffer("cond_shift", torch.zeros(cfg.cond_dim))  # (Dx,)
        self.register_buffer("cond_scale", torch.ones(cfg.cond_dim))  # (Dx,)
        self.register_buffer("target_shift", torch.zeros(cfg.target_dim))  # (Dc,)
        self.register_buffer("target_scale", torch.ones(cfg.target_dim))  # (Dc,)
        # which weights model selection kept: 1 = EMA, 0 = raw; sample(use_ema=None) follows it
        self.register_buffer("selected_ema", torch.ones((), dtype=torch.long))
        self._train_scheduler = self.make_scheduler("ddpm")

    # ----------------------------------------------------------------- normalisation
    @property
    def target_gain(self) -> float:
        """sqrt(Dc) for min-max targets (DALLE2's image_embed_scale), 1 for z-scores."""
        return math.sqrt(self.config.target_dim) if self.config.normalization == "minmax" else 1.0

    @torch.no_grad()
    def fit_normalizers(self, cond_train: torch.Tensor, target_train: torch.Tensor) -> None:
        """Fit the condition and target normalisation on the *training* pairs only."""
        for name, x, d in (("cond", cond_train, self.config.cond_dim),
                           ("target", target_train, self.config.target_dim)):
            if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 2:
                raise ModelConfigError(f"fit_normalizers: {name} must be (N>=2, {d}), got {tuple(x.shape)}.")
            x = x.to(self.cond_shift.device, torch.float32)
            if self.config.normalization == "minmax":
                lo, hi = x.min(0).values, x.max(0).values  # (D,)
                shift, scale = (hi + lo) / 2, ((hi - lo) / 2).clamp_min(_RANGE_FLOOR)  # -> [-1, 1]
            else:
                shift, scale = x.mean(0), x.std(0).clamp_min(_RANGE_FLOOR)
            getattr(self, f"{name}_shift").copy_(shift)
            getattr(self, f"{name}_scale").copy_(scale)

    def _check_dim(self, x: torch.Tensor, d: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != d:
            raise ModelConfigError(
                f"{what} must be (B, {d}), got {tuple(x.shape)}; check the encoder the prior was trained on."
            )

    def normalize_cond(self, cond: torch.Tensor) -> torch.Tensor:
        self._check_dim(cond, self.config.cond_dim, "cond")
        return (cond - self.cond_shift) / self.cond_scale  # (B, Dx)

    def normalize_target(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dim(x, self.config.target_dim, "target")
        return (x - self.target_shift) / self.target_scale * self.target_gain  # (B, Dc)

    def denormalize_target(self, z: torch.Tensor) -> torch.Tensor:
        return z / self.target_gain * self.target_scale + self.target_shift  # (..., Dc)

    # ----------------------------------------------------------------- diffusion
    def make_scheduler(self, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
        """A diffusers scheduler: T steps, cosine, x0 prediction, no clipping (targets reach
        +-sqrt(d), far outside the image-space [-1, 1] that clip_sample assumes)."""
        common = dict(
            num_train_timesteps=self.config.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
            prediction_type="sample", clip_sample=False, thresholding=False,
            timestep_spacing="trailing", steps_offset=0,
        )
        if kind == "ddpm":
            # fixed_small = the posterior variance DALLE2 samples with
            return DDPMScheduler(variance_type="fixed_small", **common)
        if kind == "ddim":
            return DDIMScheduler(set_alpha_to_one=True, **common)
        raise ModelConfigError(f"Unknown scheduler {kind!r}. Available: ['ddpm', 'ddim'].")

    def forward(self, x_t, t, cond, drop=None, *, cache_prefix: bool = True) -> torch.Tensor:
        return self.net(x_t, t, cond, drop, cache_prefix=cache_prefix)  # (B, Dc)

    def training_prediction(
        self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise normalised x0 (B, Dc) at uniform t, predict x0: returns (x0_hat (B, Dc), t (B,))."""
        b, dev = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)  # (B, Dc)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=dev)
        x_t = self._train_scheduler.add_noise(x0, noise, t)  # (B, Dc)
        drop = None
        if self.training and self.config.cond_drop_prob > 0:
            drop = torch.rand(b, generator=generator, device=dev) < self.config.cond_drop_prob  # (B,)
        return self.net(x_t, t, cond, drop), t

    def best_of_scores(self, cond_n: torch.Tensor, cand_n: torch.Tensor, net: nn.Module | None = None) -> torch.Tensor:
        """Cosine of each candidate to its condition, (N, Dx), (N, n, Dc) normalised -> (N, n).

        "projected": both through the prior's input projections (``cond_in``, ``target_in``),
        i.e. in the token space where the transformer compares them; "raw": raw embeddings
        (needs cond_dim == target_dim); "first": zeros, so the first candidate wins.
        """
        space = self.config.best_of_space
        n = cand_n.shape[1]
        if space == "first":
            return torch.zeros(cand_n.shape[:2], device=cand_n.device)
        if space == "raw":
            c = cond_n * self.cond_scale + self.cond_shift  # (N, Dx) raw
            x = self.denormalize_target(cand_n)  # (N, n, Dc) raw
        else:
            net = self.net if net is None else net
            c = net.cond_in(cond_n)  # (N, W)
            x = net.target_in(cand_n)  # (N, n, W)
        return F.cosine_similarity(c.float()[:, None].expand(-1, n, -1), x.float(), dim=-1)  # (N, n)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        num_samples: int = 1,
        steps: int | None = None,
        generator: torch.Generator | None = None,
        best_of: int = 2,
        *,
        use_ema: bool | None = None,
        scheduler: str = "ddpm",
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Draw ``num_samples`` target embeddings per raw condition: (B, Dx) -> (B, K, Dc) raw.

        Each sample is the best of ``best_of`` candidates by cosine to the condition (see
        ``best_of_scores``). ``steps`` defaults to T (64: the published DDPM sampling) and must
        divide T. ``use_ema=None`` uses the weights model selection kept.
        """
        cfg = self.config
        steps = cfg.num_train_timesteps if steps is None else steps
        if num_samples < 1 or best_of < 1 or steps < 1:
            raise ModelConfigError(
                f"sample needs num_samples, best_of and steps >= 1, got {num_samples}, {best_of}, {steps}."
            )
        if cfg.num_train_timesteps % steps != 0:
            divisors = [d for d in range(1, cfg.num_train_timesteps + 1) if cfg.num_train_timesteps % d == 0]
            raise ModelConfigError(
                f"steps={steps} does not divide num_train_timesteps={cfg.num_train_timesteps}; "
                f"use one of {divisors}."
            )
        if guidance_scale != 1.0 and cfg.cond_drop_prob == 0:
            raise ModelConfigError(
                f"guidance_scale={guidance_scale} needs a prior trained with cond_drop_prob > 0 "
                f"(this one has 0); use guidance_scale=1."
            )
        if use_ema is None:
            use_ema = bool(self.selected_ema)
        net = self.ema.module if use_ema else self.net
        was_training = net.training
        net.eval()
        b, k, n, dc = cond.shape[0], num_samples, best_of, cfg.target_dim
        dev = self.cond_shift.device
        c = self.normalize_cond(cond.to(dev, torch.float32))  # (B, Dx)
        c_rep = c.repeat_interleave(k * n, dim=0)  # (B*K*n, Dx)
        null = torch.ones(b * k * n, dtype=torch.bool, device=dev)
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps, device=dev)
        x = torch.randn((b * k * n, dc), generator=generator, device=dev)  # (B*K*n, Dc) x_T
        for t in sched.timesteps:
            t_batch = torch.full((b * k * n,), int(t), device=dev, dtype=torch.long)
            out = net(x, t_batch, c_rep).float()  # (B*K*n, Dc) x0 estimate
            if guidance_scale != 1.0:
                out_u = net(x, t_batch, c_rep, null).float()
                out = out_u + guidance_scale * (out - out_u)
            x = sched.step(out, int(t), x, generator=generator).prev_sample  # (B*K*n, Dc)
        net.train(was_training)
        cand = x.view(b * k, n, dc)  # (B*K, n, Dc)
        if n > 1:
            scores = self.best_of_scores(c.repeat_interleave(k, dim=0), cand, net)  # (B*K, n)
            picked = select_best_of(scores, cand)  # (B*K, Dc)
        else:
            picked = cand[:, 0]
        return self.denormalize_target(picked).view(b, k, dc)  # (B, K, Dc) raw


def paper_loss(
    x0_hat: torch.Tensor,
    x0: torch.Tensor,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    *,
    mse_weight: float = 0.8,
    teacher_weight: float = 0.2,
    published_nograd: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The published loss: ``mse_weight * MSE + teacher_weight * BCE(σ(teacher(x̂0)), σ(teacher(x0)))``.

    x0_hat, x0: (B, Dc) normalised; teacher maps them to (B,) logits (the caller denormalises
    and freezes it). The graph flows through the frozen teacher into the prior unless
    ``published_nograd``, which evaluates teacher(x̂0) under ``torch.no_grad()`` as the
    published code did, so the teacher term is logged but never trains the prior.
    """
    if x0_hat.shape != x0.shape or x0.ndim != 2:
        raise ModelConfigError(
            f"paper_loss needs x0_hat and x0 of the same (B, D) shape, got {tuple(x0_hat.shape)} "
            f"and {tuple(x0.shape)}."
        )
    if mse_weight < 0 or teacher_weight < 0:
        raise ModelConfigError(
            f"loss weights must be >= 0, got mse_weight={mse_weight!r}, teacher_weight={teacher_weight!r}."
        )
    mse = F.mse_loss(x0_hat.float(), x0.float())  # mean over (B, Dc), as DALLE2's l2 loss
    loss = mse_weight * mse
    parts = {"mse": float(mse.detach())}
    if teacher_weight > 0:
        with torch.no_grad():
            soft = torch.sigmoid(teacher(x0).float())  # (B,) target side
        if published_nograd:
            with torch.no_grad():
                logit_hat = teacher(x0_hat).float()  # (B,) no graph: the published bug
        else:
            logit_hat = teacher(x0_hat).float()  # (B,) graph flows through the frozen teacher
        bce = F.binary_cross_entropy_with_logits(logit_hat, soft)
        loss = loss + teacher_weight * bce
        parts["teacher_bce"] = float(bce.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
