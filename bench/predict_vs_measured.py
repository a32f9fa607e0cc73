"""The step model's prediction beside the measured training step, per op kind, in one run.

Why: ``bench/step_model.py`` predicts a step from counted FLOPs and bytes; only a GPU can say
which prediction was wrong. This builds the same pretraining step (``train.engine.train_step``,
fused AdamW, bf16 autocast), times it with the device synchronised, profiles two steps with
``torch.profiler`` and groups each op's own device time by the step model's kinds (GEMM,
attention, LayerNorm, ...), next to the roofline prediction for this card.

    python bench/predict_vs_measured.py --model vit_base --batch 256       # on a GPU
    python bench/predict_vs_measured.py --device cpu --model vit_tiny --img_size 64 --batch 2

On CPU (the tests) it measures CPU time against the H100 prediction: the numbers mean
nothing there, the code path is what is checked.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import step_model as sm  # noqa: E402
from cxrfast.models.vit import PRESETS  # noqa: E402
from train import engine, pretrain, runtime  # noqa: E402


def card_for(device: torch.device) -> str:
    """The step model's card for this GPU by its name (H100 SXM when it cannot tell)."""
    if device.type != "cuda":
        return "h100"
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return "h200"
    if "A100" in name:
        return "a100"
    if "H100" in name and "PCIe" in name:
        return "h100_pcie"
    return "h100"


def build_step(model: str, img_size: int, batch: int, device: torch.device):
    """A callable running one training step exactly as train.pretrain does, and the config."""
    cfg = pretrain.PretrainConfig(model=model, img_size=img_size, batch_size=batch)
    torch.manual_seed(0)
    net = pretrain.build_model(cfg).to(device)
    rt = runtime.Runtime(rank=0, world_size=1, local_rank=0, device=device)
    optimizer = torch.optim.AdamW(pretrain.optimizer_groups(net, cfg.weight_decay), lr=1e-4, betas=tuple(cfg.betas), fused=True)
    guard = engine.Guard(device)
    images = torch.randn(batch, cfg.in_chans, img_size, img_size, device=device)
    counter = [0]

    def step():
        counter[0] += 1
        engine.train_step(net, optimizer, lambda: images, pretrain.mae_loss, guard, step=counter[0], lr=1e-4,
                          cfg=cfg, rt=rt)

    return step, guard


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> float:
    """Median seconds per step, the device synchronised around each."""
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def profile_by_kind(step, device: torch.device, steps: int = 2) -> dict[str, float]:
    """Milliseconds per step of each op kind's own device time (CPU time on CPU)."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    ms = defaultdict(float)
    for ev in prof.key_averages():
        if "::" not in ev.key:
            continue
        ns, name = ev.key.split("::", 1)
        if device.type == "cuda":
            us = getattr(ev, "self_device_time_total", None)
            us = ev.self_cuda_time_total if us is None else us
        else:
            us = ev.self_cpu_time_total
        if us:
            ms[sm.op_kind(ns, name, "forward")] += us / 1e3 / steps
    return dict(ms)


def compare(model: str, img_size: int, batch: int, device: torch.device, steps: int, card: str | None) -> str:
    card = card or card_for(device)
    predicted = sm.record_step(model, img_size, batch, "bf16" if device.type == "cuda" else "fp32", "triton")
    est = sm.roofline(predicted, sm.CARDS[card])
    step, guard = build_step(model, img_size, batch, device)
    for _ in range(3):  # warm-up: Triton compiles, the allocator settles
        step()
    if guard.first_bad_step(runtime.Runtime(0, 1, 0, device)) is not None:
        raise RuntimeError("the benchmark step produced a non-finite loss")
    seconds = time_steps(step, device, steps)
    measured = profile_by_kind(step, device)
    peak = sm.CARDS[card].peak_flops
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (code-path check only)"
    lines = [f"### Step model vs measured: MAE {model} at {img_size}, batch {batch}, on {where}", "",
             f"| kind | predicted ms ({sm.CARDS[card].name}) | measured ms | measured / predicted |",
             "|---|---:|---:|---:|"]
    for kind in sm.KINDS:
        p, m = est.ms_by_kind.get(kind, 0.0), measured.get(kind, 0.0)
        if p or m:
            ratio = f"{m / p:.2f}" if p else "-"
            lines.append(f"| {kind} | {p:.2f} | {m:.2f} | {ratio} |")
    step_ms = seconds * 1e3
    lines += [f"| **step (wall, synchronised)** | {est.step_ms:.2f} | {step_ms:.2f} | {step_ms / est.step_ms:.2f} |",
              "",
              f"predicted: {est.img_per_s:,.0f} img/s, MFU {est.mfu:.1%}; measured: {batch / seconds:,.0f} img/s, "
              f"MFU {predicted.flops / seconds / peak:.1%} (step FLOPs {predicted.flops / 1e12:.2f} T, "
              f"peak {peak / 1e12:.0f} TFLOP/s)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--card", default=None, choices=sorted(sm.CARDS), help="default: from the GPU's name")
    parser.add_argument("--md", type=Path, default=None, help="append the table to this markdown file")
    args = parser.parse_args(argv)
    if args.model not in PRESETS:
        parser.exit(2, f"error: --model {args.model!r}: choose from {', '.join(sorted(PRESETS))}\n")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "error: --device cuda: no CUDA GPU here (bench/step_model.py gives the prediction alone)\n")
    if args.steps < 1:
        parser.exit(2, f"error: --steps {args.steps}: must be at least 1\n")
    table = compare(args.model, args.img_size, args.batch, torch.device(args.device), args.steps, args.card)
    print(table)
    if args.md:
        with open(args.md, "a") as f:
            f.write("\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
