"""python -m cxrfast.prepare: shards + index round trip, labels aligned, dedup, errors, resume."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrfast.prepare import prepare
from dicom_factory import make_dicom

ROOT = Path(__file__).resolve().parents[1]


def _tree(folder: Path, n: int = 12) -> dict[str, int]:
    """Images whose brightness encodes their label: label 1 = bright, 0 = dark; mixed formats."""
    rng = np.random.default_rng(0)
    truth = {}
    sub = folder / "nested" / "deeper"
    sub.mkdir(parents=True)
    for i in range(n):
        label = int(rng.integers(0, 2))
        level = 3000 if label else 800
        a = (level + rng.integers(0, 50, (40, 20 + i))).astype(np.uint16)  # not square: padding
        kind = i % 4
        if kind in (0, 1):
            name = f"img{i:02d}.dcm"
            (sub if kind else folder).joinpath(name).write_bytes(
                make_dicom(a, bits_stored=12, photometric="MONOCHROME1" if kind else "MONOCHROME2",
                           window=(2048, 4096)) if kind == 0 else
                make_dicom((4095 - a).astype(np.uint16), bits_stored=12, photometric="MONOCHROME1", window=(2048, 4096)))
        elif kind == 2:
            name = f"img{i:02d}.png"
            Image.fromarray((a * 16).astype(np.uint16)).save(folder / name)  # 16-bit PNG
        else:
            name = f"img{i:02d}.jpg"
            Image.fromarray((a // 16).astype(np.uint8)).save(folder / name, quality=95)
        truth[name] = label
    return truth


def _labels_csv(path: Path, truth: dict[str, int]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "Bright"])
        for name, label in truth.items():
            w.writerow([name, label])


def test_round_trip_keeps_labels_aligned_with_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    truth = _tree(src)
    (src / "zz_dup.dcm").write_bytes((src / "img00.dcm").read_bytes())  # same SOP Instance UID
    (src / "zz_dup.png").write_bytes((src / "img02.png").read_bytes())  # same bytes
    (src / "broken.dcm").write_bytes((src / "img00.dcm").read_bytes()[:500])
    (src / "notes.txt").write_text("not an image")
    _labels_csv(tmp_path / "labels.csv", truth)
    out = tmp_path / "prepared"
    meta = prepare(str(src), str(out), size=32, labels=str(tmp_path / "labels.csv"), workers=2)
    assert meta["images"] == len(truth) and meta["duplicates"] == 2 and meta["label_names"] == ["Bright"]
    rows = list(csv.DictReader(open(out / "index.csv")))
    assert len(rows) == len(truth)
    errors = (out / "errors.csv").read_text()
    assert "broken.dcm" in errors and "TruncatedError" in errors
    for r in rows:
        shard = np.load(out / f"shard_{int(r['shard']):05d}.npy", mmap_mode="r")
        img = shard[int(r["offset"])]
        assert img.shape == (32, 32) and img.dtype == np.uint8
        top, left, h, w = (int(r[k]) for k in ("pad_top", "pad_left", "content_h", "content_w"))
        content = img[top:top + h, left:left + w].astype(float)
        assert h == 32 and w < 32  # longer side fills, the rest is padding
        assert img[:, :left].max(initial=0) == 0
        label = truth[Path(r["source"]).name]
        assert int(r["label_Bright"]) == label
        assert (content.mean() > 100) == bool(label), r["source"]  # brightness agrees with the label
        assert r["split"] in ("train", "val", "test")
    m = json.loads((out / "meta.json").read_text())
    assert m["size"] == 32 and m["dtype"] == "uint8"


def test_uint16_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tree(src, 4)
    out = tmp_path / "p16"
    prepare(str(src), str(out), size=24, dtype="uint16", workers=1)
    arr = np.load(out / "shard_00000.npy")
    assert arr.dtype == np.uint16 and arr.shape == (4, 24, 24) and arr.max() > 255


def test_resume_skips_finished_shards_and_redoes_broken_ones(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tree(src, 8)
    out = tmp_path / "p"
    tiny = 2 * 32 * 32 / 2**30  # two images per shard
    prepare(str(src), str(out), size=32, workers=1, shard_gb=tiny)
    shards = sorted(out.glob("shard_*.npy"))
    assert len(shards) == 4
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    # a crash mid-shard leaves a temporary file and no shard
    shards[2].unlink()
    (out / "shard_00002.npy.tmp").write_bytes(b"partial")
    index_before = (out / "index.csv").read_text()
    prepare(str(src), str(out), size=32, workers=1, shard_gb=tiny)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(out.glob("shard_*.npy"))}
    assert set(after) == set(before)
    assert all(after[k] == before[k] for k in before if k != shards[2].name)
    assert after[shards[2].name] != before[shards[2].name]
    assert (out / "index.csv").read_text() == index_before


def test_cli_help_and_run(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _tree(src, 4)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    h = subprocess.run([sys.executable, "-m", "cxrfast.prepare", "--help"], capture_output=True, text=True, env=env)
    assert h.returncode == 0 and "--size" in h.stdout and "shard" in h.stdout
    r = subprocess.run([sys.executable, "-m", "cxrfast.prepare", str(src), str(tmp_path / "o"), "--size", "16"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "prepared 4 images" in r.stdout


@pytest.mark.parametrize("fmt", ["nih14", "chexpert", "mimic"])
def test_label_formats_through_prepare(tmp_path, fmt):
    src = tmp_path / "src"
    src.mkdir()
    truth = _tree(src, 4)
    names = sorted(truth)
    if fmt == "nih14":
        path = tmp_path / "Data_Entry_2017.csv"
        path.write_text("Image Index,Finding Labels,Patient ID\n" + "".join(
            f"{n},{'Effusion' if truth[n] else 'No Finding'},{k}\n" for k, n in enumerate(names)))
        col = "label_Effusion"
    elif fmt == "chexpert":
        path = tmp_path / "train.csv"
        path.write_text("Path,Pleural Effusion\n" + "".join(f"{n},{'1.0' if truth[n] else '-1.0'}\n" for n in names))
        col = "label_Pleural Effusion"
    else:
        path = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
        path.write_text("subject_id,study_id,Pleural Effusion\n" + "".join(
            f"{k},{100 + k},{'1.0' if truth[n] else ''}\n" for k, n in enumerate(names)))
        (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text("dicom_id,subject_id,study_id,ViewPosition\n" + "".join(
            f"{Path(n).stem},{k},{100 + k},PA\n" for k, n in enumerate(names)))
        col = "label_Pleural Effusion"
    out = tmp_path / "o"
    prepare(str(src), str(out), size=16, labels=str(path), label_format=fmt, uncertain="zeros", workers=1)
    rows = list(csv.DictReader(open(out / "index.csv")))
    for r in rows:
        assert float(r[col]) == truth[Path(r["source"]).name]
