"""What a person reads (issue 11): labelled, captioned reconstruction grids (PNG and
TensorBoard), plain progress lines when stderr is a file, rates to useful precision, one
line per epoch."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train import logs, pictures

MEAN, STD = 0.5, 0.25


def _grid(tmp_path: Path, caption: str | None, b: int = 2, size: int = 32, patch: int = 8) -> tuple[np.ndarray, int]:
    """A grid of flat grey images (value 0.25 + 0.25 i) and a reconstruction of 1.0 everywhere;
    the sheet and the size of a tile with its border."""
    imgs = torch.stack([torch.full((1, size, size), (0.25 + 0.25 * i - MEAN) / STD) for i in range(b)])
    recon = torch.full_like(imgs, (1.0 - MEAN) / STD)
    mask = torch.zeros(b, (size // patch) ** 2)
    mask[:, 0] = 1  # the top-left patch hidden
    path = pictures.reconstruction_grid(imgs, recon, mask, patch, tmp_path / "r" / "grid.png", MEAN, STD, caption)
    return np.asarray(Image.open(path)), size + 2 * pictures.PAD


def test_grid_has_a_header_naming_the_columns_then_the_tiles(tmp_path):
    sheet, tile = _grid(tmp_path, None)
    top = sheet.shape[0] - 2 * tile  # the header's height
    assert top > 8 and sheet[:top].max() == 255  # white text on black above the tiles
    assert sheet.shape == (top + 2 * tile, 4 * tile)
    for col in range(4):  # text in every column's part of the header
        assert sheet[:top, col * tile:(col + 1) * tile].max() == 255, col
    p = pictures.PAD
    row1 = sheet[top + tile + p: top + 2 * tile - p]  # the second image: grey 0.5, reconstruction 1.0
    original, masked, recon, pasted = (row1[:, c * tile + p: (c + 1) * tile - p] for c in range(4))
    assert (original == 128).all() and (recon == 255).all()
    assert (masked[:8, :8] == 0).all() and (masked[8:, 8:] == 128).all()  # the hidden patch is black
    assert (pasted[:8, :8] == 255).all() and (pasted[8:, 8:] == 128).all()  # reconstruction where hidden


def test_caption_is_drawn_below_the_tiles(tmp_path):
    plain, _ = _grid(tmp_path, None)
    captioned, _ = _grid(tmp_path, pictures.reconstruction_caption(True, 0.75))
    assert captioned.shape[1] == plain.shape[1] and captioned.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(captioned[:plain.shape[0]], plain)  # header and tiles unchanged
    assert captioned[plain.shape[0]:].max() == 255  # the caption's text


def test_caption_says_how_norm_pix_reconstructions_were_denormalised():
    norm = pictures.reconstruction_caption(True, 0.75)
    assert "75% of the patches hidden" in norm
    assert "norm_pix_loss" in norm and "true mean and variance" in norm and "not the model's" in norm
    assert "norm_pix" not in pictures.reconstruction_caption(False, 0.9)


def test_pretrain_captions_its_grid_by_its_loss(tmp_path, monkeypatch):
    from cxrfast.models import mae
    from train import pretrain

    captions = []
    monkeypatch.setattr(pictures, "reconstruction_grid", lambda *a: captions.append(a[-1]) or a[4])
    preview = [torch.zeros(1, 32, 32) for _ in range(2)]
    for norm in (True, False):
        model = mae("vit_tiny", img_size=32, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                    norm_pix_loss=norm, mask_ratio=0.75)
        pretrain.save_reconstructions(model, preview, torch.device("cpu"), tmp_path / "x.png")
    assert captions == [pictures.reconstruction_caption(True, 0.75), pictures.reconstruction_caption(False, 0.75)]


def test_pictures_go_to_tensorboard_as_images(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sheet, _ = _grid(tmp_path, "a caption")
    log = logs.MetricsLog(tmp_path / "run")
    log.write(5, epoch=1, reconstruction=tmp_path / "r" / "grid.png", loss=0.5)
    log.close()
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["reconstruction"] == str(tmp_path / "r" / "grid.png")  # the path in the JSONL
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["reconstruction"]
    (image,) = events.Images("reconstruction")
    assert image.step == 5 and (image.height, image.width) == sheet.shape
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("L")), sheet)


def test_progress_is_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv(logs.PROGRESS_SECONDS_ENV, "0")  # a line at every step
    out = io.StringIO()  # not a terminal
    bar = logs.progress(10, 2, True, "finetune", file=out)
    assert isinstance(bar, logs.PlainProgress)
    bar.set_postfix(loss="0.5000", img_s="12.3")
    bar.update(1)
    bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("finetune: step 3/10 (30%), 0:00 elapsed") and lines[0].endswith("loss=0.5000 img_s=12.3")
    assert len(lines) == 2 and lines[1].startswith("finetune: step 4/10 (40%)")  # close: nothing new, no line


def test_plain_progress_waits_for_its_interval_and_ends_with_a_line():
    out = io.StringIO()
    bar = logs.PlainProgress(100, 0, "pretrain", out, interval=3600)
    for _ in range(100):
        bar.update(1)
    assert out.getvalue() == ""  # within the interval: quiet
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == ["pretrain: step 100/100 (100%), 0:00 elapsed"]


def test_a_disabled_bar_writes_nothing():
    out = io.StringIO()
    bar = logs.progress(10, 0, False, "x", file=out)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


@pytest.mark.parametrize("x,three", [(1234.4, "1234"), (123.4, "123"), (12.345, "12.3"), (1.2345, "1.23"),
                                     (0.012345, "0.0123"), (9.996, "10.0"), (0.0, "0")])
def test_rates_keep_three_significant_digits(x, three):
    assert logs.significant(x) == three


def test_epoch_line():
    line = logs.epoch_line(3, 12, {"val_mean_auroc": 0.71234, "val_mean_auprc": float("nan"), "val_images": 19})
    assert line == "epoch 3/12: val_mean_auroc 0.7123, val_mean_auprc nan, val_images 19"


def test_finetune_prints_validation_auroc_each_epoch_and_no_carriage_returns(tmp_path):
    import os
    import subprocess
    import sys

    from cxrfast.synthetic import ensure_demo_dataset

    root = Path(__file__).resolve().parents[1]
    data = ensure_demo_dataset(tmp_path / "cxr", count=24, size=32)
    out = tmp_path / "ft"
    args = ["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir", str(out), "--model", "vit_tiny",
            "--img_size", "32", "--epochs", "2", "--warmup_epochs", "0", "--batch_size", "4", "--num_workers", "0",
            "--split_fractions", "0.5,0.5,0.0", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "train.finetune", *args], cwd=root, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="2"), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "finetune: step" in proc.stderr  # plain progress lines in a log file
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    aurocs = [r["val_mean_auroc"] for r in logged if "val_mean_auroc" in r]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == len(aurocs) == 2
    for k, (line, auroc) in enumerate(zip(lines, aurocs), 1):
        assert line.startswith(f"epoch {k}/2: val_mean_auroc {logs._value(auroc)},"), line
