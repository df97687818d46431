"""Prior benchmark: our diffusion prior vs the published configuration, side by side.

    python -m benchmarks.bench_prior [--quick]      (part of `make bench`)

(1) one training step at batch 64, 512 -> 512 dims: embedstore's DiffusionPrior (default
    PriorTrainConfig: residual MLP, x0 prediction, loss through the frozen teacher, AdamW, EMA)
    vs the published configuration run through the `dalle2-pytorch` package
    (DiffusionPriorNetwork dim 512, depth 12, causal transformer over 81 tokens of which 77 are
    constant null text tokens), and the same network fed 4 tokens. dalle2-pytorch 1.15.6 pins
    open_clip_torch<3, so it lives in its own virtualenv, benchmarks/.venv-dalle2, created here
    on first use (`python3.11 -m venv`; `pip install torch==2.14.1 dalle2-pytorch==1.15.6`) and
    timed in a subprocess during the same run;
(2) one full ``fit_prior`` on 1 000 surrogate pairs including validation sampling;
(3) the data path of one epoch: slicing an in-RAM tensor after a seeded permutation vs a
    per-sample ``np.load`` Dataset + DataLoader over 1 000 .npy files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from embedstore.models.heads import LinearHead
from embedstore.models.losses import freeze, prior_loss
from embedstore.models.prior import DiffusionPrior

from embedstore.fit import (
    PriorTrainConfig,
    auc_score,
    fit_classifier,
    fit_prior,
    fit_ridge_logit,
    predict_ridge_logit,
    predict_student,
)
from embedstore.testing import surrogate_latents

__all__ = ["run"]

ROOT = Path(__file__).resolve().parents[1]
DALLE2_VENV = ROOT / "benchmarks" / ".venv-dalle2"
DALLE2_PINS = ("torch==2.14.1", "dalle2-pytorch==1.15.6")
BATCH, DIM = 64, 512


def _median(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _machine() -> str:
    from benchmarks.run_all import machine  # one description of the machine for every benchmark

    return machine()


# ------------------------------------------------------------------------------ (1) step
def _our_step_seconds(repeats: int, threads: int) -> tuple[float, int]:
    cfg = PriorTrainConfig()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        prior = DiffusionPrior(cfg.prior_config(DIM, DIM))
        teacher = freeze(LinearHead(DIM))
        opt = torch.optim.AdamW(prior.denoiser.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(0)
        cond, x0 = torch.randn(BATCH, DIM), torch.randn(BATCH, DIM)

        def step() -> None:
            x0_hat, t = prior.training_prediction(x0, cond, g)
            loss, _ = prior_loss(x0_hat, x0, lambda z: teacher(prior.unstandardize_target(z)), cfg.lam,
                                 weight=prior.loss_weight(t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prior.denoiser.parameters(), cfg.grad_clip)
            opt.step()
            prior.ema.update(prior.denoiser)

        n_params = sum(p.numel() for p in prior.denoiser.parameters())
        return _median(step, repeats, warmup=3), n_params
    finally:
        torch.set_num_threads(old)


def _ensure_dalle2_venv() -> Path | None:
    py = DALLE2_VENV / "bin" / "python"
    if py.exists():
        return py
    try:
        subprocess.run(["python3.11", "-m", "venv", str(DALLE2_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *DALLE2_PINS], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"bench_prior: could not build {DALLE2_VENV} ({e}); skipping the published baseline",
              file=sys.stderr)
        shutil.rmtree(DALLE2_VENV, ignore_errors=True)
        return None
    return py


def _dalle2_step(py: Path, tokens: int, repeats: int) -> dict | None:
    cmd = [str(py), str(ROOT / "benchmarks" / "_dalle2_step.py"), "--tokens", str(tokens),
           "--repeats", str(repeats), "--warmup", "1", "--batch", str(BATCH), "--dim", str(DIM)]
    try:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        print(f"bench_prior: published baseline failed: {e}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ (2) fit
def _full_fit(n_train: int, n_val: int, n_test: int) -> dict:
    d = surrogate_latents(n_train + n_val + n_test, DIM, DIM, seed=0)
    tr, va, te = slice(0, n_train), slice(n_train, n_train + n_val), slice(n_train + n_val, None)
    lab = torch.randperm(n_train, generator=torch.Generator().manual_seed(1))[: n_train // 4]
    cx_tr, ct_tr, y_tr = d["cxr"][tr], d["ctpa"][tr], d["y"][tr]
    teacher = fit_classifier(ct_tr[lab], y_tr[lab], d["ctpa"][va], d["y"][va]).model
    cxr_only = fit_classifier(cx_tr[lab], y_tr[lab], d["cxr"][va], d["y"][va]).model
    cfg = PriorTrainConfig()
    t0 = time.perf_counter()
    res = fit_prior(cx_tr, ct_tr, teacher, d["cxr"][va], d["y"][va], cfg)
    seconds = time.perf_counter() - t0
    prob, std, _ = predict_student(res.model, teacher, d["cxr"][te], cfg.val_samples, cfg.val_steps)
    ridge = fit_ridge_logit(cx_tr, ct_tr, teacher, d["cxr"][va], d["y"][va]).model
    with torch.no_grad():
        aucs = {
            "CTPA teacher": auc_score(teacher(d["ctpa"][te]), d["y"][te]),
            "diffusion student": auc_score(prob, d["y"][te]),
            "ridge CXR->teacher logit": auc_score(predict_ridge_logit(ridge, d["cxr"][te]), d["y"][te]),
            "CXR-only classifier": auc_score(cxr_only(d["cxr"][te]), d["y"][te]),
        }
    return {"seconds": seconds, "epochs": len(res.history), "best_epoch": res.best_epoch,
            "val_auc": res.val_auc, "test_auc": aucs, "mean_std": float(std.mean())}


# ------------------------------------------------------------------------------ (3) data path
def _data_path(n: int, repeats: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    pairs = rng.standard_normal((n, 2, DIM), dtype=np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="bench_prior_"))
    try:
        for i in range(n):
            np.save(tmp / f"{i:05d}.npy", pairs[i])

        class NpyDataset(torch.utils.data.Dataset):  # the published per-sample layout
            def __init__(self, files):
                self.files = files

            def __len__(self):
                return len(self.files)

            def __getitem__(self, i):
                a = np.load(self.files[i])
                return torch.from_numpy(a[0]), torch.from_numpy(a[1])

        files = sorted(tmp.glob("*.npy"))
        loader = torch.utils.data.DataLoader(
            NpyDataset(files), batch_size=BATCH, shuffle=True,
            generator=torch.Generator().manual_seed(0), num_workers=0,
        )

        def epoch_loader() -> None:
            for batch in loader:  # collated (B, D) tensors, ready for the model
                del batch

        x = torch.from_numpy(pairs[:, 0].copy())  # (N, D) the store's contiguous read, once
        c = torch.from_numpy(pairs[:, 1].copy())
        g = torch.Generator().manual_seed(0)

        def epoch_ram() -> None:
            perm = torch.randperm(n, generator=g)  # (N,) a fresh order every epoch
            # (N, D) one gather per epoch (index_select: ~5x faster than x[perm] here) ...
            xs, cs = x.index_select(0, perm), c.index_select(0, perm)
            for i in range(0, n, BATCH):
                batch = (xs[i : i + BATCH], cs[i : i + BATCH])  # ... then batches are views
                del batch

        old = torch.get_num_threads()
        torch.set_num_threads(1)  # fit.py's default
        try:
            return _median(epoch_loader, repeats), _median(epoch_ram, repeats * 20)
        finally:
            torch.set_num_threads(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool = False) -> str:
    """Run the prior benchmarks; return a Markdown section."""
    our_repeats = 10 if quick else 30
    pub_repeats = 1 if quick else 3
    ours_1, n_params = _our_step_seconds(our_repeats, threads=1)
    ours_all = _our_step_seconds(our_repeats, threads=os.cpu_count() or 1)[0]
    py = _ensure_dalle2_venv()
    pub81 = _dalle2_step(py, 77, pub_repeats) if py else None
    pub4 = _dalle2_step(py, 0, pub_repeats) if py else None
    fit = _full_fit(400 if quick else 1000, 100 if quick else 250, 200 if quick else 1000)
    loader_s, ram_s = _data_path(1000, 3 if quick else 10)

    best = min(ours_1, ours_all)
    lines = [
        "## Diffusion prior",
        "",
        f"Machine: {_machine()}. Command: `make bench` "
        f"(or `.venv/bin/python -m benchmarks.bench_prior{' --quick' if quick else ''}`).",
        "",
        f"### Training step, batch {BATCH}, {DIM} -> {DIM} dims (median)",
        "",
        "| model | params | tokens | s / step | published / ours |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, res in (("published: dalle2-pytorch DiffusionPriorNetwork, depth 12, dim 512", pub81),
                      ("same network, 4 tokens (no null text tokens)", pub4)):
        if res is None:
            lines.append(f"| {name} | - | - | not run (no {DALLE2_VENV.name}) | - |")
        else:
            lines.append(f"| {name} | {res['params'] / 1e6:.1f} M | {res['tokens']} | "
                         f"{res['median_s']:.3f} | {res['median_s'] / best:.0f}x |")
    lines += [
        f"| ours: residual-MLP prior (defaults), 1 thread | {n_params / 1e6:.1f} M | - | {ours_1:.4f} | |",
        f"| ours: same, {os.cpu_count()} threads | {n_params / 1e6:.1f} M | - | {ours_all:.4f} | |",
        "",
        "Ratios use our faster thread setting. The published network ran with torch's default "
        "threads; steps include loss, backward and optimizer (ours also the teacher term and EMA).",
        "",
        f"### One full `fit_prior` on {400 if quick else 1000} surrogate pairs (incl. validation)",
        "",
        f"{fit['seconds']:.1f} s wall ({fit['epochs']} epochs, best epoch {fit['best_epoch']}, "
        f"validation AUC {fit['val_auc']:.3f}; goal < 60 s on 2 cores). Test AUC on the surrogate "
        "cohort, 25 % of training patients labelled:",
        "",
        "| model | test AUC |",
        "| --- | ---: |",
        *[f"| {k} | {v:.3f} |" for k, v in fit["test_auc"].items()],
        "",
        f"Mean per-study spread (std of the teacher probability across samples): {fit['mean_std']:.3f}.",
        "",
        "### Data path, one epoch of 1 000 pairs (median)",
        "",
        "| path | ms / epoch | speed-up |",
        "| --- | ---: | ---: |",
        f"| per-sample `np.load` Dataset + DataLoader (1 000 .npy files) | {loader_s * 1e3:.1f} | 1x |",
        f"| in-RAM tensor, seeded permutation + slicing | {ram_s * 1e3:.2f} | {loader_s / ram_s:.0f}x |",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and a smaller fit")
    args = ap.parse_args()
    md = run(quick=args.quick)
    print(md)
    out = ROOT / "docs" / "benchmarks" / "prior.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)


if __name__ == "__main__":
    main()
