"""python -m train.evaluate: unreadable images are dropped with their labels (never replaced
by another file under the same labels), counted and listed; DDP evaluation gathers the
ranks' scores into the same result as one process."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.data.direct import ImageDataset, UnreadableImage
from cxrfast.models import classifier
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import evaluate, inference

ROOT = Path(__file__).resolve().parents[1]
BAD = ("cxr_003.dcm", "cxr_010.dcm", "cxr_017.dcm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """22 test-split DICOMs (3 of them truncated), a label CSV of all 22, one of the 19 good
    ones, and a small classifier checkpoint that names neither."""
    root = tmp_path_factory.mktemp("eval")
    demo = ensure_demo_dataset(root / "demo", count=22, size=64)
    images = root / "images"
    images.mkdir()
    with open(demo / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        data = (demo / r["path"]).read_bytes()
        (images / r["path"]).write_bytes(data[:400] if r["path"] in BAD else data)

    def write(path, keep):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "patient_id", "split", *FINDINGS])
            for r in rows:
                if keep(r["path"]):
                    w.writerow([r["path"], r["path"], "test", *(r[k] for k in FINDINGS)])

    write(root / "all.csv", lambda p: True)
    write(root / "good.csv", lambda p: p not in BAD)
    torch.manual_seed(0)
    model = classifier("vit_tiny", img_size=64, in_chans=1, num_classes=len(FINDINGS), global_pool=True)
    ckpt = root / "model.pth"
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": 64, "in_chans": 1, "global_pool": True}}, ckpt)
    return root, images, ckpt


def _evaluate(setup, labels, out, capsys):
    root, images, ckpt = setup
    result = evaluate.main(["--checkpoint", str(ckpt), "--data", str(images), "--labels", str(root / labels),
                            "--output_dir", str(out), "--device", "cpu", "--batch_size", "5"])
    return result, capsys.readouterr().out


def test_unreadable_images_are_dropped_with_their_labels(setup, tmp_path, capsys):
    result, stdout = _evaluate(setup, "all.csv", tmp_path / "all", capsys)
    alone, _ = _evaluate(setup, "good.csv", tmp_path / "good", capsys)
    assert alone["images"] == 19 and alone["unreadable"] == 0
    for name in FINDINGS:  # the scores of the 19 good images, each with its own labels
        assert result["classes"][name]["auroc"] == pytest.approx(alone["classes"][name]["auroc"], abs=1e-9)
        assert result["classes"][name]["positives"] == alone["classes"][name]["positives"]
    assert result["mean_auroc"] == pytest.approx(alone["mean_auroc"], abs=1e-9)
    errors_csv = tmp_path / "all" / "errors.csv"
    assert f"evaluated 19 of 22 images; 3 unreadable, see {errors_csv}" in stdout
    saved = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert (saved["images"], saved["images_in_split"], saved["unreadable"]) == (19, 22, 3)
    with open(errors_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(BAD)
    assert all("TruncatedError" in r["error"] or "Error" in r["error"] for r in rows)
    assert "evaluated 19 of 22 images" in (tmp_path / "all" / "metrics.md").read_text()


def test_rerun_rewrites_the_errors_file(setup, tmp_path, capsys):
    out = tmp_path / "again"
    _evaluate(setup, "all.csv", out, capsys)
    _evaluate(setup, "all.csv", out, capsys)
    assert len((out / "errors.csv").read_text().splitlines()) == 1 + len(BAD)
    _evaluate(setup, "good.csv", out, capsys)  # nothing unreadable now: no stale rows
    assert (out / "errors.csv").read_text().splitlines() == ["path,error"]


def test_training_substitute_brings_its_own_label(setup):
    _, images, _ = setup
    files = [images / "cxr_002.dcm", images / "cxr_003.dcm", images / "cxr_004.dcm"]  # the middle one is bad
    labels = np.array([[0.0], [1.0], [2.0]], np.float32)
    train = ImageDataset(files, img_size=32, train=True, labels=labels)
    x, y = train[1]
    assert float(y[0]) == 2.0  # the substitute (cxr_004) with cxr_004's label, not cxr_003's
    x_next, _ = ImageDataset(files, img_size=32, train=False, labels=labels)[2]
    assert x.shape == x_next.shape
    strict = ImageDataset(files, img_size=32, train=False, labels=labels, substitute=False)
    with pytest.raises(UnreadableImage) as info:
        strict[1]
    assert info.value.index == 1 and "cxr_003.dcm" in str(info.value)


def test_merge_drops_duplicate_indices_and_sorts():
    # rank shares as a padded DistributedSampler would give them: index 0 twice
    a = (np.array([0, 2, 4]), np.array([[0.0], [0.2], [0.4]]), [])
    b = (np.array([1, 3, 0]), np.array([[0.1], [0.3], [0.0]]), [(5, "f5", "TruncatedError: x")])
    merged = inference._merge([a, b], 6)
    np.testing.assert_array_equal(merged.indices, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(merged.values[:, 0], [0.0, 0.1, 0.2, 0.3, 0.4])
    assert merged.total == 6 and merged.unreadable == 1


def test_two_process_evaluation_matches_one_process(setup, tmp_path, capsys):
    root, images, ckpt = setup
    one, _ = _evaluate(setup, "all.csv", tmp_path / "one", capsys)
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.evaluate", "--checkpoint", str(ckpt), "--data", str(images),
                           "--labels", str(root / "all.csv"), "--output_dir", str(out), "--device", "cpu",
                           "--batch_size", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert (two["images"], two["unreadable"]) == (19, 3)
    for name in FINDINGS:
        assert two["classes"][name]["auroc"] == pytest.approx(one["classes"][name]["auroc"], abs=1e-6)
        assert two["classes"][name]["auprc"] == pytest.approx(one["classes"][name]["auprc"], abs=1e-6)
    assert two["mean_auroc"] == pytest.approx(one["mean_auroc"], abs=1e-6)
    assert proc.stdout.count("evaluated 19 of 22 images") == 1  # rank 0 reports, once
