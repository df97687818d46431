"""The experiment's figures and its one-file HTML report (from summary.json's content)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from embedstore.report import write_html_report

if TYPE_CHECKING:
    from embedstore.experiment import ExperimentConfig

__all__ = ["write_experiment_report"]


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_label_efficiency_bands(summary: Mapping[str, Any], path: Path) -> Path:
    """Mean test AUC over seeds vs label fraction, one line per arm, hierarchical 95 % CI band."""
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot()
    arms = list(dict.fromkeys(r["arm"] for r in summary["arms"]))
    for arm in arms:
        rows = sorted((r for r in summary["arms"] if r["arm"] == arm),
                      key=lambda r: r["label_fraction"])
        x = np.array([r["label_fraction"] for r in rows])
        m = np.array([r["auc_mean"] for r in rows])
        lo = np.array([r["auc_ci"][0] for r in rows])
        hi = np.array([r["auc_ci"][1] for r in rows])
        (line,) = ax.plot(x, m, marker="o", label=arm)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["label_fraction"] for r in summary["arms"]}))
    ax.set_xticklabels([f"{f:g}" for f in sorted({r["label_fraction"] for r in summary["arms"]})])
    ax.set_xlabel("labelled fraction of training patients")
    ax.set_ylabel("test AUC (mean over seeds, 95 % hierarchical CI)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_forest(summary: Mapping[str, Any], path: Path) -> Path:
    """Paired dAUC with its hierarchical CI, one row per compared pair and label fraction."""
    rows = summary["deltas"]
    fig = Figure(figsize=(6.4, 0.9 + 0.32 * max(1, len(rows))))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1]
    d = np.array([r["delta_auc"] for r in rows])
    err = np.array([[r["delta_auc"] - r["delta_ci"][0] for r in rows],
                    [r["delta_ci"][1] - r["delta_auc"] for r in rows]])
    ax.errorbar(d, y, xerr=err, fmt="o", color="black", capsize=3)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r['arm']} - {r['reference']} @ {r['label_fraction']:g} "
                        f"({r['seeds_above_zero']}/{r['n_seeds']})" for r in rows], fontsize=8)
    ax.set_xlabel("paired test dAUC, 95 % hierarchical CI\n(k/n: seeds whose own CI is above 0)")
    return _save(fig, path)


def plot_decision_curve(summary: Mapping[str, Any], path: Path) -> Path:
    dc = summary["decision_curve"]
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    treat_all = None
    for arm, c in dc["curves"].items():
        ax.plot(c["threshold"], c["net_benefit"], label=arm)
        treat_all = c
    if treat_all is not None:
        ax.plot(treat_all["threshold"], treat_all["treat_all"], color="grey", linestyle=":",
                label="treat all")
    ax.axhline(0, color="black", linewidth=0.8, label="treat none")
    ax.set_ylim(-0.02, dc["prevalence"] * 1.15)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel(f"net benefit at prevalence {dc['prevalence']:g}")
    ax.set_title(f"Decision curve, {dc['label_fraction']:g} labels (mean over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_experiment_report(path: Path, summary: Mapping[str, Any],
                            cfg: ExperimentConfig) -> Path:
    out = path.parent
    figures = {
        "Label efficiency: test AUC per arm, mean over seeds with hierarchical 95 % CI bands":
            plot_label_efficiency_bands(summary, out / "label_efficiency.png"),
        "Paired dAUC per compared pair (forest plot)": plot_forest(summary, out / "forest.png"),
        "Decision curve (net benefit) at the largest label fraction":
            plot_decision_curve(summary, out / "decision_curve.png"),
    }
    rows = [{"arm": r["arm"], "labels": f"{r['label_fraction']:g}",
             "AUC mean [95% CI]": f"{r['auc_mean']:.3f} [{r['auc_ci'][0]:.3f}, {r['auc_ci'][1]:.3f}]",
             "sd over seeds": f"{r['auc_sd']:.3f}",
             f"spec @ sens>={cfg.target_sensitivity:g}": f"{r['specificity']:.3f}",
             f"PPV @ {cfg.prevalence:g}": f"{r['ppv']:.3f}",
             f"NPV @ {cfg.prevalence:g}": f"{r['npv']:.3f}"} for r in summary["arms"]]
    comps = [{"pair": f"{d['arm']} - {d['reference']}", "labels": f"{d['label_fraction']:g}",
              "dAUC": f"{d['delta_auc']:+.3f}",
              "95% CI": f"[{d['delta_ci'][0]:+.3f}, {d['delta_ci'][1]:+.3f}]",
              "seeds with CI > 0": f"{d['seeds_above_zero']}/{d['n_seeds']}"}
             for d in summary["deltas"]]
    per_seed = {f"labels {r['label_fraction']:g}, seed {r['seed']}":
                {k: v for k, v in r.items() if k not in ("label_fraction", "seed")}
                for r in summary["per_seed"]}
    notes = [*summary["verdicts"],
             f"Seeds {list(cfg.seeds)}; CIs resample seeds, then patients within each seed. "
             "Operating points: threshold fixed on validation for the target sensitivity, PPV "
             f"and NPV by Bayes' rule at prevalence {cfg.prevalence:g}."]
    return write_html_report(path, title=f"embedstore experiment {summary['experiment_id']}",
                             table_rows=rows, figures=figures, notes=notes, comparisons=comps,
                             configs={"experiment config": cfg.to_dict(),
                                      "per-seed test AUC": per_seed})
