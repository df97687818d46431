"""Synthetic phantom cohort: DICOM validity, exact round trip, determinism, manifest, identifiers."""

from __future__ import annotations

import json
import re
import shutil
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from reporting import RecordingReporter

from embedstore._dicomwrite import SyntheticPatient
from embedstore.errors import ConfigError
from embedstore.manifest import load_manifest
from embedstore.phantom import PhantomSpec, generate_case, patient_rng
from embedstore.synth import patient_id, render_preview, synthesize_cohort

SEED = 3
N = 5
SPEC = PhantomSpec.with_shape((16, 48, 48), drr_size=64, frac_monochrome1=0.5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    res = synthesize_cohort(out, n_patients=N, seed=SEED, spec=SPEC, workers=1)
    assert res.n_patients == N and res.patients_reused == 0
    assert res.files_written == N * (SPEC.shape[0] + 1)
    return out


def _all_files(root: Path) -> list[Path]:
    return sorted((root / "dicom").rglob("*.dcm"))


def _pixels(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): pydicom.dcmread(p).PixelData for p in _all_files(root)}


def _ct_hu(folder: Path) -> np.ndarray:
    """Independent reader: sort by ImagePositionPatient z, apply the modality rescale."""
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return np.stack(
        [d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
         for d in dss]
    )


def test_every_file_reads_as_dicom(cohort: Path) -> None:
    files = _all_files(cohort)
    assert len(files) == N * (SPEC.shape[0] + 1)
    for p in files:
        ds = pydicom.dcmread(p)  # raises on anything that is not a DICOM file
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        if p.name == "cxr.dcm":
            assert ds.Modality in ("DX", "CR")
            assert "PixelSpacing" not in ds and len(ds.ImagerPixelSpacing) == 2
            assert ds.BitsStored == 12 and ds.pixel_array.dtype == np.uint16
            assert ds.pixel_array.shape == (SPEC.drr_size, SPEC.drr_size)
        else:
            assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert [float(v) for v in ds.PixelSpacing] == pytest.approx(SPEC.spacing_mm[1:])
            assert float(ds.SliceThickness) == pytest.approx(SPEC.spacing_mm[0])
            assert ds.pixel_array.dtype == np.int16


def test_ct_series_sorted_by_position_reproduces_hu_exactly(cohort: Path) -> None:
    intercepts = set()
    for i in range(N):
        folder = cohort / "dicom" / patient_id(i) / "ctpa"
        expected = generate_case(SPEC, patient_rng(SEED, i)).ctpa_hu
        np.testing.assert_array_equal(_ct_hu(folder), expected)
        intercepts |= {float(pydicom.dcmread(p).RescaleIntercept) for p in folder.glob("*.dcm")}
    assert intercepts <= {-1024.0, -1000.0}
    # file names are shuffled: their lexical order is not the slice order
    names = sorted((cohort / "dicom" / patient_id(0) / "ctpa").glob("*.dcm"))
    zs = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in names]
    assert zs != sorted(zs)


def test_radiographs_monochrome1_inverts_to_monochrome2(cohort: Path) -> None:
    seen = set()
    for i in range(N):
        ds = pydicom.dcmread(cohort / "dicom" / patient_id(i) / "cxr.dcm")
        raw = ds.pixel_array.astype(np.int32)
        expected = generate_case(SPEC, patient_rng(SEED, i)).drr.astype(np.int32)
        seen.add(ds.PhotometricInterpretation)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            np.testing.assert_array_equal(2 ** ds.BitsStored - 1 - raw, expected)
            assert not np.array_equal(raw, expected)
        else:
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            np.testing.assert_array_equal(raw, expected)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}, "the cohort should exercise both"


def test_manifest_validates_and_pairs(cohort: Path) -> None:
    man = load_manifest(cohort)  # validates, including that every path exists
    rows = man.table.to_pylist()
    assert len(rows) == 2 * N
    assert man.metadata["generator"] == "embedstore.synth" and man.metadata["seed"] == SEED
    assert PhantomSpec.from_dict(man.metadata["phantom_spec"]) == SPEC
    by = {(r["patient_id"], r["modality"]): r for r in rows}
    for i in range(N):
        pid = patient_id(i)
        ct, cxr = by[(pid, "CTPA")], by[(pid, "CXR")]
        assert ct["study_id"] == f"{pid}-CTPA" and cxr["study_id"] == f"{pid}-CXR"
        assert ct["label_pe"] == cxr["label_pe"] == generate_case(SPEC, patient_rng(SEED, i)).label_pe
        assert ct["split"] == cxr["split"] and ct["pair_id"] == cxr["pair_id"] == pid
        assert timedelta(0) < ct["acquired_at"] - cxr["acquired_at"] <= timedelta(hours=48)
        assert (ct["n_clots"] > 0) == bool(ct["label_pe"])
        for col in ("age", "sex", "site", "occlusive", "effusion", "consolidation", "emphysema",
                    "cardiomegaly"):
            assert col in ct
    assert (cohort / "manifest.csv").exists()


def test_only_synthetic_identifiers(cohort: Path) -> None:
    for p in _all_files(cohort):
        ds = pydicom.dcmread(p)
        assert re.fullmatch(r"SYN-\d{4}", ds.PatientID)
        assert str(ds.PatientName) == "SYNTHETIC^" + ds.PatientID[4:]
        assert ds.PatientBirthDate == "" and ds.AccessionNumber == ""
        assert ds.InstitutionName == "embedstore synthetic"
        assert "OtherPatientIDs" not in ds and "PatientAddress" not in ds
        assert ds.PatientID in str(p)  # files live under their patient's folder
    with pytest.raises(ConfigError, match="SYN-0001"):
        SyntheticPatient(patient_id="12345678", sex="F", age=50, site="SITE-A")


