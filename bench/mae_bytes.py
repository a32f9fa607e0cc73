"""Bytes through memory of one MAE training step, per aten op, counted without running it.

One ViT-B/16 MAE forward + backward at batch 4 on ``torch.device("meta")`` (nothing allocated,
nothing computed) under a ``TorchDispatchMode`` that adds, for every op, the bytes of its
tensor inputs and outputs: views and bare allocations (empty) are free; an input counts its distinct elements (a
stride-0, expanded dimension once); an ``out=`` tensor counts as written only. Numbers are
given at batch 256 by a line through the counts at batch 4 and 8 (traffic is linear in the
batch; the weights' share is the constant). The model runs in fp32 (autocast does not run on
meta); the residual streams are fp32 under bf16 autocast too.

The plain-torch custom op ``cxrfast::mae_unshuffle`` (and its backward) is counted by the
aten ops it runs, labelled ``unshuffle:<op>``. The MAE loss is a Triton kernel on the GPU: its
bytes come from what the kernel loads and stores (:func:`loss_kernel_bytes`), for the kernel
that reads every patch and for the one that skips visible patches.

Run: python bench/mae_bytes.py [--batch 4] [--scale-to 256] [--model vit_base]
It also runs on a tree without the unshuffle op (the code before it), for the comparison.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxrfast import ops  # noqa: E402
from cxrfast.models import mae  # noqa: E402

FREE = {"_unsafe_view", "lift_fresh", "_reshape_alias", "empty", "empty_strided", "empty_like", "new_empty"}
# The masking path's ops (plus the patch embedding, labelled by the weight it touches)
MASKING = ("gather", "scatter_add", "scatter", "new_zeros", "zeros", "zeros_like", "zero_", "fill_", "cat",
           "index", "index_select", "index_put", "_index_put_impl_", "index_add", "convolution",
           "convolution_backward", "patch_embed:", "unshuffle:")


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses: stride-0 dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


class OpBytes(TorchDispatchMode):
    """Sums bytes read + written per aten op name (and calls), into ``phase``'s counters."""

    def __init__(self, patch_weight_shapes: tuple = (), widths: tuple = (), expand: dict | None = None):
        super().__init__()
        self.bytes: dict[str, Counter] = {"fwd": Counter(), "bwd": Counter()}
        self.calls: dict[str, Counter] = {"fwd": Counter(), "bwd": Counter()}
        self.phase = "fwd"
        self.prefix = ""
        self.patch_weight_shapes = set(patch_weight_shapes)
        self.widths = set(widths)  # token widths: zeros of these are sequence-sized (masking)
        self.expand = expand or {}  # op name -> python impl whose aten ops are counted instead

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name().split("::")[-1].split(".")[0]
        impl = self.expand.get(func.name().split(".")[0])
        if impl is not None:
            saved, self.prefix = self.prefix, "unshuffle:"
            try:
                with self:
                    return impl(*args, **kwargs)
            finally:
                self.prefix = saved
        out = func(*args, **kwargs)
        if func.is_view or name in FREE:
            return out
        written = _tensors(kwargs.get("out")) + _tensors(out)
        seen = {id(t) for t in _tensors(kwargs.get("out"))}
        read = [t for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
                if id(t) not in seen and not seen.add(id(t))]
        uniq_written = {id(t): t for t in written}.values()
        total = sum(map(distinct_bytes, read)) + sum(map(distinct_bytes, uniq_written))
        if any(tuple(t.shape) in self.patch_weight_shapes for t in read + written):
            name = f"patch_embed:{name}"
        elif "zero" in name and not any(t.ndim >= 2 and t.shape[-1] in self.widths for t in written):
            name = f"{name}(stats)"  # norm / attention statistics and their unused gradients
        key = self.prefix + name
        self.bytes[self.phase][key] += total
        self.calls[self.phase][key] += 1
        return out


def _expand_ops() -> dict:
    """The plain-torch custom ops whose inner aten ops are counted (absent in older trees)."""
    try:
        from kernels import masking
    except ImportError:
        return {}
    return {"cxrfast::mae_unshuffle": masking._unshuffle_impl,
            "cxrfast::mae_unshuffle_backward": masking._unshuffle_bwd_impl}


