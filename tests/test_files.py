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


def _png(arr: np.ndarray, sbit: int | None = None) -> bytes:
    """A greyscale PNG written by hand, with an sBIT chunk when asked (Pillow writes none)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    depth = 8 * arr.itemsize
    ihdr = struct.pack(">IIBBBBB", arr.shape[1], arr.shape[0], depth, 0, 0, 0, 0)
    rows = arr.astype(">u2" if depth == 16 else np.uint8)
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(arr.shape[0]))
    body = chunk(b"IHDR", ihdr) + (chunk(b"sBIT", bytes([sbit])) if sbit is not None else b"")
    return files._PNG_SIGNATURE + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


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
