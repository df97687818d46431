"""Training at scale: `train prior` set-up and epoch on 10^5 pairs, each against a baseline in the
same run.

    python -m benchmarks.bench_train_scale [--quick]      (part of `make bench`; quick: 10^4 pairs)

(1) Set-up = everything `fit_prior` does before its first epoch: standardisers, the ridge mean's
    penalty by generalised cross-validation, then the penalty chosen on the teacher's validation
    AUC. Ours: one pass over the pairs (RidgePath: one centred Gram matrix, its eigendecomposition,
    every penalty from it). Baseline, in the same run: the previous implementation (a thin SVD of
    the (N, Dx) conditions in float64 for the GCV, then one Gram matrix and solve per penalty).
    Time is the median of ``repeats`` runs; peak RSS (ru_maxrss, each measurement in its own
    subprocess) above the RSS with the inputs loaded, divided by the input bytes.
(2) One epoch: `fit_prior`'s epoch (teacher-consistency term, EMA update, gradient clipping,
    bookkeeping) vs the bare loop: the same denoiser, batches and optimiser, MSE only.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run"]

ROOT = Path(__file__).resolve().parents[1]
DIM = 512


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _data(n: int, n_val: int):
    import torch

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(n + n_val, 16, generator=g)
    cxr = latent @ torch.randn(16, DIM, generator=g) + torch.randn(n + n_val, DIM, generator=g)
    ctpa = latent @ torch.randn(16, DIM, generator=g) + 0.5 * torch.randn(n + n_val, DIM, generator=g)
    y = (latent[:, 0] + 0.5 * torch.randn(n + n_val, generator=g) > 0.5).float()
    return cxr[:n].contiguous(), ctpa[:n].contiguous(), cxr[n:].contiguous(), y[n:].contiguous()


def _old_setup(prior, teacher, c_all, x_all, c_val, y_val) -> None:
    """The set-up as it was before RidgePath (kept here as the benchmark's baseline)."""
    import torch
    from embedstore.models.prior import RIDGE_ALPHAS

    from embedstore.fit import auc_score

    def fit_mean(c, y, alpha):
        c64, y64 = c.double(), y.double()
        eye = torch.eye(c64.shape[1], dtype=torch.float64)
        w = torch.linalg.solve(c64.T @ c64 + alpha * eye, c64.T @ y64)
        return w, (y64 - c64 @ w).mean(0)

    c64, y64 = c_all.double(), x_all.double()
    n = c64.shape[0]
    u, sv, _ = torch.linalg.svd(c64, full_matrices=False)
    uty = u.T @ y64
    for alpha in RIDGE_ALPHAS:  # GCV (its choice is overwritten by the validation search below)
        shrink = sv**2 / (sv**2 + alpha)
        resid = y64 - u @ (shrink[:, None] * uty)
        float((resid**2).sum()) / (n * max(1.0 - float(shrink.sum()) / n, 1e-6) ** 2)
    del u, uty, c64, y64
    best = None
    for alpha in RIDGE_ALPHAS:
        w, b = fit_mean(c_all, x_all, alpha)
        mean = (c_val.double() @ w + b).float()
        auc = auc_score(teacher(prior.unstandardize_target(mean)).float(), y_val)
        if best is None or auc > best[0]:
            best = (auc, alpha)


def child(what: str, n: int, n_val: int) -> dict:
    import torch
    from embedstore.models.heads import LinearHead
    from embedstore.models.prior import DiffusionPrior

    from embedstore.fit import PriorTrainConfig, _select_mean_alpha, fit_prior

    torch.set_num_threads(1)  # what PriorTrainConfig uses (num_threads=1)
    cxr, ctpa, cxr_val, y_val = _data(n, n_val)
    teacher = LinearHead(DIM).eval()
    with torch.no_grad():
        teacher.fc.weight.normal_()
        teacher.set_standardizer(ctpa)
    base = _rss_mb()
    t0 = time.perf_counter()
    out: dict = {}
    cfg = PriorTrainConfig(epochs=2, eval_every=100, val_samples=2, val_steps=2, seed=0)
    with torch.no_grad():
        if what in ("setup", "old_setup"):
            prior = DiffusionPrior(cfg.prior_config(DIM, DIM))
            if what == "setup":
                path = prior.set_standardizers(cxr, ctpa)
                _select_mean_alpha(prior, teacher, path, cxr_val, y_val)
            else:
                for name, x in (("cond", cxr), ("target", ctpa)):
                    getattr(prior, f"{name}_mean").copy_(x.mean(0))
                    getattr(prior, f"{name}_std").copy_(x.std(0).clamp_min(1e-6))
                c_all, x_all = prior.standardize_cond(cxr), prior.standardize_target(ctpa)
                _old_setup(prior, teacher, c_all, x_all, prior.standardize_cond(cxr_val), y_val)
            out["seconds"] = time.perf_counter() - t0
    if what == "epoch":
        res = fit_prior(cxr, ctpa, teacher, cxr_val, y_val, cfg)
        h = res.history
        out["seconds"] = h[0]["seconds"]  # epoch 0: no validation sampling (eval_every=100 ... last)
        out["setup_seconds"] = res.seconds - h[-1]["seconds"]
    if what == "bare":
        prior = DiffusionPrior(cfg.prior_config(DIM, DIM))
        prior.set_standardizers(cxr[:1000], ctpa[:1000])  # not timed: only the loop is
        c_all, x_all = prior.standardize_cond(cxr), prior.standardize_target(ctpa)
        opt = torch.optim.AdamW(prior.denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        gen = torch.Generator().manual_seed(1)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        prior.train()
        t0 = time.perf_counter()
        for lo in range(0, n, cfg.batch_size):
            idx = perm[lo : lo + cfg.batch_size]
            x0_hat, _ = prior.training_prediction(x_all[idx], c_all[idx], gen)
            loss = ((x0_hat - x_all[idx]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out["seconds"] = time.perf_counter() - t0
    out["peak_extra_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    out["input_mb"] = (cxr.numel() + ctpa.numel()) * 4 / 2**20
    return out


def _measure(what: str, n: int, n_val: int, repeats: int) -> dict:
    runs = []
    for _ in range(repeats):
        r = subprocess.run([sys.executable, "-m", "benchmarks.bench_train_scale", "--child", what,
                            str(n), str(n_val)], cwd=ROOT, capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_extra_mb": max(r["peak_extra_mb"] for r in runs), "input_mb": runs[0]["input_mb"],
            **({"setup_seconds": statistics.median(r["setup_seconds"] for r in runs)}
               if "setup_seconds" in runs[0] else {})}


def run(quick: bool = False) -> str:
    """Run the training-at-scale benchmark; return a Markdown section."""
    from benchmarks.run_all import machine

    n, n_val = (10_000, 1_000) if quick else (100_000, 5_000)
    reps = 1 if quick else 3
    new = _measure("setup", n, n_val, reps)
    old = _measure("old_setup", n, n_val, 1)
    epoch = _measure("epoch", n, n_val, reps)
    bare = _measure("bare", n, n_val, reps)
    lines = [
        f"## Training at scale: `train prior` on {n:,} pairs ({DIM} -> {DIM} dims)",
        "",
        f"Machine: {machine()}. Command: `make bench` (or `.venv/bin/python -m "
        f"benchmarks.bench_train_scale{' --quick' if quick else ''}`). Median of {reps} run(s), each in "
        "its own process; the old set-up once. Inputs: "
        f"{new['input_mb']:.0f} MB (CXR + CTPA float32); validation {n_val:,}.",
        "",
        "| step | ours (s) | peak RSS above inputs / inputs | baseline | baseline (s) | ours / baseline | goal |",
        "| --- | ---: | ---: | --- | ---: | ---: | --- |",
        f"| set-up: standardisers, GCV, validation penalty search | {new['seconds']:.2f} | "
        f"{new['peak_extra_mb'] / new['input_mb']:.2f}x | previous implementation (SVD + one solve per "
        f"penalty) | {old['seconds']:.1f} | {new['seconds'] / old['seconds']:.3f}x | <= 10 s, <= 3x inputs |",
        f"| one epoch of `fit_prior` (teacher term, EMA, clipping, bookkeeping) | {epoch['seconds']:.2f} | "
        f"{epoch['peak_extra_mb'] / epoch['input_mb']:.2f}x | bare loop: same denoiser and batches, MSE "
        f"only | {bare['seconds']:.2f} | {epoch['seconds'] / bare['seconds']:.2f}x | <= 1.3x |",
        "",
        f"Set-up as `fit_prior` itself spends it (total minus its loop): {epoch['setup_seconds']:.2f} s. "
        f"The old set-up's peak RSS above inputs: {old['peak_extra_mb'] / old['input_mb']:.2f}x the inputs.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10^4 pairs, one repeat")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "N", "NVAL"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    md = run(quick=args.quick)
    print(md)
    out = ROOT / "docs" / "benchmarks" / "train_scale.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)


if __name__ == "__main__":
    main()
