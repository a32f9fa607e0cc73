"""Export a CXRBase checkpoint for use outside cxrfast: timm layout (.pth), .safetensors, ONNX.

Examples:
  python -m train.export --checkpoint outputs/finetune/best.pth --format timm --out model.pth
  python -m train.export --checkpoint outputs/finetune/best.pth --format safetensors --out model.safetensors
  python -m train.export --checkpoint outputs/finetune/best.pth --format onnx --out model.onnx

timm and safetensors hold the same state dict: the encoder (and the classifier head, if the
checkpoint has one) under the key names of timm's VisionTransformer (`vit_base_patch16_224`
and its siblings), which timm, cxrfast's `load_pretrained` and most ViT code read. A JSON
beside the file (`<out>.json`, e.g. `model.pth.json`) records what the weights need to be used right: the
preset and the timm model name and arguments, image size, patch size, channels, pooling, the
input normalisation x = (g - mean) / std of a display image g in [0, 1] (dense tissue
bright), and the label names. The ONNX graph takes (batch, channels, size, size) float32
images so normalised and returns `logits` (when there is a head) and the pooled `features`;
its batch size is free. It is exported with torch.onnx's dynamo exporter (needs the `onnx`
and `onnxscript` packages) and checked against torch with onnxruntime on a sample batch (the
max abs difference is printed; the check is skipped, with a message, when onnxruntime is not
installed). A pretraining (MAE) checkpoint exports its encoder only, with mean pooling over
an untrained (identity) fc_norm, exactly the features `train.predict --embeddings` writes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from cxrfast import atomic, ops
from cxrfast.models.checkpoints import encoder_state_dict

from . import checkpoints, config, inference, logs
from .config import opt

FORMATS = ("timm", "safetensors", "onnx")
SUFFIX = {"timm": ".pth", "safetensors": ".safetensors", "onnx": ".onnx"}
ONNX_TOLERANCE = 1e-3  # max abs difference allowed, relative to 1 + the largest torch output
ONNX_SINGLE_FILE = 1.5 * 2**30  # larger weights go to an external data file (protobuf's 2 GiB limit)


@dataclass
class ExportConfig:
    checkpoint: Optional[str] = opt(None, "fine-tuned (best.pth) or pretraining checkpoint; none: the demo "
                                          "fine-tuning result")
    format: str = opt("timm", "timm (.pth state dict in timm's key layout), safetensors, or onnx", choices=FORMATS)
    out: Optional[str] = opt(None, "output file (.pth, .safetensors or .onnx to match --format; default "
                                   "outputs/export/model.<ext>); a <out>.json describing it goes beside it")
    check_batch: int = opt(3, "ONNX: images in the random batch compared against torch", minimum=1)
    opset: int = opt(18, "ONNX opset version", minimum=7)

    def validate(self) -> None:
        out = Path(self.out) if self.out else default_out(self.format)
        if out.suffix != SUFFIX[self.format]:
            raise config.UsageError(f"--out {out}: must end in {SUFFIX[self.format]} for --format {self.format}")
        inference.check_output(out, "--out")


def default_out(fmt: str) -> Path:
    return Path("outputs") / "export" / f"model{SUFFIX[fmt]}"


def sidecar_path(out: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json`` (a .pth and an .onnx of one stem keep their own)."""
    return out.with_name(f"{out.name}.json")


def main(argv: list[str] | None = None) -> dict:
    with config.user_errors():
        cfg, _ = config.parse(ExportConfig, argv, "python -m train.export", __doc__)
        path = checkpoints.given_or_demo(cfg.checkpoint)
        out = Path(cfg.out) if cfg.out else default_out(cfg.format)
        if cfg.format == "onnx":
            require_onnx()
        model, spec = inference.load_model(path)
        inference.make_parent(out, "--out")
        return export(model, spec, cfg, path, out)


def export(model: nn.Module, spec: inference.ModelSpec, cfg: ExportConfig, source: Path, out: Path) -> dict:
    """Writes ``out`` and its JSON; returns what was written (and the ONNX check)."""
    info = describe(spec, cfg.format, out, source)
    if cfg.format == "onnx":
        check = export_onnx(model, spec, out, cfg.check_batch, cfg.opset)
        info["onnx_check"] = check
    else:
        save_state_dict(timm_state_dict(model, spec), out)
    atomic.write_text(sidecar_path(out), json.dumps(info, indent=2) + "\n")
    head = f"{len(spec.label_names)} labels" if spec.has_head else "encoder only, no head"
    logs.announce(f"exported {source} ({spec.model}, {spec.img_size}px, {spec.in_chans} channel(s), {head}) "
                  f"as {cfg.format}: {out}, {sidecar_path(out)}")
    return {"out": str(out), "json": str(sidecar_path(out)), **info}


def timm_state_dict(model: nn.Module, spec: inference.ModelSpec) -> dict[str, torch.Tensor]:
    """The encoder (and head, when the checkpoint has one) in timm's VisionTransformer key names,
    contiguous fp32 tensors on the CPU."""
    sd = encoder_state_dict(model)
    return {k: v.float().contiguous().cpu() for k, v in sd.items() if spec.has_head or not k.startswith("head.")}


