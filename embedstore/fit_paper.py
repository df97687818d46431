"""Training loop for ``--preset paper``: the published prior recipe on in-memory tensors.

The recipe (see ``embedstore.models.paper_prior``): DALLE2-style causal transformer (width
512, 12 layers, 4 or 81 tokens), T = 64 cosine, x0 prediction, min-max x sqrt(d) targets, loss
0.8 MSE + 0.2 BCE through the frozen teacher (``published_nograd`` reproduces the published
no_grad bug), AdamW lr 1.1e-4, weight decay 6.02e-2, gradient clip 0.5, 50-step linear
warm-up, EMA 0.9999 with DALLE2's (ema_pytorch's) warm-up, DDPM sampling with 64 steps and
best-of-2.

What is ours: the same validation-only discipline as ``embedstore.fit`` (no test argument;
seeded reshuffling every epoch; model selection by the student's validation AUC). Both the raw
and the EMA weights are scored at every evaluation and the better one is kept (recorded in
``FitResult.extra["selected_weights"]`` and in the model's ``selected_ema`` buffer) because a
run of a few hundred steps ends inside the EMA's warm-up, where neither is known to be better.
Validation sampling is cheaper than the published 64-step best-of-2 (``val_samples`` x
``val_steps``, ``val_best_of``); the final scoring uses ``sample_steps`` / ``sample_best_of``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from embedstore.errors import ConfigError
from embedstore.fit import (
    EpochCallback,
    FitResult,
    _as_tensor,
    _autocast,
    _check_labels,
    _seeded,
    _snapshot,
    _teacher_copy,
    _threads,
    _TrainConfig,
    auc_score,
    resolve_device,
)
from embedstore.models.paper_prior import PaperPrior, PaperPriorConfig, paper_loss

__all__ = [
    "PaperTrainConfig",
    "SELECT_WEIGHTS",
    "StepCallback",
    "fit_paper_prior",
    "predict_paper_student",
]

SELECT_WEIGHTS = ("both", "ema", "raw")
#: Called after every optimizer step with ``step`` (0-based), ``lr`` (the rate that step used),
#: ``grad_norm`` (before clipping) and ``grad_norm_clipped`` (what the optimizer saw).
StepCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class PaperTrainConfig(_TrainConfig):
    """The ``--preset paper`` recipe; ``tokens`` 4 or 81 (the published layout)."""

    tokens: int = 4
    width: int = 512
    layers: int = 12
    heads: int = 8
    dropout: float = 0.0
    num_train_timesteps: int = 64
    normalization: str = "minmax"
    cond_drop_prob: float = 0.0
    ema_beta: float = 0.9999
    ema_update_after_step: int = 100
    ema_update_every: int = 10
    ema_power: float = 2 / 3
    best_of_space: str = "projected"
    mse_weight: float = 0.8
    teacher_weight: float = 0.2
    published_nograd: bool = False
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1.1e-4
    weight_decay: float = 6.02e-2
    grad_clip: float = 0.5
    warmup_steps: int = 50
    patience: int = 4
    eval_every: int = 5
    val_samples: int = 2
    val_steps: int = 8
    val_best_of: int = 1
    select_weights: str = "both"
    # what evaluation samples with by default (the published sampling)
    num_samples: int = 8
    sample_steps: int = 64
    sample_best_of: int = 2
    seed: int = 0
    device: str = "cpu"
    amp_bf16: bool = False
    # a 38 M-parameter transformer: unlike the small default prior it gains from both cores
    num_threads: int = 2

    def __post_init__(self) -> None:
        self._check_common()
        if not (isinstance(self.tokens, int) and self.tokens >= 4):
            raise ConfigError(
                f"tokens must be 4 (condition, time, noisy target, query) or more (null tokens "
                f"first; 81 is the published layout), got {self.tokens!r}."
            )
        for name in ("eval_every", "val_samples", "val_steps", "val_best_of", "num_samples",
                     "sample_steps", "sample_best_of"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"PaperTrainConfig.{name} must be an int >= 1, got {v!r}.")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ConfigError(f"warmup_steps must be an int >= 0 (0 disables), got {self.warmup_steps!r}.")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}.")
        if self.mse_weight < 0 or self.teacher_weight < 0:
            raise ConfigError(f"mse_weight and teacher_weight must be >= 0, got {self.mse_weight!r}, "
                              f"{self.teacher_weight!r}.")
        if self.select_weights not in SELECT_WEIGHTS:
            raise ConfigError(
                f"Unknown select_weights {self.select_weights!r}. Available: {list(SELECT_WEIGHTS)}."
            )
        for name in ("val_steps", "sample_steps"):
            if self.num_train_timesteps % getattr(self, name) != 0:
                raise ConfigError(
                    f"{name}={getattr(self, name)} must divide num_train_timesteps="
                    f"{self.num_train_timesteps}."
                )
        self.prior_config(1, 1)  # validates the architecture fields now, not at fit time

    def prior_config(self, cond_dim: int, target_dim: int) -> PaperPriorConfig:
        names = {f.name for f in dataclasses.fields(PaperPriorConfig)}
        kw = {k: v for k, v in self.to_dict().items() if k in names}
        # a 1-d probe would trip best_of_space='raw'; validate the rest of the fields with it
        if cond_dim == target_dim == 1 and kw.get("best_of_space") == "raw":
            kw["best_of_space"] = "first"
        try:
            return PaperPriorConfig(cond_dim=cond_dim, target_dim=target_dim,
                                    null_tokens=self.tokens - 4, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from e


def predict_paper_student(
    prior: PaperPrior,
    teacher: nn.Module,
    cxr: torch.Tensor,
    num_samples: int = 8,
    steps: int | None = None,
    best_of: int = 2,
    *,
    seed: int = 0,
    batch_size: int = 128,
    use_ema: bool | None = None,
    scheduler: str = "ddpm",
    guidance_scale: float = 1.0,
    amp_bf16: bool = False,
    num_threads: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student scores for raw CXR embeddings (N, Dx), as ``fit.predict_student`` returns them.

    prob_mean (N,): the teacher's PE probability averaged over K sampled CTPA embeddings (each
    the best of ``best_of`` candidates); prob_std (N,): its spread (population std) across the
    K samples; emb_mean (N, Dc): the mean sampled embedding. Deterministic for a seed on CPU.
    """
    dev = prior.cond_shift.device
    cxr = _as_tensor(cxr, "cxr", ndim=2).to(dev)
    frozen = _teacher_copy(teacher, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    was_training = prior.training
    prior.eval()
    means, stds, embs = [], [], []
    with torch.no_grad(), _threads(num_threads), _autocast(dev, amp_bf16):
        for i in range(0, cxr.shape[0], batch_size):
            c = cxr[i : i + batch_size]  # (b, Dx)
            x = prior.sample(c, num_samples, steps, gen, best_of, use_ema=use_ema,
                             scheduler=scheduler, guidance_scale=guidance_scale)  # (b, K, Dc)
            b, k, dc = x.shape
            p = torch.sigmoid(frozen(x.reshape(b * k, dc).float()).float()).view(b, k)  # (b, K)
            means.append(p.mean(1))
            stds.append(p.std(1, unbiased=False))  # 0 for K = 1, never NaN
            embs.append(x.mean(1).float())
    prior.train(was_training)
    return torch.cat(means), torch.cat(stds), torch.cat(embs)


def fit_paper_prior(
    cxr_tr: torch.Tensor,
    ctpa_tr: torch.Tensor,
    teacher: nn.Module,
    cxr_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: PaperTrainConfig = PaperTrainConfig(),
    *,
    on_epoch: EpochCallback | None = None,
    on_step: StepCallback | None = None,
) -> FitResult:
    """Train the published-recipe prior on all training pairs (label-free).

    ``teacher`` maps raw CTPA embeddings to PE logits; it is copied and frozen. Selection: the
    student's validation AUC (raw and/or EMA weights per ``cfg.select_weights``) every
    ``eval_every`` epochs; training stops after ``patience`` evaluations without improvement.
    """
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    cxr_tr = _as_tensor(cxr_tr, "cxr_tr", ndim=2)
    ctpa_tr = _as_tensor(ctpa_tr, "ctpa_tr", ndim=2)
    cxr_val = _as_tensor(cxr_val, "cxr_val", ndim=2)
    n = cxr_tr.shape[0]
    if ctpa_tr.shape[0] != n:
        raise ConfigError(f"cxr_tr has {n} rows but ctpa_tr has {ctpa_tr.shape[0]}; pass paired rows.")
    if cxr_val.shape[1] != cxr_tr.shape[1]:
        raise ConfigError(f"cxr_val has dim {cxr_val.shape[1]} but cxr_tr has dim {cxr_tr.shape[1]}.")
    y_val = _check_labels(_as_tensor(y_val, "y_val", ndim=1), "y_val", cxr_val.shape[0])
    cxr_tr, ctpa_tr, cxr_val, y_val = (t.to(dev) for t in (cxr_tr, ctpa_tr, cxr_val, y_val))
    frozen = _teacher_copy(teacher, dev)

    with _seeded(cfg.seed, dev, cfg.num_threads):
        prior = PaperPrior(cfg.prior_config(cxr_tr.shape[1], ctpa_tr.shape[1])).to(dev)
        prior.fit_normalizers(cxr_tr, ctpa_tr)  # training pairs only
        prior.ema.copy_from(prior.net)
        with torch.no_grad():
            c_all = prior.normalize_cond(cxr_tr)  # (N, Dx) normalised once, sliced per batch
            x_all = prior.normalize_target(ctpa_tr)  # (N, Dc)
        params = [p for p in prior.net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # linear warm-up: step k (0-based) runs at lr * min(1, (k + 1) / warmup_steps)
        warm = cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: min(1.0, (k + 1) / warm) if warm > 0 else 1.0
        )
        order_gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
        noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)

        def teacher_on_z(z: torch.Tensor) -> torch.Tensor:
            return frozen(prior.denormalize_target(z.float()))  # (B,) logits of raw embeddings

        def val_auc(use_ema: bool) -> float:
            prob, _, _ = predict_paper_student(
                prior, frozen, cxr_val, cfg.val_samples, cfg.val_steps, cfg.val_best_of,
                seed=cfg.seed, use_ema=use_ema, amp_bf16=cfg.amp_bf16, num_threads=0,
            )
            return auc_score(prob, y_val)

        candidates = {"both": ("ema", "raw"), "ema": ("ema",), "raw": ("raw",)}[cfg.select_weights]
        best: tuple[float, int, str, dict[str, torch.Tensor]] | None = None
        stale, step = 0, 0
        history: list[dict[str, Any]] = []
        for epoch in range(cfg.epochs):
            prior.train()
            perm = torch.randperm(n, generator=order_gen).to(dev)  # (N,) a fresh order every epoch
            sums: dict[str, float] = {}
            batches = 0
            for i in range(0, n, cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]  # (B,)
                x0 = x_all.index_select(0, idx)  # (B, Dc)
                with _autocast(dev, cfg.amp_bf16):
                    x0_hat, _ = prior.training_prediction(x0, c_all.index_select(0, idx), noise_gen)
                loss, parts = paper_loss(
                    x0_hat.float(), x0, teacher_on_z, mse_weight=cfg.mse_weight,
                    teacher_weight=cfg.teacher_weight, published_nograd=cfg.published_nograd,
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr_used = opt.param_groups[0]["lr"]
                norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                if on_step is not None:
                    seen = torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None])
                    )
                    on_step({"step": step, "lr": lr_used, "grad_norm": float(norm),
                             "grad_norm_clipped": float(seen)})
                opt.step()
                sched.step()
                prior.ema.update(prior.net)
                step += 1
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                batches += 1
            row: dict[str, Any] = {"epoch": epoch, "epochs": cfg.epochs, "steps": step}
            row.update({f"train_{k}": v / batches for k, v in sums.items()})
            row["val_auc"] = None
            if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
                prior.eval()
                improved = False
                for which in candidates:
                    auc = val_auc(which == "ema")
                    row[f"val_auc_{which}"] = auc
                    if best is None or auc > best[0] + 1e-9:
                        prior.selected_ema.fill_(int(which == "ema"))
                        best, improved = (auc, epoch, which, _snapshot(prior)), True
                row["val_auc"] = max(row[f"val_auc_{w}"] for w in candidates)
                stale = 0 if improved else stale + 1
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
            if on_epoch is not None:
                on_epoch(row)
            if stale >= cfg.patience:
                break
        if best is None:  # cannot happen: the last epoch always evaluates
            raise RuntimeError("training ended without a validation evaluation")
        prior.load_state_dict(best[3])
        prior.eval()
    extra = {"selected_weights": best[2], "steps": step, "tokens": cfg.tokens,
             "published_nograd": cfg.published_nograd}
    return FitResult(prior, history, best[1], float(best[0]), time.perf_counter() - t0, extra)
