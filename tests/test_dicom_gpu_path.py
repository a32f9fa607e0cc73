"""The direct-DICOM GPU path's display stage gives the CPU path's numbers (run on CPU tensors
here; the DALI GPU decoder itself needs a GPU)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from cxrfast import dicom
from cxrfast.data.dicom_gpu import DicomReader
from dicom_factory import lut_item, make_dicom
from reference_files import reference_files


def _cases(tmp_path):
    rng = np.random.default_rng()
    a = rng.integers(0, 4096, (40, 30)).astype(np.uint16)
    s = rng.integers(-2048, 2048, (40, 30)).astype(np.int16)
    cases = {
        "window_mono1": make_dicom(a, bits_stored=12, photometric="MONOCHROME1", window=(2000, 1500)),
        "minmax_mono2": make_dicom(a, bits_stored=12),  # no window: the min/max of the image
        "minmax_signed_rescale": make_dicom(s, bits_stored=12, rescale=(-2.0, 100.0)),
        "sigmoid": make_dicom(a, bits_stored=12, window=(1000, 800), voi_function="SIGMOID"),
        "voi_lut": make_dicom(a, bits_stored=12, voi_lut=lut_item(0, 16, np.arange(4096) * 16)),
        "modality_lut_minmax": make_dicom(a, bits_stored=12, modality_lut=lut_item(0, 16, np.arange(4096)[::-1] * 3)),
    }
    paths = []
    for name, data in cases.items():
        p = tmp_path / f"{name}.dcm"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


def _frame(p):
    return 0 if dicom.read_header(p)["number_of_frames"] > 1 else None


def test_display_on_device_equals_cpu_path(tmp_path):
    grey = []
    for p in reference_files():
        try:
            m = dicom.read_header(p)
        except dicom.DicomError:
            continue
        if m["has_pixel_data"] and m["samples_per_pixel"] == 1 and 0 < m["bits_stored"] <= 16 and \
                m["codec"] in ("native", "rle", "jpeg_lossless"):
            grey.append(p)
    paths = _cases(tmp_path) + grey[:40]
    reader = DicomReader("cpu", use_dali=False)
    ok = 0
    for p in paths:
        try:
            expected = dicom.read(p, dtype="float32", frame=_frame(p)).pixels
        except dicom.DicomError:
            continue
        (got,) = reader([p])
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=os.path.basename(p))
        ok += 1
    assert ok >= 6


@pytest.mark.parametrize("size", [16, (20, 24)])
def test_resize_on_device_matches_cpu_resize(tmp_path, size):
    reader = DicomReader("cpu", size=size, use_dali=False)
    for p in _cases(tmp_path):
        (got,) = reader([p])
        expected = dicom.read(p, dtype="float32", size=size).pixels
        assert got.shape == expected.shape
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_raw_decoder_words_take_the_same_path(tmp_path):
    """What the GPU decoder returns (raw words, unshifted, not sign-extended) maps to the same
    display values as the CPU path's stored values."""
    reader = DicomReader("cpu", use_dali=False)
    for p in _cases(tmp_path):
        stored = dicom.read(p, output="stored").pixels.astype(np.int64)
        bits = dicom.read_header(p)["bits_stored"]
        raw = torch.from_numpy((stored & ((1 << bits) - 1)).astype(np.int32))  # two's complement words
        got = reader.display(p, raw, shifted=False)
        np.testing.assert_array_equal(got.numpy(), dicom.read(p, dtype="float32").pixels)
