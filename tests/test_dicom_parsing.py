"""Part 10 parsing and native / RLE pixel data, on files written by pydicom."""
from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from cxrfast import dicom
from dicom_factory import base_dataset, float_file, make_dicom, make_encapsulated, write

NATIVE = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
DTYPES = [(np.uint8, 8), (np.int8, 7), (np.uint16, 12), (np.int16, 16), (np.uint32, 32), (np.int32, 20)]


def _random(dtype, bits, shape, rng):
    info = np.iinfo(dtype)
    lo = -(1 << (bits - 1)) if info.min < 0 else 0
    hi = (1 << (bits - 1)) - 1 if info.min < 0 else (1 << bits) - 1
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


@pytest.mark.parametrize("ts", NATIVE)
@pytest.mark.parametrize("dtype,bits", DTYPES)
@pytest.mark.parametrize("frames", [1, 3])
def test_native_round_trip(ts, dtype, bits, frames):
    rng = np.random.default_rng()
    shape = (frames, 7, 11) if frames > 1 else (7, 11)
    a = _random(dtype, bits, shape, rng)
    data = make_dicom(a, bits_stored=bits, transfer_syntax=ts)
    img = dicom.read(data, output="stored")
    assert img.pixels.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(img.pixels, a)
    assert img.meta["number_of_frames"] == frames
    assert img.meta["transfer_syntax"] == ts


def test_garbage_high_bits_are_masked_and_sign_extended():
    rng = np.random.default_rng()
    a = _random(np.int16, 12, (9, 9), rng)
    raw = (a.view(np.uint16) & 0x0FFF) | 0xA000  # overlay garbage above Bits Stored
    ds = base_dataset(a, "MONOCHROME2", 12)
    ds.PixelData = raw.tobytes()
    out = dicom.read(write(ds, ExplicitVRLittleEndian), output="stored").pixels
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("ts", NATIVE)
@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_planar_configuration(ts, planar):
    rng = np.random.default_rng()
    a = rng.integers(0, 256, size=(5, 6, 3)).astype(np.uint8)
    ds = base_dataset(a, "RGB", 8)
    if planar:
        ds.PlanarConfiguration = 1
        ds.PixelData = np.moveaxis(a, -1, 0).tobytes()
    np.testing.assert_array_equal(dicom.read(write(ds, ts), output="stored").pixels, a)


@pytest.mark.parametrize("dtype,bits,photometric,shape", [
    (np.uint8, 8, "MONOCHROME2", (2, 13, 17)), (np.uint16, 16, "MONOCHROME1", (13, 17)),
    (np.int16, 12, "MONOCHROME2", (13, 17)), (np.uint16, 15, "MONOCHROME2", (3, 13, 17)),
    (np.uint8, 8, "RGB", (13, 17, 3)), (np.uint16, 16, "RGB", (2, 5, 4, 3)),
])
def test_rle_round_trip(dtype, bits, photometric, shape):
    rng = np.random.default_rng()
    a = _random(dtype, bits, shape, rng)
    ds = base_dataset(a, photometric, bits)
    ds.compress(RLELossless, encoding_plugin="pydicom")
    data = write(ds, RLELossless)
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, a)
    assert dicom.encapsulated_frames(data).codec == "rle"


def _strip_preamble(data: bytes) -> bytes:
    assert data[128:132] == b"DICM"
    return data[132:]


def test_without_preamble_and_without_file_meta():
    a = np.arange(35, dtype=np.uint16).reshape(5, 7)
    data = make_dicom(a, bits_stored=16, transfer_syntax=ExplicitVRLittleEndian)
    np.testing.assert_array_equal(dicom.read(_strip_preamble(data), output="stored").pixels, a)
    ds = base_dataset(a, "MONOCHROME2", 16)
    del ds.file_meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # data set only, implicit VR LE
    img = dicom.read(buf.getvalue(), output="stored")
    np.testing.assert_array_equal(img.pixels, a)
    assert img.meta["transfer_syntax"] == ImplicitVRLittleEndian


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_sequences_private_tags_and_icon_image_are_skipped(ts):
    a = np.arange(48, dtype=np.uint16).reshape(6, 8)
    ds = base_dataset(a, "MONOCHROME2", 16)
    icon = Dataset()  # an Icon Image Sequence holds its own Rows/Columns/Pixel Data
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.BitsStored = 2, 2, 8, 8
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.PixelRepresentation = 1, "MONOCHROME2", 0
    icon.PixelData = bytes(4)
    inner = Dataset()
    inner.CodeValue = "X"
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = "1.2.3"
    nested.ReferencedImageSequence = Sequence([inner])
    ds.IconImageSequence = Sequence([icon])
    ds.ReferencedStudySequence = Sequence([nested, nested])
    ds.add_new(0x00091010, "LO", "private creator")
    ds.add_new(0x00091011, "OB", b"\x01\x02\x03")  # odd length private value
    for elem in (ds["IconImageSequence"], ds["ReferencedStudySequence"]):
        elem.is_undefined_length = True
        for item in elem.value:
            item.is_undefined_length_sequence_item = True
    img = dicom.read(write(ds, ts), output="stored")
    np.testing.assert_array_equal(img.pixels, a)
    assert (img.meta["rows"], img.meta["columns"]) == (6, 8)


