"""Training on cached latents: CTPA teacher, CXR-only baseline, diffusion prior, ablations.

This module turns a store + options into tensors and runs (``runs.py``); the loops themselves are
in ``fit.py``. The test split is never read here: every load is restricted to ``train`` or
``val`` (``_load_split``), and model selection / early stopping use validation only.

Label-efficient setting: ``label_fraction`` keeps labels for a deterministic, patient-level
fraction of the training split (``manifest.label_subset``). The teacher and the CXR-only baseline
learn from those labels only; the prior learns from *all* training pairs without labels.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tomllib
import torch

from embedstore.errors import ConfigError, IncompatibleRunError
from embedstore.fit import (
    ClassifierTrainConfig,
    FitResult,
    PriorTrainConfig,
    RidgeTrainConfig,
    fit_classifier,
    fit_prior,
    fit_ridge_embed,
    fit_ridge_logit,
    fit_softlabel_kd,
)
from embedstore.fit_paper import PaperTrainConfig, fit_paper_prior
from embedstore.manifest import label_subset
from embedstore.models.baselines import RidgeRegression
from embedstore.models.heads import HeadConfig, create_head
from embedstore.models.paper_prior import PaperPrior, PaperPriorConfig
from embedstore.models.prior import DiffusionPrior, PriorConfig
from embedstore.progress import Bar, Reporter, reporter_or_null
from embedstore.runs import Run, RunWriter, load_run
from embedstore.sql import conjoin, literal
from embedstore.store import Store, open_store

__all__ = [
    "SELECTION_KEYS",
    "PRESETS",
    "train_classifier",
    "train_prior",
    "train_paper_prior",
    "train_baselines",
    "BASELINE_KINDS",
    "run_training",
    "TrainingResult",
    "load_model",
    "resolve_encoder",
]

#: Options that choose data rather than shape the model.
SELECTION_KEYS = ("encoder", "cxr_encoder", "ctpa_encoder", "teacher", "where", "label_fraction",
                  "seed", "name", "device", "head")
_CLASSIFIER_FIELDS = {f.name for f in dataclasses.fields(ClassifierTrainConfig)}
_PRIOR_FIELDS = {f.name for f in dataclasses.fields(PriorTrainConfig)}
_PAPER_FIELDS = {f.name for f in dataclasses.fields(PaperTrainConfig)}
#: `train prior --preset`: "default" (PriorTrainConfig) or "paper" (the published recipe,
#: PaperTrainConfig; a run of kind "paper_prior").
PRESETS = ("default", "paper")
# options of one preset that the other refuses by name (with the flag that sets them)
_DEFAULT_ONLY = {"lam": "--lambda", "mu": "--mu"}
_PAPER_ONLY = {"tokens": "--tokens", "published_nograd": "--published-nograd"}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------




def resolve_encoder(store: Store, modality: str, key: str | None) -> str:
    """The encoder key to use for a modality: the given one (checked) or the only one stored."""
    keys = [s.encoder_key for s in store.sets() if s.modality.upper() == modality]
    if key is not None:
        if key in keys:
            return key
        raise ConfigError(f"No {modality} embeddings with encoder key {key!r} in {store.root}. "
                          f"Available: {', '.join(keys) or 'none (run `embedstore extract`)'}.")
    if len(keys) == 1:
        return keys[0]
    if not keys:
        raise ConfigError(f"The store has no {modality} embeddings yet. Run `embedstore extract "
                          f"{store.root} --manifest M --modality {modality.lower()}` first.")
    raise ConfigError(f"Several {modality} encoder keys in the store ({', '.join(keys)}); choose one "
                      f"with --encoder.")


@dataclass
class _Split:
    """Embeddings of one modality and split, with labels and patients aligned by row."""

    vectors: np.ndarray  # (N, D)
    study_ids: list[str]
    patient_ids: list[str]
    labels: np.ndarray  # (N,) float, NaN = unlabelled


def _studies(store: Store, split: str, where: str | None) -> dict[str, dict[str, Any]]:
    if split not in ("train", "val"):  # training never reads the test split
        raise ValueError(f"training may only read train/val, not {split!r}")
    sql = ("SELECT study_id, patient_id, label_pe FROM studies WHERE "
           + conjoin(f"split = {literal(split)}", where))
    return {r["study_id"]: r for r in store.sql(sql).to_pylist()}


def _load_split(store: Store, modality: str, key: str, split: str, where: str | None) -> _Split:
    rows = _studies(store, split, where)
    pred = conjoin(f"split = {literal(split)}", where)
    es = store.load(modality, key, where=pred)
    sids = [str(s) for s in es.meta["study_id"].to_pylist()]
    keep = [i for i, s in enumerate(sids) if s in rows]
    sids = [sids[i] for i in keep]
    labels = np.array([np.nan if rows[s]["label_pe"] is None else float(rows[s]["label_pe"])
                       for s in sids], dtype=np.float64)
    return _Split(np.ascontiguousarray(es.vectors[keep]), sids,
                  [str(rows[s]["patient_id"]) for s in sids], labels)


def _labelled_mask(split: _Split, fraction: float, seed: int) -> np.ndarray:
    """Rows whose patient is in the deterministic labelled subset (and has a label)."""
    has = ~np.isnan(split.labels)
    patients = sorted({p for p, h in zip(split.patient_ids, has, strict=True) if h})
    keep = label_subset(patients, fraction, seed)
    return has & np.array([p in keep for p in split.patient_ids], dtype=bool)


def _pairs(store: Store, split: str, where: str | None) -> list[tuple[str, str]]:
    if split not in ("train", "val"):
        raise ValueError(f"training may only read train/val, not {split!r}")
    sql = (f"SELECT cxr_study_id, ctpa_study_id FROM pairs WHERE split = {literal(split)} "
           "AND cxr_study_id IS NOT NULL AND ctpa_study_id IS NOT NULL")
    if where:
        sql += f" AND ctpa_study_id IN (SELECT study_id FROM studies WHERE {where})"
    t = store.sql(sql + " ORDER BY ctpa_study_id, cxr_study_id")  # several CXRs per CTPA: all kept
    return list(zip(t["cxr_study_id"].to_pylist(), t["ctpa_study_id"].to_pylist(), strict=True))


def _align(split: _Split, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    pos = {s: i for i, s in enumerate(split.study_ids)}
    idx = [pos[s] for s in ids]
    return split.vectors[idx], split.labels[idx]


def _paired(store: Store, cxr_key: str, ctpa_key: str, split: str, where: str | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(cxr (P, Dx), ctpa (P, Dc), labels (P,), patient ids) for pairs with both embeddings."""
    cx = _load_split(store, "CXR", cxr_key, split, where)
    ct = _load_split(store, "CTPA", ctpa_key, split, where)
    have_cx, have_ct = set(cx.study_ids), set(ct.study_ids)
    pairs = [(a, b) for a, b in _pairs(store, split, where) if a in have_cx and b in have_ct]
    if not pairs:
        raise ConfigError(f"No {split} CXR/CTPA pairs with both embeddings in the store. Extract both "
                          "modalities first (and check the `pairs` view).")
    x_cx, _ = _align(cx, [a for a, _ in pairs])
    x_ct, y = _align(ct, [b for _, b in pairs])
    pid_of = dict(zip(ct.study_ids, ct.patient_ids, strict=True))
    return x_cx, x_ct, y, [pid_of[b] for _, b in pairs]


