"""Evaluation figures as PNG files (matplotlib, Agg canvas, no pyplot global state).

Each function writes one PNG and returns its Path. Figures are built on a standalone
``matplotlib.figure.Figure`` with an Agg canvas, so nothing is left open in pyplot and no
backend is switched for the caller. Colours follow the Okabe-Ito palette (colour-blind safe) and
lines also differ by marker, so the figures survive greyscale printing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats

from embedstore.errors import ConfigError
from embedstore.metrics import (
    bootstrap_auc_ci,
    expected_calibration_error,
    reliability_curve,
    roc_auc,
    roc_curve_points,
)

__all__ = [
    "PALETTE",
    "plot_roc",
    "plot_reliability",
    "plot_auc_vs_sampling",
    "plot_uncertainty_vs_error",
    "plot_label_efficiency",
]

#: Okabe & Ito (2008) colour-blind-safe palette, black last.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#D55E00",  # vermillion
    "#009E73",  # bluish green
    "#CC79A7",  # reddish purple
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")
_STYLE = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
_DPI = 150


def _style(i: int) -> dict:
    return {
        "color": PALETTE[i % len(PALETTE)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _new_figure(figsize=(6.4, 5.2), **kw) -> Figure:
    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained", **kw)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no Software/date metadata: the same inputs give byte-identical PNGs
    fig.savefig(path, format="png", dpi=_DPI, metadata={"Software": None})
    fig.clear()
    return path


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message, reason="bad_plot_input")


def plot_roc(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    *,
    title: str = "ROC curves (test split)",
    cis: Mapping[str, tuple[float, float]] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Path:
    """Overlaid ROC curves, one per ``name -> (y, s)``; the legend gives AUC and its 95 % CI
    (taken from ``cis`` when given, else a seeded stratified bootstrap)."""
    _require(len(curves) > 0, "plot_roc needs at least one (y, s) curve, got none.")
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(figsize=(6.4, 6.4 + 0.3 * len(curves)))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="chance")
        for i, (name, (y, s)) in enumerate(curves.items()):
            fpr, tpr, _ = roc_curve_points(y, s)
            auc = roc_auc(y, s)
            if cis is not None and name in cis:
                lo, hi = cis[name]
            else:
                lo, hi = bootstrap_auc_ci(y, s, n_resamples=n_resamples, seed=seed)
            st = _style(i)
            ax.plot(
                fpr,
                tpr,
                color=st["color"],
                ls=_LINESTYLES[i % len(_LINESTYLES)],
                lw=2,
                label=f"{name}: AUC {auc:.3f} [{lo:.3f}, {hi:.3f}]",
            )
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 - specificity (false positive rate)")
        ax.set_ylabel("Sensitivity (true positive rate)")
        ax.set_title(title)
        # below the axes: with several models an inset legend hides the curves it explains
        handles, labels = ax.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", title="AUC [95 % CI]",
                   frameon=False, fontsize="small")
        return _save(fig, path)


def plot_reliability(
    curves: Mapping[str, tuple],
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    title: str = "Calibration (test split)",
) -> Path:
    """Reliability diagram per ``name -> (y, p)`` (p are probabilities) with ECE in the legend,
    and a histogram of predicted probabilities underneath."""
    _require(len(curves) > 0, "plot_reliability needs at least one (y, p) curve, got none.")
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(figsize=(6.0, 6.6))
        ax, hx = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls=":", label="perfect calibration")
        edges = np.linspace(0, 1, n_bins + 1)
        for i, (name, (y, p)) in enumerate(curves.items()):
            mid, frac, count = reliability_curve(y, p, n_bins)
            ece = expected_calibration_error(y, p, n_bins)
            keep = count > 0
            st = _style(i)
            ax.plot(mid[keep], frac[keep], lw=2, ms=6, label=f"{name} (ECE {ece:.3f})", **st)
            hx.hist(
                np.asarray(p, dtype=float),
                bins=edges,
                histtype="step",
                lw=1.8,
                color=st["color"],
                label=name,
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Observed fraction positive")
        ax.set_title(title)
        ax.legend(loc="upper left", frameon=True, framealpha=0.9)
        hx.set_xlabel(f"Predicted probability ({n_bins} equal-width bins)")
        hx.set_ylabel("Cases")
        return _save(fig, path)


def _rows_check(rows: Sequence[Mapping], keys: tuple[str, ...], fn: str) -> None:
    _require(len(rows) > 0, f"{fn} needs at least one row, got none.")
    for i, r in enumerate(rows):
        missing = [k for k in keys if k not in r]
        _require(not missing, f"{fn}: row {i} lacks {missing}; each row needs {list(keys)}.")


def _ci_errorbars(auc: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.vstack([np.maximum(auc - lo, 0), np.maximum(hi - auc, 0)])  # (2, P)


def plot_auc_vs_sampling(
    rows: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    references: Mapping[str, float] | None = None,
    title: str = "Distilled student: AUC vs diffusion sampling",
) -> Path:
    """Test AUC (with CI bars) against the number of diffusion samples averaged, one line per
    number of DDIM steps; ``references`` (e.g. CXR-only, ridge) are drawn as horizontal lines."""
    _rows_check(rows, ("num_samples", "steps", "auc", "lo", "hi"), "plot_auc_vs_sampling")
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(figsize=(8.4, 5.0))
        ax = fig.add_subplot()
        steps_values = sorted({int(r["steps"]) for r in rows})
        all_n = sorted({int(r["num_samples"]) for r in rows})
        jitter = 0.025 * (np.arange(len(steps_values)) - (len(steps_values) - 1) / 2)
        for i, steps in enumerate(steps_values):
            sel = sorted(
                (r for r in rows if int(r["steps"]) == steps), key=lambda r: r["num_samples"]
            )
            n = np.array([r["num_samples"] for r in sel], dtype=float)
            auc = np.array([r["auc"] for r in sel], dtype=float)
            lo = np.array([r["lo"] for r in sel], dtype=float)
            hi = np.array([r["hi"] for r in sel], dtype=float)
            # small multiplicative offsets keep overlapping error bars readable on the log axis
            ax.errorbar(
                n * (1 + jitter[i]),
                auc,
                yerr=_ci_errorbars(auc, lo, hi),
                lw=2,
                ms=6,
                capsize=3,
                label=f"{steps} DDIM steps",
                **_style(i),
            )
        for j, (name, value) in enumerate((references or {}).items()):
            ax.axhline(
                value,
                color="0.35",
                ls=_LINESTYLES[(j + 1) % len(_LINESTYLES)],
                lw=1.3,
                label=f"{name} ({value:.3f})",
            )
        if len(all_n) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(all_n, [str(v) for v in all_n])
        ax.minorticks_off()
        ax.set_xlabel("Diffusion samples averaged per case")
        ax.set_ylabel("Test AUC (95 % CI)")
        ax.set_title(title)
        # outside the axes: CI bars span most of the plot, so no inside corner is reliably free
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        return _save(fig, path)


def plot_uncertainty_vs_error(
    uncertainty,
    abs_error,
    path: str | os.PathLike,
    *,
    n_bins: int = 10,
    xlabel: str = "Per-case uncertainty (std across diffusion samples)",
    ylabel: str = "Absolute error",
    title: str = "Does the student know when it is wrong?",
) -> Path:
    """Scatter of per-case uncertainty vs absolute error, the mean error per uncertainty decile,
    and Spearman's rho in the title."""
    u = np.asarray(uncertainty, dtype=float).ravel()
    e = np.asarray(abs_error, dtype=float).ravel()
    _require(
        u.size == e.size and u.size >= 2, f"Need >= 2 paired values, got {u.size} and {e.size}."
    )
    _require(
        bool(np.all(np.isfinite(u)) and np.all(np.isfinite(e))),
        "Uncertainty and error must be finite.",
    )
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(figsize=(6.6, 5.0))
        ax = fig.add_subplot()
        ax.scatter(u, e, s=14, alpha=0.45, color=PALETTE[5], edgecolors="none", label="cases")
        q = np.unique(np.quantile(u, np.linspace(0, 1, n_bins + 1)))
        if q.size > 2:
            which = np.clip(np.searchsorted(q, u, side="right") - 1, 0, q.size - 2)
            mids, means = [], []
            for b in range(q.size - 1):
                m = which == b
                if m.any():
                    mids.append(u[m].mean())
                    means.append(e[m].mean())
            ax.plot(mids, means, lw=2.2, ms=6, label="mean error per uncertainty bin", **_style(1))
        if np.ptp(u) > 0 and np.ptp(e) > 0:
            rho = stats.spearmanr(u, e).statistic
            title = f"{title}\nSpearman rho = {rho:.2f} (n = {u.size})"
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", frameon=True, framealpha=0.9)
        return _save(fig, path)


