"""Does the student's sample spread earn the name "uncertainty"? Pure numpy/scipy measures.

A probability p near 0.5 is already uncertain: p(1 - p) from the point prediction alone flags
errors, and a sample spread that merely tracks p(1 - p) adds nothing. So each measure compares
the spread against that baseline:

* ``partial_spearman``: rank correlation of spread with |error| given p(1 - p) (near 0: the spread
  knows nothing beyond p);
* ``risk_coverage`` / ``aurc``: keep the most confident cases first; the area under the
  risk-coverage curve (mean |error| of the kept cases, averaged over coverages; lower is better)
  for the spread vs for p(1 - p), with a paired bootstrap of the difference;
* ``interval_coverage``: how often the real teacher logit falls inside the central K-sample
  interval (80 % is calibrated for an 80 % interval).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["aurc", "interval_coverage", "partial_spearman", "risk_coverage", "uncertainty_report"]


def _vec(a: Any, name: str) -> np.ndarray:
    v = np.asarray(a, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite values")
    return v


def _ranks(v: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(v)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def partial_spearman(x: Any, y: Any, z: Any) -> float:
    """Spearman correlation of ``x`` and ``y`` with ``z`` partialled out (on ranks); NaN when
    a variable is constant or ``z`` explains ``x`` or ``y`` entirely."""
    rx, ry, rz = (_ranks(_vec(v, n)) for v, n in ((x, "x"), (y, "y"), (z, "z")))
    if len(rx) != len(ry) or len(rx) != len(rz):
        raise ValueError("x, y and z must have the same length")
    rxy, rxz, ryz = _pearson(rx, ry), _pearson(rx, rz), _pearson(ry, rz)
    den = np.sqrt((1 - rxz**2) * (1 - ryz**2))
    return float((rxy - rxz * ryz) / den) if den > 1e-12 else float("nan")


def risk_coverage(uncertainty: Any, loss: Any) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, risk): keep the k least uncertain cases, k = 1..N; risk = their mean loss.
    Ties in ``uncertainty`` are averaged over (no order among equals is favoured)."""
    u, loss_v = _vec(uncertainty, "uncertainty"), _vec(loss, "loss")
    if len(u) != len(loss_v) or len(u) == 0:
        raise ValueError("uncertainty and loss must be non-empty and of the same length")
    order = np.argsort(u, kind="stable")
    us, ls = u[order], loss_v[order]
    # within a run of tied uncertainties every order is equally likely: use the run's mean loss
    _, start, counts = np.unique(us, return_index=True, return_counts=True)
    ls = np.repeat(np.add.reduceat(ls, start) / counts, counts)
    k = np.arange(1, len(u) + 1)
    return k / len(u), np.cumsum(ls) / k


def aurc(uncertainty: Any, loss: Any) -> float:
    """Area under the risk-coverage curve (mean risk over coverages 1/N..1); lower is better."""
    return float(risk_coverage(uncertainty, loss)[1].mean())


def interval_coverage(samples: Any, truth: Any, level: float = 0.8) -> float:
    """Share of rows whose ``truth`` lies in the central ``level`` interval of its samples
    (``samples`` (N, K), ``truth`` (N,))."""
    s = np.asarray(samples, dtype=np.float64)
    t = _vec(truth, "truth")
    if s.ndim != 2 or s.shape[0] != len(t) or s.shape[1] < 2:
        raise ValueError(f"samples must be (N, K>=2) with N = len(truth); got {s.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    lo, hi = np.quantile(s, [(1 - level) / 2, (1 + level) / 2], axis=1)
    return float(np.mean((t >= lo) & (t <= hi)))


def uncertainty_report(p: Any, spread: Any, y: Any, *, sample_logits: Any | None = None,
                       true_logits: Any | None = None, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.8) -> dict[str, Any]:
    """Everything the eval report says about the spread, each against p(1 - p).

    ``p`` (N,) student probabilities, ``spread`` (N,) their sample std, ``y`` (N,) labels;
    ``sample_logits`` (N, K) / ``true_logits`` (N,) the teacher's logits on the K generated and
    on the real CTPA embedding, for the interval coverage (omitted when not given)."""
    pv, sv, yv = _vec(p, "p"), _vec(spread, "spread"), _vec(y, "y")
    err = np.abs(yv - pv)
    pq = pv * (1 - pv)
    from scipy.stats import spearmanr

    def _sp(a: np.ndarray, b: np.ndarray) -> float:
        return float(spearmanr(a, b).statistic) if np.std(a) > 0 and np.std(b) > 0 else float("nan")

    a_spread, a_pq = aurc(sv, err), aurc(pq, err)
    rng = np.random.default_rng(seed)
    deltas = np.empty(n_boot)
    for b in range(n_boot):
        i = rng.integers(0, len(pv), len(pv))
        deltas[b] = aurc(sv[i], err[i]) - aurc(pq[i], err[i])
    lo, hi = np.quantile(deltas, [0.025, 0.975])
    out: dict[str, Any] = {
        "spearman_spread_abs_error": _sp(sv, err),
        "spearman_pq_abs_error": _sp(pq, err),
        "partial_spearman_spread_given_pq": partial_spearman(sv, err, pq),
        "aurc_spread": a_spread,
        "aurc_pq": a_pq,
        "aurc_oracle": aurc(err, err),
        "aurc_delta_spread_minus_pq": a_spread - a_pq,
        "aurc_delta_ci": [float(lo), float(hi)],
        "spread_beats_pq": bool(hi < 0),
    }
    if sample_logits is not None and true_logits is not None:
        out[f"interval{int(level * 100)}_coverage"] = interval_coverage(sample_logits, true_logits, level)
    out["verdict"] = (
        "the sample spread flags errors better than p(1-p) from the point prediction "
        f"(AURC {a_spread:.3f} vs {a_pq:.3f}, 95% CI of the difference [{lo:+.3f}, {hi:+.3f}])"
        if out["spread_beats_pq"] else
        "the sample spread does NOT flag errors better than p(1-p) from the point prediction "
        f"(AURC {a_spread:.3f} vs {a_pq:.3f}, 95% CI of the difference [{lo:+.3f}, {hi:+.3f}]): "
        "do not read it as uncertainty"
    )
    return out
