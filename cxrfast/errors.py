"""The DICOM exception hierarchy: one root, one class per way a file can fail.

Every message names the file, so a log line from a million-file job says which file to fix.
"""
from __future__ import annotations


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


class MissingCodecError(DicomError):
    """The frame needs a codec library that is not installed."""


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
