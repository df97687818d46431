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


# ----------------------------------------------------------------------------------------------
# `embedstore drr` (the CLI over run_drr_source)
# ----------------------------------------------------------------------------------------------


def _cli(*args: object) -> tuple[int, str]:
    from embedstore.cli.app import app
    from typer.testing import CliRunner

    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, r.output.strip().splitlines()[-1] if r.output.strip() else ""


@pytest.mark.slow  # ~25 s on 2 busy cores, most of it loading torch + the encoder for extract
def test_cli_drr_gives_dx_that_extract_cxr_embeds(drr_out: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    from embedstore.store import open_store

    cohort, _ = drr_out
    code, line = _cli("drr", cohort, tmp_path / "drr", "--size", "64")
    assert code == 0, line
    assert line == (f"Manifest: {tmp_path / 'drr' / 'manifest.parquet'} (embed the DRRs with "
                    f"`embedstore extract STORE --manifest {tmp_path / 'drr' / 'manifest.parquet'} "
                    "--modality cxr`).")
    code, line = _cli("extract", tmp_path / "s", "--manifest", tmp_path / "drr" / "manifest.parquet",
                      "--modality", "cxr", "--encoder", "test-tiny-vit", "--workers", "0")
    assert code == 0, line
    st = open_store(tmp_path / "s")
    (info,) = st.sets()
    emb = st.load("CXR", info.encoder_key)
    ct = [r["study_id"] for r in load_manifest(cohort).rows("ctpa")]
    assert emb.study_ids == sorted(drr_study_id(s) for s in ct)
    assert emb.vectors.shape == (2, info.dim) and np.isfinite(emb.vectors).all()
    assert emb.vectors.std(axis=1).min() > 0  # a real image went in, not a blank


def test_cli_drr_of_one_series_folder(drr_out: tuple[Path, Path], tmp_path: Path) -> None:
    cohort, _ = drr_out
    row = load_manifest(cohort).rows("ctpa")[0]
    series = load_manifest(cohort).resolve(str(row["path"]))
    code, line = _cli("drr", series, tmp_path / "o")
    assert (code, line) == (1, f"Error: {series.name!r} is a folder without a manifest, so it is "
                               "read as one CT series; pass --patient-id PSEUDONYM (identifiers "
                               "are never read from the DICOM), or give a manifest.")
    code, line = _cli("drr", series, tmp_path / "o", "--patient-id", "Doe^John")
    assert (code, line) == (1, "Error: The --patient-id is not a pseudonymous id (1-64 letters, "
                               "digits, '.', '_' or '-', starting with a letter or digit); only "
                               "pseudonymised manifests can be rendered. Import the cohort with "
                               "`embedstore manifest import-*`, which pseudonymises ids.")
    code, _ = _cli("drr", series, tmp_path / "o", "--patient-id", "P-7", "--size", "64")
    assert code == 0
    man = load_manifest(tmp_path / "o")
    ids = {r["study_id"]: r for r in man.table.to_pylist()}
    assert set(ids) == {"P-7-CT", "P-7-CT-DRR"}
    ds = pydicom.dcmread(tmp_path / "o" / ids["P-7-CT-DRR"]["path"])
    assert ds.Modality == "DX" and ds.PatientID == "P-7" and ds.Rows == 64


def test_the_drr_progress_bar_does_not_load_torch() -> None:
    # progress_status used to import embedstore.extract (torch, open_clip, transformers) for
    # every bar: 25 s of a 35 s `embedstore drr` on 2 busy cores
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from embedstore.drr import DrrSummary; "
            "from embedstore.cli.render import progress_status; "
            "s = progress_status(DrrSummary(out_dir=Path('.'), written=2)); "
            "assert 'torch' not in sys.modules, 'torch loaded'; print(s)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1000:]
    assert r.stdout.strip() == "rendered 2 reused 0 failed 0"
