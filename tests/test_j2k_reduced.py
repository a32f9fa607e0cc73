"""JPEG 2000 at a reduced resolution level: the rule, the codestream reader, and the
display it gives against full decode + resize, on generated chest images.

Tolerance, in 8-bit display levels against the full decode + the same antialiased resize:
max <= 12, mean <= 0.6. Measured (codecs.recentre on): 2048x2500 12-bit to 256 max 8-9,
mean 0.11-0.13 (lossless, lossy); the cases below max 3-11, mean 0.10-0.53 (1024 to 64 the
highest mean). The max sits on the synthetic images' step edges (lung masks), where the
wavelet low-pass and the resize filter differ most; 99.9% of pixels are within 7.
Without recentre the same cases reach max 36, mean 3.2.
"""
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

imagecodecs = pytest.importorskip("imagecodecs")
pydicom = pytest.importorskip("pydicom")

from cxrfast import codecs, dicom  # noqa: E402
from cxrfast.synthetic import chest_image  # noqa: E402
from dicom_factory import make_encapsulated  # noqa: E402

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K_LOSSY = "1.2.840.10008.1.2.4.91"
MAX_DIFF, MEAN_DIFF = 12, 0.6

needs_reduced = pytest.mark.skipif(
    codecs.reduced_decoder() is None, reason=f"reduced JPEG 2000 decoding unavailable: {codecs.reduced_unavailable()}"
)


