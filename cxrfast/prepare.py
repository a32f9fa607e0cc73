"""``python -m cxrfast.prepare SRC OUT``: decode an archive once into memory-mappable shards.

A training step that eats thousands of images a second cannot decode 12 MB DICOM files every
epoch. This walks SRC (DICOM, 8/16-bit PNG, JPEG), decodes every image once through the
display pipeline (DICOM in native threads via cxrfast.dicom.read_many; PNG/JPEG read once,
hashed and decoded from the same bytes by cxrfast.data.files in a thread pool, JPEG at the
DCT scale the size allows), resizes it (the same native antialiased resize for both, aspect
kept: the longer side becomes --size), pads it to a square
and writes fixed-size arrays into shards, plus an index of one row per image.

Output folder (readable without cxrfast, with plain numpy and csv/pandas):
  shard_00000.npy ...   uint8 or uint16 arrays (N, size, size); np.load(path, mmap_mode="r")
  index.csv             one row per image: shard, offset, source (relative to SRC), UIDs, view, original
                        size and spacing, content box (pad_top, pad_left, content_h,
                        content_w), split, label_<name> columns (NaN = ignore)
  index/                the same index column by column, for memory-mapping (see cxrfast.data.index)
  meta.json             size, dtype, label names, shard list, counts, format version, index/'s columns
  errors.csv            files that could not be read, with the reason
  duplicates.csv        files skipped as duplicates (same SOP Instance UID or same bytes)
  parts/                settings.json (size, dtype, labels; written before the first shard) and one
                        manifest per shard: every source file assigned to it, with its size, mtime and
                        fate (image, error, duplicate)

Safe to interrupt and to rerun over a changed tree: a shard (and its manifest) appears only
when complete; a rerun keeps finished shards whose files are unchanged, drops removed or
changed files from the index and decodes only new or changed files into new shards. A rerun
with another --size, --dtype or label set stops with an error (or rebuilds with --overwrite).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from .progress import progress

from . import atomic, cli, dicom
from . import manifest as mf
from .atomic import atomic_open
from .data import files as image_files
from .data.files import IMAGE_SUFFIXES
from .data import index as columnar
from .data import label_formats
from .data.label_formats import UNCERTAIN_HELP, VOTES, Uncertainty, vocabulary
from .data.labels import FORMATS, LabelTable, Protocol, file_keys, filter_views, resolve_splits, split_name
from .data.splits import patient_split
from .data.shards import FORMAT_VERSION
from .manifest import INDEX_COLUMNS, PrepareError, Record

DECODE_CHUNK = 64  # files per read_many call: enough to keep every native thread busy


@dataclass
class Entry:
    """One unit of shard assignment: the files sharing a key (SOP Instance UID or content hash),
    in sorted order; the first that decodes becomes the image, the others duplicates.
    A file whose header could not be read is an entry of its own with ``error`` set."""

    files: list[Path]
    key: str = ""
    metas: list[dict] = field(default_factory=list)
    error: BaseException | None = None
    duplicate_of: str | None = None  # a live image of a finished shard already has this key


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _describe(path: Path) -> tuple[str, dict]:
    """(key, header facts) of one DICOM file; raises when the header cannot be read.
    PNG/JPEG files are not described here: their key (the content hash) and size come from
    the one read that also decodes them (``_decode_image``)."""
    meta = dicom.read_header(path)
    if not meta.get("has_pixel_data"):
        raise dicom.NoPixelDataError(str(path), "no Pixel Data (7FE0,0010)")
    return meta.get("sop_instance_uid") or "sha1:" + hashlib.sha1(path.read_bytes()).hexdigest(), meta


def _decode_image(path: Path, size: int, dtype: np.dtype) -> tuple[np.ndarray, str, dict]:
    """(pixels resized and quantised, key, header facts) of a PNG/JPEG from one read of its bytes."""
    data = path.read_bytes()
    key = "sha1:" + hashlib.sha1(data).hexdigest()
    decoded = image_files.decode(data, size)
    img = _quantize(image_files.decoded_image(decoded, size), dtype)
    return img, key, {"rows": decoded.original[0], "columns": decoded.original[1]}


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


def _reason(exc: BaseException) -> str:
    return str(exc).replace("\n", " ")


class Preparer:
    """Decodes entries into shards and records each shard's manifest."""

    def __init__(self, out: Path, root: Path, size: int, dtype: str, workers: int, shard_gb: float):
        self.out, self.root, self.size, self.workers = out, root.resolve(), size, workers
        self.dtype = np.dtype(dtype)
        self.per_shard = max(1, int(shard_gb * 2**30) // (size * size * self.dtype.itemsize))
        self.stamps: dict[str, tuple[int, int]] = {}  # source -> (size, mtime_ns) when found
        self.decoded = 0
        self.live_keys: dict[str, str] = {}  # key -> source of the images of finished shards
        self.image_keys: dict[str, str] = {}  # key -> source of the PNG/JPEG images of this run
        self.facts: dict[Path, tuple[str, dict]] = {}  # PNG/JPEG decoded, not yet recorded: (key, meta)

    def relative(self, path: Path) -> str:
        """Source paths are stored relative to SRC when they lie under it (data moves)."""
        try:
            return str(path.resolve().relative_to(self.root))
        except ValueError:
            return str(path.resolve())

    def entries(self, files: list[Path], live_keys: dict[str, str]) -> list[Entry]:
        """Header pass over ``files`` (sorted): one entry per key, in order of its first file.
        A PNG/JPEG file is an entry of its own, with its key found when it is decoded."""
        self.live_keys = live_keys
        by_key: dict[str, Entry] = {}
        entries: list[Entry] = []
        with ThreadPoolExecutor(self.workers) as pool, progress(len(files), 0, True, "headers", unit="file") as bar:
            futures = [None if _is_image(p) else pool.submit(_describe, p) for p in files]
            for p, fut in zip(files, futures):
                bar.update(1)
                if fut is None:
                    entries.append(Entry([p], metas=[{}]))
                    continue
                try:
                    key, meta = fut.result()
                except Exception as exc:  # DicomError, OSError, PIL errors: logged, not fatal
                    entries.append(Entry([p], error=exc))
                    continue
                if key not in by_key:
                    by_key[key] = Entry([], key, duplicate_of=live_keys.get(key))
                    entries.append(by_key[key])
                by_key[key].files.append(p)
                by_key[key].metas.append(meta)
        return entries

    def decode(self, paths: list[Path]) -> list[np.ndarray | BaseException]:
        """Decodes files: DICOM in native threads, PNG/JPEG in a thread pool (decoders and the
        native resize release the GIL); the key and size of each PNG/JPEG go to ``facts``."""
        self.decoded += len(paths)
        out: list[np.ndarray | BaseException] = [ValueError("not decoded")] * len(paths)
        dcm = [i for i, p in enumerate(paths) if not _is_image(p)]
        if dcm:
            kind = "uint8" if self.dtype == np.uint8 else "uint16"
            results = dicom.read_many([paths[i] for i in dcm], num_threads=self.workers, on_error="skip",
                                      size=self.size, dtype=kind, frame=0)
            for i, res in zip(dcm, results):
                if isinstance(res, BaseException):
                    out[i] = res
                elif res.pixels.ndim != 2:
                    out[i] = ValueError(f"not a grey image: shape {res.pixels.shape}")
                else:
                    out[i] = res.pixels
        others = [i for i, p in enumerate(paths) if _is_image(p)]
        if others:
            def one(i):
                try:
                    return _decode_image(paths[i], self.size, self.dtype)
                except Exception as exc:  # OSError, PIL and imagecodecs errors: this file's
                    return exc
            with ThreadPoolExecutor(self.workers) as pool:
                for i, res in zip(others, pool.map(one, others)):
                    if isinstance(res, BaseException):
                        out[i] = res
                    else:
                        out[i], key, meta = res
                        self.facts[paths[i]] = (key, meta)
        return out

    def resolve(self, entries: list[Entry]) -> list[tuple[Entry, int, np.ndarray | None, list]]:
        """For each entry: (entry, index of the file that decoded or -1, its pixels, failures).

        Copies are tried in order until one decodes, so a truncated copy never shadows a good one;
        the first copies of all entries are decoded together, then second copies of those that failed."""
        state = [[e, -1, None, []] for e in entries]
        trying = [(s, 0) for s in state if s[0].error is None and s[0].duplicate_of is None]
        while trying:
            results = self.decode([s[0].files[k] for s, k in trying])
            retry = []
            for (s, k), res in zip(trying, results):
                if isinstance(res, BaseException):
                    s[3].append((k, res))
                    if k + 1 < len(s[0].files):
                        retry.append((s, k + 1))
                else:
                    s[1], s[2] = k, res
            trying = retry
        return [tuple(s) for s in state]

    def _image_duplicate(self, entry: Entry, chosen: int, record) -> bool:
        """Gives a decoded PNG/JPEG entry its key and size; records it and returns True when
        an image of a finished shard or an earlier file of this run has the same bytes."""
        path = entry.files[chosen]
        entry.key, entry.metas[chosen] = self.facts.pop(path)
        first = self.live_keys.get(entry.key) or self.image_keys.get(entry.key)
        if first is not None:
            record(path, "duplicate", key=entry.key, detail=first)
            return True
        self.image_keys[entry.key] = self.relative(path)
        return False

    def write_shard(self, number: int, entries: list[Entry], bar) -> list[Record]:
        """Decodes the entries, writes the manifest, then the shard; returns the manifest's records."""
        records: list[Record] = []
        images: list[np.ndarray] = []

        def record(path: Path, status: str, **kw) -> None:
            src = self.relative(path)
            records.append(Record(src, status, self.stamps[src], **kw))

        for start in range(0, len(entries), DECODE_CHUNK):
            chunk = entries[start:start + DECODE_CHUNK]
            for entry, chosen, img, failures in self.resolve(chunk):
                if entry.error is not None:
                    record(entry.files[0], "error", error=type(entry.error).__name__, detail=_reason(entry.error))
                    continue
                for k, exc in failures:
                    record(entry.files[k], "error", key=entry.key, error=type(exc).__name__, detail=_reason(exc))
                if entry.duplicate_of is not None:
                    for p in entry.files:
                        record(p, "duplicate", key=entry.key, detail=entry.duplicate_of)
                    continue
                if chosen < 0:
                    continue
                if not entry.key and self._image_duplicate(entry, chosen, record):
                    continue
                canvas, top, left = _letterbox(img, self.size, self.dtype)
                meta = entry.metas[chosen]
                spacing = meta.get("pixel_spacing") or (None, None)
                src = self.relative(entry.files[chosen])
                row = [number, len(images), src, meta.get("sop_instance_uid"), meta.get("study_instance_uid"),
                       meta.get("series_instance_uid"), meta.get("patient_id"), meta.get("view_position"),
                       meta.get("rows"), meta.get("columns"), spacing[0], spacing[1],
                       top, left, img.shape[0], img.shape[1]]
                record(entry.files[chosen], "image", key=entry.key, row=["" if v is None else v for v in row])
                images.append(canvas)
                for p in entry.files[chosen + 1:]:
                    record(p, "duplicate", key=entry.key, detail=src)
            bar.update(sum(len(e.files) for e in chunk))
        array = np.stack(images) if images else np.zeros((0, self.size, self.size), self.dtype)
        mf.write_part(self.out, number, records)  # before the shard: a shard counts as done only with both
        with atomic_open(mf.shard_path(self.out, number)) as f:
            np.save(f, array)
        return records


def _numbers(finished: list[int], count: int) -> list[int]:
    """Shard numbers for ``count`` new shards: the gaps below the last finished one, then after it."""
    done = set(finished)
    gaps = [n for n in range(max(finished, default=-1) + 1) if n not in done]
    after = range(max(finished, default=-1) + 1, max(finished, default=-1) + 1 + max(0, count - len(gaps)))
    return gaps + list(after)  # gaps beyond ``count`` get an empty shard, so the shard list has no hole


def _check_arguments(src: str, size: int, dtype: str, workers: int | None, shard_gb: float,
                     split_fractions: tuple[float, ...], uncertain: str) -> None:
    if not Path(src).exists():
        raise PrepareError(f"{src}: no such folder")
    if not Path(src).is_dir() and Path(src).suffix.lower() != ".csv":
        raise PrepareError(f"{src}: not a folder or a .csv file")
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 8:
        raise PrepareError(f"--size must be an integer of at least 8, got {size!r}")
    if dtype not in ("uint8", "uint16"):
        raise PrepareError(f"--dtype must be uint8 or uint16, got {dtype!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, numbers.Integral)
                                or workers < 1):
        raise PrepareError(f"--workers must be at least 1, got {workers!r}")
    if not (isinstance(shard_gb, (int, float)) and math.isfinite(shard_gb) and shard_gb > 0):
        raise PrepareError(f"--shard-gb must be a positive number, got {shard_gb!r}")
    cli.check_fractions(split_fractions, "--split-fractions")
    try:
        Uncertainty.parse(uncertain)
    except ValueError as exc:
        raise PrepareError(f"--uncertain {uncertain}: {exc}") from None


@contextmanager
def _as_prepare_error() -> Iterator[None]:
    """The shared input checks raise UsageError; prepare's callers catch PrepareError."""
    try:
        yield
    except cli.UsageError as exc:
        raise PrepareError(str(exc)) from None


def prepare(src: str, out: str, *, size: int = 256, dtype: str = "uint8", labels: str | None = None,
            label_format: str = "auto", uncertain: str = "ones", workers: int | None = None,
            shard_gb: float = 2.0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
            overwrite: bool = False, protocol: Protocol | None = None) -> dict:
    """Prepares ``src`` into ``out``; returns the meta dict (``notes``: what the label
    protocol left out, e.g. images of other views, counted).

    Every input is checked before anything is written (PrepareError otherwise). A rerun keeps
    finished shards whose source files are unchanged and decodes only the rest; ``overwrite``
    first removes what an earlier run wrote (and nothing else)."""
    with _as_prepare_error():
        _check_arguments(src, size, dtype, workers, shard_gb, split_fractions, uncertain)
        protocol = protocol or Protocol()
        needs_labels = [f"--{k.replace('_', '-')}" for k in ("label_set", "labels_map", "split_files", "test_labels")
                        if getattr(protocol, k)]
        if needs_labels and not labels:
            raise PrepareError(f"{', '.join(needs_labels)}: only with --labels (they shape the label columns)")
        table, notes = cli.label_protocol(labels, label_format, uncertain, protocol=protocol) if labels else (None, [])
        files = cli.image_files(src, option="")
        root = Path(src) if Path(src).is_dir() else Path(src).parent
        if protocol.view:  # before decoding: other views never reach a shard
            files = _views_kept(files, root, table, protocol.view, notes)
    label_names = list(table.names) if table else []
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    settings = {"format_version": FORMAT_VERSION, "size": size, "dtype": dtype, "label_names": label_names}
    if overwrite:
        mf.remove_outputs(out_dir)
    else:
        mf.check_settings(out_dir, settings)

    workers = workers or os.cpu_count() or 1
    prep = Preparer(out_dir, root, size, dtype, workers, shard_gb)
    t0 = time.perf_counter()
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    mf.write_settings(out_dir, settings)  # before any shard: a rerun with other settings is caught

    # What finished shards already cover, and what is left to do.
    current = {prep.relative(p): p for p in files}
    prep.stamps = {s: mf.stamp(p) for s, p in current.items()}
    finished = mf.finished_shards(out_dir)
    recorded = mf.read_records(out_dir, finished)
    records = mf.live(recorded, prep.stamps)
    stale_images = sum(1 for s, r in recorded.items() if r.status == "image" and s not in records)
    live_keys = {r.key: s for s, r in records.items() if r.status == "image"}
    pending = [p for s, p in current.items() if s not in records]
    entries = prep.entries(pending, live_keys) if pending else []
    chunks = [entries[i:i + prep.per_shard] for i in range(0, len(entries), prep.per_shard)]
    new_numbers = _numbers(finished, len(chunks))
    chunks += [[] for _ in range(len(new_numbers) - len(chunks))]
    with progress(len(files), len(files) - len(pending), True, "decode", unit="file") as bar:
        for n, chunk in zip(new_numbers, chunks):
            for r in prep.write_shard(n, chunk, bar):
                records[r.source] = r
            mf.write_logs(out_dir, records)  # per shard: a killed run keeps the errors of finished shards
    mf.write_logs(out_dir, records)

    rows = sorted((r.row for r in records.values() if r.status == "image"), key=lambda row: (int(row[0]), int(row[1])))
    errors = sum(r.status == "error" for r in records.values())
    duplicates = sum(r.status == "duplicate" for r in records.values())
    if not rows:  # no index: an earlier one would name images that are gone
        for name in ("index.csv", "meta.json"):
            (out_dir / name).unlink(missing_ok=True)
        raise PrepareError(f"no readable images in {src}: {errors} files could not be read "
                           f"(see {out_dir / 'errors.csv'})")
    splits, label_rows = _splits_and_labels(rows, root, table, split_fractions)
    header = INDEX_COLUMNS + [f"label_{n}" for n in label_names]
    table = [r + [s] + lab for r, s, lab in zip(rows, splits, label_rows)]
    # index/ first, index.csv, then meta.json naming both: a reader trusts index/ only when
    # meta.json's row count and CSV size match what is on disk
    index_spec = columnar.write(out_dir, columnar.from_rows(header, table, label_names))
    mf.write_table(out_dir / "index.csv", header, table)
    index_spec["csv_bytes"] = (out_dir / "index.csv").stat().st_size
    shard_count = max(finished + new_numbers, default=-1) + 1
    meta = {"format_version": FORMAT_VERSION, "size": size, "dtype": dtype, "label_names": label_names,
            "shards": [f"shard_{n:05d}.npy" for n in range(shard_count)], "images": len(rows),
            "images_per_shard": prep.per_shard, "files_seen": len(files), "duplicates": duplicates,
            "errors": errors, "decoded_this_run": prep.decoded, "dropped_this_run": stale_images,
            "split_fractions": list(split_fractions), "source": str(root.resolve()), "notes": notes,
            "index": index_spec}
    atomic.write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta


def _views_kept(files: list[Path], root: Path, table: LabelTable | None, view: str, notes: list[str]) -> list[Path]:
    """The files of the views asked for (the label CSV's view, else the DICOM header's); the
    count of the others goes to ``notes``. None left is a UsageError."""
    index = table.lookup() if table is not None else {}
    rows = [next((index[k] for k in file_keys(p, root) if k in index), None) for p in files]
    kept, note = filter_views(files, rows, table, view)
    notes.append(note)
    if not kept:
        raise cli.UsageError(f"--view {view}: none of the {len(files)} images has that view")
    return [files[i] for i in kept]


def _splits_and_labels(rows: list[list], root: Path, table: LabelTable | None,
                       split_fractions: tuple[float, float, float]) -> tuple[list[str], list[list]]:
    """Patient-level splits (or the label CSV's own) and the label columns of each index row."""
    patients = [r[6] or r[2] for r in rows]
    label_rows: list[list] = [[] for _ in rows]
    if table is None:
        return resolve_splits([None] * len(rows), patients, split_fractions), label_rows
    index = table.lookup()
    given: list[str | None] = []
    for k, r in enumerate(rows):
        row = next((index[key] for key in file_keys(root.resolve() / r[2], root.resolve()) if key in index), None)
        values = table.labels[row] if row is not None else np.full(len(table.names), np.nan)
        label_rows[k] = ["" if math.isnan(v) else int(v) if float(v).is_integer() else float(v) for v in values]
        given.append(table.splits[row] if row is not None and table.splits else None)
        if not r[6] and row is not None and table.patients and table.patients[row]:
            patients[k] = table.patients[row]  # no Patient ID in the file (PNG, JPEG): the CSV's
    if given and all(given):
        return resolve_splits(given, patients, split_fractions), label_rows
    by_patient = patient_split(patients, split_fractions)  # a row with its own split keeps it
    return [split_name(g) or s for g, s in zip(given, by_patient)], label_rows


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"needs three numbers like 0.7,0.1,0.2, got {text!r}")
    return values  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser(prog="python -m cxrfast.prepare", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of DICOM/PNG/JPEG files, or a CSV with a 'path' column")
    parser.add_argument("out", help="output folder (created; a rerun resumes)")
    parser.add_argument("--size", type=int, default=256, help="side of the square output images (default 256)")
    parser.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8", help="pixel type (default uint8)")
    parser.add_argument("--labels", help=f"label CSV ({', '.join(label_formats.names())}; see --label-format)")
    parser.add_argument("--label-format", default="auto", choices=FORMATS,
                        help=f"label CSV format (default: auto): {label_formats.help_text()}")
    parser.add_argument("--uncertain", default="ones", help=f"CheXpert/MIMIC {UNCERTAIN_HELP}")
    parser.add_argument("--label-set", help="keep these labels only: " + ", ".join(vocabulary.LABEL_SETS)
                        + " or names A,B,C (a label the CSV lacks is NaN = ignored)")
    parser.add_argument("--labels-map", help="rename labels: From=To,... or a JSON file {\"From\": \"To\"}")
    parser.add_argument("--split-files", type=lambda t: tuple(t.split(",")), default=(),
                        help="official split as two lists of image names, train+val then test "
                             "(NIH: train_val_list.txt,test_list.txt)")
    parser.add_argument("--test-labels", help="a second label CSV of the same format: its images are the test split "
                                              "(CheXpert valid.csv)")
    parser.add_argument("--view", help="keep only these views, e.g. PA,AP or frontal (the CSV's view, else the "
                                       "DICOM header's); the others are counted and not decoded")
    parser.add_argument("--rad-vote", default="majority", choices=VOTES,
                        help="several radiologists' rows per image (VinDr-CXR): majority or any")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: all cores)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="shard size in GiB (default 2)")
    parser.add_argument("--split-fractions", type=_fractions, default=(0.7, 0.1, 0.2),
                        help="patient-level train,val,test fractions (default 0.7,0.1,0.2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild OUT: first remove what an earlier prepare wrote there (shards, parts/, "
                             "index.csv, meta.json, errors.csv, duplicates.csv), nothing else")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.src, args.out, size=args.size, dtype=args.dtype, labels=args.labels,
                       label_format=args.label_format, uncertain=args.uncertain, workers=args.workers,
                       shard_gb=args.shard_gb, split_fractions=args.split_fractions, overwrite=args.overwrite,
                       protocol=Protocol(args.label_set, args.labels_map, args.split_files, args.test_labels,
                                         args.view, args.rad_vote))
    except PrepareError as exc:
        cli.fail(str(exc))
    for note in meta["notes"]:
        print(note)
    rate = meta["files_seen"] / meta["seconds"] if meta["seconds"] else 0
    dropped = f"; {meta['dropped_this_run']} removed or changed since the last run" if meta["dropped_this_run"] else ""
    print(f"prepared {meta['images']} images into {len(meta['shards'])} shards under {args.out} "
          f"({meta['seconds']:.1f} s, {rate:.0f} files/s); {meta['duplicates']} duplicates, "
          f"{meta['errors']} unreadable (see errors.csv){dropped}")


if __name__ == "__main__":
    main()
