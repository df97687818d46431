"""`embedstore experiment`: every arm x label fraction x seed, resumable, with hierarchical CIs.

    STORE/experiments/<id>/config.json          the experiment's config (``id`` = name + its hash)
    STORE/experiments/<id>/cells/f<F>-s<S>.parquet   one finished cell's per-patient predictions
    STORE/experiments/<id>/predictions.parquet  all cells, long format (one row per patient x arm)
    STORE/experiments/<id>/summary.json         per arm and fraction: mean, sd, hierarchical CI,
                                                operating points; paired deltas and verdicts
    STORE/experiments/<id>/report.html          label-efficiency curves, forest plot, tables

A *cell* is one (label fraction, seed): it trains the runs its arms need as ordinary runs
(``exp-<id>-teacher-f0.25-s4`` ...; they appear in the ``runs`` view) and scores them on the
validation and test splits with ``embedstore.evaluate``. A cell's predictions file is written
once, atomically, after its runs exist, so killing the experiment anywhere and re-running the
same command trains only the missing cells (and reuses any run a killed cell already finished).
Cells run in a process pool, one torch thread each.

The config (TOML):

    name = "demo"
    label_fractions = [0.1, 0.25, 0.5, 1.0]
    seeds = [4, 5, 6]                  # label-subset and training seeds (one group each)
    arms = ["ctpa_only", "cxr_only", "distilled", "ridge_logit"]
    compare = [["distilled", "cxr_only"], ["distilled", "ridge_logit"]]
    prevalence = 0.10                  # for PPV / NPV (real CTPA referrals: 5-15 % positive)
    target_sensitivity = 0.95          # rule-out operating point, threshold set on validation
    n_boot = 1000
    [prior]                            # PriorTrainConfig fields for the distilled arm
    epochs = 40
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tomllib

from embedstore._fsio import atomic_path, atomic_write_bytes
from embedstore.errors import ConfigError, RunNotFoundError
from embedstore.experiment_stats import (
    GroupScores,
    decision_curve,
    hierarchical_auc,
    hierarchical_delta,
    operating_point,
    seeds_above_zero,
    verdict,
)
from embedstore.progress import Bar, Reporter, reporter_or_null
from embedstore.statefile import parquet_state_schema, read_parquet_state

__all__ = ["ExperimentConfig", "ExperimentResult", "load_experiment_config", "run_experiment"]

# arm -> the run kinds a cell must train for it (evaluate derives the arm from those runs)
ARM_NEEDS: dict[str, tuple[str, ...]] = {
    "ctpa_only": ("teacher",),  # the CTPA teacher itself
    "cxr_only": ("cxr",),
    "distilled": ("teacher", "prior"),
    "ridge_logit": ("teacher", "baselines"),
    "ridge_embed": ("teacher", "baselines"),
    "ridge_mean_only": ("teacher", "prior"),  # derived by eval from the ridge-mean prior
    "softlabel_kd": ("teacher", "baselines"),
}
DEFAULT_ARMS = ("ctpa_only", "cxr_only", "distilled", "ridge_logit")
DEFAULT_COMPARE = (("distilled", "cxr_only"), ("distilled", "ridge_logit"))


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    label_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    seeds: tuple[int, ...] = (4, 5, 6)
    arms: tuple[str, ...] = DEFAULT_ARMS
    compare: tuple[tuple[str, str], ...] = DEFAULT_COMPARE
    prevalence: float = 0.10
    target_sensitivity: float = 0.95
    n_boot: int = 1000
    prior: Mapping[str, Any] = field(default_factory=dict)
    classifier: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ConfigError(f"Experiment name {self.name!r} must be letters, digits, - or _.")
        if not self.label_fractions or not all(0 < f <= 1 for f in self.label_fractions):
            raise ConfigError(f"label_fractions must be in (0, 1], got {list(self.label_fractions)}.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds must be distinct integers, got {list(self.seeds)}.")
        unknown = [a for a in self.arms if a not in ARM_NEEDS]
        if unknown:
            raise ConfigError(f"Unknown arm(s) {unknown}. Valid: {', '.join(ARM_NEEDS)}.")
        for a, b in self.compare:
            if a not in self.arms or b not in self.arms:
                raise ConfigError(f"compare [{a!r}, {b!r}] names an arm not in arms "
                                  f"{list(self.arms)}.")
        if not 0 < self.prevalence < 1:
            raise ConfigError(f"prevalence must lie in (0, 1), got {self.prevalence}.")
        if self.n_boot < 100:
            raise ConfigError(f"n_boot must be at least 100, got {self.n_boot}.")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compare"] = [list(p) for p in self.compare]
        return d

    @property
    def experiment_id(self) -> str:
        """``name-<8 hex>``: the hash covers everything that changes a cell's result."""
        body = {k: v for k, v in self.to_dict().items() if k != "name"}
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


