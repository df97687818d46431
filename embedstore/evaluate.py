"""Evaluation: runs -> per-case scores -> the paper's table, paired comparisons, figures, report.

All compared runs are scored on the **same test patients** (the pairs of the split with a label),
so differences are paired. Thresholds come from the validation split (Youden), never from test.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from embedstore import metrics as M
from embedstore import plots
from embedstore.errors import ConfigError
from embedstore.fit import predict_prior_mean, predict_student
from embedstore.fit_paper import predict_paper_student
from embedstore.report import markdown_table, write_html_report
from embedstore.retrieval_metrics import retrieval_metrics, shuffled_control
from embedstore.runs import Run, list_runs, load_run
from embedstore.sql import literal
from embedstore.store import Store, open_store
from embedstore.train import load_model

__all__ = ["EvalConfig", "EvalResult", "MODEL_NAMES", "evaluate", "results_summary"]

#: Display names and results.json keys per run kind.
MODEL_NAMES = {
    "teacher": ("ctpa_only", "CTPA-only (teacher)"),
    "cxr": ("cxr_only", "CXR-only"),
    "prior": ("distilled", "Distilled CXR (diffusion prior)"),
    "ridge_logit": ("ridge_logit", "Ablation: ridge CXR -> teacher logit"),
    "ridge_embed": ("ridge_embed", "Ablation: ridge CXR -> CTPA embedding"),
    # arms named by what a run's config says, not by its kind alone (``_arm_kind``)
    "prior_plain": ("prior_plain", "Ablation: plain diffusion prior (no ridge mean)"),
    "ridge_mean_only": ("ridge_mean_only", "Ablation: teacher on the prior's ridge mean (no diffusion)"),
    "softlabel_kd": ("softlabel_kd", "Ablation: CXR head on the teacher's soft labels"),
    "paper_prior": ("paper", "Distilled CXR (paper preset)"),
    # a paper_prior run trained with --published-nograd
    "paper_prior:nograd": ("paper_nograd", "Distilled CXR (paper preset, published no_grad bug)"),
}
#: Run kinds scored by sampling a prior through the teacher (paired against the ablations too).
_STUDENT_KINDS = ("prior", "paper_prior")


@dataclass(frozen=True)
class EvalConfig:
    runs: tuple[str, ...]
    split: str = "test"
    out_dir: Path | None = None
    num_samples: int = 8
    steps: int | None = None  # DDIM steps; None -> the prior's validation setting
    n_bootstrap: int = 2000
    seed: int = 0
    sampling_grid: bool = True
    label_efficiency: bool = True

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError("Give at least one --run.")
        if self.split not in ("val", "test"):
            raise ConfigError(f"--split must be val or test, got {self.split!r}.")
        if self.num_samples < 1:
            raise ConfigError(f"--samples must be >= 1, got {self.num_samples}.")


@dataclass(frozen=True)
class EvalResult:
    """What ``evaluate`` computed; ``to_dict()`` is the content of ``metrics.json``.

    ``models`` has one row per compared run (``key``, ``model``, ``run_id``, AUC with CIs,
    thresholded metrics, and ``delta_auc_vs_cxr_only`` where it applies); ``comparisons`` the
    paired DeLong / bootstrap rows; ``retrieval`` the generated-embedding retrieval rows. The
    optional parts are None when they did not apply (no prior run, fewer than two fractions).
    """

    split: str
    n: int
    n_pos: int
    models: list[dict[str, Any]]
    comparisons: list[dict[str, Any]]
    retrieval: list[dict[str, Any]]
    config: dict[str, Any]
    notes: list[str]
    out_dir: Path
    report: Path | None = None
    sampling_grid: dict[str, list[dict[str, Any]]] | None = None
    uncertainty: dict[str, dict[str, float]] | None = None
    label_efficiency: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json content (key order kept: scripts and diffs read it)."""
        d: dict[str, Any] = {"split": self.split, "n": self.n, "n_pos": self.n_pos,
                             "models": self.models, "comparisons": self.comparisons,
                             "retrieval": self.retrieval}
        for k in ("sampling_grid", "uncertainty", "label_efficiency"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d.update({"config": self.config, "notes": self.notes, "out_dir": str(self.out_dir)})
        if self.report is not None:
            d["report"] = str(self.report)
        return d


@dataclass
class _Units:
    """The evaluation cases of one split: one row per labelled patient pair."""

    cxr: list[str]
    ctpa: list[str]
    y: np.ndarray  # (N,)
    patient: list[str] = field(default_factory=list)  # (N,) the bootstrap's cluster ids


@dataclass
class _Scored:
    run: Run
    key: str
    label: str
    val: np.ndarray  # (Nv,) probabilities
    test: np.ndarray  # (Nt,)
    extra: dict[str, Any] = field(default_factory=dict)


def _units(store: Store, split: str) -> _Units:
    t = store.sql(
        f"SELECT cxr_study_id, ctpa_study_id, label_pe, patient_id FROM pairs "
        f"WHERE split = {literal(split)} "
        "AND label_pe IS NOT NULL AND cxr_study_id IS NOT NULL "
        "AND ctpa_study_id IS NOT NULL ORDER BY ctpa_study_id")
    if t.num_rows == 0:
        raise ConfigError(f"No labelled CXR/CTPA pairs in the {split} split: nothing to evaluate.")
    return _Units(t["cxr_study_id"].to_pylist(), t["ctpa_study_id"].to_pylist(),
                  np.asarray(t["label_pe"].to_pylist(), dtype=np.int64),
                  [str(p) for p in t["patient_id"].to_pylist()])


class _Vectors:
    """Loads each (modality, encoder) set once and hands out rows by study id."""

    def __init__(self, store: Store):
        self.store = store
        self._cache: dict[tuple[str, str], tuple[np.ndarray, dict[str, int]]] = {}

    def get(self, modality: str, key: str, ids: Sequence[str]) -> np.ndarray:
        if (modality, key) not in self._cache:
            es = self.store.load(modality, key)
            pos = {s: i for i, s in enumerate(es.meta["study_id"].to_pylist())}
            self._cache[(modality, key)] = (es.vectors, pos)
        vecs, pos = self._cache[(modality, key)]
        missing = [s for s in ids if s not in pos]
        if missing:
            raise ConfigError(
                f"{len(missing)} evaluation studies have no {modality} embedding for encoder {key} "
                f"(e.g. {missing[0]}). Extract them first, or check the failures table.")
        return vecs[[pos[s] for s in ids]]


def _probs(x: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(x.float()).numpy().astype(np.float64)


def _score(run: Run, store: Store, vec: _Vectors, units: dict[str, _Units], cfg: EvalConfig
           ) -> dict[str, dict[str, Any]]:
    """Per split: {'p': probabilities, ...extras} for one run."""
    model = load_model(run)
    c = run.config
    out: dict[str, dict[str, Any]] = {}
    for split, u in units.items():
        with torch.no_grad():
            if run.kind == "teacher":
                x = torch.from_numpy(vec.get("CTPA", c["encoder_key"], u.ctpa))
                out[split] = {"p": _probs(model(x))}
            elif run.kind in ("cxr", "softlabel_kd"):
                x = torch.from_numpy(vec.get("CXR", c["encoder_key"], u.cxr))
                out[split] = {"p": _probs(model(x))}
            else:
                teacher = load_model(load_run(store.runs_dir, c["teacher_run"]))
                x = torch.from_numpy(vec.get("CXR", c["cxr_encoder_key"], u.cxr))
                if run.kind == "ridge_logit":
                    out[split] = {"p": _probs(model(x))}
                elif run.kind == "ridge_embed":
                    emb = model(x)
                    out[split] = {"p": _probs(teacher(emb)), "emb": emb.numpy()}
                elif run.kind == "paper_prior":  # the published sampling unless --steps
                    tr = c["trainer"]
                    steps = cfg.steps or int(tr["sample_steps"])
                    p, sd, emb = predict_paper_student(
                        model, teacher, x, cfg.num_samples, steps, int(tr["sample_best_of"]),  # type: ignore[arg-type]
                        seed=cfg.seed, num_threads=int(tr.get("num_threads", 2)))
                    out[split] = {"p": p.double().numpy(), "std": sd.double().numpy(),
                                  "emb": emb.numpy(), "steps": steps}
                else:  # prior
                    steps = cfg.steps or int(c["trainer"].get("val_steps", 10))
                    p, sd, emb = predict_student(model, teacher, x, cfg.num_samples, steps,
                                                 seed=cfg.seed)  # type: ignore[arg-type]
                    out[split] = {"p": p.double().numpy(), "std": sd.double().numpy(),
                                  "emb": emb.numpy(), "steps": steps}
                    if c["prior"].get("mean_model") == "ridge":
                        # the ridge_mean_only arm: the teacher on the prior's own mean
                        pm, em = predict_prior_mean(model, teacher, x)  # type: ignore[arg-type]
                        out[split]["mean_p"] = pm.double().numpy()
                        out[split]["mean_emb"] = em.numpy()
    return out


def _arm_kind(run: Run) -> str:
    """The MODEL_NAMES entry of a run: its kind, except a prior without ridge mean and a paper
    prior trained with the published no_grad bug."""
    if run.kind == "prior" and run.config.get("prior", {}).get("mean_model") == "none":
        return "prior_plain"
    if run.kind == "paper_prior" and run.config.get("trainer", {}).get("published_nograd"):
        return "paper_prior:nograd"
    return run.kind


def _name(run: Run, taken: set[str], arm: str | None = None) -> tuple[str, str]:
    key, label = MODEL_NAMES[arm or _arm_kind(run)]
    if key in taken:
        key, label = f"{key}:{run.run_id}", f"{label} [{run.run_id}]"
    taken.add(key)
    return key, label


def _sampling_grid(run: Run, store: Store, vec: _Vectors, u: _Units, uv: _Units, cfg: EvalConfig
                   ) -> list[dict[str, Any]]:
    prior = load_model(run)
    teacher = load_model(load_run(store.runs_dir, run.config["teacher_run"]))
    x = torch.from_numpy(vec.get("CXR", run.config["cxr_encoder_key"], u.cxr))
    rows = []
    for steps in (5, 10, 25, 50):
        for k in (1, 2, 4, 8, 16):
            p, _, _ = predict_student(prior, teacher, x, k, steps, seed=cfg.seed)  # type: ignore[arg-type]
            s = p.double().numpy()
            lo, hi = M.cluster_bootstrap_auc_ci(u.y, s, u.patient,
                                                n_resamples=max(200, cfg.n_bootstrap // 4),
                                                seed=cfg.seed)
            rows.append({"num_samples": k, "steps": steps, "auc": M.roc_auc(u.y, s), "lo": lo, "hi": hi})
    return rows


def _label_efficiency(store: Store, vec: _Vectors, units: dict[str, _Units], cfg: EvalConfig
                      ) -> list[dict[str, Any]]:
    """Test AUC of CXR-only vs distilled per labelled fraction, from the store's runs."""
    rows: list[dict[str, Any]] = []
    latest: dict[tuple[str, float], Run] = {}
    for r in list_runs(store.runs_dir, ("cxr", "prior", "teacher")):
        f = r.config.get("teacher_label_fraction") if r.kind == "prior" else r.config.get("label_fraction")
        if _arm_kind(r) not in ("cxr", "prior", "teacher"):
            continue  # e.g. a plain prior: the curve compares the distilled student only
        if f is not None and r.config.get("where") is None:
            latest[(r.kind, float(f))] = r  # list_runs is oldest first: keep the newest
    fracs = sorted({f for (_, f) in latest})
    if len(fracs) < 2:
        return rows
    u = units[cfg.split]
    for (kind, f), r in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        s = _score(r, store, vec, {cfg.split: u}, cfg)[cfg.split]["p"]
        lo, hi = M.cluster_bootstrap_auc_ci(u.y, s, u.patient, n_resamples=cfg.n_bootstrap,
                                            seed=cfg.seed)
        rows.append({"fraction": f, "model": MODEL_NAMES[kind][1], "auc": M.roc_auc(u.y, s),
                     "lo": lo, "hi": hi, "run_id": r.run_id})
    return rows


def _retrieval(scored: list[_Scored], store: Store, vec: _Vectors, u: _Units, cfg: EvalConfig
               ) -> list[dict[str, Any]]:
    rows = []
    for sc in scored:
        emb = sc.extra.get("test_emb")
        if emb is None:
            continue
        ctpa_key = sc.run.config["ctpa_encoder_key"]
        db = vec.get("CTPA", ctpa_key, u.ctpa)  # (N, Dc) real test CTPA embeddings
        true = np.arange(len(u.ctpa))
        r = retrieval_metrics(emb, db, true)
        rows.append({"key": sc.key, "query": f"{sc.label}: generated CTPA embedding", **r})
        if not any(x["key"] == "shuffled_control" for x in rows):
            ctl = shuffled_control(emb, db, true, seed=cfg.seed)
            rows.append({"key": "shuffled_control", "query": "Control: shuffled pairing", **ctl})
    return rows


def evaluate(store_path: str | os.PathLike[str], cfg: EvalConfig) -> EvalResult:
    """Score the runs, compute the table, comparisons, figures and report; return the results.

    Writes ``metrics.json``, ``metrics.md``, ``predictions.parquet``, the figures and
    ``report.html`` into ``cfg.out_dir`` (default ``STORE/reports/<time>``)."""
    store = open_store(store_path)
    runs = []
    for ref in cfg.runs:
        r = load_run(store.runs_dir, ref)
        if r.run_id not in {x.run_id for x in runs}:
            runs.append(r)
    units = {"val": _units(store, "val"), cfg.split: _units(store, cfg.split)}
    vec = _Vectors(store)
    taken: set[str] = set()
    scored: list[_Scored] = []
    for r in runs:
        s = _score(r, store, vec, units, cfg)
        key, label = _name(r, taken)
        sc = _Scored(r, key, label, s["val"]["p"], s[cfg.split]["p"])
        if "std" in s[cfg.split]:
            sc.extra["test_std"] = s[cfg.split]["std"]
        if "emb" in s[cfg.split]:
            sc.extra["test_emb"] = s[cfg.split]["emb"]
        if "steps" in s[cfg.split]:
            sc.extra["steps"] = s[cfg.split]["steps"]
        scored.append(sc)
        if "mean_p" in s[cfg.split]:
            key, label = _name(r, taken, "ridge_mean_only")
            scored.append(_Scored(r, key, label, s["val"]["mean_p"], s[cfg.split]["mean_p"],
                                  {"test_emb": s[cfg.split]["mean_emb"], "derived": True}))
    u, uv = units[cfg.split], units["val"]
    table: list[dict[str, Any]] = []
    for sc in scored:
        summ = M.summarize_binary(u.y, sc.test, y_val=uv.y, s_val=sc.val,
                                  n_resamples=cfg.n_bootstrap, seed=cfg.seed,
                                  score_kind="probability")
        # patient-clustered: a patient's several studies are one draw, not independent cases
        summ["auc_ci"] = list(M.cluster_bootstrap_auc_ci(u.y, sc.test, u.patient,
                                                         n_resamples=cfg.n_bootstrap, seed=cfg.seed))
        summ["auc_ci_method"] = "patient_bootstrap"
        table.append({"key": sc.key, "model": sc.label, "run_id": sc.run.run_id, **summ})
        if sc.extra.get("derived"):
            table[-1]["derived_from"] = sc.run.run_id
    comparisons = _comparisons(scored, u.y, cfg, groups=u.patient)
    for row in table:
        for c in comparisons:
            if c["model"] == row["key"] and c["reference"] == "cxr_only":
                row["delta_auc_vs_cxr_only"] = c["delta_auc"]
                row["delta_auc_ci"] = c["delta_auc_ci"]
                row["delta_auc_delong_p"] = c["delong_p"]
        _delta_vs(row, comparisons, "distilled")
    out = Path(cfg.out_dir) if cfg.out_dir else (
        store.root / "reports" / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    figures["ROC curves of the compared models (test split)"] = plots.plot_roc(
        {sc.label: (u.y, sc.test) for sc in scored}, out / "roc.png",
        cis={sc.label: tuple(t["auc_ci"]) for sc, t in zip(scored, table, strict=True)})
    figures["Reliability diagram (test split)"] = plots.plot_reliability(
        {sc.label: (u.y, sc.test) for sc in scored}, out / "reliability.png")
    extras: dict[str, Any] = {}
    refs = {t["model"]: t["auc"] for t in table if t["key"] in ("cxr_only", "ridge_logit")}
    for sc in scored:
        if sc.run.kind != "prior" or sc.extra.get("derived"):
            continue
        if cfg.sampling_grid:
            grid = _sampling_grid(sc.run, store, vec, u, uv, cfg)
            extras.setdefault("sampling_grid", {})[sc.key] = grid
            figures[f"{sc.label}: test AUC vs number of samples and DDIM steps"] = \
                plots.plot_auc_vs_sampling(grid, out / f"sampling_{_safe(sc.key)}.png", references=refs)
        if "test_std" in sc.extra:
            err = np.abs(sc.test - u.y)
            figures[f"{sc.label}: per-case uncertainty vs error"] = plots.plot_uncertainty_vs_error(
                sc.extra["test_std"], err, out / f"uncertainty_{_safe(sc.key)}.png")
            extras.setdefault("uncertainty", {})[sc.key] = {
                "mean_std": float(np.mean(sc.extra["test_std"])),
                "spearman_std_vs_abs_error": _spearman(sc.extra["test_std"], err)}
    if cfg.label_efficiency:
        le = _label_efficiency(store, vec, units, cfg)
        if le:
            extras["label_efficiency"] = le
            figures["Label efficiency: test AUC vs labelled fraction of training patients"] = \
                plots.plot_label_efficiency(le, out / "label_efficiency.png")
    retrieval = _retrieval(scored, store, vec, u, cfg)
    _write_predictions(out / "predictions.parquet", scored, u, cfg.split)
    results = EvalResult(
        split=cfg.split, n=int(len(u.y)), n_pos=int(u.y.sum()),
        models=table, comparisons=comparisons, retrieval=retrieval,
        config={"num_samples": cfg.num_samples, "steps": cfg.steps,
                "n_bootstrap": cfg.n_bootstrap, "seed": cfg.seed},
        notes=_notes(table, comparisons), out_dir=out, **extras)
    (out / "metrics.json").write_text(json.dumps(results.to_dict(), indent=2, default=_jdefault))
    cols = {"model": "Model", "auc": "AUC", "auc_ci": "AUC 95% CI", "accuracy": "Accuracy",
            "sensitivity": "Sensitivity", "specificity": "Specificity", "auprc": "AUPRC", "ece": "ECE",
            "delta_auc_vs_cxr_only": "ΔAUC vs CXR-only", "delta_auc_ci": "ΔAUC 95% CI",
            "delta_auc_vs_distilled": "ΔAUC vs distilled",
            "delta_auc_vs_distilled_ci": "ΔAUC 95% CI (vs distilled)"}
    md = [f"# Evaluation ({cfg.split} split, n={len(u.y)}, {int(u.y.sum())} PE-positive)\n",
          markdown_table(table, cols), "\n## Paired comparisons\n",
          markdown_table(comparisons, None) if comparisons else "none\n"]
    if retrieval:
        md += ["\n## Retrieval diagnostics\n", markdown_table(retrieval, None)]
    (out / "metrics.md").write_text("\n".join(md) + "\n")
    report = write_html_report(
        out / "report.html", title=f"embedstore evaluation — {cfg.split} split",
        table_rows=table, columns=cols, figures=figures,
        configs={sc.label: dict(sc.run.config) for sc in scored},
        notes=results.notes, comparisons=comparisons,
        retrieval=[{k: r[k] for k in ("query", "recall@1", "recall@5", "recall@10", "median_rank",
                                      "n")} for r in retrieval])
    results = replace(results, report=report)
    (out / "metrics.json").write_text(json.dumps(results.to_dict(), indent=2, default=_jdefault))
    return results


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _delta_vs(row: dict[str, Any], comps: list[dict[str, Any]], ref: str) -> None:
    """Put the row's paired dAUC vs ``ref`` into ``delta_auc_vs_<ref>{,_ci,_delong_p}``.

    Read from either direction of a comparison: the bootstrap draws the same patients for
    both orders, so (b vs a) is exactly -(a vs b), its CI mirrored."""
    for c in comps:
        if c["model"] == row["key"] and c["reference"] == ref:
            d, ci = c["delta_auc"], list(c["delta_auc_ci"])
        elif c["model"] == ref and c["reference"] == row["key"]:
            d, ci = -c["delta_auc"], [-c["delta_auc_ci"][1], -c["delta_auc_ci"][0]]
        else:
            continue
        row[f"delta_auc_vs_{ref}"] = d
        row[f"delta_auc_vs_{ref}_ci"] = ci
        row[f"delta_auc_vs_{ref}_delong_p"] = c["delong_p"]
        return


def _comparisons(scored: list[_Scored], y: np.ndarray, cfg: EvalConfig,
                 groups: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Paired comparisons; ``groups`` (patient ids) makes the bootstrap resample patients."""
    by_key = {sc.key: sc for sc in scored}
    pairs = []
    for sc in scored:
        for ref in ("cxr_only", "ridge_logit", "ctpa_only", "distilled"):
            if ref in by_key and ref != sc.key and not (sc.key == "ctpa_only"):
                if ref == "ridge_logit" and sc.run.kind not in _STUDENT_KINDS:
                    continue
                if ref == "ctpa_only" and sc.run.kind not in _STUDENT_KINDS:
                    continue
                if ref == "distilled" and sc.run.kind != "paper_prior":
                    continue
                pairs.append((sc, by_key[ref]))
    # every other arm vs the distilled student, unless that pair is there in the other order
    done = {(a.key, b.key) for a, b in pairs}
    for sc in scored:
        ref = by_key.get("distilled")
        if (ref is not None and sc.key not in ("distilled", "ctpa_only")
                and (sc.key, "distilled") not in done and ("distilled", sc.key) not in done):
            pairs.append((sc, ref))
    rows = []
    for a, b in pairs:
        d = M.delong_test(y, a.test, b.test)
        if groups is not None:
            delta, lo, hi = M.cluster_paired_bootstrap_delta(
                y, a.test, b.test, groups, n_resamples=cfg.n_bootstrap, seed=cfg.seed)
        else:
            delta, lo, hi = M.paired_bootstrap_delta(y, a.test, b.test,
                                                     n_resamples=cfg.n_bootstrap, seed=cfg.seed)
        rows.append({"model": a.key, "reference": b.key, "delta_auc": delta,
                     "delta_auc_ci": [lo, hi], "delong_p": d.p, "delong_ci": list(d.ci)})
    return rows


def _notes(table: list[dict[str, Any]], comps: list[dict[str, Any]]) -> list[str]:
    notes = ["Thresholds for accuracy/sensitivity/specificity are chosen on the validation split "
             "(Youden's J) and applied unchanged to the test split.",
             "AUC CIs and deltas: bootstrap over patients (a patient's cases are drawn together), "
             "deltas paired on the same test patients, with DeLong's test."]
    auc = {t["key"]: t["auc"] for t in table}
    vs_ridge = next((c for c in comps if c["model"] == "distilled"
                     and c["reference"] == "ridge_logit"), None)
    if vs_ridge is not None:
        lo, hi = vs_ridge["delta_auc_ci"]
        sig = "not significant" if lo <= 0 <= hi else "significant"
        if vs_ridge["delta_auc"] >= 0:
            notes.append(f"The diffusion student (AUC {auc['distilled']:.3f}) matches or beats the "
                         f"deterministic ridge CXR->teacher-logit baseline ({auc['ridge_logit']:.3f}): "
                         f"dAUC {vs_ridge['delta_auc']:+.3f} [{lo:+.3f}, {hi:+.3f}], {sig}.")
        else:
            notes.append(f"Honest ablation: the deterministic ridge CXR->teacher-logit baseline "
                         f"(AUC {auc['ridge_logit']:.3f}) scores above the diffusion student "
                         f"({auc['distilled']:.3f}): dAUC {vs_ridge['delta_auc']:+.3f} "
                         f"[{lo:+.3f}, {hi:+.3f}], {sig}.")
    for c in comps:
        if c["model"] == "distilled" and c["reference"] == "cxr_only":
            lo = c["delta_auc_ci"][0]
            verdict = "above 0: distillation helps" if lo > 0 else "includes 0: not significant"
            notes.append(f"Distilled - CXR-only: dAUC {c['delta_auc']:+.3f}, 95% CI "
                         f"[{c['delta_auc_ci'][0]:+.3f}, {c['delta_auc_ci'][1]:+.3f}] ({verdict}); "
                         f"DeLong p = {c['delong_p']:.3g}.")
    mean_only = next((t for t in table if t["key"] == "ridge_mean_only"), None)
    if mean_only is not None and "delta_auc_vs_distilled" in mean_only:
        # distilled - mean_only is minus the stored (mean_only - distilled), its CI mirrored
        d = -mean_only["delta_auc_vs_distilled"]
        lo, hi = (-x for x in mean_only["delta_auc_vs_distilled_ci"][::-1])
        sig = "not significant" if lo <= 0 <= hi else "significant"
        notes.append(f"What the diffusion adds over its own ridge mean: distilled - "
                     f"ridge_mean_only dAUC {d:+.3f} [{lo:+.3f}, {hi:+.3f}], {sig}.")
    return notes


def _write_predictions(path: Path, scored: list[_Scored], u: _Units, split: str) -> None:
    cols: dict[str, Any] = {"cxr_study_id": u.cxr, "ctpa_study_id": u.ctpa, "label_pe": u.y,
                            "split": [split] * len(u.y)}
    for sc in scored:
        cols[f"p_{sc.key}"] = sc.test
        if "test_std" in sc.extra:
            cols[f"std_{sc.key}"] = sc.extra["test_std"]
    pq.write_table(pa.table(cols), path)


def _jdefault(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


def results_summary(results: EvalResult) -> dict[str, Any]:
    """The compact results.json: one entry per model with the headline numbers."""
    out: dict[str, Any] = {}
    for m in results.models:
        entry = {k: m[k] for k in ("auc", "auc_ci", "accuracy", "sensitivity", "specificity",
                                   "auprc", "run_id")}
        for k in ("delta_auc_vs_cxr_only", "delta_auc_ci", "delta_auc_delong_p",
                  "delta_auc_vs_distilled", "delta_auc_vs_distilled_ci",
                  "delta_auc_vs_distilled_delong_p", "auc_ci_method", "derived_from"):
            if k in m:
                entry[k] = m[k]
        out[m["key"]] = entry
    return out
