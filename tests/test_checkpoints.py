"""Checkpoints as data: weights-only loading, refused pickles, reported mismatches,
--pretrained resolution, --resume auto fallback, RNG round trip, logs truncated on resume."""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.models import classifier, mae
from cxrfast.models.checkpoints import (CheckpointError, CheckpointMismatchError, UnsafeCheckpointError, filter_for,
                                        load_file, load_pretrained, saved_config)
from cxrfast.synthetic import ensure_demo_dataset
from train import checkpoints, config, finetune, logs, runtime

ROOT = Path(__file__).resolve().parents[1]
MARKER_ENV = "CXRFAST_TEST_MARKER"


class _Planted:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_mae() -> torch.nn.Module:
    return mae("vit_tiny", img_size=64, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)


def plant(path: Path, marker: Path) -> Path:
    torch.save({"model": tiny_mae().state_dict(), "optimizer": {}, "epoch": 0, "step_in_epoch": 0,
                "global_step": 99, "rng": [], "hook": _Planted(marker)}, path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return ensure_demo_dataset(tmp_path_factory.mktemp("cxr"), count=12, size=64)


@pytest.fixture(scope="module")
def cxrfast_ckpt(tmp_path_factory) -> Path:
    """A pretraining checkpoint as train.pretrain writes it: weights plus the resolved config."""
    path = tmp_path_factory.mktemp("pt") / "checkpoint-00000001.pth"
    torch.manual_seed(0)
    checkpoints.save_atomic({"model": tiny_mae().state_dict(), "config": {"model": "vit_tiny", "img_size": 64,
                                                                          "in_chans": 1}, "kind": "pretrain"}, path)
    return path


def test_planted_pickle_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    path = plant(tmp_path / "checkpoint-00000099.pth", marker)
    for load in (load_file, checkpoints.load, lambda p: load_pretrained(tiny_mae(), p)):
        with pytest.raises(UnsafeCheckpointError, match="refused.*posix.system"):
            load(path)
    with pytest.raises(UnsafeCheckpointError):
        checkpoints.load_resume("auto", tmp_path)
    assert not marker.exists()


def test_resume_auto_refuses_a_planted_checkpoint(tmp_path, data):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "marker"
    plant(out / "checkpoint-00000099.pth", marker)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", "--data", str(data), "--output_dir", str(out),
                           "--resume", "auto", "--model", "vit_tiny", "--img_size", "64", "--decoder_dim", "64",
                           "--decoder_depth", "1", "--decoder_heads", "2", "--batch_size", "4", "--num_workers", "0",
                           "--max_steps", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "refused" in proc.stderr and "checkpoint-00000099.pth" in proc.stderr
    assert not marker.exists()


def test_mae_layout_with_argparse_namespace_loads(tmp_path):
    """facebookresearch/mae and RETFound save {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}."""
    src = mae("vit_tiny", img_size=64)
    args = argparse.Namespace(model="mae_vit_tiny_patch16", input_size=64, mask_ratio=0.75, lr=None, blr=1.5e-4,
                              norm_pix_loss=True, device="cuda", output_dir="./output_dir")
    path = tmp_path / "mae.pth"
    torch.save({"model": src.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
                "scaler": {"scale": 65536.0}, "args": args}, path)
    ckpt = load_file(path)
    assert saved_config(ckpt) == {"model": "vit_tiny", "img_size": 64}
    model = classifier("vit_tiny", img_size=64, num_classes=3)
    report = load_pretrained(model, path)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert "decoder_pred.weight" in report.dropped and "mask_token" in report.dropped


@pytest.mark.parametrize("content", [b"", b"garbage" * 50, None])
def test_unreadable_files_give_a_clear_error(tmp_path, cxrfast_ckpt, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(cxrfast_ckpt.read_bytes()[:4000] if content is None else content)
    with pytest.raises(CheckpointError, match="bad.pth: not a readable checkpoint"):
        load_file(path)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_file(tmp_path / "missing.pth")


def test_filter_reports_every_dropped_and_mismatched_key():
    sd = mae("vit_tiny", img_size=64, in_chans=3).state_dict()
    sd["head.weight"], sd["head.bias"] = torch.zeros(7, 192), torch.zeros(7)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 192)
    sd["blocks.99.mlp.fc1.weight"] = torch.zeros(1)
    model = classifier("vit_tiny", img_size=128, num_classes=3)
    filtered = filter_for(model, sd)
    assert "blocks.99.mlp.fc1.weight" in filtered.dropped and "decoder_embed.weight" in filtered.dropped
    assert {k for k, _, _ in filtered.mismatched} == {"head.weight", "head.bias", "blocks.0.attn.qkv.weight"}
    assert [k for k, _, _ in filtered.unexpected_mismatches] == ["blocks.0.attn.qkv.weight"]
    assert filtered.state_dict["patch_embed.proj.weight"].shape == (192, 1, 16, 16)  # channels converted
    assert filtered.state_dict["pos_embed"].shape == (1, 65, 192)  # grid resampled
    with pytest.raises(CheckpointMismatchError, match=r"blocks.0.attn.qkv.weight \[10, 192\] vs \[576, 192\]"):
        load_pretrained(model, {"model": sd})
    report = load_pretrained(model, {"model": sd}, allow_mismatch=True)
    assert ("blocks.0.attn.qkv.weight", (10, 192), (576, 192)) in report.mismatched
    assert "blocks.0.attn.qkv.weight" in report.describe()


def test_another_preset_is_an_error_not_a_fresh_model():
    with pytest.raises(CheckpointMismatchError, match="do not fit"):
        load_pretrained(classifier("vit_small", img_size=64, num_classes=2), {"model": tiny_mae().state_dict()})


def test_pretrained_takes_preset_size_and_channels_from_the_checkpoint(tmp_path, cxrfast_ckpt, capsys):
    cfg, explicit = config.parse(finetune.FinetuneConfig, ["--pretrained", str(cxrfast_ckpt)], "f", "")
    assert cfg.model == "vit_base" and cfg.img_size == 224
    cfg, ckpt = finetune.resolve_pretrained(cfg, explicit)
    assert (cfg.model, cfg.img_size, cfg.in_chans) == ("vit_tiny", 64, 1)
    # the optimizer and the rest are let go, what loading needs is kept: a cxrfast file is grey-normalised
    assert set(ckpt) == {"model", "normalisation"} and ckpt["normalisation"] == {"mean": [0.5], "std": [0.25]}
    assert "--model vit_tiny" in capsys.readouterr().out
    # an explicit other size is a known conversion (position embeddings resampled)
    cfg, explicit = config.parse(finetune.FinetuneConfig, ["--pretrained", str(cxrfast_ckpt), "--img_size", "128"],
                                 "f", "")
    cfg, _ = finetune.resolve_pretrained(cfg, explicit)
    assert (cfg.model, cfg.img_size) == ("vit_tiny", 128)


def _finetune_main(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        finetune.main(argv)
    err = capsys.readouterr().err
    return exc.value.code, err


def test_pretrained_of_another_preset_stops_before_anything_is_written(tmp_path, data, cxrfast_ckpt, capsys):
    out = tmp_path / "out"
    common = ["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir", str(out)]
    code, err = _finetune_main([*common, "--pretrained", str(cxrfast_ckpt), "--model", "vit_small"], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert "vit_small" in err and "vit_tiny" in err and str(cxrfast_ckpt) in err
    # a checkpoint with no config (mae layout) that does not fit the default vit_base
    bare = tmp_path / "bare.pth"
    torch.save({"model": tiny_mae().state_dict()}, bare)
    code, err = _finetune_main([*common, "--pretrained", str(bare)], capsys)
    assert code == 2 and err.count("\n") == 1 and "do not fit" in err and "--allow_mismatch" in err
    assert not out.exists()
    code, err = _finetune_main([*common, "--pretrained", str(bare), "--allow_mismatch", "true"], capsys)
    assert code == 2 and "none of its" in err  # nothing at all fits: never a silent fresh model
    sd = tiny_mae().state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(10, 192)
    torch.save({"model": sd}, bare)
    argv = [*common, "--pretrained", str(bare), "--model", "vit_tiny", "--img_size", "64"]
    code, err = _finetune_main(argv, capsys)
    assert code == 2 and "blocks.0.attn.qkv.weight" in err
    assert not out.exists()
    cfg, explicit = config.parse(finetune.FinetuneConfig, [*argv, "--allow_mismatch", "true"], "f", "")
    assert finetune.resolve_pretrained(cfg, explicit)[0].model == "vit_tiny"


def test_missing_pretrained_is_one_line_exit_2_nothing_created(tmp_path, data):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "train.finetune", "--data", str(data), "--labels",
                           str(data / "labels.csv"), "--output_dir", str(out), "--pretrained",
                           str(tmp_path / "nope.pth")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: --pretrained ")
    assert "nope.pth" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def _training_state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "epoch": 0, "step_in_epoch": step,
            "global_step": step, "rng": [checkpoints.rng_to_saved(runtime.rng_state())]}


def _damaged(raw: bytes, damage: str) -> bytes:
    if damage.startswith("garbage"):  # seeded: random bytes reach many unpickler paths (IndexError, KeyError...)
        return random.Random(int(damage.split("-")[1])).randbytes(len(raw))
    return {"truncate": raw[: len(raw) // 2], "empty": b""}[damage]


@pytest.mark.parametrize("damage", ["truncate", "empty"] + [f"garbage-{seed}" for seed in range(24)])
def test_resume_auto_falls_back_past_an_unreadable_newest(tmp_path, capsys, damage):
    for step in (2, 4, 6):
        checkpoints.save(tmp_path, step, _training_state(step), keep_last=3)
    newest = checkpoints.path_for(tmp_path, 6)
    newest.write_bytes(_damaged(newest.read_bytes(), damage))
    path, state = checkpoints.load_resume("auto", tmp_path)
    assert path == checkpoints.path_for(tmp_path, 4) and state["global_step"] == 4
    err = capsys.readouterr().err
    assert err.startswith("warning: skipping") and newest.name in err
    for step in (2, 4):
        checkpoints.path_for(tmp_path, step).write_bytes(b"")
    with pytest.raises(CheckpointError, match="none of the 3 checkpoints"):
        checkpoints.load_resume("auto", tmp_path)


def test_rng_states_round_trip_under_weights_only(tmp_path):
    runtime.seed_everything(123)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    saved = runtime.rng_state()
    path = checkpoints.save(tmp_path, 1, {**_training_state(1), "rng": [checkpoints.rng_to_saved(saved)]}, 1)
    expected = (np.random.rand(3), torch.rand(3), __import__("random").random())
    state = torch.load(path, weights_only=True)  # the strict loader reads it back whole
    runtime.set_rng_state(checkpoints.rng_from_saved(state["rng"][0]))
    got = (np.random.rand(3), torch.rand(3), __import__("random").random())
    np.testing.assert_array_equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_metrics_are_truncated_to_the_resume_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = logs.MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write(step, loss=float(step))
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # a line torn by a kill
    log = logs.MetricsLog(tmp_path, resume_step=3)
    for step in range(4, 8):
        log.write(step, loss=10.0 + step)
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert [r["loss"] for r in rows] == [1, 2, 3, 14, 15, 16, 17]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [(s.step, s.value) for s in scalars] == [(1, 1), (2, 2), (3, 3), (4, 14), (5, 15), (6, 16), (7, 17)]
