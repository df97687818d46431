"""End to end on a tiny synthetic cohort: synth -> extract -> train -> eval, through the library
and the CLI. One cohort and one store are built per module and shared (the expensive part)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from embedstore.cli.app import app
from reporting import RecordingReporter
from typer.testing import CliRunner

from embedstore.extract import ExtractConfig, extract
from embedstore.fit import ClassifierTrainConfig, PriorTrainConfig
from embedstore.phantom import PhantomSpec
from embedstore.store import Store, open_store
from embedstore.synth import synthesize_cohort
from embedstore.train import train_baselines, train_classifier, train_prior

pytestmark = pytest.mark.slow

CXR_ENC, CT_ENC = "test-tiny-vit", "test-tiny-ctpa"
runner = CliRunner()


def _cfg(modality: str, **kw: object) -> ExtractConfig:
    enc = CXR_ENC if modality == "cxr" else CT_ENC
    return ExtractConfig(modality=modality, encoder=enc, workers=0, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    spec = PhantomSpec.with_shape((16, 48, 48), prevalence=0.5)
    synthesize_cohort(out, n_patients=40, seed=3, spec=spec, workers=1)
    return out


@pytest.fixture(scope="module")
def store_dir(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("store") / "s"
    for m in ("cxr", "ctpa"):
        s = extract(store, cohort / "manifest.parquet", _cfg(m))
        assert s.done == 40 and s.failed == 0
    return store


def test_rerun_is_fully_cached_and_cheap(store_dir: Path, cohort: Path) -> None:
    s = extract(store_dir, cohort / "manifest.parquet", _cfg("ctpa"))
    assert (s.done, s.cached, s.failed) == (0, 40, 0)


def test_moving_the_image_folder_recomputes_nothing(store_dir: Path, cohort: Path,
                                                    tmp_path: Path) -> None:
    moved = tmp_path / "renamed-cohort"
    shutil.copytree(cohort, moved, symlinks=True, copy_function=shutil.copy2)  # keeps mtimes
    before = open_store(store_dir).load("CXR", _key(store_dir, "CXR")).vectors.copy()
    s = extract(store_dir, moved / "manifest.parquet", _cfg("cxr"))
    assert (s.done, s.cached) == (0, 40)
    after = open_store(store_dir).load("CXR", _key(store_dir, "CXR")).vectors
    assert np.array_equal(before, after)


def test_changed_pixels_recompute_exactly_that_study(cohort: Path, tmp_path: Path) -> None:
    import pydicom

    local = tmp_path / "c"
    shutil.copytree(cohort, local, symlinks=True, copy_function=shutil.copy2)
    store = tmp_path / "s"
    extract(store, local / "manifest.parquet", _cfg("cxr", where="split = 'test'"))
    f = local / "dicom" / "SYN-0007" / "cxr.dcm"
    ds = pydicom.dcmread(f)
    arr = ds.pixel_array.copy()
    arr[:8, :8] = 0
    ds.PixelData = arr.tobytes()
    ds.save_as(f)
    sid = "SYN-0007-CXR"
    in_test = sid in open_store(store).sql(
        "SELECT study_id FROM studies WHERE split='test'")["study_id"].to_pylist()
    s = extract(store, local / "manifest.parquet", _cfg("cxr", where="split = 'test'"))
    assert s.done == (1 if in_test else 0)
    assert s.cached == s.selected - s.done


def test_weights_change_makes_a_new_set_and_both_stay_queryable(store_dir: Path, cohort: Path,
                                                                tmp_path: Path) -> None:
    import torch
    from embedstore.models.encoders import create_encoder
    from safetensors.torch import save_file

    enc = create_encoder(CXR_ENC)
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    first = next(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 2)
    # Seeded noise, not a constant: a constant shift of the positional embedding is removed by
    # the next LayerNorm, so the "new" weights would embed (almost) identically.
    g = torch.Generator().manual_seed(0)
    sd[first] += 0.1 * torch.randn(sd[first].shape, generator=g)
    wfile = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(wfile))
    store = tmp_path / "s"
    extract(store, cohort / "manifest.parquet", _cfg("cxr", where="split = 'val'"))
    extract(store, cohort / "manifest.parquet", _cfg("cxr", where="split = 'val'", weights=str(wfile)))
    st = open_store(store)
    keys = sorted(s.encoder_key for s in st.sets())
    assert len(keys) == 2
    q = st.sql("SELECT encoder_key, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1")
    assert q["n"].to_pylist()[0] == q["n"].to_pylist()[1] > 0
    a, b = (st.load("CXR", k).vectors for k in keys)
    assert not np.allclose(a, b)
    del torch


def test_failures_are_recorded_and_extraction_goes_on(cohort: Path, tmp_path: Path) -> None:
    local = tmp_path / "c"
    shutil.copytree(cohort, local, symlinks=True)
    (local / "dicom" / "SYN-0002" / "cxr.dcm").write_bytes(b"this is not a DICOM file")
    f = local / "dicom" / "SYN-0003" / "cxr.dcm"
    f.write_bytes(f.read_bytes()[:2000])  # truncated
    store = tmp_path / "s"
    s = extract(store, local / "manifest.parquet", _cfg("cxr"))
    assert s.failed == 2 and s.done == 38
    assert s.failures_by_reason == {"not_dicom": 1, "truncated": 1}
    fails = open_store(store).sql("SELECT study_id, stage, reason FROM failures ORDER BY 1").to_pylist()
    assert [(r["study_id"], r["reason"]) for r in fails] == [
        ("SYN-0002-CXR", "not_dicom"), ("SYN-0003-CXR", "truncated")]
    # strict stops at the first failure, with what was done before it committed
    s2 = extract(tmp_path / "s2", local / "manifest.parquet", _cfg("cxr", strict=True))
    assert s2.failed == 1 and s2.done + s2.failed < 40


def _key(store: Path, modality: str) -> str:
    return next(s.encoder_key for s in open_store(store).sets() if s.modality == modality)


def test_two_shards_equal_one_process(store_dir: Path, cohort: Path, tmp_path: Path) -> None:
    store = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "embedstore.cli.app", "extract", str(store), "-m",
           str(cohort / "manifest.parquet"), "--modality", "cxr", "--encoder", CXR_ENC,
           "--workers", "0", "--json"]
    procs = [subprocess.Popen([*cmd, "--shard", f"{k}/2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, e) in zip(procs, outs, strict=True):
        assert p.returncode == 0, e
    done = [json.loads(o)["done"] for o, _ in outs]
    assert sum(done) == 40 and min(done) > 0
    key = _key(store_dir, "CXR")
    a = open_store(store).load("CXR", key)
    b = open_store(store_dir).load("CXR", key)
    assert a.meta["study_id"].to_pylist() == b.meta["study_id"].to_pylist()
    assert np.array_equal(a.vectors, b.vectors)


# ------------------------------------------------------------------------------------------
# training and evaluation
# ------------------------------------------------------------------------------------------

FAST_CLS = ClassifierTrainConfig(epochs=15, patience=5)
FAST_PRIOR = PriorTrainConfig(epochs=6, eval_every=3, hidden=64, depth=1, val_samples=2, val_steps=3)


@pytest.fixture(scope="module")
def trained(store_dir: Path) -> dict[str, str]:
    rec = RecordingReporter()
    t = train_classifier(store_dir, "teacher", trainer=FAST_CLS, name="t0", reporter=rec)
    # progress is reported, not printed: one bar over the epochs fed the training-log rows,
    # then the committed run
    [bar] = rec.bars
    assert (bar.description, bar.total, bar.closed) == ("train teacher", FAST_CLS.epochs, True)
    assert [u[0] for u in bar.updates] == list(range(1, t.metrics["epochs_run"] + 1))
    assert all(isinstance(u[2], dict) and "train_loss" in u[2] for u in bar.updates)
    assert rec.results == [t]
    c = train_classifier(store_dir, "cxr", trainer=FAST_CLS, name="c0")
    p = train_prior(store_dir, teacher="t0", trainer=FAST_PRIOR, name="p0")
    rec = RecordingReporter()
    b = train_baselines(store_dir, teacher="t0", name="b0", reporter=rec)
    # the ridge baselines are closed-form (no bar); soft-label KD trains a head over epochs
    assert rec.results == b
    assert [(x.description, x.closed) for x in rec.bars] == [("train softlabel_kd", True)]
    return {"teacher": t.run_id, "cxr": c.run_id, "prior": p.run_id,
            **{r.kind: r.run_id for r in b}}


def test_runs_are_complete_and_visible_in_sql(store_dir: Path, trained: dict[str, str]) -> None:
    for run_id in trained.values():
        d = store_dir / "runs" / run_id
        assert {p.name for p in d.iterdir()} >= {"config.json", "weights.safetensors",
                                                 "metrics.json", "train_log.jsonl"}
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["provenance"]["versions"]["torch"]
    q = open_store(store_dir).sql("SELECT run_id, kind FROM runs ORDER BY run_id")
    assert set(q["run_id"].to_pylist()) >= set(trained.values())


def test_training_never_reads_the_test_split(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    test_ids = set(open_store(store_dir).sql(
        "SELECT study_id FROM studies WHERE split = 'test'")["study_id"].to_pylist())
    assert test_ids
    seen: list[str] = []
    orig_load, orig_sql = Store.load, Store.sql

    def spy_load(self: Store, *a: object, **k: object):  # type: ignore[no-untyped-def]
        es = orig_load(self, *a, **k)  # type: ignore[arg-type]
        seen.extend(es.meta["study_id"].to_pylist())
        return es

    def spy_sql(self: Store, sql: str, **k: object):  # type: ignore[no-untyped-def]
        t = orig_sql(self, sql, **k)  # type: ignore[arg-type]
        for col in ("study_id", "cxr_study_id", "ctpa_study_id"):
            if col in t.column_names:
                seen.extend(t[col].to_pylist())
        return t

    monkeypatch.setattr(Store, "load", spy_load)
    monkeypatch.setattr(Store, "sql", spy_sql)
    train_classifier(store_dir, "teacher", trainer=FAST_CLS, name="t-spy")
    train_prior(store_dir, teacher="t-spy", trainer=FAST_PRIOR, name="p-spy")
    assert seen and not (set(seen) & test_ids)


def test_training_is_deterministic_for_a_seed(store_dir: Path) -> None:
    a = train_classifier(store_dir, "cxr", trainer=FAST_CLS, seed=5, name="d1")
    b = train_classifier(store_dir, "cxr", trainer=FAST_CLS, seed=5, name="d2")
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_prior_refuses_a_teacher_from_another_encoder(store_dir: Path) -> None:
    from embedstore.errors import ConfigError, IncompatibleRunError

    with pytest.raises((IncompatibleRunError, ConfigError)) as e:
        train_prior(store_dir, teacher="t0", ctpa_encoder="not-a-key", trainer=FAST_PRIOR)
    assert "not-a-key" in str(e.value)


def test_eval_writes_table_figures_and_report(store_dir: Path, trained: dict[str, str],
                                              tmp_path: Path) -> None:
    r = runner.invoke(app, ["eval", str(store_dir), "--run", trained["teacher"], "--run",
                            trained["cxr"], "--run", trained["prior"], "--compare",
                            trained["ridge_logit"], "--bootstrap", "200", "--samples", "2",
                            "--out", str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert json.loads(r.output) == res  # --json prints EvalResult.to_dict(), metrics.json's content
    keys = [m["key"] for m in res["models"]]
    # a ridge-mean prior brings its own no-diffusion arm (the teacher on the prior's mean)
    assert keys == ["ctpa_only", "cxr_only", "distilled", "ridge_mean_only", "ridge_logit"]
    for m in res["models"]:
        assert 0.0 <= m["auc"] <= 1.0 and m["auc_ci"][0] <= m["auc"] <= m["auc_ci"][1]
        assert m["threshold_source"] == "val_youden"
    assert any(c["model"] == "distilled" and c["reference"] == "cxr_only" for c in res["comparisons"])
    assert any(c["model"] == "ridge_mean_only" and c["reference"] == "distilled"
               for c in res["comparisons"])
    html = (tmp_path / "rep" / "report.html").read_text()
    for png in ("roc.png", "reliability.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000
        assert png in html
    assert res["retrieval"] and res["retrieval"][0]["n"] == res["n"]


# ------------------------------------------------------------------------------------------
# CLI contract: every error is one `Error: ...` line and exit code 1
# ------------------------------------------------------------------------------------------


def test_cli_query_info_verify_on_a_real_store(store_dir: Path, tmp_path: Path) -> None:
    sql = "SELECT modality, count(*) AS n FROM embeddings GROUP BY 1 ORDER BY 1"
    r = runner.invoke(app, ["query", str(store_dir), sql, "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"modality": "CTPA", "n": 40}, {"modality": "CXR", "n": 40}]
    r = runner.invoke(app, ["query", str(store_dir), sql, "--format", "parquet", "--out",
                            str(tmp_path / "q.parquet")])
    assert r.exit_code == 0, r.output  # (rich wraps a long path onto the next line)
    assert " ".join(r.output.split()) == f"Wrote 2 rows to {tmp_path / 'q.parquet'}"
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "q.parquet").to_pylist() == json.loads(
        runner.invoke(app, ["query", str(store_dir), sql, "--format", "json"]).output)
    assert [p.name for p in tmp_path.iterdir()] == ["q.parquet"]  # no temp file left
    r = runner.invoke(app, ["info", str(store_dir), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["embeddings"] >= 80
    r = runner.invoke(app, ["verify", str(store_dir)])
    assert r.exit_code == 0 and "no problems" in r.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["query", "{store}", "COPY studies TO '/tmp/x.csv'"], "Error: "),
        (["query", "{store}", "SELECT * FROM read_csv('/etc/passwd')"], "Error: "),
        (["query", "{store}", "SELECT nope FROM studies"], "Error: "),
        (["info", "{missing}"], "Error: "),
        (["train", "prior", "{store}", "--teacher", "no-such-run"], "Error: Run 'no-such-run' was not found"),
        (["extract", "{store}", "-m", "{missing}", "--modality", "cxr"], "Error: Manifest file"),
        (["extract", "{store}", "-m", "{manifest}", "--modality", "cxr", "--encoder", "vit-x"], "Error: Unknown encoder 'vit-x'"),
        (["neighbors", "{store}", "NOPE"], "Error: Study 'NOPE' has no stored embedding"),
    ],
    ids=["copy", "read_file", "bad_column", "missing_store", "missing_run", "missing_manifest",
         "bad_encoder", "unknown_study"],
)
def test_cli_errors_are_one_line_and_exit_1(store_dir: Path, cohort: Path, tmp_path: Path,
                                            args: list[str], expected: str) -> None:
    subs = {"{store}": str(store_dir), "{missing}": str(tmp_path / "missing"),
            "{manifest}": str(cohort / "manifest.parquet")}
    r = runner.invoke(app, [subs.get(a, a) for a in args])
    assert r.exit_code == 1, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith(expected), r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", [["extract", "S", "-m", "M.parquet"], ["index", "build", "S",
                                                                         "--encoder", "k"]])
def test_a_modality_typo_is_a_usage_error_listing_the_choices(command: list[str]) -> None:
    r = runner.invoke(app, [*command, "--modality", "mri"])
    assert r.exit_code == 2, r.output  # click's usage error, before any library call
    text = r.output.lower()
    assert "invalid value for '--modality'" in text and "'mri' is not one of" in text, r.output
    assert "'cxr'" in text and "'ctpa'" in text, r.output  # both choices listed
    assert "Traceback" not in r.output
    ok = runner.invoke(app, [*command, "--modality", "CtPa", "--help"])
    assert ok.exit_code == 0  # any case is accepted


def test_neighbors_lists_other_studies_with_metadata(store_dir: Path) -> None:
    r = runner.invoke(app, ["neighbors", str(store_dir), "SYN-0001-CTPA", "-k", "3", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 3 and all(x["study_id"] != "SYN-0001-CTPA" for x in rows)
    assert {"label_pe", "split", "cosine"} <= set(rows[0])
    assert rows[0]["cosine"] >= rows[-1]["cosine"]


def test_cli_train_with_toml_config_and_sweep(store_dir: Path, trained: dict[str, str],
                                              tmp_path: Path) -> None:
    cfg = tmp_path / "train.toml"
    cfg.write_text('seed = 2\n[prior]\nepochs = 3\neval_every = 3\nhidden = 32\ndepth = 1\n'
                   'val_samples = 2\nval_steps = 2\n')
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--teacher", trained["teacher"],
                            "--config", str(cfg), "--sweep", "lambda=0,0.5", "--name", "sw"])
    assert r.exit_code == 0, r.output
    runs = {p.name: json.loads((p / "config.json").read_text())
            for p in (store_dir / "runs").glob("sw-*")}
    assert sorted(runs) == ["sw-lambda0", "sw-lambda0.5"]
    assert [runs[k]["trainer"]["lam"] for k in sorted(runs)] == [0, 0.5]
    assert all(c["trainer"]["hidden"] == 32 and c["seed"] == 2 for c in runs.values())
    bad = tmp_path / "bad.toml"
    bad.write_text("[prior]\nlearning_rate = 1\n")
    r = runner.invoke(app, ["train", "prior", str(store_dir), "--config", str(bad)])
    assert r.exit_code == 1 and "Error: Unknown option 'learning_rate' for `train prior`" in r.output


def test_cli_index_build_then_reuse(store_dir: Path) -> None:
    key = _key(store_dir, "CTPA")
    r1 = runner.invoke(app, ["index", "build", str(store_dir), "--encoder", key])
    r2 = runner.invoke(app, ["index", "build", str(store_dir), "--encoder", key])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    assert r2.output.startswith("Verified flat index of 40 vectors")


def test_process_pool_decoding_gives_the_same_bytes(store_dir: Path, cohort: Path,
                                                    tmp_path: Path) -> None:
    cfg = ExtractConfig(modality="ctpa", encoder=CT_ENC, workers=2, where="split = 'val'")
    s = extract(tmp_path / "s", cohort / "manifest.parquet", cfg)
    assert s.done == s.selected > 0 and s.failed == 0
    key = _key(store_dir, "CTPA")
    a = open_store(tmp_path / "s").load("CTPA", key)
    b = open_store(store_dir).load("CTPA", key, study_ids=a.meta["study_id"].to_pylist())
    # Same studies and keys; values equal up to float reassociation (BLAS thread counts differ
    # between a pool worker and the inline path; bytes are identical for a fixed configuration).
    assert a.meta["cache_key"].to_pylist() == b.meta["cache_key"].to_pylist()
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)