def step_bytes(model_name: str = "vit_base", batch: int = 4, img: int = 224, mask_ratio: float = 0.75) -> OpBytes:
    """One MAE step on meta tensors under :class:`OpBytes` (ops backend 'reference': the
    attention / LayerNorm / loss custom ops count as one op each, as on the GPU)."""
    ops.set_backend("reference")
    with torch.device("meta"):
        model = mae(model_name, img_size=img, norm_pix_loss=True, mask_ratio=mask_ratio)
        imgs = torch.empty(batch, 1, img, img)
        noise = torch.empty(batch, model.patch_embed.num_patches)
    w = model.patch_embed.proj.weight
    counter = OpBytes(patch_weight_shapes=(tuple(w.shape), (w.shape[0], w[0].numel()), (w[0].numel(), w.shape[0])),
                      widths=(model.embed_dim, model.mask_token.shape[-1]), expand=_expand_ops())
    with counter:
        loss = model(imgs, noise=noise)[0]
        counter.phase = "bwd"
        loss.backward()
    return counter


def loss_kernel_bytes(b: int, length: int, p: int, masked: int, pred_bytes: int, img_bytes: int,
                      skip_visible: bool) -> tuple[int, int]:
    """(forward, backward) bytes of the Triton MAE loss: per patch a mask read (fp32) and, for
    every patch or only the masked ones, its pred and image values; the forward stores one fp32
    per patch (then summed), the backward a d(pred) row per patch."""
    loaded = masked if skip_visible else length
    per_patch = p * (pred_bytes + img_bytes)
    fwd = b * (length * 4 + loaded * per_patch + length * 4 + length * 4)
    bwd = b * (length * 4 + loaded * per_patch + length * p * pred_bytes)
    return fwd, bwd


def _masking_rows(counter: OpBytes) -> dict[tuple[str, str], tuple[int, int]]:
    """{(phase, op): (calls, bytes)} of the masking path's ops."""
    rows = {}
    for phase in ("fwd", "bwd"):
        for key, n in counter.bytes[phase].items():
            if any(key == m or (m.endswith(":") and key.startswith(m)) for m in MASKING):
                rows[(phase, key)] = (counter.calls[phase][key], n)
    return rows


def _at(b: int, b1: int, n1: float, b2: int, n2: float) -> float:
    """Bytes at batch b from two counts, linear in the batch (weights are the constant)."""
    return n1 + (n2 - n1) * (b - b1) / (b2 - b1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base")
    ap.add_argument("--batch", type=int, default=4, help="counted at this batch and at twice it")
    ap.add_argument("--scale-to", type=int, default=256)
    args = ap.parse_args(argv)
    b1, b2, b = args.batch, 2 * args.batch, args.scale_to
    c1, c2 = step_bytes(args.model, b1), step_bytes(args.model, b2)
    r1, r2 = _masking_rows(c1), _masking_rows(c2)
    gb = 1e9
    print(f"{args.model} MAE step, fp32, bytes at batch {b} (linear in the batch from batches {b1} and {b2})")
    print(f"{'phase':5} {'op':40} {'calls':>5} {'GB':>8}")
    masking = 0.0
    for key in sorted(r1, key=lambda k: (k[0] != "fwd", k[1])):
        n = _at(b, b1, r1[key][1], b2, r2.get(key, r1[key])[1])
        masking += n
        print(f"{key[0]:5} {key[1]:40} {r1[key][0]:5d} {n / gb:8.3f}")
    print(f"masking + unshuffle + patch embed total: {masking / gb:.3f} GB")
    t1, t2 = (sum(sum(c.values()) for c in k.bytes.values()) for k in (c1, c2))
    print(f"whole step (every op, loss as its custom op): {_at(b, b1, t1, b2, t2) / gb:.3f} GB")
    length, p = 196, 256
    masked = length - int(length * 0.25)
    for pred_b, img_b, tag in ((2, 2, "bf16 pred, bf16 images"), (2, 4, "bf16 pred, fp32 images")):
        for skip in (False, True):
            f, bw = loss_kernel_bytes(b, length, p, masked, pred_b, img_b, skip)
            print(f"loss kernel ({tag}, {'skips visible' if skip else 'reads every patch'}): "
                  f"fwd {f / gb:.3f} GB, bwd {bw / gb:.3f} GB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
