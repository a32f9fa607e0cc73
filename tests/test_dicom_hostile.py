"""Hostile and odd input to the native reader: each case ends in a correct result or a
DicomError, in bounded time and memory, and never reads outside the caller's buffer."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib

import numpy as np
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian

from cxrfast import dicom
from dicom_factory import (
    base_dataset,
    deflate_start,
    deflated_with_zeros,
    make_dicom,
    number_of_frames_file,
    rle_many_frames,
)


def _small() -> tuple[np.ndarray, bytes]:
    a = np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 50
    return a, make_dicom(a, bits_stored=12)


# -- strided buffers ----------------------------------------------------------------------------

def test_reversed_buffer_is_refused_not_read_out_of_bounds():
    _, data = _small()
    with pytest.raises(ValueError, match="contiguous"):
        dicom.read(memoryview(data)[::-1])
    with pytest.raises(ValueError, match="contiguous"):
        dicom.read_header(memoryview(data)[::-1])


def test_every_other_byte_buffer_is_refused_not_misread():
    a, data = _small()
    doubled = bytes(b for byte in data for b in (byte, 0xAB))  # [::2] of this is `data`
    with pytest.raises(ValueError, match="contiguous"):
        dicom.read(memoryview(doubled)[::2], output="stored")
    np.testing.assert_array_equal(dicom.read(bytes(memoryview(doubled)[::2]), output="stored").pixels, a)


def test_contiguous_views_and_arrays_still_read():
    a, data = _small()
    np.testing.assert_array_equal(dicom.read(memoryview(data), output="stored").pixels, a)
    np.testing.assert_array_equal(dicom.read(np.frombuffer(data, np.uint8), output="stored").pixels, a)
    padded = b"xx" + data
    np.testing.assert_array_equal(dicom.read(memoryview(padded)[2:], output="stored").pixels, a)


# -- not DICOM at all ---------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(40)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(40)
TEXT = b"hello, this is a plain text file and not an image\n" * 3
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n" + bytes(60)


@pytest.mark.parametrize("data", [PNG, JPEG, TEXT, PDF, bytes(200)], ids=["png", "jpeg", "text", "pdf", "zeros"])
def test_non_dicom_files_say_not_a_dicom_file(tmp_path, data):
    with pytest.raises(dicom.InvalidDicomError, match="not a DICOM file"):
        dicom.read(data)
    path = tmp_path / "picture.png"
    path.write_bytes(data)
    with pytest.raises(dicom.InvalidDicomError, match=r"picture\.png: not a DICOM file"):
        dicom.read(path)
    with pytest.raises(dicom.InvalidDicomError, match="not a DICOM file"):
        dicom.read_header(path)


def _zip() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("scan.dcm", b"x" * 300)
    return buf.getvalue()


def _gzip() -> bytes:
    import gzip

    return gzip.compress(b"a DICOM file inside a gzip is still a gzip\n" * 10)


def _tiff(order: bytes) -> bytes:
    e = "<" if order == b"II" else ">"
    # header, first IFD at 8: one entry (ImageWidth SHORT 16), no next IFD, then pixels
    return order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "HHHIHHI", 1, 256, 3, 1, 16, 0, 0) + bytes(256)


def _nifti(e: str) -> bytes:
    hdr = bytearray(352)
    struct.pack_into(e + "i", hdr, 0, 348)  # sizeof_hdr
    struct.pack_into(e + "8h", hdr, 40, 2, 16, 16, 1, 1, 1, 1, 1)  # dim
    struct.pack_into(e + "hh", hdr, 70, 4, 16)  # datatype int16, bitpix
    hdr[344:348] = b"n+1\0"
    return bytes(hdr) + bytes(512)


OTHER_FORMATS = {
    "zip": _zip(),
    "gzip": _gzip(),
    "tiff_le": _tiff(b"II"),
    "tiff_be": _tiff(b"MM"),
    "nifti_le": _nifti("<"),
    "nifti_be": _nifti(">"),
    "png": PNG,
    "text": TEXT,
    **{f"random{seed}": np.random.default_rng(seed).bytes(1000) for seed in range(12)},
}


@pytest.mark.parametrize("name", list(OTHER_FORMATS))
def test_other_file_formats_say_not_a_dicom_file(tmp_path, name):
    """Only the preamble, a file meta group, or a data set whose first elements parse (sensible
    first group, ascending tags, known VRs, lengths inside the file) make a file DICOM."""
    path = tmp_path / f"upload.{name}"
    path.write_bytes(OTHER_FORMATS[name])
    for call in (dicom.read, dicom.read_header):
        with pytest.raises(dicom.InvalidDicomError, match=rf"upload\.{name}: not a DICOM file"):
            call(path)


def test_bare_data_sets_without_preamble_are_still_dicom():
    import io

    a = np.arange(20, dtype=np.uint16).reshape(4, 5)
    for implicit, little in [(True, True), (False, True), (False, False)]:
        ds = base_dataset(a, "MONOCHROME2", 16)
        del ds.file_meta
        buf = io.BytesIO()
        if not little:
            ds.PixelData = a.astype(">u2").tobytes()
        ds.save_as(buf, implicit_vr=implicit, little_endian=little)
        np.testing.assert_array_equal(dicom.read(buf.getvalue(), output="stored").pixels, a)


# -- deflate bombs ------------------------------------------------------------------------------

def test_deflate_helper_builds_a_valid_file():
    data = deflated_with_zeros(1000)
    assert dicom.read_header(data)["transfer_syntax"] == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, np.zeros((16, 16), np.uint16))
    big = deflated_with_zeros((1 << 23) + 10)
    inflated = zlib.decompressobj(-15).decompress(big[deflate_start(big) :])
    assert len(inflated) > 1 << 23  # the repeated block really inflates


@pytest.fixture(scope="module")
def deflate_bomb() -> bytes:
    data = deflated_with_zeros(2_000_000_000)  # 2 GB of zeros before Pixel Data
    assert len(data) < 4_000_000
    return data


def test_deflate_bomb_is_refused_quickly(deflate_bomb, tmp_path):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(deflate_bomb)
    for call in (lambda: dicom.read(deflate_bomb), lambda: dicom.read_header(deflate_bomb),
                 lambda: dicom.read(path), lambda: dicom.read_header(path)):
        start = time.monotonic()
        with pytest.raises(dicom.DicomError, match="inflates"):
            call()
        assert time.monotonic() - start < 1.0


def test_deflated_pixel_data_of_zeros_is_not_a_bomb():
    """Pixel data compress as well as a bomb; the header declares them, so they are read."""
    a = np.zeros((1024, 1024), np.uint16)
    data = make_dicom(a, transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert len(data) < a.nbytes / 200
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, a)
    assert dicom.read_header(data)["rows"] == 1024


def test_deflated_header_stops_at_pixel_data():
    """read_header needs only the bytes up to Pixel Data, even if the rest is cut off."""
    a = np.random.default_rng(0).integers(0, 4096, (256, 256)).astype(np.uint16)
    data = make_dicom(a, bits_stored=12, window=(100, 200), transfer_syntax=DeflatedExplicitVRLittleEndian)
    cut = data[: len(data) // 2]
    meta = dicom.read_header(cut)
    assert meta["rows"] == 256 and meta["window"] == (100.0, 200.0)
    with pytest.raises(dicom.TruncatedError):
        dicom.read(cut)


# -- a Basic Offset Table with 80,000 fragments -------------------------------------------------

def test_basic_offset_table_with_80000_fragments_is_fast():
    n = 80_000
    data = rle_many_frames(n)
    start = time.monotonic()
    frames = dicom.encapsulated_frames(data).frames
    px = dicom.read(data, output="stored").pixels
    elapsed = time.monotonic() - start
    assert len(frames) == n
    np.testing.assert_array_equal(px.reshape(-1), np.arange(n) % 256)
    assert elapsed < 1.0


def test_basic_offset_table_pointing_between_fragments_is_invalid():
    data = bytearray(rle_many_frames(3))
    bot = data.index(b"\xfe\xff\x00\xe0") + 8
    data[bot + 4 : bot + 8] = struct.pack("<I", 5)
    with pytest.raises(dicom.InvalidDicomError, match="between fragments"):
        dicom.read(bytes(data))


# -- float header values cast to integers -------------------------------------------------------

@pytest.mark.parametrize("text", [b"1e300", b"nan", b"inf", b"-inf", b"1e19", b"3e9"])
def test_non_finite_or_huge_number_of_frames_is_a_dicom_error(text):
    data = number_of_frames_file(text)
    with pytest.raises(dicom.InvalidDicomError, match="Number of Frames"):
        dicom.read_header(data)
    with pytest.raises(dicom.InvalidDicomError, match="Number of Frames"):
        dicom.read(data)


def test_plain_number_of_frames_still_parses():
    data = number_of_frames_file(b"1")
    assert dicom.read_header(data)["number_of_frames"] == 1
    assert dicom.read(data, output="stored").pixels.shape == (3, 4)


# -- thread-pool creation that fails ------------------------------------------------------------

def test_thread_creation_failure_raises_instead_of_aborting(tmp_path):
    _, data = _small()
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    script = textwrap.dedent(f"""
        import resource, sys
        import numpy
        from cxrfast import dicom
        def vm_bytes():
            for line in open("/proc/self/status"):
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        limit = vm_bytes() + (256 << 20)  # room for a few thread stacks, not for 1000
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            dicom.read_many([{str(path)!r}] * 1000, num_threads=1000)
        except RuntimeError as exc:
            print("raised:", exc)
            sys.exit(0)
        print("no error")
        sys.exit(0)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "terminate called" not in proc.stderr
    assert "raised: cannot start" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def test_read_many_survives_bad_alloc_while_growing_its_thread_pool(tmp_path):
    """std::bad_alloc after one thread started: read_many raises (like a thread that cannot
    start) instead of std::terminate, and the process goes on."""
    import thread_fault

    lib = thread_fault.build(tmp_path)
    if lib is None:
        pytest.skip("needs Linux and a C++ compiler for the fault-injection library")
    _, data = _small()
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    script = textwrap.dedent(f"""
        import ctypes
        from cxrfast import dicom
        ctypes.CDLL(None).cxr_fault_after_threads(1)
        try:
            dicom.read_many([{str(path)!r}] * 16, num_threads=4)
        except RuntimeError as exc:
            print("raised:", exc)
        print(len(dicom.read_many([{str(path)!r}] * 16, num_threads=4)))
    """)
    proc = thread_fault.run(script, lib)
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["raised: cannot start 4 native threads (2 started): std::bad_alloc", "16"]
