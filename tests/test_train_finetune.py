"""Fine-tuning and evaluation: label formats, splits, metrics, and an end-to-end run that must
beat chance on the demo labels."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.data import patient_split, read_labels
from cxrfast.data.labels import fraction_subset
from cxrfast.synthetic import ensure_demo_dataset
from train import metrics

ROOT = Path(__file__).resolve().parents[1]


def test_nih_labels(tmp_path):
    p = tmp_path / "Data_Entry_2017.csv"
    p.write_text("Image Index,Finding Labels,Follow-up #,Patient ID\n"
                 "00000001_000.png,Cardiomegaly|Effusion,0,1\n00000002_000.png,No Finding,0,2\n"
                 "00000003_000.png,Pleural_Thickening,0,3\n")
    t = read_labels(p)
    assert len(t.names) == 14 and t.keys[0] == "00000001_000.png"
    assert t.labels[0, t.names.index("Cardiomegaly")] == 1 and t.labels[0, t.names.index("Effusion")] == 1
    assert t.labels[0].sum() == 2 and t.labels[1].sum() == 0
    assert t.labels[2, t.names.index("Pleural_Thickening")] == 1
    assert t.patients == ["1", "2", "3"]


@pytest.mark.parametrize("policy,expected", [("ones", 1.0), ("zeros", 0.0), ("ignore", np.nan)])
def test_chexpert_uncertainty_policies(tmp_path, policy, expected):
    p = tmp_path / "train.csv"
    p.write_text("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Edema\n"
                 "CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0,,\n"
                 "CheXpert-v1.0/train/patient00002/study1/view1_frontal.jpg,M,50,Frontal,AP,,-1.0,1.0\n")
    t = read_labels(p, uncertain=policy)
    assert t.names == ["No Finding", "Cardiomegaly", "Edema"]
    np.testing.assert_array_equal(t.labels[0], [1, 0, 0])
    np.testing.assert_array_equal(t.labels[1], [0, expected, 1])
    assert t.patients == ["patient00001", "patient00002"]


def test_generic_labels_and_fraction(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("path,patient_id,A,B\nx/1.dcm,p1,1,0\nx/2.dcm,p1,0,1\nx/3.dcm,p2,1,1\n")
    t = read_labels(p)
    assert t.names == ["A", "B"] and t.patients == ["p1", "p1", "p2"]
    a = fraction_subset(1000, 0.1, seed=3)
    assert len(a) == 100 and np.array_equal(a, fraction_subset(1000, 0.1, seed=3))
    assert len(fraction_subset(50, 0.01)) == 1


def test_patient_split_keeps_patients_together():
    patients = [f"p{i // 3}" for i in range(3000)]
    split = patient_split(patients, (0.7, 0.1, 0.2))
    for i in range(0, 3000, 3):
        assert split[i] == split[i + 1] == split[i + 2]
    share = {s: split.count(s) / 3000 for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.7) < 0.05 and abs(share["test"] - 0.2) < 0.05


def test_metrics_against_brute_force():
    rng = np.random.default_rng()
    y = rng.integers(0, 2, 60).astype(np.float32)
    s = np.round(rng.random(60), 1)  # ties on purpose
    pairs = [(1.0 if a > b else 0.5 if a == b else 0.0) for (a, ya), (b, yb) in
             itertools.product(zip(s, y), repeat=2) if ya == 1 and yb == 0]
    assert metrics.auroc(y, s) == pytest.approx(np.mean(pairs))
    # average precision: mean over positives of precision at their score threshold
    precisions = [((s >= t) & (y == 1)).sum() / (s >= t).sum() for t in s[y == 1]]
    assert metrics.average_precision(y, s) == pytest.approx(np.mean(precisions))
    y_nan = y.copy()
    y_nan[:10] = np.nan
    assert metrics.auroc(y_nan, s) == pytest.approx(metrics.auroc(y[10:], s[10:]))


def _run(module, args):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_finetune_beats_chance_and_evaluate_reports(tmp_path):
    data = ensure_demo_dataset(tmp_path / "cxr", count=96, size=64)
    out = tmp_path / "ft"
    _run("train.finetune", ["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir", str(out),
                            "--model", "vit_tiny", "--img_size", "64", "--epochs", "8", "--warmup_epochs", "1",
                            "--batch_size", "8", "--lr", "1e-3", "--num_workers", "0", "--log_every", "5",
                            "--split_fractions", "0.6,0.2,0.2", "--drop_path", "0.0", "--mixup", "0.2",
                            "--cutmix", "0.2", "--label_smoothing", "0.05"])
    assert (out / "best.pth").exists() and (out / "config.json").exists()
    ev = tmp_path / "eval"
    _run("train.evaluate", ["--checkpoint", str(out / "best.pth"), "--output_dir", str(ev)])
    result = json.loads((ev / "metrics.json").read_text())
    assert result["split"] == "test" and result["images"] > 10
    assert set(result["classes"]) == {"Effusion", "Nodule", "Cardiomegaly"}
    assert result["classes"]["Effusion"]["auroc"] > 0.75  # a large bright region: easy to learn
    assert result["mean_auroc"] > 0.6
    assert (ev / "roc.png").stat().st_size > 1000 and "AUROC" in (ev / "metrics.md").read_text()


def test_two_process_validation_drops_unreadable_and_matches_evaluate(tmp_path):
    """Validation under DDP (2 gloo processes) scores each rank's share, gathers the scores by
    index and leaves an unreadable image out with its labels: the logged validation AUROC
    equals a one-process evaluation of best.pth on the same split."""
    from train import evaluate

    demo = ensure_demo_dataset(tmp_path / "demo", count=24, size=64)
    data = tmp_path / "images"
    data.mkdir()
    rows = ["path,split,Effusion,Nodule"]
    for i in range(24):
        name = f"cxr_{i:03d}.dcm"
        raw = (demo / name).read_bytes()
        (data / name).write_bytes(raw[:400] if i == 19 else raw)  # one unreadable validation image
        rows.append(f"{name},{'train' if i < 16 else 'val'},{i % 2},{(i // 2) % 2}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ft"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.finetune", "--data", str(data), "--labels", str(data / "labels.csv"),
                           "--output_dir", str(out), "--model", "vit_tiny", "--img_size", "64", "--epochs", "1",
                           "--warmup_epochs", "0", "--batch_size", "4", "--num_workers", "0", "--device", "cpu",
                           "--log_every", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    val = [r for r in records if "val_mean_auroc" in r]
    assert len(val) == 1 and val[0]["val_images"] == 7 and val[0]["val_unreadable"] == 1
    assert "cxr_019.dcm" in (out / "val_errors.csv").read_text()
    result = evaluate.main(["--checkpoint", str(out / "best.pth"), "--split", "val", "--device", "cpu",
                            "--output_dir", str(tmp_path / "ev")])
    assert (result["images"], result["unreadable"]) == (7, 1)
    assert val[0]["val_mean_auroc"] == pytest.approx(result["mean_auroc"], abs=1e-6)


FT_TINY = ["--model", "vit_tiny", "--img_size", "64", "--batch_size", "4", "--num_workers", "0", "--epochs", "3",
           "--warmup_epochs", "1", "--lr", "1e-3", "--log_every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def two_step_epochs(tmp_path_factory):
    """8 training images (2 steps of batch 4 per epoch) and 8 validation images."""
    root = tmp_path_factory.mktemp("ft2")
    data = ensure_demo_dataset(root / "cxr", count=16, size=64)
    rows = ["path,split,Effusion,Nodule"] + [f"cxr_{i:03d}.dcm,{'train' if i < 8 else 'val'},{i % 2},{(i // 2) % 2}"
                                             for i in range(16)]
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return ["--data", str(data), "--labels", str(root / "labels.csv"), *FT_TINY]


def _finetune(args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train.finetune", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_exploding_update_writes_no_best_or_final_model(tmp_path, two_step_epochs):
    """lr 1e30: step 1 (lr 0 in warmup) is fine, step 2 (the epoch's last) explodes. The epoch
    end must stop before validation, so no best.pth with 1e29 weights is left for evaluate."""
    out = tmp_path / "ft"
    args = [*two_step_epochs, "--output_dir", str(out), "--save_every", "100"]
    args[args.index("--lr") + 1] = "1e30"
    proc = _finetune(args, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "parameters are not finite after step 2" in proc.stderr
    assert not (out / "best.pth").exists() and not (out / "final.pth").exists()
    assert not list(out.glob("checkpoint-*.pth"))
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert not [r for r in records if "val_mean_auroc" in r], "validation ran on exploded parameters"


def test_save_model_refuses_non_finite_parameters(tmp_path):
    from cxrfast.models import classifier
    from train import config, engine, finetune

    model = classifier("vit_tiny", img_size=64, num_classes=2)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    cfg, _ = config.parse(finetune.FinetuneConfig, ["--model", "vit_tiny", "--img_size", "64"], "f", "")
    with pytest.raises(engine.NonFiniteLoss, match="final.pth"):
        finetune.save_model(tmp_path / "final.pth", model, cfg, ["A", "B"], None)
    assert not (tmp_path / "final.pth").exists()


def test_resume_from_an_epoch_end_checkpoint_repeats_no_metric(tmp_path, two_step_epochs):
    """--save_every 2 with 2 steps per epoch puts every checkpoint on an epoch's last step. A
    run stopped there (--max_steps 4) and resumed logs each (step, key) once, and its losses
    and validation AUROCs equal those of an uninterrupted run."""
    ref, part = tmp_path / "ref", tmp_path / "part"
    common = [*two_step_epochs, "--save_every", "2"]
    _finetune([*common, "--output_dir", str(ref)])
    _finetune([*common, "--output_dir", str(part), "--max_steps", "4"])
    state = torch.load(part / "checkpoint-00000004.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (2, 0), "an epoch-end checkpoint resumes in the next epoch"
    r = _finetune([*common, "--output_dir", str(part), "--resume", "auto"])
    assert "step 4" in r.stdout

    def logged(folder):
        seen = {}
        for line in open(folder / "metrics.jsonl"):
            rec = json.loads(line)
            for key in ("loss", "val_mean_auroc", "val_mean_auprc", "val_images"):
                if key in rec:
                    assert (rec["step"], key) not in seen, f"{folder.name}: step {rec['step']} {key} logged twice"
                    seen[rec["step"], key] = rec[key]
        return seen

    expected, got = logged(ref), logged(part)
    assert sum(k == "val_mean_auroc" for _, k in expected) == 3
    assert got == expected
