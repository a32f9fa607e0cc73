"""The golden DICOM registry: every pixel-bearing file of pydicom's test data and pydicom-data.

Files are found on disk at collection time; the registry skips cleanly when a package is
missing. ``LOSSY`` lists transfer syntaxes whose decoders may differ by +-1 (IDCT rounding).
"""
from __future__ import annotations

import glob
import os

SKIP_SUFFIXES = (".py", ".json", ".gz", ".bz2", ".zip", ".txt", ".pyc", ".xml", ".j2k", ".jls",
                 ".jpg", ".jpeg", ".png", ".icc", ".dump", "README")
LOSSY = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}


def _files_under(folder: str) -> list[str]:
    found = glob.glob(os.path.join(folder, "**", "*"), recursive=True)
    return sorted(f for f in found if os.path.isfile(f) and not f.endswith(SKIP_SUFFIXES))


def reference_files() -> list[str]:
    files: list[str] = []
    try:
        import pydicom

        files += _files_under(os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files"))
    except ImportError:
        pass
    try:
        import data_store  # pydicom-data

        files += _files_under(os.path.dirname(data_store.__file__))
    except ImportError:
        pass
    return files


def pydicom_pixels(path: str):
    """(dataset, stored array) from pydicom with all its plugins (GDCM included), or a skip reason."""
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # not a DICOM file pydicom reads
            return None, None, f"pydicom cannot parse: {exc}"
        if "PixelData" not in ds:
            return ds, None, "no pixel data"
        try:
            ds.pixel_array_options(as_rgb=False)
            return ds, ds.pixel_array, None
        except Exception as exc:
            return ds, None, f"pydicom cannot decode: {str(exc)[:100]}"


def pydicom_voi_range(ds) -> tuple[float, float]:
    """The output range pydicom's apply_windowing maps a window onto (its y_min, y_max)."""
    if "ModalityLUTSequence" in ds:
        lo, hi = 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif ds.PixelRepresentation == 0:
        lo, hi = 0.0, 2.0 ** ds.BitsStored - 1
    else:
        lo, hi = -(2.0 ** (ds.BitsStored - 1)), 2.0 ** (ds.BitsStored - 1) - 1
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * s + b, hi * s + b
    return lo, hi
