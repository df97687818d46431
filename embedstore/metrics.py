"""Binary-classification statistics for the evaluation table (numpy/scipy only).

Conventions: ``y`` holds 0/1 labels (1 = PE present), ``s`` any real-valued score where larger
means "more likely positive". AUC treats ties as half-concordant (Mann-Whitney U), which is what
``sklearn.metrics.roc_auc_score`` computes. A threshold ``t`` calls a case positive when
``s >= t``. Thresholds are chosen on the validation split only; the test split is only scored.

References: DeLong, DeLong & Clarke-Pearson (1988) for the variance of correlated AUCs;
Sun & Xu (2014) for the midrank ("fast DeLong") computation used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import special, stats

from embedstore.errors import ConfigError

__all__ = [
    "DeLongResult",
    "roc_auc",
    "roc_curve_points",
    "delong_auc_variance",
    "delong_auc_ci",
    "delong_test",
    "bootstrap_auc_ci",
    "paired_bootstrap_delta",
    "cluster_bootstrap_aucs",
    "cluster_bootstrap_auc_ci",
    "cluster_paired_bootstrap_delta",
    "youden_threshold",
    "binary_metrics",
    "auprc",
    "expected_calibration_error",
    "platt_fit",
    "platt_apply",
    "reliability_curve",
    "summarize_binary",
]

_BOOT_CHUNK_ELEMS = 4_000_000  # resamples x cases per vectorised chunk (~32 MB of float64)


# ----------------------------------------------------------------------------- validation


def _labels_scores(y, s, *, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    s = np.asarray(s, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ConfigError(
            f"Labels and {name} must be 1-D arrays, got shapes {y.shape} and {s.shape}.",
            reason="bad_shape",
        )
    if y.shape[0] != s.shape[0]:
        raise ConfigError(
            f"Labels and {name} differ in length ({y.shape[0]} vs {s.shape[0]}); pass one score per "
            "labelled case.",
            reason="bad_shape",
        )
    if y.size and not np.all((y == 0) | (y == 1)):
        bad = sorted({v.item() if hasattr(v, "item") else v for v in np.unique(y)} - {0, 1})[:5]
        raise ConfigError(
            f"Labels must be 0 or 1, found {bad}; drop unlabelled cases before scoring.",
            reason="bad_labels",
        )
    if not np.all(np.isfinite(s)):
        n_bad = int(np.sum(~np.isfinite(s)))
        raise ConfigError(
            f"{n_bad} of {s.size} {name} are NaN or infinite; fix the model outputs before scoring.",
            reason="bad_scores",
        )
    return y.astype(np.int8), s


def _require_both_classes(y: np.ndarray, what: str = "AUC") -> tuple[int, int]:
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ConfigError(
            f"{what} needs both classes, got {n_pos} positive and {n_neg} negative cases; "
            "evaluate on a split that contains both.",
            reason="one_class",
        )
    return n_pos, n_neg


def _check_probabilities(p: np.ndarray) -> None:
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ConfigError(
            f"Calibration needs probabilities in [0, 1], got values in [{p.min():.4g}, {p.max():.4g}]; "
            "apply a sigmoid to logits first.",
            reason="bad_scores",
        )


# ----------------------------------------------------------------------------- AUC


def roc_auc(y, s) -> float:
    """Area under the ROC curve, ties counted as 1/2 (Mann-Whitney U / (n_pos * n_neg))."""
    y, s = _labels_scores(y, s)
    n_pos, n_neg = _require_both_classes(y)
    ranks = stats.rankdata(s)  # midranks handle ties
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve_points(y, s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, from (0, 0) to (1, 1); thresholds descend."""
    y, s = _labels_scores(y, s)
    n_pos, n_neg = _require_both_classes(y, "A ROC curve")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each run of equal scores: a threshold there includes the whole tie group
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thresholds = np.r_[np.inf, s_sorted[last]]
    return fpr, tpr, thresholds


