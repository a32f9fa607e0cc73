"""MAE training step: cxrfast's model (ops dispatch, bf16, fused AdamW) against a reference
step built like facebookresearch/mae's (explicit attention, fp16 autocast + GradScaler), same
architecture, same batch, same run. GPU: ViT-B/16 and ViT-L/16 at batch 256 with MFU against
the bf16 peak (H100 SXM 989 TFLOP/s unless CXRFAST_PEAK_TFLOPS says otherwise). CPU: vit_tiny
with a small decoder at batch 8, so it stays runnable.

Run: pytest bench/test_bench_train.py --benchmark-only
"""
from __future__ import annotations

import os

import pytest
import torch

from cxrfast.models import mae
from cxrfast.models.vit import PRESETS
from reference_mae import ReferenceMAE

CUDA = torch.cuda.is_available()
if CUDA:
    CASES = [("vit_base", 224, 256, 512, 8, 16), ("vit_large", 224, 256, 512, 8, 16)]
else:
    CASES = [("vit_tiny", 224, 8, 128, 2, 4)]


def step_flops(model_name: str, img: int, ddim: int, ddepth: int, mask_ratio: float = 0.75) -> float:
    """Training FLOPs per image: 3 x forward (matmuls: 24 N d^2 + 4 N^2 d per block)."""
    p = PRESETS[model_name]
    L = (img // p.patch_size) ** 2
    n_enc = int(L * (1 - mask_ratio)) + 1
    fwd = p.depth * (24 * n_enc * p.embed_dim ** 2 + 4 * n_enc ** 2 * p.embed_dim)
    fwd += ddepth * (24 * (L + 1) * ddim ** 2 + 4 * (L + 1) ** 2 * ddim)
    fwd += 2 * L * p.patch_size ** 2 * p.embed_dim + 2 * n_enc * p.embed_dim * ddim + 2 * L * ddim * p.patch_size ** 2
    return 3.0 * fwd


def _make_step(kind: str, name: str, img: int, batch: int, ddim: int, ddepth: int, dheads: int):
    dev = torch.device("cuda" if CUDA else "cpu")
    torch.manual_seed(0)
    p = PRESETS[name]
    imgs = torch.randn(batch, 1, img, img, device=dev)
    if kind == "cxrfast":
        model = mae(name, img_size=img, decoder_embed_dim=ddim, decoder_depth=ddepth, decoder_num_heads=dheads,
                    norm_pix_loss=True).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=CUDA)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=CUDA):
                loss = model(imgs)[0]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if CUDA:
                torch.cuda.synchronize()
            return loss
    else:
        model = ReferenceMAE(img, p.patch_size, 1, p.embed_dim, p.depth, p.num_heads, ddim, ddepth, dheads).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
        scaler = torch.amp.GradScaler("cuda", enabled=CUDA)

        def step():
            with torch.autocast("cuda", dtype=torch.float16, enabled=CUDA):
                loss = model(imgs)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if CUDA:
                torch.cuda.synchronize()
            return loss
    for _ in range(2):  # warm up (allocator, kernels)
        step()
    return step


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}")
@pytest.mark.parametrize("kind", ["cxrfast", "reference (mae-style, fp16, unfused)"])
def test_mae_training_step(benchmark, case, kind):
    name, img, batch, ddim, ddepth, dheads = case
    benchmark.group = f"MAE training step {name}/{16 if name != 'vit_huge' else 14} @{img}, batch {batch}, " \
                      f"{'cuda' if CUDA else 'cpu'}"
    step = _make_step("cxrfast" if kind == "cxrfast" else "reference", name, img, batch, ddim, ddepth, dheads)
    loss = benchmark.pedantic(step, rounds=5 if CUDA else 3, iterations=1)
    assert torch.isfinite(loss)
    if benchmark.stats:
        t = benchmark.stats.stats.median
        benchmark.extra_info["img/s"] = round(batch / t, 1)
        if CUDA:
            peak = float(os.environ.get("CXRFAST_PEAK_TFLOPS", "989")) * 1e12
            benchmark.extra_info["MFU"] = f"{step_flops(name, img, ddim, ddepth) * batch / t / peak:.1%}"
