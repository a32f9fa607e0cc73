"""JPEG lossless (process 14) decoding: generated streams against the original samples,
libjpeg-turbo (imagecodecs) and DCMTK."""
from __future__ import annotations

import shutil
import subprocess

import imagecodecs
import numpy as np
import pytest

from cxrfast import _dicom, dicom
from dicom_factory import make_dicom, make_encapsulated
from jpeg_lossless_writer import encode

SHAPES = [(1, 1), (1, 17), (17, 1), (31, 29), (64, 97)]


def _content(kind: str, shape, bits: int, rng) -> np.ndarray:
    top = (1 << bits) - 1
    if kind == "noise":
        return rng.integers(0, top + 1, size=shape).astype(np.uint16)
    if kind == "ramp":
        r = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * max(1, top // 64)
        return (r % (top + 1)).astype(np.uint16)
    return np.full(shape, rng.integers(0, top + 1), np.uint16)


@pytest.mark.parametrize("predictor", range(1, 8))
@pytest.mark.parametrize("bits", [2, 8, 12, 15, 16])
@pytest.mark.parametrize("kind", ["noise", "ramp", "constant"])
def test_imagecodecs_streams_round_trip(predictor, bits, kind):
    rng = np.random.default_rng()
    for shape in SHAPES:
        a = _content(kind, shape, bits, rng)
        if bits <= 8:
            a = a.astype(np.uint8)
        stream = imagecodecs.jpeg8_encode(a, lossless=True, predictor=predictor, bitspersample=bits)
        ours = _dicom.jpeg_lossless_decode(stream)
        np.testing.assert_array_equal(ours, a)
        np.testing.assert_array_equal(ours, imagecodecs.jpeg8_decode(stream))


@pytest.mark.parametrize("predictor", range(1, 8))
@pytest.mark.parametrize("bits,pt", [(8, 0), (8, 3), (12, 0), (12, 2), (16, 0), (16, 1), (3, 1)])
@pytest.mark.parametrize("restart", [0, 29, 58, 13, 1])
def test_restart_intervals_and_point_transform(predictor, bits, pt, restart):
    """Our own writer makes what the installed encoders cannot: DRI, any Pt."""
    rng = np.random.default_rng()
    a = rng.integers(0, 1 << bits, size=(11, 29)).astype(np.uint16)
    stream = encode(a, predictor=predictor, precision=bits, pt=pt, restart=restart)
    expected = (a >> pt) << pt
    np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(stream), expected)
    if restart in (0, 29, 58):  # libjpeg-turbo decodes whole-row restart intervals
        np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stream).astype(np.uint16), expected)


def test_ssss16_difference():
    # 16-bit, first sample 0: the prediction 2^15 gives a difference of 32768 (SSSS=16).
    a = np.array([[0, 65535, 0, 32768], [65535, 0, 1, 0]], np.uint16)
    stream = encode(a, predictor=1, precision=16)
    np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(stream), a)
    np.testing.assert_array_equal(imagecodecs.jpeg8_decode(stream), a)


