"""PreprocessSpec (validation, JSON, fingerprint) and the CT / CXR resampling contracts."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from dicom_fixtures import hu_volume, radiograph, write, write_ct_series

from embedstore.dicom import CTVolume, Radiograph, content_hash, source_signature
from embedstore.errors import ConfigError, DicomError
from embedstore.preprocess import (
    LoadedStudy,
    PreprocessSpec,
    load_study,
    preprocess_ct,
    preprocess_cxr,
)


def _vol(hu: np.ndarray, spacing=(2.0, 1.0, 1.0)) -> CTVolume:
    return CTVolume(
        hu=hu.astype(np.float32),
        spacing=spacing,
        origin=(0, 0, 0),
        orientation=(1, 0, 0, 0, 1, 0),
        n_files=hu.shape[0],
    )


def test_spec_json_round_trip_and_fingerprint() -> None:
    spec = PreprocessSpec("ctpa", ct_shape=(32, 64, 64), ct_spacing=(2.0, 1.5, 1.5))
    assert spec.modality == "CTPA"
    back = PreprocessSpec.from_json(spec.to_json())
    assert back == spec and back.fingerprint() == spec.fingerprint()
    assert PreprocessSpec("CTPA").fingerprint() != spec.fingerprint()
    # only the fields that change the output for the modality enter the fingerprint
    cxr = PreprocessSpec("CXR")
    assert PreprocessSpec("CXR", ct_shape=(8, 8, 8)).fingerprint() == cxr.fingerprint()
    assert PreprocessSpec("CXR", cxr_size=(256, 256)).fingerprint() != cxr.fingerprint()
    assert PreprocessSpec("CXR", cxr_resize="stretch").fingerprint() != cxr.fingerprint()
    assert len(cxr.fingerprint()) == 64


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"modality": "MRI"}, "modality"),
        ({"modality": "CXR", "cxr_size": (0, 224)}, "cxr_size"),
        ({"modality": "CTPA", "ct_shape": (64, 128)}, "ct_shape"),
        ({"modality": "CTPA", "ct_spacing": (1.0, -1.0, 1.0)}, "ct_spacing"),
        ({"modality": "CTPA", "ct_clip": (100.0, -100.0)}, "ct_clip"),
        ({"modality": "CXR", "cxr_resize": "zoom"}, "cxr_resize"),
        ({"modality": "CXR", "version": 99}, "version"),
    ],
)
def test_spec_validation(kw: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        PreprocessSpec(**kw)


def test_spec_from_dict_rejects_unknown_fields() -> None:
    with pytest.raises(ConfigError, match="ct_shap"):
        PreprocessSpec.from_dict({"modality": "CTPA", "ct_shap": [1, 2, 3]})


@pytest.mark.parametrize("antialias", [True, False])
def test_ct_fit_resample_preserves_linear_ramp(antialias: bool) -> None:
    s, h, w = 16, 24, 20
    z = np.arange(s, dtype=np.float32)[:, None, None]
    y = np.arange(h, dtype=np.float32)[None, :, None]
    hu = np.broadcast_to(10 * z + 3 * y, (s, h, w)).copy()  # (S, H, W) linear in z and y
    spec = PreprocessSpec("CTPA", ct_shape=(8, 6, 10), ct_clip=None, ct_antialias=antialias)
    out = preprocess_ct(_vol(hu), spec)
    assert out.shape == (8, 6, 10) and out.dtype == np.float32
    # voxel centres aligned: output i samples source (i + 0.5) * S / S_out - 0.5
    zi = (np.arange(8) + 0.5) * s / 8 - 0.5
    yi = (np.arange(6) + 0.5) * h / 6 - 0.5
    expected = 10 * zi[:, None] + 3 * yi[None, :]
    np.testing.assert_allclose(out[:, :, 5], expected, atol=1e-3)


def test_ct_clip_and_spacing_pad_with_air() -> None:
    hu = np.full((10, 10, 10), 40.0, dtype=np.float32)
    hu[0, 0, 0] = -3000.0  # padding value outside the reconstruction circle
    clipped = preprocess_ct(_vol(hu, (1, 1, 1)), PreprocessSpec("CTPA", ct_shape=(10, 10, 10)))
    assert clipped.min() == pytest.approx(-1024.0)
    hu[0, 0, 0] = 40.0
    # 2 mm voxels over 16 mm: the 10 mm volume sits in the middle, air around it
    spec = PreprocessSpec("CTPA", ct_shape=(8, 8, 8), ct_spacing=(2.0, 2.0, 2.0))
    out = preprocess_ct(_vol(hu, (1.0, 1.0, 1.0)), spec)
    assert out.shape == (8, 8, 8)
    np.testing.assert_allclose(out[2:6, 2:6, 2:6], 40.0, atol=1e-4)
    assert out[0, 0, 0] == pytest.approx(-1024.0) and out[7, 7, 7] == pytest.approx(-1024.0)
    # and a bright point at the centre stays at the centre when cropping a larger volume
    big = np.zeros((21, 21, 21), dtype=np.float32)
    big[10, 10, 10] = 1000.0
    crop = preprocess_ct(
        _vol(big, (1, 1, 1)), PreprocessSpec("CTPA", ct_shape=(5, 5, 5), ct_spacing=(1, 1, 1))
    )
    assert np.unravel_index(np.argmax(crop), crop.shape) == (2, 2, 2)


def test_cxr_pad_keeps_aspect_and_stretch_fills() -> None:
    rad = Radiograph(
        pixels=np.ones((100, 50), dtype=np.float32),
        spacing=None,
        spacing_source="none",
        photometric="MONOCHROME2",
    )
    padded = preprocess_cxr(rad, PreprocessSpec("CXR", cxr_size=(64, 64)))
    assert padded.shape == (64, 64) and padded.dtype == np.float32
    cols = np.flatnonzero(padded[32] > 0.5)
    assert (cols[0], cols[-1]) == (16, 47)  # 32 wide, centred
    assert padded[:, :16].max() == 0.0
    stretched = preprocess_cxr(rad, PreprocessSpec("CXR", cxr_size=(64, 64), cxr_resize="stretch"))
    np.testing.assert_allclose(stretched, 1.0, atol=1e-6)
    noisy = Radiograph(
        pixels=np.random.default_rng(0).random((300, 280), dtype=np.float32),
        spacing=None,
        spacing_source="none",
        photometric="MONOCHROME2",
    )
    out = preprocess_cxr(noisy, PreprocessSpec("CXR"))
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_cxr_crop_covers_and_cuts_the_overhang_evenly() -> None:
    px = np.zeros((100, 50), dtype=np.float32)  # tall: rows 0-24 and 75-99 are cut away
    px[:25] = 1.0
    px[75:] = 1.0
    rad = Radiograph(pixels=px, spacing=None, spacing_source="none", photometric="MONOCHROME2")
    out = preprocess_cxr(rad, PreprocessSpec("CXR", cxr_size=(32, 32), cxr_resize="crop"))
    assert out.shape == (32, 32)  # covered at 64 x 32, rows 16..47 kept: the dark middle
    assert out[2:-2].max() < 0.05 and out.min() >= 0.0
    # the same image padded keeps both bright bands
    padded = preprocess_cxr(rad, PreprocessSpec("CXR", cxr_size=(32, 32)))
    assert padded[:4, 8:24].min() > 0.9 and padded[-4:, 8:24].min() > 0.9


def test_wrong_modality_spec_rejected() -> None:
    with pytest.raises(ConfigError):
        preprocess_ct(_vol(np.zeros((2, 2, 2))), PreprocessSpec("CXR"))


def test_load_study_both_modalities(tmp_path: Path) -> None:
    hu = hu_volume((6, 12, 10), seed=21)
    write_ct_series(tmp_path / "ct", hu)
    spec = PreprocessSpec("CTPA", ct_shape=(4, 8, 8))
    loaded = load_study(str(tmp_path / "ct"), "ctpa", spec)
    assert isinstance(loaded, LoadedStudy) and loaded.array.shape == (4, 8, 8)
    assert loaded.content_hash == content_hash(tmp_path / "ct", "CTPA")
    assert loaded.source_sig == source_signature(tmp_path / "ct")
    assert loaded.geometry["shape"] == [6, 12, 10]
    assert loaded.geometry["spacing"] == pytest.approx([2.5, 0.8, 0.7])
    # the worker function and its result cross process boundaries
    assert pickle.loads(pickle.dumps(load_study)) is load_study
    again = pickle.loads(pickle.dumps(loaded))
    np.testing.assert_array_equal(again.array, loaded.array)

    stored = np.random.default_rng(2).integers(0, 4096, size=(40, 30)).astype(np.uint16)
    p = write(
        radiograph(stored, photometric="MONOCHROME1", imager_pixel_spacing=(0.2, 0.2)),
        tmp_path / "cxr.dcm",
    )
    cxr = load_study(str(p), "CXR", PreprocessSpec("CXR", cxr_size=(32, 32)))
    assert cxr.array.shape == (32, 32) and 0.0 <= cxr.array.min() and cxr.array.max() <= 1.0
    assert cxr.geometry["spacing_source"] == "ImagerPixelSpacing"
    assert cxr.content_hash == content_hash(p, "CXR")

    with pytest.raises(ConfigError):
        load_study(str(p), "CXR", spec)
    (tmp_path / "junk.dcm").write_bytes(b"not a dicom file at all" * 10)
    with pytest.raises(DicomError) as info:
        load_study(str(tmp_path / "junk.dcm"), "CXR", PreprocessSpec("CXR"))
    assert info.value.reason == "not_dicom"


def test_ct_already_on_the_output_grid_is_only_clipped() -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-2000, 4000, size=(8, 16, 16)).astype(np.float32)
    out = preprocess_ct(_vol(hu), PreprocessSpec("CTPA", ct_shape=(8, 16, 16)))
    np.testing.assert_array_equal(out, np.clip(hu, -1024, 3071))
    # one voxel more along z and the resampling path runs (values change)
    grown = preprocess_ct(_vol(np.concatenate([hu, hu[:1]])), PreprocessSpec("CTPA", ct_shape=(8, 16, 16)))
    assert grown.shape == (8, 16, 16) and not np.array_equal(grown, out)