# ---------------------------------------------------------------------------------------------
# Models from runs
# ---------------------------------------------------------------------------------------------


def load_model(run: Run) -> torch.nn.Module:
    """Rebuild a run's model from config.json + weights.safetensors (eval mode, CPU)."""
    w = run.weights()
    cfg = run.config
    if run.kind in ("teacher", "cxr", "softlabel_kd"):
        model: torch.nn.Module = create_head(HeadConfig.from_dict(dict(cfg["head"])))
    elif run.kind == "prior":
        model = DiffusionPrior(PriorConfig.from_dict(dict(cfg["prior"])))
    elif run.kind == "paper_prior":
        model = PaperPrior(PaperPriorConfig.from_dict(dict(cfg["prior"])))
    elif run.kind in ("ridge_logit", "ridge_embed"):
        r = cfg["ridge"]
        model = RidgeRegression(int(r["in_dim"]), int(r["out_dim"]), alpha=float(r["alpha"]),
                                squeeze=run.kind == "ridge_logit")
    else:  # pragma: no cover - RUN_KINDS is closed
        raise IncompatibleRunError(f"Run {run.run_id} has unknown kind {run.kind!r}.")
    try:
        model.load_state_dict(w, strict=True)
    except RuntimeError as e:
        raise IncompatibleRunError(
            f"Run {run.run_id}: weights do not fit its config ({str(e).splitlines()[0]}). "
            "The run folder was modified or written by another version; re-train it.") from e
    return model.eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Option handling
