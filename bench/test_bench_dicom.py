"""DICOM decoding: cxrfast against pydicom + pylibjpeg, dicomsdl, python-gdcm and
libjpeg-turbo (imagecodecs) on the same files, one thread each, in one run.

Run: pytest bench/test_bench_dicom.py --benchmark-only
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from cxrfast import _dicom, dicom

pytest.importorskip("pytest_benchmark")


def _pydicom(path: str) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="pylibjpeg" if ds.file_meta.TransferSyntaxUID.is_compressed else "")
    return ds.pixel_array


def _dicomsdl(path: str) -> np.ndarray:
    import dicomsdl

    return dicomsdl.open(path).pixelData(storedvalue=True)


def _gdcm(path: str) -> np.ndarray:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise RuntimeError("gdcm failed")
    image = reader.GetImage()
    raw = image.GetBuffer().encode("utf-8", "surrogateescape")  # python-gdcm returns str
    return np.frombuffer(raw, np.uint16).reshape(image.GetDimension(1), image.GetDimension(0))


READERS = {"pydicom+pylibjpeg": _pydicom, "dicomsdl": _dicomsdl, "python-gdcm": _gdcm}


def _stored(reader: str, path):
    """A no-argument call that reads path to stored values with the named reader."""
    if reader == "cxrfast":
        return lambda: dicom.read(path, output="stored").pixels
    return lambda: READERS[reader](path)


def _mp(rg1) -> str:
    return f"{rg1['array'].size / 1e6:.2f}MP"


@pytest.mark.parametrize("reader", ["cxrfast", *READERS])
def test_jpeg_lossless_sv1_rg1(benchmark, rg1, reader):
    benchmark.group = "JPEG lossless SV1, RG1 1955x1841, file -> stored values"
    out = benchmark(_stored(reader, rg1["paths"]["sv1"]))
    np.testing.assert_array_equal(out, rg1["array"])


@pytest.mark.parametrize("decoder", ["cxrfast", "libjpeg-turbo (imagecodecs)"])
def test_jpeg_lossless_codestream_rg1(benchmark, rg1, decoder):
    import imagecodecs

    benchmark.group = "JPEG lossless SV1, RG1 raw codestream -> uint16"
    stream = rg1["sv1_stream"]
    fn = _dicom.jpeg_lossless_decode if decoder == "cxrfast" else imagecodecs.jpeg8_decode
    out = benchmark(fn, stream)
    np.testing.assert_array_equal(out, rg1["array"])
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["MP/s"] = round(rg1["array"].size / benchmark.stats.stats.median / 1e6)


@pytest.fixture(scope="session")
def sv1_4k():
    """A generated 4096x4096 15-bit SV1 codestream (smooth field + noise, like a DX image)."""
    import imagecodecs

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:4096, 0:4096]
    a = (8000 + 6000 * np.sin(x / 700.0) * np.cos(y / 900.0) + rng.normal(0, 40, (4096, 4096)))
    a = np.clip(a, 0, 32767).astype(np.uint16)
    return {"array": a, "stream": imagecodecs.jpeg8_encode(a, lossless=True, predictor=1, bitspersample=15)}


@pytest.mark.parametrize("image", ["RG1", "4k"])
@pytest.mark.parametrize("threads", [1, 2])
def test_jpeg_lossless_one_image_threads(benchmark, rg1, sv1_4k, image, threads):
    """One image, no restart markers: the speculative two-thread split against one thread."""
    data = {"array": rg1["array"], "stream": rg1["sv1_stream"]} if image == "RG1" else sv1_4k
    benchmark.group = f"JPEG lossless SV1 codestream, one image ({image}), no restart markers"
    benchmark.name = f"cxrfast threads=1 [{image}]" if threads == 1 else f"threads=2 [{image}]"
    out, split = benchmark(_dicom.jpeg_lossless_decode, data["stream"], threads=threads, with_split=True)
    np.testing.assert_array_equal(out, data["array"])
    assert split == (2 if threads == 2 else 0)  # 2: the second thread's differences were used
    benchmark.extra_info["cpus"] = os.cpu_count()
    if benchmark.stats:
        benchmark.extra_info["MP/s"] = round(data["array"].size / benchmark.stats.stats.median / 1e6)


@pytest.mark.parametrize("threads", [1, 2])
def test_read_sv1_file_threads(benchmark, rg1, threads):
    """cxrfast.read of one SV1 file with threads=2 (the split inside the file's one frame)."""
    benchmark.group = "JPEG lossless SV1 file (RG1), dicom.read -> stored values"
    benchmark.name = "cxrfast read threads=1" if threads == 1 else "read threads=2"
    out = benchmark(lambda: dicom.read(rg1["paths"]["sv1"], output="stored", threads=threads).pixels)
    np.testing.assert_array_equal(out, rg1["array"])


@pytest.mark.parametrize("reader", ["cxrfast", "copy of the pixel bytes", *READERS])
def test_uncompressed_rg1(benchmark, rg1, reader):
    benchmark.group = "Explicit VR LE, RG1, file -> stored values"
    path = rg1["paths"]["native"]
    if reader == "copy of the pixel bytes":
        # The floor: read the file and copy its pixel bytes into a new array.
        n = rg1["array"].nbytes
        with open(path, "rb") as f:
            offset = f.read().index(b"\xe0\x7f\x10\x00OW") + 12  # the Pixel Data value

        def fn():
            with open(path, "rb") as f:
                data = f.read()
            return np.frombuffer(data, np.uint16, count=n // 2, offset=offset).reshape(rg1["array"].shape).copy()
    else:
        fn = _stored(reader, path)
    out = benchmark(fn)
    np.testing.assert_array_equal(out & 0x7FFF, rg1["array"])


@pytest.mark.parametrize("reader", ["cxrfast", "pydicom+pylibjpeg", "python-gdcm"])
def test_rle_rg1(benchmark, rg1, reader):
    benchmark.group = "RLE Lossless, RG1, file -> stored values"
    out = benchmark(_stored(reader, rg1["paths"]["rle"]))
    np.testing.assert_array_equal(out, rg1["array"])


@pytest.mark.parametrize("reader", ["cxrfast display+resize 256 uint8", "pydicom+pylibjpeg decode only"])
def test_display_256_vs_pydicom_decode(benchmark, rg1, reader):
    benchmark.group = "SV1 RG1: cxrfast DICOM->display->256x256 uint8 vs pydicom decode alone"
    path = rg1["paths"]["sv1"]
    if reader.startswith("cxrfast"):
        out = benchmark(lambda: dicom.read(path, size=(256, 256)).pixels)
        assert out.shape == (256, 256) and out.dtype == np.uint8
    else:
        benchmark(lambda: _pydicom(path))


@pytest.mark.parametrize("threads", [1, 2])
def test_read_many_threads(benchmark, rg1, threads, tmp_path):
    benchmark.group = "read_many, 8 SV1 RG1 files -> display 256"
    paths = [rg1["paths"]["sv1"]] * 8
    benchmark.name = f"cxrfast read_many num_threads={threads}" if threads == 1 else f"read_many num_threads={threads}"
    out = benchmark(lambda: dicom.read_many(paths, num_threads=threads, size=256))
    assert len(out) == 8
    benchmark.extra_info["cpus"] = os.cpu_count()
