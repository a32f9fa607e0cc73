"""PNG/JPEG decoding (cxrfast.data.files): scaled JPEG decode within its documented tolerance
of full decode + the same resize, PNG exactly equal to it, and the 16-bit white level rule."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cxrfast.data import files
from cxrfast.synthetic import chest_image


@pytest.fixture(scope="module")
def radiograph() -> np.ndarray:
    """A 12-bit radiograph-like image, 1200x1000 (portrait, like MIMIC), with sharp lung edges."""
    rng = np.random.default_rng(3)
    img = chest_image(rng, 1200)[:, 100:1100]
    return np.clip(img + rng.normal(0, 30, img.shape), 0, 4095).astype(np.uint16)


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _full(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im)


def _levels(img: np.ndarray) -> np.ndarray:
    return np.rint(img * 255.0)


@pytest.mark.parametrize("quality", [90, 95])
@pytest.mark.parametrize("size", [64, 150, 300])
def test_scaled_jpeg_within_tolerance_of_full_decode(radiograph, quality, size):
    data = _encode((radiograph >> 4).astype(np.uint8), "JPEG", quality=quality)
    decoded = files.decode(data, size)
    assert decoded.original == (1200, 1000)
    assert decoded.pixels.shape[0] == 1200 // files.jpeg_scale(1200, 1000, size)
    full = _full(data)
    ref = files.resize(full, files.target_shape(1200, 1000, size), 255.0)
    fast = files.decoded_image(decoded, size)
    assert fast.shape == ref.shape == files.target_shape(1200, 1000, size)
    diff = np.abs(_levels(fast) - _levels(ref))
    assert diff.max() <= files.JPEG_TOLERANCE
    assert diff.mean() <= files.JPEG_MEAN_TOLERANCE


def test_jpeg_scale_keeps_the_margin():
    assert files.jpeg_scale(3000, 2500, 256) == 4  # 750 >= 2 * 256; 1/8 (375) would not be
    assert files.jpeg_scale(3000, 2500, 128) == 8
    assert files.jpeg_scale(1024, 1024, 256) == 2
    assert files.jpeg_scale(1024, 1024, 600) == 1
    assert files.jpeg_scale(1024, 1024, None) == 1


def test_jpeg_without_size_is_the_full_decode(radiograph):
    data = _encode((radiograph >> 4).astype(np.uint8), "JPEG", quality=92)
    np.testing.assert_array_equal(files.decode(data).pixels, _full(data))


@pytest.mark.parametrize("bits", [8, 16])
def test_png_equals_full_decode_and_the_same_resize_exactly(radiograph, bits):
    arr = (radiograph >> 4).astype(np.uint8) if bits == 8 else radiograph
    data = _encode(arr, "PNG")
    decoded = files.decode(data, 256)
    assert decoded.pixels.dtype == arr.dtype
    np.testing.assert_array_equal(decoded.pixels, arr)
    white = 255 if bits == 8 else 4095
    assert decoded.white == white
    ref = files.resize(_full(data).astype(arr.dtype), (256, 213), float(white))
    np.testing.assert_array_equal(files.decoded_image(decoded, 256), ref)


def test_png_decoders_agree_with_pillow(radiograph):
    pytest.importorskip("imagecodecs")
    for arr, depth in (((radiograph >> 4).astype(np.uint8), 8), (radiograph, 16)):
        data = _encode(arr, "PNG")
        np.testing.assert_array_equal(files._png_fast(data, depth), _full(data))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _filter_row(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """One row filtered by PNG filter type ``kind`` (PNG spec 9.2), written from the spec."""
    out = bytearray()
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 0:
            pred = 0
        elif kind == 1:
            pred = a
        elif kind == 2:
            pred = b
        elif kind == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
        out.append((x - pred) & 0xFF)
    return bytes([kind]) + bytes(out)


def _png(arr: np.ndarray, sbit: int | None = None, filters=(0,), extra: bytes = b"", trns: bool = False,
         idat_parts: int = 1) -> bytes:
    """A greyscale PNG written by hand: row y filtered with ``filters[y % len(filters)]``, an
    sBIT chunk when asked (Pillow writes none), ``extra`` inflated bytes after the image, a tRNS
    chunk, the compressed stream cut into ``idat_parts`` IDAT chunks."""
    depth = 8 * arr.itemsize
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], depth, 0, 0, 0, 0)
    rows = arr.astype(">u2" if depth == 16 else np.uint8)
    prev = bytes(rows.shape[1] * arr.itemsize)
    raw = b""
    for y in range(arr.shape[0]):
        raw += _filter_row(filters[y % len(filters)], rows[y].tobytes(), prev, arr.itemsize)
        prev = rows[y].tobytes()
    body = _chunk(b"IHDR", ihdr) + (_chunk(b"sBIT", bytes([sbit])) if sbit is not None else b"")
    body += _chunk(b"tRNS", struct.pack(">H", 0)) if trns else b""
    stream = zlib.compress(raw + extra)
    cut = [len(stream) * k // idat_parts for k in range(idat_parts + 1)]
    idat = b"".join(_chunk(b"IDAT", stream[cut[k]:cut[k + 1]]) for k in range(idat_parts))
    return files._PNG_SIGNATURE + body + idat + _chunk(b"IEND", b"")


@pytest.mark.parametrize("top,sbit,white", [
    (4095, None, 4095),    # PadChest: 12-bit values in a 16-bit PNG
    (3000, None, 4095),    # bit length 12
    (1500, None, 4095),    # bit length 11: 12
    (200, None, 4095),     # 12 at least
    (13600, None, 65535),  # a dark full-range image stays dark (not 14 bits)
    (40000, None, 65535),  # the full range
    (1000, 12, 4095),      # sBIT wins over the values
    (1000, 16, 65535),
])
def test_16bit_png_white_level(top, sbit, white):
    arr = np.linspace(0, top, 48, dtype=np.float64).round().astype(np.uint16).reshape(6, 8)
    decoded = files.decode(_png(arr, sbit))
    np.testing.assert_array_equal(decoded.pixels, arr)
    assert decoded.white == white
    img = files.decoded_image(decoded, None)
    assert img.dtype == np.float32 and img.max() == pytest.approx(top / white)


def test_load_image_reads_png_and_jpeg_files(tmp_path, radiograph):
    (tmp_path / "a.png").write_bytes(_encode(radiograph, "PNG"))
    (tmp_path / "b.jpg").write_bytes(_encode((radiograph >> 4).astype(np.uint8), "JPEG", quality=95))
    a = files.load_image(tmp_path / "a.png", 64)
    b = files.load_image(tmp_path / "b.jpg", 64)
    assert a.shape == b.shape == (64, 53)
    assert np.abs(a - b).max() < 0.03  # the same picture at 12 and 8 bits
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_refuses_an_implausible_header():
    arr = np.zeros((2, 2), np.uint8)
    data = bytearray(_png(arr))
    data[16:24] = struct.pack(">II", 1 << 20, 1 << 20)  # IHDR width, height
    with pytest.raises(ValueError, match="announces"):
        files.decode(bytes(data))


def test_resize_validates_its_inputs():
    from cxrfast import _dicom

    img = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match="shapes"):
        _dicom.resize([img], np.array([[2, 2, 2]]), 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="1 to 65536"):
        _dicom.resize([img], np.array([[0, 2]]), 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="uint8, uint16 or float32"):
        _dicom.resize([img.astype(np.int16)], np.array([[2, 2]]), 1.0, 0.0, 1)


def test_resize_matches_the_torch_antialiased_reference():
    """The non-square resize is the crop-resize kernel's filter: torch's antialias=True bilinear."""
    import torch

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (97, 61), dtype=np.uint8)
    for shape in ((31, 20), (13, 44), (97, 61), (150, 7)):
        ref = torch.nn.functional.interpolate(torch.from_numpy(img).float()[None, None], size=shape, mode="bilinear",
                                              antialias=True, align_corners=False)[0, 0].numpy() / 255.0
        np.testing.assert_allclose(files.resize(img, shape, 255.0), np.clip(ref, 0, 1), atol=2e-5)


# --- the split PNG path: IDAT inflated, row filters undone natively (_dicom.png_unfilter) ----

def _samples(shape: tuple[int, int], bits: int, seed: int) -> np.ndarray:
    """Smooth content plus noise (so Sub/Up/Average/Paeth predict something) over the full range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:shape[0], :shape[1]]
    top = (1 << bits) - 1
    smooth = (np.sin(x / 5.0) + np.cos(y / 7.0) + 2) / 4 * top
    return np.clip(smooth + rng.normal(0, top / 40, shape), 0, top).astype(np.uint8 if bits == 8 else np.uint16)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (19, 1), (23, 37), (64, 63)])
