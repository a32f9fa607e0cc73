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

Across machines: ``--part i/N`` (SLURM array tasks; under torchrun RANK/WORLD_SIZE) prepares the
i-th contiguous slice of the sorted file list into shard_pIIII_NNNNN.npy in the shared OUT and
writes parts/part_pIIII.json when done; the last part to finish (under a lock) or
``python -m cxrfast.prepare merge OUT`` writes the one index.csv, index/ and meta.json, equal to a
one-process run's: copies kept by two parts are settled there (the first in sorted order that
decoded stays, the other becomes a duplicate). Every part must be given the same settings.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import numbers
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from .progress import progress, show_rate

from . import atomic, cli, dicom
from . import manifest as mf
from .data import files as image_files
from .data.files import IMAGE_SUFFIXES
from .data import index as columnar
from .data import label_formats
from .data.label_formats import UNCERTAIN_HELP, VOTES, Uncertainty, vocabulary
from .data.labels import FORMATS, LabelTable, Protocol, file_keys, filter_views, resolve_splits, split_name
from .data.splits import patient_split
from .data.index import FORMAT_VERSION
from .manifest import INDEX_COLUMNS, PrepareError, Record

DECODE_CHUNK = 64  # files per read_many call: enough to keep every native thread busy
WORK_BYTES_PER_PIXEL = 4  # memory of one decode beyond the file's bytes, per pixel of one frame (measured below)
MEMORY_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# WORK_BYTES_PER_PIXEL: peak resident memory one decode to 256 adds (ru_maxrss of a fresh process), RG1 at
# 1955x1841 (3.4 Mpixel) 16-bit: JPEG lossless SV1 15.4 MB (file 4.4 MB), 16-bit PNG 13.5 MB (file 5.3 MB),
# uncompressed 8.9 MB (file 7.2 MB); 8-bit JPEG decodes at a reduced DCT scale (5.9 MB at 3900x3600).
# So the file plus 4 bytes a pixel bounds each of them.


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
    decoded = image_files.decode(data, size, str(path))
    img = _quantize(image_files.decoded_image(decoded, size), dtype)
    return img, key, {"rows": decoded.original[0], "columns": decoded.original[1]}


def decode_cost(file_bytes: int, pixels: int) -> int:
    """Estimated peak bytes of one decode: the file, read whole, plus ``WORK_BYTES_PER_PIXEL``
    for each pixel (x samples) of the frame decoded."""
    return file_bytes + WORK_BYTES_PER_PIXEL * pixels


def _dicom_pixels(meta: dict) -> int:
    """Pixels x samples of frame 0, the one prepare decodes, from the header."""
    return int(meta.get("rows") or 0) * int(meta.get("columns") or 0) * int(meta.get("samples_per_pixel") or 1)


def _image_pixels(path: Path) -> int:
    """Pixels of a PNG/JPEG from its header (Pillow reads no further); 0 when unreadable (the
    decode then reports the error)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # any failure is the decode's to report, with its reason
        return 0


def parse_memory(text: str) -> int:
    """``--max-memory``: bytes from "4GB", "512M", "1.5GiB", "800000000" (K, M, G, T are powers
    of 1024, with or without B / iB); not positive or not a size is a UsageError naming it."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in MEMORY_UNITS else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number * MEMORY_UNITS[unit] >= 1):
        raise cli.UsageError(f"--max-memory {text}: needs a positive size like 4GB, 512MB or 1.5G")
    return int(number * MEMORY_UNITS[unit])


def _mib(n: int) -> str:
    return f"{n / 2**20:.3g} MiB"


