"""The step model (bench/step_model.py): a training step's FLOPs and bytes counted on fake tensors.

Its FLOPs must equal the ViT formula exactly, its byte counts a hand count, and its dtypes
what CUDA autocast would choose; otherwise the roofline it prints means nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_scripts
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parent.parent


sm = bench_scripts.load("step_model")


@pytest.fixture(scope="module")
def base_step():
    return sm.record_step("vit_base", 224, 2, "bf16", "triton")


@pytest.mark.parametrize("model,img", [("vit_tiny", 224), ("vit_small", 96)])
def test_flops_equal_the_vit_formula(model, img):
    step = sm.record_step(model, img, 3, "bf16", "triton")
    assert step.flops == sm.analytic_flops(model, img, 3)


def test_vit_base_flops_and_no_sync(base_step):
    assert base_step.flops == sm.analytic_flops("vit_base", 224, 2)
    # 57.8 GFLOP per image, as gpu-notes.md has it for MAE ViT-B/16 at 224
    assert 57.0e9 < base_step.flops / 2 < 58.5e9
    assert base_step.syncs == 0


def test_torch_backend_counts_the_same_flops():
    """SDPA and F.layer_norm instead of the kernels: the same model work."""
    step = sm.record_step("vit_tiny", 224, 2, "bf16", "torch")
    assert step.flops == sm.analytic_flops("vit_tiny", 224, 2)
    assert any("scaled_dot_product" in r.op for r in step.records)
    assert not any(r.op.startswith("cxrfast::") for r in step.records)


def test_dtypes_are_what_cuda_autocast_chooses(base_step):
    assert sm.check_autocast_dtypes(base_step) == []
    kinds = {r.kind for r in base_step.records}
    assert {"GEMM", "attention", "LayerNorm", "loss", "optimizer"} <= kinds
    assert sum(r.op == "aten::_fused_adamw_" for r in base_step.records) >= 1


def test_autocast_check_catches_an_fp32_gemm(base_step):
    bad = sm.Step(**{**base_step.__dict__, "dtype": "fp16"})  # the bf16 step judged as fp16
    assert sm.check_autocast_dtypes(bad)


def test_linear_gelu_bytes_equal_a_hand_count():
    rec = sm.Recorder()
    with FakeTensorMode():
        lin = torch.nn.Linear(8, 16)
        x = torch.empty(4, 8)
        with rec:
            out = torch.nn.functional.gelu(lin(x)).sum()
            rec.phase = "backward"
            out.backward()
    got = [(r.op, r.phase, r.read, r.written, r.flops) for r in rec.records]
    f = 4  # fp32
    assert got == [
        ("aten::addmm", "forward", (16 + 32 + 128) * f, 64 * f, 2 * 4 * 8 * 16),  # bias, x, W^T -> y
        ("aten::gelu", "forward", 64 * f, 64 * f, 0),
        ("aten::sum", "forward", 64 * f, 1 * f, 0),
        ("aten::ones_like", "backward", 0, 1 * f, 0),  # the loss's seed gradient, nothing read
        ("aten::gelu_backward", "backward", (1 + 64) * f, 64 * f, 0),  # the expanded seed is one element
        ("aten::mm", "backward", (64 + 32) * f, 128 * f, 2 * 4 * 8 * 16),  # dW = dy^T x (x needs no grad)
        ("aten::sum", "backward", 64 * f, 16 * f, 0),  # db
    ]


def test_in_place_views_and_copies_are_counted_as_they_move():
    rec = sm.Recorder()
    with FakeTensorMode():
        a, b = torch.empty(10), torch.empty(10, dtype=torch.bfloat16)
        with rec:
            a.add_(b)  # reads a and b, writes a
            a.copy_(b)  # reads b only
            a.zero_()  # writes only
            a.view(2, 5).t()  # views: nothing
            a.expand(3, 10).contiguous()  # reads 10, writes 30
    got = [(r.op, r.read, r.written) for r in rec.records]
    assert got == [("aten::add_", 60, 40), ("aten::copy_", 20, 40), ("aten::zero_", 0, 40),
                   ("aten::clone", 40, 120)]


def test_roofline_takes_the_slower_of_compute_and_memory():
    card = sm.Card("test", peak_flops=1e12, bandwidth=1e9)
    recs = [sm.OpRecord("aten::mm", "GEMM", "forward", int(7e9), 0, 0, ""),  # 10 ms at 70%
            sm.OpRecord("aten::add", "elementwise", "forward", 0, int(4e6), int(4e6), "")]  # 10 ms at 80%
    step = sm.Step("m", 224, 10, "bf16", "triton", recs, 0)
    est = sm.roofline(step, card, gemm_eff=0.7, mem_eff=0.8)
    assert est.step_ms == pytest.approx(20.0)
    assert est.ms_by_kind == pytest.approx({"GEMM": 10.0, "elementwise": 10.0})
    assert est.img_per_s == pytest.approx(500.0)
    assert est.mfu == pytest.approx(7e9 / (0.020 * 1e12))
    assert step.non_gemm_bytes == 8e6 and step.gemm_bytes == 0
    assert est.host_ms == 0 and est.device_ms == pytest.approx(20.0)


def test_roofline_is_host_bound_when_issuing_the_ops_takes_longer():
    card = sm.Card("test", peak_flops=1e12, bandwidth=1e9)
    recs = [sm.OpRecord("aten::add", "elementwise", "forward", 0, int(4e6), int(4e6), "")] * 3  # 30 ms device
    step = sm.Step("m", 224, 10, "bf16", "triton", recs, 0)
    assert sm.roofline(step, card, host_us=5000).step_ms == pytest.approx(30.0)  # 15 ms host: device-bound
    est = sm.roofline(step, card, host_us=20000)
    assert est.host_ms == pytest.approx(60.0) and est.step_ms == pytest.approx(60.0)
    assert est.device_ms == pytest.approx(30.0) and "HOST-BOUND" in sm._host_line(step, est)


def test_cli_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "s.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "step_model.py"), "--model", "vit_tiny",
                          "--img_size", "64", "--batch", "4", "--card", "a100", "--json", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "| **total** |" in res.stdout and "MFU" in res.stdout and "A100" in res.stdout
    data = json.loads(out.read_text())
    assert data["tflop"] * 1e12 == pytest.approx(sm.analytic_flops("vit_tiny", 64, 4))
    assert 0 < data["mfu"] < 1 and data["syncs"] == 0


@pytest.mark.parametrize("argv,needle", [(["--model", "vit_giant"], "--model 'vit_giant'"),
                                         (["--mem_eff", "1.5"], "--mem_eff 1.5")])
def test_cli_mistakes_are_one_error_line(argv, needle):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "step_model.py"), *argv],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error:") and needle in res.stderr
    assert "Traceback" not in res.stderr


def test_predict_vs_measured_runs_its_code_path_on_cpu(tmp_path):
    """bench/gpu_check.sh runs it on the GPU; here the same code path on CPU, so the one device
    call does not find its bugs."""
    md = tmp_path / "t.md"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "predict_vs_measured.py"), "--device", "cpu",
                          "--model", "vit_tiny", "--img_size", "64", "--batch", "2", "--steps", "1", "--md", str(md)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr
    text = md.read_text()
    assert "| **step (wall, synchronised)** |" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for kind in ("GEMM", "attention", "LayerNorm", "optimizer"):
        measured = float(rows[kind].split("|")[3])
        assert measured > 0, f"no measured time attributed to {kind}"


def test_predict_vs_measured_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "predict_vs_measured.py"), "--model", "vit_tiny"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: --device cuda")


def test_kernel_ops_count_their_declared_launch_traffic(monkeypatch):
    """On the kernel path a multi-launch op counts what its launches read and write
    (kernels.library.TRAFFIC); its torch reference counts its operands once."""
    import kernels.attention  # noqa: F401  (the kernel modules register their traffic on import)
    import kernels.mlp  # noqa: F401
    from kernels.library import TRAFFIC

    assert {"attention_qkv_backward", "mlp", "mlp_backward"} <= set(TRAFFIC)
    monkeypatch.setitem(TRAFFIC, "mlp_backward", lambda args, out: (123, 456))
    kernel = sm.record_step("vit_tiny", 64, 2, "bf16", "triton")
    ref = sm.record_step("vit_tiny", 64, 2, "bf16", "reference")
    got = {(r.read, r.written) for r in kernel.records if r.op == "cxrfast::mlp_backward"}
    assert got == {(123, 456)}
    assert all((r.read, r.written) != (123, 456) for r in ref.records if r.op == "cxrfast::mlp_backward")
