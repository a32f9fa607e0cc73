"""python -m train.predict: one row of probabilities per readable image, unreadable files
listed and counted (never scored under another file's path), pooled embeddings that are the
classifier's own features, a pretraining checkpoint giving embeddings only, the checkpoint's
size/channels/normalisation used (and a config its weights contradict refused)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxrfast.data.augment import crop_resize, whole_images
from cxrfast.data.direct import ImageDataset
from cxrfast.data.files import load_image
from cxrfast.models import classifier, mae
from cxrfast.models.checkpoints import load_pretrained
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import inference, predict

BAD = ("cxr_002.dcm", "cxr_005.dcm")
SIZE = 64


def _save_classifier(path: Path, global_pool: bool = True, **config) -> torch.nn.Module:
    torch.manual_seed(1)
    model = classifier("vit_tiny", img_size=SIZE, in_chans=1, num_classes=len(FINDINGS), global_pool=global_pool)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # scores that differ between images
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": SIZE, "in_chans": 1, "global_pool": global_pool,
                           **config}}, path)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """7 DICOMs (2 truncated), a PNG and a JPEG in a folder; a tiny classifier and MAE."""
    root = tmp_path_factory.mktemp("predict")
    demo = ensure_demo_dataset(root / "demo", count=7, size=SIZE)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for p in sorted(demo.glob("*.dcm")):
        data = p.read_bytes()
        (images / p.name).write_bytes(data[:300] if p.name in BAD else data)
    grey = (load_image(demo / "cxr_000.dcm") * 255).astype(np.uint8)
    Image.fromarray(grey).save(images / "sub" / "a.png")
    Image.fromarray(grey).save(images / "sub" / "b.jpg", quality=95)
    model = _save_classifier(root / "model.pth")
    torch.manual_seed(2)
    pre = mae("vit_tiny", img_size=SIZE, in_chans=1)
    torch.save({"model": pre.state_dict(), "kind": "pretrain",
                "config": {"model": "vit_tiny", "img_size": SIZE, "in_chans": 1}}, root / "mae.pth")
    return root, images, model


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _fails(capsys, *argv, code: int = 2) -> str:
    with pytest.raises(SystemExit) as info:
        predict.main([*map(str, argv), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _expected(model, files, global_pool=True):
    """The model run image by image on the evaluation pipeline: (probabilities, features)."""
    ds = ImageDataset(files, img_size=SIZE, in_chans=1, train=False, substitute=False)
    x = torch.stack([ds[i] for i in range(len(files))])
    with torch.no_grad():
        feats = model.forward_features(x)
        return torch.sigmoid(model.head(feats)).numpy(), feats.numpy()


def test_one_row_per_readable_image_and_the_bad_ones_listed(setup, tmp_path, capsys):
    root, images, model = setup
    out = tmp_path / "o" / "preds.csv"
    result = predict.main(["--checkpoint", str(root / "model.pth"), "--data", str(images), "--out", str(out),
                           "--device", "cpu", "--batch_size", "3"])
    stdout = capsys.readouterr().out
    rows = _rows(out)
    good = sorted(p for p in images.rglob("*") if p.is_file() and p.name not in BAD)
    assert [r["path"] for r in rows] == [str(p) for p in good]  # 5 DICOMs, a PNG and a JPEG
    assert list(rows[0]) == ["path", *FINDINGS]
    errors = _rows(tmp_path / "o" / "preds.errors.csv")
    assert sorted(Path(e["source"]).name for e in errors) == sorted(BAD) and all(e["error"] for e in errors)
    assert "predicted 7 of 9 images; 2 unreadable" in stdout and str(tmp_path / "o" / "preds.errors.csv") in stdout
    assert result["predicted"] == 7 and result["unreadable"] == 2
    want, _ = _expected(model, good)
    got = np.array([[float(r[n]) for n in FINDINGS] for r in rows])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.std(axis=0).max() > 1e-3  # the images get different scores: a mix-up would show


def test_rerun_rewrites_the_errors_file(setup, tmp_path, capsys):
    root, images, _ = setup
    out = tmp_path / "preds.csv"
    errors = tmp_path / "preds.errors.csv"
    errors.write_text("source,error,reason\nstale.dcm,OSError,old\n")
    good = tmp_path / "good.csv"
    good.write_text(f"path\n{images / 'cxr_000.dcm'}\n")
    predict.main(["--checkpoint", str(root / "model.pth"), "--data", str(good), "--out", str(out), "--device", "cpu"])
    assert _rows(errors) == [] and len(_rows(out)) == 1


def test_a_csv_path_column_is_data_with_relative_paths(setup, tmp_path, capsys):
    root, images, model = setup
    listing = images / "list.csv"
    listing.write_text("path,extra\nsub/b.jpg,x\ncxr_002.dcm,y\ncxr_000.dcm,z\n")
    out = tmp_path / "preds.csv"
    predict.main(["--checkpoint", str(root / "model.pth"), "--data", str(listing), "--out", str(out),
                  "--device", "cpu"])
    assert "predicted 2 of 3 images; 1 unreadable" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["path"] for r in rows] == [str(images / "sub" / "b.jpg"), str(images / "cxr_000.dcm")]
    want, _ = _expected(model, [images / "sub" / "b.jpg", images / "cxr_000.dcm"])
    np.testing.assert_allclose([[float(r[n]) for n in FINDINGS] for r in rows], want, rtol=1e-5, atol=1e-6)
    listing.unlink()


@pytest.mark.parametrize("global_pool", [True, False])
def test_embeddings_are_the_heads_input_with_a_row_index(setup, tmp_path, capsys, global_pool):
    root, images, _ = setup
    ckpt = tmp_path / "m.pth"
    model = _save_classifier(ckpt, global_pool=global_pool)
    emb = tmp_path / "e" / "feats.npy"
    predict.main(["--checkpoint", str(ckpt), "--data", str(images), "--out", str(tmp_path / "p.csv"),
                  "--embeddings", str(emb), "--device", "cpu", "--batch_size", "4"])
    feats = np.load(emb)
    index = _rows(tmp_path / "e" / "feats.index.csv")
    preds = _rows(tmp_path / "p.csv")
    assert feats.dtype == np.float32 and feats.shape == (7, 192)
    assert [int(r["row"]) for r in index] == list(range(7))
    assert [r["path"] for r in index] == [r["path"] for r in preds]
    probs, want = _expected(model, [Path(r["path"]) for r in index])
    np.testing.assert_allclose(feats, want, rtol=1e-4, atol=1e-5)
    # the probabilities are the head applied to exactly these features
    head = torch.sigmoid(model.head(torch.from_numpy(feats))).detach().numpy()
    np.testing.assert_allclose([[float(r[n]) for n in FINDINGS] for r in preds], head, rtol=1e-4, atol=1e-6)


def test_a_pretraining_checkpoint_gives_embeddings_only(setup, tmp_path, capsys):
    root, images, _ = setup
    out, emb = tmp_path / "preds.csv", tmp_path / "feats.npy"
    result = predict.main(["--checkpoint", str(root / "mae.pth"), "--data", str(images), "--out", str(out),
                           "--embeddings", str(emb), "--device", "cpu"])
    stdout = capsys.readouterr().out
    assert not out.exists() and "no probabilities written" in stdout and not result["probabilities"]
    assert len(_rows(tmp_path / "feats.errors.csv")) == 2
    # the linear probe's features: the MAE encoder, mean-pooled through an identity fc_norm
    probe = classifier("vit_tiny", img_size=SIZE, in_chans=1, num_classes=1, global_pool=True).eval()
    load_pretrained(probe, root / "mae.pth")
    files = [Path(r["path"]) for r in _rows(tmp_path / "feats.index.csv")]
    _, want = _expected(probe, files)
    np.testing.assert_allclose(np.load(emb), want, rtol=1e-4, atol=1e-5)


def test_a_pretraining_checkpoint_without_embeddings_is_an_error(setup, tmp_path, capsys):
    root, images, _ = setup
    line = _fails(capsys, "--checkpoint", root / "mae.pth", "--data", images, "--out", tmp_path / "p.csv")
    assert "no classifier head" in line and "--embeddings" in line
    assert not list(tmp_path.iterdir())


def test_parquet_embeddings(setup, tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    root, images, _ = setup
    emb = tmp_path / "feats.parquet"
    predict.main(["--checkpoint", str(root / "model.pth"), "--data", str(images), "--out", str(tmp_path / "p.csv"),
                  "--embeddings", str(emb), "--device", "cpu"])
    table = pq.read_table(emb)
    assert table.column_names == ["path", "embedding"] and isinstance(pa, object)
    assert table.column("path").to_pylist() == [r["path"] for r in _rows(tmp_path / "p.csv")]
    assert np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).shape == (7, 192)


def test_parquet_without_pyarrow_is_a_clear_error(setup, tmp_path, capsys, monkeypatch):
    root, images, _ = setup
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    line = _fails(capsys, "--checkpoint", root / "model.pth", "--data", images, "--out", tmp_path / "p.csv",
                  "--embeddings", tmp_path / "e.parquet")
    assert "pyarrow" in line and "e.parquet" in line


def test_the_checkpoints_normalisation_is_applied(setup, tmp_path, capsys):
    """A checkpoint trained on (g - 0.4) / 0.2 gets exactly that input, not cxrfast's default."""
    root, images, _ = setup
    ckpt = tmp_path / "m.pth"
    model = _save_classifier(ckpt, mean=[0.4], std=[0.2])
    spec = inference.load_model(ckpt)[1]
    assert spec.mean == (0.4,) and spec.std == (0.2,)
    files = [images / "cxr_000.dcm", images / "sub" / "a.png"]
    ds = inference.for_spec(ImageDataset(files, img_size=SIZE, train=False, substitute=False), spec)
    for i, f in enumerate(files):
        img = load_image(f, 2 * SIZE)
        boxes, mirror = whole_images(*img.shape, 1)
        want = crop_resize([img], boxes, mirror, SIZE, value_scale=1.0, mean=0.4, std=0.2, threads=1)[0]
        torch.testing.assert_close(ds[i], want, rtol=1e-5, atol=1e-5)
    predict.main(["--checkpoint", str(ckpt), "--data", str(images / "sub"), "--out", str(tmp_path / "p.csv"),
                  "--device", "cpu"])
    with torch.no_grad():
        want = torch.sigmoid(model(ds[1][None])).numpy()[0]  # sub/ holds a.png (row 0), then b.jpg
    got = [float(_rows(tmp_path / "p.csv")[0][n]) for n in FINDINGS]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config, expect", [
    ({"img_size": 128}, "img_size 128 but its weights are for img_size 64"),
    ({"in_chans": 3}, "in_chans 3 but its weights are for in_chans 1"),
    ({"mean": [0.5, 0.5]}, "mean [0.5, 0.5] does not fit 1 channel"),
    ({"std": 0.0}, "std [0.0] must be positive"),
])
def test_a_config_its_weights_contradict_is_an_error(setup, tmp_path, capsys, config, expect):
    root, images, _ = setup
    ckpt = tmp_path / "m.pth"
    _save_classifier(ckpt, **config)
    line = _fails(capsys, "--checkpoint", ckpt, "--data", images, "--out", tmp_path / "o" / "p.csv")
    assert expect in line and str(ckpt) in line
    assert not (tmp_path / "o").exists()


def test_command_line_mistakes_are_one_line(setup, tmp_path, capsys, monkeypatch):
    root, images, _ = setup
    ckpt = root / "model.pth"
    assert "missing.pth: no such file" in _fails(capsys, "--checkpoint", tmp_path / "missing.pth")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is not a folder" in _fails(capsys, "--checkpoint", ckpt, "--data", images, "--out", blocker / "p.csv")
    assert "must end in .npy or .parquet" in _fails(capsys, "--checkpoint", ckpt, "--data", images,
                                                    "--out", tmp_path / "p.csv", "--embeddings", tmp_path / "e.txt")
    assert "no such folder" in _fails(capsys, "--checkpoint", ckpt, "--data", tmp_path / "nothing",
                                      "--out", tmp_path / "p.csv")
    monkeypatch.chdir(tmp_path)  # no demo here
    line = _fails(capsys)
    assert "finetune_demo/best.pth" in line and "python -m train.finetune" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