@pytest.mark.parametrize("ts", ["1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"])
@pytest.mark.parametrize("layout,fragments", [("bot", 1), ("empty", 1), ("empty", 3), ("eot", 1), ("bot", 2)])
def test_encapsulated_multiframe(ts, layout, fragments):
    rng = np.random.default_rng()
    frames = [rng.integers(0, 4096, size=(37, 41)).astype(np.uint16) for _ in range(3)]
    pred = 1 if ts.endswith(".70") else 5
    streams = [imagecodecs.jpeg8_encode(f, lossless=True, predictor=pred, bitspersample=12) for f in frames]
    data = make_encapsulated(streams, transfer_syntax=ts, rows=37, columns=41, bits_stored=12,
                             layout=layout, fragments_per_frame=fragments)
    np.testing.assert_array_equal(dicom.read(data, output="stored").pixels, np.stack(frames))
    np.testing.assert_array_equal(dicom.read(data, output="stored", frame=2).pixels, frames[2])
    enc = dicom.encapsulated_frames(data)
    assert enc.codec == "jpeg_lossless"
    for got, stream in zip(enc.frames, streams):  # fragments are padded to even length
        assert bytes(got[: len(stream)]) == stream and len(got) - len(stream) <= fragments


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="Debian dcmtk not installed")
@pytest.mark.parametrize("predictor", range(1, 8))
@pytest.mark.parametrize("pt", [0, 2])
def test_dcmtk_encoded_files(tmp_path, predictor, pt):
    rng = np.random.default_rng()
    a = rng.integers(0, 1 << 14, size=(45, 53)).astype(np.uint16)
    src = tmp_path / "in.dcm"
    dst = tmp_path / "out.dcm"
    src.write_bytes(make_dicom(a, bits_stored=14))
    subprocess.run(["dcmcjpeg", "+el", "+sv", str(predictor), "+pt", str(pt), str(src), str(dst)],
                   check=True, capture_output=True)
    got = dicom.read(dst, output="stored").pixels
    np.testing.assert_array_equal(got, (a >> pt) << pt)
    if shutil.which("dcmdjpeg"):
        back = tmp_path / "back.dcm"
        subprocess.run(["dcmdjpeg", str(dst), str(back)], check=True, capture_output=True)
        np.testing.assert_array_equal(got, dicom.read(back, output="stored").pixels)


def _stream():
    a = np.random.default_rng(7).integers(0, 1 << 12, size=(40, 50)).astype(np.uint16)
    return a, encode(a, predictor=4, precision=12, restart=50)


def test_truncated_stream_raises_at_every_length():
    _, stream = _stream()
    for n in range(1, len(stream) - 2, 7):
        data = make_encapsulated([stream[:n]], transfer_syntax="1.2.840.10008.1.2.4.57", rows=40,
                                 columns=50, bits_stored=12)
        with pytest.raises(dicom.DicomError):
            dicom.read(data, output="stored")


def test_bit_flips_decode_or_raise():
    a, stream = _stream()
    rng = np.random.default_rng()
    for _ in range(200):
        s = bytearray(stream)
        for _ in range(rng.integers(1, 4)):
            i = int(rng.integers(0, len(s)))
            s[i] ^= 1 << int(rng.integers(0, 8))
        try:
            out = _dicom.jpeg_lossless_decode(bytes(s))
        except _dicom.NativeError as exc:
            assert exc.args[0] in {"corrupt", "truncated", "unsupported", "needs_codec", "invalid"}
        else:
            assert out.dtype == np.uint16


def test_bogus_tables_raise():
    _, stream = _stream()
    i = stream.index(b"\xff\xc4")
    bad = bytearray(stream)
    bad[i + 5:i + 21] = bytes([255] * 16)  # over-subscribed code lengths
    with pytest.raises(_dicom.NativeError):
        _dicom.jpeg_lossless_decode(bytes(bad))
    j = stream.index(b"\xff\xda")
    bad = bytearray(stream)
    bad[j + 7] = 9  # predictor 9
    with pytest.raises(_dicom.NativeError):
        _dicom.jpeg_lossless_decode(bytes(bad))


def test_garbage_after_eoi_is_ignored():
    a, stream = _stream()
    np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(stream + b"\x00\x12garbage\xff"), a)


# --- pylibjpeg-libjpeg as a second, independent oracle on fresh random images -------------
# It decodes Pt = 0 and restart intervals of whole rows the way T.81 and libjpeg-turbo do;
# with Pt > 0 or an interval that ends mid-row it returns other values, so those cases are
# checked against the original samples only (test_restart_intervals_and_point_transform).

ORACLE_SHAPES = [(1, 1), (1, 53), (29, 1), (13, 37), (6, 211)]


