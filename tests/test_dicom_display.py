"""The display pipeline (PS3.3 C.11) against pydicom's apply_modality_lut / apply_voi_lut,
on synthetic files covering every VOI function, LUT sequences, MONOCHROME1 and resizing."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxrfast import dicom
from dicom_factory import lut_item, make_dicom
from reference_files import pydicom_voi_range


def _pydicom_display(data: bytes) -> np.ndarray:
    """pydicom's modality + VOI, normalised to [0, 1] over its output range, MONOCHROME1 inverted."""
    ds = pydicom.dcmread(io.BytesIO(data))
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lo, hi = 0.0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
    else:
        lo, hi = pydicom_voi_range(ds)
    t = np.clip((arr - lo) / (hi - lo), 0, 1)
    return 1 - t if ds.PhotometricInterpretation == "MONOCHROME1" else t


def _image(rng, signed=False, bits=12, shape=(33, 47)):
    if signed:
        return rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), size=shape).astype(np.int16)
    return rng.integers(0, 1 << bits, size=shape).astype(np.uint16)


@pytest.mark.parametrize("function", [None, "LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("rescale", [None, (1.0, -1024.0), (-10.0, 40000.0), (0.5, 3.0)])
@pytest.mark.parametrize("signed", [False, True])
def test_windowing_matches_pydicom(function, photometric, rescale, signed):
    rng = np.random.default_rng()
    a = _image(rng, signed)
    m = a.astype(np.float64) * (rescale[0] if rescale else 1) + (rescale[1] if rescale else 0)
    center = float(rng.uniform(m.min(), m.max()))
    width = float(rng.uniform(2, (m.max() - m.min()) / 2))
    data = make_dicom(a, bits_stored=12, photometric=photometric, window=(center, width),
                      voi_function=function, rescale=rescale)
    expected = _pydicom_display(data)
    ours = dicom.read(data, dtype="float32").pixels
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    ours8 = dicom.read(data).pixels
    assert np.abs(ours8.astype(int) - np.round(expected * 255)).max() <= 1
    ours16 = dicom.read(data, dtype="uint16").pixels
    assert np.abs(ours16.astype(int) - np.round(expected * 65535)).max() <= 1


@pytest.mark.parametrize("lut_bits", [8, 12, 16])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_voi_lut_sequence_matches_pydicom(lut_bits, photometric):
    rng = np.random.default_rng()
    a = _image(rng)
    first = int(rng.integers(0, 500))
    entries = 3000
    lut = np.sort(rng.integers(0, 1 << lut_bits, entries))
    lut[-1] = (1 << lut_bits) - 1  # the LUT spans its descriptor's range
    data = make_dicom(a, bits_stored=12, photometric=photometric, voi_lut=lut_item(first, lut_bits, lut),
                      window=(10, 20))  # the LUT wins over the window, as in pydicom
    t = lut[np.clip(a.astype(np.int64) - first, 0, entries - 1)] / ((1 << lut_bits) - 1)
    expected = 1 - t if photometric == "MONOCHROME1" else t
    ours = dicom.read(data, dtype="float32").pixels
    np.testing.assert_allclose(ours, expected, atol=1e-6)
    if lut_bits > 8:  # pydicom cannot read 8-bit packed LUT Data
        np.testing.assert_allclose(ours, _pydicom_display(data), atol=1e-6)


def test_8bit_lut_in_16bit_words():
    # Some writers store 8-bit LUT entries one per 16-bit word: the data length tells.
    a = np.arange(256, dtype=np.uint16).reshape(16, 16)
    lut = 255 - np.arange(256)
    data = make_dicom(a, bits_stored=8, voi_lut=lut_item(0, 8, lut, packed8=False))
    np.testing.assert_array_equal(dicom.read(data).pixels, 255 - a)


def test_voi_lut_narrower_than_descriptor_uses_data_bits():
    # Agfa CR: descriptor says 16 bits, data hold 12. Scaling by 2^16 would give a dark image.
    a = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    lut = np.arange(4096)
    data = make_dicom(a, bits_stored=12, voi_lut=lut_item(0, 16, lut))
    out = dicom.read(data).pixels
    assert out.max() == 255 and out.min() == 0


def test_modality_lut_sequence_matches_pydicom():
    rng = np.random.default_rng()
    a = _image(rng, bits=10)
    lut = rng.integers(0, 1 << 16, 1024)  # pydicom reads 8- and 16-bit modality LUTs only
    data = make_dicom(a, bits_stored=10, modality_lut=lut_item(0, 16, lut), window=(30000, 40000))
    ds = pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_allclose(dicom.read(data, output="modality").pixels, apply_modality_lut(a, ds))
    np.testing.assert_allclose(dicom.read(data, dtype="float32").pixels, _pydicom_display(data), atol=1e-5)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_min_max_window_when_none_given(photometric):
    rng = np.random.default_rng()
    a = _image(rng)
    a[0, 0], a[-1, -1] = 100, 3000
    a = np.clip(a, 100, 3000)
    out = dicom.read(make_dicom(a, bits_stored=12, photometric=photometric), dtype="float32").pixels
    t = (a - 100.0) / 2900.0
    np.testing.assert_allclose(out, 1 - t if photometric == "MONOCHROME1" else t, atol=1e-6)


def test_dense_tissue_is_bright_whatever_the_photometric():
    # Bone has high attenuation: low stored values in MONOCHROME1, high in MONOCHROME2.
    bone = np.zeros((8, 8), np.uint16)
    bone[2:6, 2:6] = 1
    mono2 = np.where(bone, 3000, 500).astype(np.uint16)
    mono1 = np.where(bone, 500, 3000).astype(np.uint16)
    for a, ph in [(mono2, "MONOCHROME2"), (mono1, "MONOCHROME1")]:
        out = dicom.read(make_dicom(a, bits_stored=12, photometric=ph, window=(1750, 3000))).pixels
        assert out[3, 3] > out[0, 0] + 100
    inv = dicom.read(make_dicom(mono1, bits_stored=12, presentation_lut_shape="INVERSE",
                                window=(1750, 3000))).pixels
    assert inv[3, 3] > inv[0, 0] + 100


@pytest.mark.parametrize("size,shape", [(16, (16, 12)), (100, (100, 75)), ((20, 30), (20, 30))])
def test_resize_matches_pillow_bilinear(size, shape):
    from PIL import Image

    rng = np.random.default_rng()
    a = _image(rng, shape=(64, 48))
    data = make_dicom(a, bits_stored=12, window=(2048, 4096))
    full = dicom.read(data, dtype="float32").pixels
    ours = dicom.read(data, dtype="float32", size=size).pixels
    assert ours.shape == shape
    ref = np.asarray(Image.fromarray(full, mode="F").resize(shape[::-1], Image.BILINEAR))
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    ours8 = dicom.read(data, size=size).pixels
    assert np.abs(ours8.astype(int) - np.round(ref * 255)).max() <= 1


# Non-finite VOI and rescale values (issue 9): strtod reads "NaN", "inf", "-inf", and 1e999 is
# inf. Each such value is ignored like an absent one; the file reads as if it were not there.
_BAD = ["NaN", "inf", "-inf"]


def _outputs(data: bytes) -> dict[str, np.ndarray]:
    out = {f"display-{dt}": dicom.read(data, dtype=dt).pixels for dt in ("uint8", "uint16", "float32")}
    out["modality"] = dicom.read(data, output="modality").pixels
    out["resized"] = dicom.read(data, dtype="float32", size=(5, 7)).pixels
    lut, _, _ = dicom.display_lut(data, (0, 4095))
    out["lut"] = lut
    return out


def _assert_same_outputs(data: bytes, reference: bytes) -> None:
    ours, expected = _outputs(data), _outputs(reference)
    for key, value in ours.items():
        assert np.isfinite(value.astype(np.float64)).all(), key
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    assert ours["display-float32"].min() == 0.0 and ours["display-float32"].max() == 1.0  # not silent zeros


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while writing the invalid DS
@pytest.mark.parametrize("bad", _BAD)
@pytest.mark.parametrize("which", ["center", "width"])
def test_non_finite_window_is_ignored(bad, which):
    a = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30) % 4096
    window = (bad, 1000) if which == "center" else (2000, bad)
    data = make_dicom(a, bits_stored=12, window=window, rescale=(1.0, -1024.0))
    reference = make_dicom(a, bits_stored=12, rescale=(1.0, -1024.0))  # no window: min/max
    _assert_same_outputs(data, reference)
    assert dicom.needs_value_range(data)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bad", _BAD)
@pytest.mark.parametrize("which", ["slope", "intercept"])
def test_non_finite_rescale_value_is_ignored(bad, which):
    a = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30) % 4096
    if which == "slope":
        data = make_dicom(a, bits_stored=12, rescale=(bad, -1024.0), window=(0, 2000))
        reference = make_dicom(a, bits_stored=12, extra={"RescaleIntercept": -1024.0}, window=(0, 2000))
    else:
        data = make_dicom(a, bits_stored=12, rescale=(2.0, bad), window=(4000, 6000))
        reference = make_dicom(a, bits_stored=12, extra={"RescaleSlope": 2.0}, window=(4000, 6000))
    _assert_same_outputs(data, reference)


