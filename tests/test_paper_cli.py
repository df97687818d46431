"""`train prior --preset paper` end to end (issue 11): CLI -> paper_prior run -> load_model -> eval.

A tiny store of synthetic vectors (no imaging) and a tiny transformer (width 16, one layer, two
epochs) given through --config, so the whole file runs in seconds; the recipe itself is tested in
test_paper_prior.py.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from embedstore.cli.app import app
from typer.testing import CliRunner

from embedstore import train as train_mod
from embedstore.evaluate import EvalResult, results_summary
from embedstore.fit import ClassifierTrainConfig
from embedstore.fit_paper import predict_paper_student
from embedstore.runs import load_run
from embedstore.store import open_store
from embedstore.train import load_model, train_classifier

runner = CliRunner()
N_PATIENTS = 60
DIM_CX, DIM_CT = 8, 6  # different widths, as real CXR and CTPA encoders have
# a transformer small enough for a unit test; everything else is the published recipe
TINY_TOML = ("[prior]\nwidth = 16\nlayers = 1\nheads = 2\nepochs = 2\neval_every = 1\n"
             "val_samples = 1\nval_steps = 2\nsample_steps = 4\nwarmup_steps = 2\n"
             "ema_update_after_step = 1\nema_update_every = 1\nnum_threads = 1\n")


def _manifest() -> pa.Table:
    rows = []
    t0 = datetime(2024, 1, 1)
    for i in range(N_PATIENTS):
        pid = f"P{i:03d}"
        split = "train" if i < 36 else ("val" if i < 48 else "test")
        label = int(i % 3 == 0)
        at = t0 + timedelta(days=i)
        rows.append((pid, f"{pid}-ct", "CTPA", at, label, split))
        rows.append((pid, f"{pid}-cx", "CXR", at - timedelta(hours=2), label, split))
    return pa.table({
        "patient_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "modality": [r[2] for r in rows], "path": [f"img/{r[1]}" for r in rows],
        "acquired_at": pa.array([r[3] for r in rows], pa.timestamp("us")),
        "label_pe": pa.array([r[4] for r in rows], pa.int8()),
        "split": [r[5] for r in rows],
    })


def _write_set(store, modality: str, key: str, ids: list[str], seed: int, dim: int,
               shift: float) -> None:
    rng = np.random.default_rng(seed)
    with store.writer(modality, key, dim=dim, spec={"synthetic": key}) as w:
        for sid in ids:
            pid = sid.split("-")[0]
            y = int(int(pid[1:]) % 3 == 0)
            v = rng.standard_normal(dim).astype(np.float32) + shift * y
            w.add(study_id=sid, patient_id=pid, cache_key=f"{key}:{sid}", content_hash=sid, vector=v)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper") / "store"
    store = open_store(root, create=True)
    m = _manifest()
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    _write_set(store, "CTPA", "ct", [s for s in ids if s.endswith("-ct")], 1, DIM_CT, 2.0)
    _write_set(store, "CXR", "cx", [s for s in ids if s.endswith("-cx")], 2, DIM_CX, 0.8)
    fast = ClassifierTrainConfig(epochs=3, patience=2)
    train_classifier(root, "teacher", trainer=fast, name="teacher")
    train_classifier(root, "cxr", trainer=fast, name="cxr")
    return root


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    p.write_text(TINY_TOML)
    return p


def _train(store_dir: Path, cfg: Path, name: str, *extra: str) -> tuple[int, str]:
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--teacher", "teacher", "--preset",
                            "paper", "--config", str(cfg), "--seed", "3", "--name", name, *extra])
    return r.exit_code, r.output


@pytest.fixture(scope="module")
def paper_runs(store_dir: Path, tiny_toml: Path) -> dict[str, str]:
    for name, extra in (("paper-a", ()), ("paper-b", ()), ("paper-ng", ("--published-nograd",))):
        code, out = _train(store_dir, tiny_toml, name, *extra)
        assert code == 0, out
    return {"a": "paper-a", "b": "paper-b", "nograd": "paper-ng"}


def _tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_writes_a_paper_prior_run_that_records_its_recipe(store_dir: Path,
                                                              paper_runs: dict[str, str]) -> None:
    run = load_run(store_dir / "runs", paper_runs["a"])
    c = run.config
    assert run.kind == "paper_prior" and c["preset"] == "paper"
    assert (c["teacher_run"], c["cxr_encoder_key"], c["ctpa_encoder_key"], c["seed"]) == ("teacher", "cx", "ct", 3)
    assert c["n_train_pairs"] == 36  # every training pair, labelled or not
    assert c["trainer"]["tokens"] == 4 and c["trainer"]["published_nograd"] is False
    assert c["trainer"]["width"] == c["prior"]["width"] == 16  # the TOML reached the recipe
    assert c["trainer"]["lr"] == 1.1e-4 and c["prior"]["num_train_timesteps"] == 64  # the rest is the paper's
    assert (c["prior"]["cond_dim"], c["prior"]["target_dim"], c["prior"]["null_tokens"]) == (DIM_CX, DIM_CT, 0)
    assert run.metrics["steps"] == 2  # 36 pairs at batch 64: one step per epoch, two epochs
    log = (run.path / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [0, 1]


def test_tokens_81_is_the_published_layout(store_dir: Path, tiny_toml: Path) -> None:
    code, out = _train(store_dir, tiny_toml, "paper-81", "--tokens", "81")
    assert code == 0, out
    run = load_run(store_dir / "runs", "paper-81")
    assert run.config["trainer"]["tokens"] == 81 and run.config["prior"]["null_tokens"] == 77
    assert load_model(run).config.num_tokens == 81


def test_published_nograd_is_recorded_and_trains_another_model(store_dir: Path,
                                                                paper_runs: dict[str, str]) -> None:
    runs = {k: load_run(store_dir / "runs", v) for k, v in paper_runs.items()}
    assert runs["nograd"].config["trainer"]["published_nograd"] is True
    assert runs["nograd"].metrics["published_nograd"] is True
    # same seed, same options: identical weights, so the difference below is the switch alone
    assert _tensors_equal(runs["a"].weights(), runs["b"].weights())
    assert not _tensors_equal(runs["a"].weights(), runs["nograd"].weights())


def test_load_model_round_trip_gives_the_same_predictions(store_dir: Path, tiny_toml: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fitted = {}
    real = train_mod.fit_paper_prior

    def spy(*a, **k):  # keep the in-memory model that training wrote
        res = real(*a, **k)
        fitted["model"] = res.model
        return res

    monkeypatch.setattr(train_mod, "fit_paper_prior", spy)
    code, out = _train(store_dir, tiny_toml, "paper-rt")
    assert code == 0, out
    run = load_run(store_dir / "runs", "paper-rt")
    loaded = load_model(run)
    teacher = load_model(load_run(store_dir / "runs", "teacher"))
    x = torch.from_numpy(open_store(store_dir).load("CXR", "cx").vectors[:10])
    assert int(loaded.selected_ema) == int(fitted["model"].selected_ema)
    p0, s0, e0 = predict_paper_student(fitted["model"], teacher, x, 3, 4, 2, seed=5, num_threads=1)
    p1, s1, e1 = predict_paper_student(loaded, teacher, x, 3, 4, 2, seed=5, num_threads=1)
    assert torch.equal(p0, p1) and torch.equal(s0, s1) and torch.equal(e0, e1)


def test_eval_scores_the_paper_arms_in_table_comparisons_and_results(
        store_dir: Path, paper_runs: dict[str, str], tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", str(store_dir), "--run", "teacher", "--run", "cxr", "--run",
                            paper_runs["a"], "--run", paper_runs["nograd"], "--samples", "2",
                            "--bootstrap", "200", "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    models = {m["key"]: m for m in res["models"]}
    assert set(models) == {"ctpa_only", "cxr_only", "paper", "paper_nograd"}
    assert models["paper"]["model"] == "Distilled CXR (paper preset)"
    assert models["paper"]["run_id"] == paper_runs["a"]
    assert "delta_auc_vs_cxr_only" in models["paper"]
    pairs = {(c["model"], c["reference"]) for c in res["comparisons"]}
    assert {("paper", "cxr_only"), ("paper", "ctpa_only"), ("paper_nograd", "cxr_only")} <= pairs
    got = pq.read_table(tmp_path / "rep" / "predictions.parquet")
    assert {"p_paper", "std_paper", "p_paper_nograd"} <= set(got.column_names)
    # the paper arm is predict_paper_student with the run's sampling (sample_steps, best-of)
    st = open_store(store_dir)
    es = st.load("CXR", "cx")
    pos = {s: i for i, s in enumerate(es.meta["study_id"].to_pylist())}
    x = torch.from_numpy(es.vectors[[pos[s] for s in got["cxr_study_id"].to_pylist()]])
    run = load_run(st.runs_dir, paper_runs["a"])
    tr = run.config["trainer"]
    p, _, _ = predict_paper_student(load_model(run), load_model(load_run(st.runs_dir, "teacher")), x,
                                    2, tr["sample_steps"], tr["sample_best_of"], seed=0, num_threads=1)
    np.testing.assert_allclose(got["p_paper"].to_numpy(), p.double().numpy(), rtol=0, atol=1e-12)
    summary = results_summary(_result_from_json(res))
    assert {"paper", "paper_nograd"} <= set(summary)
    assert summary["paper"]["run_id"] == paper_runs["a"]


def _result_from_json(d: dict) -> EvalResult:
    """Just what results_summary reads (the demo's results.json) from a metrics.json."""
    return EvalResult(split=d["split"], n=d["n"], n_pos=d["n_pos"], models=d["models"],
                      comparisons=d["comparisons"], retrieval=d["retrieval"], config=d["config"],
                      notes=d["notes"], out_dir=Path(d["out_dir"]))




@pytest.mark.parametrize("args,line", [
    (["--preset", "paper", "--lambda", "0.1"],
     "Error: --lambda does not apply to `train prior --preset paper`: its loss is the published "
     "0.8 MSE + 0.2 BCE through the teacher, label-free (mse_weight and teacher_weight in --config "
     "change it). Drop --lambda, or train without --preset paper."),
    (["--preset", "paper", "--mu", "1"],
     "Error: --mu does not apply to `train prior --preset paper`: its loss is the published "
     "0.8 MSE + 0.2 BCE through the teacher, label-free (mse_weight and teacher_weight in --config "
     "change it). Drop --mu, or train without --preset paper."),
    (["--tokens", "81"],
     "Error: --tokens applies only to `train prior --preset paper` (the published recipe). "
     "Add --preset paper, or drop --tokens."),
    (["--published-nograd"],
     "Error: --published-nograd applies only to `train prior --preset paper` (the published "
     "recipe). Add --preset paper, or drop --published-nograd."),
    (["--preset", "fancy"], "Error: Unknown preset 'fancy' for `train prior`. Valid: default, paper."),
    (["--preset", "paper", "--tokens", "3"],
     "Error: tokens must be 4 (condition, time, noisy target, query) or more (null tokens first; "
     "81 is the published layout), got 3."),
])
def test_refused_options_name_the_option(store_dir: Path, args: list[str], line: str) -> None:
    before = sorted(p.name for p in (store_dir / "runs").iterdir())
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--teacher", "teacher", *args])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == line
    assert sorted(p.name for p in (store_dir / "runs").iterdir()) == before  # nothing written


def test_a_paper_only_key_in_a_toml_config_is_refused_without_the_preset(
        store_dir: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[prior]\npublished_nograd = true\n")
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith(
        "Error: --published-nograd applies only to `train prior --preset paper`")
    cfg.write_text('preset = "paper"\n[prior]\nhidden = 32\n')
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--config", str(cfg)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1].startswith(
        "Error: Unknown option 'hidden' for `train prior --preset paper`. Valid: ")
