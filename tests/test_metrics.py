"""Evaluation statistics against scikit-learn and brute-force definitions on tiny seeded data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from embedstore.errors import ConfigError
from embedstore.metrics import (
    DeLongResult,
    auprc,
    binary_metrics,
    bootstrap_auc_ci,
    delong_auc_ci,
    delong_auc_variance,
    delong_test,
    expected_calibration_error,
    paired_bootstrap_delta,
    reliability_curve,
    roc_auc,
    summarize_binary,
    youden_threshold,
)


def _data(seed: int, n: int = 120, signal: float = 1.0, ties: bool = False):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = rng.normal(size=n) + signal * y
    if ties:
        s = np.round(s * 2) / 2  # coarse grid -> many ties across classes
    return y, s


def _psi_matrix(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Kernel of the Mann-Whitney statistic: 1 if pos > neg, 1/2 on ties, 0 otherwise."""
    d = pos[:, None] - neg[None, :]
    return (d > 0) + 0.5 * (d == 0)


def _brute_delong(y, scores):
    """DeLong et al. (1988) structural components, computed from all positive/negative pairs."""
    y = np.asarray(y)
    v10 = [_psi_matrix(s[y == 1], s[y == 0]).mean(axis=1) for s in scores]
    v01 = [_psi_matrix(s[y == 1], s[y == 0]).mean(axis=0) for s in scores]
    m, n = (y == 1).sum(), (y == 0).sum()
    k = len(scores)
    cov = np.empty((k, k))
    for a in range(k):
        for b in range(k):
            s10 = np.sum((v10[a] - v10[a].mean()) * (v10[b] - v10[b].mean())) / (m - 1)
            s01 = np.sum((v01[a] - v01[a].mean()) * (v01[b] - v01[b].mean())) / (n - 1)
            cov[a, b] = s10 / m + s01 / n
    return np.array([v.mean() for v in v10]), cov


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(seed, ties):
    y, s = _data(seed, ties=ties)
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auprc(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_auc_one_class_is_an_error():
    with pytest.raises(ConfigError, match="both classes") as e:
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])
    assert e.value.reason == "one_class"
    with pytest.raises(ConfigError, match="0 or 1"):
        roc_auc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="differ in length"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ConfigError, match="NaN"):
        roc_auc([0, 1], [0.1, np.nan])


def test_perfectly_separable_gives_auc_one_and_degenerate_ci():
    y = np.array([0] * 20 + [1] * 15)
    s = np.r_[np.linspace(0, 1, 20), np.linspace(2, 3, 15)]
    assert roc_auc(y, s) == 1.0
    assert bootstrap_auc_ci(y, s, n_resamples=500, seed=3) == (1.0, 1.0)
    auc, var = delong_auc_variance(y, s)
    assert auc == 1.0 and var == 0.0


def test_random_scores_ci_covers_half():
    rng = np.random.default_rng(7)
    y = (rng.random(300) < 0.5).astype(int)
    s = rng.random(300)
    lo, hi = bootstrap_auc_ci(y, s, n_resamples=2000, seed=0)
    assert lo < 0.5 < hi
    dlo, dhi = delong_auc_ci(y, s)
    assert dlo < 0.5 < dhi
    # the two CI methods agree to within a few hundredths on 300 cases
    assert abs(lo - dlo) < 0.03 and abs(hi - dhi) < 0.03


@pytest.mark.parametrize("ties", [False, True])
def test_delong_variance_matches_structural_components(ties):
    y, s = _data(11, n=60, ties=ties)
    auc, var = delong_auc_variance(y, s)
    ref_auc, ref_cov = _brute_delong(y, [s])
    assert auc == pytest.approx(ref_auc[0], abs=1e-12)
    assert var == pytest.approx(ref_cov[0, 0], rel=1e-10)


def test_delong_known_small_case():
    # 3 positives, 2 negatives, worked by hand: psi = [[1,1],[1,.5],[0,0]]
    # V10 = [1, .75, 0], V01 = [2/3, 1/2]; AUC = 7/12
    # sample variances (ddof 1): var(V10) = 13/48, var(V01) = 1/72
    # var(AUC) = (13/48)/3 + (1/72)/2 = 7/72
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([5.0, 3.0, 0.0, 1.0, 3.0])
    auc, var = delong_auc_variance(y, s)
    assert auc == pytest.approx(7 / 12)
    assert var == pytest.approx(7 / 72)


def test_delong_paired_test_matches_brute_force():
    y, s1 = _data(5, n=80, signal=1.2)
    rng = np.random.default_rng(9)
    s2 = 0.5 * s1 + rng.normal(size=y.size)  # correlated, weaker
    res = delong_test(y, s1, s2)
    aucs, cov = _brute_delong(y, [s1, s2])
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res.delta == pytest.approx(aucs[0] - aucs[1], abs=1e-12)
    assert res.se == pytest.approx(se, rel=1e-10)
    from scipy.stats import norm

    assert res.p == pytest.approx(2 * norm.sf(abs(res.delta / se)), rel=1e-9)
    assert res.ci[0] < res.delta < res.ci[1]
    assert json.loads(json.dumps(res.to_dict()))["ci"] == list(res.ci)


def test_delong_identical_scores_p_is_one():
    y, s = _data(3)
    res = delong_test(y, s, s.copy())
    assert isinstance(res, DeLongResult)
    assert res.p == 1.0 and res.delta == 0.0 and res.z == 0.0
    # a monotone transform has the same ranks: still no difference
    assert delong_test(y, s, np.exp(s)).p == 1.0