def _walk(shape, bits: int, rng) -> np.ndarray:
    """A random walk with noise of random amplitude per row: every difference category
    from 0 to `bits` occurs, small ones most often, as in a radiograph."""
    top = 1 << bits
    steps = rng.integers(-1, 2, size=shape) * rng.integers(0, top, size=(shape[0], 1)) // 8
    noise = rng.integers(0, max(1, top >> rng.integers(0, bits + 1)), size=shape)
    return ((np.cumsum(steps, axis=1) + noise + top // 2) % top).astype(np.uint16)


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("predictor", range(1, 8))
def test_random_images_match_pylibjpeg_libjpeg(bits, predictor):
    libjpeg = pytest.importorskip("libjpeg")
    rng = np.random.default_rng()
    for shape in ORACLE_SHAPES:
        a = _walk(shape, bits, rng)
        for restart in {0, shape[1], 3 * shape[1]}:
            stream = encode(a, predictor=predictor, precision=bits, restart=restart)
            ours = _dicom.jpeg_lossless_decode(stream)
            np.testing.assert_array_equal(ours, a, err_msg=f"{shape} restart={restart}")
            np.testing.assert_array_equal(ours, libjpeg.decode(stream), err_msg=f"{shape} restart={restart}")


def _long_code_stream(rng, n: int = 3000) -> tuple[np.ndarray, bytes]:
    """A 1 x n 16-bit image whose difference categories fall off geometrically, so the
    Huffman table has codes longer than the 12-bit lookup (the decoder's slow path)."""
    cats = np.minimum(rng.geometric(0.45, size=n) - 1, 16)
    mag = np.where(cats == 0, 0, (1 << np.maximum(cats - 1, 0)) + rng.integers(0, 1 << 15, size=n) % np.maximum(1, 1 << np.maximum(cats - 1, 0)))
    d = np.where(rng.random(n) < 0.5, mag, -mag)
    d[cats == 16] = 32768
    a = ((np.cumsum(d) + (1 << 15)) % 65536).astype(np.uint16)[None, :]
    return a, encode(a, predictor=1, precision=16)


def test_codes_longer_than_the_lookup():
    libjpeg = pytest.importorskip("libjpeg")
    rng = np.random.default_rng()
    for _ in range(20):  # fresh draws until the table has a code over 12 bits (nearly always the first)
        a, stream = _long_code_stream(rng, 20000)
        i = stream.index(b"\xff\xc4")
        counts = stream[i + 5:i + 21]
        if max(l + 1 for l in range(16) if counts[l]) > 12:
            break
    assert max(l + 1 for l in range(16) if counts[l]) > 12  # the slow path is exercised
    np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(stream), a)
    np.testing.assert_array_equal(libjpeg.decode(stream), a)


# --- Two threads on one image (speculative split, or restart intervals) -------------------
# split_bit forces the two-thread path on small images and picks where the second decoder
# starts, as a bit of the stored scan bytes (the threads unstuff their own parts); with_split
# says which path ran (1 restart split, 2 met, 3 no meet: serial).

def _scan_bits(stream: bytes) -> int:
    """Bits of entropy-coded data (no restart markers): after the SOS segment, before EOI."""
    data = stream[stream.index(b"\xff\xda") + 10:-2]
    return (len(data) - data.count(b"\xff\x00")) * 8


def _meets_in_two_threads(rng, predictor: int, images: int, rows: tuple[int, int], columns: tuple[int, int],
                          splits: int, split_fraction: float = 1.0) -> int:
    """Random walks decoded with two threads at random split points (in the first
    ``split_fraction`` of the scan), each equal to the image; returns how many splits met."""
    met = 0
    for _ in range(images):
        bits = int(rng.integers(2, 17))
        shape = (int(rng.integers(*rows)), int(rng.integers(*columns)))
        a = _walk(shape, bits, rng)
        stream = encode(a, predictor=predictor, precision=bits)
        np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(stream), a)
        for split in rng.integers(0, max(1, int(_scan_bits(stream) * split_fraction)), size=splits):
            two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=int(split), with_split=True)
            assert how in (2, 3)
            met += how == 2
            np.testing.assert_array_equal(two, a, err_msg=f"{shape} bits={bits} split={split}")
    return met