# ---------------------------------------------------------------------------------------------


def _read_config(path: Path | None, kind: str) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"Config file {str(path)!r} does not exist.") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"Config file {str(path)!r} is not valid TOML: {e}") from e
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    section = data.get(kind, {})
    if not isinstance(section, dict):
        raise ConfigError(f"[{kind}] in {path} must be a table.")
    return {**flat, **section}


def _check_preset(preset: Any) -> str:
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset {preset!r} for `train prior`. Valid: {', '.join(PRESETS)}.")
    return str(preset)


def _split_options(kind: str, opts: Mapping[str, Any], preset: str = "default"
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(selection options, trainer-config options), refusing unknown keys with the valid ones.

    For ``train prior`` the trainer fields are those of the preset's config; an option that
    belongs to the other preset is refused by name (``--lambda`` with ``--preset paper``,
    ``--tokens`` without it)."""
    fields = _PRIOR_FIELDS if kind == "prior" else _CLASSIFIER_FIELDS
    if kind == "prior" and preset == "paper":
        fields = _PAPER_FIELDS
    if kind == "baselines":
        fields = {"alphas"}
    sel, tr = {}, {}
    for k, v in opts.items():
        k = k.replace("-", "_")
        if k == "lambda":
            k = "lam"
        if kind == "prior" and preset == "paper" and k in _DEFAULT_ONLY:
            raise ConfigError(
                f"{_DEFAULT_ONLY[k]} does not apply to `train prior --preset paper`: its loss is the "
                "published 0.8 MSE + 0.2 BCE through the teacher, label-free (mse_weight and "
                f"teacher_weight in --config change it). Drop {_DEFAULT_ONLY[k]}, or train without "
                "--preset paper.")
        if kind == "prior" and preset != "paper" and k in _PAPER_ONLY:
            raise ConfigError(
                f"{_PAPER_ONLY[k]} applies only to `train prior --preset paper` (the published "
                f"recipe). Add --preset paper, or drop {_PAPER_ONLY[k]}.")
        if k in SELECTION_KEYS:
            sel[k] = v
        elif k in fields:
            tr[k] = tuple(v) if isinstance(v, list) else v
        else:
            valid = sorted(set(SELECTION_KEYS) | fields)
            what = f"train {kind}" + (" --preset paper" if fields is _PAPER_FIELDS else "")
            raise ConfigError(f"Unknown option {k!r} for `{what}`. Valid: {', '.join(valid)}.")
    if "head" in sel:
        tr["kind"] = sel.pop("head")
    if "seed" in sel:
        tr["seed"] = sel["seed"]
    if "device" in sel and kind != "baselines":
        tr["device"] = sel.pop("device")
    return sel, tr


def _epoch_logger(rw: RunWriter, bar: Bar) -> Callable[[dict[str, Any]], None]:
    """Per-epoch callback: append to train_log.jsonl and hand the row to the progress bar."""

    def on_epoch(row: dict[str, Any]) -> None:
        rw.log(row)
        bar.update(row["epoch"] + 1, status=row)

    return on_epoch


# ---------------------------------------------------------------------------------------------
# Training entry points
# ---------------------------------------------------------------------------------------------


def train_classifier(
    store_path: str | os.PathLike[str],
    kind: str,
    *,
    encoder: str | None = None,
    where: str | None = None,
    label_fraction: float = 1.0,
    seed: int = 0,
    name: str | None = None,
    trainer: ClassifierTrainConfig | None = None,
    reporter: Reporter | None = None,
) -> Run:
    """``kind='teacher'`` (CTPA) or ``'cxr'`` (radiograph-only) classifier head.

    ``reporter`` gets a bar over the epochs (each training-log row as status) and the run."""
    if kind not in ("teacher", "cxr"):
        raise ConfigError(f"Unknown classifier kind {kind!r}. Valid: teacher, cxr.")
    modality = "CTPA" if kind == "teacher" else "CXR"
    store = open_store(store_path)
    key = resolve_encoder(store, modality, encoder)
    trainer = trainer or ClassifierTrainConfig(seed=seed)
    tr = _load_split(store, modality, key, "train", where)
    va = _load_split(store, modality, key, "val", where)
    m_tr = _labelled_mask(tr, label_fraction, seed)
    m_va = ~np.isnan(va.labels)
    _need_both_classes(tr.labels[m_tr], f"labelled training {modality} studies")
    _need_both_classes(va.labels[m_va], f"labelled validation {modality} studies")
    with RunWriter(store.runs_dir, kind, name) as rw:
        with reporter_or_null(reporter).bar(f"train {kind}", trainer.epochs) as bar:
            on_epoch = _epoch_logger(rw, bar)
            res = fit_classifier(torch.from_numpy(tr.vectors[m_tr]),
                                 torch.from_numpy(tr.labels[m_tr]).float(),
                                 torch.from_numpy(va.vectors[m_va]),
                                 torch.from_numpy(va.labels[m_va]).float(), trainer, on_epoch=on_epoch)
        head_cfg = res.model.config.to_dict()  # type: ignore[union-attr]
        run = rw.commit(
            config={"modality": modality, "encoder_key": key, "head": head_cfg,
                    "trainer": trainer.to_dict(), "label_fraction": label_fraction, "seed": seed,
                    "where": where, "store": str(store.root.resolve()),
                    "n_train": int(m_tr.sum()), "n_train_pos": int(tr.labels[m_tr].sum()),
                    "n_val": int(m_va.sum())},
            tensors=_state(res.model), metrics=_fit_metrics(res))
    reporter_or_null(reporter).done(run)
    return run


def _need_both_classes(y: np.ndarray, what: str) -> None:
    n_pos = int(np.nansum(y))
    if n_pos == 0 or n_pos == len(y):
        raise ConfigError(f"The {what} ({len(y)} rows) hold only one class (positives: {n_pos}); "
                          "a classifier needs both. Raise --label-fraction or widen --where.")


def _fit_metrics(res: FitResult) -> dict[str, Any]:
    return {"val_auc": res.val_auc, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
            "seconds": round(res.seconds, 3), **res.extra}


def train_prior(
    store_path: str | os.PathLike[str],
    *,
    teacher: str = "latest:teacher",
    cxr_encoder: str | None = None,
    ctpa_encoder: str | None = None,
    where: str | None = None,
    label_fraction: float = 1.0,
    seed: int = 0,
    name: str | None = None,
    trainer: PriorTrainConfig | None = None,
    reporter: Reporter | None = None,
) -> Run:
    """Diffusion prior CXR -> CTPA-teacher embedding on all training pairs (label-free unless mu>0).

    ``reporter`` gets a bar over the epochs (each training-log row as status) and the run."""
    store = open_store(store_path)
    t_run, ctpa_key, cxr_key = _teacher_and_keys(store, teacher, cxr_encoder, ctpa_encoder)
    head = load_model(t_run)
    trainer = trainer or PriorTrainConfig(seed=seed)
    cx_tr, ct_tr, y_tr, pid_tr = _paired(store, cxr_key, ctpa_key, "train", where)
    cx_va, _, y_va, _ = _paired(store, cxr_key, ctpa_key, "val", where)
    m_va = ~np.isnan(y_va)
    _need_both_classes(y_va[m_va], "labelled validation pairs")
    labels = mask = None
    if trainer.mu > 0:
        keep = label_subset(sorted({p for p, y in zip(pid_tr, y_tr, strict=True) if y == y}),
                            label_fraction, seed)
        mask = torch.tensor([p in keep and y == y for p, y in zip(pid_tr, y_tr, strict=True)])
        labels = torch.from_numpy(np.nan_to_num(y_tr)).float()
    with RunWriter(store.runs_dir, "prior", name) as rw:
        with reporter_or_null(reporter).bar("train prior", trainer.epochs) as bar:
            on_epoch = _epoch_logger(rw, bar)
            res = fit_prior(torch.from_numpy(cx_tr), torch.from_numpy(ct_tr), head,
                            torch.from_numpy(cx_va[m_va]), torch.from_numpy(y_va[m_va]).float(),
                            trainer, labels_tr=labels, label_mask_tr=mask, on_epoch=on_epoch)
        prior: DiffusionPrior = res.model  # type: ignore[assignment]
        run = rw.commit(
            config={"teacher_run": t_run.run_id, "cxr_encoder_key": cxr_key,
                    "ctpa_encoder_key": ctpa_key, "encoder_key": cxr_key,
                    "prior": prior.config.to_dict(), "trainer": trainer.to_dict(),
                    "label_fraction": label_fraction if trainer.mu > 0 else t_run.config.get("label_fraction"),
                    "teacher_label_fraction": t_run.config.get("label_fraction"),
                    "seed": seed, "where": where, "store": str(store.root.resolve()),
                    "n_train_pairs": int(len(cx_tr)), "n_val": int(m_va.sum())},
            tensors=_state(prior), metrics=_fit_metrics(res))
    reporter_or_null(reporter).done(run)
    return run


#: What ``train baselines`` fits, in order (``kinds`` picks a subset).
BASELINE_KINDS = ("ridge_logit", "ridge_embed", "softlabel_kd")


def _teacher_and_keys(store: Store, teacher: str, cxr_encoder: str | None,
                      ctpa_encoder: str | None) -> tuple[Run, str, str]:
    """(teacher run, CTPA key, CXR key) for a prior, refusing a teacher of another encoder."""
    t_run = load_run(store.runs_dir, teacher)
    if t_run.kind != "teacher":
        raise IncompatibleRunError(f"--teacher {teacher!r} is a {t_run.kind!r} run, not a teacher.")
    ctpa_key = resolve_encoder(store, "CTPA", ctpa_encoder or str(t_run.config["encoder_key"]))
    t_run.require(encoder_key=ctpa_key)
    return t_run, ctpa_key, resolve_encoder(store, "CXR", cxr_encoder)


def train_paper_prior(
    store_path: str | os.PathLike[str],
    *,
    teacher: str = "latest:teacher",
    cxr_encoder: str | None = None,
    ctpa_encoder: str | None = None,
    where: str | None = None,
    seed: int = 0,
    name: str | None = None,
    trainer: PaperTrainConfig | None = None,
    reporter: Reporter | None = None,
) -> Run:
    """``train prior --preset paper``: the published prior recipe (``fit_paper_prior``) on the
    same paired train/val data as ``train_prior``; label-free. Writes a ``paper_prior`` run.

    ``reporter`` gets a bar over the epochs (each training-log row as status) and the run."""
    store = open_store(store_path)
    t_run, ctpa_key, cxr_key = _teacher_and_keys(store, teacher, cxr_encoder, ctpa_encoder)
    head = load_model(t_run)
    trainer = trainer or PaperTrainConfig(seed=seed)
    cx_tr, ct_tr, _, _ = _paired(store, cxr_key, ctpa_key, "train", where)
    cx_va, _, y_va, _ = _paired(store, cxr_key, ctpa_key, "val", where)
    m_va = ~np.isnan(y_va)
    _need_both_classes(y_va[m_va], "labelled validation pairs")
    with RunWriter(store.runs_dir, "paper_prior", name) as rw:
        with reporter_or_null(reporter).bar("train prior (paper preset)", trainer.epochs) as bar:
            res = fit_paper_prior(torch.from_numpy(cx_tr), torch.from_numpy(ct_tr), head,
                                  torch.from_numpy(cx_va[m_va]), torch.from_numpy(y_va[m_va]).float(),
                                  trainer, on_epoch=_epoch_logger(rw, bar))
        prior: PaperPrior = res.model  # type: ignore[assignment]
        run = rw.commit(
            config={"preset": "paper", "teacher_run": t_run.run_id, "cxr_encoder_key": cxr_key,
                    "ctpa_encoder_key": ctpa_key, "encoder_key": cxr_key,
                    "prior": prior.config.to_dict(), "trainer": trainer.to_dict(),
                    # label-free: the only labels behind it are the teacher's
                    "label_fraction": t_run.config.get("label_fraction"),
                    "teacher_label_fraction": t_run.config.get("label_fraction"),
                    "seed": seed, "where": where, "store": str(store.root.resolve()),
                    "n_train_pairs": int(len(cx_tr)), "n_val": int(m_va.sum())},
            tensors=_state(prior), metrics=_fit_metrics(res))
    reporter_or_null(reporter).done(run)
    return run


def train_baselines(
    store_path: str | os.PathLike[str],
    *,
    teacher: str = "latest:teacher",
    cxr_encoder: str | None = None,
    where: str | None = None,
    seed: int = 0,
    name: str | None = None,
    trainer: RidgeTrainConfig | None = None,
    kinds: Sequence[str] = BASELINE_KINDS,
    reporter: Reporter | None = None,
) -> list[Run]:
    """Ablations on all training pairs, none of which reads a training label: ridge CXR ->
    teacher logit, ridge CXR -> CTPA embedding, and ``softlabel_kd`` (a CXR head trained on the
    teacher's soft labels, sigmoid of its logit on each pair's CTPA embedding).

    ``kinds`` picks a subset of ``BASELINE_KINDS``. ``reporter`` gets each run as it is
    committed (the ridges are closed-form: no bar)."""
    unknown = [k for k in kinds if k not in BASELINE_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"Unknown baseline kind(s) {unknown or list(kinds)}. "
                          f"Valid: {', '.join(BASELINE_KINDS)}.")
    store = open_store(store_path)
    t_run = load_run(store.runs_dir, teacher)
    if t_run.kind != "teacher":
        raise IncompatibleRunError(f"--teacher {teacher!r} is a {t_run.kind!r} run, not a teacher.")
    ctpa_key = str(t_run.config["encoder_key"])
    cxr_key = resolve_encoder(store, "CXR", cxr_encoder)
    head = load_model(t_run)
    trainer = trainer or RidgeTrainConfig()
    # the training labels (third value) are dropped here: no baseline may read them
    cx_tr, ct_tr, _, _ = _paired(store, cxr_key, ctpa_key, "train", where)
    cx_va, _, y_va, _ = _paired(store, cxr_key, ctpa_key, "val", where)
    m_va = ~np.isnan(y_va)
    common = {"teacher_run": t_run.run_id, "cxr_encoder_key": cxr_key,
              "ctpa_encoder_key": ctpa_key, "encoder_key": cxr_key, "seed": seed, "where": where,
              "teacher_label_fraction": t_run.config.get("label_fraction"),
              "store": str(store.root.resolve()), "n_train_pairs": int(len(cx_tr))}
    runs = []
    fits: dict[str, Callable[..., FitResult]] = {"ridge_logit": fit_ridge_logit,
                                                 "ridge_embed": fit_ridge_embed}
    for kind in [k for k in BASELINE_KINDS if k in kinds]:
        if kind == "softlabel_kd":
            run = _train_softlabel_kd(store, head, cx_tr, ct_tr, cx_va[m_va], y_va[m_va],
                                      common, seed, name, reporter)
            runs.append(run)
            continue
        res = fits[kind](torch.from_numpy(cx_tr), torch.from_numpy(ct_tr), head,
                         torch.from_numpy(cx_va[m_va]), torch.from_numpy(y_va[m_va]).float(), trainer)
        model: RidgeRegression = res.model  # type: ignore[assignment]
        with RunWriter(store.runs_dir, kind, f"{name}-{kind}" if name else None) as rw:
            for row in res.history:
                rw.log(row)
            run = rw.commit(
                config={**common,
                        "ridge": {"in_dim": int(cx_tr.shape[1]),
                                  "out_dim": 1 if kind == "ridge_logit" else int(ct_tr.shape[1]),
                                  "alpha": float(res.extra["alpha"])},
                        "trainer": trainer.to_dict()},
                tensors=_state(model), metrics=_fit_metrics(res))
        reporter_or_null(reporter).done(run)
        runs.append(run)
    return runs


def _train_softlabel_kd(store: Store, teacher: torch.nn.Module, cx_tr: np.ndarray,
                        ct_tr: np.ndarray, cx_va: np.ndarray, y_va: np.ndarray,
                        common: dict[str, Any], seed: int, name: str | None,
                        reporter: Reporter | None) -> Run:
    """The softlabel_kd run: targets = sigmoid(teacher(CTPA)) of every training pair."""
    with torch.no_grad():
        soft = torch.sigmoid(teacher(torch.from_numpy(ct_tr)).float())  # (P,) in (0, 1)
    trainer = ClassifierTrainConfig(seed=seed)
    kind = "softlabel_kd"
    with RunWriter(store.runs_dir, kind, f"{name}-{kind}" if name else None) as rw:
        with reporter_or_null(reporter).bar(f"train {kind}", trainer.epochs) as bar:
            res = fit_softlabel_kd(torch.from_numpy(cx_tr), soft, torch.from_numpy(cx_va),
                                   torch.from_numpy(y_va).float(), trainer,
                                   on_epoch=_epoch_logger(rw, bar))
        run = rw.commit(
            config={**common, "modality": "CXR", "head": res.model.config.to_dict(),  # type: ignore[union-attr]
                    "trainer": trainer.to_dict(),
                    "targets": "sigmoid(teacher logit) of each training pair's CTPA embedding",
                    "uses_train_labels": False,
                    "soft_label_mean": float(soft.mean())},
            tensors=_state(res.model), metrics=_fit_metrics(res))
    reporter_or_null(reporter).done(run)
    return run


def _parse_sweep(items: Sequence[str]) -> list[dict[str, Any]]:
    """``["lambda=0,0.1,1", "mu=0,1"]`` -> the grid as a list of option dicts."""
    axes: list[tuple[str, list[Any]]] = []
    for it in items:
        if "=" not in it:
            raise ConfigError(f"--sweep must look like name=v1,v2,..., got {it!r}.")
        k, vals = it.split("=", 1)
        parsed: list[Any] = []
        for v in vals.split(","):
            v = v.strip()
            try:
                parsed.append(int(v) if v.lstrip("-").isdigit() else float(v))
            except ValueError:
                parsed.append(v)
        axes.append((k.strip(), parsed))
    return [dict(zip([a for a, _ in axes], combo, strict=True))
            for combo in itertools.product(*[v for _, v in axes])]


@dataclass(frozen=True)
class TrainingResult:
    """What ``run_training`` trained: the runs in order, and for a sweep (more than one grid
    point) each point's options with its run."""

    runs: tuple[Run, ...]
    sweep: tuple[tuple[dict[str, Any], Run], ...] = ()


def run_training(
    kind: str,
    store_path: str | os.PathLike[str],
    *,
    options: Mapping[str, Any],
    config_file: Path | None = None,
    sweep: Sequence[str] = (),
    reporter: Reporter | None = None,
) -> TrainingResult:
    """CLI entry: merge TOML config (top level + ``[kind]`` section) with flags, then train.

    ``sweep`` (prior only) trains one run per grid point; the result pairs each point with its
    run so that they can be compared."""
    if kind not in ("teacher", "cxr", "prior", "baselines"):
        raise ConfigError(f"Unknown training kind {kind!r}. Valid: teacher, cxr, prior, baselines.")
    merged = {**_read_config(config_file, kind), **dict(options)}
    preset = _check_preset(merged.pop("preset", "default")) if kind == "prior" else "default"
    grid = _parse_sweep(sweep) if sweep else [{}]
    if sweep and kind != "prior":
        raise ConfigError("--sweep is available for `train prior` only.")
    runs: list[Run] = []
    for point in grid:
        sel, tr = _split_options(kind, {**merged, **point}, preset)
        seed = int(sel.get("seed", 0))
        name = sel.get("name")
        if name and len(grid) > 1:
            name = name + "-" + "-".join(f"{k}{v}" for k, v in point.items())
        try:
            if kind in ("teacher", "cxr"):
                runs.append(train_classifier(
                    store_path, kind, encoder=sel.get("encoder"), where=sel.get("where"),
                    label_fraction=float(sel.get("label_fraction", 1.0)), seed=seed, name=name,
                    trainer=ClassifierTrainConfig(**tr), reporter=reporter))
            elif kind == "prior" and preset == "paper":
                runs.append(train_paper_prior(
                    store_path, teacher=sel.get("teacher", "latest:teacher"),
                    cxr_encoder=sel.get("cxr_encoder"), ctpa_encoder=sel.get("ctpa_encoder"),
                    where=sel.get("where"), seed=seed, name=name,
                    trainer=PaperTrainConfig(**tr), reporter=reporter))
            elif kind == "prior":
                runs.append(train_prior(
                    store_path, teacher=sel.get("teacher", "latest:teacher"),
                    cxr_encoder=sel.get("cxr_encoder"), ctpa_encoder=sel.get("ctpa_encoder"),
                    where=sel.get("where"), label_fraction=float(sel.get("label_fraction", 1.0)),
                    seed=seed, name=name, trainer=PriorTrainConfig(**tr), reporter=reporter))
            else:
                runs.extend(train_baselines(
                    store_path, teacher=sel.get("teacher", "latest:teacher"),
                    cxr_encoder=sel.get("cxr_encoder"), where=sel.get("where"), seed=seed,
                    name=name, trainer=RidgeTrainConfig(**tr) if tr else None,
                    reporter=reporter))
        except TypeError as e:  # a wrongly typed TOML value
            raise ConfigError(f"Bad option value for `train {kind}`: {e}") from e
    sweep_runs = tuple(zip(grid, runs, strict=True)) if len(grid) > 1 else ()
    return TrainingResult(runs=tuple(runs), sweep=sweep_runs)
