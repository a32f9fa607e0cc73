"""Static GPU report: every Triton launch the MAE / ViT model and loss make, compiled ahead of
time for NVIDIA targets on a machine without a GPU (issue 10, part 1).

For each launch at the model shapes (MAE ViT-B/16, ViT-L/16, ViT-H/14 pretraining and
fine-tuning at 224 and 448, batch 256, bf16 and fp16 autocast) and each target (sm_90,
sm_80, sm_89, sm_86) it runs ``triton.compile`` with the constexprs, num_warps and
num_stages that the launch code computes (``launch_config``/``launch_configs`` in
kernels/*.py: the same function, not a copy), then reads registers and spills from the
bundled ``ptxas -v``, shared memory from the compiler, and the MMA instructions from the
SASS (``cuobjdump -sass``; the PTX when cuobjdump is missing). Nothing runs on a GPU: the
numbers are compiled, not measured.

Argument dtypes follow bf16/fp16 autocast as the model runs it: attention and the MAE loss
see 16-bit tensors; the residual stream stays fp32, so LayerNorm reads fp32 (and, fused
with the residual add, a 16-bit branch). Integer arguments are specialised as Triton's JIT
does (1 -> constexpr, multiples of 16 -> divisibility 16), from the strides the model's
tensors have. Results are cached by (kernel source hash, signature, constexprs, target,
Triton version) under ``--cache-dir``.

    python bench/gpu_static.py                       # the full table (minutes when cold)
    python bench/gpu_static.py --arch sm_90 --model vit_b16
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cxrfast.atomic import write_text  # noqa: E402
from cxrfast.models.vit import PRESETS  # noqa: E402
from kernels.launch import SMEM_PER_BLOCK, SMEM_PER_SM, Config  # noqa: E402


@contextlib.contextmanager
def _interpreter_off():
    """TRITON_INTERPRET=0 for the block (Triton reads it when kernels are decorated)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def _compilable(name: str):
    """kernels.<name> with real @triton.jit kernels: the imported module when it has them,
    else (TRITON_INTERPRET=1, as under the tests) a private copy loaded with the interpreter
    off, so ASTSource gets JITFunctions while the tests keep their interpreted kernels."""
    import importlib
    import importlib.util

    import triton

    mod = importlib.import_module(f"kernels.{name}")
    jit_type = getattr(triton.runtime, "JITFunction", None)
    if jit_type is None or any(isinstance(v, jit_type) for v in vars(mod).values()):
        return mod
    alias = f"_gpu_static_kernels_{name}"
    if alias in sys.modules:
        return sys.modules[alias]
    with _interpreter_off():
        spec = importlib.util.spec_from_file_location(alias, mod.__file__)
        copy = importlib.util.module_from_spec(spec)
        sys.modules[alias] = copy
        spec.loader.exec_module(copy)
    return copy


ka, kln, kml, kmlp = (_compilable(n) for n in ("attention", "layernorm", "mae_loss", "mlp"))

