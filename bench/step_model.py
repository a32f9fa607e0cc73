"""A training step's FLOPs and memory traffic, counted op by op without running it, and the
step time they imply on a named GPU.

Why: no GPU is at hand to profile on, and a step's cost is decided by which ops it makes and
how many bytes each moves. This runs one real pretraining step - ``train.pretrain.build_model``,
``train.engine.train_step`` (forward, loss, backward, fused AdamW) - on fake CPU tensors
(``FakeTensorMode``: shapes, dtypes and strides, no memory), so ViT-L at batch 256 runs on a
laptop in seconds. A ``TorchDispatchMode`` below autograd records every aten and ``cxrfast::`` op:
its FLOPs (``torch.utils.flop_counter``'s formulas; the ``cxrfast::`` ops' own below) and the
bytes of its tensor inputs and outputs. The Triton kernels are ``cxrfast::`` custom ops with fake
implementations, so each appears as one op moving what it reads and writes once.

Autocast: the step runs under CPU bf16 autocast (fake CUDA tensors cannot autocast on a CPU
build of torch). For this model it picks the dtypes CUDA autocast picks - GEMMs and attention
in bf16, the residual stream and LayerNorm in fp32 - and ``check_autocast_dtypes`` (run by
the tests) fails if that stops being true.

Roofline: each op takes max(FLOPs / (peak x GEMM efficiency), bytes / (bandwidth x memory
efficiency)); the step is their sum (eager mode runs ops one after another). Launch overheads
are not counted (the op count is printed). MFU = the step's FLOPs / (step time x peak).

    python bench/step_model.py --model vit_base --batch 256 --card h100
    python bench/step_model.py --model vit_large --ops torch --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cxrfast import ops  # noqa: E402
from kernels.library import TRAFFIC  # noqa: E402
from train import engine, pretrain, runtime  # noqa: E402


@dataclass(frozen=True)
class Card:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s
    bandwidth: float  # HBM bytes/s


# NVIDIA datasheets (dense, no sparsity).
CARDS = {"h100": Card("H100 SXM", 989.4e12, 3.35e12), "h200": Card("H200 SXM", 989.4e12, 4.8e12),
         "a100": Card("A100 SXM 80GB", 312e12, 2.039e12), "h100_pcie": Card("H100 PCIe", 756e12, 2.0e12)}

KINDS = ("GEMM", "attention", "LayerNorm", "GELU", "masking", "loss", "casts/copies", "elementwise",
         "reductions", "fills", "optimizer", "other")
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward", "_addmm_activation"}
_GELU = {"gelu", "gelu_backward"}
_LN = {"native_layer_norm", "native_layer_norm_backward"}
_MASKING = {"gather", "scatter", "scatter_add", "index", "index_select", "index_put", "index_add", "sort",
            "argsort", "cat", "stack", "rand", "randperm", "masked_scatter", "take_along_dim"}
_CASTS = {"_to_copy", "copy_", "clone", "contiguous"}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "norm", "linalg_vector_norm"}
_FILLS = {"zeros", "ones", "full", "zero_", "fill_", "zeros_like", "ones_like", "full_like", "new_zeros",
          "new_ones", "new_full", "scalar_tensor"}
_NO_READ = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty",
            "rand_like", "randn_like", "new_empty_strided"}
_WRITE_ONLY = {"fill_", "zero_", "copy_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}
_FREE = {"_unsafe_view", "detach", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty",
         "new_empty_strided", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "is_same_size"}


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a stride-0 dimension repeats one)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _name(func) -> tuple[str, str]:
    """(namespace, op name) of an OpOverload, e.g. ('aten', 'addmm')."""
    return func.namespace, func._schema.name.split("::")[-1]


# ---- FLOPs of the cxrfast:: ops (2 per multiply-add, as torch.utils.flop_counter counts) ----

def _attention_flops(name: str, args) -> int:
    """Forward 2 matmuls (QK^T, PV), backward 4 (dV, dP, dQ, dK), as flop_counter counts SDPA;
    the kernel's recomputation of P in the backward is not model work and is not counted."""
    if name == "attention_qkv" or name == "attention_qkv_backward":
        qkv = args[1] if name.endswith("backward") else args[0]
        heads = args[4] if name.endswith("backward") else args[1]
        b, n, three_d = qkv.shape
        per = b * heads * n * n * (three_d // 3 // heads)
    else:
        q = args[1] if name.endswith("backward") else args[0]
        if q.ndim == 4:
            per = q.shape[0] * q.shape[1] * q.shape[2] ** 2 * q.shape[3]
        else:  # varlen (T, H, D): bounded by max_seqlen per token
            max_n = args[4] if not name.endswith("backward") else args[7]
            per = q.shape[0] * q.shape[1] * int(max_n) * q.shape[2]
    return (8 if name.endswith("backward") else 4) * per


def _mlp_flops(name: str, args) -> int:
    """fc1 and fc2: 2 GEMMs forward, 4 backward (each layer's input and weight gradients)."""
    x, w1 = (args[1], args[2]) if name.endswith("backward") else (args[0], args[1])
    m = x.numel() // x.shape[-1]
    per = 2 * m * w1.shape[1] * w1.shape[0] * 2
    return 2 * per if name.endswith("backward") else per


def _sdpa_flops(func, args, out) -> int:
    q = args[0] if "backward" not in func._schema.name else args[1]
    per = q.shape[0] * q.shape[1] * q.shape[2] * args[2].shape[2] * q.shape[3] if q.ndim == 4 else 0
    return (8 if "backward" in func._schema.name else 4) * per


def op_flops(func, args, kwargs, out) -> int:
    ns, name = _name(func)
    if ns == "cxrfast":
        if name.startswith("attention"):
            return _attention_flops(name, args)
        if name.startswith("mlp"):
            return _mlp_flops(name, args)
        return 0
    if "scaled_dot_product" in name:
        return _sdpa_flops(func, args, out)
    formula = flop_registry.get(func._overloadpacket)
    return int(formula(*args, **kwargs, out_val=out)) if formula is not None else 0


def op_kind(ns: str, name: str, phase: str) -> str:
    if phase == "optimizer":
        return "optimizer"
    if ns == "cxrfast":
        for prefix, kind in (("attention", "attention"), ("mlp", "GEMM"), ("mae_loss", "loss"),
                             ("layer_norm", "LayerNorm"), ("add_layer_norm", "LayerNorm")):
            if name.startswith(prefix):
                return kind
        return "masking" if "shuffle" in name or "mask" in name else "other"
    base = name.rstrip("_") if name.endswith("_") and name not in _FILLS else name
    for names, kind in ((_GEMM, "GEMM"), (_GELU, "GELU"), (_LN, "LayerNorm"), (_MASKING, "masking"),
                        (_CASTS, "casts/copies"), (_REDUCTIONS, "reductions"), (_FILLS, "fills")):
        if name in names or base in names:
            return kind
    if "scaled_dot_product" in name:
        return "attention"
    if "loss" in name:
        return "loss"
    if name.startswith("_foreach") or name.startswith("_fused_adam"):
        return "optimizer"
    return "elementwise"


def _kernel_path(args) -> bool:
    """Whether a cxrfast:: op call takes its Triton path (its last argument, ``kernel``)."""
    return bool(args) and args[-1] is True


def op_bytes(func, args, kwargs, out) -> tuple[int, int]:
    """(bytes read, bytes written): every tensor input once (distinct elements), every output
    once; view ops move nothing; in-place ops write their mutated inputs. A cxrfast:: kernel
    that makes several launches declares its traffic (kernels.library.TRAFFIC) instead."""
    ns, name = _name(func)
    schema = func._schema
    if name in _FREE or ns not in ("aten", "cxrfast"):  # prim::device and friends read no data
        return 0, 0
    if ns == "cxrfast" and name in TRAFFIC and _kernel_path(args):
        return TRAFFIC[name](args, out if isinstance(out, (tuple, list)) else (out,))
    returns_alias = [r.alias_info is not None for r in schema.returns]
    if returns_alias and all(returns_alias) and not any(
            a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
        return 0, 0  # a view
    read = written = 0
    named = dict(zip([a.name for a in schema.arguments], args)) | kwargs
    for arg in schema.arguments:
        if arg.name not in named:
            continue
        tensors = _tensors(named[arg.name])
        mutated = arg.alias_info is not None and arg.alias_info.is_write
        size = sum(distinct_bytes(t) for t in tensors)
        if mutated:
            written += size
            if name not in _WRITE_ONLY or arg.name != schema.arguments[0].name:
                read += size
        elif name not in _NO_READ:
            read += size
    outs = _tensors(out)
    for i, t in enumerate(outs):
        ret = schema.returns[i] if i < len(schema.returns) else schema.returns[-1]
        if ret.alias_info is None:
            written += distinct_bytes(t)
    return read, written


@dataclass
class OpRecord:
    op: str
    kind: str
    phase: str
    flops: int
    read: int
    written: int
    shapes: str

    @property
    def bytes(self) -> int:
        return self.read + self.written


class Recorder(TorchDispatchMode):
    """Records every op dispatched below autograd (the fake-tensor mode runs it after)."""

    def __init__(self):
        super().__init__()
        self.records: list[OpRecord] = []
        self.phase = "forward"
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ns, name = _name(func)
        if name == "_local_scalar_dense":
            self.syncs += 1
        read, written = op_bytes(func, args, kwargs, out)
        flops = op_flops(func, args, kwargs, out)
        if read or written or flops:
            shapes = " ".join("x".join(map(str, t.shape)) + ":" + str(t.dtype).replace("torch.", "")
                              for t in _tensors(args)[:3])
            self.records.append(OpRecord(f"{ns}::{name}", op_kind(ns, name, self.phase), self.phase, flops,
                                         read, written, shapes))
        return out


# ---- the step ---------------------------------------------------------------------------------

def _fake_like(module: torch.nn.Module) -> None:
    """Replaces a meta-device module's parameters and buffers with fake CPU tensors (call
    inside the FakeTensorMode)."""
    for mod in module.modules():
        for key, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[key] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype),
                                                          requires_grad=p.requires_grad)
        for key, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[key] = torch.empty(b.shape, dtype=b.dtype)


