"""Finding image files and decoding one (DICOM, PNG, JPEG) as a grey image, dense tissue bright.

PNG and JPEG take the same road as DICOM: integer samples (uint8/uint16, never a float32 copy
of the full image) go straight into the native antialiased resize (``_dicom.resize``, the
crop-resize kernel, GIL released), and only what the target size needs is decoded:

- JPEG: libjpeg-turbo's scaled IDCT decodes at 1/2, 1/4 or 1/8 scale (Pillow's ``Image.draft``)
  when that still leaves ``JPEG_MARGIN`` times the target size, and the resize does the rest.
  Not bit-identical to a full decode + the same resize. Measured on synthetic radiographs
  with sharp lung edges, quality 90 and 95: MIMIC size (3000x2500) to 224-1024 at most 2
  8-bit levels (mean 0.10-0.14); 1200x1000 to 64-300 at most 4 levels (mean <= 0.26, the
  worst where the remainder is a 2x resize). ``JPEG_TOLERANCE`` (4) and
  ``JPEG_MEAN_TOLERANCE`` (0.3) are the bounds tests/test_files.py holds. Without the margin (1/8 scale for 256 from 3000: each 8x8 block
  becomes its mean, a box filter on top of the triangle) the same images differed by up to
  24 levels at those edges (mean 0.5), for about 25% less decode time: not worth it.
- PNG: plain 8 and 16-bit greyscale (not interlaced, no tRNS) take the split path: the IDAT
  chunks are inflated by libdeflate (imagecodecs ``deflate_decode``; zlib-ng, then the standard
  library's zlib where it is missing) and the row filters undone natively
  (``_dicom.png_unfilter``, csrc/png_unfilter.cpp, GIL released). Inflating is most of a PNG's
  time, and libdeflate does it in less than half of zlib's: a 1024x1024 8-bit NIH PNG decodes in
  3.6 ms against 9.4 (Pillow), 9.6 (spng) and 10.1 ms (libpng); a 2048x2048 16-bit one in 42 ms
  against 79 (libpng) and 107 ms (Pillow). The samples are exactly Pillow's. A stream that does
  not inflate (bad data, more data than the image plus ``_INFLATE_SLACK``), and every plain grey
  PNG with a native module built before png_unfilter, goes to ``PNG_DECODERS``; the other PNGs
  (palette, RGB, alpha, 1-4 bit, interlaced, tRNS) through Pillow's conversion to 8-bit grey.
  Either way the integers are resized natively: exactly full decode + the same resize.

The white level of a 16-bit greyscale PNG is 2**bits - 1 for its real bit depth
(``png_bit_depth``): the sBIT chunk where it has one (1-16 significant bits), otherwise 12
when every value fits in 12 bits, else 16. PadChest's 12-bit values in 16-bit PNGs then span
[0, 1] instead of [0, 1/16]. Only 12 and 16 are guessed because those are the depths 16-bit
chest PNGs come in; rounding the largest value up to 10 or 14 bits as well would turn a dark
full-range image (largest value 13600 of 65535) into a bright one. 8-bit images use 255.
"""
from __future__ import annotations

import csv
import io
import os
import re
import struct
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import _dicom, dicom

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}
JPEG_SCALES = (8, 4, 2)  # libjpeg's DCT-domain reductions, largest first
JPEG_MARGIN = 2  # a scaled JPEG decode keeps at least this many times the target's longer side
JPEG_TOLERANCE = 4  # max abs difference (8-bit levels) of scaled vs full decode, both resized
JPEG_MEAN_TOLERANCE = 0.3  # mean abs difference, 8-bit levels
WALK_THREADS = 8  # folders listed at once on network storage (see walk_threads)
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "glusterfs", "ceph",
                       "9p", "afs", "panfs", "wekafs", "orangefs", "davfs"}
MAX_PIXELS = 1 << 28  # a PNG/JPEG header announcing more is refused before any decode
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_DEPTHS = (12, 16)  # the depths guessed for a 16-bit PNG without sBIT


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


