"""Training loops on in-memory tensors: classifier heads, the diffusion prior, baselines.

No store or file knowledge: callers pass the training and validation tensors. There is no
test argument anywhere in this module -- early stopping and model selection use validation
only, and the test split is scored later by evaluation code. Each loop keeps the whole
training set as one tensor on the device, reshuffles it every epoch with a seeded
``torch.Generator`` and takes batches by slicing (no Dataset/DataLoader). On CPU a seed gives
bit-identical results.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from embedstore.errors import ConfigError
from embedstore.models.baselines import RidgePath, RidgeRegression
from embedstore.models.heads import HEAD_KINDS, HeadConfig, _JsonConfig, create_head
from embedstore.models.losses import freeze, prior_loss
from embedstore.models.prior import DiffusionPrior, PriorConfig

__all__ = [
    "ClassifierTrainConfig",
    "PriorTrainConfig",
    "RidgeTrainConfig",
    "FitResult",
    "EpochCallback",
    "fit_classifier",
    "fit_prior",
    "predict_student",
    "predict_prior_mean",
    "fit_softlabel_kd",
    "fit_ridge_logit",
    "predict_ridge_logit",
    "fit_ridge_embed",
    "predict_embed_student",
    "auc_score",
    "resolve_device",
]

#: Called after every epoch with that epoch's history row (``epoch``, ``epochs``, losses,
#: ``val_auc`` or None, ``seconds``); the CLI drives a progress bar from it.
EpochCallback = Callable[[dict[str, Any]], None]


class _TrainConfig(_JsonConfig):
    """JSON round trip shared with the model configs; bad options raise ConfigError."""

    _error = ConfigError

    def replace(self, **changes: Any):
        """A copy with some options changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    def _check_common(self) -> None:
        c: Any = self
        for name in ("epochs", "batch_size", "patience"):
            v = getattr(c, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"{type(self).__name__}.{name} must be an int >= 1, got {v!r}.")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ConfigError(f"{type(self).__name__}.lr must be > 0, got {c.lr!r}.")
        if c.weight_decay < 0:
            raise ConfigError(f"{type(self).__name__}.weight_decay must be >= 0, got {c.weight_decay!r}.")
        if not (isinstance(c.num_threads, int) and c.num_threads >= 0):
            raise ConfigError(f"num_threads must be an int >= 0 (0 keeps torch's), got {c.num_threads!r}.")
        if not (c.device == "cpu" or c.device == "auto" or str(c.device).startswith("cuda")):
            raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {c.device!r}.")


@dataclass(frozen=True)
class ClassifierTrainConfig(_TrainConfig):
    """Head architecture and optimisation of a classifier (teacher or CXR-only baseline)."""

    kind: str = "linear"
    hidden: int = 256
    dropout: float = 0.1
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-2
    patience: int = 30
    seed: int = 0
    device: str = "cpu"
    amp_bf16: bool = False
    # the heads and the prior are small: one thread beats OpenMP spinning on shared cores
    num_threads: int = 1

    def __post_init__(self) -> None:
        self._check_common()
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"Unknown head kind {self.kind!r}. Available: {list(HEAD_KINDS)}.")

    def head_config(self, dim: int) -> HeadConfig:
        return HeadConfig(dim=dim, kind=self.kind, hidden=self.hidden, dropout=self.dropout)  # type: ignore[arg-type]