BATCH = 256
ARCHS = {"sm_90": 90, "sm_80": 80, "sm_89": 89, "sm_86": 86}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {"vit_b16": "vit_base", "vit_l16": "vit_large", "vit_h14": "vit_huge"}
WORKLOADS = (("pretrain", 224), ("pretrain", 448), ("finetune", 224), ("finetune", 448))
DECODER = (512, 16)  # MAE decoder width and heads (train/pretrain.py defaults)
MASK_RATIO = 0.75
# Per SM: max resident warps and blocks (CUDA C Programming Guide, compute capabilities).
MAX_WARPS = {90: 64, 80: 64, 89: 48, 86: 48}
MAX_BLOCKS = {90: 32, 80: 32, 89: 24, 86: 16}
REGS_PER_SM = 65536
_TT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int8: "i8", torch.int32: "i32"}


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: only its dtype matters (torch allocations are 16-byte aligned)."""

    dtype: torch.dtype


@dataclass
class Launch:
    """One kernel launch at one shape: everything triton.compile needs, plus labels."""

    kernel: str
    fn: object
    args: dict
    mode: dict
    config: Config
    shape: str
    dtype: str
    used_by: list[str] = field(default_factory=list)

    def key(self) -> tuple:
        return (self.kernel, self.shape, self.dtype, tuple(sorted(self.mode.items())))


def _source_hash(fn) -> str:
    """Hash of the kernel's source: Triton's own key (the kernel, the @jit helpers it calls
    and the globals they read) where it has one, else the whole source file."""
    key = getattr(fn, "cache_key", None)
    if isinstance(key, str):
        return hashlib.sha256(key.encode()).hexdigest()[:16]
    return hashlib.sha256(Path(fn.fn.__code__.co_filename).read_bytes()).hexdigest()[:16]


def specialise(fn, args: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ASTSource, specialising like Triton's JIT: an int
    equal to 1 becomes a constexpr, multiples of 16 and pointers get divisibility 16."""
    names = list(fn.arg_names)
    missing = set(names) - set(args) - set(constexprs)
    extra = (set(args) | set(constexprs)) - set(names)
    if missing or extra:
        raise ValueError(f"{fn.__name__}: arguments out of step with the kernel (missing {sorted(missing)}, "
                         f"unknown {sorted(extra)})")
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, Ptr):
            sig[name] = "*" + _TT[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or v is None:
            raise TypeError(f"{fn.__name__}.{name}: pass flags as constexprs")
        elif isinstance(v, int):
            if v == 1:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: unsupported argument {v!r}")
    return sig, consts, attrs


# ---- the launches the model makes ------------------------------------------------------

def attention_launches(b: int, h: int, n: int, d: int, dtype: torch.dtype, varlen: bool = False,
                       cap: tuple[int, int] = (9, 0)) -> list[Launch]:
    """The forward and backward launches of kernels.attention on compute capability ``cap``:
    the one-pass backward where launch_configs gives 'bwd_fused' (it reads O and dO itself),
    else the delta, dQ and dK/dV launches. Dense: as
    cxrfast.models.vit.Attention makes them through ``cxrfast::attention_qkv``: q, k, v are
    (B, H, N, D) views of the packed qkv projection (B, N, 3*H*D); O is written as (B, N, H, D)
    into the (B, N, H*D) tensor proj reads; dO is proj's input gradient, (B, N, H*D) contiguous;
    dQ/dK/dV are the thirds of one (B, N, 3*H*D) gradient; the delta kernel reads O and dO to
    write DELTA (fp32, like LSE) for dQ and dK/dV. Varlen: packed (B*N, H, D) tensors of ``cxrfast::attention``."""
    cfg = ka.launch_configs(n, d, dtype, cap)
    dim, t = h * d, b * n
    if varlen:
        qs = os_ = dos = grads = (0, d, dim)
    else:
        qs = grads = (n * 3 * dim, d, 3 * dim)  # views of qkv / dqkv (B, N, 3, H, D)
        os_ = dos = (n * dim, d, dim)  # o and dO (B, N, H, D)
    p, f32 = Ptr(dtype), Ptr(torch.float32)
    common = dict(Q=p, K=p, V=p, LSE=f32, KPM=p, CU=Ptr(torch.int32) if varlen else p, stride_kpm=0,
                  H=h, N=n, D=d, T=t, scale=1.0 / math.sqrt(d))
    for pre in ("sq", "sk", "sv"):
        common.update({f"{pre}_b": qs[0], f"{pre}_h": qs[1], f"{pre}_n": qs[2]})
    mode = dict(VARLEN=varlen, HAS_KPM=False, PREC=None)
    shape = f"B={b} H={h} N={n} D={d}"
    dt = _TT[dtype]
    suffix = "[varlen]" if varlen else ""
    o_strides = dict(so_b=os_[0], so_h=os_[1], so_n=os_[2])
    fwd = dict(common, O=p, **o_strides, BH=b * h)
    bwd = dict(common, DO=p, DELTA=f32, sd_b=dos[0], sd_h=dos[1], sd_n=dos[2])
    delta = dict(O=p, DO=p, DELTA=f32, CU=common["CU"], **o_strides, sd_b=dos[0], sd_h=dos[1], sd_n=dos[2],
                 H=h, N=n, D=d, T=t)
    dq = dict(bwd, DQ=p, sdq_b=grads[0], sdq_h=grads[1], sdq_n=grads[2])
    dkdv = dict(bwd, DK=p, DV=p, sdk_b=grads[0], sdk_h=grads[1], sdk_n=grads[2],
                sdv_b=grads[0], sdv_h=grads[1], sdv_n=grads[2])
    fwd_launch = Launch("attn_fwd" + suffix, ka._attn_fwd, fwd, mode, cfg["fwd"], shape, dt)
    if "bwd_fused" in cfg:
        # dense: the ViT's qkv bias gradient summed in the kernel (cxrfast.ops.qkv_attention)
        fused = dict(dkdv, O=p, **o_strides, DQ=p, sdq_b=grads[0], sdq_h=grads[1], sdq_n=grads[2], DB=f32)
        del fused["DELTA"]
        return [fwd_launch, Launch("attn_bwd_fused" + suffix, ka._attn_bwd_fused, fused, dict(mode, HAS_DB=not varlen),
                                   cfg["bwd_fused"], shape, dt)]
    return [fwd_launch,
            Launch("attn_bwd_delta" + suffix, ka._attn_bwd_delta, delta, dict(VARLEN=varlen), cfg["bwd_delta"],
                   shape, dt),
            Launch("attn_bwd_dq" + suffix, ka._attn_bwd_dq, dq, mode, cfg["bwd_dq"], shape, dt),
            Launch("attn_bwd_dkdv" + suffix, ka._attn_bwd_dkdv, dkdv, mode, cfg["bwd_dkdv"], shape, dt)]


def layernorm_launches(m: int, n: int, dtype: torch.dtype) -> list[Launch]:
    """A pre-norm block's LayerNorms under autocast (cxrfast.models.vit.run_blocks): the first
    norm1 on the fp32 residual stream, the fused residual add + norm (16-bit branch + fp32
    stream) that every other norm is - norm2's also adding the attention projection's bias -
    each writing y in the 16-bit dtype the next matmul reads; their backwards take that 16-bit
    dy, the fused ones also write the branch's 16-bit dx (and norm2's sums the bias gradient)."""
    cfg = kln.launch_config(n)
    f32, w, low = Ptr(torch.float32), Ptr(torch.float32), Ptr(dtype)
    stats = dict(W=w, MEAN=f32, RSTD=f32)
    shape = f"M={m} N={n}"
    fwd = dict(stats, B=w, BB=w, Y=low, H=f32, stride_x=n, stride_r=n, stride_y=n, stride_h=n, N=n, eps=1e-6)
    programs, rows = kln.bwd_grid(m, on_gpu=True)
    bwd = dict(stats, X=f32, DY=low, DH=f32, DX=f32, DX2=low, DW_PART=f32, DB_PART=f32, DBB_PART=f32, stride_x=n,
               stride_dy=n, stride_dh=n, stride_dx=n, stride_dx2=n, M=m, N=n, rows_per_program=rows)
    mixed = _TT[dtype] + "+fp32"
    return [Launch("ln_fwd", kln._ln_fwd, dict(fwd, X=f32, R=f32), dict(HAS_RES=False, HAS_BB=False), cfg, shape,
                   "fp32"),
            Launch("ln_fwd+res", kln._ln_fwd, dict(fwd, X=low, R=f32), dict(HAS_RES=True, HAS_BB=False), cfg, shape,
                   mixed),
            Launch("ln_fwd+res+bias", kln._ln_fwd, dict(fwd, X=low, R=f32), dict(HAS_RES=True, HAS_BB=True), cfg,
                   shape, mixed),
            Launch("ln_bwd", kln._ln_bwd, bwd, dict(HAS_DH=False, HAS_DX2=False, HAS_BB=False), cfg, shape, mixed),
            Launch("ln_bwd+res", kln._ln_bwd, bwd, dict(HAS_DH=True, HAS_DX2=True, HAS_BB=False), cfg, shape, mixed),
            Launch("ln_bwd+res+bias", kln._ln_bwd, bwd, dict(HAS_DH=True, HAS_DX2=True, HAS_BB=True), cfg, shape,
                   mixed)]


def mlp_launches(m: int, d: int, hidden: int, dtype: torch.dtype, cap: tuple[int, int] = (9, 0)) -> list[Launch]:
    """The fused MLP's forward (fc1 + GELU) and backward (fc2's input gradient x gelu', db1
    partials) for m rows of width d, hidden = 4 d: under autocast x, the weights and dz are
    16-bit, contiguous (the autocast casts); the db1 partials fp32."""
    cfg, bwd_cfg = (kmlp.launch_config(m, hidden, d, dtype, cap, backward=b) for b in (False, True))
    t = Ptr(dtype)
    shape = f"M={m} D={d} H={hidden}"
    fwd = dict(X=t, W1=t, B1=t, H=t, A=t, M=m, N=hidden, K=d, stride_xm=d, stride_wn=d, stride_hm=hidden)
    bwd = dict(DZ=t, W2=t, H=t, DH=t, DB_PART=Ptr(torch.float32), M=m, N=hidden, K=d, stride_dzm=d,
               stride_wk=hidden, stride_hm=hidden)
    mode = dict(PREC=None)
    return [Launch("mlp_fwd", kmlp._mlp_fwd, fwd, mode, cfg, shape, _TT[dtype]),
            Launch("mlp_bwd", kmlp._mlp_bwd, bwd, mode, bwd_cfg, shape, _TT[dtype])]


# Image dtypes the pretraining loop hands the MAE loss (it sees the batch itself, not an autocast
# copy): the prepared-shard loaders on a GPU (DALI, torch) yield bf16, the file loader fp32.
LOSS_IMAGE_DTYPES = (torch.bfloat16, torch.float32)


def mae_loss_launches(b: int, img: int, patch: int, chans: int, dtype: torch.dtype,
                      norm_pix: bool = True) -> list[Launch]:
    """The MAE loss forward and backward for each image dtype of LOSS_IMAGE_DTYPES: pred
    (autocast dtype) is decoder_pred(...)[:, 1:, :] (a slice), imgs (B, C, H, W) contiguous,
    d(pred) contiguous in pred's dtype."""
    gw = img // patch
    length, p = gw * gw, patch * patch * chans
    cfg = kml.launch_config(p)
    t, f32 = Ptr(dtype), Ptr(torch.float32)
    mode = dict(NORM_PIX=norm_pix)
    out = []
    for img_dtype in LOSS_IMAGE_DTYPES:
        common = dict(PRED=t, IMG=Ptr(img_dtype), MASK=f32, stride_pb=(length + 1) * p, stride_pl=p,
                      stride_ib=chans * img * img, stride_ic=img * img, stride_ih=img, stride_iw=1, L=length, GW=gw,
                      C=chans, PATCH=patch, P=p, eps=1e-6)
        shape = f"B={b} L={length} P={p} img={_TT[img_dtype]}"
        out += [Launch("mae_loss_fwd", kml._mae_fwd, dict(common, LOSS=f32), mode, cfg, shape, _TT[dtype]),
                Launch("mae_loss_bwd", kml._mae_bwd, dict(common, SCALE=f32, DPRED=t, stride_db=length * p,
                                                          stride_dl=p), mode, cfg, shape, _TT[dtype])]
    return out


def model_launches(model: str, phase: str, img: int, dtype: torch.dtype, batch: int = BATCH,
                   varlen: bool = True, cap: tuple[int, int] = (9, 0)) -> list[tuple[Launch | None, dict]]:
    """[(launch, info)] of one training step on compute capability ``cap`` (the MLP's tiles
    depend on it); launch None where attention does not fit the kernel on some target (info
    says which shape; cxrfast.ops sends it to SDPA)."""
    cfg = PRESETS[MODELS[model]]
    length = (img // cfg.patch_size) ** 2
    enc_n = int(length * (1 - MASK_RATIO)) + 1 if phase == "pretrain" else length + 1
    stacks = [("encoder", cfg.embed_dim, cfg.num_heads, enc_n)]
    if phase == "pretrain":
        stacks.append(("decoder", DECODER[0], DECODER[1], length + 1))
    out = []
    for role, dim, heads, n in stacks:
        d = dim // heads
        info = dict(role=role, n=n, d=d, dtype=dtype, shape=f"B={batch} H={heads} N={n} D={d}")
        if n <= ka.MAX_SEQLEN:
            for v in (False, True) if varlen else (False,):
                out += [(launch, info) for launch in attention_launches(batch, heads, n, d, dtype, v, cap)]
        else:
            out.append((None, info))
        out += [(launch, info) for launch in layernorm_launches(batch * n, dim, dtype)]
        out += [(launch, info) for launch in mlp_launches(batch * n, dim, 4 * dim, dtype, cap)]
    if phase == "pretrain":
        out += [(launch, {}) for launch in mae_loss_launches(batch, img, cfg.patch_size, 1, dtype)]
    return out


# ---- compiling and reading the binary ----------------------------------------------------

def _bin_dir() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def tools() -> dict[str, str | None]:
    """Paths of the bundled ptxas (both, where Triton ships two), cuobjdump and nvdisasm."""
    d = _bin_dir()
    found = {}
    for name in ("ptxas", "ptxas-blackwell", "cuobjdump", "nvdisasm"):
        p = d / name
        found[name] = str(p) if p.exists() else shutil.which(name)
    env = os.environ.get("TRITON_PTXAS_PATH")
    if env:
        found["ptxas"] = env
    return found


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX; each bundled ptxas is
    tried, since the PTX version Triton emits for a target may need the newer one."""
    t = tools()
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        for exe in (t["ptxas"], t["ptxas-blackwell"]):
            if not exe:
                continue
            r = subprocess.run([exe, "-v", f"--gpu-name={gpu}", str(src), "-o", str(Path(tmp) / "k.o")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.search(r"Used (\d+) registers", r.stderr)
                spill = re.search(r"(\d+) bytes spill stores", r.stderr)
                return dict(ptxas_regs=int(regs.group(1)) if regs else None,
                            spill=int(spill.group(1)) if spill else 0)
            errors.append(r.stderr.strip().splitlines()[0] if r.stderr.strip() else f"exit {r.returncode}")
    raise RuntimeError(f"ptxas could not assemble the PTX for {gpu}: {'; '.join(errors) or 'ptxas not found'}")


def _cubin_report(cubin: bytes, ptx: str) -> dict:
    """Registers, stack and static shared memory of the cubin Triton built, and its MMA kind."""
    t = tools()
    out = dict(regs=None, stack=None, static_shared=0)
    if not t["cuobjdump"]:
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        out["mma"] = mma + " (PTX)"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([t["cuobjdump"], "-res-usage", str(path)], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", res)
        if m:
            out.update(regs=int(m.group(1)), stack=int(m.group(2)), static_shared=int(m.group(3)))
        sass = subprocess.run([t["cuobjdump"], "-sass", str(path)], capture_output=True, text=True).stdout
    hgmma, hmma = len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass))
    out["mma"] = f"wgmma x{hgmma}" if hgmma else f"mma.sync x{hmma}" if hmma else "none"
    return out


def _triton_version() -> str:
    import triton

    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 3):
        raise RuntimeError(f"bench/gpu_static.py needs Triton >= 3.3 (ASTSource attrs as a dict); "
                           f"found {triton.__version__}")
    return triton.__version__


def default_cache_dir() -> Path:
    env = os.environ.get("CXRFAST_GPU_STATIC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cxrfast" / "gpu_static"


def _compile_args(launch: Launch, arch: int) -> tuple[dict, dict, dict, dict, str]:
    """(signature, constexprs, attrs, options, cache key) of one launch for sm_<arch>."""
    version = _triton_version()
    sig, consts, attrs = specialise(launch.fn, launch.args, {**launch.mode, **launch.config.blocks})
    options = dict(num_warps=launch.config.num_warps, num_stages=launch.config.num_stages)
    key_text = json.dumps([launch.fn.__name__, _source_hash(launch.fn), sig,
                           sorted((k, repr(v)) for k, v in consts.items()),
                           sorted((list(k), v) for k, v in attrs.items()), arch, options, version])
    return sig, consts, attrs, options, hashlib.sha256(key_text.encode()).hexdigest()


def cache_path(launch: Launch, arch: int, cache_dir: Path) -> Path:
    """Where compile_launch keeps the result of ``launch`` on sm_<arch>."""
    return cache_dir / f"{_compile_args(launch, arch)[4]}.json"


def compile_launch(launch: Launch, arch: int, cache_dir: Path | None = None) -> dict:
    """Compiles one launch for sm_<arch> and reports registers, spills, shared memory and
    MMA kind; cached as JSON by (source hash, signature, constexprs, target, Triton).
    Compile in a process without TRITON_INTERPRET=1 (Triton reads it while compiling)."""
    sig, consts, attrs, options, key = _compile_args(launch, arch)
    path = cache_dir / f"{key}.json" if cache_dir else None
    if path is not None and path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # unreadable entry: compile again and overwrite it
    import triton
    import triton.compiler as tc
    from triton.backends.compiler import GPUTarget

    src = tc.ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = k.asm["ptx"]
    result = dict(shared=int(k.metadata.shared), **_ptxas_report(ptx, arch), **_cubin_report(k.asm["cubin"], ptx))
    if result["regs"] is None:
        result["regs"] = result["ptxas_regs"]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(result))
    return result


def occupancy(arch: int, regs: int, shared: int, warps: int) -> tuple[int, float]:
    """(resident blocks per SM, theoretical occupancy = resident warps / max warps): limited
    by warps, blocks, registers (allocated per warp in units of 256) and shared memory
    (plus 1 KiB the driver reserves per block)."""
    cap = divmod(arch, 10)
    per_warp = math.ceil(regs * 32 / 256) * 256
    limits = [MAX_BLOCKS[arch], MAX_WARPS[arch] // warps, (REGS_PER_SM // per_warp) // warps]
    if shared:
        limits.append(SMEM_PER_SM[cap] // (shared + 1024))
    blocks = max(0, min(limits))
    return blocks, blocks * warps / MAX_WARPS[arch]


def fits_target(result: dict, arch: int, warps: int) -> list[str]:
    """Why a compiled launch cannot run on sm_<arch> ([] when it can)."""
    cap = divmod(arch, 10)
    problems = []
    total = result["shared"] + result.get("static_shared", 0)
    if total > SMEM_PER_BLOCK[cap]:
        problems.append(f"shared memory {total} > {SMEM_PER_BLOCK[cap]}")
    if result["regs"] > 255 or math.ceil(result["regs"] * 32 / 256) * 256 * warps > REGS_PER_SM:
        problems.append(f"{result['regs']} registers x {warps} warps do not fit")
    return problems


# ---- the table -------------------------------------------------------------------------------

def collect(archs: list[str], models: list[str], dtypes: list[str], varlen: bool = True,
            phases: tuple = WORKLOADS) -> list[tuple[str, Launch | None, dict]]:
    """Unique (arch, launch) rows over the chosen models / workloads / dtypes, each with the
    list of workloads that make it."""
    rows: dict[tuple, tuple[str, Launch | None, dict]] = {}
    for arch in archs:
        cap = divmod(ARCHS[arch], 10)
        for model in models:
            for phase, img in phases:
                for dt in dtypes:
                    tag = f"{model} {phase} {img}"
                    for launch, info in model_launches(model, phase, img, DTYPES[dt], varlen=varlen, cap=cap):
                        if launch is not None and launch.kernel.startswith("attn") and \
                                not ka.fits(info["n"], info["d"], info["dtype"], cap=cap):
                            launch = None
                        if launch is None:
                            key = (arch, "sdpa", info["shape"], dt)
                            entry = rows.setdefault(key, (arch, None, dict(info, dtype=dt, used_by=[])))
                        else:
                            key = (arch, *launch.key())
                            entry = rows.setdefault(key, (arch, launch, dict(used_by=[])))
                        if tag not in entry[2]["used_by"]:
                            entry[2]["used_by"].append(tag)
    return list(rows.values())


_ROWS: list = []  # the rows a forked worker compiles, by index (Launch holds JIT functions: not picklable)


def _compile_row(i: int, cache_dir: Path | None) -> dict | None:
    arch, launch, _ = _ROWS[i]
    return None if launch is None else compile_launch(launch, ARCHS[arch], cache_dir)


def _compiled(rows, cache_dir: Path | None, jobs: int, progress=None):
    """Compile results per row, in order, on ``jobs`` forked processes (1: in this process)."""
    if jobs <= 1 or len(rows) < 2:
        for i, (arch, launch, _) in enumerate(rows):
            if progress:
                progress(i, len(rows), arch, launch)
            yield None if launch is None else compile_launch(launch, ARCHS[arch], cache_dir)
        return
    import concurrent.futures
    import multiprocessing

    _ROWS[:] = rows
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(_compile_row, i, cache_dir) for i in range(len(rows))]
        for i, fut in enumerate(futures):
            if progress:
                progress(i, len(rows), rows[i][0], rows[i][1])
            yield fut.result()


def report(rows, cache_dir: Path | None, progress=None, jobs: int = 1) -> list[dict]:
    """Compiles every row (through the cache; on ``jobs`` processes) and returns the table's records."""
    records = []
    for (arch, launch, info), res in zip(rows, _compiled(rows, cache_dir, jobs, progress)):
        if launch is None:
            records.append(dict(arch=arch, kernel="SDPA fallback", shape=info["shape"], dtype=info["dtype"],
                                used_by=info["used_by"]))
            continue
        warps = launch.config.num_warps
        blocks, occ = occupancy(ARCHS[arch], res["regs"], res["shared"] + res.get("static_shared", 0), warps)
        records.append(dict(arch=arch, kernel=launch.kernel, shape=launch.shape, dtype=launch.dtype,
                            blocks=" ".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}"
                                            for k, v in launch.config.blocks.items()),
                            regs=res["regs"], spill=res["spill"], stack=res.get("stack"),
                            shared=res["shared"] + res.get("static_shared", 0), warps=warps,
                            stages=launch.config.num_stages, occupancy=occ, mma=res["mma"],
                            problems=fits_target(res, ARCHS[arch], warps), used_by=info["used_by"]))
    return records


