"""PNG/JPEG preparation: `cxrfast.prepare` (read once, scaled JPEG decode / split PNG decode,
native resize from uint8/uint16 in a thread pool) against what people write today, a
multiprocessing pool of the same size doing Pillow full decode -> float32 -> Pillow resize
-> letterbox (the pydicom + Pillow anchor of bench/reference_prepare.py, for image files).

Images are synthetic radiographs (cxrfast.synthetic.chest_image, noise added per copy) at the
real sizes: MIMIC-CXR-JPG 3000x2500 8-bit JPEG at quality 92, NIH ChestX-ray14 1024x1024
8-bit PNG. CXRFAST_BENCH_IMAGES scales the file counts (default 1: 8 JPEGs, 24 PNGs); at these
counts prepare's fixed cost per run (index, manifests, their fsyncs: tens of ms) is part of the
ratio. test_png_decoder times the PNG decoders side by side on one NIH-size file, one thread.

Run: pytest bench/test_bench_images.py --benchmark-only
"""
from __future__ import annotations

import io
import itertools
import os
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfast.prepare import prepare
from cxrfast.synthetic import chest_image

pytest.importorskip("pytest_benchmark")

WORKERS = 2
SIZE = 256
SCALE = max(1, int(os.environ.get("CXRFAST_BENCH_IMAGES", "1")))
_counter = itertools.count()


def _radiographs(shape: tuple[int, int], count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct 8-bit radiograph-like images of ``shape`` (one base, noise per copy)."""
    rng = np.random.default_rng(seed)
    side = max(shape)
    base = chest_image(rng, side)[(side - shape[0]) // 2:][:shape[0], (side - shape[1]) // 2:][:, :shape[1]] / 16
    return [np.clip(base + rng.normal(0, 4, shape), 0, 255).astype(np.uint8) for _ in range(count)]


def _folder(tmp_path_factory, name: str, images: list[np.ndarray], suffix: str, **save) -> Path:
    folder = tmp_path_factory.mktemp(name)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{name}_{i:03d}{suffix}", **save)
    return folder


@pytest.fixture(scope="session")
def mimic_jpegs(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory, "mimic", _radiographs((3000, 2500), 8 * SCALE, 0), ".jpg", quality=92)


@pytest.fixture(scope="session")
def nih_pngs(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory, "nih", _radiographs((1024, 1024), 24 * SCALE, 1), ".png")


def _reference_one(args: tuple[str, int]) -> np.ndarray:
    """The anchor for one file: Pillow full decode, float32, Pillow antialiased resize, letterbox."""
    path, size = args
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    h, w = arr.shape
    s = size / max(h, w)
    small = Image.fromarray(arr, mode="F").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    small = np.clip(np.rint(np.asarray(small) * 255), 0, 255).astype(np.uint8)
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas


def _reference(paths: list[str], out: str) -> int:
    with Pool(WORKERS) as pool:
        images = pool.map(_reference_one, [(p, SIZE) for p in paths])
    np.save(out, np.stack(images))
    return len(images)


def _run(benchmark, folder: Path, suffix: str, tool: str, tmp_path) -> None:
    paths = sorted(str(p) for p in folder.glob(f"*{suffix}"))
    if tool == "cxrfast.prepare":
        def run():
            return prepare(str(folder), str(tmp_path / f"p{next(_counter)}"), size=SIZE, workers=WORKERS)["images"]
    else:
        def run():
            return _reference(paths, str(tmp_path / f"r{next(_counter)}.npy"))
    n = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert n == len(paths)
    if benchmark.stats:
        benchmark.extra_info["images/s"] = round(n / benchmark.stats.stats.median, 1)


@pytest.mark.parametrize("tool", ["cxrfast.prepare", "Pillow full decode + resize pool"])
def test_prepare_mimic_jpeg(benchmark, mimic_jpegs, tmp_path, tool):
    benchmark.group = f"prepare {8 * SCALE} MIMIC-size JPEG (3000x2500 8-bit, q92) -> {SIZE} uint8, {WORKERS} workers"
    _run(benchmark, mimic_jpegs, ".jpg", tool, tmp_path)


@pytest.mark.parametrize("tool", ["cxrfast.prepare", "Pillow full decode + resize pool"])
def test_prepare_nih_png(benchmark, nih_pngs, tmp_path, tool):
    benchmark.group = f"prepare {24 * SCALE} NIH-size PNG (1024x1024 8-bit) -> {SIZE} uint8, {WORKERS} workers"
    _run(benchmark, nih_pngs, ".png", tool, tmp_path)


def _one_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_radiographs((1024, 1024), 1, 1)[0]).save(buf, "PNG")
    return buf.getvalue()


def _png_decoders() -> dict:
    """One NIH-size PNG to uint8 samples, each candidate decoder (PNG_DECODERS' choice and the
    split path of cxrfast.data.files among them)."""
    from cxrfast.data import files

    imagecodecs = pytest.importorskip("imagecodecs")

    def pillow(data):
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)

    def split(data):
        return files._png_split(files.png_layout(data), "bench")

    return {"Pillow": pillow, "imagecodecs png_decode (libpng)": imagecodecs.png_decode,
            "imagecodecs spng_decode": imagecodecs.spng_decode, "cxrfast split (libdeflate + png_unfilter)": split}


@pytest.mark.parametrize("decoder", ["Pillow", "imagecodecs png_decode (libpng)", "imagecodecs spng_decode",
                                     "cxrfast split (libdeflate + png_unfilter)"])
def test_png_decoder(benchmark, decoder):
    """The PNG decoders side by side (one thread): decompression is most of a PNG's time."""
    from cxrfast.data import files

    if decoder.startswith("cxrfast") and not files._SPLIT:
        pytest.skip("native module built without png_unfilter")
    benchmark.group = "decode one NIH-size PNG (1024x1024 8-bit) to uint8"
    data = _one_png()
    fn = _png_decoders()[decoder]
    out = benchmark.pedantic(fn, args=(data,), rounds=20, iterations=1, warmup_rounds=2)
    assert out.shape == (1024, 1024) and out.dtype == np.uint8


def test_prepare_matches_the_anchor(mimic_jpegs, nih_pngs, tmp_path):
    """Both tools make the same pictures: within the JPEG tolerance, and a level for PNG
    (the anchor resizes in Pillow's float mode, cxrfast from integers natively)."""
    for folder, suffix, limit in ((mimic_jpegs, ".jpg", 4), (nih_pngs, ".png", 1)):
        paths = sorted(str(p) for p in folder.glob(f"*{suffix}"))[:2]
        ref = np.load(tmp_path / "r.npy") if _reference(paths, str(tmp_path / "r.npy")) else None
        sub = tmp_path / f"src{suffix}"
        sub.mkdir()
        for p in paths:
            os.symlink(p, sub / Path(p).name)
        prepare(str(sub), str(tmp_path / f"out{suffix}"), size=SIZE, workers=WORKERS)
        ours = np.load(tmp_path / f"out{suffix}" / "shard_00000.npy")
        assert np.abs(ours.astype(int) - ref.astype(int)).max() <= limit
