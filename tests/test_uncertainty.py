"""The spread-vs-p(1-p) measures: each against a hand computation or a constructed case."""

from __future__ import annotations

import numpy as np
import pytest

from embedstore.uncertainty import (
    aurc,
    interval_coverage,
    partial_spearman,
    risk_coverage,
    uncertainty_report,
)


def test_partial_spearman_removes_what_the_control_explains():
    rng = np.random.default_rng(0)
    z = rng.normal(size=2000)
    x = z + 0.1 * rng.normal(size=2000)  # x only tracks z
    y = z + 0.1 * rng.normal(size=2000)
    assert abs(partial_spearman(x, y, z)) < 0.1
    w = rng.normal(size=2000)  # a shared component beyond z survives
    assert partial_spearman(x + w, y + w, z) > 0.5


def test_partial_spearman_equals_the_formula_on_ranks():
    from scipy.stats import rankdata, spearmanr

    rng = np.random.default_rng(1)
    x, y, z = rng.normal(size=(3, 300))
    r = lambda a, b: spearmanr(a, b).statistic  # noqa: E731
    want = (r(x, y) - r(x, z) * r(y, z)) / np.sqrt((1 - r(x, z) ** 2) * (1 - r(y, z) ** 2))
    assert partial_spearman(x, y, z) == pytest.approx(want, rel=1e-9)
    assert rankdata  # the ranks are scipy's (average ties)


def test_risk_coverage_by_hand():
    cov, risk = risk_coverage([0.1, 0.3, 0.2, 0.9], [0.0, 1.0, 0.0, 1.0])
    np.testing.assert_allclose(cov, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 1 / 3, 0.5])
    assert aurc([0.1, 0.3, 0.2, 0.9], [0.0, 1.0, 0.0, 1.0]) == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)


def test_aurc_orders_informative_below_uninformative_and_ties_are_neutral():
    rng = np.random.default_rng(2)
    loss = rng.random(500)
    assert aurc(loss, loss) < aurc(rng.random(500), loss) < aurc(-loss, loss)
    # a constant uncertainty ranks nothing: every coverage has the overall mean risk
    assert aurc(np.zeros(500), loss) == pytest.approx(loss.mean())


def test_interval_coverage_is_calibrated_for_draws_from_the_same_distribution():
    rng = np.random.default_rng(3)
    samples = rng.normal(size=(4000, 200))
    assert interval_coverage(samples, rng.normal(size=4000), 0.8) == pytest.approx(0.8, abs=0.03)
    assert interval_coverage(samples * 0.3, rng.normal(size=4000), 0.8) < 0.4  # too narrow
    with pytest.raises(ValueError, match="samples must be"):
        interval_coverage(samples[:, :1], np.zeros(4000))


def test_report_says_plainly_when_the_spread_adds_nothing_beyond_p():
    rng = np.random.default_rng(4)
    n = 600
    p = rng.uniform(0.02, 0.98, n)
    y = (rng.random(n) < p).astype(float)  # calibrated: p(1-p) knows how often, not which
    tracking = p * (1 - p) + 1e-3 * rng.random(n)  # a spread that only tracks p(1-p)
    rep = uncertainty_report(p, tracking, y, n_boot=200)
    assert not rep["spread_beats_pq"] and "does NOT" in rep["verdict"]
    err = np.abs(y - p)
    oracle = err + 1e-3 * rng.random(n)  # a spread that knows the error
    rep2 = uncertainty_report(p, oracle, y, n_boot=200)
    assert rep2["spread_beats_pq"] and rep2["partial_spearman_spread_given_pq"] > 0.5
    assert rep2["aurc_spread"] < rep2["aurc_pq"]


def test_platt_recalibration_on_validation_repairs_a_balanced_prior_head():
    from embedstore.metrics import expected_calibration_error, platt_apply, platt_fit

    rng = np.random.default_rng(5)

    def cohort(n):
        z = rng.normal(size=n)
        from scipy.special import expit

        y = (rng.random(n) < expit(1.5 * z - 2.0)).astype(float)  # ~15 % positive
        p_bal = expit(3.0 * z)  # overconfident and shifted to a balanced prior
        return y, p_bal

    yv, pv = cohort(3000)
    yt, pt = cohort(3000)
    a, b = platt_fit(yv, pv)
    assert a == pytest.approx(0.5, abs=0.1) and b == pytest.approx(-2.0, abs=0.2)
    before, after = expected_calibration_error(yt, pt), expected_calibration_error(yt, platt_apply(pt, (a, b)))
    assert after < 0.03 < before
    # monotone: recalibration never changes the ranking (AUC)
    assert np.all(np.diff(platt_apply(np.sort(pt), (a, b))) >= 0)