@dataclass(frozen=True)
class PriorTrainConfig(_TrainConfig):
    """Prior architecture (see PriorConfig), loss weights and optimisation; validation
    sampling uses ``val_samples`` samples per CXR and ``val_steps`` DDIM steps."""

    arch: str = "mlp"
    hidden: int = 256
    depth: int = 2
    heads: int = 4
    dropout: float = 0.2
    time_embed_dim: int = 128
    prediction: str = "sample"
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    cond_drop_prob: float = 0.1
    ema_decay: float = 0.995
    mean_model: str = "ridge"
    lam: float = 0.1
    mu: float = 0.0
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    patience: int = 6
    eval_every: int = 5
    val_samples: int = 8
    val_steps: int = 10
    guidance_scale: float = 1.0
    seed: int = 0
    device: str = "cpu"
    amp_bf16: bool = False
    # the heads and the prior are small: one thread beats OpenMP spinning on shared cores
    num_threads: int = 1

    def __post_init__(self) -> None:
        self._check_common()
        if self.lam < 0 or self.mu < 0:
            raise ConfigError(f"lam and mu must be >= 0, got lam={self.lam!r}, mu={self.mu!r}.")
        for name in ("eval_every", "val_samples", "val_steps"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ConfigError(f"PriorTrainConfig.{name} must be an int >= 1, got {v!r}.")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip!r}.")
        self.prior_config(1, 1)  # validates the architecture fields now, not at fit time

    def prior_config(self, cond_dim: int, target_dim: int) -> PriorConfig:
        names = {f.name for f in dataclasses.fields(PriorConfig)}
        kw = {k: v for k, v in self.to_dict().items() if k in names}
        try:
            return PriorConfig(cond_dim=cond_dim, target_dim=target_dim, **kw)
        except ValueError as e:
            raise ConfigError(str(e)) from e


@dataclass(frozen=True)
class RidgeTrainConfig(_TrainConfig):
    """Ridge penalties to try; the one with the best validation AUC is kept."""

    alphas: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)

    def __post_init__(self) -> None:
        if not self.alphas or any(a < 0 for a in self.alphas):
            raise ConfigError(f"alphas must be a non-empty list of values >= 0, got {self.alphas!r}.")


@dataclass
class FitResult:
    """A trained model (best validation state loaded), its history and the selection."""

    model: nn.Module
    history: list[dict[str, Any]]
    best_epoch: int
    val_auc: float
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- helpers
def auc_score(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """ROC AUC (Mann-Whitney with average ranks for ties); NaN when a class is absent."""
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, np.float64)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).astype(bool)
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank per distinct score
    ranks = avg_rank[inv]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda[:N]' or 'auto' (CUDA when available) -> torch.device; refuses absent CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was requested but CUDA is not available; use device='cpu'.")
    return dev


def _as_tensor(x: Any, name: str, *, ndim: int, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)
    if t.ndim != ndim:
        raise ConfigError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}.")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{name} contains NaN or infinite values; clean the embeddings first.")
    return t


