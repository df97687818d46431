"""Pairing rules: which CXR goes with which CTPA (the ``pairs`` view), and the counts behind it.

A store keeps one ``PairingRule`` in its manifest's Parquet metadata (set with
``Store.set_pairing_rule`` or ``embedstore pairs STORE --max-gap ...``). For every CTPA the
candidate CXRs are those sharing its ``pair_id`` (when the CTPA has one) or else every CXR of the
same patient; the rule then keeps the candidates within ``max_gap_hours`` (and, with
``cxr_before_ctpa``, acquired no later than the CTPA), and of those the nearest one, or every one
with ``multi_cxr``. Explicit ``pair_id`` pairs are filtered like the others; one whose gap cannot
be computed (a study without ``acquired_at``) is kept, because its ``pair_id`` is the evidence,
and counted as undated. Every candidate and the reason it was dropped is in the
``pair_candidates`` view, so nothing disappears silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from embedstore.errors import ConfigError
from embedstore.store.format import DEFAULT_PAIR_MAX_GAP_HOURS

if TYPE_CHECKING:
    from embedstore.store import Store

__all__ = [
    "DROP_REASONS",
    "PairingRule",
    "aggregate_per_ctpa",
    "candidates_sql",
    "configure_pairs",
    "pairing_summary",
    "pairs_sql",
    "parse_duration",
]

#: Why a candidate CXR is not in ``pairs`` (the ``drop_reason`` column of ``pair_candidates``).
DROP_REASONS = ("cxr_after_ctpa", "over_max_gap", "not_nearest")

_UNITS = {"m": 1 / 60, "min": 1 / 60, "h": 1.0, "d": 24.0, "w": 168.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+)\s*$")


def parse_duration(text: str | float, *, option: str = "--max-gap") -> float:
    """Hours in ``text``: ``90m``, ``24h``, ``1.5h``, ``2d`` or ``1w`` (a number is hours)."""
    if isinstance(text, bool):
        raise ConfigError(f"Invalid duration {text!r} for {option}.")
    if isinstance(text, int | float):
        hours = float(text)
    else:
        m = _DURATION.match(str(text).lower())
        if m is None or m.group(2) not in _UNITS:
            raise ConfigError(
                f"Invalid duration {text!r} for {option}: give a number and a unit, m (minutes), "
                "h (hours), d (days) or w (weeks), e.g. 90m, 24h, 2d."
            )
        hours = float(m.group(1)) * _UNITS[m.group(2)]
    if not (hours > 0 and math.isfinite(hours)):
        raise ConfigError(f"{option} must be a positive duration, got {text!r} (e.g. 24h).")
    return hours


def _hours_text(h: float) -> str:
    return f"{h:g} h" if h >= 1 else f"{h * 60:g} min"


@dataclass(frozen=True)
class PairingRule:
    """How the ``pairs`` view pairs radiographs with CTPAs (validated when built)."""

    max_gap_hours: float = DEFAULT_PAIR_MAX_GAP_HOURS
    cxr_before_ctpa: bool = False  # True: the CXR must be acquired no later than its CTPA
    multi_cxr: bool = False  # True: every CXR within the rule; False: the nearest one per CTPA

    def __post_init__(self) -> None:
        g = self.max_gap_hours
        if isinstance(g, bool) or not isinstance(g, int | float) or not (g > 0 and math.isfinite(g)):
            raise ConfigError(f"max_gap_hours must be a positive number of hours, got {g!r}.")
        object.__setattr__(self, "max_gap_hours", float(g))
        for name in ("cxr_before_ctpa", "multi_cxr"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairingRule:
        """From ``to_dict`` output; the legacy store metadata held only ``pair_max_gap_hours``."""
        gap = d.get("max_gap_hours", d.get("pair_max_gap_hours", DEFAULT_PAIR_MAX_GAP_HOURS))
        return cls(max_gap_hours=gap, cxr_before_ctpa=bool(d.get("cxr_before_ctpa", False)),
                   multi_cxr=bool(d.get("multi_cxr", False)))

    def describe(self) -> str:
        side = "CXR at or before the CTPA" if self.cxr_before_ctpa else "CXR either side of the CTPA"
        which = "every CXR" if self.multi_cxr else "the nearest CXR"
        return f"{which} within {_hours_text(self.max_gap_hours)}, {side}"


def candidates_sql(rule: PairingRule, has_pair_id: bool = True) -> str:
    """The ``pair_candidates`` view: every (CTPA, candidate CXR) with why it was dropped.

    Candidates of a CTPA with a ``pair_id``: the CXRs of the same patient with that ``pair_id``
    (dated or not). Of a CTPA without: every dated CXR of the same patient (a dated CTPA only).
    """
    # hours from the CTPA to the CXR: negative = CXR first
    signed = "(epoch(cx.acquired_at) - epoch(ct.acquired_at)) / 3600.0"
    explicit = "ct.pair_id IS NOT NULL" if has_pair_id else "FALSE"
    on = ("ct.patient_id = cx.patient_id AND "
          + ("(ct.pair_id = cx.pair_id OR (ct.pair_id IS NULL AND ct.acquired_at IS NOT NULL "
             "AND cx.acquired_at IS NOT NULL))" if has_pair_id
             else "ct.acquired_at IS NOT NULL AND cx.acquired_at IS NOT NULL"))
    ctpa_pair = "ct.pair_id" if has_pair_id else "NULL"
    order = "AND signed_hours > 0" if rule.cxr_before_ctpa else "AND FALSE"
    keep_all = "TRUE" if rule.multi_cxr else "FALSE"
    return f"""
        WITH cand AS (
            SELECT coalesce({ctpa_pair}, 'auto:' || ct.study_id) AS pair_id, ct.patient_id,
                   cx.study_id AS cxr_study_id, ct.study_id AS ctpa_study_id,
                   {signed} AS signed_hours, {explicit} AS explicit, ct.split, ct.label_pe
            FROM studies ct JOIN studies cx ON {on}
            WHERE ct.modality = 'CTPA' AND cx.modality = 'CXR'
        ), judged AS (
            SELECT *, CASE
                WHEN signed_hours IS NOT NULL {order} THEN 'cxr_after_ctpa'
                WHEN abs(signed_hours) > {rule.max_gap_hours!r} THEN 'over_max_gap'
                END AS rule_reason
            FROM cand
        ), ranked AS (
            SELECT *, row_number() OVER (
                PARTITION BY ctpa_study_id, rule_reason IS NULL
                ORDER BY abs(signed_hours) NULLS LAST, cxr_study_id) AS nearness
            FROM judged
        )
        SELECT pair_id, patient_id, cxr_study_id, ctpa_study_id,
               abs(signed_hours) AS gap_hours, signed_hours <= 0 AS cxr_first, explicit,
               split, label_pe,
               CASE WHEN rule_reason IS NOT NULL THEN rule_reason
                    WHEN nearness > 1 AND NOT {keep_all} THEN 'not_nearest' END AS drop_reason
        FROM ranked
    """


def pairs_sql() -> str:
    """The ``pairs`` view over ``pair_candidates`` (the columns it always had)."""
    return ("SELECT pair_id, patient_id, cxr_study_id, ctpa_study_id, gap_hours, split, label_pe "
            "FROM pair_candidates WHERE drop_reason IS NULL")


def pairing_summary(store: Store) -> dict[str, Any]:
    """The store's rule and, per split and overall: CTPAs with/without a CXR, pairs, and
    candidates dropped by the rule (explicit ``pair_id`` pairs and derived ones apart)."""
    rule = store.pairing_rule()
    ct = store.sql("SELECT split, count(*) AS n FROM studies WHERE modality = 'CTPA' GROUP BY 1")
    paired = store.sql(
        "SELECT split, count(*) AS pairs, count(DISTINCT ctpa_study_id) AS ctpa, "
        "count(*) FILTER (WHERE gap_hours IS NULL) AS undated FROM pairs GROUP BY 1")
    dropped = store.sql(
        "SELECT split, explicit, drop_reason, count(*) AS n FROM pair_candidates "
        "WHERE drop_reason IS NOT NULL GROUP BY ALL")
    splits = sorted(set(ct["split"].to_pylist()) | set(paired["split"].to_pylist()),
                    key=lambda s: (["train", "val", "test"] + [str(s)]).index(s))

    def empty() -> dict[str, Any]:
        return {"ctpa": 0, "ctpa_with_cxr": 0, "ctpa_without_cxr": 0, "pairs": 0,
                "explicit_undated": 0,
                "dropped_explicit": dict.fromkeys(DROP_REASONS, 0),
                "dropped_derived": dict.fromkeys(DROP_REASONS, 0)}

    by_split = {s: empty() for s in splits}
    for r in ct.to_pylist():
        by_split[r["split"]]["ctpa"] = int(r["n"])
    for r in paired.to_pylist():
        d = by_split[r["split"]]
        d["pairs"], d["ctpa_with_cxr"], d["explicit_undated"] = (
            int(r["pairs"]), int(r["ctpa"]), int(r["undated"]))
    for r in dropped.to_pylist():
        key = "dropped_explicit" if r["explicit"] else "dropped_derived"
        by_split[r["split"]][key][r["drop_reason"]] = int(r["n"])
    total = empty()
    for d in by_split.values():
        d["ctpa_without_cxr"] = d["ctpa"] - d["ctpa_with_cxr"]
        for k, v in d.items():
            if isinstance(v, dict):
                for reason, n in v.items():
                    total[k][reason] += n
            else:
                total[k] += v
    return {"rule": rule.to_dict(), "rule_text": rule.describe(), **total, "by_split": by_split}


def configure_pairs(
    store_path: Any,
    *,
    max_gap: str | float | None = None,
    cxr_before_ctpa: bool | None = None,
    multi_cxr: bool | None = None,
) -> dict[str, Any]:
    """``embedstore pairs``: set the given parts of the store's rule (others kept), then count.

    With nothing given the store is only read. Setting takes the whole-store writer lock and
    rewrites the manifest atomically (StoreLockedError while an extraction runs).
    """
    from embedstore.store import open_store

    store = open_store(store_path)
    changes: dict[str, Any] = {}
    if max_gap is not None:
        changes["max_gap_hours"] = parse_duration(max_gap)
    if cxr_before_ctpa is not None:
        changes["cxr_before_ctpa"] = bool(cxr_before_ctpa)
    if multi_cxr is not None:
        changes["multi_cxr"] = bool(multi_cxr)
    before = store.pairing_rule()
    if changes:
        store.set_pairing_rule(PairingRule(**{**before.to_dict(), **changes}))
    out = pairing_summary(store)
    out["changed"] = bool(changes) and out["rule"] != before.to_dict()
    return out


def aggregate_per_ctpa(
    ctpa_ids: Sequence[str], scores: np.ndarray, labels: np.ndarray | None = None, *,
    how: str = "mean",
) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    """One score per CTPA from per-pair scores (several CXRs of one CTPA under ``multi_cxr``).

    Returns the distinct CTPA ids (sorted), their aggregated scores (mean or max over their
    pairs) and their labels (which must agree within a CTPA). Evaluation metrics and the
    patient-clustered bootstrap then count each CTPA once.
    """
    if how not in ("mean", "max"):
        raise ConfigError(f"Unknown per-CTPA aggregation {how!r}. Valid: 'mean', 'max'.")
    s = np.asarray(scores, dtype=np.float64)  # (P,)
    if s.ndim != 1 or s.shape[0] != len(ctpa_ids):
        raise ConfigError(f"scores must be one value per pair: {s.shape} vs {len(ctpa_ids)} ids.")
    ids, inverse = np.unique(np.asarray(list(ctpa_ids), dtype=object).astype(str),
                             return_inverse=True)
    n = len(ids)
    if how == "mean":
        out = np.bincount(inverse, weights=s, minlength=n) / np.bincount(inverse, minlength=n)
    else:
        out = np.full(n, -np.inf)
        np.maximum.at(out, inverse, s)
    y = None
    if labels is not None:
        lab = np.asarray(labels, dtype=np.float64)  # (P,)
        y = np.full(n, np.nan)
        y[inverse] = lab  # the last pair's label; checked against every pair's below
        same = (y[inverse] == lab) | (np.isnan(y[inverse]) & np.isnan(lab))
        if not same.all():
            bad = str(ids[inverse[np.flatnonzero(~same)[0]]])
            raise ConfigError(f"CTPA {bad!r} has pairs with different labels; labels are per CTPA.")
    return [str(i) for i in ids], out, y
