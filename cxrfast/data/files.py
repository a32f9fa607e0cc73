"""Finding image files and loading one as a float image in [0, 1] (bone bright)."""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .. import dicom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def find_images(source: str | os.PathLike) -> list[Path]:
    """Image files under a folder (DICOM, PNG, JPEG), or the ``path`` column of a CSV
    (relative paths resolve against the CSV's folder), sorted for reproducibility."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            column = next((c for c in ("path", "Path", "Image Index", "file") if c in (reader.fieldnames or [])), None)
            if column is None:
                raise ValueError(f"{source}: no 'path' column (columns: {reader.fieldnames})")
            return [p if p.is_absolute() else source.parent / p for p in (Path(r[column]) for r in reader)]
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder or a .csv file")
    found = []
    for root, _, names in os.walk(source):
        for name in names:
            p = Path(root) / name
            if p.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(p):
                found.append(p)
    return sorted(found)


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """A 2-D float32 image in [0, 1], dense tissue bright; the longer side resized to ``size``.

    DICOM goes through cxrfast.dicom's display pipeline (VOI, MONOCHROME1); PNG/JPEG (8 or
    16-bit) through Pillow, scaled by the maximum of their bit depth.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        img = dicom.read(path, dtype="float32", size=size, frame=0).pixels  # frame 0 also of multi-frame files
        return img if img.ndim == 2 else img.mean(axis=-1)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im, dtype=np.float32) / 65535.0
        else:
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if size is not None and max(arr.shape) != size:
        h, w = arr.shape
        s = size / max(h, w)
        im2 = Image.fromarray(arr, mode="F").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        arr = np.asarray(im2, dtype=np.float32)
    return np.clip(arr, 0.0, 1.0)
