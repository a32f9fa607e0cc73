"""prepare --max-memory: the decodes in flight stay within the budget (by the header's
estimate, and by the peak resident memory of a real process), the result equals an
unbudgeted run, a file over the budget alone still runs (alone, with a note), and bad
values are one error line naming them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfast import dicom
from cxrfast import prepare as prep_mod
from cxrfast.prepare import decode_cost, main, parse_memory, prepare
from dicom_factory import make_dicom
from test_prepare_cli import _fails

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def mixed(tmp_path) -> Path:
    """DICOM, 16-bit PNG and JPEG of three sizes (64, 160 and 400 rows), 18 files."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(18):
        side = (64, 160, 400)[i % 3]
        a = (600 + rng.integers(0, 3000, (side, side - 7))).astype(np.uint16)
        if i % 6 == 4:
            Image.fromarray(a).save(folder / f"{i:02d}.png")
        elif i % 6 == 5:
            Image.fromarray((a // 16).astype(np.uint8)).save(folder / f"{i:02d}.jpg", quality=95)
        else:
            (folder / f"{i:02d}.dcm").write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
    return folder


def _result(out: Path) -> tuple[list[np.ndarray], str]:
    meta = json.loads((out / "meta.json").read_text())
    return [np.load(out / s) for s in meta["shards"]], (out / "index.csv").read_text()


def _spy(monkeypatch) -> list[tuple[int, list[str]]]:
    """Every decode batch: (threads, files), for read_many and for the PNG/JPEG pool alike."""
    calls: list[tuple[int, list[str]]] = []
    real_many = dicom.read_many
    real_batches = prep_mod.Preparer.batches

    def read_many(paths, *, num_threads=None, **kw):
        calls.append((num_threads, [str(p) for p in paths]))
        return real_many(paths, num_threads=num_threads, **kw)

    def batches(self, indices, paths):
        groups = real_batches(self, indices, paths)
        calls.extend((t, [str(paths[i]) for i in g]) for t, g in groups if paths[g[0]].suffix != ".dcm")
        return groups

    monkeypatch.setattr(dicom, "read_many", read_many)
    monkeypatch.setattr(prep_mod.Preparer, "batches", batches)
    return calls


def _cost(path: str) -> int:
    p = Path(path)
    pixels = prep_mod._image_pixels(p) if p.suffix != ".dcm" else prep_mod._dicom_pixels(dicom.read_header(p))
    return decode_cost(p.stat().st_size, pixels)


@pytest.mark.parametrize("budget_of_large", [2.5, 1.0, 0.3])
def test_budget_bounds_decodes_in_flight_and_result_equals_unbudgeted(tmp_path, mixed, monkeypatch, budget_of_large):
    reference = prepare(str(mixed), str(tmp_path / "free"), size=64, workers=4, max_memory=None)
    large = decode_cost((mixed / "02.dcm").stat().st_size, 400 * 393)
    budget = int(budget_of_large * large)
    calls = _spy(monkeypatch)
    meta = prepare(str(mixed), str(tmp_path / "budget"), size=64, workers=4, max_memory=budget)
    assert sum(len(files) for _, files in calls) == 18
    for threads, files in calls:
        costliest = max(_cost(f) for f in files)
        assert threads == 1 or threads * costliest <= budget, (threads, costliest, budget)
        assert 1 <= threads <= 4
    assert {t for t, _ in calls} != {4}  # the budget made some batch narrower
    over = [n for n in meta["notes"] if n.startswith("--max-memory")]
    assert bool(over) == (budget < large)  # the 400-pixel files alone exceed 0.3 of their cost
    if over:
        assert "6 files estimated over it alone" in over[0]
    shards, index = _result(tmp_path / "budget")
    ref_shards, ref_index = _result(tmp_path / "free")
    assert index == ref_index and meta["images"] == reference["images"] == 18
    for a, b in zip(shards, ref_shards, strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_budget_is_half_the_memory_shared_by_local_processes():
    whole = prep_mod.default_memory({})
    assert whole is not None and 0 < whole <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert prep_mod.default_memory({"LOCAL_WORLD_SIZE": "4"}) == whole // 4


def test_image_headers_are_read_only_when_the_budget_can_bind(tmp_path, mixed, monkeypatch):
    read = []
    real = prep_mod._image_pixels
    monkeypatch.setattr(prep_mod, "_image_pixels", lambda p: read.append(p) or real(p))
    prepare(str(mixed), str(tmp_path / "a"), size=64, workers=2, max_memory=2**40)
    assert read == []  # 2 decodes of the largest image allowed fit in 1 TiB: no header read ahead
    prepare(str(mixed), str(tmp_path / "b"), size=64, workers=2, max_memory=2**20)
    assert sorted(p.name for p in read) == sorted(p.name for p in mixed.iterdir() if p.suffix != ".dcm")


@pytest.mark.parametrize("text, expected", [("4GB", 4 * 2**30), ("512M", 512 * 2**20), ("1.5GiB", 3 * 2**29),
                                            ("800000000", 800000000), ("64kb", 65536)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("value", ["-1", "abc", "0", "GB", "1.5X", "nan"])
def test_bad_max_memory_is_one_error_line(tmp_path, capsys, mixed, value):
    out = tmp_path / "out"
    _fails(capsys, [str(mixed), str(out), "--max-memory", value], value)
    assert not out.exists()


def test_max_memory_underscore_spelling_works(tmp_path, capsys, mixed):
    main([str(mixed), str(tmp_path / "out"), "--size", "32", "--max_memory", "512KB"])
    assert "--max-memory 0.5 MiB: 6 files estimated over it alone" in capsys.readouterr().out


_CHILD = """
import json, sys
from cxrfast.prepare import prepare
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS now: the peak of the imports is not prepare's
base = status("VmRSS")
prepare(sys.argv[1], sys.argv[2], size=64, workers=4, max_memory=json.loads(sys.argv[3]))
print(json.dumps(status("VmHWM") - base))
"""


def _peak_added(src: Path, out: Path, budget: int | None) -> int:
    """Peak resident bytes a fresh process adds while preparing ``src`` (VmHWM reset after the
    imports). glibc's malloc gets a fixed mmap threshold: otherwise it raises it after the
    first large free and keeps freed decode buffers in its per-thread arenas, so the peak of
    the unbudgeted run counts memory no decode holds any more (72 MB became 105 MB here)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MALLOC_MMAP_THRESHOLD_="131072")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), json.dumps(budget)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_real_process_stays_within_the_budget(tmp_path):
    """8 uncompressed 3000x3000 16-bit files (18 MB each, estimated 54 MB a decode), 4 threads:
    with a 60 MB budget one decodes at a time, and the process's peak stays under it."""
    src = tmp_path / "big"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        a = rng.integers(0, 4096, (3000, 3000), dtype=np.uint16)
        (src / f"{i}.dcm").write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
    budget = 60 * 2**20
    assert 4 * decode_cost((src / "0.dcm").stat().st_size, 3000 * 3000) > 3 * budget
    bounded = _peak_added(src, tmp_path / "bounded", budget)
    free = _peak_added(src, tmp_path / "free", None)
    assert bounded <= budget < free, (bounded / 2**20, free / 2**20)
    assert _result(tmp_path / "bounded")[1] == _result(tmp_path / "free")[1]
    for a, b in zip(_result(tmp_path / "bounded")[0], _result(tmp_path / "free")[0], strict=True):
        np.testing.assert_array_equal(a, b)
    print(f"peak added: {bounded / 2**20:.0f} MiB with a {budget / 2**20:.0f} MiB budget, "
          f"{free / 2**20:.0f} MiB without")