@pytest.mark.parametrize("predictor", range(1, 8))
def test_two_threads_bit_identical_at_any_split(predictor):
    met = _meets_in_two_threads(np.random.default_rng(), predictor, 12, (1, 30), (1, 90), 8)
    assert met > 0  # the differences of the second thread were used, not only the fallback


def test_two_threads_predictor_1_rows_rebuilt_on_both_threads():
    """Predictor 1 past the meet with >= 64 rows left: the rows are rebuilt on two threads
    (column 0 summed first); bit-identical, odd widths and wrap-around included."""
    assert _meets_in_two_threads(np.random.default_rng(), 1, 6, (140, 300), (1, 70), 4, split_fraction=1 / 3) > 0


def _unit_steps(shape, rng) -> np.ndarray:
    """16-bit samples that differ from their predictor-1 prediction by exactly +-1 (never
    wrapping): every symbol is 2 bits (a 1-bit code and 1 extra bit)."""
    h, w = shape
    d = rng.choice([-1, 1], size=shape)
    a = np.zeros(shape, np.int64)
    a[0] = (1 << 15) + np.cumsum(d[0])
    a[1:, 0] = a[0, 0] + np.cumsum(d[1:, 0])
    a[1:, 1:] = a[1:, :1] + np.cumsum(d[1:, 1:], axis=1)
    return a.astype(np.uint16)


def test_two_threads_fall_back_when_the_split_never_meets():
    """With 2-bit symbols a decoder started at an odd bit never meets one started at bit 0:
    the decode must fall back to serial and give the same image."""
    rng = np.random.default_rng()
    for shape in [(1, 400), (7, 61)]:
        a = _unit_steps(shape, rng)
        stream = encode(a, predictor=1, precision=16)
        for split in (1, 3, 101, _scan_bits(stream) // 2 + 1):
            two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=split, with_split=True)
            assert how == 3
            np.testing.assert_array_equal(two, a)
        two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=_scan_bits(stream) // 2 // 2 * 2,
                                               with_split=True)
        assert how == 2
        np.testing.assert_array_equal(two, a)


def test_two_threads_on_a_large_imagecodecs_stream():
    """Above the size threshold threads=2 splits by itself (no split_bit)."""
    rng = np.random.default_rng()
    a = _walk((1100, 1000), 12, rng)
    stream = imagecodecs.jpeg8_encode(a, lossless=True, predictor=7, bitspersample=12)
    two, how = _dicom.jpeg_lossless_decode(stream, threads=2, with_split=True)
    assert how == 2
    np.testing.assert_array_equal(two, a)
    assert _dicom.jpeg_lossless_decode(stream, with_split=True)[1] == 0


def test_read_with_two_threads_gives_the_one_thread_image():
    """dicom.read(threads=2) on a frame above the split threshold, stored and rendered."""
    rng = np.random.default_rng()
    a = _walk((1100, 1000), 15, rng)
    stream = imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=15)
    data = make_encapsulated([stream], transfer_syntax="1.2.840.10008.1.2.4.70", rows=1100, columns=1000,
                             bits_stored=15)
    np.testing.assert_array_equal(dicom.read(data, output="stored", threads=2).pixels, a)
    one = dicom.read(data, size=256, dtype="uint8").pixels
    np.testing.assert_array_equal(dicom.read(data, size=256, dtype="uint8", threads=2).pixels, one)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            dicom.read(data, threads=bad)


@pytest.mark.parametrize("predictor", [1, 4, 7])
def test_two_threads_split_restart_intervals(predictor):
    rng = np.random.default_rng()
    a = _walk((17, 23), 12, rng)
    for restart in (23, 46, 5 * 23):
        stream = encode(a, predictor=predictor, precision=12, restart=restart)
        two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=0, with_split=True)
        assert how == 1
        np.testing.assert_array_equal(two, a)
    stream = encode(a, predictor=predictor, precision=12, restart=13)  # not whole rows: serial
    two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=0, with_split=True)
    assert how == 0
    np.testing.assert_array_equal(two, a)


