"""embedstore.drr: DRRs of a synthetic CT cohort, written as DX with a manifest row each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from embedstore._dicomwrite import check_pseudonymous_id
from embedstore.drr import drr_study_id, run_drr
from embedstore.errors import ConfigError
from embedstore.manifest import load_manifest
from embedstore.phantom import PhantomSpec
from embedstore.synth import synthesize_cohort

SPEC = PhantomSpec.with_shape((16, 48, 48), drr_size=64)


@pytest.fixture(scope="module")
def drr_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("drr")
    cohort = root / "cohort"
    synthesize_cohort(cohort, n_patients=2, seed=1, spec=SPEC, workers=1)
    out = root / "drr"
    res = run_drr(cohort, out, workers=1)
    assert res.written == 2 and res.failed == 0
    return cohort, out


def test_one_dx_per_ct_same_patient_new_study(drr_out: tuple[Path, Path]) -> None:
    cohort, out = drr_out
    man = load_manifest(out)  # validates, including paths
    rows = man.table.to_pylist()
    ct = {r["study_id"]: r for r in rows if r["modality"] == "CTPA"}
    cxr = {r["study_id"]: r for r in rows if r["modality"] == "CXR"}
    assert len(ct) == 2 and set(cxr) == {drr_study_id(s) for s in ct}
    for sid, r in ct.items():
        d = cxr[drr_study_id(sid)]
        assert d["patient_id"] == r["patient_id"] and d["source"] == "drr"
        assert d["pair_id"] == r["pair_id"]
        ds = pydicom.dcmread(out / d["path"])
        assert ds.Modality == "DX" and ds.PatientID == r["patient_id"]
        assert ds.PatientName == "" and ds.StudyDate == ""
        img = ds.pixel_array
        assert img.dtype == np.uint16 and img.std() > 0


def test_rerun_reuses(drr_out: tuple[Path, Path]) -> None:
    cohort, out = drr_out
    res = run_drr(cohort, out, workers=1)
    assert res.reused == 2 and res.written == 0


def test_non_pseudonymous_id_refused() -> None:
    assert check_pseudonymous_id("SYN-0001", "patient id") == "SYN-0001"
    with pytest.raises(ConfigError):
        check_pseudonymous_id("Doe^John", "patient id")
