"""Hierarchical bootstrap, operating points, decision curves and verdicts (embedstore.experiment_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from embedstore.errors import ConfigError
from embedstore.experiment_stats import (
    GroupScores,
    decision_curve,
    hierarchical_auc,
    hierarchical_delta,
    hierarchical_mean_ci,
    operating_point,
    seeds_above_zero,
    verdict,
)
from embedstore.metrics import roc_auc


def _groups(n_groups: int, n: int, *, shift: float, seed_sd: float, rng) -> list[GroupScores]:
    """Binormal scores: arm 'a' separates classes by 1 + group effect, 'b' by 1 + shift less."""
    out = []
    for _ in range(n_groups):
        y = (rng.random(n) < 0.4).astype(int)
        eff = rng.normal(0, seed_sd)
        a = rng.normal(0, 1, n) + y * (1.0 + eff)
        b = rng.normal(0, 1, n) + y * (1.0 + eff - shift)
        out.append(GroupScores(y=y, scores={"a": a, "b": b}))
    return out


def test_mean_ci_covers_the_true_mean_at_about_the_nominal_rate():
    # two-level model with known truth: value = mu + group effect (sd 0.3) + patient noise (sd 1);
    # the grand mean over G groups has variance 0.3^2/G + 1/(G n)
    rng = np.random.default_rng(123)
    mu, g, n, sims = 0.5, 8, 60, 300
    hits, widths = 0, []
    for _ in range(sims):
        values = [mu + rng.normal(0, 0.3) + rng.normal(0, 1, n) for _ in range(g)]
        ci = hierarchical_mean_ci(values, n_boot=400, seed=int(rng.integers(1 << 30)))
        hits += ci.lo <= mu <= ci.hi
        widths.append(ci.hi - ci.lo)
    coverage = hits / sims
    true_sd = np.sqrt(0.3**2 / g + 1 / (g * n))
    assert 0.88 <= coverage <= 0.995, coverage
    # the width tracks the true sampling sd (2 * 1.96 sd for a 95 % interval) within 30 %
    assert np.median(widths) == pytest.approx(2 * 1.96 * true_sd, rel=0.3)


def test_mean_ci_ignoring_the_group_level_would_undercover():
    # the same data with the groups pooled into one: the CI then misses the group variance, which
    # is what the hierarchical version exists to include
    rng = np.random.default_rng(7)
    mu, g, n, sims = 0.0, 6, 80, 200
    hier = pooled = 0
    for _ in range(sims):
        values = [mu + rng.normal(0, 0.5) + rng.normal(0, 1, n) for _ in range(g)]
        h = hierarchical_mean_ci(values, n_boot=300, seed=1)
        p = hierarchical_mean_ci([np.concatenate(values)], n_boot=300, seed=1)
        hier += h.lo <= mu <= h.hi
        pooled += p.lo <= mu <= p.hi
    assert hier / sims > 0.88
    assert pooled / sims < 0.75


def test_estimate_is_the_mean_of_the_groups_aucs():
    rng = np.random.default_rng(0)
    gs = _groups(4, 120, shift=0.3, seed_sd=0.1, rng=rng)
    ci = hierarchical_auc(gs, "a", n_boot=200)
    assert ci.estimate == pytest.approx(np.mean([roc_auc(g.y, g.scores["a"]) for g in gs]))
    assert ci.lo < ci.estimate < ci.hi and ci.n_groups == 4
    d = hierarchical_delta(gs, "a", "b", n_boot=200)
    assert d.estimate == pytest.approx(np.mean(
        [roc_auc(g.y, g.scores["a"]) - roc_auc(g.y, g.scores["b"]) for g in gs]))


def test_paired_delta_uses_the_same_patients_for_both_arms():
    # identical arms: every paired resample gives exactly 0; unpaired resampling would not
    rng = np.random.default_rng(1)
    gs = [GroupScores(y=g.y, scores={"a": g.scores["a"], "b": g.scores["a"].copy()})
          for g in _groups(3, 100, shift=0.0, seed_sd=0.0, rng=rng)]
    d = hierarchical_delta(gs, "a", "b", n_boot=200)
    assert (d.estimate, d.lo, d.hi) == (0.0, 0.0, 0.0)


def test_group_variation_widens_the_interval():
    rng = np.random.default_rng(2)
    calm = hierarchical_auc(_groups(6, 150, shift=0, seed_sd=0.0, rng=rng), "a", n_boot=500)
    wild = hierarchical_auc(_groups(6, 150, shift=0, seed_sd=0.8, rng=rng), "a", n_boot=500)
    assert wild.hi - wild.lo > 1.5 * (calm.hi - calm.lo)
    assert wild.sd_between_groups > calm.sd_between_groups


def test_seeds_above_zero_counts_groups_whose_own_ci_excludes_zero():
    rng = np.random.default_rng(3)
    clear = _groups(4, 300, shift=0.9, seed_sd=0.0, rng=rng)
    assert seeds_above_zero(clear, "a", "b", n_boot=300) == (4, 4)
    assert seeds_above_zero(clear, "b", "a", n_boot=300) == (0, 4)


def test_operating_point_meets_the_target_on_validation_and_applies_bayes():
    rng = np.random.default_rng(4)
    yv = (rng.random(400) < 0.4).astype(int)
    sv = rng.normal(0, 1, 400) + 1.5 * yv
    yt = (rng.random(400) < 0.4).astype(int)
    st = rng.normal(0, 1, 400) + 1.5 * yt
    op = operating_point(yv, sv, yt, st, target_sensitivity=0.95, prevalence=0.10)
    # the threshold is chosen on validation: validation sensitivity reaches the target, and the
    # next-higher positive score would not
    assert (sv[yv == 1] >= op.threshold).mean() >= 0.95
    higher = np.sort(sv[yv == 1])
    higher = higher[higher > op.threshold]
    assert ((sv[yv == 1] >= higher[0]).mean() < 0.95) if higher.size else True
    assert op.sensitivity == pytest.approx((st[yt == 1] >= op.threshold).mean())
    assert op.specificity == pytest.approx((st[yt == 0] < op.threshold).mean())
    s, c, p = op.sensitivity, op.specificity, 0.10
    assert op.ppv == pytest.approx(s * p / (s * p + (1 - c) * (1 - p)))
    assert op.npv == pytest.approx(c * (1 - p) / (c * (1 - p) + (1 - s) * p))
    # a lower prevalence raises the NPV of the same rule
    assert operating_point(yv, sv, yt, st, prevalence=0.05).npv > op.npv


def test_decision_curve_references():
    y = np.array([0, 0, 0, 1, 1])
    perfect = decision_curve(y, y.astype(float), [0.1, 0.3])
    np.testing.assert_allclose(perfect["model"], [0.4, 0.4])  # perfect: NB = prevalence
    np.testing.assert_allclose(perfect["treat_all"], [0.4 - 0.6 / 9, 0.4 - 0.6 * 3 / 7])
    re = decision_curve(y, y.astype(float), [0.2], prevalence=0.1)
    np.testing.assert_allclose(re["model"], [0.1])
    np.testing.assert_allclose(re["treat_all"], [0.1 - 0.9 * 0.25])
    with pytest.raises(ConfigError, match="probabilities"):
        decision_curve(y, np.array([0, 2.0, 0, 1, 1]))


def test_verdict_lines_follow_the_numbers():
    from embedstore.experiment_stats import HierarchicalCI

    up = HierarchicalCI(0.10, 0.07, 0.13, 0.02, 10)
    assert verdict("distilled", "cxr_only", up, (10, 10), label_fraction=0.25) == (
        "distilled beats cxr_only at 25% labels: +0.100 [+0.070, +0.130], 10/10 seeds")
    flat = HierarchicalCI(-0.005, -0.012, 0.002, 0.01, 10)
    assert verdict("distilled", "ridge_mean_only", flat, (0, 10), label_fraction=0.25).startswith(
        "no clear difference between distilled and ridge_mean_only")
    down = HierarchicalCI(-0.05, -0.08, -0.02, 0.01, 5)
    assert "is worse than" in verdict("a", "b", down, (0, 5), label_fraction=1.0)


def test_bad_inputs_are_config_errors():
    y = np.array([0, 1, 0, 1])
    with pytest.raises(ConfigError, match="Arm 'a' has"):
        GroupScores(y=y, scores={"a": np.zeros(3)})
    g = GroupScores(y=y, scores={"a": np.arange(4.0)})
    with pytest.raises(ConfigError, match="missing from a group"):
        hierarchical_delta([g], "a", "b")
    with pytest.raises(ConfigError, match="one class"):
        hierarchical_auc([GroupScores(y=np.zeros(4, int), scores={"a": np.arange(4.0)})], "a")
    with pytest.raises(ConfigError, match="No groups"):
        hierarchical_auc([], "a")
    with pytest.raises(ConfigError, match="prevalence"):
        operating_point(y, np.arange(4.0), y, np.arange(4.0), prevalence=0.0)
