"""Stored values of native little-endian files read by path: masked in the file's own buffer,
which becomes the array (one read, no second buffer). Every case is checked against the
general path (the same bytes passed as bytes, which always copies)."""
from __future__ import annotations

import numpy as np
import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrfast import _dicom, dicom
from dicom_factory import base_dataset, make_dicom, write

DTYPES = [(np.uint8, 8), (np.int8, 7), (np.uint16, 12), (np.uint16, 16), (np.int16, 16), (np.int16, 11),
          (np.uint32, 32), (np.int32, 20)]


def _in_place(arr: np.ndarray) -> bool:
    """True when the array is the file buffer itself (the named capsule of that path)."""
    return "cxrfast.file_bytes" in repr(arr.base)


def _random(dtype, bits, shape, rng):
    info = np.iinfo(dtype)
    lo = -(1 << (bits - 1)) if info.min < 0 else 0
    hi = (1 << (bits - 1)) - 1 if info.min < 0 else (1 << bits) - 1
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def _with_garbage(a: np.ndarray, bits: int, high_bit: int | None = None, patient: str = "P001") -> bytes:
    """a's stored bits at High Bit (default Bits Stored - 1), random garbage in the other bits."""
    rng = np.random.default_rng(1)
    width = a.dtype.itemsize * 8
    high_bit = bits - 1 if high_bit is None else high_bit
    shift = high_bit - bits + 1
    word = np.dtype(f"u{a.dtype.itemsize}")
    keep = ((1 << bits) - 1) << shift
    noise = rng.integers(0, 1 << width, size=a.shape, dtype=np.uint64).astype(word)
    raw = ((a.view(word).astype(np.uint64) << shift) & keep | noise.astype(np.uint64) & ~np.uint64(keep) & np.uint64((1 << width) - 1))
    ds = base_dataset(a, "MONOCHROME2", bits)
    ds.HighBit = high_bit
    ds.PatientID = patient
    # Fixed UIDs (base_dataset draws random ones of random length): the header length, and so
    # the pixel offset, depends on the Patient ID alone.
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.StudyInstanceUID = ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.PixelData = raw.astype(word).tobytes()
    return write(ds, ExplicitVRLittleEndian)


def _pixel_offset(data: bytes) -> int:
    return data.rindex(b"\xe0\x7f\x10\x00") + 12  # explicit VR: tag, VR, 2 reserved, 4-byte length


def _aligned(a: np.ndarray, bits: int, high_bit: int | None = None) -> bytes:
    """_with_garbage, with a Patient ID that puts the pixel data on a word boundary."""
    for patient in ("P0", "P001"):
        data = _with_garbage(a, bits, high_bit, patient)
        if _pixel_offset(data) % a.dtype.itemsize == 0:
            return data
    raise AssertionError("no Patient ID aligns the pixel data")


@pytest.mark.parametrize("dtype,bits", DTYPES)
@pytest.mark.parametrize("frames", [1, 3])
def test_in_place_equals_the_copy_and_the_values(tmp_path, dtype, bits, frames):
    rng = np.random.default_rng(7)
    shape = (frames, 9, 13) if frames > 1 else (9, 13)  # odd sizes: 8-bit pixel data of odd length
    a = _random(dtype, bits, shape, rng)
    data = _aligned(a, bits)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    out = dicom.read(path, output="stored").pixels
    assert _in_place(out)
    assert out.dtype == np.dtype(dtype) and out.flags.writeable and out.flags.aligned
    np.testing.assert_array_equal(out, a)
    copied = dicom.read(data, output="stored").pixels
    assert not _in_place(copied)
    np.testing.assert_array_equal(out, copied)


@pytest.mark.parametrize("dtype,bits,high_bit", [(np.uint16, 12, 15), (np.int16, 10, 13), (np.uint32, 20, 27)])
def test_high_bit_above_bits_stored_shifts_in_place(tmp_path, dtype, bits, high_bit):
    a = _random(dtype, bits, (5, 7), np.random.default_rng(3))
    path = tmp_path / "x.dcm"
    path.write_bytes(_aligned(a, bits, high_bit))
    out = dicom.read(path, output="stored").pixels
    assert _in_place(out)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(out, dicom.read(path.read_bytes(), output="stored").pixels)