def format_table(records: list[dict]) -> str:
    head = ["arch", "kernel", "dtype", "shape", "tiles", "regs", "spill B", "smem B", "warps", "stages", "occ",
            "MMA", "used by"]
    lines = []
    for r in records:
        if r["kernel"] == "SDPA fallback":
            lines.append([r["arch"], "SDPA fallback", r["dtype"], r["shape"], "(over the tile limit)", "", "", "", "",
                          "", "", "", ", ".join(r["used_by"])])
            continue
        note = "  DOES NOT FIT: " + "; ".join(r["problems"]) if r["problems"] else ""
        lines.append([r["arch"], r["kernel"], r["dtype"], r["shape"], r["blocks"], str(r["regs"]), str(r["spill"]),
                      str(r["shared"]), str(r["warps"]), str(r["stages"]), f"{r['occupancy']:.0%}", r["mma"],
                      ", ".join(r["used_by"]) + note])
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def summary(records: list[dict]) -> str:
    compiled = [r for r in records if r["kernel"] != "SDPA fallback"]
    spills = [r for r in compiled if r["spill"] or r.get("stack")]
    bad = [r for r in compiled if r["problems"]]
    occ = [r["occupancy"] for r in compiled]
    text = (f"{len(compiled)} launches compiled ({len(records) - len(compiled)} shapes go to SDPA), "
            f"{len(spills)} spill, {len(bad)} do not fit")
    if occ:
        text += f", theoretical occupancy {min(occ):.0%}-{max(occ):.0%}"
    return text