def test_header_only_stops_before_pixel_data():
    a = np.arange(100, dtype=np.uint16).reshape(10, 10)
    data = make_dicom(a, bits_stored=10, rescale=(2.0, -5.0), window=(100, 50))
    cut = data[: data.rindex(b"\xe0\x7f\x10\x00") + 12]  # pixel data element header only
    meta = dicom.read_header(cut)
    assert meta["rows"] == 10 and meta["bits_stored"] == 10
    assert meta["rescale"] == (2.0, -5.0) and meta["window"] == (100.0, 50.0)
    assert meta["view_position"] == "PA" and meta["patient_id"] == "P001"
    assert meta["pixel_spacing"] == (0.143, 0.143)
    with pytest.raises(dicom.TruncatedError, match="<bytes>"):
        dicom.read(cut)


def test_deflated_is_really_deflated():
    a = np.zeros((64, 64), np.uint16)
    data = make_dicom(a, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert len(data) < a.nbytes / 4
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, a)
    bad = data[:-40]
    with pytest.raises(dicom.DicomError):
        dicom.read(bad)


def test_no_pixel_data_and_not_dicom():
    ds = base_dataset(np.zeros((2, 2), np.uint8))
    del ds.PixelData
    with pytest.raises(dicom.NoPixelDataError):
        dicom.read(write(ds, ExplicitVRLittleEndian))
    with pytest.raises(dicom.DicomError):
        dicom.read(b"\x00" * 3)
    with pytest.raises(dicom.DicomReadError, match="missing.dcm"):
        dicom.read("/nonexistent/missing.dcm")


def test_unknown_transfer_syntax():
    data = make_encapsulated([b"\x00\x01"], transfer_syntax="1.2.3.4.5.6", rows=4, columns=4)
    with pytest.raises(dicom.UnsupportedTransferSyntaxError, match="1.2.3.4.5.6"):
        dicom.read(data)


def test_empty_bot_fragments_split_by_eoi():
    import imagecodecs

    rng = np.random.default_rng()
    frames = [rng.integers(0, 255, (8, 9)).astype(np.uint8) for _ in range(2)]
    streams = [imagecodecs.jpeg8_encode(f, lossless=True, predictor=1) for f in frames]
    data = make_encapsulated(streams, transfer_syntax="1.2.840.10008.1.2.4.70", rows=8, columns=9,
                             bits_allocated=8, bits_stored=8, layout="empty", fragments_per_frame=2)
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, np.stack(frames))


def test_library_codecs_jpeg_ls_and_j2k():
    import imagecodecs

    rng = np.random.default_rng()
    a = rng.integers(0, 4096, (16, 20)).astype(np.uint16)
    for ts, enc in [("1.2.840.10008.1.2.4.80", imagecodecs.jpegls_encode),
                    ("1.2.840.10008.1.2.4.90", lambda x: imagecodecs.jpeg2k_encode(x, level=0, codecformat="J2K"))]:
        data = make_encapsulated([enc(a)], transfer_syntax=ts, rows=16, columns=20, bits_stored=12)
        np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, a)


@pytest.mark.parametrize("case", ["plain", "big_private_before_pixels", "deflated", "no_pixel_data"])
def test_header_from_a_file_prefix_equals_header_from_all_bytes(tmp_path, case):
    """read_header(path) reads the first 64 KiB and falls back to the whole file when the
    header does not end there; the answer never depends on that."""
    rng = np.random.default_rng()
    a = rng.integers(0, 4096, (300, 300)).astype(np.uint16)
    ds = base_dataset(a, "MONOCHROME2", 12)
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ts = ExplicitVRLittleEndian
    if case == "big_private_before_pixels":
        ds.add_new(0x00291010, "OB", rng.integers(0, 256, 100_000).astype(np.uint8).tobytes())
    elif case == "deflated":
        ds.add_new(0x00291010, "OB", rng.integers(0, 256, 100_000).astype(np.uint8).tobytes())
        ts = DeflatedExplicitVRLittleEndian
    elif case == "no_pixel_data":
        del ds.PixelData
        ds.add_new(0x00291010, "OB", bytes(100_000))
    data = write(ds, ts)
    path = tmp_path / "f.dcm"
    path.write_bytes(data)
    assert len(data) > 1 << 16
    from_path, from_bytes = dicom.read_header(path), dicom.read_header(data)
    assert from_path == from_bytes
    assert from_path["has_pixel_data"] == (case != "no_pixel_data")
    assert from_path["window"] == (2048.0, 4096.0) and from_path["rows"] == 300