def test_one_frame_of_several_is_copied_out(tmp_path):
    a = _random(np.uint16, 12, (4, 6, 5), np.random.default_rng(2))
    path = tmp_path / "x.dcm"
    path.write_bytes(_with_garbage(a, 12))
    out = dicom.read(path, output="stored", frame=2).pixels
    assert not _in_place(out)  # the whole file would stay alive for a quarter of it
    np.testing.assert_array_equal(out, a[2])


def test_misaligned_32_bit_samples_take_the_copy(tmp_path):
    """Header lengths move the pixel offset by 2: one of two files has 32-bit samples off a
    4-byte boundary, which numpy would flag unaligned; both read the same values."""
    a = _random(np.int32, 20, (6, 5), np.random.default_rng(4))
    seen = set()
    for patient in ("P0", "P001"):
        path = tmp_path / f"{patient}.dcm"
        path.write_bytes(_with_garbage(a, 20, patient=patient))
        out = dicom.read(path, output="stored").pixels
        assert _in_place(out) == (_pixel_offset(path.read_bytes()) % 4 == 0)
        seen.add(_in_place(out))
        assert out.flags.aligned
        np.testing.assert_array_equal(out, a)
    assert seen == {True, False}


@pytest.mark.parametrize("ts", [ExplicitVRBigEndian, ImplicitVRLittleEndian])
def test_other_native_syntaxes_by_path(tmp_path, ts):
    a = _random(np.int16, 12, (2, 7, 5), np.random.default_rng(5))
    path = tmp_path / "x.dcm"
    path.write_bytes(make_dicom(a, bits_stored=12, transfer_syntax=ts))
    out = dicom.read(path, output="stored").pixels
    assert _in_place(out) == (ts == ImplicitVRLittleEndian)  # big endian is byte-swapped into a copy
    np.testing.assert_array_equal(out, a)


def test_other_outputs_and_resize_do_not_touch_the_file_bytes(tmp_path):
    a = _random(np.uint16, 12, (16, 12), np.random.default_rng(6))
    path = tmp_path / "x.dcm"
    path.write_bytes(_with_garbage(a, 12))
    data = path.read_bytes()
    for kwargs in ({"output": "display"}, {"output": "modality"}, {"output": "stored", "size": 8}):
        out = dicom.read(path, **kwargs).pixels
        assert not _in_place(out)
        np.testing.assert_array_equal(out, dicom.read(data, **kwargs).pixels)


def test_truncated_pixel_data_by_path(tmp_path):
    a = _random(np.uint16, 12, (20, 20), np.random.default_rng(8))
    data = make_dicom(a, bits_stored=12)
    path = tmp_path / "x.dcm"
    path.write_bytes(data[:-11])
    with pytest.raises(dicom.TruncatedError, match="x.dcm"):
        dicom.read(path, output="stored")


def test_writing_the_array_leaves_the_file_and_the_next_read_alone(tmp_path):
    a = _random(np.uint16, 12, (8, 8), np.random.default_rng(9))
    path = tmp_path / "x.dcm"
    path.write_bytes(make_dicom(a, bits_stored=12))
    before = path.read_bytes()
    out = dicom.read(path, output="stored").pixels
    out[:] = 1
    assert path.read_bytes() == before
    np.testing.assert_array_equal(dicom.read(path, output="stored").pixels, a)


def test_a_parse_whose_pixels_were_handed_out_refuses_to_decode_again(tmp_path):
    a = _random(np.uint16, 12, (8, 8), np.random.default_rng(10))
    path = tmp_path / "x.dcm"
    path.write_bytes(make_dicom(a, bits_stored=12))
    parsed = _dicom.parse_file(str(path), False)
    np.testing.assert_array_equal(parsed.decode("stored", -1, "", 0, 0, 0), a)
    with pytest.raises(ValueError, match="handed out"):
        parsed.decode("stored", -1, "", 0, 0, 0)
    with pytest.raises(ValueError, match="handed out"):
        parsed.frame_spans()
    assert parsed.header["rows"] == 8  # the header was copied out when parsed