def _placements(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong structural components: V10 per positive, V01 per negative (midrank form)."""
    pos, neg = s[y == 1], s[y == 0]
    m, n = pos.size, neg.size
    tz = stats.rankdata(np.r_[pos, neg])  # (m + n,) ranks in the pooled sample
    tx = stats.rankdata(pos)  # (m,) ranks among positives
    ty = stats.rankdata(neg)  # (n,) ranks among negatives
    v10 = (tz[:m] - tx) / n  # (m,) fraction of negatives below each positive (+1/2 ties)
    v01 = 1.0 - (tz[m:] - ty) / m  # (n,) fraction of positives above each negative
    return v10, v01


def _delong_cov(y: np.ndarray, scores: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """AUCs (K,) and their DeLong covariance (K, K) for K score vectors on the same cases."""
    comps = [_placements(y, s) for s in scores]
    v10 = np.stack([c[0] for c in comps])  # (K, m)
    v01 = np.stack([c[1] for c in comps])  # (K, n)
    aucs = v10.mean(axis=1)  # (K,)
    m, n = v10.shape[1], v01.shape[1]
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(scores), len(scores)))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(scores), len(scores)))
    return aucs, s10 / m + s01 / n


def delong_auc_variance(y, s) -> tuple[float, float]:
    """(auc, variance) of one AUC by DeLong's method."""
    y, s = _labels_scores(y, s)
    _require_both_classes(y)
    aucs, cov = _delong_cov(y, [s])
    return float(aucs[0]), float(cov[0, 0])


def delong_auc_ci(y, s, *, alpha: float = 0.05) -> tuple[float, float]:
    """Normal-approximation CI of one AUC from the DeLong variance, clipped to [0, 1]."""
    auc, var = delong_auc_variance(y, s)
    half = stats.norm.ppf(1 - alpha / 2) * math.sqrt(max(var, 0.0))
    return max(0.0, auc - half), min(1.0, auc + half)


@dataclass(frozen=True)
class DeLongResult:
    """Paired DeLong comparison of two scores on the same cases (delta = auc1 - auc2)."""

    auc1: float
    auc2: float
    delta: float
    se: float
    z: float
    p: float
    ci: tuple[float, float]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def delong_test(y, s1, s2, *, alpha: float = 0.05) -> DeLongResult:
    """Two-sided DeLong test of H0: AUC(s1) == AUC(s2), scores paired on the same cases."""
    y, s1 = _labels_scores(y, s1, name="scores s1")
    _, s2 = _labels_scores(y, s2, name="scores s2")
    _require_both_classes(y)
    aucs, cov = _delong_cov(y, [s1, s2])
    delta = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-15:
        # identical (or rank-identical) scores: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = delta / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = stats.norm.ppf(1 - alpha / 2) * se
    return DeLongResult(
        auc1=float(aucs[0]),
        auc2=float(aucs[1]),
        delta=delta,
        se=se,
        z=float(z),
        p=min(1.0, p),
        ci=(delta - half, delta + half),
    )


# ----------------------------------------------------------------------------- bootstrap


def _auc_rows(y_rows: np.ndarray, s_rows: np.ndarray) -> np.ndarray:
    """AUC of each row of (B, n) label / score matrices; NaN where a row holds one class."""
    n_pos = y_rows.sum(axis=1)  # (B,)
    n_neg = y_rows.shape[1] - n_pos  # (B,)
    ranks = stats.rankdata(s_rows, axis=1)  # (B, n) midranks per resample
    u = (ranks * y_rows).sum(axis=1) - n_pos * (n_pos + 1) / 2.0  # (B,)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc


def _resample_indices(
    y: np.ndarray, n_resamples: int, rng: np.random.Generator, stratified: bool
) -> np.ndarray:
    """(B, n) bootstrap index matrix; stratified keeps the positive/negative counts fixed."""
    n = y.size
    if not stratified:
        return rng.integers(0, n, size=(n_resamples, n))
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    ip = pos[rng.integers(0, pos.size, size=(n_resamples, pos.size))]  # (B, m)
    ineg = neg[rng.integers(0, neg.size, size=(n_resamples, neg.size))]  # (B, n - m)
    return np.concatenate([ip, ineg], axis=1)


def _bootstrap_aucs(
    y: np.ndarray,
    scores: Sequence[np.ndarray],
    *,
    n_resamples: int,
    seed: int,
    stratified: bool,
) -> np.ndarray:
    """(K, B) bootstrap AUCs for K paired score vectors (same resampled cases for all K)."""
    if n_resamples < 1:
        raise ConfigError(
            f"n_resamples must be a positive integer, got {n_resamples}.", reason="bad_config"
        )
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(1, y.size))
    out = np.empty((len(scores), n_resamples))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        idx = _resample_indices(y, b, rng, stratified)  # (b, n)
        y_rows = y[idx]
        for k, s in enumerate(scores):
            out[k, start : start + b] = _auc_rows(y_rows, s[idx])
    return out


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}; use 0.05 for a 95 % CI.")