def _image(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    img = chest_image(np.random.default_rng(seed), max(rows, cols))[:rows, :cols]
    if bits == 16:
        img = img.astype(np.uint32) * 16 + np.random.default_rng(seed).integers(0, 16, img.shape)
    return np.ascontiguousarray(img.astype(np.uint16))


def _encode(img: np.ndarray, bits: int, lossy: bool = False, **kw) -> bytes:
    return imagecodecs.jpeg2k_encode(img, level=50 if lossy else 0, codecformat="J2K", bitspersample=bits, **kw)


def _dicom(frames: list[bytes], rows: int, cols: int, bits: int, lossy: bool = False,
           window: tuple[int, int] | None = None) -> bytes:
    data = make_encapsulated(frames, transfer_syntax=J2K_LOSSY if lossy else J2K_LOSSLESS,
                             rows=rows, columns=cols, bits_stored=bits)
    if window is None:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.WindowCenter, ds.WindowWidth = window
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _full(data: bytes, monkeypatch, **kw) -> np.ndarray:
    """The display through the full-resolution decode (reduced path switched off)."""
    with monkeypatch.context() as m:
        m.setattr(dicom, "jpeg2000_reduce", lambda frame, target: 0)
        return dicom.read(data, **kw).pixels


def _spy(monkeypatch) -> list[int]:
    levels: list[int] = []
    real = codecs._jpeg2000_reduced

    def spy(frame, level):
        levels.append(level)
        return real(frame, level)

    monkeypatch.setattr(codecs, "_jpeg2000_reduced", spy)
    return levels


# --- codestream reader and rule (no decoder needed) -----------------------------------------


@pytest.mark.parametrize("resolutions", [1, 2, 4, 6])
def test_levels_read_from_cod(resolutions):
    cs = _encode(np.zeros((1030, 843), np.uint16), 12, resolutions=resolutions)
    assert codecs.jpeg2000_levels(cs) == resolutions - 1


def test_levels_inside_jp2_wrapper():
    cs = imagecodecs.jpeg2k_encode(np.zeros((64, 64), np.uint16), level=0, codecformat="JP2", resolutions=3)
    assert codecs.jpeg2000_levels(cs) == 2


def test_levels_of_a_truncated_main_header_raise():
    cs = _encode(np.zeros((64, 64), np.uint16), 12)
    siz_end = 4 + int.from_bytes(cs[4:6], "big")  # SOC, SIZ marker, then Lsiz bytes
    with pytest.raises(codecs.CodestreamError, match="no COD"):
        codecs.jpeg2000_levels(cs[:siz_end])
    with pytest.raises(codecs.CodestreamError, match="runs past"):
        codecs.jpeg2000_levels(cs[:siz_end + 8])


@pytest.mark.parametrize("level, shape", [(0, (2501, 2047)), (1, (1251, 1024)), (2, (626, 512)), (3, (313, 256))])
def test_reduced_shape_rounds_up(level, shape):
    cs = _encode(np.zeros((2501, 2047), np.uint16), 12, resolutions=2)
    assert codecs.reduced_shape(cs, level) == shape


@needs_reduced
@pytest.mark.parametrize("target, resolutions, level", [
    ((256, 210), 6, 2),    # 625x512 >= 2 x target; 313x256 is not
    ((128, 105), 6, 3),
    ((1250, 1024), 6, 0),  # the target is half the image: full decode
    ((16, 13), 6, 5),      # clamped to the codestream's 5 decomposition levels
    ((16, 13), 3, 2),      # fewer levels than the target would allow
])
def test_rule(target, resolutions, level):
    cs = _encode(np.zeros((2500, 2048), np.uint16), 12, resolutions=resolutions)
    assert codecs.jpeg2000_reduce(cs, target) == level


def test_recentre_moves_a_step_edge_by_the_block_offset():
    x = np.zeros((4, 4), np.uint16)
    x[:, 2:] = 1000
    out = codecs.recentre(x, 2, (16, 16))  # 3/8 of a reduced pixel towards the next sample
    assert out.dtype == np.uint16
    assert out[0].tolist() == [0, 375, 1000, 1000]
    assert out[:, 0].tolist() == [0, 0, 0, 0]


def test_recentre_stretches_odd_sizes_over_the_full_extent():
    x = np.arange(3, dtype=np.uint16).reshape(1, 3) * 100  # 9 full columns at level 2: ceil(9/4) = 3
    out = codecs.recentre(x, 2, (1, 9))  # centres at (j + 1/2) * 3 - 1/2 = 1, 4, 7 full pixels
    assert out[0].tolist() == [25, 100, 175]


# --- reduced vs full display ----------------------------------------------------------------


def _assert_close(reduced: np.ndarray, full: np.ndarray) -> None:
    assert reduced.shape == full.shape and reduced.dtype == full.dtype
    d = np.abs(reduced.astype(np.int32) - full.astype(np.int32))
    assert d.max() <= MAX_DIFF, f"max {d.max()} mean {d.mean():.3f}"
    assert d.mean() <= MEAN_DIFF, f"max {d.max()} mean {d.mean():.3f}"


@needs_reduced
@pytest.mark.parametrize("rows, cols, bits, lossy, size", [
    (1030, 843, 12, False, 128),
    (1030, 843, 12, True, 128),
    (997, 1201, 16, False, 100),
    (997, 1201, 16, True, (90, 110)),
    (1024, 1024, 12, False, 64),
])
def test_reduced_display_matches_full(rows, cols, bits, lossy, size, monkeypatch):
    img = _image(rows, cols, bits)
    top = (1 << bits) - 1
    data = _dicom([_encode(img, bits, lossy)], rows, cols, bits, lossy, window=(top // 2, top * 3 // 4))
    full = _full(data, monkeypatch, size=size)
    levels = _spy(monkeypatch)
    reduced = dicom.read(data, size=size).pixels
    assert levels and levels[0] >= 2
    _assert_close(reduced, full)


@needs_reduced
def test_codestream_with_few_levels_is_clamped(monkeypatch):
    img = _image(1030, 843, 12)
    data = _dicom([_encode(img, 12, resolutions=2)], 1030, 843, 12, window=(2000, 3000))
    full = _full(data, monkeypatch, size=64)
    levels = _spy(monkeypatch)
    _assert_close(dicom.read(data, size=64).pixels, full)
    assert levels == [1]


@needs_reduced
def test_multi_frame_one_level_for_all(monkeypatch):
    imgs = [_image(901, 700, 12, seed=s) for s in range(3)]
    frames = [_encode(imgs[0], 12), _encode(imgs[1], 12, resolutions=3), _encode(imgs[2], 12, lossy=True)]
    data = _dicom(frames, 901, 700, 12, window=(2000, 3000))
    full = _full(data, monkeypatch, size=100)
    levels = _spy(monkeypatch)
    reduced = dicom.read(data, size=100).pixels
    assert reduced.shape == (3, 100, 78)
    assert levels == [2, 2, 2]  # frame 1 has 2 decomposition levels: every frame uses 2
    _assert_close(reduced, full)
    one = dicom.read(data, size=100, frame=2).pixels
    _assert_close(one, full[2])


@needs_reduced
def test_read_many_takes_the_reduced_path(tmp_path, monkeypatch):
    data = _dicom([_encode(_image(800, 640, 12), 12)], 800, 640, 12, window=(2000, 3000))
    path = tmp_path / "a.dcm"
    path.write_bytes(data)
    full = _full(data, monkeypatch, size=96)
    levels = _spy(monkeypatch)
    (res,) = dicom.read_many([path], size=96, num_threads=1)
    assert levels == [2]
    _assert_close(res.pixels, full)


# --- where the full decode must run ---------------------------------------------------------


@pytest.mark.parametrize("kw", [{"output": "stored"}, {"output": "modality", "size": 64}, {"output": "display"}])
def test_other_outputs_decode_in_full(kw, monkeypatch):
    img = _image(300, 257, 12)
    data = _dicom([_encode(img, 12)], 300, 257, 12, window=(2000, 3000))
    levels = _spy(monkeypatch)
    out = dicom.read(data, **kw).pixels
    assert levels == []
    if kw["output"] == "stored":
        assert np.array_equal(out, img)
    else:
        assert out.shape == ((64, 55) if "size" in kw else (300, 257))


def test_min_max_window_decodes_in_full(monkeypatch):
    """No VOI window: the display stretches the image's own min/max, which a reduced image narrows."""
    data = _dicom([_encode(_image(600, 500, 12), 12)], 600, 500, 12)
    levels = _spy(monkeypatch)
    dicom.read(data, size=64)
    assert levels == []


def test_declared_size_still_checked_with_a_target():
    cs = _encode(_image(600, 500, 12), 12)
    data = _dicom([cs], 600, 498, 12, window=(2000, 3000))  # header says 2 columns fewer
    with pytest.raises(dicom.CorruptCodestreamError, match="declares 500x600"):
        dicom.read(data, size=64)


def test_unavailable_decoder_falls_back_to_full(monkeypatch):
    data = _dicom([_encode(_image(600, 500, 12), 12)], 600, 500, 12, window=(2000, 3000))
    full = _full(data, monkeypatch, size=64)
    monkeypatch.setattr(codecs, "_reduced_state", [None, "glymur found no libopenjp2"])
    assert codecs.jpeg2000_reduce(_encode(np.zeros((600, 500), np.uint16), 12), (32, 27)) == 0
    assert np.array_equal(dicom.read(data, size=64).pixels, full)


def test_bundled_openjp2_used_when_glymur_finds_none(tmp_path):
    """glymur reads ./glymurrc first: 'None' there hides the system library, as on a machine
    without libopenjp2-7; cxrfast then loads imagecodecs' copy, in this process only."""
    pytest.importorskip("glymur")
    if codecs._bundled_openjp2() is None:
        pytest.skip("this imagecodecs wheel bundles no libopenjp2")
    (tmp_path / "glymurrc").write_text("[library]\nopenjp2: None\n")
    code = (
        "import warnings; warnings.simplefilter('ignore')\n"
        "import glymur.lib.openjp2 as o; assert o.OPENJP2 is None\n"
        "from cxrfast import codecs as c; import numpy as np, imagecodecs\n"
        "assert c.reduced_decoder() is not None, c.reduced_unavailable()\n"
        "cs = imagecodecs.jpeg2k_encode(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48), level=0, codecformat='J2K')\n"
        "print(c.decode_frame('jpeg2000', cs, header_shape=(64, 48, 1), level=2).shape)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(16, 12)"
