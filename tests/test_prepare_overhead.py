"""prepare's per-file Python work stays out of the way of decoding (bench/test_bench_prepare.py
measures it against decode-only): each source path is resolved once a run, whatever the number
of shards, and the sources recorded stay what they were (relative under SRC, symlinks followed,
absolute outside SRC)."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cxrfast.prepare import prepare
from dicom_factory import make_dicom


@pytest.fixture
def tree(tmp_path) -> tuple[Path, Path]:
    """SRC with 9 DICOM files (3 in a subfolder), a symlink to a file inside SRC and one to a
    file outside it; returns (SRC, the outside file)."""
    src, outside = tmp_path / "src", tmp_path / "elsewhere"
    (src / "sub").mkdir(parents=True)
    outside.mkdir()
    rng = np.random.default_rng(3)
    for i in range(9):
        a = (500 + rng.integers(0, 3000, (40, 33 + i))).astype(np.uint16)
        folder = src / "sub" if i % 3 == 2 else src
        (folder / f"{i:02d}.dcm").write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
    far = outside / "far.dcm"
    far.write_bytes(make_dicom((700 + rng.integers(0, 3000, (40, 50))).astype(np.uint16), bits_stored=12,
                               window=(2048, 4096)))
    (src / "sub" / "to_far.dcm").symlink_to(far)
    return src, far


def _resolves(monkeypatch) -> Counter:
    """Counts Path.resolve calls by the path resolved."""
    calls: Counter = Counter()
    real = Path.resolve

    def resolve(self, strict=False):
        calls[str(self)] += 1
        return real(self, strict=strict)

    monkeypatch.setattr(Path, "resolve", resolve)
    return calls


def test_each_source_is_resolved_once_whatever_the_shards(tmp_path, tree, monkeypatch):
    src, far = tree
    calls = _resolves(monkeypatch)
    meta = prepare(str(src), str(tmp_path / "out"), size=16, workers=2, shard_gb=3 * 16 * 16 / 2**30)
    assert meta["images"] == 10 and len(meta["shards"]) == 4  # 3 images a shard
    sources = [p for p in calls if p.endswith(".dcm")]
    assert len(sources) == 10
    assert {calls[p] for p in sources} == {1}


def test_recorded_sources_are_unchanged(tmp_path, tree):
    src, far = tree
    prepare(str(src), str(tmp_path / "out"), size=16, workers=2, shard_gb=3 * 16 * 16 / 2**30)
    with open(tmp_path / "out" / "index.csv", newline="") as f:
        sources = sorted(row["source"] for row in csv.DictReader(f))
    inside = sorted(f"{i:02d}.dcm" if i % 3 != 2 else f"sub/{i:02d}.dcm" for i in range(9))
    assert sources == sorted(inside + [str(far.resolve())])
    manifested = []
    for manifest in sorted((tmp_path / "out" / "parts").glob("shard_*.csv")):
        with open(manifest, newline="") as f:
            manifested += [row["source"] for row in csv.DictReader(f)]
    assert sorted(manifested) == sources  # each file in exactly one shard's manifest, named the same way