def load_experiment_config(path: str | os.PathLike[str]) -> ExperimentConfig:
    """Read an experiment TOML; unknown keys and wrong types are ConfigErrors naming them."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"Experiment config {p} does not exist.") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Experiment config {p} is not valid TOML: {e}.") from e
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    extra = sorted(set(raw) - known)
    if extra:
        raise ConfigError(f"Unknown key(s) {extra} in {p}. Valid: {', '.join(sorted(known))}.")
    try:
        kw: dict[str, Any] = dict(raw)
        for k in ("label_fractions", "arms"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "seeds" in kw:
            kw["seeds"] = tuple(int(s) for s in kw["seeds"])
        if "compare" in kw:
            kw["compare"] = tuple((str(a), str(b)) for a, b in kw["compare"])
        return ExperimentConfig(**kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Bad value in {p}: {e}.") from e


@dataclass(frozen=True)
class ExperimentResult:
    experiment_id: str
    out_dir: Path
    summary: dict[str, Any]
    cells_trained: int
    cells_reused: int
    seconds: float
    report: Path

    def to_dict(self) -> dict[str, Any]:
        return {"experiment_id": self.experiment_id, "out_dir": str(self.out_dir),
                "cells_trained": self.cells_trained, "cells_reused": self.cells_reused,
                "seconds": round(self.seconds, 1), "report": str(self.report), **self.summary}


# ----------------------------------------------------------------------------- one cell


def _cell_name(fraction: float, seed: int) -> str:
    return f"f{fraction:g}-s{seed}"


_CELL_COLUMNS = ("label_fraction", "seed", "split", "ctpa_study_id", "cxr_study_id", "label_pe",
                 "arm", "p")


def _cell_fix(path: Path) -> str:
    return (f"Delete {path}; the next `embedstore experiment` with this config retrains that "
            "cell only (its runs are reused when intact).")


def _reuse_or(store_root: Path, name: str, train: Callable[[], Any]) -> Any:
    from embedstore.runs import load_run

    try:
        run = load_run(store_root / "runs", name)
        if run.run_id == name:
            return run
    except RunNotFoundError:
        pass
    return train()


def _run_cell(store_root: str, exp_id: str, cfg_dict: dict[str, Any], fraction: float,
              seed: int, cell_path: str) -> str:
    """Train what the arms need for one (fraction, seed), score val and test, write the cell.

    Runs in a pool worker (one torch thread); everything it writes is a run or one atomic file."""
    import torch

    from embedstore.evaluate import EvalConfig, evaluate
    from embedstore.fit import ClassifierTrainConfig, PriorTrainConfig
    from embedstore.runs import load_run
    from embedstore.train import BASELINE_KINDS, train_baselines, train_classifier, train_prior

    torch.set_num_threads(1)
    cfg = ExperimentConfig(**{**cfg_dict, "compare": tuple(map(tuple, cfg_dict["compare"])),
                              "arms": tuple(cfg_dict["arms"]),
                              "label_fractions": tuple(cfg_dict["label_fractions"]),
                              "seeds": tuple(cfg_dict["seeds"])})
    root = Path(store_root)
    tag = f"exp-{exp_id}"
    cell = _cell_name(fraction, seed)
    needs = {k for a in cfg.arms for k in ARM_NEEDS[a]}
    runs: list[str] = []
    clf = ClassifierTrainConfig(**{**cfg.classifier, "seed": seed})
    teacher = f"{tag}-teacher-{cell}"
    if "teacher" in needs:
        _reuse_or(root, teacher, lambda: train_classifier(
            root, "teacher", label_fraction=fraction, seed=seed, name=teacher, trainer=clf))
        runs.append(teacher)
    if "cxr" in needs:
        name = f"{tag}-cxr-{cell}"
        _reuse_or(root, name, lambda: train_classifier(
            root, "cxr", label_fraction=fraction, seed=seed, name=name, trainer=clf))
        runs.append(name)
    if "prior" in needs:
        name = f"{tag}-prior-{cell}"
        _reuse_or(root, name, lambda: train_prior(
            root, teacher=teacher, label_fraction=fraction, seed=seed, name=name,
            trainer=PriorTrainConfig(**{**cfg.prior, "seed": seed})))
        runs.append(name)
    if "baselines" in needs:
        base = f"{tag}-baseline-{cell}"
        got: dict[str, str] = {}
        for k in BASELINE_KINDS:
            try:
                got[k] = load_run(root / "runs", f"{base}-{k}").run_id
            except RunNotFoundError:
                pass
        missing = [k for k in BASELINE_KINDS if k not in got]
        if missing:  # a cell from before a baseline kind existed trains only that one
            got.update({r.kind: r.run_id for r in train_baselines(
                root, teacher=teacher, seed=seed, name=base, kinds=missing)})
        runs.extend(got[k] for k in BASELINE_KINDS)
    tables = []
    tmp = Path(cell_path).parent / f".eval-{cell}-{os.getpid()}"
    for split in ("val", "test"):
        res = evaluate(root, EvalConfig(runs=tuple(runs), split=split, out_dir=tmp / split,
                                        n_bootstrap=100, seed=seed, sampling_grid=False,
                                        label_efficiency=False))
        pred = pq.read_table(res.out_dir / "predictions.parquet")
        for arm in cfg.arms:
            col = f"p_{arm}"
            if col not in pred.column_names:
                have = [c[2:] for c in pred.column_names if c.startswith("p_")]
                raise ConfigError(f"Arm {arm!r} was not scored by eval (scored: {have}).")
            n = pred.num_rows
            tables.append(pa.table({
                "label_fraction": pa.array([fraction] * n, pa.float64()),
                "seed": pa.array([seed] * n, pa.int64()),
                "split": pa.array([split] * n),
                "ctpa_study_id": pred["ctpa_study_id"], "cxr_study_id": pred["cxr_study_id"],
                "label_pe": pred["label_pe"].cast(pa.int64()),
                "arm": pa.array([arm] * n), "p": pred[col].cast(pa.float64())}))
    table = pa.concat_tables(tables)
    with atomic_path(Path(cell_path)) as t:
        pq.write_table(table, t)
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return cell_path


def _init_worker() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:  # die with the parent (Linux): a killed experiment leaves no training orphans
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


# ----------------------------------------------------------------------------- the experiment


def run_experiment(store_path: str | os.PathLike[str], cfg: ExperimentConfig | str | os.PathLike[str],
                   *, workers: int | None = None, reporter: Reporter | None = None
                   ) -> ExperimentResult:
    """Run (or finish) the experiment and write its predictions, summary and report.

    ``cfg`` is a config or the path of its TOML file. ``workers`` cells train at once (default:
    the CPU count, at most the number of missing cells; 0 runs them in this process).
    ``reporter`` gets a bar over the cells."""
    from embedstore.store import open_store

    if not isinstance(cfg, ExperimentConfig):
        cfg = load_experiment_config(cfg)
    rep = reporter_or_null(reporter)

    t0 = time.perf_counter()
    store = open_store(store_path)
    root = store.root
    exp_id = cfg.experiment_id
    out = root / "experiments" / exp_id
    (out / "cells").mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.json", json.dumps(
        {"experiment_id": exp_id, **cfg.to_dict()}, indent=2, sort_keys=True).encode())
    cells = [(f, s) for f in cfg.label_fractions for s in cfg.seeds]
    paths = {c: out / "cells" / f"{_cell_name(*c)}.parquet" for c in cells}
    missing = [c for c in cells if not paths[c].exists()]
    for c in cells:  # a damaged finished cell is named before hours of training, not after
        if c not in missing:
            parquet_state_schema(paths[c], "Experiment cell", required=_CELL_COLUMNS,
                                 fix=_cell_fix(paths[c]))
    reused = len(cells) - len(missing)
    if reused:
        rep.message(f"reusing {reused} of {len(cells)} finished cells in {out / 'cells'}")
    with rep.bar(f"experiment {exp_id}", len(cells)) as bar:
        bar.update(reused)
        _run_cells(cfg, root, exp_id, missing, paths, workers, bar)
    table = pa.concat_tables([read_parquet_state(paths[c], "Experiment cell", fix=_cell_fix(paths[c]),
                                                 required=_CELL_COLUMNS) for c in cells])
    with atomic_path(out / "predictions.parquet") as t:
        pq.write_table(table, t)
    summary = summarize(table, cfg)
    summary["experiment_id"] = exp_id
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    from embedstore.experiment_report import write_experiment_report

    report = write_experiment_report(out / "report.html", summary, cfg)
    return ExperimentResult(exp_id, out, summary, len(missing), reused,
                            time.perf_counter() - t0, report)


def _run_cells(cfg: ExperimentConfig, root: Path, exp_id: str, missing: list[tuple[float, int]],
               paths: dict[tuple[float, int], Path], workers: int | None, bar: Bar) -> None:
    n_workers = min(os.cpu_count() or 1, len(missing)) if workers is None else workers
    args = (str(root), exp_id, cfg.to_dict())
    if n_workers == 0 or not missing:
        for c in missing:
            _run_cell(*args, c[0], c[1], str(paths[c]))
            bar.advance(1)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=n_workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker) as pool:
        pending: dict[Future[str], tuple[float, int]] = {
            pool.submit(_run_cell, *args, c[0], c[1], str(paths[c])): c for c in missing}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                pending.pop(fut)
                fut.result()  # a failed cell raises here; cells already written stay
                bar.advance(1)


def _groups(table: pa.Table, split: str, fraction: float, seeds: Sequence[int],
            arms: Sequence[str]) -> list[GroupScores]:
    d = table.to_pydict()
    out = []
    for s in seeds:
        rows = [i for i in range(len(d["p"])) if d["split"][i] == split
                and d["label_fraction"][i] == fraction and d["seed"][i] == s]
        ids = sorted({d["ctpa_study_id"][i] for i in rows})
        pos = {k: j for j, k in enumerate(ids)}
        y = np.zeros(len(ids), np.int64)
        scores = {a: np.full(len(ids), np.nan) for a in arms}
        for i in rows:
            j = pos[d["ctpa_study_id"][i]]
            y[j] = d["label_pe"][i]
            if d["arm"][i] in scores:
                scores[d["arm"][i]][j] = d["p"][i]
        out.append(GroupScores(y=y, scores=scores))
    return out


def summarize(table: pa.Table, cfg: ExperimentConfig) -> dict[str, Any]:
    """Per arm and label fraction: AUC mean, sd over seeds, hierarchical CI, the rule-out
    operating point (mean over seeds); per compared pair: paired dAUC, CI, seeds above 0 and a
    verdict line; decision curves at the largest fraction."""
    arms_rows: list[dict[str, Any]] = []
    deltas: list[dict[str, Any]] = []
    per_seed: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    for i, f in enumerate(cfg.label_fractions):
        test = _groups(table, "test", f, cfg.seeds, cfg.arms)
        val = _groups(table, "val", f, cfg.seeds, cfg.arms)
        for arm in cfg.arms:
            ci = hierarchical_auc(test, arm, n_boot=cfg.n_boot, seed=i)
            ops = [operating_point(v.y, v.scores[arm], t.y, t.scores[arm],
                                   target_sensitivity=cfg.target_sensitivity,
                                   prevalence=cfg.prevalence) for v, t in zip(val, test, strict=True)]
            arms_rows.append({
                "arm": arm, "label_fraction": f, "auc_mean": ci.estimate,
                "auc_sd": ci.sd_between_groups, "auc_ci": [ci.lo, ci.hi], "n_seeds": ci.n_groups,
                "sensitivity": float(np.mean([o.sensitivity for o in ops])),
                "specificity": float(np.mean([o.specificity for o in ops])),
                "ppv": float(np.nanmean([o.ppv for o in ops])),
                "npv": float(np.nanmean([o.npv for o in ops]))})
        for s, g in zip(cfg.seeds, test, strict=True):
            from embedstore.metrics import roc_auc

            per_seed.append({"label_fraction": f, "seed": s, **{
                a: round(roc_auc(g.y, g.scores[a]), 4) for a in cfg.arms}})
        for a, b in cfg.compare:
            ci = hierarchical_delta(test, a, b, n_boot=cfg.n_boot, seed=100 + i)
            above = seeds_above_zero(test, a, b, n_boot=min(cfg.n_boot, 500), seed=i)
            deltas.append({"arm": a, "reference": b, "label_fraction": f,
                           "delta_auc": ci.estimate, "delta_ci": [ci.lo, ci.hi],
                           "seeds_above_zero": above[0], "n_seeds": above[1],
                           "verdict": verdict(a, b, ci, above, label_fraction=f)})
        if f == max(cfg.label_fractions):
            for arm in cfg.arms:
                nb = [decision_curve(t.y, t.scores[arm], prevalence=cfg.prevalence)
                      for t in test]
                curves[arm] = {"threshold": nb[0]["threshold"].tolist(),
                               "net_benefit": np.mean([c["model"] for c in nb], 0).tolist(),
                               "treat_all": nb[0]["treat_all"].tolist()}
    return {"arms": arms_rows, "deltas": deltas, "per_seed": per_seed,
            "decision_curve": {"label_fraction": max(cfg.label_fractions),
                               "prevalence": cfg.prevalence, "curves": curves},
            "verdicts": [d["verdict"] for d in deltas]}


