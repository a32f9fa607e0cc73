"""The anchor for prepare throughput: what people write today. pydicom + pylibjpeg decode,
pydicom's modality and VOI LUTs, MONOCHROME1 inversion, a Pillow antialiased resize and
letterbox, in a multiprocessing pool, then one .npy. Benchmark use only."""
from __future__ import annotations

from multiprocessing import Pool

import numpy as np


def _one(args):
    path, size = args
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / max(hi - lo, 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 1.0 - arr
    img = Image.fromarray(arr, mode="F")
    h, w = arr.shape
    s = size / max(h, w)
    img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
    small = np.clip(np.rint(np.asarray(img) * 255), 0, 255).astype(np.uint8)
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
    canvas[top:top + small.shape[0], left:left + small.shape[1]] = small
    return canvas


def prepare_reference(paths: list[str], out: str, size: int = 256, processes: int = 2) -> np.ndarray:
    with Pool(processes) as pool:
        images = pool.map(_one, [(p, size) for p in paths])
    array = np.stack(images)
    np.save(out, array)
    return array