def test_rerun_reuses_and_foreign_folders_are_refused(cohort: Path, tmp_path: Path) -> None:
    before = _pixels(cohort)
    rec = RecordingReporter()
    res = synthesize_cohort(cohort, n_patients=N, seed=SEED, spec=SPEC, workers=1, reporter=rec)
    assert res.files_written == 0 and res.patients_reused == N
    assert rec.bars == []  # nothing left to write: no progress bar
    assert _pixels(cohort) == before
    with pytest.raises(ConfigError, match="different synthetic cohort"):
        synthesize_cohort(cohort, n_patients=N, seed=SEED + 1, spec=SPEC, workers=1)
    other = PhantomSpec.from_dict({**SPEC.to_dict(), "prevalence": 0.9})
    with pytest.raises(ConfigError, match="spec_fingerprint"):
        synthesize_cohort(cohort, n_patients=N, seed=SEED, spec=other, workers=1)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        synthesize_cohort(foreign, n_patients=1, seed=0, spec=SPEC, workers=1)


def test_interrupted_patient_is_redone(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(cohort, out)
    shutil.rmtree(out / "dicom" / patient_id(1))
    junk = out / "dicom" / f".tmp-{patient_id(1)}-99999"  # what a killed worker leaves
    (junk / "ctpa").mkdir(parents=True)
    (junk / "ctpa" / "half.dcm").write_bytes(b"\0" * 10)
    rec = RecordingReporter()
    res = synthesize_cohort(out, n_patients=N, seed=SEED, spec=SPEC, workers=1, reporter=rec)
    assert res.patients_reused == N - 1 and res.files_written == SPEC.shape[0] + 1
    # the bar counts the patients still to write, and each one written advances it
    [bar] = rec.bars
    assert (bar.description, bar.total, bar.advanced, bar.closed) == ("synthesizing patients", 1, 1, True)
    assert not junk.exists()
    assert _pixels(out) == _pixels(cohort)


def test_other_seed_gives_other_cohort(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "seed2"
    synthesize_cohort(out, n_patients=2, seed=SEED + 1, spec=SPEC, workers=1)
    a, b = _pixels(cohort), _pixels(out)
    shared = set(a) & set(b)
    assert any(k.endswith("cxr.dcm") for k in shared)
    assert all(a[k] != b[k] for k in shared if k.endswith("cxr.dcm"))


@pytest.mark.slow
def test_worker_count_does_not_change_a_single_byte(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "parallel"
    synthesize_cohort(out, n_patients=N, seed=SEED, spec=SPEC, workers=2)
    files = _all_files(cohort)
    assert [p.relative_to(cohort) for p in files] == [p.relative_to(out) for p in _all_files(out)]
    for p in files:
        assert p.read_bytes() == (out / p.relative_to(cohort)).read_bytes(), p
    assert load_manifest(out).table.equals(load_manifest(cohort).table)


def test_preview_png(cohort: Path, tmp_path: Path) -> None:
    import matplotlib.image as mpimg

    png = render_preview(cohort, tmp_path / "preview.png", n_cases=3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(png)
    assert img.shape[0] > 300 and img.shape[1] > 300 and img.std() > 0.05


def test_spec_json_round_trip_and_validation() -> None:
    spec = PhantomSpec(prevalence=0.3, noise_hu=(12, 14))
    assert PhantomSpec.from_json(spec.to_json()) == spec
    assert json.loads(spec.to_json())["noise_hu"] == [12.0, 14.0]
    assert spec.fingerprint() != PhantomSpec().fingerprint()
    with pytest.raises(ConfigError, match="prevalence"):
        PhantomSpec(prevalence=1.5)
    with pytest.raises(ConfigError, match=r"spacing_mm=\(20\.0"):
        PhantomSpec(shape=(16, 48, 48))  # 5 mm x 16 slices cannot hold a chest
    with pytest.raises(ConfigError, match="colour"):
        PhantomSpec.from_dict({"colour": "red"})
    with pytest.raises(ConfigError, match="noise_hu"):
        PhantomSpec(noise_hu=(30, 10))


def test_perfusion_defect_is_on_ctpa_only() -> None:
    # Same draws with and without parenchymal enhancement: the difference is the enhancement
    # map. An occlusive clot must leave a lung territory with no enhancement (the defect), and
    # the radiograph (non-contrast twin) must not change at all.
    kw = dict(prevalence=1.0, p_occlusive=1.0, noise_hu=(0, 0))
    on = generate_case(PhantomSpec.with_shape((32, 64, 64), **kw), patient_rng(0, 0))
    off = generate_case(
        PhantomSpec.with_shape((32, 64, 64), perfusion_enhancement_hu=0.0, **kw), patient_rng(0, 0)
    )
    assert on.label_pe == 1 and on.findings["occlusive"]
    diff = on.ctpa_hu.astype(np.int32) - off.ctpa_hu.astype(np.int32)  # (Z, Y, X)
    lung = (off.ctpa_hu < -600) & (off.ctpa_hu > -990)  # parenchyma, not the air outside
    enhanced = (diff > 40) & lung
    unenhanced = (diff == 0) & lung
    assert enhanced.sum() / lung.sum() > 0.3
    assert unenhanced.sum() / lung.sum() == pytest.approx(on.truth["defect_fraction"], abs=0.1)
    assert on.truth["defect_fraction"] > 0.01
    np.testing.assert_array_equal(on.drr, off.drr)
