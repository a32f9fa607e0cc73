"""The DICOM exception hierarchy: one root, one class per way a file can fail.

Every message names the file, so a log line from a million-file job says which file to fix.
:func:`translate` (and the :func:`translated` context) is the one place where an error of
the native reader, of a codec library or of the OS becomes the right :class:`DicomError`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from . import _dicom
from .codecs import CodecUnavailableError, CodestreamError, NoBackendError


class DicomError(Exception):
    """A DICOM file could not be read; ``path`` names it ("<bytes>" for in-memory data)."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class InvalidDicomError(DicomError):
    """Not DICOM, or a malformed data set."""


class TruncatedError(DicomError):
    """The data ends before something it announces (file cut short)."""


class UnsupportedTransferSyntaxError(DicomError):
    """A transfer syntax this reader does not know."""


class CorruptCodestreamError(DicomError):
    """A compressed frame that cannot be decoded."""


class NoPixelDataError(DicomError):
    """The data set has no Pixel Data (7FE0,0010)."""


class UnsupportedFeatureError(DicomError):
    """A legal DICOM feature this reader does not handle (e.g. Samples per Pixel 4)."""


class MissingCodecError(UnsupportedTransferSyntaxError):
    """The transfer syntax needs a codec library (or a codec in it) that is not installed:
    unsupported by this installation; the message names the codec and the package."""


class DicomReadError(DicomError, OSError):
    """The file could not be opened or read."""


_BY_KIND = {
    "invalid": InvalidDicomError,
    "truncated": TruncatedError,
    "unsupported_transfer_syntax": UnsupportedTransferSyntaxError,
    "corrupt": CorruptCodestreamError,
    "no_pixel_data": NoPixelDataError,
    "unsupported": UnsupportedFeatureError,
    "io": DicomReadError,
}


def from_native(path: str, kind: str, message: str) -> DicomError:
    """Builds the Python exception for a (kind, message) pair raised by cxrfast._dicom."""
    return _BY_KIND.get(kind, InvalidDicomError)(path, message)


def translate(path: str, exc: BaseException, step: str = "") -> DicomError:
    """The DicomError for ``exc`` raised while reading ``path``.

    ``step`` names a codec library step ("jpegls frame 3"): there, any exception the library
    raises (their types differ per codec) means the frame cannot be decoded.
    """
    where = f"{step}: " if step else ""
    if isinstance(exc, DicomError):
        return exc
    if isinstance(exc, _dicom.NativeError) and len(exc.args) == 2:
        kind, message = exc.args
        return from_native(path, kind, where + message)
    if isinstance(exc, CodecUnavailableError):
        return MissingCodecError(path, str(exc))
    if isinstance(exc, NoBackendError):
        return UnsupportedTransferSyntaxError(path, str(exc))
    if isinstance(exc, MemoryError):
        cls = CorruptCodestreamError if step else InvalidDicomError
        return cls(path, f"{where}out of memory (the data announce an implausible size)")
    if isinstance(exc, OSError) and not step:
        return DicomReadError(path, f"cannot read file: {exc.strerror or exc}")
    if isinstance(exc, CodestreamError) or step:
        return CorruptCodestreamError(path, f"{where}{exc}")
    return InvalidDicomError(path, f"{type(exc).__name__}: {exc}")


# Translated outside library steps too; anything else there (a TypeError from a wrong
# argument) is a caller's mistake and propagates as it is.
_READER_ERRORS = (_dicom.NativeError, MemoryError, OSError, CodecUnavailableError, NoBackendError, CodestreamError)


@contextmanager
def translated(path: str, step: str = "") -> Iterator[None]:
    """Raises :func:`translate`'s DicomError for an error in the block (see ``step`` there)."""
    try:
        yield
    except DicomError:
        raise
    except Exception as exc:
        if not step and not isinstance(exc, _READER_ERRORS):
            raise
        # The native traceback says nothing; a library's is kept as the cause.
        raise translate(path, exc, step) from (None if isinstance(exc, _dicom.NativeError) else exc)