def _warm_optimizer(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One unrecorded optimizer step, so the recorded one is a steady-state step (the first
    step also allocates AdamW's moments with zeros_like)."""
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.empty_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Step:
    """What one recorded step did."""

    model: str
    img_size: int
    batch: int
    dtype: str
    backend: str
    records: list[OpRecord]
    syncs: int

    def by_kind(self) -> dict[str, dict]:
        out = {k: dict(ops=0, flops=0, bytes=0) for k in KINDS}
        for r in self.records:
            row = out[r.kind]
            row["ops"] += 1
            row["flops"] += r.flops
            row["bytes"] += r.bytes
        return {k: v for k, v in out.items() if v["ops"]}

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.records)

    @property
    def gemm_bytes(self) -> int:
        return sum(r.bytes for r in self.records if r.kind == "GEMM")

    @property
    def non_gemm_bytes(self) -> int:
        return sum(r.bytes for r in self.records if r.kind != "GEMM")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def record_step(model: str = "vit_base", img_size: int = 224, batch: int = 256, dtype: str = "bf16",
                backend: str = "triton", **overrides) -> Step:
    """Runs one pretraining step of ``model`` on fake tensors and records its ops.

    ``backend`` is the cxrfast.ops backend ('triton': the kernels' custom ops, as a GPU runs
    under 'auto'; 'torch': plain torch, SDPA and F.layer_norm). ``overrides`` go to
    ``train.pretrain.PretrainConfig`` (e.g. mask_ratio, decoder_dim)."""
    cfg = pretrain.PretrainConfig(model=model, img_size=img_size, batch_size=batch, **overrides)
    with torch.device("meta"):
        net = pretrain.build_model(cfg)
    rt = runtime.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    previous = ops.get_backend()
    ops.set_backend(backend)
    recorder = Recorder()
    autocast = (torch.autocast("cpu", dtype=_DTYPES[dtype]) if _DTYPES[dtype] is not None
                else contextlib.nullcontext())
    try:
        with FakeTensorMode():
            _fake_like(net)
            optimizer = torch.optim.AdamW(pretrain.optimizer_groups(net, cfg.weight_decay), lr=1e-4, betas=tuple(cfg.betas),
                                          fused=True)
            _warm_optimizer(net, optimizer)
            guard = engine.Guard(rt.device)
            images = torch.empty(batch, cfg.in_chans, img_size, img_size)

            def loss_fn(n, imgs):
                loss = pretrain.mae_loss(n, imgs)
                recorder.phase = "backward"
                return loss

            def to_optimizer(*_):
                recorder.phase = "optimizer"

            optimizer.register_step_pre_hook(to_optimizer)
            with recorder, autocast:
                engine.train_step(net, optimizer, lambda: images, loss_fn, guard, step=1, lr=1e-4, cfg=cfg,
                                  rt=rt)
    finally:
        ops.set_backend(previous)
    return Step(model, img_size, batch, dtype, backend, recorder.records, recorder.syncs)


def analytic_flops(model: str = "vit_base", img_size: int = 224, batch: int = 256, **overrides) -> int:
    """The step's matmul FLOPs from the ViT formula (2 per multiply-add): per block 24·N·d²
    (qkv, proj, fc1, fc2) + 4·N²·d (QKᵀ, PV); the patch embedding, decoder_embed and
    decoder_pred GEMMs; backward twice the forward, except the patch embedding of the visible
    patches (the images need no gradient, only its weight does)."""
    cfg = pretrain.PretrainConfig(model=model, img_size=img_size, batch_size=batch, **overrides)
    from cxrfast.models.vit import preset
    enc = preset(model)
    length = (img_size // enc.patch_size) ** 2
    keep = int(length * (1 - cfg.mask_ratio))
    pixels = enc.patch_size ** 2 * cfg.in_chans

    def blocks(n: int, d: int, depth: int) -> int:
        return depth * (24 * n * d * d + 4 * n * n * d)

    dd = cfg.decoder_dim
    forward = (blocks(keep + 1, enc.embed_dim, enc.depth) + blocks(length + 1, dd, cfg.decoder_depth)
               + 2 * (keep + 1) * enc.embed_dim * dd + 2 * (length + 1) * dd * pixels)
    embed = 2 * keep * pixels * enc.embed_dim  # the MAE embeds the visible patches only
    return batch * (3 * forward + 2 * embed)


def check_autocast_dtypes(step: Step) -> list[str]:
    """Where the recorded dtypes differ from CUDA autocast's choice for this model: every
    forward GEMM and attention input in the 16-bit dtype, the residual stream that LayerNorm
    reads in fp32 (for fp32 steps: everything fp32)."""
    low = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[step.dtype]
    problems = []
    for r in step.records:
        if r.phase != "forward":
            continue
        parts = r.shapes.split(" ")
        if r.op.startswith("cxrfast::attention_qkv"):  # its 1-D fp32 input: the qkv bias, there for its gradient
            parts = [part for part in parts if "x" in part.rsplit(":", 1)[0]]
        dtypes = [part.rsplit(":", 1)[-1] for part in parts]
        if r.kind in ("GEMM", "attention") and any(d != low for d in dtypes):
            problems.append(f"{r.op} inputs {r.shapes}, expected {low}")
        if r.kind == "LayerNorm" and r.op.startswith("cxrfast::"):
            stream = dtypes[1] if r.op.startswith("cxrfast::add_") else dtypes[0]
            if stream != "float32":
                problems.append(f"{r.op} residual stream {r.shapes}, expected float32")
    return problems


# ---- the roofline -----------------------------------------------------------------------------

@dataclass
class Estimate:
    card: str
    step_ms: float
    img_per_s: float
    mfu: float
    ms_by_kind: dict
    device_ms: float = 0.0
    host_ms: float = 0.0


def roofline(step: Step, card: Card, gemm_eff: float = 0.70, mem_eff: float = 0.80,
             host_us: float = 0.0) -> Estimate:
    """Each op at the slower of its compute and memory time, summed (eager: one after another);
    the step is the larger of that and the host's time to issue the ops (``host_us`` each:
    eager dispatch + launch, which runs ahead of the GPU only while the GPU is the slower)."""
    ms = defaultdict(float)
    for r in step.records:
        t = max(r.flops / (card.peak_flops * gemm_eff), r.bytes / (card.bandwidth * mem_eff))
        ms[r.kind] += t * 1e3
    device = sum(ms.values())
    host = len(step.records) * host_us / 1e3
    total = max(device, host)
    return Estimate(card.name, total, step.batch / (total / 1e3),
                    step.flops / (total / 1e3 * card.peak_flops), dict(ms), device, host)


def top_ops(step: Step, n: int = 15) -> list[tuple[str, int, float]]:
    """(op with input shapes, count, GB) of the largest memory movers outside GEMMs."""
    agg = defaultdict(lambda: [0, 0])
    for r in step.records:
        if r.kind != "GEMM":
            key = f"{r.phase[:3]} {r.op} {r.shapes}"
            agg[key][0] += 1
            agg[key][1] += r.bytes
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:n]
    return [(k, c, b / 1e9) for k, (c, b) in rows]


def format_report(step: Step, est: Estimate, gemm_eff: float, mem_eff: float, top: int = 12) -> str:
    lines = [f"# step model: MAE {step.model} at {step.img_size}, batch {step.batch}, {step.dtype}, "
             f"ops backend {step.backend} (fake tensors; a prediction, not a measurement)", "",
             f"| kind | ops | TFLOP | GB moved | predicted ms on {est.card} |", "|---|---:|---:|---:|---:|"]
    for kind, row in step.by_kind().items():
        lines.append(f"| {kind} | {row['ops']} | {row['flops'] / 1e12:.2f} | {row['bytes'] / 1e9:.2f} | "
                     f"{est.ms_by_kind.get(kind, 0):.2f} |")
    lines += [f"| **total** | {len(step.records)} | {step.flops / 1e12:.2f} | "
              f"{(step.gemm_bytes + step.non_gemm_bytes) / 1e9:.2f} | {est.step_ms:.2f} |", "",
              f"non-GEMM traffic {step.non_gemm_bytes / 1e9:.1f} GB; host syncs in the step: {step.syncs}",
              f"{est.card} at GEMM {gemm_eff:.0%} of peak, memory {mem_eff:.0%} of bandwidth: step "
              f"{est.step_ms:.1f} ms, {est.img_per_s:,.0f} img/s, MFU {est.mfu:.1%}",
              _host_line(step, est), "",
              "largest non-GEMM movers:", "", "| phase, op, first inputs | calls | GB |", "|---|---:|---:|"]
    lines += [f"| {k} | {c} | {g:.2f} |" for k, c, g in top_ops(step, top)]
    return "\n".join(lines)


def _host_line(step: Step, est: Estimate) -> str:
    if not est.host_ms:
        return "host time to issue the ops not counted (--host_us 0)"
    bound = "HOST-BOUND: the step waits for Python/dispatch" if est.host_ms > est.device_ms else "device-bound"
    return (f"host: {len(step.records)} ops x {est.host_ms * 1e3 / len(step.records):.0f} us = {est.host_ms:.1f} ms "
            f"to issue, device {est.device_ms:.1f} ms: {bound}")


def summary(step: Step, est: Estimate) -> dict:
    return dict(model=step.model, img_size=step.img_size, batch=step.batch, dtype=step.dtype,
                backend=step.backend, tflop=step.flops / 1e12, non_gemm_gb=step.non_gemm_bytes / 1e9,
                gemm_gb=step.gemm_bytes / 1e9, ops=len(step.records), syncs=step.syncs, card=est.card,
                step_ms=est.step_ms, device_ms=est.device_ms, host_ms=est.host_ms, img_per_s=est.img_per_s, mfu=est.mfu,
                by_kind={k: dict(v, ms=est.ms_by_kind.get(k, 0.0)) for k, v in step.by_kind().items()})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base", help="encoder preset (vit_tiny ... vit_huge)")
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    parser.add_argument("--ops", default="triton", choices=["triton", "torch"],
                        help="triton: the kernels as a GPU runs them; torch: plain torch (the reference)")
    parser.add_argument("--card", default="h100", choices=sorted(CARDS))
    parser.add_argument("--gemm_eff", type=float, default=0.70, help="fraction of peak FLOP/s GEMMs reach")
    parser.add_argument("--mem_eff", type=float, default=0.80, help="fraction of bandwidth memory-bound ops reach")
    parser.add_argument("--host_us", type=float, default=10.0,
                        help="host time to issue one op in eager mode (torch dispatch + kernel launch), us: "
                             "the step is host-bound when ops x host_us exceeds the device time "
                             "(0: not counted; bench/predict_vs_measured.py shows the real one on a GPU)")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--top", type=int, default=12, help="rows of the largest-movers table")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    from cxrfast.models.vit import PRESETS
    if args.model not in PRESETS:
        parser.exit(2, f"error: --model {args.model!r}: choose from {', '.join(sorted(PRESETS))}\n")
    if not 0 <= args.host_us < 1e6:
        parser.exit(2, f"error: --host_us {args.host_us}: must be >= 0 (microseconds)\n")
    for name in ("gemm_eff", "mem_eff"):
        if not 0 < getattr(args, name) <= 1:
            parser.exit(2, f"error: --{name} {getattr(args, name)}: must be in (0, 1]\n")
    step = record_step(args.model, args.img_size, args.batch, args.dtype, args.ops, mask_ratio=args.mask_ratio)
    est = roofline(step, CARDS[args.card], args.gemm_eff, args.mem_eff, args.host_us)
    print(format_report(step, est, args.gemm_eff, args.mem_eff, args.top))
    if args.json:
        Path(args.json).write_text(json.dumps(summary(step, est), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