@pytest.mark.parametrize("restart", [0, 50])
def test_two_threads_raise_what_one_thread_raises(restart):
    """Truncated and bit-flipped streams: the same error kind (or the same image)."""
    a = np.random.default_rng(7).integers(0, 1 << 12, size=(40, 50)).astype(np.uint16)
    stream = encode(a, predictor=4, precision=12, restart=restart)
    rng = np.random.default_rng()
    cases = [stream[:n] for n in range(40, len(stream), 37)]
    for _ in range(60):
        s = bytearray(stream)
        i = int(rng.integers(40, len(s)))
        s[i] ^= 1 << int(rng.integers(0, 8))
        cases.append(bytes(s))
    for s in cases:
        split = int(rng.integers(0, _scan_bits(stream)))
        try:
            one = _dicom.jpeg_lossless_decode(s)
        except _dicom.NativeError as exc:
            with pytest.raises(_dicom.NativeError) as two:
                _dicom.jpeg_lossless_decode(s, threads=2, split_bit=split)
            assert two.value.args == exc.args
        else:
            np.testing.assert_array_equal(_dicom.jpeg_lossless_decode(s, threads=2, split_bit=split), one)


def _scan_start(stream: bytes) -> int:
    return stream.index(b"\xff\xda") + 10  # one component: a 10-byte SOS segment


def test_two_threads_split_at_every_bit_around_stuffed_bytes():
    """The second thread's part starts next to 0xFF 0x00 pairs (and inside them): every bit of
    the bytes around the first few stuffed pairs splits to the same image."""
    rng = np.random.default_rng()
    a = rng.integers(0, 1 << 16, size=(40, 60)).astype(np.uint16)  # noise: many 0xFF bytes
    stream = encode(a, predictor=1, precision=16)
    scan = stream[_scan_start(stream):]
    pairs = [i for i in range(len(scan) - 1) if scan[i] == 0xFF and scan[i + 1] == 0][:6]
    assert pairs
    met = 0
    for i in pairs:
        for bit in range(8 * (i - 1), 8 * (i + 3)):
            two, how = _dicom.jpeg_lossless_decode(stream, threads=2, split_bit=bit, with_split=True)
            assert how in (2, 3)
            met += how == 2
            np.testing.assert_array_equal(two, a, err_msg=f"split bit {bit}, pair at byte {i}")
    assert met > 0


@pytest.mark.parametrize("marker", [b"\xff\xd0", b"\xff\xd9", b"\xff\xff\xd9"])
def test_two_threads_marker_in_the_first_part(marker):
    """A marker inside the first thread's part ends the scan there: the two-thread decode
    raises (or decodes) exactly as the one-thread decode does, whatever the split."""
    rng = np.random.default_rng()
    a = _walk((60, 50), 12, rng)
    stream = encode(a, predictor=1, precision=12)
    s0 = _scan_start(stream)
    at = s0 + (len(stream) - s0) // 4
    while stream[at - 1] == 0xFF:
        at += 1
    broken = stream[:at] + marker + stream[at:]
    with pytest.raises(_dicom.NativeError) as one:
        _dicom.jpeg_lossless_decode(broken)
    bits = (len(broken) - s0) * 8
    for split in list(rng.integers(8 * (at - s0) + 16, bits - 16, size=20)) + [8 * (at - s0) + 8 * len(marker)]:
        with pytest.raises(_dicom.NativeError) as two:
            _dicom.jpeg_lossless_decode(broken, threads=2, split_bit=int(split))
        assert two.value.args == one.value.args


def test_two_threads_agree_with_one_on_fuzzed_streams(tmp_path):
    """A bounded run of tests/jpeg_split_fuzz.py: damaged streams, random splits."""
    import os

    from jpeg_split_fuzz import run

    seed = int.from_bytes(os.urandom(4), "little")
    assert run(None, seed, str(tmp_path), count=1500) == 0, f"fuzz seed {seed}"
