"""Read chest X-ray DICOM files fast: parse, decode and render in native code.

The native module (``cxrfast._dicom``, C++ in ``csrc/``) parses DICOM Part 10, decodes
native, RLE and JPEG lossless pixel data, and applies the display pipeline of PS3.3 C.11
(Modality LUT -> VOI -> MONOCHROME1 inversion) and an antialiased resize in one pass, with
the GIL released. Frames in other codecs (JPEG DCT, JPEG-LS, JPEG 2000, HTJ2K) are decoded by
imagecodecs (``cxrfast.codecs``) and rendered by the same native pipeline. A JPEG 2000
frame read for a resized display with a VOI window is decoded at the smallest resolution
level that keeps >= 2x the target (glymur, when it has a libopenjp2), then resized.

Output modes:
  ``"stored"``   stored values masked to Bits Stored and sign-extended (int dtype of the file);
  ``"modality"`` after the Modality LUT (rescale or LUT sequence), float32;
  ``"display"``  after VOI and MONOCHROME1 / Presentation LUT INVERSE, so dense tissue is
                 bright; uint8 (default), uint16, or float32 in [0, 1].
"""
from __future__ import annotations

import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Union

import numpy as np

from . import _dicom
from .codecs import SIZE_CHECKED, check_frame, decode_frame, jpeg2000_reduce
from .errors import (  # noqa: F401  (re-exported: the hierarchy lives at cxrfast.dicom)
    CorruptCodestreamError,
    DicomError,
    DicomReadError,
    InvalidDicomError,
    MissingCodecError,
    NoPixelDataError,
    TruncatedError,
    UnsupportedFeatureError,
    UnsupportedTransferSyntaxError,
    from_native,
    translate,
    translated,
)

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]
Size = Union[int, tuple[int, int], None]

OUTPUTS = ("stored", "modality", "display")
DTYPES = ("uint8", "uint16", "float32")


@dataclass
class DicomImage:
    """Decoded pixels and the header attributes that matter for CXR.

    ``pixels`` is (rows, cols), (frames, rows, cols) for all frames of a multi-frame file,
    with a trailing samples axis for colour; ``meta`` is the dict of :func:`read_header`.
    """

    pixels: np.ndarray
    meta: dict[str, Any]


@dataclass
class EncapsulatedFrames:
    """Compressed frame bitstreams (memoryviews into the file bytes where possible)."""

    frames: list[memoryview]
    codec: str
    meta: dict[str, Any]


def _name(src: Source) -> str:
    return os.fspath(src) if isinstance(src, (str, os.PathLike)) else "<bytes>"


def _parse(src: Source, header_only: bool, name: str | None = None):
    with translated(name or _name(src)):
        if isinstance(src, (str, os.PathLike)):
            return _dicom.parse_file(os.fspath(src), header_only)
        return _dicom.parse(src, header_only)


def _size_args(size: Size) -> tuple[int, int, int]:
    if size is None:
        return 0, 0, 0
    if isinstance(size, (int, np.integer)):
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        return int(size), 0, 0
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return 0, int(h), int(w)


def _check(output: str, dtype: str | None) -> str:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype is not None and output != "display":
        raise ValueError("dtype applies to output='display' only")
    return dtype or ""


def read(
    src: Source,
    *,
    output: str = "display",
    frame: int | None = None,
    size: Size = None,
    dtype: str | None = None,
    threads: int = 1,
) -> DicomImage:
    """Reads one DICOM file (a path or its bytes) into pixels and metadata.

    ``frame`` picks one frame (default: all, squeezed for single-frame files); ``size`` is
    an int (the longer side becomes ``size``, aspect preserved) or an exact ``(rows, cols)``;
    the resize is antialiased and happens in the same native pass as the display pipeline.
    ``threads=2`` cuts the latency of one large JPEG lossless frame (1 MP and up): a second
    thread decodes its second half speculatively, the output always that of one thread; for
    many files, :func:`read_many` spreads the files over threads instead.
    Raises a :class:`DicomError` subclass naming the file on any problem.
    """
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    dt = _check(output, dtype)
    longest, sh, sw = _size_args(size)
    if frame is not None and frame < 0:
        raise ValueError(f"frame must be >= 0, got {frame}")
    parsed = _parse(src, header_only=False)
    meta = parsed.header
    with translated(_name(src)):
        try:
            return DicomImage(parsed.decode(output, -1 if frame is None else frame, dt, longest, sh, sw, int(threads)), meta)
        except _dicom.NativeError as exc:
            if exc.args[:1] != ("needs_codec",):
                raise
    return DicomImage(_decode_with_library(src, parsed, meta, output, frame, dt, longest, sh, sw), meta)