def bootstrap_auc_ci(
    y,
    s,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the AUC (seeded; stratified keeps class counts per resample).

    Unstratified resamples that draw a single class are dropped (their AUC is undefined)."""
    y, s = _labels_scores(y, s)
    _require_both_classes(y)
    _check_alpha(alpha)
    aucs = _bootstrap_aucs(y, [s], n_resamples=n_resamples, seed=seed, stratified=stratified)[0]
    aucs = aucs[np.isfinite(aucs)]
    if aucs.size == 0:
        raise ConfigError(
            "Every bootstrap resample drew a single class; use stratified=True.",
            reason="one_class",
        )
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_bootstrap_delta(
    y,
    s1,
    s2,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    stratified: bool = True,
) -> tuple[float, float, float]:
    """(delta, lo, hi): AUC(s1) - AUC(s2) on all cases and its paired percentile bootstrap CI."""
    y, s1 = _labels_scores(y, s1, name="scores s1")
    _, s2 = _labels_scores(y, s2, name="scores s2")
    _require_both_classes(y)
    _check_alpha(alpha)
    aucs = _bootstrap_aucs(y, [s1, s2], n_resamples=n_resamples, seed=seed, stratified=stratified)
    deltas = aucs[0] - aucs[1]
    deltas = deltas[np.isfinite(deltas)]
    delta = roc_auc(y, s1) - roc_auc(y, s2)
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return float(delta), float(lo), float(hi)


# ----------------------------------------------------------------------------- patient-clustered


def _weighted_auc_rows(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUC of one score vector under each row of a (B, n) case-weight matrix (ties count half).

    A weight is how many times the case was drawn, so integer weights give exactly the AUC of
    the resample with the cases repeated; NaN where a row has no weight on one class."""
    from scipy import sparse

    uniq, inv = np.unique(s, return_inverse=True)  # scores -> sorted distinct values
    n = s.size
    onehot = sparse.csr_matrix((np.ones(n), (np.arange(n), inv)), shape=(n, uniq.size))
    pos = (y == 1).astype(float)
    w_pos = np.asarray((onehot.T @ (w * pos).T).T)  # (B, U) positive weight per distinct score
    w_neg = np.asarray((onehot.T @ (w * (1.0 - pos)).T).T)  # (B, U)
    below = np.cumsum(w_neg, axis=1) - w_neg  # negative weight strictly below each value
    u = (w_pos * (below + 0.5 * w_neg)).sum(axis=1)
    tot_p, tot_n = w_pos.sum(axis=1), w_neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = u / (tot_p * tot_n)
    auc[(tot_p == 0) | (tot_n == 0)] = np.nan
    return auc


def cluster_bootstrap_aucs(
    y, scores: Sequence, groups, *, n_resamples: int = 2000, seed: int = 0
) -> np.ndarray:
    """(K, B) bootstrap AUCs resampling PATIENTS (``groups``: one id per case), not cases.

    Each resample draws as many patients as there are, with replacement, and keeps every case
    of a drawn patient (as often as it was drawn); all K score vectors share the resamples.
    Use it when a patient contributes more than one case: a case bootstrap then treats
    correlated cases as independent and its interval is too narrow."""
    y, s0 = _labels_scores(y, scores[0], name="scores")
    ss = [s0] + [_labels_scores(y, s, name="scores")[1] for s in scores[1:]]
    g = np.asarray(groups)
    if g.ndim != 1 or g.size != y.size:
        raise ConfigError(
            f"groups must hold one patient id per case ({y.size}), got shape {g.shape}; "
            "pass the patient (or CTPA) id column of the scored rows.",
            reason="bad_config",
        )
    if n_resamples < 1:
        raise ConfigError(
            f"n_resamples must be a positive integer, got {n_resamples}.", reason="bad_config"
        )
    _require_both_classes(y)
    _, cluster = np.unique(g, return_inverse=True)
    n_groups = int(cluster.max()) + 1
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOT_CHUNK_ELEMS // max(1, y.size))
    out = np.empty((len(ss), n_resamples))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        draws = rng.integers(0, n_groups, size=(b, n_groups))
        offs = draws + (np.arange(b) * n_groups)[:, None]
        counts = np.bincount(offs.ravel(), minlength=b * n_groups).reshape(b, n_groups)
        w = counts[:, cluster].astype(float)  # (b, n) times each case was drawn
        for k, s in enumerate(ss):
            out[k, start : start + b] = _weighted_auc_rows(y, s, w)
    return out


def cluster_bootstrap_auc_ci(
    y, s, groups, *, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile CI of the AUC from the patient-clustered bootstrap (one-class draws dropped)."""
    _check_alpha(alpha)
    aucs = cluster_bootstrap_aucs(y, [s], groups, n_resamples=n_resamples, seed=seed)[0]
    aucs = aucs[np.isfinite(aucs)]
    if aucs.size == 0:
        raise ConfigError(
            "Every patient resample drew a single class; there are too few patients.",
            reason="one_class",
        )
    lo, hi = np.quantile(aucs, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def cluster_paired_bootstrap_delta(
    y, s1, s2, groups, *, n_resamples: int = 2000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """(delta, lo, hi): AUC(s1) - AUC(s2) and its patient-clustered paired bootstrap CI."""
    _check_alpha(alpha)
    aucs = cluster_bootstrap_aucs(y, [s1, s2], groups, n_resamples=n_resamples, seed=seed)
    deltas = aucs[0] - aucs[1]
    deltas = deltas[np.isfinite(deltas)]
    delta = roc_auc(y, s1) - roc_auc(y, s2)
    lo, hi = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return float(delta), float(lo), float(hi)


# ----------------------------------------------------------------------------- operating point


def youden_threshold(y_val, s_val) -> float:
    """Threshold maximising sensitivity + specificity - 1 on the validation split.

    The threshold is an observed validation score and cases with ``s >= threshold`` are positive;
    among equally good thresholds the highest is taken (sklearn ``roc_curve`` + ``argmax``)."""
    fpr, tpr, thr = roc_curve_points(y_val, s_val)
    j = tpr[1:] - fpr[1:]  # skip the +inf start point: it calls nothing positive
    return float(thr[1:][int(np.argmax(j))])


def binary_metrics(y, s, threshold: float) -> dict:
    """Confusion counts and rates at ``s >= threshold``; a rate with an empty denominator is NaN."""
    y, s = _labels_scores(y, s)
    if not math.isfinite(float(threshold)):
        raise ConfigError(f"threshold must be a finite number, got {threshold}.")
    pred = s >= threshold
    pos = y == 1
    tp = int(np.sum(pred & pos))
    fp = int(np.sum(pred & ~pos))
    tn = int(np.sum(~pred & ~pos))
    fn = int(np.sum(~pred & pos))

    def _ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def auprc(y, s) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    y, s = _labels_scores(y, s)
    _require_both_classes(y, "AUPRC")
    fpr, tpr, _ = roc_curve_points(y, s)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    tp = tpr[1:] * n_pos
    fp = fpr[1:] * n_neg
    precision = tp / (tp + fp)
    recall_steps = np.diff(tpr)  # (T,) recall gained at each threshold
    return float(np.sum(recall_steps * precision))


# ----------------------------------------------------------------------------- calibration


def reliability_curve(y, p, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bin_mid, frac_pos, count) over ``n_bins`` equal-width bins of [0, 1].

    ``frac_pos`` is NaN for empty bins; p == 1 falls in the last bin."""
    y, p = _labels_scores(y, p, name="probabilities")
    _check_probabilities(p)
    if n_bins < 1:
        raise ConfigError(f"n_bins must be a positive integer, got {n_bins}.")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)  # (N,) bin per case
    count = np.bincount(which, minlength=n_bins)
    pos = np.bincount(which, weights=y.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(count > 0, pos / np.maximum(count, 1), np.nan)
    mid = (edges[:-1] + edges[1:]) / 2
    return mid, frac, count


def expected_calibration_error(y, p, n_bins: int = 10) -> float:
    """ECE: count-weighted mean |mean predicted probability - observed frequency| over bins."""
    y, p = _labels_scores(y, p, name="probabilities")
    _check_probabilities(p)
    if y.size == 0:
        raise ConfigError("Calibration needs at least one case, got none.", reason="empty")
    _, frac, count = reliability_curve(y, p, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    conf = np.bincount(which, weights=p, minlength=n_bins)
    mask = count > 0
    gap = np.abs(conf[mask] / count[mask] - frac[mask])
    return float(np.sum(gap * count[mask]) / y.size)


def _expit(x: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(x)


def _logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return np.log(q) - np.log1p(-q)


def platt_fit(y_val, p_val, *, l2: float = 1e-6, max_iter: int = 100) -> tuple[float, float]:
    """Platt scaling fitted on validation: (a, b) with p' = sigmoid(a * logit(p) + b).

    Newton's method on the (barely) L2-penalised logistic log-likelihood; a head trained with
    ``pos_weight`` is calibrated to a balanced prior, and this maps it back to the cohort's."""
    y, p = _labels_scores(y_val, p_val, name="probabilities")
    _check_probabilities(p)
    _require_both_classes(y, "Platt scaling")
    x = np.stack([_logit(p), np.ones_like(p)], axis=1)  # (N, 2)

    def nll(w: np.ndarray) -> float:  # log(1 + e^z) - y z, stably, plus the tiny L2 term
        z = x @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w))

    w = np.array([0.0, float(_logit(np.array([y.mean()]))[0])])  # start: the base rate
    f = nll(w)
    for _ in range(max_iter):
        q = _expit(x @ w)
        grad = x.T @ (q - y) + l2 * w
        hess = (x * (q * (1 - q))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while nll(w - t * step) > f and t > 1e-8:  # damped Newton: never increase the loss
            t *= 0.5
        w, f = w - t * step, nll(w - t * step)
        if np.max(np.abs(t * step)) < 1e-10:
            break
    return float(w[0]), float(w[1])


def platt_apply(p, ab: tuple[float, float]) -> np.ndarray:
    """Recalibrated probabilities sigmoid(a * logit(p) + b)."""
    pv = np.asarray(p, dtype=np.float64)
    return _expit(ab[0] * _logit(pv) + ab[1])


# ----------------------------------------------------------------------------- summary


def _as_probabilities(s: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    if kind not in ("auto", "probability", "logit"):
        raise ConfigError(
            f"Unknown score kind {kind!r}. Available: 'auto', 'probability', 'logit'.",
            reason="bad_config",
        )
    if kind == "auto":
        kind = "probability" if s.size and s.min() >= 0.0 and s.max() <= 1.0 else "logit"
    return (s if kind == "probability" else special.expit(s)), kind


def summarize_binary(
    y_test,
    s_test,
    *,
    y_val,
    s_val,
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    n_bins: int = 10,
    score_kind: str = "auto",
) -> dict:
    """The evaluation-table row of one model: test metrics at the validation-Youden threshold.

    ``score_kind`` says whether scores are probabilities or logits (for ECE only; AUC and the
    threshold are rank/score based). ``auto`` treats scores inside [0, 1] as probabilities.
    Returns plain floats/ints/lists so the dict is JSON-serialisable as is."""
    y_test, s_test = _labels_scores(y_test, s_test, name="test scores")
    y_val, s_val = _labels_scores(y_val, s_val, name="validation scores")
    n_pos, _ = _require_both_classes(y_test, "Test AUC")
    _require_both_classes(y_val, "The validation (Youden) threshold")
    threshold = youden_threshold(y_val, s_val)  # chosen on validation only
    at = binary_metrics(y_test, s_test, threshold)
    p_test, kind = _as_probabilities(s_test, score_kind)
    auc, var = delong_auc_variance(y_test, s_test)
    return {
        "auc": auc,
        "auc_ci": list(
            bootstrap_auc_ci(y_test, s_test, n_resamples=n_resamples, seed=seed, alpha=alpha)
        ),
        "auc_delong_ci": list(delong_auc_ci(y_test, s_test, alpha=alpha)),
        "auc_delong_se": math.sqrt(max(var, 0.0)),
        "accuracy": at["accuracy"],
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "ppv": at["ppv"],
        "npv": at["npv"],
        "confusion": {k: at[k] for k in ("tp", "fp", "tn", "fn")},
        "threshold": threshold,
        "threshold_source": "val_youden",
        "auprc": auprc(y_test, s_test),
        "ece": expected_calibration_error(y_test, p_test, n_bins),
        "score_kind": kind,
        "n": int(y_test.size),
        "n_pos": n_pos,
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "alpha": float(alpha),
    }
