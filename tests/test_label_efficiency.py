"""python -m train.label_efficiency: a tiny study writes its table, numbers and figure; a
killed study resumes without redoing a finished run; other settings on the same folder, a
failed run and a missing demo checkpoint are each one error line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cxrfast.models import mae
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import engine, finetune, label_efficiency as le


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """40 small demo DICOMs (20 patients) with labels.csv, and a vit_tiny MAE checkpoint at 32 px."""
    root = tmp_path_factory.mktemp("le")
    data = ensure_demo_dataset(root / "images", count=40, size=64)
    torch.manual_seed(0)
    ckpt = root / "mae.pth"
    torch.save({"model": mae("vit_tiny", img_size=32, in_chans=1).state_dict(), "kind": "pretrain",
                "config": {"model": "vit_tiny", "img_size": 32, "in_chans": 1}}, ckpt)
    return data, ckpt


def argv(inputs, out, *extra):
    data, ckpt = inputs
    return ["--data", str(data), "--labels", str(data / "labels.csv"), "--pretrained", str(ckpt),
            "--output_dir", str(out), "--fractions", "0.5", "--seeds", "0", "--arms", "mae_finetune,linear_probe",
            "--split_fractions", "0.5,0.2,0.3", "--epochs", "1", "--warmup_epochs", "0", "--batch_size", "4",
            "--lr", "1e-4", "--num_workers", "0", "--device", "cpu", "--resamples", "20", *extra]


def fails(capsys, code, args) -> str:
    with pytest.raises(SystemExit) as exc:
        le.main([str(a) for a in args])
    assert exc.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def study(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    report = le.main(argv(inputs, out, "--min_steps", "3"))
    return out, report


def test_tiny_study_writes_table_numbers_and_figure(study):
    out, report = study
    runs = {(r["arm"], r["fraction"], r["seed"]): r for r in report["runs"]}
    assert set(runs) == {("mae_finetune", 0.5, 0), ("linear_probe", 0.5, 0)}
    on_disk = json.loads((out / "label_efficiency.json").read_text())
    assert on_disk["runs"] == report["runs"]
    for r in runs.values():
        assert 0 <= r["mean_auroc"] <= 1 and r["mean_low"] <= r["mean_auroc"] <= r["mean_high"]
        assert set(r["classes"]) == set(FINDINGS)
        assert r["test_images"] == on_disk["test_images"] > 0
    # the same test split for both arms: the same labels, scored by each
    with np.load(out / "runs" / "mae_finetune_f0.5_s0" / "scores.npz") as a, \
            np.load(out / "runs" / "linear_probe_f0.5_s0" / "scores.npz") as b:
        np.testing.assert_array_equal(a["labels"], b["labels"])
        assert not np.allclose(a["scores"], b["scores"])
    # half of the training split, the same images for both arms (the seed picks them)
    assert runs[("mae_finetune", 0.5, 0)]["train_images"] == runs[("linear_probe", 0.5, 0)]["train_images"]
    assert runs[("mae_finetune", 0.5, 0)]["train_images"] == round(on_disk["train_images_total"] * 0.5)
    cell = {c["arm"]: c for c in report["summary"]}
    assert cell["linear_probe"]["mean_auroc"] == pytest.approx(runs[("linear_probe", 0.5, 0)]["mean_auroc"])
    md = (out / "label_efficiency.md").read_text()
    assert "| MAE fine-tuned |" in md and "| MAE linear probe |" in md and "random" not in md.split("##")[0]
    assert "Per-class" in md and all(n in md for n in FINDINGS)
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a finished fine-tuning run keeps its numbers and logs, not its model files
    run = out / "runs" / "mae_finetune_f0.5_s0"
    assert (run / "log.txt").is_file() and not list(run.glob("*.pth"))
    # --min_steps 3: a subset of 2 steps per epoch (batch 4) is fine-tuned for 2 epochs, not 1
    tuned = runs[("mae_finetune", 0.5, 0)]
    per_epoch = tuned["train_images"] // tuned["batch_size"]
    assert tuned["epochs"] == max(1, -(-3 // per_epoch))
    assert json.loads((run / "summary.json").read_text())["steps"] == tuned["epochs"] * per_epoch >= 3


def test_other_settings_on_the_same_folder_are_an_error(study, inputs, tmp_path, capsys):
    out, _ = study
    before = (out / "study.json").read_text()
    line = fails(capsys, 2, argv(inputs, out, "--min_steps", "3", "--fractions", "0.25"))
    assert "fractions 0.5 (now 0.25)" in line and str(out) in line
    other = tmp_path / "other.pth"
    other.write_bytes(inputs[1].read_bytes())
    line = fails(capsys, 2, argv(inputs, out, "--min_steps", "3", "--pretrained", other))
    assert "pretrained" in line and "other.pth" in line
    assert (out / "study.json").read_text() == before


def test_settings_that_change_no_number_may_differ(study, inputs, capsys, monkeypatch):
    out, report = study
    monkeypatch.setattr(finetune, "main", lambda a: pytest.fail("a finished run was run again"))
    again = le.main(argv(inputs, out, "--min_steps", "3", "--resamples", "30", "--num_workers", "1", "--threads", "1"))
    assert again["runs"] == report["runs"]
    assert capsys.readouterr().out.count("(finished before)") == 2


def test_killed_study_resumes_at_the_next_unfinished_run(inputs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def killed(self, data):
        raise KeyboardInterrupt  # the study is stopped during its second run

    with monkeypatch.context() as m:
        m.setattr(le.Study, "probe", killed)
        with pytest.raises(KeyboardInterrupt):
            le.main(argv(inputs, out))
    first = out / "runs" / "mae_finetune_f0.5_s0" / "result.json"
    assert first.is_file() and not (out / "runs" / "linear_probe_f0.5_s0" / "result.json").exists()
    assert not (out / "label_efficiency.md").exists()
    recorded = first.read_text()
    capsys.readouterr()
    monkeypatch.setattr(finetune, "main", lambda a: pytest.fail("the finished run was run again"))
    report = le.main(argv(inputs, out))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/2] mae_finetune") and "finished before" in lines[0]
    assert lines[1].startswith("[2/2] linear_probe") and "test AUROC" in lines[1]
    assert first.read_text() == recorded
    assert len(report["runs"]) == 2 and (out / "label_efficiency.png").is_file()


def test_failed_fine_tuning_run_is_one_error_line(inputs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(engine.FAULT_ENV, "0:1")  # the loss turns NaN at step 1: fine-tuning exits 3
    out = tmp_path / "out"
    line = fails(capsys, 3, argv(inputs, out))
    assert "[1/2] mae_finetune fraction 0.5" in line and "loss is nan" in line and "log.txt" in line
    assert not (out / "runs" / "mae_finetune_f0.5_s0" / "result.json").exists()


def test_tiny_fraction_trains_on_one_image_and_says_so():
    labels = np.array([[1.0, 0.0, np.nan]])
    notes = le.few_labels_notes(0.01, 30, labels, ["A", "B", "C"])
    assert notes[0].startswith("0.01 of 30 training images is 0.30: trained on 1 image")
    assert notes[1].endswith("for A, B, C")
    assert le.few_labels_notes(0.1, 30, np.array([[1.0], [0.0], [1.0]]), ["A"]) == []


def test_demo_without_pretraining_checkpoint_says_what_to_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = fails(capsys, 2, [])
    assert "python -m train.pretrain" in line


@pytest.mark.parametrize("args, named", [(["--fractions", "0"], "--fractions 0.0"),
                                         (["--fractions", "1.5"], "--fractions 1.5"),
                                         (["--arms", "mae_finetune,nope"], "--arms nope"),
                                         (["--seeds", "0,0"], "--seeds 0,0")])
def test_bad_options_are_one_error_line(inputs, tmp_path, capsys, args, named):
    line = fails(capsys, 2, argv(inputs, tmp_path / "out", *args))
    assert named in line
    assert not (tmp_path / "out").exists()


def test_data_without_pretrained_is_an_error(inputs, tmp_path, capsys):
    line = fails(capsys, 2, ["--data", inputs[0], "--output_dir", tmp_path / "out"])
    assert "--pretrained" in line


def test_dataset_protocol_options_reach_every_run_unchanged():
    """--label_set, --split_files, --view ... of the study are the fine-tuning runs' own."""
    from train import config, labelled

    argv = ["--label_set", "chexpert5", "--split_files", "train_val_list.txt,test_list.txt", "--view", "PA,AP",
            "--labels_map", "Effusion=Pleural Effusion", "--test_labels", "valid.csv", "--rad_vote", "any"]
    study, _ = config.parse(le.StudyConfig, argv, "study", "")
    run, _ = config.parse(finetune.FinetuneConfig, labelled.protocol_argv(study), "run", "")
    assert labelled.protocol_of(run) == labelled.protocol_of(study)
    assert labelled.protocol_of(study).split_files == ("train_val_list.txt", "test_list.txt")