def _frames_of(src: Source, parsed) -> list[memoryview]:
    """Frame bitstreams: views into ``src`` when it is bytes, copies of the frames (not of
    the file) when cxrfast read the file itself."""
    buffer = None if isinstance(src, (str, os.PathLike)) else memoryview(src).cast("B")
    out = []
    for span in parsed.frame_spans():
        if isinstance(span, tuple):
            offset, length = span
            out.append(buffer[offset : offset + length])
        else:
            out.append(memoryview(span))
    return out


def _decode_with_library(src, parsed, meta, output, frame, dt, longest, sh, sw) -> np.ndarray:
    name = _name(src)
    with translated(name):
        frames = _frames_of(src, parsed)
    nframes = len(frames)
    if frame is not None and frame >= nframes:
        raise InvalidDicomError(name, f"frame {frame} out of range ({nframes} frames)")
    wanted = range(nframes) if frame is None else [frame]
    codec = meta["codec"]
    shape = (meta["rows"], meta["columns"], meta["samples_per_pixel"])
    target = _target_shape(meta["rows"], meta["columns"], longest, sh, sw)
    level = 0
    # A smaller decode only where it is the same picture: a resized display whose window
    # does not come from the image's own min/max (which a reduced image narrows).
    if codec == "jpeg2000" and output == "display" and target is not None and not parsed.needs_range():
        levels = []
        for i in wanted:  # one level for all frames, so that they stack
            with translated(name, f"{codec} frame {i}"):
                check_frame(codec, frames[i], shape)  # the declared SIZ size, before anything else
                levels.append(jpeg2000_reduce(frames[i], target))
        level = min(levels)
        if level:
            sh, sw, longest = target[0], target[1], 0  # the output size of the full-resolution image
    decoded = []
    for i in wanted:
        with translated(name, f"{codec} frame {i}"):  # checks the declared size, then decodes
            decoded.append(decode_frame(codec, frames[i], meta["photometric"], header_shape=shape, level=level))
    with translated(name, f"{codec} frames"):
        stored = np.stack(decoded)
        if stored.dtype.kind == "b":
            stored = stored.astype(np.uint8)
    if stored.dtype.itemsize not in (1, 2, 4):
        raise UnsupportedFeatureError(name, f"{codec} decoded to {stored.dtype}")
    if level == 0 and stored.shape[1:3] != (meta["rows"], meta["columns"]):
        raise CorruptCodestreamError(
            name, f"{codec} frame is {stored.shape[2]}x{stored.shape[1]}, header says "
            f"{meta['columns']}x{meta['rows']}"
        )
    with translated(name):
        pixels = parsed.render(stored, output, dt, longest, sh, sw)
    if frame is not None or nframes == 1:
        pixels = pixels[0]
    return pixels


def _target_shape(rows: int, columns: int, longest: int, sh: int, sw: int) -> tuple[int, int] | None:
    """(rows, cols) of a resized output, computed as the native render does; None: no resize."""
    if sh > 0 and sw > 0:
        return sh, sw
    if longest > 0:
        return resized_shape(rows, columns, longest)
    return None


def resized_shape(rows: int, columns: int, longest: int) -> tuple[int, int]:
    """(rows, cols) with the longer side == ``longest``, aspect kept, rounded as the native
    render rounds them (the one place Python computes it: the image files path uses it too)."""
    s = longest / max(rows, columns, 1)
    return max(1, _round_half_away(rows * s)), max(1, _round_half_away(columns * s))


def _round_half_away(x: float) -> int:
    """C's lround: halves round away from zero (Python's round goes to even)."""
    return int(x + 0.5)


def read_header(src: Source) -> dict[str, Any]:
    """Reads the header only (parsing stops at Pixel Data) and returns its attributes."""
    return _parse(src, header_only=True).header


