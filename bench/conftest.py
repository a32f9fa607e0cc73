"""Shared benchmark fixtures and a ratio table printed at the end of every run.

Every group has one cxrfast entry (its name starts with "cxrfast"); the table gives each
other entry's median time divided by it, so the numbers compare within one run, on one
machine, whatever its noise level.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def _rg1_path() -> str:
    try:
        import data_store
    except ImportError:
        pytest.skip("pydicom-data (RG1 chest radiograph) is not installed")
    return os.path.join(os.path.dirname(data_store.__file__), "data", "RG1_UNCR.dcm")


@pytest.fixture(scope="session")
def rg1(tmp_path_factory):
    """RG1 (1955x1841, 15-bit CR, MONOCHROME1) re-encoded: {'native', 'sv1', 'rle'} -> path, + the array."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1, RLELossless

    src = _rg1_path()
    ds = pydicom.dcmread(src)
    arr = ds.pixel_array
    out = tmp_path_factory.mktemp("rg1")
    paths = {"native": src}
    sv1 = pydicom.dcmread(src)
    stream = imagecodecs.jpeg8_encode(arr, lossless=True, predictor=1, bitspersample=int(ds.BitsStored))
    sv1.PixelData = encapsulate([stream])
    sv1["PixelData"].VR = "OB"
    sv1.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    paths["sv1"] = str(out / "rg1_sv1.dcm")
    sv1.save_as(paths["sv1"], enforce_file_format=True)
    rle = pydicom.dcmread(src)
    rle.compress(RLELossless, encoding_plugin="pydicom")
    paths["rle"] = str(out / "rg1_rle.dcm")
    rle.save_as(paths["rle"], enforce_file_format=True)
    return {"paths": paths, "array": arr, "sv1_stream": stream}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    terminalreporter.write_sep("=", "time relative to cxrfast (median; >1 means cxrfast is faster)")
    markdown = ["| group | entry | median ms | x cxrfast | extra |", "|---|---|---:|---:|---|"]
    for group, benches in groups.items():
        ours = [b for b in benches if b.name.split("[")[0].endswith("cxrfast") or "cxrfast" in b.name]
        if not ours:
            continue
        base = ours[0].stats.median
        terminalreporter.write_line(f"[{group}]")
        for b in sorted(benches, key=lambda b: b.stats.median):
            extra = "".join(f"  {k}={v}" for k, v in b.extra_info.items())
            terminalreporter.write_line(
                f"  {b.name:<52} median {b.stats.median * 1e3:9.2f} ms   x{b.stats.median / base:6.2f}{extra}")
            markdown.append(f"| {group} | {b.name} | {b.stats.median * 1e3:.3f} | {b.stats.median / base:.2f} | {extra.strip()} |")
    table_path = os.environ.get("CXRFAST_BENCH_MD")
    if table_path:  # bench/gpu_check.sh collects these into one table
        with open(table_path, "a") as f:
            f.write("\n".join(markdown) + "\n")