def _choices(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    for v in items:
        if v not in allowed:
            raise ValueError(f"unknown {what} {v!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python bench/gpu_static.py",
        description="Compile every Triton launch of the MAE/ViT training step for NVIDIA targets (no GPU "
                    "needed) and print registers, spills, shared memory, warps, stages, theoretical occupancy "
                    "and MMA kind per launch. Compiled, not run.")
    parser.add_argument("--arch", default=",".join(ARCHS), help=f"comma-separated targets ({', '.join(ARCHS)})")
    parser.add_argument("--model", default=",".join(MODELS), help=f"comma-separated models ({', '.join(MODELS)})")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated autocast dtypes (bf16, fp16)")
    parser.add_argument("--workload", default=",".join(f"{p}:{i}" for p, i in WORKLOADS),
                        help="comma-separated phase:image size (pretrain:224, pretrain:448, finetune:224, finetune:448)")
    parser.add_argument("--json", type=Path, default=None, help="also write the records to this JSON file")
    parser.add_argument("--no-varlen", action="store_true", help="leave out the varlen attention launches "
                        "(the model itself calls the dense ones)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per CPU core)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"compiled results cache (default $CXRFAST_GPU_STATIC_CACHE or {default_cache_dir()})")
    args = parser.parse_args(argv)
    try:
        archs = _choices(args.arch, ARCHS, "--arch")
        models = _choices(args.model, MODELS, "--model")
        dtypes = _choices(args.dtype, DTYPES, "--dtype")
        names = {f"{p}:{i}": (p, i) for p, i in WORKLOADS}
        workloads = tuple(names[w] for w in _choices(args.workload, names, "--workload"))
        _triton_version()
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = args.cache_dir or default_cache_dir()
    rows = collect(archs, models, dtypes, varlen=not args.no_varlen, phases=workloads)

    def progress(i, n, arch, launch):
        if launch is not None and sys.stderr.isatty():
            print(f"\r[{i + 1}/{n}] {arch} {launch.kernel} {launch.shape}".ljust(70), end="", file=sys.stderr)

    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be at least 1", file=sys.stderr)
        return 2
    records = report(rows, cache, progress, jobs=args.jobs)
    if sys.stderr.isatty():
        print("\r".ljust(72), file=sys.stderr)
    if args.json:
        write_text(args.json, json.dumps(records, indent=1))
    print(format_table(records))
    print()
    print(summary(records))
    return 1 if any(r.get("problems") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
