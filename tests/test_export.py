"""python -m train.export: timm-layout weights that load back into cxrfast and give the same
outputs, the same state dict as .safetensors, an ONNX graph that matches torch (skipped when
onnx/onnxruntime are missing), a JSON that says how to feed the model, one-line errors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file as load_safetensors

from cxrfast.models import classifier, mae
from cxrfast.models.checkpoints import load_pretrained
from cxrfast.synthetic import FINDINGS
from train import export, inference

SIZE = 32
# timm VisionTransformer's key names (vit_*_patch16_224), block 0 standing for every block
TIMM_BLOCK = {f"blocks.0.{k}" for k in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                         "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
                                         "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
TIMM_STEM = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}


def _classifier(global_pool: bool = True, in_chans: int = 1):
    torch.manual_seed(0)
    model = classifier("vit_tiny", img_size=SIZE, in_chans=in_chans, num_classes=len(FINDINGS),
                       global_pool=global_pool, drop_path_rate=0.0)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model.eval()


def _save(path: Path, model, **extra) -> Path:
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": SIZE, "in_chans": model.in_chans,
                           "global_pool": model.global_pool, **extra}}, path)
    return path


def _images(n: int = 4, in_chans: int = 1) -> torch.Tensor:
    return torch.randn(n, in_chans, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def _fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as info:
        export.main([*map(str, argv)])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("global_pool", [True, False])
@pytest.mark.parametrize("fmt", ["timm", "safetensors"])
def test_timm_layout_loads_back_with_the_same_outputs(tmp_path, capsys, fmt, global_pool):
    model = _classifier(global_pool)
    ckpt = _save(tmp_path / "best.pth", model)
    out = tmp_path / "x" / f"model{export.SUFFIX[fmt]}"
    export.main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)])
    sd = load_safetensors(str(out)) if fmt == "safetensors" else torch.load(out, weights_only=True)
    pooled = {"fc_norm.weight", "fc_norm.bias"} if global_pool else {"norm.weight", "norm.bias"}
    assert TIMM_STEM | TIMM_BLOCK | pooled | {"head.weight", "head.bias"} <= set(sd)
    assert not any(k.startswith(("decoder", "mask_token", "module.")) for k in sd)
    assert ({"norm.weight", "fc_norm.weight"} - pooled).isdisjoint(sd)  # timm: one final norm or the other
    assert len({k.split(".")[1] for k in sd if k.startswith("blocks.")}) == 12
    for k, v in model.state_dict().items():
        torch.testing.assert_close(sd[k], v, rtol=0, atol=0)
    fresh = classifier("vit_tiny", img_size=SIZE, in_chans=1, num_classes=len(FINDINGS), global_pool=global_pool)
    report = load_pretrained(fresh.eval(), out)
    assert report.missing_keys == [] and report.dropped == [] and report.mismatched == []
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    info = json.loads((tmp_path / "x" / f"{out.name}.json").read_text())
    assert info["preset"] == "vit_tiny" and info["timm_model"] == "vit_tiny_patch16_224"
    assert info["img_size"] == SIZE and info["in_chans"] == 1 and info["patch_size"] == 16
    assert info["mean"] == [0.5] and info["std"] == [0.25] and info["label_names"] == list(FINDINGS)
    assert info["global_pool"] == ("avg" if global_pool else "token") and info["timm_kwargs"]["num_classes"] == 3
    assert str(out) in capsys.readouterr().out


def test_safetensors_holds_the_same_state_dict_as_the_timm_file(tmp_path, capsys):
    ckpt = _save(tmp_path / "best.pth", _classifier(), mean=[0.45], std=[0.3])
    export.main(["--checkpoint", str(ckpt), "--format", "timm", "--out", str(tmp_path / "m.pth")])
    export.main(["--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    a, b = torch.load(tmp_path / "m.pth", weights_only=True), load_safetensors(str(tmp_path / "m.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    info = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert info["mean"] == [0.45] and info["std"] == [0.3]  # the checkpoint's normalisation, not the default


def test_a_pretraining_checkpoint_exports_its_encoder_without_head_or_decoder(tmp_path, capsys):
    torch.manual_seed(1)
    pre = mae("vit_tiny", img_size=SIZE, in_chans=1)
    ckpt = tmp_path / "mae.pth"
    torch.save({"model": pre.state_dict(), "kind": "pretrain", "config": {"model": "vit_tiny", "img_size": SIZE}},
               ckpt)
    out = tmp_path / "enc.safetensors"
    export.main(["--checkpoint", str(ckpt), "--format", "safetensors", "--out", str(out)])
    sd = load_safetensors(str(out))
    assert TIMM_STEM | TIMM_BLOCK <= set(sd) and not any(k.startswith(("head.", "decoder", "mask_token")) for k in sd)
    torch.testing.assert_close(sd["blocks.3.mlp.fc1.weight"], pre.state_dict()["blocks.3.mlp.fc1.weight"])
    info = json.loads((tmp_path / "enc.safetensors.json").read_text())
    assert info["has_head"] is False and info["label_names"] == [] and info["timm_kwargs"]["num_classes"] == 0
    # what it holds gives the features train.predict --embeddings writes
    model, _ = inference.load_model(ckpt)
    fresh = classifier("vit_tiny", img_size=SIZE, in_chans=1, num_classes=1, global_pool=True).eval()
    load_pretrained(fresh, out)
    x = _images(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh.forward_features(x), model.forward_features(x), rtol=0, atol=0)
    assert "encoder only, no head" in capsys.readouterr().out


def test_onnx_matches_torch_on_another_batch_size(tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _classifier()
    ckpt = _save(tmp_path / "best.pth", model)
    out = tmp_path / "x" / "model.onnx"
    result = export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "onnxruntime vs torch on a batch of 3: max abs diff" in stdout
    assert result["onnx_check"]["ok"] and result["onnx_check"]["max_abs_diff"] < 1e-4
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.json"]  # no temporaries
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    x = _images(5)  # the export traced a batch of 2
    logits, feats = session.run(["logits", "features"], {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(feats, model.forward_features(x).numpy(), atol=1e-4, rtol=1e-4)
    assert json.loads((tmp_path / "x" / "model.onnx.json").read_text())["onnx_check"]["checked"] is True


def test_onnx_without_onnxruntime_is_exported_unchecked_with_a_message(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    ckpt = _save(tmp_path / "best.pth", _classifier())
    result = export.main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert "onnxruntime is not installed: the ONNX graph was not checked" in capsys.readouterr().out
    assert (tmp_path / "m.onnx").stat().st_size > 0 and result["onnx_check"]["checked"] is False


def test_onnx_without_onnx_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    ckpt = _save(tmp_path / "best.pth", _classifier())
    line = _fails(capsys, "--checkpoint", ckpt, "--format", "onnx", "--out", tmp_path / "x" / "m.onnx")
    assert "--format onnx: needs onnx" in line and "pip install" in line
    assert not (tmp_path / "x").exists()


def test_command_line_mistakes_are_one_line(tmp_path, capsys, monkeypatch):
    ckpt = _save(tmp_path / "best.pth", _classifier())
    assert "--format tflite: not one of timm, safetensors, onnx" in _fails(capsys, "--checkpoint", ckpt,
                                                                           "--format", "tflite")
    assert "missing.pth: no such file" in _fails(capsys, "--checkpoint", tmp_path / "missing.pth",
                                                 "--out", tmp_path / "m.pth")
    assert "must end in .safetensors" in _fails(capsys, "--checkpoint", ckpt, "--format", "safetensors",
                                                "--out", tmp_path / "m.pth")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    assert "is not a folder" in _fails(capsys, "--checkpoint", ckpt, "--out", blocker / "m.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert "garbage.pth: not a readable checkpoint" in _fails(capsys, "--checkpoint", garbage,
                                                              "--out", tmp_path / "m.pth")
    monkeypatch.chdir(tmp_path)
    assert "python -m train.finetune" in _fails(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "blocker", "garbage.pth"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_output_folder_that_is_not_writable_is_one_line(tmp_path, capsys):
    ckpt = _save(tmp_path / "best.pth", _classifier())
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "is not writable" in _fails(capsys, "--checkpoint", ckpt, "--out", locked / "sub" / "m.pth")
    finally:
        locked.chmod(0o700)