def encapsulated_frames(src: Source) -> EncapsulatedFrames:
    """Returns the compressed bitstream of every frame and the codec name, for GPU decoders.

    Frames that are one fragment are zero-copy memoryviews into the file bytes; frames of
    several fragments (or of a deflated data set) are joined copies. Codec names:
    ``rle, jpeg_lossless, jpeg_baseline, jpeg_extended, jpegls, jpeg2000, htj2k``.
    Every JPEG-family frame's declared size is checked against the header first (as before
    a library decode), so a GPU decoder never allocates what only the codestream claims.
    """
    name = _name(src)
    if isinstance(src, (str, os.PathLike)):  # read once here, so the frames can be views of it
        with translated(name):
            with open(src, "rb") as f:
                src = f.read()
    parsed = _parse(src, header_only=False, name=name)
    meta = parsed.header
    with translated(name):
        frames = _frames_of(src, parsed)
    codec = meta["codec"]
    if codec in SIZE_CHECKED:
        shape = (meta["rows"], meta["columns"], meta["samples_per_pixel"])
        for i, f in enumerate(frames):
            with translated(name, f"{codec} frame {i}"):
                check_frame(codec, f, shape)
    return EncapsulatedFrames(frames, codec, meta)


def read_many(
    paths: Sequence[str | os.PathLike] | Iterable[str | os.PathLike],
    *,
    num_threads: int | None = None,
    on_error: str = "raise",
    **read_kwargs: Any,
) -> list[DicomImage | DicomError]:
    """Reads many files in native threads with the GIL released, in input order.

    ``read_kwargs`` are those of :func:`read`. With ``on_error="skip"`` a file that fails
    yields its :class:`DicomError` in place of the image and the rest go on; with
    ``"raise"`` the first failure (in input order) is raised after all files are done.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    unknown = set(read_kwargs) - {"output", "frame", "size", "dtype"}
    if unknown:
        raise TypeError(f"unexpected arguments: {sorted(unknown)}")
    output = read_kwargs.get("output", "display")
    dtype = read_kwargs.get("dtype")
    frame = read_kwargs.get("frame")
    dt = _check(output, dtype)
    longest, sh, sw = _size_args(read_kwargs.get("size"))
    names = [os.fspath(p) for p in paths]
    threads = num_threads or os.cpu_count() or 1
    raw = _dicom.read_many(names, threads, output, -1 if frame is None else frame, dt, longest, sh, sw)

    results: list[DicomImage | DicomError | None] = [None] * len(names)
    library_work = []
    for i, (pixels, meta, err) in enumerate(raw):
        if err is None:
            results[i] = DicomImage(pixels, meta)
        elif err[0] == "needs_codec":
            library_work.append(i)
        else:
            results[i] = from_native(names[i], *err)
    if library_work:
        def one(i: int) -> DicomImage | DicomError:
            try:
                return read(names[i], **read_kwargs)
            except Exception as exc:  # any failure (MemoryError too) is this file's, not the call's
                return translate(names[i], exc)

        with ThreadPoolExecutor(max_workers=threads) as pool:
            for i, res in zip(library_work, pool.map(one, library_work)):
                results[i] = res
    if on_error == "raise":
        for res in results:
            if isinstance(res, DicomError):
                raise res
    return results  # type: ignore[return-value]


def display_lut(src: Source, value_range: tuple[int, int] | None = None) -> tuple[np.ndarray, int, int]:
    """The display pipeline of a grey image as a float32 table over its stored bits.

    Returns (lut, shift, mask): the display value in [0, 1] of a raw sample word ``r`` is
    ``lut[(r >> shift) & mask]`` - exactly what :func:`read` computes, so a GPU can apply
    VOI and MONOCHROME1 with the same numbers. Images without a VOI window use their own
    min/max: pass ``value_range`` = (min, max) of the sign-extended stored values.
    """
    parsed = _parse(src, header_only=True)
    with translated(_name(src)):
        values, shift, mask, _ = parsed.display_lut(value_range)
    return values, shift, mask


def needs_value_range(src: Source) -> bool:
    """True when the image has no VOI window, so its display depends on its min/max."""
    return bool(_parse(src, header_only=True).needs_range())
