"""Codec backends for the transfer syntaxes the native reader leaves to libraries.

JPEG (DCT), JPEG-LS, JPEG 2000 and HTJ2K frames are handed to imagecodecs, a well-kept
library that releases the GIL. Each backend is one ``decode`` function, looked up lazily so
that importing cxrfast never needs the codec library.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np


def _imagecodecs():
    try:
        import imagecodecs
    except ImportError as exc:  # pragma: no cover - imagecodecs is a runtime dependency
        raise ModuleNotFoundError(
            "this transfer syntax needs the 'imagecodecs' package: pip install imagecodecs"
        ) from exc
    return imagecodecs


def _jpeg(frame: bytes, photometric: str | None) -> np.ndarray:
    if photometric == "RGB":
        # The DICOM header says the samples are RGB: no YCbCr->RGB conversion (pydicom does
        # the same), whatever libjpeg would guess from the component ids.
        return _imagecodecs().jpeg8_decode(frame, colorspace="RGB", outcolorspace="RGB")
    if photometric and photometric.startswith("YBR"):
        # Stored values of a YBR file are YCbCr: keep them (as pydicom's as_rgb=False).
        return _imagecodecs().jpeg8_decode(frame, outcolorspace="YCBCR")
    return _imagecodecs().jpeg8_decode(frame)


def _jpegls(frame: bytes, photometric: str | None) -> np.ndarray:
    return _imagecodecs().jpegls_decode(frame)


def _jpeg2000(frame: bytes, photometric: str | None) -> np.ndarray:
    return _imagecodecs().jpeg2k_decode(frame)


def _htj2k(frame: bytes, photometric: str | None) -> np.ndarray:
    codecs = _imagecodecs()
    if hasattr(codecs, "htj2k_decode") and codecs.HTJ2K.available:
        return codecs.htj2k_decode(frame)
    return codecs.jpeg2k_decode(frame)


DECODERS: dict[str, Callable[[bytes, Optional[str]], np.ndarray]] = {
    "jpeg_baseline": _jpeg,
    "jpeg_extended": _jpeg,
    "jpeg_lossless": _jpeg,  # multi-component or non-SOF3 streams: libjpeg-turbo
    "jpegls": _jpegls,
    "jpeg2000": _jpeg2000,
    "htj2k": _htj2k,
}


def decode_frame(codec: str, frame: bytes, photometric: str | None = None) -> np.ndarray:
    """Decodes one compressed frame to stored values, (rows, cols) or (rows, cols, samples)."""
    try:
        decoder = DECODERS[codec]
    except KeyError:
        raise ValueError(f"no codec backend for {codec!r}") from None
    return np.asarray(decoder(frame, photometric))
