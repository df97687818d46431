"""`embedstore experiment`: cells as ordinary runs, resumable, deterministic, summarised."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from embedstore.cli.app import app
from test_train import _manifest, _write_set
from typer.testing import CliRunner

from embedstore.errors import ConfigError
from embedstore.experiment import ExperimentConfig, load_experiment_config, run_experiment
from embedstore.store import open_store

FAST = dict(classifier={"epochs": 3, "patience": 2},
            prior={"epochs": 2, "eval_every": 1, "hidden": 16, "depth": 1, "val_samples": 1,
                   "val_steps": 2})
TOML = """
name = "t"
label_fractions = [0.5, 1.0]
seeds = [4, 5]
n_boot = 200
[classifier]
epochs = 3
patience = 2
[prior]
epochs = 2
eval_every = 1
hidden = 16
depth = 1
val_samples = 1
val_steps = 2
"""


def _store(root: Path) -> Path:
    store = open_store(root, create=True)
    m = _manifest()
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    _write_set(store, "CTPA", "ct-a", [s for s in ids if s.endswith("-ct")], 1)
    _write_set(store, "CXR", "cx", [s for s in ids if s.endswith("-cx")], 3)
    return root


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExperimentConfig, object]:
    root = _store(tmp_path_factory.mktemp("exp") / "store")
    cfg = ExperimentConfig(name="t", label_fractions=(0.5, 1.0), seeds=(4, 5), n_boot=200, **FAST)
    return root, cfg, run_experiment(root, cfg, workers=0)


def test_every_cell_is_a_run_and_every_arm_is_summarised(done) -> None:
    root, cfg, res = done
    assert res.cells_trained == 4 and res.cells_reused == 0
    runs = open_store(root).sql("SELECT run_id FROM runs")["run_id"].to_pylist()
    for cell in ("f0.5-s4", "f0.5-s5", "f1-s4", "f1-s5"):
        for kind in ("teacher", "cxr", "prior", "baseline"):
            assert any(r.startswith(f"exp-{res.experiment_id}-{kind}-{cell}") for r in runs)
    pred = pq.read_table(res.out_dir / "predictions.parquet")
    # one row per (fraction, seed, split, patient, arm)
    per = pred.group_by(["label_fraction", "seed", "split", "arm"]).aggregate([("p", "count")])
    assert per.num_rows == 2 * 2 * 2 * len(cfg.arms)
    rows = {(r["arm"], r["label_fraction"]) for r in res.summary["arms"]}
    assert rows == {(a, f) for a in cfg.arms for f in cfg.label_fractions}
    assert all(r["n_seeds"] == 2 for r in res.summary["arms"])
    assert len(res.summary["verdicts"]) == len(cfg.compare) * 2
    html = res.report.read_text()
    assert "Label efficiency" in html and "forest" in html.lower()
    got = open_store(root).sql("SELECT experiment_id, name FROM experiments").to_pylist()
    assert got == [{"experiment_id": res.experiment_id, "name": "t"}]


def test_a_second_invocation_reuses_every_cell(done) -> None:
    root, cfg, res = done
    before = pq.read_table(res.out_dir / "predictions.parquet")
    again = run_experiment(root, cfg, workers=0)
    assert (again.cells_trained, again.cells_reused) == (0, 4)
    assert pq.read_table(again.out_dir / "predictions.parquet").equals(before)


def test_a_missing_cell_is_retrained_to_the_same_predictions(done, tmp_path: Path) -> None:
    # the runs a killed cell finished are reused; a lost cell file and its runs are recomputed
    # bit for bit (training and sampling are seeded)
    root, cfg, res = done
    copy = tmp_path / "store"
    shutil.copytree(root, copy)
    cell = copy / "experiments" / res.experiment_id / "cells" / "f1-s5.parquet"
    cell.unlink()
    for d in (copy / "runs").glob(f"exp-{res.experiment_id}-prior-f1-s5*"):
        shutil.rmtree(d)
    again = run_experiment(copy, cfg, workers=0)
    assert again.cells_trained == 1
    assert pq.read_table(again.out_dir / "predictions.parquet").equals(
        pq.read_table(res.out_dir / "predictions.parquet"))


def test_changing_the_config_makes_a_new_experiment() -> None:
    a = ExperimentConfig(seeds=(4, 5))
    assert a.experiment_id != ExperimentConfig(seeds=(4, 6)).experiment_id
    assert a.experiment_id == ExperimentConfig(seeds=(4, 5)).experiment_id


def test_config_file_errors_name_the_problem(tmp_path: Path) -> None:
    p = tmp_path / "e.toml"
    p.write_text('name = "x"\nseedz = [1]\n')
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['seedz'\]"):
        load_experiment_config(p)
    p.write_text('arms = ["cxr_only", "magic"]\n')
    with pytest.raises(ConfigError, match="Unknown arm.*magic"):
        load_experiment_config(p)
    p.write_text('compare = [["distilled", "ridge_embed"]]\narms = ["distilled", "cxr_only"]\n')
    with pytest.raises(ConfigError, match="names an arm not in arms"):
        load_experiment_config(p)
    p.write_text("name = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_experiment_config(p)
    res = CliRunner().invoke(app, ["experiment", str(tmp_path), "--config", str(tmp_path / "no.toml")])
    assert res.exit_code == 1
    assert res.output.strip().splitlines()[-1] == f"Error: Experiment config {tmp_path / 'no.toml'} does not exist."


@pytest.mark.slow
def test_sigkill_mid_experiment_then_rerun_gives_the_uninterrupted_predictions(
        done, tmp_path: Path) -> None:
    root, cfg, res = done
    fresh = _store(tmp_path / "store")
    conf = tmp_path / "exp.toml"
    conf.write_text(TOML)
    cmd = [sys.executable, "-m", "embedstore.cli.app", "experiment", str(fresh), "--config",
           str(conf), "--workers", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    cells = fresh / "experiments" / res.experiment_id / "cells"
    deadline = time.time() + 300
    while time.time() < deadline and not list(cells.glob("*.parquet")):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(cells.glob("*.parquet"))) < 4  # killed mid-way
    out = subprocess.run(cmd[:-2] + ["--workers", "0", "--json"], capture_output=True, text=True,
                         env=env, check=True)
    again = json.loads(out.stdout)
    assert again["cells_reused"] >= 1
    assert pq.read_table(Path(again["out_dir"]) / "predictions.parquet").equals(
        pq.read_table(res.out_dir / "predictions.parquet"))