def _check_labels(y: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if y.shape != (n,):
        raise ConfigError(f"{name} must have shape ({n},), got {tuple(y.shape)}.")
    bad = ~((y == 0) | (y == 1))
    if bool(bad.any()):
        raise ConfigError(f"{name} must be 0/1 labels, found value {float(y[bad][0])!r}.")
    if n and len(torch.unique(y)) < 2:
        raise ConfigError(
            f"{name} holds a single class ({int(y[0])}); AUC is undefined. Use a split with both "
            f"PE-positive and PE-negative studies."
        )
    return y


@contextmanager
def _threads(num_threads: int) -> Iterator[None]:
    """Set torch's CPU threads for a block (0 keeps the current setting)."""
    old = torch.get_num_threads()
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextmanager
def _seeded(seed: int, device: torch.device, num_threads: int = 0) -> Iterator[None]:
    """Seed the global RNGs (init, dropout) and set CPU threads, restoring both afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with _threads(num_threads), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- classifier
def fit_classifier(
    x_tr: torch.Tensor,
    y_tr: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train a head on (N, D) embeddings and 0/1 labels; keep the best-validation-AUC epoch."""
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    x_tr = _as_tensor(x_tr, "x_tr", ndim=2)
    x_val = _as_tensor(x_val, "x_val", ndim=2)
    y_tr = _check_labels(_as_tensor(y_tr, "y_tr", ndim=1), "y_tr", x_tr.shape[0])
    y_val = _check_labels(_as_tensor(y_val, "y_val", ndim=1), "y_val", x_val.shape[0])
    if x_val.shape[1] != x_tr.shape[1]:
        raise ConfigError(f"x_val has dim {x_val.shape[1]} but x_tr has dim {x_tr.shape[1]}.")
    x_tr, y_tr, x_val, y_val = (t.to(dev) for t in (x_tr, y_tr, x_val, y_val))
    with _seeded(cfg.seed, dev, cfg.num_threads):
        model = create_head(cfg.head_config(x_tr.shape[1])).to(dev)
        model.set_standardizer(x_tr)
        # class balance: PE prevalence is low and labels are few, so weight positives
        pos = float(y_tr.sum())
        pos_weight = torch.tensor((y_tr.numel() - pos) / max(pos, 1.0), device=dev)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss = loss_fn(model(x_tr.index_select(0, idx)).float(), y_tr.index_select(0, idx))
            return loss, {"loss": float(loss.detach())}

        def evaluate() -> float:
            return auc_score(model(x_val).float(), y_val)

        hist, best_epoch, best_auc = _train_loop(
            model, list(model.parameters()), step, evaluate, x_tr.shape[0], cfg, dev, on_epoch,
            eval_every=1,
        )
    return FitResult(model.eval(), hist, best_epoch, best_auc, time.perf_counter() - t0)


def _train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    step: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]],
    evaluate: Callable[[], float],
    n: int,
    cfg: Any,
    dev: torch.device,
    on_epoch: EpochCallback | None,
    *,
    eval_every: int,
    after_step: Callable[[], None] | None = None,
    grad_clip: float = 0.0,
) -> tuple[list[dict[str, Any]], int, float]:
    """Shared epoch loop: seeded reshuffle, slice batches, AdamW, validation-only selection.

    Early stopping counts evaluations without improvement (``cfg.patience``); the model ends
    with the best evaluation's state loaded.
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    best_auc, best_epoch, best_state, stale = -math.inf, -1, None, 0
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(dev)  # (N,) a fresh order every epoch
        sums: dict[str, float] = {}
        batches = 0
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]  # (B,)
            with _autocast(dev, cfg.amp_bf16):
                loss, parts = step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if after_step is not None:
                after_step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
        row: dict[str, Any] = {"epoch": epoch, "epochs": cfg.epochs}
        row.update({f"train_{k}": v / batches for k, v in sums.items()})
        row["val_auc"] = None
        last = epoch == cfg.epochs - 1
        if (epoch + 1) % eval_every == 0 or last:
            model.eval()
            with torch.no_grad(), _autocast(dev, cfg.amp_bf16):
                auc = evaluate()
            row["val_auc"] = auc
            if auc > best_auc + 1e-9 or best_state is None:
                best_auc, best_epoch, best_state, stale = auc, epoch, _snapshot(model), 0
            else:
                stale += 1
        row["seconds"] = time.perf_counter() - t0
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        if stale >= cfg.patience:
            break
    if best_state is None:  # cannot happen: the last epoch always evaluates
        raise RuntimeError("training ended without a validation evaluation")
    model.load_state_dict(best_state)
    model.eval()
    return history, best_epoch, float(best_auc)


# ---------------------------------------------------------------------------- prior
def _teacher_copy(teacher: nn.Module, dev: torch.device) -> nn.Module:
    # a private frozen copy: the caller's teacher keeps its requires_grad flags and mode
    return freeze(copy.deepcopy(teacher).to(dev))


def predict_student(
    prior: DiffusionPrior,
    teacher: nn.Module,
    cxr: torch.Tensor,
    num_samples: int = 8,
    steps: int = 10,
    guidance_scale: float = 1.0,
    *,
    seed: int = 0,
    scheduler: str = "ddim",
    batch_size: int = 512,
    use_ema: bool = True,
    num_threads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Student scores for raw CXR embeddings (N, Dx).

    Returns prob_mean (N,) -- the teacher's PE probability averaged over K sampled CTPA
    embeddings --, prob_std (N,) -- its spread across samples, an uncertainty estimate -- and
    emb_mean (N, Dc), the mean sampled embedding. Deterministic for a seed.
    """
    dev = prior.cond_mean.device
    cxr = _as_tensor(cxr, "cxr", ndim=2).to(dev)
    teacher = _teacher_copy(teacher, dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    was_training = prior.training
    prior.eval()
    means, stds, embs = [], [], []
    with torch.no_grad(), _threads(num_threads):
        for i in range(0, cxr.shape[0], batch_size):
            c = cxr[i : i + batch_size]  # (b, Dx)
            x = prior.sample(
                c, num_samples=num_samples, steps=steps, guidance_scale=guidance_scale,
                generator=gen, scheduler=scheduler, use_ema=use_ema,
            )  # (b, K, Dc)
            b, k, dc = x.shape
            p = torch.sigmoid(teacher(x.reshape(b * k, dc).float())).view(b, k)  # (b, K)
            means.append(p.mean(1))
            stds.append(p.std(1, unbiased=False))  # population std: 0 for K = 1, never NaN
            embs.append(x.mean(1))
    prior.train(was_training)
    return torch.cat(means), torch.cat(stds), torch.cat(embs)


@torch.no_grad()
def predict_prior_mean(prior: DiffusionPrior, teacher: nn.Module, cxr: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``ridge_mean_only`` arm: (prob (N,), emb (N, Dc)) of the teacher on the prior's own
    mean prediction for raw CXR embeddings (N, Dx) -- no diffusion, no noise.

    With ``mean_model="none"`` the mean is the training-set mean CTPA embedding for every case,
    so the arm is only meaningful for a ridge-mean prior."""
    dev = prior.cond_mean.device
    cxr = _as_tensor(cxr, "cxr", ndim=2).to(dev)
    frozen = _teacher_copy(teacher, dev)
    emb = prior.unstandardize_target(prior.prior_mean(prior.standardize_cond(cxr)))  # (N, Dc)
    return torch.sigmoid(frozen(emb).float()), emb


@torch.no_grad()
def _select_mean_alpha(prior: DiffusionPrior, teacher: nn.Module, path: RidgePath,
                       cxr_val: torch.Tensor, y_val: torch.Tensor) -> None:
    """Pick the ridge-mean penalty by the validation AUC of teacher(mean) (validation only);
    ``path``: the ridge path over the standardised training pairs (each penalty O(Dx^2 Dc))."""
    from embedstore.models.prior import RIDGE_ALPHAS

    c_val = prior.standardize_cond(cxr_val)  # (Nv, Dx)
    best: tuple[float, float] | None = None
    for alpha in RIDGE_ALPHAS:
        prior.set_mean_from_path(path, alpha)
        auc = auc_score(teacher(prior.unstandardize_target(prior.prior_mean(c_val))).float(), y_val)
        if best is None or auc > best[0] + 1e-9:
            best = (auc, alpha)
    if best is None:  # cannot happen: cfg.alphas is validated non-empty
        raise RuntimeError("no ridge penalty was evaluated")
    prior.set_mean_from_path(path, best[1])


def fit_prior(
    cxr_tr: torch.Tensor,
    ctpa_tr: torch.Tensor,
    teacher: nn.Module,
    cxr_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: PriorTrainConfig = PriorTrainConfig(),
    *,
    labels_tr: torch.Tensor | None = None,
    label_mask_tr: torch.Tensor | None = None,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train the CXR -> CTPA diffusion prior on all training pairs (label-free by default).

    ``teacher`` maps raw CTPA embeddings to PE logits; it is copied and frozen, and the loss
    back-propagates through the copy (lambda term). ``labels_tr``/``label_mask_tr`` (N,) feed
    the optional mu term. Model selection: the student's validation AUC (EMA weights,
    ``val_samples`` x ``val_steps`` DDIM), evaluated every ``eval_every`` epochs.
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
    if cfg.mu > 0:
        if labels_tr is None or label_mask_tr is None:
            raise ConfigError("mu > 0 needs labels_tr and label_mask_tr (or set mu = 0).")
        labels_tr = _as_tensor(labels_tr, "labels_tr", ndim=1)
        label_mask_tr = torch.as_tensor(label_mask_tr).bool()
        if labels_tr.shape != (n,) or label_mask_tr.shape != (n,):
            raise ConfigError(f"labels_tr and label_mask_tr must have shape ({n},).")
        labels_tr, label_mask_tr = labels_tr.to(dev), label_mask_tr.to(dev)
    cxr_tr, ctpa_tr, cxr_val = cxr_tr.to(dev), ctpa_tr.to(dev), cxr_val.to(dev)
    frozen = _teacher_copy(teacher, dev)

    with _seeded(cfg.seed, dev, cfg.num_threads):
        prior = DiffusionPrior(cfg.prior_config(cxr_tr.shape[1], ctpa_tr.shape[1])).to(dev)
        path = prior.set_standardizers(cxr_tr, ctpa_tr)  # one pass over the pairs
        prior.ema.copy_from(prior.denoiser)
        with torch.no_grad():
            c_all = prior.standardize_cond(cxr_tr)  # (N, Dx) standardised once, sliced per batch
            x_all = prior.standardize_target(ctpa_tr)  # (N, Dc)
            if path is not None:
                _select_mean_alpha(prior, frozen, path, cxr_val, y_val)
        noise_gen = torch.Generator(device=dev).manual_seed(cfg.seed + 2)

        def teacher_on_z(z: torch.Tensor) -> torch.Tensor:
            return frozen(prior.unstandardize_target(z.float()))  # (B,) logits

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            x0 = x_all.index_select(0, idx)  # (B, Dc)
            x0_hat, t = prior.training_prediction(x0, c_all.index_select(0, idx), noise_gen)  # (B, Dc), (B,)
            return prior_loss(
                x0_hat.float(), x0, teacher_on_z, cfg.lam,
                labels=None if labels_tr is None else labels_tr[idx],
                label_mask=None if label_mask_tr is None else label_mask_tr[idx],
                mu=cfg.mu, weight=prior.loss_weight(t),
            )

        def evaluate() -> float:
            prob, _, _ = predict_student(
                prior, frozen, cxr_val, cfg.val_samples, cfg.val_steps, cfg.guidance_scale,
                seed=cfg.seed,
            )
            return auc_score(prob, y_val)

        params = [p for p in prior.denoiser.parameters() if p.requires_grad]
        hist, best_epoch, best_auc = _train_loop(
            prior, params, step, evaluate, n, cfg, dev, on_epoch,
            eval_every=cfg.eval_every, after_step=lambda: prior.ema.update(prior.denoiser),
            grad_clip=cfg.grad_clip,
        )
    return FitResult(prior, hist, best_epoch, best_auc, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- baselines
def _teacher_logits(teacher: nn.Module, ctpa: torch.Tensor) -> torch.Tensor:
    frozen = _teacher_copy(teacher, ctpa.device)
    with torch.no_grad():
        return frozen(ctpa).float()  # (N,)


def fit_ridge_logit(
    cxr_tr: torch.Tensor,
    ctpa_tr: torch.Tensor,
    teacher: nn.Module,
    cxr_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: RidgeTrainConfig = RidgeTrainConfig(),
) -> FitResult:
    """Ridge CXR -> teacher logit on all training pairs; alpha chosen on validation AUC."""
    t0 = time.perf_counter()
    cxr_tr, ctpa_tr, cxr_val = (
        _as_tensor(a, n, ndim=2) for a, n in ((cxr_tr, "cxr_tr"), (ctpa_tr, "ctpa_tr"), (cxr_val, "cxr_val"))
    )
    y_val = _check_labels(_as_tensor(y_val, "y_val", ndim=1), "y_val", cxr_val.shape[0])
    target = _teacher_logits(teacher, ctpa_tr)  # (N,)
    best: tuple[float, int, RidgeRegression] | None = None
    history = []
    for i, (alpha, model) in enumerate(zip(cfg.alphas, RidgeRegression.fit_path(cxr_tr, target, cfg.alphas),
                                           strict=True)):
        with torch.no_grad():
            auc = auc_score(model(cxr_val), y_val)
        history.append({"epoch": i, "alpha": alpha, "val_auc": auc})
        if best is None or auc > best[0] + 1e-9:
            best = (auc, i, model)
    if best is None:  # cannot happen: cfg.alphas is validated non-empty
        raise RuntimeError("no ridge penalty was evaluated")
    return FitResult(best[2].eval(), history, best[1], best[0], time.perf_counter() - t0,
                     {"alpha": cfg.alphas[best[1]]})


def fit_softlabel_kd(
    cxr_tr: torch.Tensor,
    soft_tr: torch.Tensor,
    cxr_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: ClassifierTrainConfig = ClassifierTrainConfig(),
    *,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Plain pseudo-label distillation: a CXR head fitted to soft targets (N,) in [0, 1].

    The targets are the teacher's probabilities on each training pair's CTPA embedding, so no
    training label enters; BCE on soft targets has no class weight (the targets carry the
    teacher's own balance). Selection: the best validation AUC, as for every other head."""
    t0 = time.perf_counter()
    dev = resolve_device(cfg.device)
    x_tr = _as_tensor(cxr_tr, "cxr_tr", ndim=2)
    x_val = _as_tensor(cxr_val, "cxr_val", ndim=2)
    q_tr = _as_tensor(soft_tr, "soft_tr", ndim=1)
    if q_tr.shape != (x_tr.shape[0],):
        raise ConfigError(f"soft_tr must have shape ({x_tr.shape[0]},), got {tuple(q_tr.shape)}.")
    if bool(((q_tr < 0) | (q_tr > 1)).any()):
        raise ConfigError("soft_tr must hold probabilities in [0, 1]; pass sigmoid(teacher logit).")
    y_val = _check_labels(_as_tensor(y_val, "y_val", ndim=1), "y_val", x_val.shape[0])
    if x_val.shape[1] != x_tr.shape[1]:
        raise ConfigError(f"cxr_val has dim {x_val.shape[1]} but cxr_tr has dim {x_tr.shape[1]}.")
    x_tr, q_tr, x_val, y_val = (t.to(dev) for t in (x_tr, q_tr, x_val, y_val))
    with _seeded(cfg.seed, dev, cfg.num_threads):
        model = create_head(cfg.head_config(x_tr.shape[1])).to(dev)
        model.set_standardizer(x_tr)
        loss_fn = nn.BCEWithLogitsLoss()

        def step(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            loss = loss_fn(model(x_tr.index_select(0, idx)).float(), q_tr.index_select(0, idx))
            return loss, {"loss": float(loss.detach())}

        def evaluate() -> float:
            return auc_score(model(x_val).float(), y_val)

        hist, best_epoch, best_auc = _train_loop(
            model, list(model.parameters()), step, evaluate, x_tr.shape[0], cfg, dev, on_epoch,
            eval_every=1,
        )
    return FitResult(model.eval(), hist, best_epoch, best_auc, time.perf_counter() - t0)


def predict_ridge_logit(model: RidgeRegression, cxr: torch.Tensor) -> torch.Tensor:
    """PE probability (N,) of the ridge CXR -> teacher-logit baseline."""
    with torch.no_grad():
        return torch.sigmoid(model(_as_tensor(cxr, "cxr", ndim=2)))


def predict_embed_student(model: nn.Module, teacher: nn.Module, cxr: torch.Tensor) -> torch.Tensor:
    """PE probability (N,): the teacher applied to a regressor's predicted CTPA embedding."""
    dev = next(model.buffers()).device
    frozen = _teacher_copy(teacher, dev)
    model.eval()
    with torch.no_grad():
        emb = model(_as_tensor(cxr, "cxr", ndim=2).to(dev))  # (N, Dc)
        return torch.sigmoid(frozen(emb).float())  # (N,)


def fit_ridge_embed(
    cxr_tr: torch.Tensor,
    ctpa_tr: torch.Tensor,
    teacher: nn.Module,
    cxr_val: torch.Tensor,
    y_val: torch.Tensor,
    cfg: RidgeTrainConfig = RidgeTrainConfig(),
) -> FitResult:
    """Ridge CXR -> CTPA embedding; scored by the teacher; alpha chosen on validation AUC."""
    t0 = time.perf_counter()
    cxr_tr, ctpa_tr, cxr_val = (
        _as_tensor(a, n, ndim=2) for a, n in ((cxr_tr, "cxr_tr"), (ctpa_tr, "ctpa_tr"), (cxr_val, "cxr_val"))
    )
    y_val = _check_labels(_as_tensor(y_val, "y_val", ndim=1), "y_val", cxr_val.shape[0])
    best: tuple[float, int, RidgeRegression] | None = None
    history = []
    models = RidgeRegression.fit_path(cxr_tr, ctpa_tr, cfg.alphas, squeeze=False)
    for i, (alpha, model) in enumerate(zip(cfg.alphas, models, strict=True)):
        auc = auc_score(predict_embed_student(model, teacher, cxr_val), y_val)
        history.append({"epoch": i, "alpha": alpha, "val_auc": auc})
        if best is None or auc > best[0] + 1e-9:
            best = (auc, i, model)
    if best is None:  # cannot happen: cfg.alphas is validated non-empty
        raise RuntimeError("no ridge penalty was evaluated")
    return FitResult(best[2].eval(), history, best[1], best[0], time.perf_counter() - t0,
                     {"alpha": cfg.alphas[best[1]]})
