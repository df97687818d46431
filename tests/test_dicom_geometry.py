"""CT geometry and rescale that used to be accepted silently (issue 10 item 7): a missing
rescale is refused unless a policy says what to assume, a zero slope and impossible spacings
are refused, and a constant volume is a blank image."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_fixtures import hu_volume, write_ct_series, write_enhanced_ct

from embedstore import dicom
from embedstore.dicom import content_hash, read_ct_series, read_study
from embedstore.errors import ConfigError, DicomError
from embedstore.extract import ExtractConfig


def _series(tmp_path: Path, name: str = "ct", **kw: object) -> Path:
    folder = tmp_path / name
    write_ct_series(folder, hu_volume((5, 8, 10), seed=1), **kw)  # type: ignore[arg-type]
    return folder


def _edit(folder: Path, fn: Callable[[pydicom.Dataset], None]) -> Path:
    for p in sorted(folder.iterdir()):
        ds = pydicom.dcmread(p)
        fn(ds)
        ds.save_as(p, enforce_file_format=True)
    return folder


def _reason(fn: Callable[..., object], *args: object, **kw: object) -> DicomError:
    with pytest.raises(DicomError) as info:
        fn(*args, **kw)
    assert info.value.reason in dicom.REASONS
    return info.value


def _drop_rescale(ds: pydicom.Dataset) -> None:
    del ds.RescaleSlope
    del ds.RescaleIntercept


def test_missing_rescale_is_refused_by_default(tmp_path: Path) -> None:
    folder = _edit(_series(tmp_path), _drop_rescale)
    err = _reason(read_ct_series, folder)
    assert err.reason == "missing_rescale" and "5 slices of 5" in str(err)
    assert "assume-1024" in str(err)
    # the cache key runs the same checks, so extraction records it before decoding
    assert _reason(content_hash, folder, "CTPA").reason == "missing_rescale"


@pytest.mark.parametrize("policy, intercept", [("assume-1024", -1024.0), ("assume-0", 0.0)])
def test_missing_rescale_policy_assumes_and_says_so(tmp_path: Path, policy: str,
                                                   intercept: float) -> None:
    hu = hu_volume((5, 8, 10), seed=1)
    folder = _edit(_series(tmp_path), _drop_rescale)  # stored = hu + 1024
    vol = read_ct_series(folder, missing_rescale=policy)
    np.testing.assert_array_equal(vol.hu, hu + 1024 + intercept)
    assert any(f"missing_rescale={policy}" in w for w in vol.warnings)
    # what was assumed is part of the study's identity (and read_study agrees with it)
    h = content_hash(folder, "CTPA", missing_rescale=policy)
    assert read_study(folder, "CTPA", missing_rescale=policy)[1] == h


def test_assumed_rescales_have_their_own_content_hash(tmp_path: Path) -> None:
    # stored values hu + 1024 with the rescale written, vs the same pixels without it
    written = _series(tmp_path, "written")
    missing = _edit(_series(tmp_path, "missing"), _drop_rescale)
    h_written = content_hash(written, "CTPA")
    h_assumed = content_hash(missing, "CTPA", missing_rescale="assume-1024")
    h_zero = content_hash(missing, "CTPA", missing_rescale="assume-0")
    assert len({h_written, h_assumed, h_zero}) == 3
    np.testing.assert_array_equal(read_ct_series(written).hu,
                                  read_ct_series(missing, missing_rescale="assume-1024").hu)


def test_missing_rescale_on_a_skipped_localizer_is_not_an_error(tmp_path: Path) -> None:
    folder = _series(tmp_path)
    write_ct_series(tmp_path / "loc", hu_volume((2, 8, 10), seed=2), series="scout",
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), names=["L0.dcm", "L1.dcm"])
    _edit(tmp_path / "loc", _drop_rescale)
    for p in (tmp_path / "loc").iterdir():
        p.rename(folder / p.name)
    assert read_ct_series(folder).hu.shape == (5, 8, 10)


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        ExtractConfig(modality="ctpa", missing_rescale="guess")
    assert "refuse, assume-1024, assume-0" in str(info.value)


def test_zero_rescale_slope_is_refused(tmp_path: Path) -> None:
    # before: a constant -1024 HU volume that was embedded
    folder = _edit(_series(tmp_path), lambda ds: setattr(ds, "RescaleSlope", 0))
    err = _reason(read_ct_series, folder)
    assert err.reason == "invalid_rescale"
    assert _reason(content_hash, folder, "CTPA").reason == "invalid_rescale"


@pytest.mark.parametrize("spacing", [(0.0, 0.0), (-0.7, -0.7), (0.7, math.inf)])
def test_impossible_pixel_spacing_is_refused(tmp_path: Path, spacing: tuple[float, float]
                                            ) -> None:
    folder = _series(tmp_path, pixel_spacing=spacing)
    err = _reason(read_ct_series, folder)
    assert err.reason == "invalid_spacing" and "PixelSpacing" in str(err)


@pytest.mark.parametrize("keyword, value", [("SliceThickness", 0.0),
                                            ("SpacingBetweenSlices", -2.5)])
def test_impossible_slice_spacing_is_refused(tmp_path: Path, keyword: str, value: float) -> None:
    folder = _edit(_series(tmp_path), lambda ds: setattr(ds, keyword, value))
    err = _reason(read_ct_series, folder)
    assert err.reason == "invalid_spacing" and keyword in str(err)


def test_an_empty_slice_thickness_is_fine(tmp_path: Path) -> None:
    folder = _edit(_series(tmp_path), lambda ds: setattr(ds, "SliceThickness", None))
    assert read_ct_series(folder).hu.shape == (5, 8, 10)


def test_enhanced_ct_spacing_and_rescale_are_checked_too(tmp_path: Path) -> None:
    hu = hu_volume((4, 8, 10), seed=3)
    path = write_enhanced_ct(tmp_path / "enh.dcm", hu, order=[0, 1, 2, 3], slopes=[1.0] * 4,
                             intercepts=[-1024.0] * 4, pixel_spacing=(0.0, 0.7))
    assert _reason(read_ct_series, path).reason == "invalid_spacing"
    zero = write_enhanced_ct(tmp_path / "zero.dcm", hu, order=[0, 1, 2, 3], slopes=[1.0] * 4,
                             intercepts=[-1024.0] * 4)
    ds = pydicom.dcmread(zero)
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence[0].RescaleSlope = 0
    ds.save_as(zero, enforce_file_format=True)
    assert _reason(read_ct_series, zero).reason == "invalid_rescale"


def test_a_constant_volume_is_a_blank_image(tmp_path: Path) -> None:
    folder = tmp_path / "blank"
    write_ct_series(folder, np.full((4, 8, 10), -1000.0, dtype=np.float32))
    err = _reason(read_ct_series, folder)
    assert err.reason == "blank_image" and "-1000 HU" in str(err)
    # the extraction path (stored dtype) refuses it as well
    assert _reason(read_study, folder, "CTPA", compact=True).reason == "blank_image"
