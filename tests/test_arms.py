"""The arms that show what the diffusion adds (issue 11): ridge_mean_only, prior_plain,
softlabel_kd, and every arm's paired dAUC vs cxr_only and vs distilled (patient bootstrap).

One small store of synthetic vectors (no imaging); test patients have two CTPA studies each,
so the patient-clustered bootstrap differs from a case bootstrap. Each test names the one-line
change it catches.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from embedstore import metrics as M
from embedstore.evaluate import EvalConfig, EvalResult, evaluate, results_summary
from embedstore.fit import ClassifierTrainConfig, PriorTrainConfig, fit_softlabel_kd
from embedstore.runs import Run
from embedstore.store import open_store
from embedstore.train import load_model, train_baselines, train_classifier, train_prior

N_PATIENTS = 72
DIM = 8
FAST_CLS = ClassifierTrainConfig(epochs=3, patience=2)
FAST_PRIOR = PriorTrainConfig(epochs=2, eval_every=1, hidden=16, depth=1, val_samples=1,
                              val_steps=2)
N_BOOT = 200


def _split(i: int) -> str:
    return "train" if i < 40 else ("val" if i < 56 else "test")


def _label(i: int) -> int:
    return int(i % 3 == 0)


def _manifest(train_labels: dict[str, int | None] | None = None) -> pa.Table:
    """One CTPA + CXR per patient; test patients have a second pair 30 days later."""
    rows = []
    t0 = datetime(2024, 1, 1)
    for i in range(N_PATIENTS):
        pid, split = f"P{i:03d}", _split(i)
        label: int | None = _label(i)
        if split == "train" and train_labels is not None:
            label = train_labels[pid]
        visits = 2 if split == "test" else 1
        for v in range(visits):
            at = t0 + timedelta(days=i, hours=0) + timedelta(days=30 * v)
            rows.append((pid, f"{pid}-{v}-ct", "CTPA", at, label, split))
            rows.append((pid, f"{pid}-{v}-cx", "CXR", at - timedelta(hours=2), label, split))
    return pa.table({
        "patient_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "modality": [r[2] for r in rows], "path": [f"img/{r[1]}" for r in rows],
        "acquired_at": pa.array([r[3] for r in rows], pa.timestamp("us")),
        "label_pe": pa.array([r[4] for r in rows], pa.int8()),
        "split": [r[5] for r in rows],
    })


def _write_set(store, modality: str, key: str, ids: list[str], seed: int, signal: float) -> None:
    rng = np.random.default_rng(seed)
    with store.writer(modality, key, dim=DIM, spec={"synthetic": key}) as w:
        for sid in ids:
            pid = sid.split("-")[0]
            # the signal sits in a random direction plus a shift, so ridge and diffusion differ
            v = rng.standard_normal(DIM).astype(np.float32) + signal * _label(int(pid[1:]))
            w.add(study_id=sid, patient_id=pid, cache_key=f"{key}:{sid}", content_hash=sid,
                  vector=v)


def _make_store(root: Path, train_labels: dict[str, int | None] | None = None) -> Path:
    store = open_store(root, create=True)
    m = _manifest(train_labels)
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    _write_set(store, "CTPA", "ct", [s for s in ids if s.endswith("-ct")], 1, 1.5)
    _write_set(store, "CXR", "cx", [s for s in ids if s.endswith("-cx")], 3, 0.6)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run | Path]:
    root = _make_store(tmp_path_factory.mktemp("arms") / "store")
    t = train_classifier(root, "teacher", label_fraction=0.5, trainer=FAST_CLS, name="teacher")
    c = train_classifier(root, "cxr", label_fraction=0.5, trainer=FAST_CLS, name="cxr")
    # the plain prior is trained (and listed) first: its arm name must come from its config
    plain = train_prior(root, teacher="teacher", name="a-first-prior",
                        trainer=FAST_PRIOR.replace(mean_model="none"))
    prior = train_prior(root, teacher="teacher", name="b-second-prior", trainer=FAST_PRIOR)
    base = train_baselines(root, teacher="teacher", name="base")
    return {"root": root, "teacher": t, "cxr": c, "plain": plain, "prior": prior,
            **{r.kind: r for r in base}}


@pytest.fixture(scope="module")
def result(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> EvalResult:
    runs = [trained[k].run_id for k in ("plain", "cxr", "teacher", "prior", "ridge_logit",
                                        "softlabel_kd")]
    return evaluate(trained["root"], EvalConfig(
        runs=tuple(runs), out_dir=tmp_path_factory.mktemp("report"), num_samples=2, steps=2,
        n_bootstrap=N_BOOT, sampling_grid=False, label_efficiency=False))


def _rows(result: EvalResult) -> dict[str, dict]:
    return {m["key"]: m for m in result.models}


def _predictions(result: EvalResult) -> pa.Table:
    return pq.read_table(result.out_dir / "predictions.parquet")


def test_every_arm_is_in_the_table(result: EvalResult) -> None:
    assert list(_rows(result)) == ["prior_plain", "cxr_only", "ctpa_only", "distilled",
                                   "ridge_mean_only", "ridge_logit", "softlabel_kd"]


def test_ridge_mean_only_is_the_teacher_on_the_priors_own_mean(trained: dict,
                                                               result: EvalResult) -> None:
    # catches: scoring the diffusion samples (or the plain prior's mean) instead of the ridge mean
    pred = _predictions(result)
    es = open_store(trained["root"]).load("CXR", "cx")
    pos = {s: i for i, s in enumerate(es.meta["study_id"].to_pylist())}
    x = torch.from_numpy(es.vectors[[pos[s] for s in pred["cxr_study_id"].to_pylist()]])
    w = trained["prior"].weights()
    mean_std = ((x - w["cond_mean"]) / w["cond_std"]) @ w["mean_weight"] + w["mean_bias"]
    emb = mean_std * w["target_std"] + w["target_mean"]  # (N, Dc) raw CTPA embedding
    teacher = load_model(trained["teacher"])
    with torch.no_grad():
        want = torch.sigmoid(teacher(emb)).double().numpy()
    got = pred["p_ridge_mean_only"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.std(got) > 1e-3  # a real per-case mean, not the constant training mean
    assert not np.allclose(got, pred["p_distilled"].to_numpy())
    row = _rows(result)["ridge_mean_only"]
    assert row["derived_from"] == trained["prior"].run_id
    assert row["auc"] == pytest.approx(M.roc_auc(pred["label_pe"].to_numpy(), got))


def test_a_note_says_what_the_diffusion_adds_over_its_mean(result: EvalResult) -> None:
    row = _rows(result)["ridge_mean_only"]
    note = next(n for n in result.notes if n.startswith("What the diffusion adds"))
    lo, hi = row["delta_auc_vs_distilled_ci"]
    assert f"dAUC {-row['delta_auc_vs_distilled']:+.3f} [{-hi:+.3f}, {-lo:+.3f}]" in note


def test_prior_plain_is_named_by_its_config_not_by_run_order(trained: dict,
                                                             result: EvalResult) -> None:
    # catches: naming the first prior "distilled", or deriving a mean-only arm from a plain prior
    rows = _rows(result)
    assert rows["prior_plain"]["run_id"] == trained["plain"].run_id
    assert rows["distilled"]["run_id"] == trained["prior"].run_id
    assert [k for k in rows if k.startswith("ridge_mean_only")] == ["ridge_mean_only"]
    assert trained["plain"].config["prior"]["mean_model"] == "none"


def test_every_arm_has_a_paired_delta_vs_cxr_only_and_vs_distilled(result: EvalResult) -> None:
    # catches: a case bootstrap where patients have several studies; a missing or unsigned delta
    pred = _predictions(result)
    y = pred["label_pe"].to_numpy()
    groups = [s.split("-")[0] for s in pred["ctpa_study_id"].to_pylist()]
    assert len(set(groups)) < len(groups)  # test patients have two cases each
    rows = _rows(result)
    for key in ("prior_plain", "ridge_mean_only", "ridge_logit", "softlabel_kd"):
        for ref, dkey, cikey in (("cxr_only", "delta_auc_vs_cxr_only", "delta_auc_ci"),
                                 ("distilled", "delta_auc_vs_distilled",
                                  "delta_auc_vs_distilled_ci")):
            d, lo, hi = M.cluster_paired_bootstrap_delta(
                y, pred[f"p_{key}"].to_numpy(), pred[f"p_{ref}"].to_numpy(), groups,
                n_resamples=N_BOOT, seed=0)
            assert rows[key][dkey] == pytest.approx(d, abs=1e-12), (key, ref)
            assert rows[key][cikey] == pytest.approx([lo, hi], abs=1e-9), (key, ref)
    assert rows["cxr_only"]["delta_auc_vs_distilled"] == pytest.approx(
        -rows["distilled"]["delta_auc_vs_cxr_only"], abs=1e-12)
    assert "delta_auc_vs_distilled" not in rows["distilled"]
    lo, hi = M.cluster_bootstrap_auc_ci(y, pred["p_distilled"].to_numpy(), groups,
                                        n_resamples=N_BOOT, seed=0)
    assert rows["distilled"]["auc_ci"] == pytest.approx([lo, hi])
    assert rows["distilled"]["auc_ci_method"] == "patient_bootstrap"


def test_the_markdown_and_html_tables_carry_both_deltas(result: EvalResult) -> None:
    for name in ("metrics.md", "report.html"):
        text = (result.out_dir / name).read_text()
        assert "ΔAUC vs distilled" in text and "ΔAUC vs CXR-only" in text, name
        assert "ridge_mean_only" in text or "ridge mean" in text, name


def test_unknown_baseline_kind_names_the_valid_ones(trained: dict) -> None:
    from embedstore.errors import ConfigError

    with pytest.raises(ConfigError, match="Valid: ridge_logit, ridge_embed, softlabel_kd"):
        train_baselines(trained["root"], teacher="teacher", kinds=("ridge",))


def test_results_json_keeps_its_keys_and_adds_the_new_ones(result: EvalResult) -> None:
    s = results_summary(result)
    for key in ("ctpa_only", "cxr_only", "distilled", "ridge_logit", "ridge_mean_only",
                "prior_plain", "softlabel_kd"):
        assert {"auc", "auc_ci", "accuracy", "sensitivity", "specificity", "auprc",
                "run_id"} <= set(s[key])
    assert {"delta_auc_vs_cxr_only", "delta_auc_ci", "delta_auc_delong_p",
            "delta_auc_vs_distilled", "delta_auc_vs_distilled_ci"} <= set(s["softlabel_kd"])


def test_softlabel_kd_records_its_teacher_and_reads_no_training_label(
        trained: dict, tmp_path: Path) -> None:
    # catches: fitting the head to the pairs' ground-truth labels instead of the teacher's
    kd = trained["softlabel_kd"]
    assert kd.config["teacher_run"] == trained["teacher"].run_id
    assert kd.config["uses_train_labels"] is False
    # the same store with the training labels shuffled across patients, and some removed
    pids = [f"P{i:03d}" for i in range(N_PATIENTS) if _split(i) == "train"]
    perm = np.random.default_rng(7).permutation(len(pids))
    shuffled: dict[str, int | None] = {p: _label(int(pids[j][1:]))
                                       for p, j in zip(pids, perm, strict=True)}
    for p in pids[::5]:
        shuffled[p] = None
    other = _make_store(tmp_path / "other", shuffled)
    shutil.copytree(trained["teacher"].path, other / "runs" / "teacher")
    (kd2,) = train_baselines(other, teacher="teacher", kinds=("softlabel_kd",), name="base")
    a, b = kd.weights(), kd2.weights()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the control: a head that does learn from training labels changes with them
    c2 = train_classifier(other, "cxr", label_fraction=0.5, trainer=FAST_CLS, name="cxr")
    wa, wb = trained["cxr"].weights(), c2.weights()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_fit_softlabel_kd_follows_the_soft_targets() -> None:
    # catches: dropping the soft targets for thresholded (hard) ones, or ignoring them
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, DIM, generator=g)
    w = torch.randn(DIM, generator=g)
    q = torch.sigmoid(x @ w)  # (N,) soft targets from a known logit
    xv = torch.randn(100, DIM, generator=g)
    yv = (torch.sigmoid(xv @ w) > torch.rand(100, generator=g)).float()
    res = fit_softlabel_kd(x, q, xv, yv, ClassifierTrainConfig(epochs=60, patience=60, lr=3e-2))
    with torch.no_grad():
        logit = res.model(x)
    r = np.corrcoef(logit.numpy(), (x @ w).numpy())[0, 1]
    assert r > 0.95
    with pytest.raises(Exception, match="probabilities in"):
        fit_softlabel_kd(x, q * 2, xv, yv, ClassifierTrainConfig(epochs=1))


def test_the_eval_table_shows_both_deltas_of_every_arm(result: EvalResult,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # catches: the delta table dropping the vs-distilled column or an arm's row
    import io

    from embedstore.cli import render
    from rich.console import Console

    buf = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=buf, width=80, highlight=False))
    render.eval_result(result)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    header = next(line for line in text.splitlines() if "ΔAUC vs distilled" in line)
    assert "ΔAUC vs cxr_only" in header
    rows = _rows(result)
    for key in ("prior_plain", "ridge_mean_only", "ridge_logit", "softlabel_kd"):
        # the delta row holds two CIs; the AUC row above holds one
        line = next(ln for ln in text.splitlines()
                    if ln.startswith(f" {key} ") and ln.count("[") == 2)
        assert f"{rows[key]['delta_auc_vs_distilled']:+.3f}" in line
        assert f"{rows[key]['delta_auc_vs_cxr_only']:+.3f}" in line