def find_images(source: str | os.PathLike, threads: int | None = None,
                on_found: Callable[[int], None] | None = None) -> list[Path]:
    """Image files under a folder (DICOM, PNG, JPEG), or the ``path`` column of a CSV
    (relative paths resolve against the CSV's folder), sorted for reproducibility.
    A folder is walked by ``threads`` threads (default :func:`walk_threads`: a pool on network
    storage, one thread on a local disk; see :func:`walk_images`); ``on_found`` is told how
    many images each folder held, as the walk goes (for a progress bar)."""
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
    return sorted(walk_images(source, walk_threads(source) if threads is None else threads, on_found))


def walk_threads(folder: str | os.PathLike, mounts: str | None = None) -> int:
    """Threads for walking ``folder``: ``WALK_THREADS`` on a network filesystem (see
    ``NETWORK_FILESYSTEMS``; FUSE ones too), 1 elsewhere. On a local disk a listing takes
    microseconds and the per-entry Python work holds the GIL, so threads only contend for it
    (bench/test_bench_prepare.py: slower than one thread). ``mounts``: /proc/mounts' text."""
    kind = filesystem(folder, mounts)
    return WALK_THREADS if kind in NETWORK_FILESYSTEMS or kind.startswith("fuse.") else 1


def filesystem(folder: str | os.PathLike, mounts: str | None = None) -> str:
    """The filesystem type (``nfs4``, ``ext4``, ...) of the mount holding ``folder``, from
    /proc/mounts (or ``mounts``, its text); "" where it cannot be read (not Linux)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return ""
    target = os.path.realpath(folder)
    best, kind = "", ""
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])  # "\040" is a space
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):  # the deepest mount point wins; a later equal one covers it
            best, kind = point, fields[2]
    return kind


def walk_images(folder: str | os.PathLike, threads: int = 1,
                on_found: Callable[[int], None] | None = None) -> list[Path]:
    """The image files under ``folder``, in no particular order: what ``os.walk`` finds (an
    unreadable folder skipped whole, symlinked folders not entered, files of any name, hidden
    too, kept when ``_is_image_entry`` says so). With ``threads`` > 1 the folders are listed
    by a pool of that many threads, breadth-first: on network storage every listing and every
    DICOM preamble read waits on the server, and ``os.scandir`` and ``open`` release the GIL
    while they wait, so the waits overlap. On a local disk the gain is small (bench/).
    ``on_found(n)``: called from this thread with each listed folder's count of images."""
    top = os.fspath(folder)
    if threads <= 1:
        found, todo = [], [top]
        while todo:
            images, subfolders = _scan_folder(todo.pop())
            found += images
            todo += subfolders
            if on_found is not None and images:
                on_found(len(images))
        return found
    found = []
    with ThreadPoolExecutor(threads) as pool:
        pending = {pool.submit(_scan_folder, top)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                images, subfolders = fut.result()
                found += images
                if on_found is not None and images:
                    on_found(len(images))
                pending.update(pool.submit(_scan_folder, s) for s in subfolders)
    return found


def _scan_folder(folder: str) -> tuple[list[Path], list[str]]:
    """(image files, subfolders to enter) of one folder, as ``os.walk`` sees it: a folder that
    cannot be listed yields nothing (os.walk's default, no onerror); an entry whose type cannot
    be read is a file; a symlink to a folder is not entered (followlinks=False)."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        return [], []
    images, subfolders = [], []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            if _is_image_entry(entry.name, entry.path):
                images.append(Path(entry.path))  # only kept files become Paths: parsing one costs more than the test
        elif not entry.is_symlink():
            subfolders.append(entry.path)
    return images, subfolders


_KNOWN_SUFFIXES = IMAGE_SUFFIXES | {".dcm", ".dicom"}


def _suffix(name: str) -> str:
    """``Path(name).suffix`` of a file name, without building a Path (the walk's hot loop)."""
    i = name.rfind(".")
    return name[i:] if 0 < i < len(name) - 1 else ""


def _is_image_entry(name: str, path: str) -> bool:
    """``_is_dicom`` or a PNG/JPEG extension, on the strings of a folder entry: DICOM, PNG and
    JPEG by extension, any other file by the DICOM preamble (PS3.10 7.1: b"DICM" at 128)."""
    if _suffix(name).lower() in _KNOWN_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def read_file_list(listing: str | os.PathLike, root: str | os.PathLike) -> tuple[list[Path], int]:
    """The files named by ``listing`` instead of a walk (on network storage, walking 10 M files
    takes hours): one path a line, or a ``.csv`` with a ``path`` column; relative paths resolve
    against ``root``. Sorted as :func:`find_images` sorts, a repeated path kept once; returns
    (files, how many repeated lines were dropped). Paths are not checked here: a missing
    file is an unreadable file of the run, counted in errors.csv."""
    listing, root = Path(listing), Path(root)
    if listing.suffix.lower() == ".csv":
        with open(listing, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{listing}: no 'path' column (columns: {reader.fieldnames})")
            names = [r["path"] or "" for r in reader]
    else:
        with open(listing, encoding="utf-8") as f:
            names = [line.rstrip("\r\n") for line in f]
    paths = [p if p.is_absolute() else root / p for p in (Path(n.strip()) for n in names if n.strip())]
    unique = sorted(set(paths))
    return unique, len(paths) - len(unique)


@dataclass
class Decoded:
    """A decoded PNG/JPEG: ``pixels`` (H, W) uint8 or uint16, possibly at a reduced scale
    (JPEG), ``white`` the sample value of full brightness, ``original`` the file's (rows, columns)."""

    pixels: np.ndarray
    white: int
    original: tuple[int, int]


def target_shape(rows: int, columns: int, size: int) -> tuple[int, int]:
    """(rows, columns) with the longer side == size, aspect kept; rounded as the DICOM path does."""
    return dicom.resized_shape(rows, columns, size)


@dataclass
class PngLayout:
    """What the fast PNG path needs from the chunks (PNG spec 5.3, 11.2): IHDR's fields, the
    sBIT grey bits, whether a tRNS chunk is present, and the IDAT payloads in order."""

    rows: int
    columns: int
    depth: int
    colour: int
    interlace: int
    significant: int | None
    transparency: bool
    idat: list[memoryview]

    @property
    def plain_grey(self) -> bool:
        """8/16-bit greyscale, not interlaced, no tRNS: what png_unfilter decodes."""
        return self.colour == 0 and self.depth in (8, 16) and self.interlace == 0 and not self.transparency


def png_layout(data: bytes, source: str = "PNG") -> PngLayout:
    """The chunks of a PNG up to IEND (CRCs are not checked: zlib's Adler-32 covers the image
    data). A chunk running past the end of the file is a ValueError naming ``source``."""
    view = memoryview(data)
    facts = {"rows": -1, "columns": -1, "depth": -1, "colour": -1, "interlace": 0,
             "significant": None, "transparency": False}
    idat: list[memoryview] = []
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            break
        if pos + 12 + length > len(data):
            raise ValueError(f"{source}: PNG chunk {kind!r} at byte {pos} runs past the end of the file (truncated)")
        payload = view[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IHDR" and length >= 13:
            (facts["columns"], facts["rows"], facts["depth"], facts["colour"],
             facts["interlace"]) = struct.unpack_from(">IIBB2xB", payload)
        elif kind == b"sBIT" and length and facts["colour"] in (0, 4):
            facts["significant"] = payload[0]
        elif kind == b"tRNS":
            facts["transparency"] = True
        pos += 12 + length
    if facts["rows"] < 0:
        raise ValueError(f"{source}: not a PNG: no IHDR chunk")
    return PngLayout(idat=idat, **facts)


def png_bit_depth(pixels: np.ndarray, significant: int | None) -> int:
    """The real bit depth of 16-bit greyscale samples: sBIT when it is 1-16, otherwise 12
    when the largest value fits in 12 bits, else 16."""
    if significant is not None and 1 <= significant <= 16:
        return significant
    used = int(pixels.max(initial=0)).bit_length()
    return next(d for d in _DEPTHS if d >= used)


def _png_fast(data: bytes, depth: int) -> np.ndarray:
    """8/16-bit greyscale PNG samples with PNG_DECODERS[depth] (native-endian uint8/uint16)."""
    import imagecodecs

    return getattr(imagecodecs, PNG_DECODERS[depth])(data)


def _inflater(codecs: tuple[str, ...] = ("DEFLATE", "ZLIBNG")):
    """The fastest zlib decoder at hand, as f(stream, out_size) -> at most out_size bytes: the
    first available of imagecodecs' ``codecs`` (libdeflate, zlib-ng), else the standard library's zlib."""
    try:
        import imagecodecs
    except ImportError:
        imagecodecs = None
    for codec in codecs:
        if imagecodecs is not None and getattr(getattr(imagecodecs, codec, None), "available", False):
            decode = getattr(imagecodecs, f"{codec.lower()}_decode")
            return lambda stream, size: decode(stream, out=size)
    import zlib

    return lambda stream, size: zlib.decompressobj().decompress(stream, size)


def _png_split(layout: PngLayout, source: str) -> np.ndarray | None:
    """Plain greyscale samples by inflating the IDAT stream (``_inflater``) and undoing the
    row filters natively (``_dicom.png_unfilter``); None when the inflater fails (more data
    than the image, a bad stream): the caller then tries a full decoder."""
    row_bytes = layout.columns * (layout.depth // 8)
    need = layout.rows * (row_bytes + 1)
    stream = layout.idat[0] if len(layout.idat) == 1 else b"".join(layout.idat)
    if need > _DEFLATE_RATIO * len(stream) + 64:  # checked before allocating what a header announces
        raise ValueError(f"{source}: PNG image data is {len(stream)} compressed bytes, too few for "
                         f"{layout.rows}x{layout.columns} {layout.depth}-bit: truncated")
    try:
        raw = _INFLATE(stream, need + _INFLATE_SLACK)
    except Exception:  # imagecodecs DeflateError/ZlibngError, zlib.error: bad or extra data
        return None
    if len(raw) < need:
        raise ValueError(f"{source}: PNG image data inflates to {len(raw)} bytes, {layout.rows}x{layout.columns} "
                         f"{layout.depth}-bit needs {need}: truncated or corrupt")
    try:
        return _dicom.png_unfilter(raw, layout.rows, layout.columns, layout.depth)
    except _dicom.NativeError as exc:
        raise ValueError(f"{source}: {exc.args[-1]}") from None


def _pillow_grey(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # "I": 16-bit grey in older Pillow
            return np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
        return np.asarray(im.convert("L"))


def _png_whole(data: bytes, layout: PngLayout) -> np.ndarray:
    """A full PNG decoder: PNG_DECODERS for plain greyscale, Pillow's conversion to grey for
    the rest (palette, colour, alpha, 1-4 bit, interlaced, tRNS) or without imagecodecs."""
    if layout.plain_grey:
        try:
            return _png_fast(data, layout.depth)
        except (ImportError, AttributeError):  # no imagecodecs, or one built without the codec
            pass
    return _pillow_grey(data)


def _decode_png(data: bytes, source: str) -> Decoded:
    layout = png_layout(data, source)
    rows, columns = layout.rows, layout.columns
    _check_pixels(rows, columns)
    split = layout.plain_grey and _SPLIT
    pixels = _png_split(layout, source) if split else None
    if pixels is None:
        try:
            pixels = _png_whole(data, layout)
        except Exception as exc:  # a stream the split path could not inflate either
            if not split:
                raise
            raise ValueError(f"{source}: PNG image data cannot be inflated ({exc}): truncated or corrupt") from exc
    if pixels.ndim != 2 or pixels.shape != (rows, columns):
        raise ValueError(f"{source}: PNG decoded to shape {pixels.shape}, header says {(rows, columns)}")
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8 if pixels.itemsize == 1 else np.uint16)  # native order
    white = 255 if pixels.dtype == np.uint8 else (1 << png_bit_depth(pixels, layout.significant)) - 1
    return Decoded(pixels, white, (rows, columns))


def jpeg_scale(rows: int, columns: int, size: int | None) -> int:
    """The DCT-domain reduction (1, 2, 4 or 8) that leaves the longer side at least
    ``JPEG_MARGIN * size`` (1 when ``size`` is None: full resolution)."""
    if size is None:
        return 1
    return next((k for k in JPEG_SCALES if max(rows, columns) // k >= JPEG_MARGIN * size), 1)


def _decode_jpeg(data: bytes, size: int | None) -> Decoded:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        columns, rows = im.size
        _check_pixels(rows, columns)
        k = jpeg_scale(rows, columns, size)
        if k > 1:
            im.draft("L", (columns // k, rows // k))  # Pillow then picks exactly 1/k
        pixels = np.asarray(im if im.mode == "L" else im.convert("L"))
    return Decoded(pixels, 255, (rows, columns))


def _check_pixels(rows: int, columns: int) -> None:
    if rows < 1 or columns < 1 or rows * columns > MAX_PIXELS:
        raise ValueError(f"image header announces {rows}x{columns} pixels (at most {MAX_PIXELS} allowed)")


def decode(data: bytes, size: int | None = None, source: str = "image") -> Decoded:
    """Decodes PNG or JPEG bytes (told apart by their signature) to integer grey samples;
    a JPEG at the DCT-domain scale ``size`` allows (see ``jpeg_scale``). ``source`` (the file
    name) opens the messages of malformed PNG data."""
    if data.startswith(_PNG_SIGNATURE):
        return _decode_png(data, source)
    if data.startswith(b"\xff\xd8"):
        return _decode_jpeg(data, size)
    from PIL import Image  # anything else Pillow can read, at full scale

    with Image.open(io.BytesIO(data)) as im:
        columns, rows = im.size
        _check_pixels(rows, columns)
        pixels = np.asarray(im.convert("L"))
    return Decoded(pixels, 255, (rows, columns))


def resize(pixels: np.ndarray, shape: tuple[int, int], white: float) -> np.ndarray:
    """(rows, columns) float32 in [0, 1]: ``pixels`` (uint8/uint16/float32) / ``white`` through
    the native antialiased resize (the crop-resize kernel; the GIL is released)."""
    pixels = np.ascontiguousarray(pixels, pixels.dtype.newbyteorder("="))  # the kernel reads native order
    out = _dicom.resize([pixels], np.array([shape], np.int64), 1.0 / white, 0.0, 1)[0]
    return np.clip(out, 0.0, 1.0, out=out)


def decoded_image(decoded: Decoded, size: int | None) -> np.ndarray:
    """A decoded image as float32 in [0, 1], the longer side resized to ``size`` (None: as is)."""
    shape = target_shape(*decoded.original, size) if size is not None else decoded.original
    if shape == decoded.pixels.shape:
        return decoded.pixels.astype(np.float32) / np.float32(decoded.white)
    return resize(decoded.pixels, shape, decoded.white)


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """A 2-D float32 image in [0, 1], dense tissue bright; the longer side resized to ``size``.

    DICOM goes through cxrfast.dicom's display pipeline (VOI, MONOCHROME1); PNG/JPEG through
    ``decode`` (scaled JPEG decode, white level by real bit depth) and the native resize.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        img = dicom.read(path, dtype="float32", size=size, frame=0).pixels  # frame 0 also of multi-frame files
        return img if img.ndim == 2 else img.mean(axis=-1)
    return decoded_image(decode(path.read_bytes(), size, str(path)), size)


# The full decoders for plain greyscale when the split path cannot be used: imagecodecs', the
# fastest measured on 1024x1024 greyscale (bench/test_bench_images.py test_png_decoder): 8-bit
# spng 8.5 ms, libpng 9.4 ms, Pillow 10.8 ms; 16-bit libpng 22 ms, Pillow 23 ms (its spng
# binding refuses 16-bit grey).
PNG_DECODERS = {8: "spng_decode", 16: "png_decode"}
_INFLATE = _inflater()
_DEFLATE_RATIO = 1032  # deflate's largest expansion: 258 bytes from a 2-bit code, about 1032:1
_INFLATE_SLACK = 4096  # inflated bytes past the image that are ignored, as Pillow and libpng do
_SPLIT = hasattr(_dicom, "png_unfilter")  # False with a native module built before it
