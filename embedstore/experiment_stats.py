"""Statistics over many runs: hierarchical bootstrap, clinical operating points, verdict lines.

An experiment repeats every arm over several *groups* (training/label seeds, cohorts or folds) and
scores the same test patients within a group. Two levels of variation matter: between groups (a
new label subset or seed moves the AUC) and between patients (a finite test set). The hierarchical
bootstrap resamples both: groups with replacement, then patients with replacement inside each
drawn group, and averages the per-group statistic. Paired comparisons (arm A minus arm B) use the
same resampled patients for both arms, so their shared patient-level noise cancels.

Everything here is numpy on in-memory arrays (no store, no runs): ``embedstore.experiment``
feeds it per-patient predictions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from embedstore.errors import ConfigError
from embedstore.metrics import _auc_rows, paired_bootstrap_delta, roc_auc

__all__ = [
    "GroupScores",
    "HierarchicalCI",
    "OperatingPoint",
    "decision_curve",
    "hierarchical_auc",
    "hierarchical_delta",
    "hierarchical_mean_ci",
    "operating_point",
    "seeds_above_zero",
    "verdict",
]

_CHUNK = 4_000_000  # elements per (B, n) resample block: bounds memory for large test sets


@dataclass(frozen=True)
class GroupScores:
    """One group's (seed's, fold's) test predictions: one score per patient, aligned by index."""

    y: np.ndarray  # (n,) 0/1 labels
    scores: Mapping[str, np.ndarray]  # arm -> (n,) scores (any monotone scale)

    def __post_init__(self) -> None:
        y = np.asarray(self.y)
        if y.ndim != 1 or y.size == 0:
            raise ConfigError(f"A group needs a non-empty 1-D label vector, got shape {y.shape}.")
        if not np.isin(y, (0, 1)).all():
            raise ConfigError("Group labels must be 0 or 1.")
        for arm, s in self.scores.items():
            if np.shape(s) != y.shape:
                raise ConfigError(
                    f"Arm {arm!r} has {np.shape(s)} scores for {y.shape} labels in one group.")
            if not np.isfinite(np.asarray(s, dtype=float)).all():
                raise ConfigError(f"Arm {arm!r} has non-finite scores.")


@dataclass(frozen=True)
class HierarchicalCI:
    estimate: float  # the statistic on the data as observed (mean over groups)
    lo: float
    hi: float
    sd_between_groups: float  # sd of the per-group statistic (0 with one group)
    n_groups: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _check(groups: Sequence[GroupScores], arms: Sequence[str], alpha: float, n_boot: int) -> None:
    if not groups:
        raise ConfigError("No groups to bootstrap over: run at least one seed or fold.")
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}; use 0.05 for a 95 % CI.")
    if n_boot < 10:
        raise ConfigError(f"n_boot must be at least 10, got {n_boot}.")
    for g in groups:
        missing = [a for a in arms if a not in g.scores]
        if missing:
            raise ConfigError(f"Arm(s) {missing} missing from a group; every group must score "
                              f"the same arms (have {sorted(g.scores)}).")
        if g.y.min() == g.y.max():
            raise ConfigError("A group's test labels hold one class: its AUC is undefined.")


