"""`embedstore demo`: the whole pipeline on the built-in synthetic cohort, reusing what is cached.

    WORKDIR/cohort/   synthetic DICOM + manifest      (embedstore synth)
    WORKDIR/store/    embeddings, runs, index          (embedstore extract / train)
    WORKDIR/report/   metrics.json, figures, report.html (embedstore eval)
    WORKDIR/results.json  the paper-style table for scripts

Runs get deterministic names (``teacher-f0.25-s0`` ...) so a second `make demo` reuses them and
says so; delete ``WORKDIR/store/runs/<name>`` (or the whole WORKDIR) to recompute.

The demo prints nothing itself: it reports stages, bars and finished steps to a ``Reporter``
(``embedstore.progress``) and returns a ``DemoResult``; ``embedstore demo`` renders both.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstore.errors import ConfigError, RunNotFoundError
from embedstore.evaluate import EvalConfig, EvalResult, evaluate, results_summary
from embedstore.experiment import ExperimentConfig, ExperimentResult, run_experiment
from embedstore.extract import ExtractConfig, ExtractSummary, extract
from embedstore.fit import PriorTrainConfig
from embedstore.progress import Reporter, reporter_or_null
from embedstore.runs import Run, load_run
from embedstore.store import open_store
from embedstore.train import BASELINE_KINDS, train_baselines, train_classifier, train_prior

__all__ = ["DEFAULT_PATIENTS", "DemoResult", "run_demo"]

DEFAULT_PATIENTS = 800


@dataclass(frozen=True)
class DemoResult:
    """What the demo produced: ``summary`` is the content of ``results_path`` (results.json),
    ``evaluation`` the full evaluation, ``timings_s`` seconds per stage (and ``total_s``)."""

    summary: dict[str, Any]
    evaluation: EvalResult
    results_path: Path
    timings_s: dict[str, float]
    experiment: ExperimentResult | None = None


def _extract(reporter: Reporter, store_dir: Path, manifest: Path, modality: str) -> ExtractSummary:
    cfg = ExtractConfig(modality=modality)
    with reporter.bar(f"extract {cfg.modality}", None) as bar:
        summary = extract(store_dir, manifest, cfg, on_progress=lambda s, total: bar.update(
            s.done + s.cached + s.failed, total=total, status=s))
    reporter.done(summary)
    return summary


def _reuse_or_train(store_root: Path, name: str, train: Callable[[], Run]) -> tuple[Run, bool]:
    """(run, reused): the run called ``name`` when it exists, else a freshly trained one."""
    try:
        run = load_run(store_root / "runs", name)
        if run.run_id == name:
            return run, True
    except RunNotFoundError:
        pass
    return train(), False


def _fraction_tag(f: float) -> str:
    return f"f{f:g}"


def run_demo(
    workdir: str | os.PathLike[str] = "demo",
    *,
    patients: int | None = None,
    seed: int = 0,
    label_fraction: float = 0.25,
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    experiment_seeds: Sequence[int] = (4, 5, 6),
    reporter: Reporter | None = None,
) -> DemoResult:
    """Run synth -> extract (CXR, CTPA) -> train -> eval; write results.json and return it all.

    ``experiment_seeds`` (empty to skip): a last stage runs the experiment of every default arm
    over these label/training seeds x ``fractions`` (``embedstore.experiment``), whose table
    gives each arm's mean AUC with a hierarchical CI; its numbers are under ``experiment`` in
    results.json. ``reporter`` is told each stage, given every bar and finished step, and a line
    of narration where something was reused."""
    from embedstore.synth import run_synth

    rep = reporter_or_null(reporter)
    steps = 6 if experiment_seeds else 5

    def stage(i: int, title: str) -> float:
        rep.stage(i, steps, title)
        return time.perf_counter()

    t_all = time.perf_counter()
    n = patients or DEFAULT_PATIENTS
    if n < 40:
        raise ConfigError(f"--patients must be at least 40 for a meaningful split, got {n}.")
    work = Path(workdir)
    cohort, store_dir, report = work / "cohort", work / "store", work / "report"
    fracs = sorted({*fractions, label_fraction})
    timings: dict[str, float] = {}

    t0 = stage(1, f"Synthetic cohort: {n} patients, seed {seed}")
    res = run_synth(cohort, n_patients=n, seed=seed, preview=True, reporter=rep)
    rep.message(f"{'reused' if res.get('reused') else 'wrote'} {res['manifest_path']} "
                f"({res['n_positive']} PE-positive); preview: {res.get('preview_path')}")
    timings["synth_s"] = time.perf_counter() - t0

    t0 = stage(2, "Extract embeddings (frozen demo encoders, random-init)")
    for modality in ("cxr", "ctpa"):
        _extract(rep, store_dir, cohort / "manifest.parquet", modality)
    timings["extract_s"] = time.perf_counter() - t0

    t0 = stage(3, "Train teacher, CXR-only, prior at label fractions "
               + ", ".join(f"{f:g}" for f in fracs))
    main: dict[str, Run] = {}
    reused: list[str] = []
    for f in fracs:
        tag = f"{_fraction_tag(f)}-s{seed}"
        runs = {}
        for kind, fn in (
            ("teacher", functools.partial(train_classifier, store_dir, "teacher", label_fraction=f,
                                          seed=seed, name=f"teacher-{tag}", reporter=rep)),
            ("cxr", functools.partial(train_classifier, store_dir, "cxr", label_fraction=f,
                                      seed=seed, name=f"cxr-{tag}", reporter=rep)),
            ("prior", functools.partial(train_prior, store_dir, teacher=f"teacher-{tag}", seed=seed,
                                        name=f"prior-{tag}", reporter=rep)),
        ):
            runs[kind], was_reused = _reuse_or_train(store_dir, f"{kind}-{tag}", fn)
            if was_reused:
                reused.append(f"{kind}-{tag} ({runs[kind].metrics.get('val_auc', float('nan')):.3f})")
        if f == label_fraction:
            main = runs
    if reused:
        rep.message(f"reused {len(reused)} runs (validation AUC): {', '.join(reused)}. Delete "
                    f"{store_dir / 'runs'}/<run> to retrain one.")
    timings["train_s"] = time.perf_counter() - t0

    t0 = stage(4, "Ablations on the same pairs: ridge regressions, soft-label distillation, "
               "plain diffusion prior")
    tag = f"{_fraction_tag(label_fraction)}-s{seed}"
    have: dict[str, Run] = {}
    for kind in BASELINE_KINDS:
        name = f"baseline-{tag}-{kind}"
        try:
            have[kind] = load_run(store_dir / "runs", name)
            rep.message(f"reused run {name}")
        except RunNotFoundError:
            pass
    missing = [k for k in BASELINE_KINDS if k not in have]
    if missing:
        for r in train_baselines(store_dir, teacher=f"teacher-{tag}", seed=seed,
                                 name=f"baseline-{tag}", kinds=missing, reporter=rep):
            have[r.kind] = r
    ablations = [have[k] for k in BASELINE_KINDS]
    # the prior without its ridge mean (mean_model="none"): what the diffusion alone learns
    plain, was_reused = _reuse_or_train(store_dir, f"prior-plain-{tag}", functools.partial(
        train_prior, store_dir, teacher=f"teacher-{tag}", seed=seed, name=f"prior-plain-{tag}",
        trainer=PriorTrainConfig(seed=seed, mean_model="none"), reporter=rep))
    if was_reused:
        rep.message(f"reused run {plain.run_id}")
    timings["baselines_s"] = time.perf_counter() - t0

    t0 = stage(5, "Evaluate on the test split")
    runs = tuple(r.run_id for r in (main["teacher"], main["cxr"], main["prior"], plain,
                                    *ablations))
    results = evaluate(store_dir, EvalConfig(runs=runs, out_dir=report, seed=seed))
    timings["eval_s"] = time.perf_counter() - t0
    exp = None
    if experiment_seeds:
        t0 = stage(6, f"Experiment: {len(experiment_seeds)} seeds x {len(fracs)} label fractions, "
                   "every arm (mean AUC, hierarchical CI)")
        exp = run_experiment(store_dir, ExperimentConfig(
            name="demo", label_fractions=tuple(fracs), seeds=tuple(experiment_seeds)),
            reporter=rep)
        timings["experiment_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all
    summary = {
        "cohort": {"patients": n, "seed": seed, "label_fraction": label_fraction,
                   "test_n": results.n, "test_pos": results.n_pos, "synthetic": True},
        "models": results_summary(results),
        "retrieval": results.retrieval,
        "label_efficiency": results.label_efficiency or [],
        "report": str(results.report),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "store_size": open_store(store_dir).info().get("size_bytes"),
    }
    if exp is not None:
        summary["experiment"] = {"experiment_id": exp.experiment_id, "seeds": list(experiment_seeds),
                                 "report": str(exp.report), "arms": exp.summary["arms"],
                                 "deltas": exp.summary["deltas"],
                                 "verdicts": exp.summary["verdicts"]}
    # The headline entries are top level too, as scripts expect: results["distilled"]["auc"].
    summary.update(summary["models"])
    results_path = work / "results.json"
    results_path.write_text(json.dumps(summary, indent=2, default=str))
    return DemoResult(summary=summary, evaluation=results, results_path=results_path,
                      timings_s=dict(timings), experiment=exp)
