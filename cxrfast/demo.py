"""``python -m cxrfast.demo``: decode a folder of DICOM files and show what the reader does.

With no argument it generates the demo dataset (synthetic chest radiographs in native,
RLE and JPEG lossless SV1 transfer syntaxes, MONOCHROME1 and MONOCHROME2), decodes every
file in native threads to display-ready 256x256 images, prints a table and writes a PNG
contact sheet, so a newcomer sees the reader work end to end in seconds.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from . import dicom
from .atomic import atomic_open
from .synthetic import ensure_demo_dataset

DEFAULT_DIR = Path("outputs") / "demo_dicom"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cxrfast.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", help="folder of DICOM files (default: generate the demo set "
                        f"under {DEFAULT_DIR})")
    parser.add_argument("--size", type=int, default=256, help="longer side of the decoded images (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="decoding threads (default: all cores)")
    parser.add_argument("--sheet", default=None, help="PNG contact sheet path (default: contact_sheet.png "
                        "beside FOLDER, so the sheet never mixes with the images)")
    args = parser.parse_args(argv)

    folder = Path(args.folder) if args.folder else ensure_demo_dataset(DEFAULT_DIR)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom", ""))
    if not paths:
        parser.error(f"no DICOM files under {folder}")
    start = time.perf_counter()
    results = dicom.read_many(paths, num_threads=args.threads, on_error="skip", size=args.size)
    elapsed = time.perf_counter() - start

    good = [(p, r) for p, r in zip(paths, results) if isinstance(r, dicom.DicomImage)]
    print(f"{'file':<22} {'transfer syntax':<24} {'photometric':<12} {'stored':>11} -> shown")
    for p, r in zip(paths, results):
        if isinstance(r, dicom.DicomError):
            print(f"{p.name:<22} ERROR {r.problem}")
            continue
        m = r.meta
        print(f"{p.name:<22} {m['transfer_syntax']:<24} {m['photometric'] or '-':<12} "
              f"{m['rows']:>5}x{m['columns']:<5} -> {r.pixels.shape[0]}x{r.pixels.shape[1]} {r.pixels.dtype}")
    print(f"\ndecoded {len(good)}/{len(paths)} files in {elapsed * 1e3:.0f} ms "
          f"({len(paths) / elapsed:.0f} files/s, {args.threads or os.cpu_count()} threads)")
    if good:
        sheet = Path(args.sheet) if args.sheet else folder.parent / f"{folder.name}_contact_sheet.png"
        _contact_sheet([r.pixels for _, r in good[:24]], sheet)
        print(f"contact sheet (bone is bright in every file, MONOCHROME1 included): {sheet}")


def _contact_sheet(images: list[np.ndarray], path: Path, columns: int = 8) -> None:
    from PIL import Image

    h = max(i.shape[0] for i in images)
    w = max(i.shape[1] for i in images)
    rows = (len(images) + columns - 1) // columns
    sheet = np.zeros((rows * h, columns * w), np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, columns)
        img = img if img.ndim == 2 else img[..., 0]
        sheet[r * h:r * h + img.shape[0], c * w:c * w + img.shape[1]] = img
    with atomic_open(path) as f:
        Image.fromarray(sheet).save(f, format="PNG")


if __name__ == "__main__":
    main()