def _group_boot_aucs(g: GroupScores, arms: Sequence[str], n_boot: int,
                     rng: np.random.Generator) -> np.ndarray:
    """(len(arms), n_boot) AUCs over patient resamples of one group (the same rows for each arm).

    Stratified by class (positives and negatives resampled separately) so no resample is
    single-class; a group's case mix is then fixed, as it is in a real test split."""
    y = np.asarray(g.y)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    out = np.empty((len(arms), n_boot))
    step = max(1, _CHUNK // y.size)
    for start in range(0, n_boot, step):
        b = min(step, n_boot - start)
        idx = np.concatenate([pos[rng.integers(0, pos.size, (b, pos.size))],
                              neg[rng.integers(0, neg.size, (b, neg.size))]], axis=1)  # (b, n)
        y_rows = y[idx]
        for k, arm in enumerate(arms):
            out[k, start:start + b] = _auc_rows(y_rows, np.asarray(g.scores[arm])[idx])
    return out


def _two_stage_quantiles(per_group: np.ndarray, rng: np.random.Generator,
                         alpha: float) -> tuple[float, float]:
    """Percentile CI of the mean over groups from (G, B) per-group patient-resampled statistics:
    each replicate draws G groups with replacement and takes replicate b of each.

    Drawing G of G groups shrinks the between-group variance by (G - 1) / G, which matters with
    the 3-10 seeds experiments run; the replicates' spread is widened by sqrt(G / (G - 1)) to
    undo it (with one group there is nothing to resample and only the patient level is left)."""
    n_g, n_boot = per_group.shape
    pick = rng.integers(0, n_g, size=(n_boot, n_g))  # (B, G) groups drawn per replicate
    stats = per_group[pick, np.arange(n_boot)[:, None]].mean(axis=1)  # (B,)
    if n_g > 1:
        centre = stats.mean()
        stats = centre + np.sqrt(n_g / (n_g - 1)) * (stats - centre)
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _hierarchical(groups: Sequence[GroupScores], arms: Sequence[str], weights: Sequence[float],
                  *, n_boot: int, seed: int, alpha: float) -> HierarchicalCI:
    """CI of sum_k w_k * mean_over_groups(AUC(arm_k)) by two-stage resampling."""
    _check(groups, arms, alpha, n_boot)
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=float)[:, None]  # (K, 1)
    # per group: the statistic on each of n_boot patient resamples, then groups are resampled
    per_group = np.stack([(w * _group_boot_aucs(g, arms, n_boot, rng)).sum(0)
                          for g in groups])  # (G, B)
    observed = np.array([sum(wk * roc_auc(g.y, g.scores[a]) for wk, a in zip(weights, arms, strict=True))
                         for g in groups])  # (G,)
    n_g = len(groups)
    lo, hi = _two_stage_quantiles(per_group, rng, alpha)
    return HierarchicalCI(estimate=float(observed.mean()), lo=float(lo), hi=float(hi),
                          sd_between_groups=float(observed.std(ddof=1)) if n_g > 1 else 0.0,
                          n_groups=n_g)


def hierarchical_auc(groups: Sequence[GroupScores], arm: str, *, n_boot: int = 2000,
                     seed: int = 0, alpha: float = 0.05) -> HierarchicalCI:
    """Mean test AUC of ``arm`` over groups, with a groups-then-patients bootstrap CI."""
    return _hierarchical(groups, [arm], [1.0], n_boot=n_boot, seed=seed, alpha=alpha)


