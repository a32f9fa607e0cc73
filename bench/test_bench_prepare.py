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
- prepare vs decode-only: ``prepare`` of CXRFAST_BENCH_PREPARE full-size chest radiographs
  (default 16; RG1 1955x1841 15-bit CR re-encoded JPEG lossless SV1, 4.4 MB a file, each copy
  with its own SOP Instance UID) to 256 uint8, with --workers 1 and 2, against its anchor: the
  same files decoded by ``dicom.read_many`` at the same size and threads, nothing else (no
  header pass, hashing, shards or index). The anchor runs right before each timed prepare
  round (the benchmark's setup), so both see the same load on a shared machine; extra_info
  gives files/s, files/s per core (worker), the median of the per-round ratios prepare /
  decode-only (each round's too: on shared cores rounds vary), whether it meets the target
  (>= 0.9), and the peak resident memory each adds in a fresh process (VmHWM reset after the
  imports). Never asserted: timings only. The fixed cost of a run (settings, index, meta.json,
  about 30 fsynced files) weighs on the 16-file default; RESULTS use CXRFAST_BENCH_PREPARE=300.

Run: pytest bench/test_bench_prepare.py --benchmark-only
"""
from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cxrfast import dicom  # noqa: E402
from cxrfast.data import files  # noqa: E402
from cxrfast.prepare import prepare  # noqa: E402
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


PREPARE_FILES = int(os.environ.get("CXRFAST_BENCH_PREPARE", 16))
PREPARE_SIZE = 256
TARGET_RATIO = 0.9  # prepare files/s at least 90% of decode-only's (issue 12, part 2)
_UID = "1.2.826.0.1.3680043.8.498.7" + "0" * 24  # fixed length: copies differ in bytes only
_runs = itertools.count()


@pytest.fixture(scope="session")
def full_size_dicoms(rg1, tmp_path_factory) -> tuple[Path, list[Path]]:
    """PREPARE_FILES copies of RG1 as JPEG lossless SV1, each with its own SOP Instance UID
    (else prepare would keep one and skip the rest as duplicates). The UID is replaced in the
    file bytes, at the same length, so thousands of files take seconds to write."""
    import pydicom

    ds = pydicom.dcmread(rg1["paths"]["sv1"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _UID
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data, uid = buffer.getvalue(), _UID.encode()
    assert data.count(uid) == 2  # file meta and data set: nothing else carries it
    folder = tmp_path_factory.mktemp("prepare_full")
    paths = []
    for i in range(PREPARE_FILES):
        paths.append(folder / f"cr_{i:05d}.dcm")
        paths[-1].write_bytes(data.replace(uid, uid[:-24] + f"{i + 1:024d}".encode()))
    return folder, paths


def _decode_only(paths: list[Path], workers: int) -> int:
    """The anchor: read_many over every file, at prepare's size, dtype, frame and threads."""
    results = dicom.read_many(paths, num_threads=workers, on_error="skip", size=PREPARE_SIZE, dtype="uint8", frame=0)
    return sum(not isinstance(r, BaseException) for r in results)


_PEAK_CHILD = """
import json, sys
from pathlib import Path
from cxrfast import dicom
from cxrfast.prepare import prepare
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
mode, src, out, workers = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
paths = sorted(src.glob("*.dcm"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS now: the peak of the imports is not the run's
base = status("VmRSS")
if mode == "prepare":
    prepare(str(src), out, size=SIZE, workers=workers)
else:  # as _decode_only
    dicom.read_many(paths, num_threads=workers, on_error="skip", size=SIZE, dtype="uint8", frame=0)
print(json.dumps(status("VmHWM") - base))
""".replace("SIZE", str(PREPARE_SIZE))


def _peak_mb(mode: str, src: Path, out: Path, workers: int) -> float:
    """Peak resident MB a fresh process adds while running ``mode`` (prepare or decode-only)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode, str(src), str(out), str(workers)], cwd=ROOT,
                          env=env, capture_output=True, text=True, check=True)
    return round(int(done.stdout.strip().splitlines()[-1]) / 2**20, 1)


@pytest.mark.parametrize("workers", [1, 2], ids=lambda w: f"cxrfast prepare, {w} workers")  # the table's rows
def test_prepare_vs_decode_only(benchmark, full_size_dicoms, tmp_path, workers):
    folder, paths = full_size_dicoms
    benchmark.group = (f"cxrfast prepare vs decode-only: {PREPARE_FILES} full-size CR (RG1 SV1, 4.4 MB) -> "
                       f"{PREPARE_SIZE} uint8")
    decode_s: list[float] = []
    prepare_s: list[float] = []
    outs: list[Path] = []

    def clean() -> None:  # every round prepares into a fresh folder (no resume); disk stays bounded
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)

    def anchor() -> None:  # the benchmark's setup: untimed by it, timed here, right before each prepare
        clean()
        start = time.perf_counter()
        assert _decode_only(paths, workers) == len(paths)
        decode_s.append(time.perf_counter() - start)

    def run() -> dict:
        outs.append(tmp_path / f"p{next(_runs)}")
        start = time.perf_counter()
        meta = prepare(str(folder), str(outs[-1]), size=PREPARE_SIZE, workers=workers)
        prepare_s.append(time.perf_counter() - start)
        return meta

    meta = benchmark.pedantic(run, setup=anchor, rounds=5, iterations=1, warmup_rounds=1)
    assert meta["images"] == len(paths) and meta["errors"] == 0 and meta["duplicates"] == 0
    clean()
    rounds = slice(1, None) if len(prepare_s) > 1 else slice(None)  # without the warm-up round
    ratio = statistics.median(d / p for d, p in zip(decode_s[rounds], prepare_s[rounds]))
    rate = len(paths) / statistics.median(prepare_s[rounds])
    anchor_rate = len(paths) / statistics.median(decode_s[rounds])
    benchmark.extra_info.update({
        "workers": workers, "files_per_s": round(rate, 2), "per_core": round(rate / workers, 2),
        "decode_only_files_per_s": round(anchor_rate, 2), "decode_only_per_core": round(anchor_rate / workers, 2),
        "ratio": round(ratio, 3), "meets_target": ratio >= TARGET_RATIO,
        "round_ratios": [round(d / p, 3) for d, p in zip(decode_s[rounds], prepare_s[rounds])],
        "peak_MB": _peak_mb("prepare", folder, tmp_path / "peak", workers),
        "decode_only_peak_MB": _peak_mb("decode", folder, tmp_path / "peak", workers)})
