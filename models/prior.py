"""Conditional diffusion prior: CXR embedding (Dx) -> CTPA-teacher embedding (Dc).

The denoiser is a residual MLP (default) or a small transformer over four tokens
(condition, time, noisy target, query) -- not the published 81-token causal transformer, whose
77 constant null text tokens cost ~50 s per CPU step and carry no information here.
Noise schedules and the sampler steps come from diffusers; the sampling loop is written out.
Embeddings are standardised with training-split statistics stored as buffers, so
``state_dict()`` (-> safetensors) is the whole checkpoint, together with ``config.to_json()``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from embedstore.models.baselines import RidgePath
from embedstore.models.heads import STD_FLOOR, ModelConfigError, _check, _JsonConfig
from torch import nn

__all__ = [
    "PriorConfig",
    "DiffusionPrior",
    "EMA",
    "PRIOR_ARCHS",
    "PREDICTION_TYPES",
    "BETA_SCHEDULES",
    "SCHEDULER_KINDS",
]

PRIOR_ARCHS = ("mlp", "transformer")
PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SCHEDULER_KINDS = ("ddpm", "ddim")
# min-SNR gamma for epsilon prediction: the x0 error of an eps-model is SNR^-1/2 times its eps error,
# which explodes near t = T (alpha_bar ~ 1e-9 with the cosine schedule); see loss_weight().
_MIN_SNR_GAMMA = 5.0


@dataclass(frozen=True)
class PriorConfig(_JsonConfig):
    """Architecture and diffusion settings of a DiffusionPrior (JSON round trip)."""

    cond_dim: int
    target_dim: int
    arch: Literal["mlp", "transformer"] = "mlp"
    # defaults are the trainer's (embedstore.fit.PriorTrainConfig); a test keeps them equal
    hidden: int = 256
    depth: int = 2
    heads: int = 4
    dropout: float = 0.2
    time_embed_dim: int = 128
    prediction: Literal["sample", "epsilon", "v_prediction"] = "sample"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.995
    # "ridge": diffuse the residual around a closed-form ridge mean E[x0|c] = c W + b (alpha by
    # generalised cross-validation on the training split); "none": diffuse x0 itself.
    mean_model: Literal["none", "ridge"] = "ridge"

    def __post_init__(self) -> None:
        for name in ("cond_dim", "target_dim", "hidden", "depth", "heads", "time_embed_dim"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"PriorConfig.{name} must be a positive int, got {v!r}.")
        _check(self.arch in PRIOR_ARCHS, f"Unknown prior arch {self.arch!r}. Available: {list(PRIOR_ARCHS)}.")
        _check(
            self.prediction in PREDICTION_TYPES,
            f"Unknown prediction {self.prediction!r}. Available: {list(PREDICTION_TYPES)}.",
        )
        _check(
            self.beta_schedule in BETA_SCHEDULES,
            f"Unknown beta_schedule {self.beta_schedule!r}. Available: {list(BETA_SCHEDULES)}.",
        )
        _check(self.num_train_timesteps >= 2, f"num_train_timesteps must be >= 2, got {self.num_train_timesteps!r}.")
        _check(0.0 <= self.dropout < 1.0, f"PriorConfig.dropout must be in [0, 1), got {self.dropout!r}.")
        _check(0.0 <= self.cond_drop_prob < 1.0, f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob!r}.")
        _check(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay!r}.")
        _check(self.mean_model in ("none", "ridge"),
               f"Unknown mean_model {self.mean_model!r}. Available: ['none', 'ridge'].")
        _check(
            self.time_embed_dim % 2 == 0, f"time_embed_dim must be even, got {self.time_embed_dim!r}."
        )
        if self.arch == "transformer":
            _check(
                self.hidden % self.heads == 0,
                f"Transformer hidden ({self.hidden}) must be divisible by heads ({self.heads}).",
            )


#: Ridge penalties tried for the prior's mean (standardised units).
RIDGE_ALPHAS: tuple[float, ...] = tuple(float(10 ** (k / 4)) for k in range(-8, 21))


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([args.sin(), args.cos()], dim=-1)  # (B, dim)


class _ResBlock(nn.Module):
    """Pre-norm residual MLP block, modulated (FiLM) by the time+condition embedding."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.film = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)  # (B, H) each
        y = self.norm(h) * (1 + scale) + shift  # (B, H)
        return h + self.fc2(self.drop(nn.functional.gelu(self.fc1(y))))  # (B, H)