def save_state_dict(sd: dict[str, torch.Tensor], out: Path) -> Path:
    """A plain state dict as .pth (torch.save) or .safetensors, atomically."""
    with atomic.atomic_path(out) as tmp:
        if out.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it owner-only; give it torch.save's mode
        else:
            with open(tmp, "wb") as f:
                torch.save(sd, f)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def timm_name(spec: inference.ModelSpec) -> str:
    """timm's model name for the preset (``vit_base`` -> ``vit_base_patch16_224``); the image
    size goes in its ``img_size`` argument, so any size maps to the 224 name."""
    return f"{spec.model}_patch{spec.patch_size}_224"


def describe(spec: inference.ModelSpec, fmt: str, out: Path, source: Path) -> dict:
    """The JSON that travels with an export: how to build the model and feed it."""
    pool = "avg" if spec.global_pool else "token"
    return {
        "format": fmt, "file": out.name, "source_checkpoint": str(source),
        "preset": spec.model, "timm_model": timm_name(spec),
        "timm_kwargs": {"img_size": spec.img_size, "in_chans": spec.in_chans,
                        "num_classes": len(spec.label_names), "global_pool": pool},
        "img_size": spec.img_size, "patch_size": spec.patch_size, "in_chans": spec.in_chans,
        "global_pool": pool, "mean": list(spec.mean), "std": list(spec.std),
        "input": "float32 (batch, in_chans, img_size, img_size): (g - mean) / std of a display image g in [0, 1] "
                 "(DICOM after VOI/MONOCHROME1, dense tissue bright), the whole image resized to img_size",
        "output": "logits (sigmoid -> probability per label)" if spec.has_head else "pooled features (no head)",
        "label_names": spec.label_names, "has_head": spec.has_head,
    }


def require_onnx() -> None:
    """--format onnx needs onnx and onnxscript (torch's dynamo exporter); a UsageError if absent."""
    missing = []
    for name in ("onnx", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise config.UsageError(f"--format onnx: needs {' and '.join(missing)} (pip install {' '.join(missing)} "
                                "onnxruntime)")


class _OnnxOutputs(nn.Module):
    """(logits, features) of the classifier, or (features,) of a headless encoder."""

    def __init__(self, model: nn.Module, has_head: bool):
        super().__init__()
        self.model, self.has_head = model, has_head

    def forward(self, images: torch.Tensor):
        feats = self.model.forward_features(images)
        return (self.model.head(feats), feats) if self.has_head else (feats,)


@contextlib.contextmanager
def _quiet_plain_export():
    """Export plain torch ops (no cxrfast:: custom ops) whatever CXRFAST_OPS says, without the
    exporter's noise about torchvision ops and deprecated pytree classes (not ours to fix)."""
    before = ops.get_backend()
    ops.set_backend("torch")
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        registry.setLevel(level)
        ops.set_backend(before)


def export_onnx(model: nn.Module, spec: inference.ModelSpec, out: Path, check_batch: int, opset: int) -> dict:
    """Exports with a dynamic batch axis into a temporary folder beside ``out``, checks the
    graph against torch (onnxruntime, when installed), then moves the file(s) into place
    (an external data file first, the .onnx last), so a failed export or check leaves nothing."""
    wrapper = _OnnxOutputs(model.float().cpu(), spec.has_head).eval()
    names = ["logits", "features"] if spec.has_head else ["features"]
    shape = (spec.in_chans, spec.img_size, spec.img_size)
    sample = torch.zeros(2, *shape)
    big = sum(p.numel() * 4 for p in model.parameters()) > ONNX_SINGLE_FILE
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp = tmpdir / out.name
        with _quiet_plain_export(), torch.no_grad():
            program = torch.onnx.export(wrapper, (sample,), dynamo=True, input_names=["images"], output_names=names,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
                                        verbose=False)
            program.save(str(tmp), external_data=big)
            check = check_onnx(tmp, wrapper, names, (check_batch, *shape))
        if check.get("max_abs_diff") is not None and not check["ok"]:
            raise SystemExit(f"error: --out {out}: the ONNX graph's outputs differ from torch's by "
                             f"{check['max_abs_diff']:.3g} (tolerance {check['tolerance']:.3g}); nothing written")
        for f in sorted(tmpdir.iterdir(), key=lambda p: p.name == out.name):  # the .onnx last
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return check


def check_onnx(path: Path, wrapper: nn.Module, names: list[str], shape: tuple[int, ...]) -> dict:
    """Runs a seeded random batch through onnxruntime and torch; the max abs difference per
    output (printed). Skipped, with a message, when onnxruntime is not installed."""
    try:
        import onnxruntime as ort
    except ImportError:
        logs.announce("onnxruntime is not installed: the ONNX graph was not checked against torch "
                      "(pip install onnxruntime)")
        return {"checked": False, "max_abs_diff": None}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {"images": x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in wrapper(x)]
    diffs = {n: float(np.abs(g - w).max()) for n, g, w in zip(names, got, want)}
    tolerance = ONNX_TOLERANCE * (1 + max(float(np.abs(w).max()) for w in want))
    worst = max(diffs.values())
    logs.announce(f"onnxruntime vs torch on a batch of {shape[0]}: max abs diff "
                  + ", ".join(f"{n} {d:.3g}" for n, d in diffs.items()))
    return {"checked": True, "batch": shape[0], "max_abs_diff": worst, "per_output": diffs,
            "tolerance": tolerance, "ok": worst <= tolerance}


if __name__ == "__main__":
    main()
