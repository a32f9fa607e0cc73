"""The static GPU report (bench/gpu_static.py): launches compiled for sm_90 / sm_80 with
Triton's own compiler on this CPU machine, no GPU.

CI compiles a representative subset (about 2.5 minutes cold on 2 cores, seconds once cached
under $CXRFAST_GPU_STATIC_CACHE or ~/.cache/cxrfast/gpu_static): the dense launches of MAE
ViT-B/16 pretraining and fine-tuning at 224 and ViT-H/14 pretraining at 224 (every distinct
attention tile of the 224 models, both decoder widths, three hidden sizes) in bf16 on sm_90
and sm_80, plus ViT-B/16 pretraining in fp16 on sm_80. The full set (every model, 224 and
448, both dtypes, sm_90/80/89/86, varlen too) runs from the command line:
``python bench/gpu_static.py``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
triton = pytest.importorskip("triton")


def _load():
    spec = importlib.util.spec_from_file_location("gpu_static", ROOT / "bench" / "gpu_static.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_static"] = mod
    spec.loader.exec_module(mod)
    return mod


gs = _load()
_TOOLS = gs.tools()
needs_ptxas = pytest.mark.skipif(not (_TOOLS["ptxas"] or _TOOLS["ptxas-blackwell"]),
                                 reason="Triton's bundled ptxas is missing")
_OLD_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3)
needs_triton = pytest.mark.skipif(_OLD_TRITON, reason="the report needs Triton >= 3.3")

CI_SET = [("bf16", ("sm_90", "sm_80"), "vit_b16", ("pretrain", 224)),
          ("bf16", ("sm_90", "sm_80"), "vit_b16", ("finetune", 224)),
          ("bf16", ("sm_90", "sm_80"), "vit_h14", ("pretrain", 224)),
          ("fp16", ("sm_80",), "vit_b16", ("pretrain", 224))]


def _ci_rows():
    rows = []
    for dt, archs, model, workload in CI_SET:
        rows += gs.collect(list(archs), [model], [dt], varlen=False, phases=(workload,))
    seen, out = set(), []
    for arch, launch, info in rows:
        key = (arch, launch.key() if launch else info["shape"])
        if key not in seen:
            seen.add(key)
            out.append((arch, launch, info))
    return out


ROWS = _ci_rows()
LAUNCHES = [(arch, launch) for arch, launch, _ in ROWS if launch is not None]


@pytest.fixture(scope="module")
def cache_dir():
    return gs.default_cache_dir()


@needs_triton
@needs_ptxas
@pytest.mark.parametrize("arch,launch", LAUNCHES,
                         ids=[f"{a}-{x.kernel}-{x.dtype}-{x.shape.replace(' ', '_')}" for a, x in LAUNCHES])
def test_launch_compiles_fits_and_does_not_spill(arch, launch, cache_dir):
    res = gs.compile_launch(launch, gs.ARCHS[arch], cache_dir)
    assert gs.fits_target(res, gs.ARCHS[arch], launch.config.num_warps) == []
    assert res["spill"] == 0, f"{launch.kernel} {launch.shape} spills {res['spill']} bytes on {arch}"
    assert res["stack"] in (0, None)
    assert 0 < res["regs"] <= 255
    blocks, occ = gs.occupancy(gs.ARCHS[arch], res["regs"], res["shared"] + res["static_shared"],
                               launch.config.num_warps)
    assert blocks >= 1 and 0 < occ <= 1
    if launch.kernel.startswith("attn"):
        from kernels import attention as ka

        n, d = (int(x.split("=")[1]) for x in launch.shape.split()[2:4])
        # fits() decides with smem_bytes(): it must bound what the compiler really uses
        assert res["shared"] + res["static_shared"] <= ka.smem_bytes(n, d, gs.DTYPES[launch.dtype])


def test_ci_set_covers_every_kernel():
    kernels = {launch.kernel for _, launch in LAUNCHES}
    assert kernels == {"attn_fwd", "attn_bwd_dq", "attn_bwd_dkdv", "ln_fwd", "ln_fwd+res", "ln_bwd",
                       "ln_bwd+res", "mae_loss_fwd", "mae_loss_bwd"}


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

    monkeypatch.setattr(ka, "_attn_fwd", Recorder("attn"))
    monkeypatch.setattr(kln, "_ln_fwd", Recorder("ln"))
    q = torch.zeros(2, 16, 197, 32)
    with pytest.raises(Stop):
        ka.attention(q, q, q)
    with pytest.raises(Stop):
        kln.layer_norm(torch.zeros(4, 512), torch.ones(512), torch.zeros(512))
    fwd = gs.attention_launches(2, 16, 197, 32, torch.bfloat16)[0]
    assert seen["attn"] == {**fwd.mode, **fwd.config.kwargs(), "PREC": "ieee"}  # fp32 input here
    ln = gs.layernorm_launches(4, 512, torch.bfloat16)[0]
    assert seen["ln"] == {**ln.mode, **ln.config.kwargs()}


@needs_triton
@needs_ptxas
def test_results_are_cached(tmp_path, monkeypatch):
    launch = gs.layernorm_launches(256 * 50, 768, torch.bfloat16)[0]
    first = gs.compile_launch(launch, 80, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1

    def no_compile(*a, **k):
        raise AssertionError("compiled again despite the cache")

    monkeypatch.setattr(triton, "compile", no_compile)
    assert gs.compile_launch(launch, 80, tmp_path) == first


def test_cli_rejects_unknown_arch_in_one_line(capsys, tmp_path):
    assert gs.main(["--arch", "sm_70", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "sm_70" in err
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit) as e:
        gs.main(["--help"])
    assert e.value.code == 0 and "--arch" in capsys.readouterr().out
