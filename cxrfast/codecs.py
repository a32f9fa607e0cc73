"""Codec backends for the transfer syntaxes the native reader leaves to libraries.

JPEG (DCT), JPEG-LS, JPEG 2000 and HTJ2K frames are handed to imagecodecs, a well-kept
library that releases the GIL. Each backend is one ``decode`` function with an availability
check, looked up lazily so that importing cxrfast never needs the codec library.

A codec library allocates what the codestream's own header declares, whatever the DICOM
header says (a 16x16 file whose SOF declares 65535x65535 costs 4 GB). So before any library
sees a frame, :func:`check_frame` reads the declared size from the codestream header (JPEG
SOFn, JPEG-LS SOF55, JPEG 2000 / HTJ2K SIZ, bare or inside a JP2 box wrapper) and refuses a
frame whose rows or columns differ from the DICOM header's or whose components exceed its
Samples per Pixel. Only marker segments and boxes are read: bounded time, no allocation.

JPEG 2000 frames can also be decoded at a reduced resolution level (OpenJPEG's reduce
factor, through glymur, which exposes it): when the caller will resize to a small target,
level r skips the r finest wavelet levels (a 2k chest image to 256 pixels: about 20x less
work). glymur needs a libopenjp2: the system's (Debian ``libopenjp2-7``) or, failing that,
the copy bundled with imagecodecs, loaded by path in this process. Without either the
full imagecodecs decode runs, as before (same result, slower).
"""
from __future__ import annotations

import glob
import os
import struct
import tempfile
import threading
from typing import Callable, Optional, Union

import numpy as np

Buffer = Union[bytes, bytearray, memoryview]
Shape = tuple[int, int, int]  # rows, columns, components


class CodecUnavailableError(ImportError):
    """The codec library, or this codec in it, is not installed."""

    def __init__(self, codec: str, package: str, detail: str = ""):
        super().__init__(f"{codec} frames need {detail or package}: pip install {package}")
        self.codec = codec
        self.package = package


class NoBackendError(LookupError):
    """No backend is registered for this codec name."""


class CodestreamError(ValueError):
    """The codestream's own header is malformed or disagrees with the DICOM header."""


# --- declared sizes ------------------------------------------------------------------------

# SOF0-SOF15 less DHT (C4), JPG (C8) and DAC (CC); DHP (DE, hierarchical); SOF55 (F7, JPEG-LS).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xDE, 0xF7}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn, TEM: no length field
_MAX_STEPS = 4096  # marker segments (or fill bytes) before the first scan; real files have < 50