def test_bootstrap_is_deterministic_by_seed():
    y, s = _data(4)
    a = bootstrap_auc_ci(y, s, n_resamples=300, seed=1)
    b = bootstrap_auc_ci(y, s, n_resamples=300, seed=1)
    c = bootstrap_auc_ci(y, s, n_resamples=300, seed=2)
    assert a == b
    assert a != c
    lo, hi = a
    assert lo < roc_auc(y, s) < hi
    u = bootstrap_auc_ci(y, s, n_resamples=300, seed=1, stratified=False)
    assert u != a and u[0] < u[1]


def test_bootstrap_resample_auc_matches_direct_computation():
    # the vectorised per-row AUC must equal roc_auc on the same resampled cases
    from embedstore.metrics import _auc_rows, _resample_indices

    y, s = _data(8, n=50, ties=True)
    idx = _resample_indices(np.asarray(y, dtype=np.int8), 5, np.random.default_rng(0), True)
    got = _auc_rows(np.asarray(y)[idx], s[idx])
    want = [roc_auc_score(np.asarray(y)[row], s[row]) for row in idx]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_paired_bootstrap_delta():
    y, s1 = _data(6, n=150, signal=2.0)
    rng = np.random.default_rng(0)
    s2 = rng.normal(size=y.size)  # uninformative
    delta, lo, hi = paired_bootstrap_delta(y, s1, s2, n_resamples=500, seed=0)
    assert delta == pytest.approx(roc_auc(y, s1) - roc_auc(y, s2))
    assert 0 < lo < delta < hi
    assert paired_bootstrap_delta(y, s1, s2, n_resamples=500, seed=0) == (delta, lo, hi)
    d0, lo0, hi0 = paired_bootstrap_delta(y, s1, s1, n_resamples=100, seed=0)
    assert (d0, lo0, hi0) == (0.0, 0.0, 0.0)


def test_youden_threshold_matches_sklearn_roc_curve():
    for seed in range(5):
        y, s = _data(seed, ties=seed % 2 == 1)
        fpr, tpr, thr = roc_curve(y, s)
        assert youden_threshold(y, s) == thr[int(np.argmax(tpr - fpr))]


def test_threshold_is_chosen_on_validation_only():
    y_val, s_val = _data(21, n=100, signal=1.5)
    s_val = s_val + 3.0  # validation scores live on a shifted scale
    y_test, s_test = _data(22, n=100, signal=1.5)
    t_val = youden_threshold(y_val, s_val)
    t_test = youden_threshold(y_test, s_test)
    assert abs(t_val - t_test) > 1.0
    out = summarize_binary(y_test, s_test, y_val=y_val, s_val=s_val, n_resamples=200, seed=0)
    assert out["threshold"] == t_val
    at_val = binary_metrics(y_test, s_test, t_val)
    assert out["sensitivity"] == at_val["sensitivity"]
    assert out["specificity"] == at_val["specificity"]
    assert out["accuracy"] == at_val["accuracy"]
    # changing the test scores must not move the threshold
    out2 = summarize_binary(y_test, s_test * 2, y_val=y_val, s_val=s_val, n_resamples=200, seed=0)
    assert out2["threshold"] == t_val


def test_binary_metrics_counts():
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    s = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.6])
    m = binary_metrics(y, s, 0.6)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 2, 2)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(2 / 4)
    assert m["ppv"] == pytest.approx(2 / 4)
    assert m["npv"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert math.isnan(binary_metrics(y, s, 5.0)["ppv"])  # nothing called positive


def test_ece_small_for_calibrated_and_large_for_overconfident():
    rng = np.random.default_rng(0)
    p = rng.random(20000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(y, p) < 0.02
    over = np.where(p > 0.5, 0.99, 0.01)  # same ranking, overconfident
    assert expected_calibration_error(y, over) > 0.2
    with pytest.raises(ConfigError, match="sigmoid"):
        expected_calibration_error(y, p * 3)


def test_reliability_curve_bins():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.05, 0.05, 0.55, 0.55, 1.0])
    mid, frac, count = reliability_curve(y, p, n_bins=2)
    np.testing.assert_allclose(mid, [0.25, 0.75])
    np.testing.assert_array_equal(count, [2, 3])
    np.testing.assert_allclose(frac, [0.5, 2 / 3])
    mid, frac, count = reliability_curve(y, p, n_bins=10)
    assert count.sum() == 5 and count[-1] == 1 and np.isnan(frac[3])


def test_summarize_binary_is_json_and_consistent():
    y_val, s_val = _data(30)
    y, s = _data(31)
    out = summarize_binary(y, s, y_val=y_val, s_val=s_val, n_resamples=300, seed=0)
    assert json.loads(json.dumps(out)) == out
    assert out["auc"] == pytest.approx(roc_auc_score(y, s))
    assert out["auc_ci"][0] < out["auc"] < out["auc_ci"][1]
    assert out["auc_delong_ci"][0] < out["auc"] < out["auc_delong_ci"][1]
    assert out["n"] == y.size and out["n_pos"] == int(y.sum())
    assert out["score_kind"] == "logit"  # normal scores leave [0, 1]
    assert 0 <= out["ece"] <= 1
    with pytest.raises(ConfigError, match="validation"):
        summarize_binary(y, s, y_val=np.zeros(10), s_val=np.arange(10.0), n_resamples=10)
