"""Compressed transfer syntaxes (issue 13): which of pydicom's bundled compressed files decode
with the installed plugins and which fail with which documented reason; lossless decodes equal
the uncompressed original; the decoder (name and version) is part of a compressed study's
content hash; a blank decode is refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from embedstore import dicom
from embedstore.dicom import content_hash, read_ct_series, read_radiograph
from embedstore.dicom import validation as v
from embedstore.errors import DicomError


def _file(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


# Every compressed greyscale file in pydicom's wheel, and the colour ones' outcome in bulk.
DECODES = ["693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "JPEG2000.dcm",
           "MR_small_jp2klossless.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
           "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "rtdose_rle.dcm",
           "rtdose_rle_1frame.dcm"]
FAILS = {
    # 12-bit JPEG Extended: only pylibjpeg-libjpeg decodes it, GPL-3, not a dependency
    "JPEG-lossy.dcm": "unsupported_transfer_syntax",
    "JPGExtended.dcm": "unsupported_transfer_syntax",
    "JPEG2000-embedded-sequence-delimiter.dcm": "corrupt_pixel_data",  # a broken codestream
    "UN_sequence.dcm": "truncated",  # an image SOP class without PixelData
    "SC_rgb_jpeg.dcm": "color_image", "SC_rgb_rle.dcm": "color_image",
    "SC_rgb_jls_lossy_line.dcm": "color_image", "SC_rgb_jpeg_gdcm.dcm": "color_image",
    "examples_jpeg2k.dcm": "color_image", "SC_rgb_gdcm_KY.dcm": "color_image",
}


@pytest.mark.parametrize("name", DECODES)
def test_bundled_compressed_file_decodes(name: str) -> None:
    rad = read_radiograph(_file(name))
    assert rad.pixels.dtype == np.float32 and np.isfinite(rad.pixels).all()
    assert rad.pixels.max() > rad.pixels.min()  # not blank
    assert len(content_hash(_file(name), "CXR")) == 64


@pytest.mark.parametrize("name, reason", sorted(FAILS.items()))
def test_bundled_compressed_file_fails_with_its_reason(name: str, reason: str) -> None:
    with pytest.raises(DicomError) as info:
        read_radiograph(_file(name))
    assert info.value.reason == reason and reason in dicom.REASONS
    if reason == "unsupported_transfer_syntax":
        assert "pylibjpeg-libjpeg" in str(info.value)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_lossless_decodes_equal_the_uncompressed_original(name: str) -> None:
    np.testing.assert_array_equal(read_radiograph(_file(name)).pixels,
                                  read_radiograph(_file("MR_small.dcm")).pixels)


def _jpeg_lossless_series(tmp_path: Path) -> tuple[Path, Path]:
    """CT_small as a 2-slice series, uncompressed and JPEG Lossless SV1 (encoded with GDCM)."""
    import gdcm

    raw, jll = tmp_path / "raw", tmp_path / "jll"
    raw.mkdir()
    jll.mkdir()
    for k in range(2):
        ds = pydicom.dcmread(_file("CT_small.dcm"))
        ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(raw / f"{k}.dcm", enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(raw / f"{k}.dcm"))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(jll / f"{k}.dcm"))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
    return raw, jll


def test_jpeg_lossless_ct_series_decodes_to_the_same_hu(tmp_path: Path) -> None:
    raw, jll = _jpeg_lossless_series(tmp_path)
    ts = pydicom.dcmread(jll / "0.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == "1.2.840.10008.1.2.4.70"
    np.testing.assert_array_equal(read_ct_series(jll).hu, read_ct_series(raw).hu)
    assert content_hash(jll, "CTPA") != content_hash(raw, "CTPA")  # another encoding


def test_the_preferred_installed_plugin_decodes() -> None:
    assert v._choose_decoder(RLELossless)[0] == "pylibjpeg"  # pylibjpeg-rle, 5.7x pydicom's
    assert v._choose_decoder(pydicom.uid.JPEGLSLossless)[0] == "pyjpegls"
    plugin, versions = v._choose_decoder(pydicom.uid.JPEG2000Lossless)
    assert plugin == "pylibjpeg" and "pylibjpeg-openjpeg" in versions


def test_a_decoder_upgrade_changes_compressed_hashes_only(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    before = {n: content_hash(_file(n), "CXR") for n in ("MR_small_RLE.dcm", "MR_small.dcm")}
    v._choose_decoder.cache_clear()
    real = v._version
    monkeypatch.setattr(v, "_version", lambda d: "99.0" if d == "pylibjpeg-rle" else real(d))
    try:
        after = {n: content_hash(_file(n), "CXR") for n in before}
    finally:
        v._choose_decoder.cache_clear()
    assert after["MR_small_RLE.dcm"] != before["MR_small_RLE.dcm"]
    assert after["MR_small.dcm"] == before["MR_small.dcm"]


def test_a_blank_decode_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a decoder that silently returns zeros (as GPU and some lossless decoders have done)
    path = shutil.copy(_file("MR_small_RLE.dcm"), tmp_path / "a.dcm")
    real = v.pixel_array
    monkeypatch.setattr(v, "pixel_array", lambda ds, **kw: np.zeros_like(real(ds, **kw)))
    with pytest.raises(DicomError) as info:
        read_radiograph(path)
    assert info.value.reason == "blank_image"
