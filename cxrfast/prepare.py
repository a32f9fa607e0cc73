"""``python -m cxrfast.prepare SRC OUT``: decode an archive once into memory-mappable shards.

A training step that eats thousands of images a second cannot decode 12 MB DICOM files every
epoch. This walks SRC (DICOM, 8/16-bit PNG, JPEG), decodes every image once through the
display pipeline (DICOM in native threads via cxrfast.dicom.read_many, others with Pillow),
resizes it (antialiased, aspect kept: the longer side becomes --size), pads it to a square
and writes fixed-size arrays into shards, plus an index of one row per image.

Output folder (readable without cxrfast, with plain numpy and csv/pandas):
  shard_00000.npy ...   uint8 or uint16 arrays (N, size, size); np.load(path, mmap_mode="r")
  index.csv             one row per image: shard, offset, source (relative to SRC), UIDs, view, original
                        size and spacing, content box (pad_top, pad_left, content_h,
                        content_w), split, label_<name> columns (NaN = ignore)
  meta.json             size, dtype, label names, shard list, counts, format version
  errors.csv            files that could not be read, with the reason
  duplicates.csv        files skipped as duplicates (same SOP Instance UID or same bytes)
  parts/                per-shard index parts (how a rerun knows which shards are done)

Safe to interrupt: a shard (and its index part) appears only when complete (temporary file,
then rename); a rerun with the same arguments skips finished shards.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import atomic, dicom
from .atomic import atomic_open
from .data.files import IMAGE_SUFFIXES, find_images, load_image
from .data.labels import read_labels
from .data.splits import patient_split

FORMAT_VERSION = 1
INDEX_COLUMNS = ["shard", "offset", "source", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
                 "patient_id", "view_position", "rows", "columns", "pixel_spacing_row", "pixel_spacing_col",
                 "pad_top", "pad_left", "content_h", "content_w", "split"]


@dataclass
class Item:
    """One source image that survived deduplication, with its header facts."""

    source: Path
    key: str  # SOP Instance UID, or sha1 of the bytes for non-DICOM files
    meta: dict


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _describe(path: Path) -> Item:
    if _is_image(path):
        from PIL import Image

        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        with Image.open(path) as im:
            w, h = im.size
        return Item(path, "sha1:" + digest, {"rows": h, "columns": w})
    meta = dicom.read_header(path)
    if not meta.get("has_pixel_data"):
        raise dicom.NoPixelDataError(str(path), "no Pixel Data (7FE0,0010)")
    key = meta.get("sop_instance_uid") or "sha1:" + hashlib.sha1(path.read_bytes()).hexdigest()
    return Item(path, key, meta)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _letterbox(img: np.ndarray, size: int, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    """Centres an image (longer side == size) on a size x size canvas of zeros."""
    h, w = img.shape
    canvas = np.zeros((size, size), dtype)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top:top + h, left:left + w] = img
    return canvas, top, left


def _quantize(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    top = 255.0 if dtype == np.uint8 else 65535.0
    return np.clip(np.rint(img * top), 0, top).astype(dtype)


class Preparer:
    def __init__(self, out: Path, root: Path, size: int, dtype: str, workers: int, shard_gb: float):
        self.out, self.root, self.size, self.workers = out, root.resolve(), size, workers
        self.dtype = np.dtype(dtype)
        self.per_shard = max(1, int(shard_gb * 2**30) // (size * size * self.dtype.itemsize))
        self.errors: list[list[str]] = []

    def relative(self, path: Path) -> str:
        """Source paths are stored relative to SRC when they lie under it (data moves)."""
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path.resolve())

    def fail(self, path: Path, exc: BaseException) -> None:
        self.errors.append([str(path), type(exc).__name__, str(exc).replace("\n", " ")])

    def describe_all(self, files: list[Path]) -> tuple[list[Item], list[list[str]]]:
        """Header pass: metadata, then deduplication by SOP Instance UID / content hash."""
        items, duplicates, seen = [], [], {}
        with ThreadPoolExecutor(self.workers) as pool:
            futures = [pool.submit(_describe, p) for p in files]
            for p, fut in tqdm(zip(files, futures), total=len(files), desc="headers", unit="file",
                               file=sys.stderr, disable=None):
                try:
                    item = fut.result()
                except Exception as exc:  # DicomError, OSError, PIL errors: logged, not fatal
                    self.fail(p, exc)
                    continue
                if item.key in seen:
                    duplicates.append([str(p), str(seen[item.key]), item.key])
                    continue
                seen[item.key] = p
                items.append(item)
        return items, duplicates

    def decode(self, items: list[Item]) -> list[tuple[Item, np.ndarray]]:
        """Decodes a chunk: DICOM in native threads, others with Pillow in a thread pool."""
        out: dict[int, np.ndarray] = {}
        dcm = [i for i, it in enumerate(items) if not _is_image(it.source)]
        if dcm:
            kind = "uint8" if self.dtype == np.uint8 else "uint16"
            results = dicom.read_many([items[i].source for i in dcm], num_threads=self.workers, on_error="skip",
                                      size=self.size, dtype=kind, frame=0)
            for i, res in zip(dcm, results):
                if isinstance(res, dicom.DicomError):
                    self.fail(items[i].source, res)
                elif res.pixels.ndim != 2:
                    self.fail(items[i].source, ValueError(f"not a grey image: shape {res.pixels.shape}"))
                else:
                    out[i] = res.pixels
        others = [i for i, it in enumerate(items) if _is_image(it.source)]
        if others:
            def one(i):
                try:
                    return i, _quantize(load_image(items[i].source, self.size), self.dtype), None
                except Exception as exc:
                    return i, None, exc
            with ThreadPoolExecutor(self.workers) as pool:
                for i, img, exc in pool.map(one, others):
                    if exc is not None:
                        self.fail(items[i].source, exc)
                    else:
                        out[i] = img
        return [(items[i], out[i]) for i in sorted(out)]

    def write_shard(self, number: int, items: list[Item], bar: tqdm) -> None:
        rows, images = [], []
        for start in range(0, len(items), 64):
            chunk = items[start:start + 64]
            for item, img in self.decode(chunk):
                canvas, top, left = _letterbox(img, self.size, self.dtype)
                spacing = item.meta.get("pixel_spacing") or (None, None)
                rows.append([number, len(images), self.relative(item.source), item.meta.get("sop_instance_uid"),
                             item.meta.get("study_instance_uid"), item.meta.get("series_instance_uid"),
                             item.meta.get("patient_id"), item.meta.get("view_position"),
                             item.meta.get("rows"), item.meta.get("columns"), spacing[0], spacing[1],
                             top, left, img.shape[0], img.shape[1]])
                images.append(canvas)
            bar.update(len(chunk))
        array = np.stack(images) if images else np.zeros((0, self.size, self.size), self.dtype)
        name = f"shard_{number:05d}"
        _write_csv(self.out / "parts" / f"{name}.csv", INDEX_COLUMNS[:-1], rows)  # before the shard: see done()
        with atomic_open(self.out / f"{name}.npy") as f:
            np.save(f, array)

    def done(self, number: int) -> bool:
        name = f"shard_{number:05d}"
        return (self.out / f"{name}.npy").exists() and (self.out / "parts" / f"{name}.csv").exists()


def prepare(src: str, out: str, *, size: int = 256, dtype: str = "uint8", labels: str | None = None,
            label_format: str = "auto", uncertain: str = "ones", workers: int | None = None,
            shard_gb: float = 2.0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict:
    """Prepares ``src`` into ``out``; returns the meta dict. Reruns skip finished shards."""
    out_dir = Path(out)
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    root = Path(src) if Path(src).is_dir() else Path(src).parent
    prep = Preparer(out_dir, root, size, dtype, workers, shard_gb)
    t0 = time.perf_counter()
    files = find_images(src)
    items, duplicates = prep.describe_all(files)
    shards = [items[i:i + prep.per_shard] for i in range(0, len(items), prep.per_shard)]
    todo = [n for n in range(len(shards)) if not prep.done(n)]
    skipped = sum(len(shards[n]) for n in range(len(shards)) if n not in todo)
    with tqdm(total=len(items), initial=skipped, desc="decode", unit="file", file=sys.stderr, disable=None) as bar:
        for n in todo:
            prep.write_shard(n, shards[n], bar)

    # The index: every finished part, plus splits and labels.
    rows: list[list] = []
    for n in range(len(shards)):
        with open(out_dir / "parts" / f"shard_{n:05d}.csv", newline="") as f:
            reader = csv.reader(f)
            next(reader)
            rows.extend(reader)
    patients = [r[6] or r[2] for r in rows]
    splits = patient_split(patients, split_fractions)
    label_names: list[str] = []
    label_rows = [[] for _ in rows]
    if labels:
        table = read_labels(labels, label_format, uncertain)
        label_names = table.names
        sources = [root.resolve() / r[2] for r in rows]
        index = table.lookup()
        for k, p in enumerate(sources):
            row = next((index[key] for key in _keys(p, root) if key in index), None)
            values = table.labels[row] if row is not None else np.full(len(label_names), np.nan)
            label_rows[k] = ["" if math.isnan(v) else int(v) if float(v).is_integer() else float(v) for v in values]
            if row is not None and table.splits and table.splits[row]:
                splits[k] = table.splits[row]
    header = INDEX_COLUMNS + [f"label_{n}" for n in label_names]
    _write_csv(out_dir / "index.csv", header, [r + [s] + lab for r, s, lab in zip(rows, splits, label_rows)])
    if prep.errors:  # appended across reruns, one line per failure
        new = not (out_dir / "errors.csv").exists()
        with open(out_dir / "errors.csv", "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["source", "error", "reason"])
            w.writerows(prep.errors)
    _write_csv(out_dir / "duplicates.csv", ["source", "duplicate_of", "key"], duplicates)
    meta = {"format_version": FORMAT_VERSION, "size": size, "dtype": dtype, "label_names": label_names,
            "shards": [f"shard_{n:05d}.npy" for n in range(len(shards))], "images": len(rows),
            "images_per_shard": prep.per_shard, "files_seen": len(files), "duplicates": len(duplicates),
            "errors_this_run": len(prep.errors), "split_fractions": list(split_fractions), "source": str(root.resolve())}
    atomic.write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta


def _keys(path: Path, root: Path) -> list[str]:
    keys = [path.name, path.stem]
    try:
        keys.insert(0, str(path.relative_to(root.resolve())))
    except ValueError:
        pass
    return keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cxrfast.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of DICOM/PNG/JPEG files, or a CSV with a 'path' column")
    parser.add_argument("out", help="output folder (created; a rerun resumes)")
    parser.add_argument("--size", type=int, default=256, help="side of the square output images (default 256)")
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8", help="pixel type (default uint8)")
    parser.add_argument("--labels", help="label CSV (NIH ChestX-ray14, CheXpert, MIMIC-CXR-JPG chexpert, generic)")
    parser.add_argument("--label-format", default="auto", choices=["auto", "nih14", "chexpert", "mimic", "generic"],
                        help="label CSV format (default: detected); mimic: pass the *-chexpert.csv, its "
                             "*-metadata.csv is read from the same folder")
    parser.add_argument("--uncertain", default="ones", choices=["ones", "zeros", "ignore"],
                        help="CheXpert/MIMIC -1 labels: ones, zeros or ignore (NaN)")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default 2)")
    parser.add_argument("--split-fractions", default="0.7,0.1,0.2", help="patient-level train,val,test fractions")
    args = parser.parse_args(argv)
    fractions = tuple(float(x) for x in args.split_fractions.split(","))
    if len(fractions) != 3:
        parser.error("--split-fractions needs three numbers")
    if args.size < 8:
        parser.error("--size must be at least 8")
    meta = prepare(args.src, args.out, size=args.size, dtype=args.dtype, labels=args.labels,
                   label_format=args.label_format,
                   uncertain=args.uncertain, workers=args.workers, shard_gb=args.shard_gb,
                   split_fractions=fractions)  # type: ignore[arg-type]
    rate = meta["files_seen"] / meta["seconds"] if meta["seconds"] else 0
    print(f"prepared {meta['images']} images into {len(meta['shards'])} shards under {args.out} "
          f"({meta['seconds']:.1f} s, {rate:.0f} files/s); {meta['duplicates']} duplicates, "
          f"{meta['errors_this_run']} unreadable (see errors.csv)")


if __name__ == "__main__":
    main()
