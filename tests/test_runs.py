"""Run folders: a killed run's temp folder never blocks a re-run and is never listed as a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from embedstore.catalog import read_runs
from embedstore.runs import RunWriter, load_run


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_runs_leftover_is_swept_and_not_listed(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    stale = runs / f".tmp-teacher-x.{_dead_pid()}-abcdef"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text(json.dumps({"kind": "teacher"}))  # killed after this
    assert read_runs(runs).num_rows == 0
    with RunWriter(runs, "teacher", "teacher-x") as rw:
        run = rw.commit(config={"modality": "CTPA"}, tensors={"w": torch.zeros(2)},
                        metrics={"val_auc": 0.5})
    assert not stale.exists()
    assert load_run(runs, "teacher-x").run_id == run.run_id == "teacher-x"
    assert read_runs(runs)["run_id"].to_pylist() == ["teacher-x"]
    assert [p.name for p in runs.iterdir()] == ["teacher-x"]