def _jpeg_shapes(buf: Buffer) -> list[Shape]:
    """Every frame header (SOFn, DHP, SOF55) before the first scan (ITU T.81 B.2, T.87 C.2)."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        raise CodestreamError("no JPEG SOI marker at the start of the frame")
    pos, shapes = 2, []
    for _ in range(_MAX_STEPS):
        if pos + 2 > n:
            raise CodestreamError("JPEG codestream ends before its first scan")
        if buf[pos] != 0xFF:
            raise CodestreamError(f"JPEG codestream has no marker at byte {pos}")
        marker = buf[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        pos += 2
        if marker in _STANDALONE:
            continue
        if marker in (0xD8, 0xD9, 0x00):
            raise CodestreamError(f"JPEG codestream has marker FF{marker:02X} before its first scan")
        if pos + 2 > n:
            raise CodestreamError("JPEG codestream ends inside a marker segment")
        (length,) = struct.unpack_from(">H", buf, pos)
        if length < 2 or pos + length > n:
            raise CodestreamError(f"JPEG marker FF{marker:02X} segment of length {length} runs past the frame")
        if marker in _SOF_MARKERS:
            if length < 8:
                raise CodestreamError(f"JPEG frame header FF{marker:02X} too short")
            rows, cols = struct.unpack_from(">HH", buf, pos + 3)
            shapes.append((rows, cols, buf[pos + 7]))
        if marker == 0xDA:  # SOS: every frame header comes before the first scan
            if not shapes:
                raise CodestreamError("JPEG codestream has no frame header (SOF) before its first scan")
            return shapes
        pos += length
    raise CodestreamError(f"JPEG codestream has more than {_MAX_STEPS} marker segments before its first scan")


def _siz_shape(buf: Buffer, start: int, end: int) -> Shape:
    """The image size of a JPEG 2000 codestream: SOC then SIZ (ITU T.800 A.5.1)."""
    if end - start < 42 or bytes(buf[start:start + 4]) != b"\xff\x4f\xff\x51":
        raise CodestreamError("JPEG 2000 codestream does not start with SOC and SIZ")
    x, y, x0, y0 = struct.unpack_from(">IIII", buf, start + 8)
    (components,) = struct.unpack_from(">H", buf, start + 40)
    if x0 >= x or y0 >= y:
        raise CodestreamError(f"JPEG 2000 SIZ declares an empty image ({x}x{y} from offset {x0},{y0})")
    return y - y0, x - x0, components


_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_MAX_BOXES = 256


def _boxes(buf: Buffer, start: int, end: int):
    """(type, content start, content end) of the boxes in buf[start:end] (ISO 15444-1 I.4)."""
    pos = start
    for _ in range(_MAX_BOXES):
        if pos == end:
            return
        if pos + 8 > end:
            raise CodestreamError("JP2 box header runs past the frame")
        length, kind = struct.unpack_from(">I4s", buf, pos)
        head = 8
        if length == 1:
            if pos + 16 > end:
                raise CodestreamError("JP2 box header runs past the frame")
            (length,) = struct.unpack_from(">Q", buf, pos + 8)
            head = 16
        elif length == 0:
            length = end - pos
        if length < head or pos + length > end:
            raise CodestreamError(f"JP2 box {kind!r} of length {length} runs past the frame")
        yield kind, pos + head, pos + length
        pos += length
    raise CodestreamError(f"JP2 file has more than {_MAX_BOXES} boxes")


def _jpeg2000_shapes(buf: Buffer) -> list[Shape]:
    """SIZ of the codestream; for a JP2 file also its Image Header box (ihdr)."""
    if bytes(buf[:12]) != _JP2_SIGNATURE:
        return [_siz_shape(buf, 0, len(buf))]
    shapes: list[Shape] = []
    codestream = None
    for kind, start, end in _boxes(buf, 0, len(buf)):
        if kind == b"jp2h":
            for sub, s, e in _boxes(buf, start, end):
                if sub == b"ihdr":
                    if e - s < 14:
                        raise CodestreamError("JP2 Image Header box too short")
                    rows, cols, components = struct.unpack_from(">IIH", buf, s)
                    shapes.append((rows, cols, components))
        elif kind == b"jp2c":
            codestream = (start, end)
            break
    if codestream is None:
        raise CodestreamError("JP2 file has no contiguous codestream box (jp2c)")
    shapes.append(_siz_shape(buf, *codestream))
    return shapes


def _codestream_span(buf: Buffer) -> tuple[int, int]:
    """(start, end) of the JPEG 2000 codestream: the whole frame, or a JP2 file's jp2c box."""
    if bytes(buf[:12]) != _JP2_SIGNATURE:
        return 0, len(buf)
    for kind, start, end in _boxes(buf, 0, len(buf)):
        if kind == b"jp2c":
            return start, end
    raise CodestreamError("JP2 file has no contiguous codestream box (jp2c)")


