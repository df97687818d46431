"""Patient-clustered bootstrap: exact weighted AUC, and its spread against a known variance."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from embedstore.errors import ConfigError
from embedstore.metrics import (
    _weighted_auc_rows,
    cluster_bootstrap_aucs,
    cluster_paired_bootstrap_delta,
    delong_auc_variance,
)


def _data(n=120, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = np.round(y * 0.8 + rng.normal(size=n), 1)  # rounding makes ties
    return y, s


def test_weighted_auc_equals_auc_of_repeated_cases():
    y, s = _data()
    rng = np.random.default_rng(1)
    w = rng.integers(0, 3, size=(4, y.size)).astype(float)
    got = _weighted_auc_rows(y, s, w)
    for b in range(4):
        idx = np.repeat(np.arange(y.size), w[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


def test_clustered_spread_matches_patient_level_variance_not_case_level():
    # Every patient contributes m identical cases: the patient-level AUC variance (DeLong on one
    # case per patient) is the truth; a case bootstrap would be ~sqrt(m) too narrow.
    y, s = _data(n=200, seed=2)
    m = 4
    yy, ss = np.repeat(y, m), np.repeat(s, m)
    groups = np.repeat(np.arange(y.size), m)
    _, var = delong_auc_variance(y, s)
    aucs = cluster_bootstrap_aucs(yy, [ss], groups, n_resamples=3000, seed=0)[0]
    sd = np.nanstd(aucs)
    assert sd == pytest.approx(np.sqrt(var), rel=0.15)
    _, var_cases = delong_auc_variance(yy, ss)  # treats the 4 copies as independent
    assert sd > 1.6 * np.sqrt(var_cases)


def test_paired_delta_and_bad_groups():
    y, s = _data()
    groups = np.arange(y.size) // 2
    d, lo, hi = cluster_paired_bootstrap_delta(y, s + 0.0, s, groups, n_resamples=200)
    assert (d, lo, hi) == (0.0, 0.0, 0.0)
    rng = np.random.default_rng(3)
    better = s + 2.0 * y + rng.normal(scale=0.1, size=y.size)
    d, lo, hi = cluster_paired_bootstrap_delta(y, better, s, groups, n_resamples=200)
    assert 0 < lo <= d <= hi
    with pytest.raises(ConfigError, match="one patient id per case"):
        cluster_bootstrap_aucs(y, [s], groups[:-1])
