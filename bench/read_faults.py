"""Page faults and system time per dicom.read of one large file, in this (fresh) process.

    python bench/read_faults.py [PATH]   (default: RG1 re-encoded as JPEG lossless SV1)

A fresh multi-megabyte buffer faults once per 4 KiB page on first touch unless the kernel backs
it with huge pages (csrc/include/buffer.h); whether glibc hands back warm memory instead depends
on what the process freed before, so compare builds in fresh processes, a few times each.
"""
from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

import numpy as np

from cxrfast import dicom


def rg1_sv1(folder: str) -> str:
    """RG1 (pydicom-data) with its pixels re-encoded as JPEG lossless SV1."""
    import data_store
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    ds = pydicom.dcmread(os.path.join(os.path.dirname(data_store.__file__), "data", "RG1_UNCR.dcm"))
    stream = imagecodecs.jpeg8_encode(ds.pixel_array, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    path = os.path.join(folder, "rg1_sv1.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


def measure(path: str, rounds: int = 30) -> None:
    cases = {"stored": dict(output="stored"), "display": {}, "display 256": dict(size=256),
             "stored threads=2": dict(output="stored", threads=2)}
    print(f"{path}: median ms, minor faults and system ms per read, {rounds} reads each")
    for name, kw in cases.items():
        for _ in range(3):
            dicom.read(path, **kw)
        before, times = resource.getrusage(resource.RUSAGE_SELF), []
        for _ in range(rounds):
            t0 = time.perf_counter()
            dicom.read(path, **kw)
            times.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_SELF)
        print(f"  {name:18s} {np.median(times) * 1e3:7.2f} ms  {(after.ru_minflt - before.ru_minflt) / rounds:6.0f} faults"
              f"  {(after.ru_stime - before.ru_stime) / rounds * 1e3:6.2f} ms sys")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        measure(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            measure(rg1_sv1(tmp))