def jpeg2000_levels(buf: Buffer) -> int:
    """Fewest wavelet decomposition levels of any component (COD and COC segments of the
    main header, ITU T.800 A.6.1-A.6.2): the largest reduce factor every component allows."""
    pos, end = _codestream_span(buf)
    components = _siz_shape(buf, pos, end)[2]
    pos += 2  # SIZ follows SOC
    levels = None
    for _ in range(_MAX_STEPS):
        if pos + 4 > end:
            break
        marker, length = struct.unpack_from(">HH", buf, pos)
        if marker == 0xFF90 or length < 2:  # SOT: the main header is over
            break
        if pos + 2 + length > end:
            raise CodestreamError(f"JPEG 2000 marker {marker:04X} segment runs past the frame")
        body = pos + 4
        if marker == 0xFF52 and length >= 12:  # COD: Scod, SGcod (4 bytes), SPcod levels
            levels = buf[body + 5] if levels is None else min(levels, buf[body + 5])
        elif marker == 0xFF53 and length >= 5:  # COC: Ccoc (1 or 2 bytes), Scoc, SPcoc levels
            at = body + (2 if components >= 257 else 1) + 1
            if at < pos + 2 + length:
                levels = buf[at] if levels is None else min(levels, buf[at])
        pos += 2 + length
    if levels is None:
        raise CodestreamError("JPEG 2000 main header has no COD segment")
    return levels