class _Denoiser(nn.Module):
    """Shared parts: time embedding, learned null condition (classifier-free guidance)."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim))  # (Dx,) in standardised units
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_embed_dim, cfg.hidden), nn.SiLU(), nn.Linear(cfg.hidden, cfg.hidden)
        )

    def _cond(self, cond: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
        if drop is None:
            return cond
        return torch.where(drop[:, None], self.null_cond.to(cond.dtype)[None], cond)  # (B, Dx)

    def _time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(_timestep_embedding(t, self.cfg.time_embed_dim))  # (B, H)


class _MLPDenoiser(_Denoiser):
    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        h = cfg.hidden
        self.in_proj = nn.Linear(cfg.target_dim + cfg.cond_dim, h)
        self.cond_proj = nn.Linear(cfg.cond_dim, h)
        self.blocks = nn.ModuleList(_ResBlock(h, cfg.dropout) for _ in range(cfg.depth))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, cfg.target_dim)
        # zero output: the untrained model predicts the (standardised) mean, a sane start
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, t, cond, drop=None):
        cond = self._cond(cond, drop)  # (B, Dx)
        c = nn.functional.silu(self._time(t) + self.cond_proj(cond))  # (B, H)
        h = self.in_proj(torch.cat([x_t, cond], dim=-1))  # (B, H)
        for block in self.blocks:
            h = block(h, c)  # (B, H)
        return self.out(self.out_norm(h))  # (B, Dc)


class _TransformerDenoiser(_Denoiser):
    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg)
        h = cfg.hidden
        self.cond_tok = nn.Linear(cfg.cond_dim, h)
        self.x_tok = nn.Linear(cfg.target_dim, h)
        self.query = nn.Parameter(torch.randn(h) * 0.02)
        self.pos = nn.Parameter(torch.randn(4, h) * 0.02)
        layer = nn.TransformerEncoderLayer(
            h, cfg.heads, dim_feedforward=2 * h, dropout=cfg.dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )
        # nested tensors are unused with norm_first and would only emit a warning
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, cfg.target_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t, t, cond, drop=None):
        cond = self._cond(cond, drop)  # (B, Dx)
        b = x_t.shape[0]
        tokens = torch.stack(
            [self.cond_tok(cond), self._time(t), self.x_tok(x_t), self.query.expand(b, -1)], dim=1
        )  # (B, 4, H): condition, time, noisy target, query
        h = self.encoder(tokens + self.pos)  # (B, 4, H)
        return self.out(self.out_norm(h[:, -1]))  # (B, Dc)


class EMA(nn.Module):
    """Exponential moving average of a module's weights (with the usual 1+n / 10+n warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.module.eval()  # the averaged copy is only ever used for inference
        return self

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        n = int(self.num_updates) + 1
        d = min(self.decay, (1 + n) / (10 + n))
        for p_ema, p in zip(self.module.parameters(), model.parameters(), strict=True):
            p_ema.lerp_(p.detach(), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates.add_(1)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Reset the average to ``model``'s current weights."""
        self.module.load_state_dict(model.state_dict())


class DiffusionPrior(nn.Module):
    """CXR -> CTPA latent diffusion prior with stored standardisation and EMA weights.

    ``prior(x_t, t, cond)`` runs the denoiser on *standardised* tensors: x_t (B, Dc), t (B,),
    cond (B, Dx). ``training_prediction`` also works in standardised units (use
    ``standardize_*`` once on the whole training set); ``sample`` takes and returns raw
    embeddings.
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        if not isinstance(cfg, PriorConfig):
            raise ModelConfigError(f"DiffusionPrior needs a PriorConfig, got {type(cfg).__name__}.")
        self.config = cfg
        self.denoiser = _MLPDenoiser(cfg) if cfg.arch == "mlp" else _TransformerDenoiser(cfg)
        self.ema = EMA(self.denoiser, cfg.ema_decay)
        self.register_buffer("cond_mean", torch.zeros(cfg.cond_dim))  # (Dx,)
        self.register_buffer("cond_std", torch.ones(cfg.cond_dim))  # (Dx,)
        self.register_buffer("target_mean", torch.zeros(cfg.target_dim))  # (Dc,)
        self.register_buffer("target_std", torch.ones(cfg.target_dim))  # (Dc,)
        # ridge mean in standardised units (zeros when mean_model == "none")
        self.register_buffer("mean_weight", torch.zeros(cfg.cond_dim, cfg.target_dim))  # (Dx, Dc)
        self.register_buffer("mean_bias", torch.zeros(cfg.target_dim))  # (Dc,)
        self.register_buffer("mean_alpha", torch.zeros(()))  # the GCV-chosen ridge penalty
        self._train_scheduler = self.make_scheduler("ddpm")
        ab = self._train_scheduler.alphas_cumprod.clone().float()  # (T,)
        # derived from the config, so not saved: a checkpoint is weights + config.json
        self.register_buffer("alphas_cumprod", ab, persistent=False)

    # ----------------------------------------------------------------- standardisation
    @torch.no_grad()
    def set_standardizers(self, cond_train: torch.Tensor, target_train: torch.Tensor
                          ) -> RidgePath | None:
        """Fit per-dimension mean/std of condition and target on the training split, and the
        ridge mean (penalty by GCV) when ``mean_model == "ridge"``; returns that ridge path (every
        other penalty is then one ``set_mean_from_path`` away) or None."""
        for name, x, d in (
            ("cond", cond_train, self.config.cond_dim),
            ("target", target_train, self.config.target_dim),
        ):
            if x.ndim != 2 or x.shape[1] != d or x.shape[0] < 2:
                raise ModelConfigError(
                    f"set_standardizers: {name} must be (N>=2, {d}), got {tuple(x.shape)}."
                )
            x = x.to(self.cond_mean.device, torch.float32)
            getattr(self, f"{name}_mean").copy_(x.mean(0))
            getattr(self, f"{name}_std").copy_(x.std(0).clamp_min(STD_FLOOR))
        if self.config.mean_model == "ridge":
            return self._fit_ridge_mean(self.standardize_cond(cond_train.to(self.cond_mean)),
                                        self.standardize_target(target_train.to(self.cond_mean)))
        return None

    @torch.no_grad()
    def _fit_ridge_mean(self, c: torch.Tensor, y: torch.Tensor) -> RidgePath:
        """Closed-form ridge c (N, Dx) -> y (N, Dc), penalty chosen by generalised CV.

        The linear part of E[x0 | c] is what a few hundred pairs can estimate reliably; the
        denoiser then models the residual distribution (and the sample spread is the
        uncertainty) instead of re-learning a regression by SGD. ``fit_mean`` refits it with
        another penalty (the trainer picks one on validation).
        """
        path = RidgePath(c, y)  # one pass: every penalty from one Gram matrix
        alpha = min(RIDGE_ALPHAS, key=path.gcv)
        self.set_mean_from_path(path, alpha)
        return path

    @torch.no_grad()
    def fit_mean(self, cond_std: torch.Tensor, target_std: torch.Tensor, alpha: float) -> None:
        """Set the ridge mean from standardised (N, Dx) conditions and (N, Dc) targets."""
        self.set_mean_from_path(RidgePath(cond_std, target_std), alpha)

    @torch.no_grad()
    def set_mean_from_path(self, path: RidgePath, alpha: float) -> None:
        """Set the ridge mean to ``path``'s solution at ``alpha`` (a path over standardised
        conditions and targets, e.g. to try several penalties without new passes)."""
        w = path.weight(alpha)  # (Dx, Dc)
        self.mean_weight.copy_(w.float())
        self.mean_bias.copy_(path.intercept(w).float())
        self.mean_alpha.fill_(alpha)

    def prior_mean(self, cond_std: torch.Tensor) -> torch.Tensor:
        """The ridge mean (B, Dc) of standardised targets for standardised conditions (B, Dx)."""
        return cond_std @ self.mean_weight.to(cond_std.dtype) + self.mean_bias.to(cond_std.dtype)

    def _check_dim(self, x: torch.Tensor, d: int, what: str) -> None:
        if x.ndim != 2 or x.shape[1] != d:
            raise ModelConfigError(
                f"{what} must be (B, {d}), got {tuple(x.shape)}; check the encoder the prior was "
                f"trained on."
            )

    def standardize_cond(self, cond: torch.Tensor) -> torch.Tensor:
        self._check_dim(cond, self.config.cond_dim, "cond")
        return (cond - self.cond_mean) / self.cond_std  # (B, Dx)

    def standardize_target(self, x: torch.Tensor) -> torch.Tensor:
        self._check_dim(x, self.config.target_dim, "target")
        return (x - self.target_mean) / self.target_std  # (B, Dc)

    def unstandardize_target(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.target_std + self.target_mean  # (..., Dc)

    # ----------------------------------------------------------------- diffusion
    def make_scheduler(self, kind: str = "ddim") -> DDPMScheduler | DDIMScheduler:
        """A fresh diffusers scheduler for this prior.

        clip_sample=False and thresholding=False: standardised embeddings routinely exceed
        [-1, 1] and the image-space defaults would clip them. timestep_spacing='trailing' makes
        the first sampling step t = T-1 (pure noise), and DDIM's set_alpha_to_one=True makes
        the last step return the model's x0 estimate itself.
        """
        cfg = self.config
        common = dict(
            num_train_timesteps=cfg.num_train_timesteps,
            beta_schedule=cfg.beta_schedule,
            prediction_type=cfg.prediction,
            clip_sample=False,
            thresholding=False,
            timestep_spacing="trailing",
            steps_offset=0,
        )
        if kind == "ddpm":
            return DDPMScheduler(variance_type="fixed_small", **common)
        if kind == "ddim":
            return DDIMScheduler(set_alpha_to_one=True, **common)
        raise ModelConfigError(f"Unknown scheduler {kind!r}. Available: {list(SCHEDULER_KINDS)}.")

    def forward(self, x_t, t, cond, drop=None) -> torch.Tensor:
        return self.denoiser(x_t, t, cond, drop)  # (B, Dc)

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Convert the denoiser's output (per ``config.prediction``) to an x0 estimate."""
        ab = self.alphas_cumprod[t.long()].to(x_t.dtype)[:, None]  # (B, 1)
        if self.config.prediction == "sample":
            return model_output
        if self.config.prediction == "epsilon":
            return (x_t - (1 - ab).sqrt() * model_output) / ab.sqrt()  # (B, Dc)
        return ab.sqrt() * x_t - (1 - ab).sqrt() * model_output  # v-prediction, (B, Dc)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight for the x0-space loss: 1, except min-SNR weighting for epsilon."""
        if self.config.prediction != "epsilon":
            return torch.ones(t.shape[0], device=t.device)
        ab = self.alphas_cumprod[t.long()]  # (B,)
        snr = ab / (1 - ab)
        return snr.clamp(max=_MIN_SNR_GAMMA) / _MIN_SNR_GAMMA  # (B,)

    def training_prediction(
        self, x0: torch.Tensor, cond: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise standardised x0 (B, Dc) at random t, predict, return (x0_hat (B, Dc), t (B,)).

        ``cond`` (B, Dx) is standardised too; it is replaced by the learned null condition with
        probability ``cond_drop_prob`` while the module is in training mode.
        """
        b, dev = x0.shape[0], x0.device
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)  # (B, Dc)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=dev)
        mean = self.prior_mean(cond)  # (B, Dc) zero unless mean_model == "ridge"
        r_t = self._train_scheduler.add_noise(x0 - mean, noise, t)  # (B, Dc) noised residual
        drop = None
        if self.training and self.config.cond_drop_prob > 0:
            drop = torch.rand(b, generator=generator, device=dev) < self.config.cond_drop_prob  # (B,)
        out = self.denoiser(r_t, t, cond, drop)  # (B, Dc)
        return self.to_x0(out, r_t, t) + mean, t

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        num_samples: int = 8,
        steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        scheduler: str = "ddim",
        use_ema: bool = True,
    ) -> torch.Tensor:
        """Draw ``num_samples`` target embeddings per raw condition: (B, Dx) -> (B, K, Dc) raw."""
        if num_samples < 1 or steps < 1:
            raise ModelConfigError(
                f"sample needs num_samples >= 1 and steps >= 1, got {num_samples} and {steps}."
            )
        if steps > self.config.num_train_timesteps:
            raise ModelConfigError(
                f"steps={steps} exceeds num_train_timesteps={self.config.num_train_timesteps}."
            )
        net = self.ema.module if use_ema else self.denoiser
        was_training = net.training
        net.eval()
        b, k, dc = cond.shape[0], num_samples, self.config.target_dim
        dev = self.cond_mean.device
        c = self.standardize_cond(cond.to(dev, torch.float32)).repeat_interleave(k, dim=0)  # (B*K, Dx)
        null = torch.ones(b * k, dtype=torch.bool, device=dev)  # (B*K,) all-unconditional mask
        sched = self.make_scheduler(scheduler)
        sched.set_timesteps(steps, device=dev)
        x = torch.randn((b * k, dc), generator=generator, device=dev)  # (B*K, Dc), sigma_T = 1
        for t in sched.timesteps:
            t_batch = torch.full((b * k,), int(t), device=dev, dtype=torch.long)  # (B*K,)
            out = net(x, t_batch, c)  # (B*K, Dc)
            if guidance_scale != 1.0:
                out_uncond = net(x, t_batch, c, null)  # (B*K, Dc)
                out = out_uncond + guidance_scale * (out - out_uncond)
            # DDIMScheduler.step wants a Python int timestep, not a 0-d tensor
            x = sched.step(out, int(t), x, generator=generator).prev_sample  # (B*K, Dc)
        net.train(was_training)
        x = x + self.prior_mean(c)  # (B*K, Dc) the loop ran on residuals around the ridge mean
        return self.unstandardize_target(x).view(b, k, dc)  # (B, K, Dc)