def test_rescale_beyond_float32_is_an_error():
    # Finite, but stored values map beyond float32: refused rather than returning inf pixels.
    a = np.arange(16, dtype=np.uint16).reshape(4, 4)
    data = make_dicom(a, bits_stored=12, rescale=(1e300, 0.0))
    for output in ("modality", "display"):
        with pytest.raises(dicom.InvalidDicomError, match="<bytes>.*Rescale"):
            dicom.read(data, output=output)
    assert dicom.read(data, output="stored").pixels.max() == 15  # stored values need no rescale


def test_voi_lut_lookup_of_far_out_values_clamps():
    # Modality values far outside the LUT (here 1e30 * v) take its last entry; a float -> int
    # cast of such values was undefined behaviour (on x86 it wrapped to the first entry).
    a = np.array([[0, 1], [2, 3]], np.uint16)
    lut = np.arange(100, dtype=np.int64) * 40
    data = make_dicom(a, bits_stored=12, rescale=(1e30, 0.0), voi_lut=lut_item(0, 12, lut))
    out = dicom.read(data, dtype="float32").pixels
    np.testing.assert_allclose(out, [[0.0, 3960 / 4095], [3960 / 4095, 3960 / 4095]], rtol=1e-6)
    data = make_dicom(a, bits_stored=12, rescale=(-1e30, 0.0), voi_lut=lut_item(0, 12, lut))
    np.testing.assert_allclose(dicom.read(data, dtype="float32").pixels, 0.0)
