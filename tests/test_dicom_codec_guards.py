"""Library codecs under hostile or missing conditions (issue 9): a codestream that declares
more than its DICOM header never reaches the library, a library failure is that file's
DicomError (also inside read_many), and a missing codec library names what to install."""
from __future__ import annotations

import struct
import sys
import time

import imagecodecs
import numpy as np
import pytest

from cxrfast import _dicom, codecs, dicom
from dicom_factory import make_encapsulated

BIG = 65535


def _patch(stream: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(stream)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _jpeg(marker: bytes, bits: int = 8) -> bytes:
    a = np.full((16, 16), 100, np.uint8 if bits == 8 else np.uint16)
    s = imagecodecs.jpeg8_encode(a, bitspersample=bits) if bits != 8 else imagecodecs.jpeg8_encode(a)
    i = s.index(marker)
    return _patch(s, i + 5, ">HH", BIG, BIG)  # SOFn: FFCn, Lf, P, Y, X


def _jpegls() -> bytes:
    s = imagecodecs.jpegls_encode(np.full((16, 16), 100, np.uint16))
    return _patch(s, s.index(b"\xff\xf7") + 5, ">HH", BIG, BIG)  # SOF55: same layout


def _j2k(encode=imagecodecs.jpeg2k_encode, **kw) -> bytes:
    s = encode(np.full((16, 16), 100, np.uint16), **kw)
    return _patch(s, 8, ">II", BIG, BIG)  # SOC, SIZ, Lsiz, Rsiz, Xsiz, Ysiz


def _jp2(where: str) -> bytes:
    s = imagecodecs.jpeg2k_encode(np.full((16, 16), 100, np.uint16), codecformat="JP2")
    if where == "ihdr":
        return _patch(s, s.index(b"ihdr") + 4, ">II", BIG, BIG)  # HEIGHT, WIDTH
    return _patch(s, s.index(b"\xff\x4f\xff\x51") + 8, ">II", BIG, BIG)


CASES = {
    "jpeg_baseline": ("1.2.840.10008.1.2.4.50", lambda: _jpeg(b"\xff\xc0"), 8),
    "jpeg_extended": ("1.2.840.10008.1.2.4.51", lambda: _jpeg(b"\xff\xc1", 12), 12),
    "jpegls": ("1.2.840.10008.1.2.4.80", _jpegls, 16),
    "jpeg2000": ("1.2.840.10008.1.2.4.90", lambda: _j2k(codecformat="J2K"), 16),
    "jp2-ihdr": ("1.2.840.10008.1.2.4.90", lambda: _jp2("ihdr"), 16),
    "jp2-siz": ("1.2.840.10008.1.2.4.90", lambda: _jp2("siz"), 16),
    "htj2k": ("1.2.840.10008.1.2.4.201", lambda: _j2k(imagecodecs.htj2k_encode), 16),
}


def _file(case: str) -> tuple[bytes, str]:
    ts, make, bits = CASES[case]
    if case == "htj2k" and not (hasattr(imagecodecs, "htj2k_encode") and imagecodecs.HTJ2K.available):
        pytest.skip("imagecodecs has no HTJ2K encoder")
    data = make_encapsulated([make()], transfer_syntax=ts, rows=16, columns=16,
                             bits_allocated=8 if bits == 8 else 16, bits_stored=bits)
    return data, dicom.read_header(data)["codec"]


@pytest.fixture
def library_calls(monkeypatch):
    """Replaces every library decoder with a spy: a call is recorded, nothing is allocated."""
    calls = []

    def spy(frame, photometric):
        calls.append(len(frame))
        raise MemoryError("the spy stands for a 4 GB allocation")

    for codec in list(codecs.DECODERS):
        monkeypatch.setitem(codecs.DECODERS, codec, spy)
    return calls


@pytest.mark.parametrize("case", list(CASES))
def test_declared_size_beyond_the_header_never_reaches_the_library(case, library_calls, tmp_path):
    data, codec = _file(case)
    path = tmp_path / f"{case}.dcm"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(dicom.CorruptCodestreamError, match=f"{path}: {codec} frame 0: .*65535") as err:
        dicom.read(path)
    assert "16x16" in str(err.value)
    with pytest.raises(dicom.CorruptCodestreamError, match="65535"):
        dicom.encapsulated_frames(path)  # the frames a GPU decoder (DALI) would get
    (res,) = dicom.read_many([path], on_error="skip")
    assert isinstance(res, dicom.CorruptCodestreamError)
    assert time.perf_counter() - start < 1.0  # the issue: "well under a second"
    assert library_calls == []


def _clean(codec: str) -> tuple[bytes, str, int]:
    a = np.full((16, 16), 100, np.uint16)
    return {
        "jpeg_baseline": (imagecodecs.jpeg8_encode(a.astype(np.uint8)), "1.2.840.10008.1.2.4.50", 8),
        "jpegls": (imagecodecs.jpegls_encode(a), "1.2.840.10008.1.2.4.80", 16),
        "jpeg2000": (imagecodecs.jpeg2k_encode(a, codecformat="J2K"), "1.2.840.10008.1.2.4.90", 16),
        "jp2": (imagecodecs.jpeg2k_encode(a, codecformat="JP2"), "1.2.840.10008.1.2.4.90", 16),
    }[codec]


def _clean_file(codec: str, rows: int = 16, columns: int = 16, photometric: str = "MONOCHROME2") -> bytes:
    frame, ts, bits = _clean(codec)
    return make_encapsulated([frame], transfer_syntax=ts, rows=rows, columns=columns, photometric=photometric,
                             bits_allocated=8 if bits == 8 else 16, bits_stored=bits)


@pytest.mark.parametrize("codec", ["jpeg_baseline", "jpegls", "jpeg2000", "jp2"])
def test_frames_that_match_the_header_still_decode(codec):
    data = _clean_file(codec)
    assert (dicom.read(data, output="stored").pixels == 100).all()
    assert len(dicom.encapsulated_frames(data).frames) == 1


@pytest.mark.parametrize("codec", ["jpeg_baseline", "jpeg2000"])
def test_declared_size_smaller_than_the_header_is_refused_too(codec, library_calls):
    with pytest.raises(dicom.CorruptCodestreamError, match="declares 16x16 .* header 32x16"):
        dicom.read(_clean_file(codec, rows=16, columns=32))
    assert library_calls == []


def test_more_components_than_samples_is_refused(library_calls):
    rgb = imagecodecs.jpeg8_encode(np.zeros((16, 16, 3), np.uint8))
    data = make_encapsulated([rgb], transfer_syntax="1.2.840.10008.1.2.4.50", rows=16, columns=16,
                             bits_allocated=8, bits_stored=8)  # header: 1 sample per pixel
    with pytest.raises(dicom.CorruptCodestreamError, match="3 component"):
        dicom.read(data)
    assert library_calls == []


@pytest.mark.parametrize("frame", [b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xc0\xff\xff",
                                   b"\xff\xd8" + b"\xff\xfe\x00\x02" * 5000, b"\xff\xd8" + b"\xff" * 10000],
                         ids=["empty", "soi-only", "sos-without-sof", "short-sof", "5000-segments", "fill-bytes"])
def test_malformed_jpeg_headers_are_codestream_errors(frame):
    with pytest.raises(codecs.CodestreamError):
        codecs.check_frame("jpeg_baseline", frame, (16, 16, 1))


@pytest.mark.parametrize("frame", [b"", b"\xff\x4f\xff\x51" + bytes(10), b"\x00\x00\x00\x0cjP  \r\n\x87\n",
                                   b"\x00\x00\x00\x0cjP  \r\n\x87\n\xff\xff\xff\xffjp2c"],
                         ids=["empty", "short-siz", "jp2-without-codestream", "box-past-the-end"])
def test_malformed_jpeg2000_headers_are_codestream_errors(frame):
    with pytest.raises(codecs.CodestreamError):
        codecs.check_frame("jpeg2000", frame, (16, 16, 1))


def test_any_library_failure_is_that_files_error(monkeypatch):
    def broken(frame, photometric):
        raise RuntimeError("libfoo: bad Huffman table")

    monkeypatch.setitem(codecs.DECODERS, "jpegls", broken)
    with pytest.raises(dicom.CorruptCodestreamError, match="<bytes>: jpegls frame 0: libfoo: bad Huffman"):
        dicom.read(_clean_file("jpegls"))


def test_read_many_turns_any_exception_into_that_files_error(monkeypatch, tmp_path):
    # A MemoryError (or any other exception) while one file goes through a library codec
    # must not abort the whole call: it is that file's error, the others are returned.
    good, bad = tmp_path / "good.dcm", tmp_path / "bad.dcm"
    good.write_bytes(_clean_file("jpegls"))
    bad.write_bytes(_clean_file("jpeg2000"))
    real_read = dicom.read

    def read(src, **kw):
        if str(src) == str(bad):
            raise MemoryError()
        return real_read(src, **kw)

    monkeypatch.setattr(dicom, "read", read)
    first, second = dicom.read_many([good, bad], on_error="skip", output="stored")
    assert (first.pixels == 100).all()
    assert isinstance(second, dicom.DicomError) and second.path == str(bad)
    assert "out of memory" in str(second)
    with pytest.raises(dicom.DicomError, match="bad.dcm"):
        dicom.read_many([good, bad], output="stored")


def test_missing_codec_library_names_the_codec_and_the_package(monkeypatch, tmp_path):
    path = tmp_path / "jls.dcm"
    path.write_bytes(_clean_file("jpegls"))
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import imagecodecs -> ImportError
    with pytest.raises(dicom.UnsupportedTransferSyntaxError) as err:
        dicom.read(path)
    assert isinstance(err.value, dicom.MissingCodecError)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "JPEG-LS" in message and "pip install imagecodecs" in message
    (res,) = dicom.read_many([path], on_error="skip")
    assert isinstance(res, dicom.MissingCodecError)


def test_codec_missing_from_the_library_is_reported_too(monkeypatch):
    monkeypatch.setattr(imagecodecs.JPEG2K, "available", False)
    with pytest.raises(dicom.MissingCodecError, match="JPEG 2000 frames need an imagecodecs built with OpenJPEG"):
        dicom.read(_clean_file("jpeg2000"))


def test_translate_is_the_one_mapping():
    from cxrfast.errors import translate

    native = _dicom.NativeError("truncated", "element runs past the end")
    cases = [
        (native, dicom.TruncatedError),
        (_dicom.NativeError("corrupt", "x"), dicom.CorruptCodestreamError),
        (_dicom.NativeError("io", "x"), dicom.DicomReadError),
        (codecs.CodecUnavailableError("JPEG-LS", "imagecodecs"), dicom.MissingCodecError),
        (codecs.NoBackendError("no decoder"), dicom.UnsupportedTransferSyntaxError),
        (codecs.CodestreamError("bad SOF"), dicom.CorruptCodestreamError),
        (FileNotFoundError(2, "No such file or directory"), dicom.DicomReadError),
        (MemoryError(), dicom.InvalidDicomError),
    ]
    for exc, cls in cases:
        err = translate("a.dcm", exc)
        assert type(err) is cls and str(err).startswith("a.dcm: "), (exc, err)
    assert type(translate("a.dcm", MemoryError(), "jpegls frame 2")) is dicom.CorruptCodestreamError
    assert type(translate("a.dcm", KeyError("x"), "jpegls frame 2")) is dicom.CorruptCodestreamError