def default_memory(environ=os.environ) -> int | None:
    """Half the memory of this machine (or of its cgroup, where smaller), shared among
    torchrun's processes on the node (LOCAL_WORLD_SIZE); None where it cannot be read."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        total = min(total, int(limit)) if limit.isdigit() else total
    except OSError:
        pass
    try:
        local = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, total // 2 // local)


def _quantize(img: np.ndarray, dtype: np.dtype) -> np.ndarray:
    top = 255.0 if dtype == np.uint8 else 65535.0
    return np.clip(np.rint(img * top), 0, top).astype(dtype)


def _reason(exc: BaseException) -> str:
    return str(exc).replace("\n", " ")


class Preparer:
    """Decodes entries into shards and records each shard's manifest."""

    def __init__(self, out: Path, root: Path, size: int, dtype: str, workers: int, shard_gb: float,
                 part: int | None = None, max_memory: int | None = None):
        self.out, self.root, self.size, self.workers, self.part = out, root.resolve(), size, workers, part
        self.named_root = root  # SRC as the user named it: the walk's paths start with it
        self.max_memory = max_memory  # bytes of decodes in flight at once; None: no bound
        self.costs: dict[Path, int] = {}  # estimated bytes of one decode (decode_cost); absent: unknown, 0
        self.over_budget: set[Path] = set()  # files estimated over max_memory alone: decoded one at a time
        self.dtype = np.dtype(dtype)
        self.per_shard = max(1, int(shard_gb * 2**30) // (size * size * self.dtype.itemsize))
        self.stamps: dict[str, tuple[int, int]] = {}  # source -> (size, mtime_ns) when found
        self.decoded = 0
        self.files_done, self.started = 0, time.perf_counter()  # for files/s in the progress bar
        self.live_keys: dict[str, str] = {}  # key -> source of the images of finished shards
        self.image_keys: dict[str, str] = {}  # key -> source of the PNG/JPEG images of this run
        self.facts: dict[Path, tuple[str, dict]] = {}  # PNG/JPEG decoded, not yet recorded: (key, meta)
        self.sources: dict[Path, str] = {}  # path as found -> relative(path)

    def relative(self, path: Path) -> str:
        """Source paths are stored relative to SRC when they lie under it (data moves).
        Cached: each file is named 4 times a run and ``resolve`` costs an lstat per path
        component (1.7% of a full-size SV1 decode per file, measured in bench/)."""
        source = self.sources.get(path)
        if source is None:
            resolved = path.resolve()
            try:
                source = str(resolved.relative_to(self.root))
            except ValueError:
                source = str(resolved)
            self.sources[path] = source
        return source

    def entries(self, files: list[Path], live_keys: dict[str, str]) -> list[Entry]:
        """Header pass over ``files`` (sorted): one entry per key, in order of its first file.
        A PNG/JPEG file is an entry of its own, with its key found when it is decoded."""
        self.live_keys = live_keys
        by_key: dict[str, Entry] = {}
        entries: list[Entry] = []
        sized = self._needs_image_sizes()
        with ThreadPoolExecutor(self.workers) as pool, progress(len(files), 0, True, "headers", unit="file") as bar:
            futures = [None if _is_image(p) else pool.submit(_describe, p) for p in files]
            pixels = {p: pool.submit(_image_pixels, p) for p in files if sized and _is_image(p)}
            started = time.perf_counter()
            for done, (p, fut) in enumerate(zip(files, futures), 1):
                bar.update(1)
                if done % 256 == 0 or done == len(files):
                    show_rate(bar, done, started)
                if fut is None:
                    entries.append(Entry([p], metas=[{}]))
                    if p in pixels:
                        self.costs[p] = decode_cost(self._file_bytes(p), pixels[p].result())
                    continue
                try:
                    key, meta = fut.result()
                except Exception as exc:  # DicomError, OSError, PIL errors: logged, not fatal
                    entries.append(Entry([p], error=exc))
                    continue
                self.costs[p] = decode_cost(self._file_bytes(p), _dicom_pixels(meta))
                if key not in by_key:
                    by_key[key] = Entry([], key, duplicate_of=live_keys.get(key))
                    entries.append(by_key[key])
                by_key[key].files.append(p)
                by_key[key].metas.append(meta)
        return entries

    def _needs_image_sizes(self) -> bool:
        """PNG/JPEG headers are read ahead only when the budget could bind: when ``workers``
        decodes of the largest image allowed (files.MAX_PIXELS) would exceed it."""
        most = decode_cost(0, image_files.MAX_PIXELS)
        return self.max_memory is not None and self.workers * most > self.max_memory

    def _file_bytes(self, path: Path) -> int:
        return self.stamps.get(self.relative(path), (0, 0))[0]

    def batches(self, indices: list[int], paths: list[Path]) -> list[tuple[int, list[int]]]:
        """``indices`` of ``paths`` grouped by how many may decode at once: (threads, indices),
        threads = how many decodes of the group's costliest file fit in max_memory (1 at least:
        a file over the budget alone still runs, alone, and is counted in ``over_budget``)."""
        groups: dict[int, list[int]] = {}
        for i in indices:
            cost = self.costs.get(paths[i], 0)
            threads = self.workers
            if self.max_memory is not None and cost:
                threads = max(1, min(self.workers, self.max_memory // cost))
                if cost > self.max_memory:
                    self.over_budget.add(paths[i])
            groups.setdefault(threads, []).append(i)
        return sorted(groups.items(), reverse=True)

    def decode(self, paths: list[Path]) -> list[np.ndarray | BaseException]:
        """Decodes files: DICOM in native threads, PNG/JPEG in a thread pool (decoders and the
        native resize release the GIL); the key and size of each PNG/JPEG go to ``facts``."""
        self.decoded += len(paths)
        out: list[np.ndarray | BaseException] = [ValueError("not decoded")] * len(paths)
        dcm = [i for i, p in enumerate(paths) if not _is_image(p)]
        for threads, group in self.batches(dcm, paths):
            kind = "uint8" if self.dtype == np.uint8 else "uint16"
            results = dicom.read_many([paths[i] for i in group], num_threads=threads, on_error="skip",
                                      size=self.size, dtype=kind, frame=0)
            for i, res in zip(group, results):
                if isinstance(res, BaseException):
                    out[i] = res
                elif res.pixels.ndim != 2:
                    out[i] = ValueError(f"not a grey image: shape {res.pixels.shape}")
                else:
                    out[i] = res.pixels
        others = [i for i, p in enumerate(paths) if _is_image(p)]

        def one(i):
            try:
                return _decode_image(paths[i], self.size, self.dtype)
            except Exception as exc:  # OSError, PIL and imagecodecs errors: this file's
                return exc
        for threads, group in self.batches(others, paths):
            with ThreadPoolExecutor(threads) as pool:
                for i, res in zip(group, pool.map(one, group)):
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
        """Decodes the entries straight into the shard file, writes the manifest, then puts the
        shard in place; returns the manifest's records."""
        with atomic.atomic_path(mf.shard_path(self.out, number, self.part)) as tmp:
            shard = ShardFile(tmp, len(entries), self.size, self.dtype)
            records = self._fill(number, entries, shard, bar)
            shard.close()
            mf.write_part(self.out, number, records, self.part)  # before the shard: done only with both
        return records

    def _fill(self, number: int, entries: list[Entry], shard: "ShardFile", bar) -> list[Record]:
        """Decodes the entries chunk by chunk, each image into its slot of ``shard``."""
        records: list[Record] = []

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
                offset = shard.count
                top, left = shard.append(img)
                meta = entry.metas[chosen]
                spacing = meta.get("pixel_spacing") or (None, None)
                src = self.relative(entry.files[chosen])
                row = [number, offset, src, meta.get("sop_instance_uid"), meta.get("study_instance_uid"),
                       meta.get("series_instance_uid"), meta.get("patient_id"), meta.get("view_position"),
                       meta.get("rows"), meta.get("columns"), spacing[0], spacing[1],
                       top, left, img.shape[0], img.shape[1]]
                record(entry.files[chosen], "image", key=entry.key, row=["" if v is None else v for v in row])
                for p in entry.files[chosen + 1:]:
                    record(p, "duplicate", key=entry.key, detail=src)
            self.files_done += sum(len(e.files) for e in chunk)
            bar.update(sum(len(e.files) for e in chunk))
            show_rate(bar, self.files_done, self.started)
        return records


class ShardFile:
    """A shard written in place through ``numpy.lib.format.open_memmap``: each image goes into
    its slot of the file as it is decoded, so a shard is never held in memory (a list of
    canvases and their ``np.stack`` copy doubled it). Sized for every entry; ``close`` shrinks
    it to the images written (the .npy header of any first-axis length has the same size)."""

    def __init__(self, path: Path, capacity: int, size: int, dtype: np.dtype):
        self.path, self.count, self.size, self.dtype = path, 0, size, np.dtype(dtype)
        self.array = np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=(max(capacity, 1), size, size))

    def append(self, img: np.ndarray) -> tuple[int, int]:
        """Centres ``img`` (longer side == size) in the next slot, zeros around; returns (top, left)."""
        slot = self.array[self.count]
        h, w = img.shape
        top, left = (self.size - h) // 2, (self.size - w) // 2
        slot[...] = 0
        slot[top:top + h, left:left + w] = img
        self.count += 1
        return top, left

    def close(self) -> None:
        """Header for ``count`` images, file cut after them (the caller fsyncs and renames)."""
        self.array.flush()
        offset = self.array.offset
        del self.array  # unmaps: nothing else holds a view
        header = io.BytesIO()
        shape = (self.count, self.size, self.size)
        np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": shape})
        if len(header.getvalue()) != offset:  # a numpy without room for the first axis to grow: copy
            data = np.array(np.load(self.path, mmap_mode="r")[:self.count])
            with open(self.path, "wb") as f:
                np.save(f, data)
            return
        with open(self.path, "r+b") as f:
            f.write(header.getvalue())
            f.truncate(offset + self.count * self.size * self.size * self.dtype.itemsize)


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


Part = tuple[int, int]  # (i, N): the i-th of N parts, counted from 0


def parse_part(text: str) -> Part:
    """``i/N`` (0 <= i < N) as a part; anything else is a UsageError naming the value."""
    i, slash, n = text.partition("/")
    try:
        part = (int(i), int(n)) if slash else None
    except ValueError:
        part = None
    if part is None or not 0 <= part[0] < part[1]:
        raise cli.UsageError(f"--part {text}: needs i/N with 0 <= i < N, e.g. 0/4 (SLURM: $SLURM_ARRAY_TASK_ID/4)")
    return part


def env_part(environ=os.environ) -> Part | None:
    """torchrun's RANK and WORLD_SIZE as a part; None when WORLD_SIZE is unset or 1.
    No process group is created: the parts share nothing but the output folder."""
    world = environ.get("WORLD_SIZE", "")
    if world in ("", "1"):
        return None
    return parse_part(f"{environ.get('RANK', '')}/{world}")


def part_slice(files: list, part: Part) -> list:
    """Part i of N: a contiguous run of the sorted list, so the parts' slices in order are the list."""
    i, n = part
    return files[i * len(files) // n:(i + 1) * len(files) // n]


def _tree_digest(files: list[Path], root: Path) -> str:
    """Fingerprint of the whole file list, paths relative to ``root`` (SRC as named): parts that
    saw different trees cannot be merged. Read from the path strings, not ``resolve``d: every
    part hashes every file, and a resolve (an lstat per path component) would cost each part
    about 11 minutes at 10 M files (66 us a file measured here, against under 1 us)."""
    prefix = os.path.join(os.fspath(root), "")
    h = hashlib.sha1()
    for path in files:
        name = os.fspath(path)
        if name.startswith(prefix):
            name = name[len(prefix):]
        h.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def prepare(src: str, out: str, *, size: int = 256, dtype: str = "uint8", labels: str | None = None,
            label_format: str = "auto", uncertain: str = "ones", workers: int | None = None,
            shard_gb: float = 2.0, split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
            overwrite: bool = False, protocol: Protocol | None = None, part: Part | None = None,
            file_list: str | None = None, max_memory: int | None | str = "default") -> dict:
    """Prepares ``src`` into ``out``; returns the meta dict (``notes``: what the label
    protocol left out, e.g. images of other views, counted).

    Every input is checked before anything is written (PrepareError otherwise). A rerun keeps
    finished shards whose source files are unchanged and decodes only the rest; ``overwrite``
    first removes what an earlier run wrote (and nothing else). With ``part`` (i, N) only the
    i-th slice of the sorted files is prepared; the last part to finish merges (:func:`merge`).
    ``file_list`` (one path a line, or a CSV's ``path`` column; relative to ``src``) replaces
    walking ``src``. ``max_memory``: bytes the decodes in flight may take together (estimated
    from each header, ``decode_cost``); "default" is :func:`default_memory`, None no bound."""
    with _as_prepare_error():
        _check_arguments(src, size, dtype, workers, shard_gb, split_fractions, uncertain)
        if max_memory == "default":
            max_memory = default_memory()
        if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Integral)
                                       or max_memory < 1):
            raise PrepareError(f"--max-memory must be a positive number of bytes, got {max_memory!r}")
        if part is not None and overwrite:
            raise PrepareError("--overwrite with --part: parts would delete each other's shards; "
                               "remove OUT once before starting the parts")
        protocol = protocol or Protocol()
        needs_labels = [f"--{k.replace('_', '-')}" for k in ("label_set", "labels_map", "split_files", "test_labels")
                        if getattr(protocol, k)]
        if needs_labels and not labels:
            raise PrepareError(f"{', '.join(needs_labels)}: only with --labels (they shape the label columns)")
        table, notes = cli.label_protocol(labels, label_format, uncertain, protocol=protocol) if labels else (None, [])
        root = Path(src) if Path(src).is_dir() else Path(src).parent
        files = cli.image_files(src, option="", show_walk=True) if file_list is None else _listed(file_list, root, notes)
        if protocol.view:  # before decoding: other views never reach a shard
            files = _views_kept(files, root, table, protocol.view, notes)
    label_names = list(table.names) if table else []
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder")
    settings = {"format_version": FORMAT_VERSION, "size": size, "dtype": dtype, "label_names": label_names,
                "parts": None}  # None == absent: folders of earlier runs pass; parted ones need --part
    if part is not None:  # what every part must agree on, beyond what shapes a shard
        settings.update(parts=part[1], source=str(root.resolve()), labels=str(Path(labels).resolve()) if labels else None,
                        label_format=label_format, uncertain=uncertain, protocol=asdict(protocol),
                        split_fractions=list(split_fractions), shard_gb=shard_gb,
                        files=str(Path(file_list).resolve()) if file_list else None)
        settings = json.loads(json.dumps(settings))  # tuples as lists: compared with what JSON gives back
    if overwrite:
        mf.remove_outputs(out_dir)
    else:
        mf.check_settings(out_dir, settings)

    workers = workers or _default_workers()
    prep = Preparer(out_dir, root, size, dtype, workers, shard_gb, part[0] if part else None, max_memory)
    t0 = time.perf_counter()
    (out_dir / "parts").mkdir(parents=True, exist_ok=True)
    if part is None:
        mf.write_settings(out_dir, settings)  # before any shard: a rerun with other settings is caught
    else:
        mf.claim_settings(out_dir, settings)  # the first part writes them, the others must match
    mine = files if part is None else part_slice(files, part)
    records, stale_images, shards = _decode_all(prep, mine, len(files), write_logs=part is None)
    if prep.over_budget:
        notes.append(f"--max-memory {_mib(max_memory)}: {len(prep.over_budget)} files estimated over it alone "
                     f"(up to {_mib(max(prep.costs[p] for p in prep.over_budget))}) were decoded one at a time")
    if part is not None:
        meta = _finish_part(prep, part, files, mine, records, shards, table, notes, stale_images)
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        return meta

    rows = sorted((r.row for r in records.values() if r.status == "image"), key=lambda row: (int(row[0]), int(row[1])))
    errors = sum(r.status == "error" for r in records.values())
    duplicates = sum(r.status == "duplicate" for r in records.values())
    if not rows:
        _no_images(out_dir, src, errors)
    facts = _row_facts(rows, root, table)
    index_spec = _write_index(out_dir, rows, facts, label_names, split_fractions)
    meta = {"format_version": FORMAT_VERSION, "size": size, "dtype": dtype, "label_names": label_names,
            "shards": [f"{mf.shard_name(n)}.npy" for n in shards], "images": len(rows),
            "images_per_shard": prep.per_shard, "files_seen": len(files), "duplicates": duplicates,
            "errors": errors, "decoded_this_run": prep.decoded, "dropped_this_run": stale_images,
            "split_fractions": list(split_fractions), "source": str(root.resolve()), "notes": notes,
            "index": index_spec}
    atomic.write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    meta["seconds"] = round(time.perf_counter() - t0, 3)
    return meta


def _listed(file_list: str, root: Path, notes: list[str]) -> list[Path]:
    """--files: the listed paths (sorted), repeated lines counted in ``notes``; none is a UsageError."""
    if not Path(file_list).is_file():
        raise PrepareError(f"--files {file_list}: no such file")
    try:
        files, repeated = image_files.read_file_list(file_list, root)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise PrepareError(f"--files {' '.join(str(exc).split())}") from None
    if not files:
        raise PrepareError(f"--files {file_list}: lists no file")
    if repeated:
        notes.append(f"--files {file_list}: {repeated} repeated lines read once")
    return files


def _default_workers() -> int:
    """All cores, shared among torchrun's processes on this node (LOCAL_WORLD_SIZE)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, (os.cpu_count() or 1) // local)


def _decode_all(prep: Preparer, files: list[Path], total: int,
                write_logs: bool) -> tuple[dict[str, Record], int, list[int]]:
    """Decodes what no finished shard of this run's namespace covers; returns the live records of
    ``files``, how many images of earlier runs were dropped, and every shard number, in order."""
    out_dir = prep.out
    current = {prep.relative(p): p for p in files}
    prep.stamps = {s: mf.stamp(p) for s, p in current.items()}
    finished = mf.finished_shards(out_dir, prep.part)
    recorded = mf.read_records(out_dir, finished, prep.part)
    records = mf.live(recorded, prep.stamps)
    stale_images = sum(1 for s, r in recorded.items() if r.status == "image" and s not in records)
    live_keys = {r.key: s for s, r in records.items() if r.status == "image"}
    pending = [p for s, p in current.items() if s not in records]
    entries = prep.entries(pending, live_keys) if pending else []
    chunks = [entries[i:i + prep.per_shard] for i in range(0, len(entries), prep.per_shard)]
    new_numbers = _numbers(finished, len(chunks))
    chunks += [[] for _ in range(len(new_numbers) - len(chunks))]
    prep.files_done, prep.started = 0, time.perf_counter()
    with progress(len(files), len(files) - len(pending), True, "decode", unit="file") as bar:
        for n, chunk in zip(new_numbers, chunks):
            for r in prep.write_shard(n, chunk, bar):
                records[r.source] = r
            if write_logs:
                mf.write_logs(out_dir, records)  # per shard: a killed run keeps the errors of finished shards
    if write_logs:
        mf.write_logs(out_dir, records)
    return records, stale_images, sorted(set(finished) | set(new_numbers))


def _no_images(out_dir: Path, src: str, errors: int) -> None:
    """No index: an earlier one would name images that are gone."""
    for name in ("index.csv", "meta.json"):
        (out_dir / name).unlink(missing_ok=True)
    raise PrepareError(f"no readable images in {src}: {errors} files could not be read "
                       f"(see {out_dir / 'errors.csv'})")


def _write_index(out_dir: Path, rows: list[list], facts: list[list], label_names: list[str],
                 split_fractions: tuple[float, ...]) -> dict:
    """index/ first, index.csv, then (by the caller) meta.json naming both: a reader trusts
    index/ only when meta.json's row count and CSV size match what is on disk."""
    splits = _resolve_splits(facts, split_fractions)
    header = INDEX_COLUMNS + [f"label_{n}" for n in label_names]
    table = [list(r) + [s] + list(f[2]) for r, s, f in zip(rows, splits, facts)]
    index_spec = columnar.write(out_dir, columnar.from_rows(header, table, label_names))
    mf.write_table(out_dir / "index.csv", header, table)
    index_spec["csv_bytes"] = (out_dir / "index.csv").stat().st_size
    return index_spec


def _finish_part(prep: Preparer, part: Part, files: list[Path], mine: list[Path], records: dict[str, Record],
                 shards: list[int], table: LabelTable | None, notes: list[str], stale_images: int) -> dict:
    """Writes this part's marker, then merges when every part has one (under the merge lock)."""
    sources = [prep.relative(p) for p in mine]
    rows = [records[s].row for s in sources if records[s].status == "image"]
    facts = _row_facts(rows, prep.root, table)
    marker = {"part": part[0], "parts": part[1], "tree": _tree_digest(files, prep.named_root),
              "sources": sources, "shards": shards, "facts": {r[2]: f for r, f in zip(rows, facts)},
              "notes": notes, "decoded": prep.decoded, "dropped": stale_images, "images_per_shard": prep.per_shard}
    mf.write_marker(prep.out, part[0], marker)
    with mf.merge_lock(prep.out):  # parts missing, or last run over another tree, are still to come
        waiting = [k for k in range(part[1]) if mf.marker_tree(prep.out, k) != marker["tree"]]
        if not waiting:
            return {**_merge_locked(prep.out), "part": list(part), "part_decoded": prep.decoded}
    return {"part": list(part), "merged": False, "waiting_for": waiting, "images": len(rows),
            "files_seen": len(mine), "part_decoded": prep.decoded, "notes": notes}


def merge(out: str | os.PathLike) -> dict:
    """``python -m cxrfast.prepare merge OUT``: one index.csv, index/ and meta.json from the parts'
    markers and manifests (the source tree is not read). The result is that of a one-process run:
    the same images in the same order; of copies in different parts the first in sorted order
    that decoded is kept, the others become duplicates."""
    out_dir = Path(out)
    if not (out_dir / mf.SETTINGS).is_file():
        raise PrepareError(f"{out}: no {mf.SETTINGS}; not a folder prepared with --part")
    with mf.merge_lock(out_dir):
        return _merge_locked(out_dir)


def _merge_locked(out_dir: Path) -> dict:
    t0 = time.perf_counter()
    settings = json.loads((out_dir / mf.SETTINGS).read_text())
    n = settings.get("parts")
    if not n:
        raise PrepareError(f"{out_dir} was prepared in one process, not with --part: nothing to merge")
    markers = [mf.read_marker(out_dir, k) for k in range(n)]
    waiting = [k for k, m in enumerate(markers) if m is None]
    if waiting:
        raise PrepareError(f"{out_dir}: part(s) {', '.join(f'{k}/{n}' for k in waiting)} not finished; run "
                           f"`python -m cxrfast.prepare SRC {out_dir} --part {waiting[0]}/{n}` (and the others)")
    stale = [k for k, m in enumerate(markers) if m["tree"] != markers[0]["tree"] or m["parts"] != n]
    if stale:
        raise PrepareError(f"{out_dir}: parts {', '.join(f'{k}/{n}' for k in stale)} saw another file list than "
                           f"part 0/{n} (the tree changed between their runs); rerun every part")
    records, order, shard_names, facts = {}, {}, [], {}
    for k, m in enumerate(markers):
        local = mf.read_records(out_dir, m["shards"], k)
        base = {num: len(shard_names) + i for i, num in enumerate(m["shards"])}
        shard_names += [f"{mf.shard_name(num, k)}.npy" for num in m["shards"]]
        for s in m["sources"]:
            if s not in local:
                raise PrepareError(f"{mf.marker_path(out_dir, k)}: {s} is in no shard of part {k}/{n}; rerun that part")
            r = local[s]
            if r.row is not None:
                r.row = [base[int(r.row[0])]] + list(r.row[1:])
            records[s], order[s] = r, len(order)
        facts.update(m["facts"])
    first = _keep_first_copies(records, order)
    images = sorted((s for s, r in records.items() if r.status == "image"), key=lambda s: (first[records[s].key], order[s]))
    errors = sum(r.status == "error" for r in records.values())
    duplicates = sum(r.status == "duplicate" for r in records.values())
    mf.write_logs(out_dir, records)
    if not images:
        _no_images(out_dir, settings["source"], errors)
    rows = [records[s].row for s in images]
    index_spec = _write_index(out_dir, rows, [facts[s] for s in images], settings["label_names"],
                              tuple(settings["split_fractions"]))
    meta = {"format_version": FORMAT_VERSION, "size": settings["size"], "dtype": settings["dtype"],
            "label_names": settings["label_names"], "shards": shard_names, "images": len(rows),
            "images_per_shard": markers[0]["images_per_shard"], "files_seen": len(order), "duplicates": duplicates,
            "errors": errors, "decoded_this_run": sum(m["decoded"] for m in markers),
            "dropped_this_run": sum(m["dropped"] for m in markers), "split_fractions": settings["split_fractions"],
            "source": settings["source"], "notes": markers[0]["notes"], "index": index_spec, "parts": n}
    atomic.write_text(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    meta["seconds"], meta["merged"] = round(time.perf_counter() - t0, 3), True
    return meta


def _keep_first_copies(records: dict[str, Record], order: dict[str, int]) -> dict[str, int]:
    """Copies kept as images by different parts: the first in sorted order stays, the others
    become duplicates of it (in place). Returns each key's first position among all its files
    (errors included), where a one-process run places that key's image in the index."""
    first: dict[str, int] = {}
    kept: dict[str, str] = {}
    for s in sorted(records, key=order.__getitem__):
        r = records[s]
        if r.key:
            first.setdefault(r.key, order[s])
        if r.status == "image":
            kept.setdefault(r.key, s)
    for s, r in records.items():
        if r.status == "image" and kept[r.key] != s:
            records[s] = Record(s, "duplicate", r.stamp, r.key, detail=kept[r.key])
        elif r.status == "duplicate" and r.key in kept:
            r.detail = kept[r.key]
    return first


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


def _row_facts(rows: list[list], root: Path, table: LabelTable | None) -> list[list]:
    """[patient, split the label CSV gives (or None), label cells] of each index row: what the
    label CSV says of it, looked up where the image was decoded (a merge never reads the CSV)."""
    facts = []
    index = table.lookup() if table is not None else {}
    for r in rows:
        patient, given, cells = r[6] or r[2], None, []
        if table is not None:
            row = next((index[key] for key in file_keys(root.resolve() / r[2], root.resolve()) if key in index), None)
            values = table.labels[row] if row is not None else np.full(len(table.names), np.nan)
            cells = ["" if math.isnan(v) else int(v) if float(v).is_integer() else float(v) for v in values]
            given = table.splits[row] if row is not None and table.splits else None
            if not r[6] and row is not None and table.patients and table.patients[row]:
                patient = table.patients[row]  # no Patient ID in the file (PNG, JPEG): the CSV's
        facts.append([patient, given, cells])
    return facts


def _resolve_splits(facts: list[list], split_fractions: tuple[float, ...]) -> list[str]:
    """Patient-level splits, or the label CSV's own: all of them when every row has one, else
    per row where given (the split of the whole index, so a merge decides it, not a part)."""
    patients, given = [f[0] for f in facts], [f[1] for f in facts]
    if given and all(given):
        return resolve_splits(given, patients, split_fractions)
    by_patient = patient_split(patients, tuple(split_fractions))  # a row with its own split keeps it
    return [split_name(g) or s for g, s in zip(given, by_patient)]


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"needs three numbers like 0.7,0.1,0.2, got {text!r}")
    return values  # type: ignore[return-value]


def _main_merge(argv: list[str]) -> None:
    parser = cli.Parser(prog="python -m cxrfast.prepare merge",
                        description="Assemble index.csv, index/ and meta.json from the parts of OUT (--part i/N).")
    parser.add_argument("out", help="the output folder the parts wrote into")
    args = parser.parse_args(argv)
    try:
        meta = merge(args.out)
    except PrepareError as exc:
        cli.fail(str(exc))
    _print_summary(meta, args.out)


def _print_summary(meta: dict, out: str) -> None:
    for note in meta["notes"]:
        print(note)
    if not meta.get("merged", True):
        i, n = meta["part"]
        print(f"part {i}/{n}: {meta['images']} images from {meta['files_seen']} files under {out} "
              f"({meta['seconds']:.1f} s); waiting for part(s) {', '.join(f'{k}/{n}' for k in meta['waiting_for'])}, "
              f"the last to finish merges (or run `python -m cxrfast.prepare merge {out}`)")
        return
    rate = meta["files_seen"] / meta["seconds"] if meta["seconds"] else 0
    dropped = f"; {meta['dropped_this_run']} removed or changed since the last run" if meta["dropped_this_run"] else ""
    timing = f"{meta['seconds']:.1f} s, {rate:.0f} files/s"
    if meta.get("parts"):  # this process's time only: files/s would count the other parts' files
        timing = f"merged from {meta['parts']} parts, {meta['seconds']:.1f} s"
    print(f"prepared {meta['images']} images into {len(meta['shards'])} shards under {out} "
          f"({timing}); {meta['duplicates']} duplicates, "
          f"{meta['errors']} unreadable (see errors.csv){dropped}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"] and len(argv) >= 2:  # a source folder named merge: write ./merge
        return _main_merge(argv[1:])
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
    parser.add_argument("--files", help="the files to prepare, instead of walking SRC: a text file with one path "
                        "a line or a CSV with a 'path' column, relative paths under SRC "
                        "(e.g. from `find SRC -type f -printf '%%P\\n'`)")
    parser.add_argument("--part", help="prepare only part i of N (0 <= i < N) of the sorted files, e.g. "
                        "$SLURM_ARRAY_TASK_ID/8; under torchrun RANK/WORLD_SIZE are used. The last part to finish "
                        "merges the index (or: python -m cxrfast.prepare merge OUT)")
    parser.add_argument("--max-memory", "--max_memory", dest="max_memory",
                        help="bound the memory of the decodes in flight, e.g. 4GB (K/M/G = powers of 1024); "
                             "each file's cost is estimated from its header (file size + 4 bytes a pixel) and "
                             "fewer files decode at once where needed; default: half of RAM, shared among "
                             "torchrun's processes on a node")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild OUT: first remove what an earlier prepare wrote there (shards, parts/, "
                             "index.csv, meta.json, errors.csv, duplicates.csv), nothing else")
    args = parser.parse_args(argv)
    try:
        part = parse_part(args.part) if args.part is not None else env_part()
        max_memory = parse_memory(args.max_memory) if args.max_memory is not None else "default"
        meta = prepare(args.src, args.out, size=args.size, dtype=args.dtype, labels=args.labels,
                       label_format=args.label_format, uncertain=args.uncertain, workers=args.workers,
                       shard_gb=args.shard_gb, split_fractions=args.split_fractions, overwrite=args.overwrite,
                       protocol=Protocol(args.label_set, args.labels_map, args.split_files, args.test_labels,
                                         args.view, args.rad_vote), part=part, file_list=args.files,
                       max_memory=max_memory)
    except (PrepareError, cli.UsageError) as exc:
        cli.fail(str(exc))
    _print_summary(meta, args.out)

if __name__ == "__main__":
    main()
