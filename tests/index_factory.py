"""Synthetic prepared folders of any size, written straight with numpy (no decoding, no CSV
unless asked): the 8-rank test and the 10 M-row benchmark use them."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from cxrfast.data import index as columnar
from cxrfast.data.shards import FORMAT_VERSION

SPLITS = ["test", "train", "val"]  # sorted, as Category.from_strings orders its values


def fixed_text(prefix: str, numbers: np.ndarray, digits: int, suffix: str = "") -> columnar.Text:
    """A Text column of prefix + zero-padded number + suffix, built without a Python string per row."""
    head, tail = np.frombuffer(prefix.encode(), np.uint8), np.frombuffer(suffix.encode(), np.uint8)
    width = len(head) + digits + len(tail)
    blob = np.empty((len(numbers), width), np.uint8)
    blob[:, :len(head)] = head
    blob[:, len(head) + digits:] = tail
    rest = numbers.astype(np.int64)
    for k in range(digits - 1, -1, -1):
        blob[:, len(head) + k] = 48 + rest % 10
        rest = rest // 10
    return columnar.Text(np.arange(len(numbers) + 1, dtype=np.int64) * width, blob.reshape(-1))


def image_of(i: np.ndarray, size: int) -> np.ndarray:
    """Image number i: its first two pixels spell i (low, high byte) so a reader can tell which it got."""
    out = np.zeros((len(i), size, size), np.uint8)
    out[:, 0, 0], out[:, 0, 1] = i % 256, (i // 256) % 256
    return out


def write_synthetic(folder: Path, rows: int, images: int | None = None, *, size: int = 8, per_shard: int = 32768,
                    labels: int = 0, csv_rows: bool = False, columnar_index: bool = True) -> Path:
    """A prepared folder of ``images`` images (default: ``rows``) in shards of ``per_shard`` and an
    index of ``rows`` rows, row r showing image r % images; splits 70/10/20 by row; ``labels`` 0/1
    label columns. index.csv is written only with ``csv_rows`` (else a header: is_prepared needs the file)."""
    images = rows if images is None else images
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, images, per_shard)):
        numbers = np.arange(start, min(images, start + per_shard))
        path = folder / f"shard_{k:05d}.npy"
        out = np.lib.format.open_memmap(path, "w+", np.uint8, (len(numbers), size, size))
        out[:] = image_of(numbers, size)
        out.flush()
        del out
        shards.append(path.name)
    r = np.arange(rows, dtype=np.int64)
    image = r % images
    bucket = (r * 2654435761) % 100
    split = np.where(bucket < 70, 1, np.where(bucket < 80, 2, 0)).astype(np.int8)
    names = [f"L{k}" for k in range(labels)]
    table = columnar.Table(rows, {
        "shard": columnar.smallest_int(image // per_shard),
        "offset": columnar.smallest_int(image % per_shard),
        "source": fixed_text("img/", r, 9, ".dcm"),
        "patient_id": fixed_text("p", r // 3, 8),
        "split": columnar.Category(split, SPLITS),
    }, names, ((r[:, None] * (np.arange(labels) + 1)) % 3 == 0).astype(np.float32) if labels else None)
    header = table.header
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        if csv_rows:
            w.writerows(_csv_rows(table))
    meta = {"format_version": FORMAT_VERSION, "size": size, "dtype": "uint8", "label_names": names, "shards": shards,
            "images": rows}
    if columnar_index:
        meta["index"] = dict(columnar.write(folder, table), csv_bytes=(folder / "index.csv").stat().st_size)
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _csv_rows(table: columnar.Table):
    c = table.columns
    cells = [c["shard"].tolist(), c["offset"].tolist(), c["source"].take(), c["patient_id"].take(),
             c["split"].take().tolist()]
    if table.labels is not None:
        cells += [[int(v) for v in table.labels[:, k].tolist()] for k in range(table.labels.shape[1])]
    return zip(*cells)
