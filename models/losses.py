"""Prior training loss: x0 MSE + lambda * teacher consistency (+ mu * label BCE).

Unlike the published code (teacher term under ``torch.no_grad()``, so it never trained the
prior), the teacher's parameters are frozen but the graph runs *through* it: the teacher term
moves the prior's weights. Only the target side, teacher(x0), is computed without a graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from embedstore.models.heads import ModelConfigError
from torch.nn import functional as F

__all__ = ["prior_loss", "freeze"]


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """Put ``module`` in eval mode with ``requires_grad=False`` on every parameter; returns it."""
    module.eval()
    module.requires_grad_(False)
    return module


def _weighted_mean(per_sample: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-12)


def prior_loss(
    x0_hat: torch.Tensor,
    x0: torch.Tensor,
    teacher: Callable[[torch.Tensor], torch.Tensor],
    lam: float,
    *,
    labels: torch.Tensor | None = None,
    label_mask: torch.Tensor | None = None,
    mu: float = 0.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one batch and its parts (as floats, for logging).

    x0_hat, x0: (B, Dc) in whatever space ``teacher`` accepts. teacher: (B, Dc) -> (B,) logits,
    frozen by the caller (see ``freeze``). The teacher term is the BCE between sigmoid(teacher(
    x0_hat)) and the soft target sigmoid(teacher(x0)); the label term (mu) is the BCE of
    teacher(x0_hat) against ``labels`` (B,) on rows where ``label_mask`` (B,) is true.
    ``weight`` (B,) optionally weights samples (e.g. min-SNR for epsilon prediction).
    """
    if x0_hat.shape != x0.shape or x0.ndim != 2:
        raise ModelConfigError(
            f"prior_loss needs x0_hat and x0 of the same (B, D) shape, got {tuple(x0_hat.shape)} "
            f"and {tuple(x0.shape)}."
        )
    if lam < 0 or mu < 0:
        raise ModelConfigError(f"lambda and mu must be >= 0, got lam={lam!r}, mu={mu!r}.")
    if mu > 0 and (labels is None or label_mask is None):
        raise ModelConfigError("mu > 0 needs labels and label_mask (set mu=0 for label-free training).")

    mse = _weighted_mean(((x0_hat - x0) ** 2).mean(dim=1), weight)  # scalar over (B,)
    loss = mse
    parts = {"mse": float(mse.detach())}
    logit_hat = None
    if lam > 0 or mu > 0:
        logit_hat = teacher(x0_hat).float()  # (B,) graph flows through the frozen teacher
    if lam > 0:
        with torch.no_grad():
            soft = torch.sigmoid(teacher(x0).float())  # (B,) target side only
        bce_t = F.binary_cross_entropy_with_logits(logit_hat, soft, reduction="none")  # (B,)
        teacher_term = _weighted_mean(bce_t, weight)
        loss = loss + lam * teacher_term
        parts["teacher_bce"] = float(teacher_term.detach())
    if mu > 0:
        mask = label_mask.bool()  # (B,)
        if mask.any():
            bce_y = F.binary_cross_entropy_with_logits(
                logit_hat[mask], labels[mask].float(), reduction="none"
            )  # (M,)
            label_term = _weighted_mean(bce_y, None if weight is None else weight[mask])
        else:
            label_term = logit_hat.sum() * 0.0  # keeps the graph shape stable for empty subsets
        loss = loss + mu * label_term
        parts["label_bce"] = float(label_term.detach())
    parts["loss"] = float(loss.detach())
    return loss, parts
