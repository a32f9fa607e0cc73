"""Preparation at archive scale (issue 12, part 2), each against its anchor in the same run.

- walk: finding the images of a generated tree (CXRFAST_BENCH_WALK files, default 50000, in
  folders of 25: a DICOM with extension, DICOM without (the preamble is read), PNG, other
  files), by ``find_images`` with its thread pool, with one thread, and by the os.walk of
  earlier cxrfast. Local disk, warm page cache: listing a folder costs microseconds here and
  the per-entry Python work holds the GIL, so a pool only contends for it (slower than one
  thread on 2 cores); hence the default, one thread on local filesystems and WALK_THREADS on
  network ones (files.walk_threads). On network storage each listing and preamble read waits
  on the server and the pool overlaps those waits: not simulated here (a sleep would be
  invented latency, not a measurement).

Run: pytest bench/test_bench_prepare.py --benchmark-only
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cxrfast.data import files  # noqa: E402
from test_files_walk import PREAMBLE, walk_reference  # noqa: E402

WALK_FILES = int(os.environ.get("CXRFAST_BENCH_WALK", 50_000))
PER_FOLDER = 25


@pytest.fixture(scope="session")
def walk_tree(tmp_path_factory) -> tuple[Path, int]:
    """WALK_FILES files in folders of PER_FOLDER (patient/study), 4 in 5 of them images."""
    root = tmp_path_factory.mktemp("walk")
    images = 0
    for k in range(-(-WALK_FILES // PER_FOLDER)):
        folder = root / f"p{k // 40:04d}" / f"s{k % 40:02d}"
        folder.mkdir(parents=True)
        for j in range(min(PER_FOLDER, WALK_FILES - k * PER_FOLDER)):
            kind = j % 5
            name = (f"{j}.dcm", f"{j:08d}", f"{j}.png", f"{j}.txt", f"{j}.jpg")[kind]
            (folder / name).write_bytes(PREAMBLE if kind == 1 else b"")
            images += kind != 3
    return root, images


@pytest.mark.parametrize("walker", ["cxrfast find_images, default threads", f"find_images, {files.WALK_THREADS} threads",
                                    "find_images, 1 thread", "os.walk (cxrfast before)"])
def test_walk(benchmark, walk_tree, walker):
    root, images = walk_tree
    benchmark.group = f"walk {WALK_FILES} files in {-(-WALK_FILES // PER_FOLDER)} folders (local disk, warm cache)"
    if walker.startswith("os.walk"):
        run = lambda: walk_reference(root)  # noqa: E731
    else:
        threads = {"default": None, "1 thread": 1}.get(walker.split(", ")[1].split(" ")[0], files.WALK_THREADS)
        run = lambda: files.find_images(root, threads=threads)  # noqa: E731
    found = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert len(found) == images
    benchmark.extra_info.update(filesystem=files.filesystem(root), default_threads=files.walk_threads(root))
    if benchmark.stats:
        benchmark.extra_info["files/s"] = round(WALK_FILES / benchmark.stats.stats.median)
