"""Conformance of cxrfast.dicom against pydicom (+ pylibjpeg, GDCM) on every reference file."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cxrfast import dicom
from reference_files import LOSSY, pydicom_pixels, pydicom_voi_range, reference_files

FILES = reference_files()
if not FILES:
    pytest.skip("neither pydicom test files nor pydicom-data are installed", allow_module_level=True)


def _masked(ds, arr: np.ndarray) -> np.ndarray:
    """pydicom's stored values, masked to Bits Stored and sign-extended, as int64 (floats as they are)."""
    if arr.dtype.kind == "f":
        return arr.astype(arr.dtype.newbyteorder("="))
    a = arr.astype(np.int64)
    if ds.BitsAllocated == 1:
        return a
    bits = ds.BitsStored
    a &= (1 << bits) - 1
    if ds.PixelRepresentation == 1:
        a = np.where(a >= 1 << (bits - 1), a - (1 << bits), a)
    return a


def _reference(path: str):
    ds, arr, reason = pydicom_pixels(path)
    if arr is None:
        pytest.skip(reason)
    return ds, arr


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_stored_values_bit_exact(path):
    ds, ref = _reference(path)
    ours = dicom.read(path, output="stored").pixels
    assert ours.shape == ref.shape
    if ref.dtype.kind == "f":  # Float / Double Float Pixel Data: the same IEEE values
        assert ours.dtype == _masked(ds, ref).dtype
        np.testing.assert_array_equal(ours, ref)
        return
    diff = np.abs(ours.astype(np.int64) - _masked(ds, ref))
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert diff.max() <= (1 if ts in LOSSY else 0)


def _monochrome(ds) -> bool:
    return ds.get("SamplesPerPixel", 1) == 1 and str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_modality_output_matches_pydicom(path):
    from pydicom.pixels import apply_modality_lut

    ds, ref = _reference(path)
    if not _monochrome(ds) or str(ds.file_meta.TransferSyntaxUID) in LOSSY:
        pytest.skip("modality LUT applies to exact monochrome data")
    expected = apply_modality_lut(_masked(ds, ref), ds).astype(np.float64)
    ours = dicom.read(path, output="modality").pixels
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_display_output_matches_pydicom_voi(path):
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds, ref = _reference(path)
    if not _monochrome(ds) or str(ds.file_meta.TransferSyntaxUID) in LOSSY:
        pytest.skip("VOI applies to exact monochrome data")
    has_lut = "VOILUTSequence" in ds
    if not has_lut and not ("WindowCenter" in ds and "WindowWidth" in ds):
        pytest.skip("no VOI in the file (min/max window is tested on synthetic files)")
    modality = apply_modality_lut(_masked(ds, ref), ds)
    voi = apply_voi_lut(modality, ds).astype(np.float64)
    if has_lut:
        item = ds.VOILUTSequence[0]
        data = np.asarray(item.LUTData, dtype=np.int64)
        bits = int(item.LUTDescriptor[2])
        need = max(1, int(data.max()).bit_length())
        top = 2.0 ** (need if data.max() > 2**bits - 1 else min(bits, need)) - 1
        expected = voi / top
    else:
        lo, hi = pydicom_voi_range(ds)
        expected = (voi - lo) / (hi - lo)
    expected = np.clip(expected, 0, 1)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        expected = 1.0 - expected
    ours = dicom.read(path, dtype="float32").pixels
    np.testing.assert_allclose(ours, expected, atol=2e-5)
    ours8 = dicom.read(path).pixels
    assert ours8.dtype == np.uint8
    assert np.abs(ours8.astype(int) - np.round(expected * 255)).max() <= 1


# The two real files cxrfast once refused while pydicom decoded them (pydicom-data; when that
# package is installed without them, or not at all, these skip).
NAMED = {os.path.basename(f): f for f in FILES}


def test_float_pixel_data_reference_file():
    name = "parametric_map_float.dcm"
    if name not in NAMED:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    ds, ref = _reference(NAMED[name])
    ours = dicom.read(NAMED[name], output="stored").pixels
    assert ours.dtype.kind == "f" and ours.dtype.itemsize == ref.dtype.itemsize
    np.testing.assert_array_equal(ours, ref)
    assert dicom.read(NAMED[name]).pixels.dtype == np.uint8


def test_non_byte_aligned_one_bit_reference_file():
    name = "liver_nonbyte_aligned.dcm"
    if name not in NAMED:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    ds, ref = _reference(NAMED[name])
    np.testing.assert_array_equal(dicom.read(NAMED[name], output="stored").pixels, ref)