@pytest.mark.parametrize("threads", [1, 2])
def test_read_many_in_place_and_copied(tmp_path, threads):
    rng = np.random.default_rng(11)
    arrays = [_random(np.uint16, 12, (7, 9), rng), _random(np.int16, 16, (3, 5, 4), rng)]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"{i}.dcm")
        paths[-1].write_bytes(_with_garbage(a, 12 if i == 0 else 16))
    out = dicom.read_many(paths, num_threads=threads, output="stored")
    for img, a in zip(out, arrays):
        assert _in_place(img.pixels)
        np.testing.assert_array_equal(img.pixels, a)
    one = dicom.read_many(paths, num_threads=threads, output="stored", frame=1, on_error="skip")
    assert isinstance(one[0], dicom.InvalidDicomError)  # a one-frame file has no frame 1
    assert not _in_place(one[1].pixels)
    np.testing.assert_array_equal(one[1].pixels, arrays[1][1])


# Files above 64 KiB: read_and_parse masks the pixel words chunk by chunk while reading.
BIG = [(np.uint16, 12, (3, 211, 173)), (np.int16, 11, (307, 263)), (np.uint8, 5, (521, 389)),
       (np.int32, 20, (2, 131, 127)), (np.int8, 6, (3, 401, 199))]


@pytest.mark.parametrize("dtype,bits,shape", BIG)
def test_large_files_masked_while_read(tmp_path, dtype, bits, shape):
    a = _random(dtype, bits, shape, np.random.default_rng(12))
    data = _aligned(a, bits)
    assert len(data) > 3 * 65536 // 2
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    out = dicom.read(path, output="stored").pixels
    assert _in_place(out)
    np.testing.assert_array_equal(out, a)
    for kwargs in ({"output": "display"}, {"output": "modality", "frame": 0}, {"output": "stored", "size": 64},
                   {"output": "stored", "frame": len(shape) - 3 + 1 if len(shape) == 3 else 0}):
        np.testing.assert_array_equal(dicom.read(path, **kwargs).pixels, dicom.read(data, **kwargs).pixels)
    many = dicom.read_many([path, path], num_threads=2, output="stored")
    np.testing.assert_array_equal(many[1].pixels, a)


def test_large_file_whose_tail_changes_bits_stored_is_read_again(tmp_path):
    """An element after Pixel Data (out of order, seen in the wild) sets Bits Stored: the mask
    guessed from the first 64 KiB would drop bits, so the file is read again as on disk."""
    a = _random(np.uint16, 14, (300, 250), np.random.default_rng(13))
    data = _aligned(a, 14)
    tail = b"\x28\x00\x01\x01US\x02\x00\x10\x00" + b"\x28\x00\x02\x01US\x02\x00\x0f\x00"  # Bits Stored 16, High Bit 15
    path = tmp_path / "x.dcm"
    path.write_bytes(data + tail)
    img = dicom.read(path, output="stored")
    assert dicom.read_header(path)["bits_stored"] == 14 and img.meta["bits_stored"] == 16  # head vs full parse
    words = np.frombuffer(data, np.uint16, count=a.size, offset=_pixel_offset(data)).reshape(a.shape)
    assert (words >> 14).any()  # the garbage above the 14 bits is now part of the values
    np.testing.assert_array_equal(img.pixels, words)
    np.testing.assert_array_equal(img.pixels, dicom.read(data + tail, output="stored").pixels)


def test_large_truncated_file_by_path(tmp_path):
    a = _random(np.uint16, 12, (300, 250), np.random.default_rng(14))
    path = tmp_path / "x.dcm"
    path.write_bytes(_aligned(a, 12)[:-1001])
    with pytest.raises(dicom.TruncatedError, match="x.dcm"):
        dicom.read(path, output="stored")


def test_header_longer_than_64_kib(tmp_path):
    a = _random(np.int16, 12, (260, 270), np.random.default_rng(15))
    ds = base_dataset(a, "MONOCHROME2", 12)
    block = ds.private_block(0x0009, "CXRFAST TEST", create=True)
    block.add_new(0x00, "OB", bytes(70000))  # pushes Pixel Data beyond the first 64 KiB
    data = write(ds, ExplicitVRLittleEndian)
    assert _pixel_offset(data) > 65536
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    out = dicom.read(path, output="stored").pixels
    assert _in_place(out)  # masked after the read instead
    np.testing.assert_array_equal(out, a)
