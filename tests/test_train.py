"""Training orchestration on a small store of synthetic vectors (no imaging, fast).

Each test here is tied to a one-line mutation that once passed the whole suite (issue 9):
the label subset being ignored, the teacher/encoder compatibility check being deleted.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from embedstore.errors import IncompatibleRunError
from embedstore.fit import ClassifierTrainConfig, PriorTrainConfig
from embedstore.manifest import label_subset
from embedstore.store import open_store
from embedstore.train import train_classifier, train_prior

N_PATIENTS = 60
DIM = 8
FAST_CLS = ClassifierTrainConfig(epochs=3, patience=2)
FAST_PRIOR = PriorTrainConfig(epochs=2, eval_every=1, hidden=16, depth=1, val_samples=1,
                              val_steps=2)


def _manifest() -> pa.Table:
    rng = np.random.default_rng(0)
    rows = []
    t0 = datetime(2024, 1, 1)
    for i in range(N_PATIENTS):
        pid = f"P{i:03d}"
        split = "train" if i < 36 else ("val" if i < 48 else "test")
        y = int(i % 3 == 0)
        # every fourth training patient has no label at all: the subset is drawn among the
        # labelled ones only
        label = None if (split == "train" and i % 4 == 1) else y
        at = t0 + timedelta(days=i)
        rows.append((pid, f"{pid}-ct", "CTPA", at, label, split))
        rows.append((pid, f"{pid}-cx", "CXR", at - timedelta(hours=2), label, split))
    del rng
    return pa.table({
        "patient_id": [r[0] for r in rows], "study_id": [r[1] for r in rows],
        "modality": [r[2] for r in rows], "path": [f"img/{r[1]}" for r in rows],
        "acquired_at": pa.array([r[3] for r in rows], pa.timestamp("us")),
        "label_pe": pa.array([r[4] for r in rows], pa.int8()),
        "split": [r[5] for r in rows],
    })


def _write_set(store, modality: str, key: str, ids: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with store.writer(modality, key, dim=DIM, spec={"synthetic": key}) as w:
        for sid in ids:
            pid = sid.split("-")[0]
            y = int(int(pid[1:]) % 3 == 0)
            v = rng.standard_normal(DIM).astype(np.float32) + 1.5 * y
            w.add(study_id=sid, patient_id=pid, cache_key=f"{key}:{sid}", content_hash=sid,
                  vector=v)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train") / "store"
    store = open_store(root, create=True)
    m = _manifest()
    store.attach_manifest(m)
    ids = m["study_id"].to_pylist()
    ct = [s for s in ids if s.endswith("-ct")]
    cx = [s for s in ids if s.endswith("-cx")]
    _write_set(store, "CTPA", "ct-a", ct, 1)
    _write_set(store, "CTPA", "ct-b", ct, 2)  # a second CTPA encoder of the same dimension
    _write_set(store, "CXR", "cx", cx, 3)
    return root


def _labelled_train_patients(store_dir: Path) -> list[str]:
    t = open_store(store_dir).sql(
        "SELECT DISTINCT patient_id FROM studies WHERE split = 'train' AND modality = 'CTPA' "
        "AND label_pe IS NOT NULL")
    return t["patient_id"].to_pylist()


@pytest.mark.parametrize("kind,encoder", [("teacher", "ct-a"), ("cxr", "cx")])
def test_label_fraction_sets_the_labelled_training_patients(store_dir: Path, kind: str,
                                                             encoder: str) -> None:
    labelled = _labelled_train_patients(store_dir)
    got = {}
    for f in (0.25, 1.0):
        run = train_classifier(store_dir, kind, encoder=encoder, label_fraction=f, seed=0,
                               trainer=FAST_CLS, name=f"{kind}-lf{f}")
        got[f] = run.config["n_train"]
        # exactly the deterministic patient-level subset, one study per patient here
        assert run.config["n_train"] == len(label_subset(labelled, f, 0))
    assert got[0.25] < got[1.0] == len(labelled)


def test_prior_refuses_a_teacher_trained_on_another_ctpa_set(store_dir: Path) -> None:
    teacher = train_classifier(store_dir, "teacher", encoder="ct-a", trainer=FAST_CLS,
                               name="teacher-on-a")
    with pytest.raises(IncompatibleRunError) as e:
        # ct-b exists and has the same dimension: only the compatibility check can refuse it
        train_prior(store_dir, teacher=teacher.run_id, ctpa_encoder="ct-b", trainer=FAST_PRIOR,
                    name="prior-mismatch")
    msg = str(e.value)
    assert "ct-a" in msg and "ct-b" in msg
    assert not (store_dir / "runs" / "prior-mismatch").exists()
    # the same teacher on its own set trains
    run = train_prior(store_dir, teacher=teacher.run_id, ctpa_encoder="ct-a", trainer=FAST_PRIOR,
                      name="prior-match")
    assert run.config["ctpa_encoder_key"] == "ct-a"
