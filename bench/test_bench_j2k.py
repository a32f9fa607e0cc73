"""JPEG 2000 chest image to a 256 display: reduced-resolution decode against full decode +
resize, same run, same file.

The file: a generated 2048x2500 12-bit chest image (cxrfast.synthetic), lossless J2K (5
decomposition levels, imagecodecs' default), with a VOI window. ``cxrfast.dicom.read(size=256)``
decodes it at reduce factor 2 (625x512, the largest that keeps >= 2x the target) through
glymur; the anchor is the same call with the reduced path switched off (imagecodecs' full
decode, then the same native display pipeline and antialiased resize). Target: >= 3x.
The outputs are checked against each other within tests/test_j2k_reduced.py's tolerance.

Run: pytest bench/test_bench_j2k.py --benchmark-only
"""
from __future__ import annotations

import io

import numpy as np
import pytest

from cxrfast import codecs, dicom

ROWS, COLS, SIZE = 2500, 2048, 256
MAX_DIFF, MEAN_DIFF = 12, 0.6  # as tests/test_j2k_reduced.py
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def j2k_file(tmp_path_factory):
    """(path, full decode + resize output) of the generated J2K DICOM."""
    imagecodecs = pytest.importorskip("imagecodecs")
    pydicom = pytest.importorskip("pydicom")
    from cxrfast.synthetic import chest_image
    from dicom_factory import make_encapsulated

    img = np.ascontiguousarray(chest_image(np.random.default_rng(0), ROWS)[:, :COLS])
    stream = imagecodecs.jpeg2k_encode(img, level=0, codecformat="J2K", bitspersample=12)
    data = make_encapsulated([stream], transfer_syntax="1.2.840.10008.1.2.4.90", rows=ROWS, columns=COLS,
                             bits_stored=12)
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.WindowCenter, ds.WindowWidth = 2000, 3000
    path = str(tmp_path_factory.mktemp("j2k") / "chest_j2k.dcm")
    ds.save_as(path)
    with pytest.MonkeyPatch.context() as m:
        _full(m)
        reference = dicom.read(path, size=SIZE).pixels
    return path, reference


def _full(monkeypatch):
    monkeypatch.setattr(dicom, "jpeg2000_reduce", lambda frame, target: 0)


@pytest.mark.parametrize("entry", ["full decode (imagecodecs) + resize", "cxrfast reduced decode (glymur) + resize"])
def test_j2k_to_256(benchmark, j2k_file, monkeypatch, entry):
    benchmark.group = f"J2K {COLS}x{ROWS} 12-bit lossless chest -> display {SIZE}"
    reduced = entry.startswith("cxrfast")
    if reduced and codecs.reduced_decoder() is None:
        pytest.skip(f"reduced JPEG 2000 decoding unavailable: {codecs.reduced_unavailable()}")
    path, reference = j2k_file
    if not reduced:
        _full(monkeypatch)
    out = benchmark.pedantic(lambda: dicom.read(path, size=SIZE).pixels, rounds=3, iterations=1, warmup_rounds=1)
    d = np.abs(out.astype(np.int32) - reference.astype(np.int32))
    assert out.shape == reference.shape == (SIZE, 210)
    assert d.max() <= MAX_DIFF and d.mean() <= MEAN_DIFF, (d.max(), d.mean())
    if benchmark.stats:
        median = benchmark.stats.stats.median
        _medians[entry] = median
        benchmark.extra_info["max diff"] = int(d.max())
        benchmark.extra_info["mean diff"] = round(float(d.mean()), 3)
        full = _medians.get("full decode (imagecodecs) + resize")
        if reduced and full:
            benchmark.extra_info["x faster than full"] = round(full / median, 2)