def plot_label_efficiency(
    rows: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    references: Mapping[str, float] | None = None,
    title: str = "When does distillation pay?\nTest AUC vs labelled fraction",
) -> Path:
    """Test AUC with a shaded 95 % CI band against the labelled fraction, one line per model."""
    _rows_check(rows, ("fraction", "model", "auc", "lo", "hi"), "plot_label_efficiency")
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(figsize=(8.4, 5.0))
        ax = fig.add_subplot()
        models = list(dict.fromkeys(str(r["model"]) for r in rows))  # first-seen order
        fractions = sorted({float(r["fraction"]) for r in rows})
        for i, model in enumerate(models):
            sel = sorted((r for r in rows if str(r["model"]) == model), key=lambda r: r["fraction"])
            f = np.array([r["fraction"] for r in sel], dtype=float) * 100
            auc = np.array([r["auc"] for r in sel], dtype=float)
            lo = np.array([r["lo"] for r in sel], dtype=float)
            hi = np.array([r["hi"] for r in sel], dtype=float)
            st = _style(i)
            ax.fill_between(f, lo, hi, color=st["color"], alpha=0.15, lw=0)
            ax.plot(f, auc, lw=2, ms=6, ls=_LINESTYLES[i % len(_LINESTYLES)], label=model, **st)
        for j, (name, value) in enumerate((references or {}).items()):
            ax.axhline(
                value,
                color="0.35",
                ls=_LINESTYLES[(j + 1) % len(_LINESTYLES)],
                lw=1.3,
                label=f"{name} ({value:.3f})",
            )
        pct = [v * 100 for v in fractions]
        if len(pct) > 1 and min(pct) > 0:
            ax.set_xscale("log")
        ax.set_xticks(pct, [f"{v:g} %" for v in pct])
        ax.minorticks_off()
        ax.set_xlabel("Labelled fraction of the training split")
        ax.set_ylabel("Test AUC (shaded: 95 % CI)")
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
        return _save(fig, path)