@pytest.mark.parametrize("filters", [(0,), (1,), (2,), (3,), (4,), (4, 3, 2, 1, 0)])
def test_split_png_equals_pillow_for_every_filter(bits, shape, filters, monkeypatch):
    arr = _samples(shape, bits, seed=sum(shape) + bits)
    data = _png(arr, filters=filters)
    assert files.png_layout(data).plain_grey
    monkeypatch.setattr(files, "_png_whole", None)  # the split path decodes it, no full decoder
    decoded = files.decode(data)
    assert decoded.pixels.dtype == arr.dtype and decoded.pixels.flags.c_contiguous
    np.testing.assert_array_equal(decoded.pixels, _full(data).astype(arr.dtype))
    np.testing.assert_array_equal(decoded.pixels, arr)


@pytest.mark.parametrize("bits", [8, 16])
def test_split_png_equals_pillow_on_library_encoders(radiograph, bits):
    """Pillow's adaptive filters (optimize, every compress_level) and imagecodecs' encoders."""
    arr = (radiograph[:301, :203] >> 4).astype(np.uint8) if bits == 8 else radiograph[:301, :203]
    encoded = [_encode(arr, "PNG", optimize=True)] + [_encode(arr, "PNG", compress_level=k) for k in (0, 1, 9)]
    imagecodecs = pytest.importorskip("imagecodecs")
    encoded += [imagecodecs.png_encode(arr, level=k) for k in (1, 6)]
    for data in encoded:
        np.testing.assert_array_equal(files.decode(data).pixels, arr)
        np.testing.assert_array_equal(files.decode(data).pixels, _full(data).astype(arr.dtype))