def hierarchical_delta(groups: Sequence[GroupScores], arm_a: str, arm_b: str, *,
                       n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> HierarchicalCI:
    """Mean paired AUC(a) - AUC(b) over groups, with a groups-then-patients bootstrap CI."""
    return _hierarchical(groups, [arm_a, arm_b], [1.0, -1.0], n_boot=n_boot, seed=seed,
                         alpha=alpha)


def hierarchical_mean_ci(values: Sequence[np.ndarray], *, n_boot: int = 2000, seed: int = 0,
                         alpha: float = 0.05) -> HierarchicalCI:
    """The same two-stage bootstrap for the grand mean of per-group values (any per-patient
    quantity): the simplest case, whose sampling variance is known in closed form (tests use it)."""
    if not values:
        raise ConfigError("No groups to bootstrap over.")
    rng = np.random.default_rng(seed)
    per_group = np.stack([np.asarray(v, float)[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
                          for v in values])  # (G, B)
    n_g = len(values)
    lo, hi = _two_stage_quantiles(per_group, rng, alpha)
    means = np.array([np.mean(v) for v in values])
    return HierarchicalCI(float(means.mean()), float(lo), float(hi),
                          float(means.std(ddof=1)) if n_g > 1 else 0.0, n_g)


def seeds_above_zero(groups: Sequence[GroupScores], arm_a: str, arm_b: str, *,
                     n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[int, int]:
    """(k, n): in how many of the n groups the group's own paired-bootstrap CI of
    AUC(a) - AUC(b) lies entirely above 0."""
    _check(groups, [arm_a, arm_b], alpha, n_boot)
    k = 0
    for i, g in enumerate(groups):
        _, lo, _ = paired_bootstrap_delta(g.y, g.scores[arm_a], g.scores[arm_b],
                                          n_resamples=n_boot, seed=seed + i, alpha=alpha)
        k += lo > 0
    return k, len(groups)


# ----------------------------------------------------------------------------- operating points


@dataclass(frozen=True)
class OperatingPoint:
    """Test metrics at a threshold fixed on validation; PPV/NPV at a stated prevalence."""

    threshold: float
    target_sensitivity: float
    sensitivity: float  # on test
    specificity: float  # on test
    prevalence: float  # the prevalence PPV/NPV are computed for (not the test split's)
    ppv: float
    npv: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def _check_prevalence(prevalence: float) -> None:
    if not 0.0 < prevalence < 1.0:
        raise ConfigError(f"prevalence must lie in (0, 1), got {prevalence}; real CTPA referrals "
                          "are 0.05-0.15 positive.")


def operating_point(y_val, s_val, y_test, s_test, *, target_sensitivity: float = 0.95,
                    prevalence: float = 0.10) -> OperatingPoint:
    """Rule-out operating point: the highest validation threshold whose validation sensitivity
    is >= ``target_sensitivity``, applied to test; PPV and NPV by Bayes' rule at ``prevalence``
    (the phantom's ~43 % positives are far above real referral populations)."""
    _check_prevalence(prevalence)
    if not 0.0 < target_sensitivity <= 1.0:
        raise ConfigError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}.")
    yv, sv = np.asarray(y_val), np.asarray(s_val, float)
    yt, st = np.asarray(y_test), np.asarray(s_test, float)
    for name, y in (("validation", yv), ("test", yt)):
        if y.min() == y.max():
            raise ConfigError(f"The {name} labels hold one class: no operating point.")
    pos = np.sort(sv[yv == 1])[::-1]  # positives' scores, high to low
    # flag score >= t; keeping ceil(target * n_pos) positives above t meets the target
    need = int(np.ceil(target_sensitivity * pos.size - 1e-9))
    thr = float(pos[max(need, 1) - 1])
    flag = st >= thr
    sens = float(flag[yt == 1].mean())
    spec = float((~flag[yt == 0]).mean())
    p = prevalence
    tp, fp = sens * p, (1 - spec) * (1 - p)
    tn, fn = spec * (1 - p), (1 - sens) * p
    return OperatingPoint(threshold=thr, target_sensitivity=target_sensitivity, sensitivity=sens,
                          specificity=spec, prevalence=p,
                          ppv=float(tp / (tp + fp)) if tp + fp > 0 else float("nan"),
                          npv=float(tn / (tn + fn)) if tn + fn > 0 else float("nan"))


def decision_curve(y, prob, thresholds: Sequence[float] | np.ndarray | None = None, *,
                   prevalence: float | None = None) -> dict[str, np.ndarray]:
    """Net benefit of treating when ``prob >= pt`` for each threshold probability pt, with the
    treat-all and treat-none references (Vickers & Elkin 2006). With ``prevalence`` set, the
    benefit is re-weighted to that prevalence: NB = sens*pi - (1-spec)*(1-pi)*pt/(1-pt)."""
    y, prob = np.asarray(y), np.asarray(prob, float)
    if prob.min() < 0 or prob.max() > 1:
        raise ConfigError("decision_curve needs probabilities in [0, 1] (calibrate the scores).")
    pts = np.linspace(0.01, 0.5, 50) if thresholds is None else np.asarray(thresholds, float)
    if ((pts <= 0) | (pts >= 1)).any():
        raise ConfigError("Decision-curve thresholds must lie in (0, 1).")
    pi = float(y.mean()) if prevalence is None else prevalence
    if prevalence is not None:
        _check_prevalence(prevalence)
    odds = pts / (1 - pts)  # (T,)
    flag = prob[None, :] >= pts[:, None]  # (T, n)
    sens = flag[:, y == 1].mean(1)
    fpr = flag[:, y == 0].mean(1)
    return {"threshold": pts, "model": sens * pi - fpr * (1 - pi) * odds,
            "treat_all": pi - (1 - pi) * odds, "treat_none": np.zeros_like(pts)}


# ----------------------------------------------------------------------------- verdicts


def verdict(arm_a: str, arm_b: str, ci: HierarchicalCI, above: tuple[int, int], *,
            label_fraction: float, margin: float = 0.0) -> str:
    """One sentence from the numbers: which arm wins at this label fraction, by how much, how
    sure (the hierarchical CI) and how often (groups whose own CI is above 0)."""
    k, n = above
    frac = f"{label_fraction:.0%} labels"
    nums = f"{ci.estimate:+.3f} [{ci.lo:+.3f}, {ci.hi:+.3f}], {k}/{n} seeds"
    if ci.lo > margin:
        return f"{arm_a} beats {arm_b} at {frac}: {nums}"
    if ci.hi < -margin:
        return f"{arm_a} is worse than {arm_b} at {frac}: {nums}"
    return f"no clear difference between {arm_a} and {arm_b} at {frac}: {nums}"
