"""The static GPU report (bench/gpu_static.py): launches compiled for sm_90 / sm_80 with
Triton's own compiler on this CPU machine, no GPU.

CI compiles a representative subset (about 75 s cold on the 2-core VM, seconds once cached
under $CXRFAST_GPU_STATIC_CACHE or ~/.cache/cxrfast/gpu_static): the dense launches of MAE
ViT-B/16 pretraining and fine-tuning at 224 and ViT-H/14 pretraining at 224 (every distinct
attention tile of the 224 models, both decoder widths, three hidden sizes) in bf16 on sm_90
and sm_80, plus ViT-B/16 pretraining in fp16 on sm_80. The full set (every model, 224 and
448, both dtypes, sm_90/80/89/86, varlen too) runs from the command line:
``python bench/gpu_static.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import bench_scripts
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")


gs = bench_scripts.load("gpu_static")
_TOOLS = gs.tools()
_OLD_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)

# (dtype, targets, model, workloads): each one run of the report, in a subprocess without
# TRITON_INTERPRET (this session runs kernels in the interpreter; Triton compiles only outside it).
CI_SET = [("bf16", "sm_90,sm_80", "vit_b16", "pretrain:224,finetune:224"),
          ("bf16", "sm_90,sm_80", "vit_h14", "pretrain:224"),
          ("fp16", "sm_80", "vit_b16", "pretrain:224")]


def _ci_rows():
    out, seen = [], set()
    for dt, archs, model, workloads in CI_SET:
        phases = tuple((w.split(":")[0], int(w.split(":")[1])) for w in workloads.split(","))
        for arch, launch, _ in gs.collect(archs.split(","), [model], [dt], varlen=False, phases=phases):
            if launch is not None and (arch, launch.key()) not in seen:
                seen.add((arch, launch.key()))
                out.append((arch, launch))
    return out


LAUNCHES = _ci_rows()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{(arch, kernel, dtype, shape): record} from bench/gpu_static.py runs over CI_SET,
    cached in $CXRFAST_GPU_STATIC_CACHE or ~/.cache/cxrfast/gpu_static."""
    if _OLD_TRITON or not (_TOOLS["ptxas"] or _TOOLS["ptxas-blackwell"]):
        pytest.skip("needs Triton >= 3.3 and its bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    records = {}
    for i, (dt, archs, model, workloads) in enumerate(CI_SET):
        out = tmp_path_factory.mktemp("gpu_static") / f"{i}.json"
        r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_static.py"), "--arch", archs, "--model", model,
                            "--dtype", dt, "--workload", workloads, "--no-varlen", "--json", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode in (0, 1), r.stderr[-3000:]
        for rec in json.loads(out.read_text()):
            records[(rec["arch"], rec["kernel"], rec["dtype"], rec["shape"])] = rec
    return records


@pytest.mark.parametrize("arch,launch", LAUNCHES,
                         ids=[f"{a}-{x.kernel}-{x.dtype}-{x.shape.replace(' ', '_')}" for a, x in LAUNCHES])
def test_launch_compiles_fits_and_does_not_spill(arch, launch, compiled):
    rec = compiled[(arch, launch.kernel, launch.dtype, launch.shape)]
    assert rec["problems"] == []  # fits the target's shared memory and registers
    assert rec["spill"] == 0, f"{launch.kernel} {launch.shape} spills {rec['spill']} bytes on {arch}"
    assert rec["stack"] in (0, None)
    assert 0 < rec["regs"] <= 255 and 0 < rec["occupancy"] <= 1
    assert rec["warps"] == launch.config.num_warps and rec["stages"] == launch.config.num_stages
    if launch.kernel.startswith("attn"):
        from kernels import attention as ka

        n, d = (int(x.split("=")[1]) for x in launch.shape.split()[2:4])
        # fits() decides with smem_bytes(): it must bound what the compiler really uses
        assert rec["shared"] <= ka.smem_bytes(n, d, gs.DTYPES[launch.dtype])


def test_ci_set_covers_every_kernel():
    kernels = {launch.kernel for _, launch in LAUNCHES}
    assert kernels == {"attn_fwd", "attn_bwd_fused", "attn_bwd_delta", "attn_bwd_dq", "attn_bwd_dkdv", "ln_fwd",
                       "ln_fwd+res", "ln_fwd+res+bias", "ln_bwd", "ln_bwd+res", "ln_bwd+res+bias", "mae_loss_fwd",
                       "mae_loss_bwd", "mlp_fwd", "mlp_bwd"}


def test_mlp_rows_cover_the_model_shapes_and_use_wgmma_on_sm_90(compiled):
    """The fused MLP at every CI shape (encoder, decoder, fine-tuning; three widths): fits,
    no spill (the test above), and tensor-core MMAs: wgmma on sm_90, mma.sync on sm_80."""
    rows = {k: r for k, r in compiled.items() if k[1].startswith("mlp")}
    shapes = {k[3] for k in rows}
    assert {"M=12800 D=768 H=3072", "M=50432 D=512 H=2048", "M=50432 D=768 H=3072", "M=16640 D=1280 H=5120"} <= shapes
    for (arch, kernel, dtype, shape), r in rows.items():
        assert r["mma"].startswith("wgmma" if arch == "sm_90" else "mma.sync"), (arch, kernel, shape, r["mma"])


def test_long_sequences_go_to_sdpa_on_every_target():
    from kernels import attention as ka

    rows = gs.collect(list(gs.ARCHS), ["vit_b16"], ["bf16"], varlen=False, phases=(("finetune", 448),))
    fallbacks = [info for _, launch, info in rows if launch is None]
    assert len(fallbacks) == len(gs.ARCHS) and all(f["n"] == 785 for f in fallbacks)
    for cap in gs.SMEM_PER_BLOCK:
        assert not ka.fits(257, 80, torch.bfloat16, cap=cap)  # ViT-H/14 fine-tuning at 224: 512 x 128 tile


def test_fits_uses_the_targets_shared_memory(monkeypatch):
    from kernels import attention as ka
    from kernels import launch

    need = ka.smem_bytes(197, 128, torch.bfloat16)  # 256 keys x 128 dims: between the limits
    assert launch.SMEM_PER_BLOCK[(8, 6)] < need <= launch.SMEM_PER_BLOCK[(8, 0)]
    assert ka.fits(197, 128, torch.bfloat16, cap=(9, 0)) and ka.fits(197, 128, torch.bfloat16, cap=(8, 0))
    assert not ka.fits(197, 128, torch.bfloat16, cap=(8, 6)) and not ka.fits(197, 128, torch.bfloat16, cap=(8, 9))
    assert ka.fits(197, 32, torch.bfloat16, cap=(8, 6))

    class Props:  # an RTX 3090 as torch reports it
        shared_memory_per_block_optin = 99 * 1024

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    assert not ka.fits(197, 128, torch.bfloat16, device="cuda")
    Props.shared_memory_per_block_optin = 227 * 1024
    assert ka.fits(197, 128, torch.bfloat16, device="cuda")


def test_launch_code_and_report_use_the_same_config(monkeypatch):
    """The kwargs the attention and LayerNorm launches pass are what the report compiles."""
    from kernels import attention as ka
    from kernels import layernorm as kln

    seen = {}

    class Stop(Exception):
        pass

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen[self.name] = {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}
                raise Stop
            return launch

    from kernels import mlp as kmlp

    monkeypatch.setattr(ka, "_attn_fwd", Recorder("attn"))
    monkeypatch.setattr(kln, "_ln_fwd", Recorder("ln"))
    monkeypatch.setattr(kmlp, "_mlp_fwd", Recorder("mlp_fwd"))
    monkeypatch.setattr(kmlp, "_mlp_bwd", Recorder("mlp_bwd"))
    q = torch.zeros(2, 16, 197, 32)
    with pytest.raises(Stop):
        ka.attention(q, q, q)
    with pytest.raises(Stop):
        kln.layer_norm(torch.zeros(4, 512), torch.ones(512), torch.zeros(512))
    fwd = gs.attention_launches(2, 16, 197, 32, torch.bfloat16)[0]
    assert seen["attn"] == {**fwd.mode, **fwd.config.kwargs(), "PREC": "ieee"}  # fp32 input here
    ln = gs.layernorm_launches(4, 512, torch.bfloat16)[0]
    assert seen["ln"] == {**ln.mode, **ln.config.kwargs()}
    # the MLP's two kernels, bf16 (launched on CPU tensors: the recorder stops before any arithmetic)
    bf = dict(dtype=torch.bfloat16)
    x, w1, b1, w2, b2 = (torch.zeros(s, **bf) for s in ((300, 64), (256, 64), 256, (64, 256), 64))
    with pytest.raises(Stop):
        kmlp._forward(x, w1, b1, w2, b2)
    with pytest.raises(Stop):
        kmlp._backward(torch.zeros(300, 64, **bf), x, w1, w2, torch.zeros(300, 256, **bf), torch.zeros(300, 256, **bf))
    fwd, bwd = gs.mlp_launches(300, 64, 256, torch.bfloat16)  # the report's default target: sm_90, as on CPU
    assert seen["mlp_fwd"] == {**fwd.mode, **fwd.config.kwargs()}
    assert seen["mlp_bwd"] == {**bwd.mode, **bwd.config.kwargs()}
    assert fwd.config != bwd.config  # the backward's narrower tile


def test_results_are_cached(tmp_path, monkeypatch):
    launch = gs.layernorm_launches(256 * 50, 768, torch.bfloat16)[0]
    path = gs.cache_path(launch, 80, tmp_path)
    assert path.parent == tmp_path and gs.cache_path(launch, 90, tmp_path) != path
    path.write_text(json.dumps({"regs": 32, "spill": 0, "shared": 16}))

    def no_compile(*a, **k):
        raise AssertionError("compiled again despite the cache")

    monkeypatch.setattr(triton, "compile", no_compile)
    assert gs.compile_launch(launch, 80, tmp_path) == {"regs": 32, "spill": 0, "shared": 16}


def test_cli_rejects_unknown_arch_in_one_line(capsys, tmp_path):
    assert gs.main(["--arch", "sm_70", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "sm_70" in err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as e:
        gs.main(["--help"])
    assert e.value.code == 0 and "--arch" in capsys.readouterr().out


def test_unknown_capabilities_are_not_assumed_generous():
    """sm_120/121 (99 KiB per block) must not inherit sm_90's 227 KiB; a capability of an unknown
    major version gets the table's smallest figure."""
    from kernels.launch import smem_per_block

    assert smem_per_block((12, 0)) == smem_per_block((12, 1)) == 99 * 1024
    assert smem_per_block((10, 0)) == 227 * 1024
    assert smem_per_block((8, 9)) == 99 * 1024 and smem_per_block((8, 0)) == 163 * 1024
    assert smem_per_block((15, 0)) == 64 * 1024


def test_ci_set_sends_no_model_shape_to_sdpa():
    """A launch that fits() refused would drop out of LAUNCHES silently: the CI shapes all run
    the kernels today, and a regression sending one to SDPA must fail here."""
    refused = []
    for dt, archs, model, workloads in CI_SET:
        phases = tuple((w.split(":")[0], int(w.split(":")[1])) for w in workloads.split(","))
        refused += [(arch, info) for arch, launch, info in gs.collect(archs.split(","), [model], [dt], varlen=False,
                                                                        phases=phases) if launch is None]
    assert not refused, refused