def test_split_png_several_idat_chunks_and_sbit():
    arr = _samples((40, 33), 16, seed=5) >> 6  # 10-bit values
    data = _png(arr, sbit=10, filters=(1, 4), idat_parts=5)
    decoded = files.decode(data)
    np.testing.assert_array_equal(decoded.pixels, _full(data))
    assert decoded.white == 1023


def test_split_png_ignores_extra_image_data_as_pillow_does():
    arr = _samples((9, 11), 8, seed=2)
    for extra in (b"\x00" * 5, b"\x07" * 100_000):  # within and beyond the inflate slack
        data = _png(arr, filters=(2,), extra=extra)
        np.testing.assert_array_equal(files.decode(data).pixels, arr)


def _adam7(arr: np.ndarray) -> bytes:
    """An interlaced 8-bit greyscale PNG (PNG spec 8.2), filter type 0 in every pass."""
    raw = b""
    for sx, sy, dx, dy in ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
                           (0, 1, 1, 2)):
        sub = arr[sy::dy, sx::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 8, 0, 0, 0, 1)
    return files._PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def test_interlaced_and_trns_pngs_go_to_the_full_decoder():
    arr = _samples((13, 10), 8, seed=4)
    for data in (_adam7(arr), _png(arr, trns=True)):
        assert not files.png_layout(data).plain_grey
        with Image.open(io.BytesIO(data)) as im:
            expect = np.asarray(im.convert("L"))
        np.testing.assert_array_equal(files.decode(data).pixels, expect)
    np.testing.assert_array_equal(files.decode(_adam7(arr)).pixels, arr)


@pytest.mark.parametrize("codecs", [("DEFLATE",), ("ZLIBNG",), ()])
def test_split_png_with_each_inflater(codecs, monkeypatch):
    """libdeflate, zlib-ng and the standard library's zlib (no imagecodecs) give the same samples."""
    monkeypatch.setattr(files, "_INFLATE", files._inflater(codecs))
    monkeypatch.setattr(files, "_png_whole", None)
    arr = _samples((33, 45), 16, seed=9)
    np.testing.assert_array_equal(files.decode(_png(arr, filters=(1, 2, 3, 4), idat_parts=2)).pixels, arr)
    arr8 = _samples((20, 20), 8, seed=9)
    np.testing.assert_array_equal(files.decode(_png(arr8, filters=(4,), extra=b"\0" * 3000)).pixels, arr8)