def reduced_shape(buf: Buffer, level: int) -> tuple[int, int]:
    """(rows, columns) that OpenJPEG decodes at reduce factor ``level`` (T.800 B.5):
    ceil(X / 2^r) - ceil(X0 / 2^r) on each axis."""
    start, end = _codestream_span(buf)
    x, y, x0, y0 = struct.unpack_from(">IIII", buf, start + 8)
    k = 1 << level
    return -(-y // k) - -(-y0 // k), -(-x // k) - -(-x0 // k)


J2K_MARGIN = 2  # a reduced decode keeps each side >= this times the target (as files.JPEG_MARGIN)


def jpeg2000_reduce(buf: Buffer, target: tuple[int, int]) -> int:
    """The largest reduce factor whose decoded image keeps both sides >= J2K_MARGIN x the
    target (rows, columns), clamped to the codestream's decomposition levels; 0 when the
    reduced decoder (glymur with a libopenjp2) is unavailable."""
    if reduced_decoder() is None:
        return 0
    top = jpeg2000_levels(buf)
    level = 0
    while level < top:
        rows, cols = reduced_shape(buf, level + 1)
        if rows < J2K_MARGIN * target[0] or cols < J2K_MARGIN * target[1]:
            break
        level += 1
    return level


_SHAPES: dict[str, Callable[[Buffer], list[Shape]]] = {
    "jpeg_baseline": _jpeg_shapes,
    "jpeg_extended": _jpeg_shapes,
    "jpeg_lossless": _jpeg_shapes,
    "jpegls": _jpeg_shapes,
    "jpeg2000": _jpeg2000_shapes,
    "htj2k": _jpeg2000_shapes,
}


SIZE_CHECKED = frozenset(_SHAPES)  # codecs whose codestream header check_frame reads


def declared_shapes(codec: str, frame: Buffer) -> list[Shape]:
    """(rows, columns, components) of every image header in the frame's codestream."""
    try:
        reader = _SHAPES[codec]
    except KeyError:
        raise NoBackendError(f"no codestream reader for codec {codec!r}") from None
    return reader(frame)


def check_frame(codec: str, frame: Buffer, header_shape: Shape) -> None:
    """Raises CodestreamError unless the codestream declares the DICOM header's rows and
    columns and at most its Samples per Pixel; reads headers only (no decoding)."""
    rows, cols, samples = header_shape
    for r, c, k in declared_shapes(codec, frame):
        if (r, c) != (rows, cols) or k < 1 or k > samples:
            raise CodestreamError(
                f"the codestream declares {c}x{r} with {k} component(s), the DICOM header "
                f"{cols}x{rows} with {samples} sample(s) per pixel"
            )


# --- backends ------------------------------------------------------------------------------


def _imagecodecs(codec: str, feature: str, library: str):
    """The imagecodecs module, when it is installed and has ``feature`` (e.g. "JPEGLS")."""
    try:
        import imagecodecs
    except ImportError:
        raise CodecUnavailableError(codec, "imagecodecs", "the 'imagecodecs' package") from None
    impl = getattr(imagecodecs, feature, None)
    if impl is None or not getattr(impl, "available", False):
        raise CodecUnavailableError(codec, "imagecodecs", f"an imagecodecs built with {library}")
    return imagecodecs


def _jpeg(frame: bytes, photometric: str | None) -> np.ndarray:
    codecs = _imagecodecs("JPEG", "JPEG8", "libjpeg-turbo")
    if photometric == "RGB":
        # The DICOM header says the samples are RGB: no YCbCr->RGB conversion (pydicom does
        # the same), whatever libjpeg would guess from the component ids.
        return codecs.jpeg8_decode(frame, colorspace="RGB", outcolorspace="RGB")
    if photometric and photometric.startswith("YBR"):
        # Stored values of a YBR file are YCbCr: keep them (as pydicom's as_rgb=False).
        return codecs.jpeg8_decode(frame, outcolorspace="YCBCR")
    return codecs.jpeg8_decode(frame)


def _jpegls(frame: bytes, photometric: str | None) -> np.ndarray:
    return _imagecodecs("JPEG-LS", "JPEGLS", "CharLS").jpegls_decode(frame)


def _jpeg2000(frame: bytes, photometric: str | None) -> np.ndarray:
    return _imagecodecs("JPEG 2000", "JPEG2K", "OpenJPEG").jpeg2k_decode(frame)


def _htj2k(frame: bytes, photometric: str | None) -> np.ndarray:
    try:
        return _imagecodecs("HTJ2K", "HTJ2K", "OpenJPH").htj2k_decode(frame)
    except CodecUnavailableError:  # OpenJPEG 2.5+ decodes HTJ2K too
        return _imagecodecs("HTJ2K", "JPEG2K", "OpenJPH or OpenJPEG 2.5").jpeg2k_decode(frame)


# --- reduced-resolution JPEG 2000 (glymur over libopenjp2) ----------------------------------

_reduced_lock = threading.Lock()
_reduced_state: list = []  # [glymur module or None, reason]: probed once per process


def _bundled_openjp2() -> Optional[str]:
    """Path of the libopenjp2 that the imagecodecs wheel bundles, if any."""
    try:
        import imagecodecs
    except ImportError:
        return None
    libs = os.path.join(os.path.dirname(os.path.dirname(imagecodecs.__file__)), "imagecodecs.libs")
    found = sorted(glob.glob(os.path.join(libs, "libopenjp2*.so*")))
    return found[0] if found else None


def _point_glymur_at(glymur, path: str) -> bool:
    """Loads ``path`` as glymur's libopenjp2 in this process only (no config file written)."""
    import ctypes

    from glymur.lib import openjp2

    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return False
    openjp2.OPENJP2 = lib
    version = openjp2.version()  # glymur's version checks read these module attributes
    glymur.version.openjpeg_version = version
    glymur.version.openjpeg_version_tuple = tuple(int(p) for p in version.split(".")[:3])
    return True


def _probe_reduced():
    try:
        import glymur
        from glymur.lib import openjp2
    except ImportError:
        return None, "the 'glymur' package is not installed (pip install glymur)"
    if openjp2.OPENJP2 is None:
        bundled = _bundled_openjp2()
        if bundled is None or not _point_glymur_at(glymur, bundled):
            return None, "glymur found no libopenjp2 (apt-get install libopenjp2-7)"
    if not hasattr(glymur, "Jp2kr"):
        return None, f"glymur {glymur.__version__} is too old (pip install 'glymur>=0.13')"
    if tuple(glymur.version.openjpeg_version_tuple) < (2, 4, 0):
        return None, f"glymur's libopenjp2 is {glymur.version.openjpeg_version}, reduced decoding needs 2.4+"
    return glymur, ""


def reduced_decoder():
    """glymur, ready to decode with a reduce factor, or None (see :func:`reduced_unavailable`)."""
    with _reduced_lock:
        if not _reduced_state:
            _reduced_state.extend(_probe_reduced())
    return _reduced_state[0]


def reduced_unavailable() -> str:
    """Why reduced-resolution JPEG 2000 decoding is unavailable ("" when it is available)."""
    reduced_decoder()
    return _reduced_state[1]


_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # memory-backed on Linux


def _jpeg2000_reduced(frame: bytes, level: int) -> np.ndarray:
    """Decodes at reduce factor ``level``; glymur reads files only, so the frame goes to a
    private temporary file in memory (/dev/shm; about 1 ms for a 5 MB frame)."""
    glymur = reduced_decoder()
    suffix = ".jp2" if frame[:12] == _JP2_SIGNATURE else ".j2k"
    with tempfile.NamedTemporaryFile(dir=_SCRATCH, suffix=suffix) as f:
        f.write(frame)
        f.flush()
        step = 1 << level
        return glymur.Jp2kr(f.name)[::step, ::step]


DECODERS: dict[str, Callable[[bytes, Optional[str]], np.ndarray]] = {
    "jpeg_baseline": _jpeg,
    "jpeg_extended": _jpeg,
    "jpeg_lossless": _jpeg,  # multi-component or non-SOF3 streams: libjpeg-turbo
    "jpegls": _jpegls,
    "jpeg2000": _jpeg2000,
    "htj2k": _htj2k,
}


def decode_frame(
    codec: str, frame: Buffer, photometric: str | None = None, *, header_shape: Shape, level: int = 0
) -> np.ndarray:
    """Decodes one compressed frame to stored values, (rows, cols) or (rows, cols, samples).

    ``header_shape`` is the DICOM header's (rows, columns, samples per pixel): the frame is
    checked against it (:func:`check_frame`) before the library allocates anything.
    ``level`` > 0 (JPEG 2000 only, see :func:`jpeg2000_reduce`) decodes at that reduce
    factor: the result is :func:`reduced_shape`, smaller than the header's rows x columns.
    """
    try:
        decoder = DECODERS[codec]
    except KeyError:
        raise NoBackendError(f"no decoder for codec {codec!r}") from None
    check_frame(codec, frame, header_shape)
    if level == 0:
        return np.asarray(decoder(bytes(frame), photometric))
    if codec != "jpeg2000" or reduced_decoder() is None:
        raise NoBackendError(f"no reduced-resolution decoder for codec {codec!r}: {reduced_unavailable()}")
    out = np.asarray(_jpeg2000_reduced(bytes(frame), level))
    if out.shape[:2] != reduced_shape(frame, level):
        raise CodestreamError(f"JPEG 2000 frame decoded at level {level} to {out.shape[:2]}, "
                              f"expected {reduced_shape(frame, level)}")
    return recentre(out, level, header_shape[:2])


def recentre(pixels: np.ndarray, level: int, full: tuple[int, int]) -> np.ndarray:
    """Resamples a reduced image onto the grid a resize of the full image assumes.

    The wavelet's low-pass sample k sits on full-resolution pixel k * 2^r; a resize takes
    the n = ceil(N / 2^r) reduced samples to tile the N full pixels evenly, sample j centred
    on (j + 1/2) N / n - 1/2. On sharp edges the mismatch alone costs up to 36 of 255
    display levels (odd sizes most); linear interpolation onto that grid, per axis, cuts it
    to about 10. ``full`` is the full (rows, cols); same dtype and shape as ``pixels``."""
    x = pixels.astype(np.float32)
    for axis, size in ((0, full[0]), (1, full[1])):
        n = x.shape[axis]
        pos = ((np.arange(n) + 0.5) * size / n - 0.5) / (1 << level)
        pos = np.clip(pos, 0, n - 1)
        lo = np.minimum(pos.astype(np.intp), n - 1)
        hi = np.minimum(lo + 1, n - 1)
        w = (pos - lo).astype(np.float32)
        shape = [1] * x.ndim
        shape[axis] = n
        w = w.reshape(shape)
        x = x.take(lo, axis) * (1 - w) + x.take(hi, axis) * w
    return np.rint(x).astype(pixels.dtype)