@pytest.mark.parametrize("ts", NATIVE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7)])
def test_float_pixel_data_matches_pydicom(ts, dtype, shape):
    import pydicom

    a = (np.random.default_rng().standard_normal(shape) * 1e3).astype(dtype)
    a.flat[3] = -0.0
    data = float_file(a, ts)
    ref = pydicom.dcmread(io.BytesIO(data)).pixel_array
    stored = dicom.read(data, output="stored").pixels
    assert stored.dtype == np.dtype(dtype) and ref.dtype.kind == "f" and ref.dtype.itemsize == stored.dtype.itemsize
    np.testing.assert_array_equal(stored, ref)
    np.testing.assert_array_equal(stored, a)
    if len(shape) == 3:
        np.testing.assert_array_equal(dicom.read(data, output="stored", frame=2).pixels, a[2])
    modality = dicom.read(data, output="modality").pixels
    assert modality.dtype == np.float32
    np.testing.assert_array_equal(modality, a.astype(np.float32))


def _assert_displayed_as(data: bytes, t: np.ndarray, photometric: str, atol: float) -> None:
    """Display output equals the window position t in [0, 1] (inverted for MONOCHROME1), as
    float32 within atol and as uint8 within one level; never NaN or infinite."""
    if photometric == "MONOCHROME1":
        t = 1 - t
    shown = dicom.read(data, dtype="float32").pixels
    assert np.isfinite(shown).all()
    np.testing.assert_allclose(shown, t, atol=atol)
    assert np.abs(dicom.read(data).pixels.astype(int) - np.round(t * 255)).max() <= 1


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_float_pixel_data_display_is_the_min_max_window(photometric):
    a = np.random.default_rng().uniform(-5, 40, (2, 6, 9)).astype(np.float32)
    a[0, 0, 0], a[0, 0, 1], a[1, 2, 3] = np.nan, np.inf, -np.inf
    data = float_file(a, ExplicitVRLittleEndian, photometric)
    finite = a[np.isfinite(a)]
    t = np.clip((np.nan_to_num(a.astype(np.float64), nan=-np.inf) - finite.min()) / np.ptp(finite), 0, 1)
    _assert_displayed_as(data, t, photometric, atol=1e-5)
    assert dicom.read(data, size=3).pixels.shape == (2, 2, 3)
    with pytest.raises(dicom.UnsupportedFeatureError, match="resizing Float Pixel Data"):
        dicom.read(data, output="stored", size=3)
    with pytest.raises(dicom.UnsupportedFeatureError):
        dicom.display_lut(data, (0, 1))


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_float_pixel_data_display_survives_a_range_beyond_dbl_max(photometric):
    """max - min overflows to inf for [-1e308, 1e308]: the window must still spread the values
    (computed in halves), not give NaN -> 0 for every pixel."""
    a = np.array([[-1e308, 0.0, 1e308, 5e307]], np.float64)
    data = float_file(a, ExplicitVRLittleEndian, photometric)
    t = (a * 0.5 - a.min() * 0.5) / (a.max() * 0.5 - a.min() * 0.5)
    _assert_displayed_as(data, t, photometric, atol=1e-4)


def test_float_pixel_data_cut_short_is_truncated():
    data = float_file(np.zeros((4, 4), np.float32), ExplicitVRLittleEndian)
    bad = bytearray(data)
    at = bad.rindex(b"\xe0\x7f\x08\x00OF") + 8
    bad[at : at + 4] = (60).to_bytes(4, "little")  # 60 of 64 bytes
    with pytest.raises(dicom.TruncatedError):
        dicom.read(bytes(bad[: at + 4 + 60]), output="stored")


@pytest.mark.parametrize("ts", NATIVE)
@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7), (4, 3, 3), (2, 8, 8)])
def test_one_bit_frames_packed_across_byte_boundaries(ts, shape):
    """Bits Allocated 1 with Rows x Columns not a multiple of 8: frames are packed back to
    back in bits (PS3.5 8.1.1), like pydicom's liver_nonbyte_aligned.dcm."""
    import pydicom
    from pydicom.pixels import pack_bits

    bits = np.random.default_rng().integers(0, 2, shape).astype(np.uint8)
    ds = base_dataset(np.zeros(shape, np.uint8), "MONOCHROME2", 1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = pack_bits(bits)
    data = write(ds, ts)
    ref = pydicom.dcmread(io.BytesIO(data)).pixel_array
    ours = dicom.read(data, output="stored").pixels
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours, bits)
    if len(shape) == 3:
        for f in range(shape[0]):
            np.testing.assert_array_equal(dicom.read(data, output="stored", frame=f).pixels, bits[f])
    ds.PixelData = pack_bits(bits)[:-2]  # pack_bits pads to even length with at most one byte
    with pytest.raises(dicom.TruncatedError):
        dicom.read(write(ds, ExplicitVRLittleEndian), output="stored")