def test_split_png_without_the_native_unfilter_is_the_same(monkeypatch):
    """A native module built before png_unfilter: the full decoders, same samples."""
    arr = _samples((21, 30), 16, seed=6)
    data = _png(arr, filters=(3, 4))
    monkeypatch.setattr(files, "_SPLIT", False)
    np.testing.assert_array_equal(files.decode(data).pixels, arr)


def _bad_filter(arr: np.ndarray, row: int, kind: int) -> bytes:
    """A PNG whose row ``row`` has filter type byte ``kind``."""
    raw = bytearray(b"".join(b"\0" + r.tobytes() for r in arr))
    raw[row * (arr.shape[1] + 1)] = kind
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], 8, 0, 0, 0, 0)
    return files._PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(raw))) + _chunk(b"IEND", b"")


def test_malformed_png_data_is_a_clear_error_naming_the_file(tmp_path):
    arr = _samples((50, 40), 8, seed=7)
    good = _png(arr, filters=(4,), idat_parts=3)
    idat_end = good.rindex(b"IEND") - 4
    stream_start = good.index(b"IDAT") + 4
    flipped = bytearray(good)
    flipped[stream_start + 30] ^= 0xFF
    cases = {
        "cut.png": (good[:len(good) // 2], "truncated"),  # mid-chunk
        "no_tail.png": (good[:good.rindex(b"IDAT") - 4], "truncated"),  # whole last IDAT chunk missing
        "filter.png": (_bad_filter(arr, 17, 7), "row 17 has filter type 7"),
        "flipped.png": (bytes(flipped), "corrupt"),
        "short.png": (_png(arr[:30]).replace(struct.pack(">II", 40, 30), struct.pack(">II", 40, 50)), "truncated"),
    }
    assert idat_end > stream_start
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError, match=message) as info:
            files.load_image(path, 16)
        assert str(path) in str(info.value)


def test_resize_takes_any_byte_order_and_layout():
    """files.resize converts; the native kernel refuses a non-native byte order it would misread."""
    from cxrfast import _dicom

    img = _samples((30, 22), 16, seed=8)
    expect = files.resize(img, (10, 7), 65535.0)
    np.testing.assert_array_equal(files.resize(img.astype(">u2"), (10, 7), 65535.0), expect)
    np.testing.assert_array_equal(files.resize(np.asfortranarray(img), (10, 7), 65535.0), expect)
    np.testing.assert_array_equal(files.resize(img.T.copy().T, (10, 7), 65535.0), expect)
    with pytest.raises(ValueError, match="native byte order"):
        _dicom.resize([img.astype(">u2")], np.array([[10, 7]]), 1.0, 0.0, 1)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        _dicom.resize([img.T], np.array([[10, 7]]), 1.0, 0.0, 1)


def test_png_unfilter_survives_random_data():
    """Random sizes, filter bytes and data lengths: samples or a NativeError, never a crash."""
    from cxrfast import _dicom

    rng = np.random.default_rng(11)
    errors = 0
    for _ in range(400):
        rows, columns, depth = int(rng.integers(1, 9)), int(rng.integers(1, 9)), int(rng.choice([8, 16]))
        need = rows * (columns * depth // 8 + 1)
        raw = rng.integers(0, 6, int(rng.integers(0, need + 3)), dtype=np.uint8).tobytes()
        try:
            out = _dicom.png_unfilter(raw, rows, columns, depth)
        except _dicom.NativeError as exc:
            errors += 1
            assert exc.args[0] in ("truncated", "corrupt")
        else:
            assert out.shape == (rows, columns) and out.dtype == (np.uint8 if depth == 8 else np.uint16)
    assert 0 < errors < 400
    with pytest.raises(ValueError, match="depth"):
        _dicom.png_unfilter(b"\0\0", 1, 1, 4)
