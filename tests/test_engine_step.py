"""train.engine's step: no host sync outside check steps, the device-side guard, the data-wait
report and warning, and the analytic FLOP count behind MFU."""
from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cxrfast import ops
from cxrfast.models import classifier, mae
from cxrfast.models.vit import param_groups
from train import engine, logs, runtime

# ops that copy a device value to the host (item(), bool(), int(), tolist(), nonzero's size)
SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
            torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}
CPU = runtime.Runtime(0, 1, 0, torch.device("cpu"))


class SyncsPerStep(TorchDispatchMode):
    """Counts host syncs, each charged to the optimizer step whose loss was computed last
    (step 0: set-up before the first loss)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.syncs: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNC_OPS:
            self.syncs[self.step] = self.syncs.get(self.step, 0) + 1
        return func(*args, **(kwargs or {}))


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int, size: int = 32):
        self.x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:  # the sampler yields (index, epoch)
        return self.x[key[0]]


def tiny_job(n: int = 32, loss=None, **kw) -> engine.Job:
    torch.manual_seed(0)
    model = mae("vit_tiny", img_size=32, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return engine.Job("pretrain", model, Images(n), param_groups(model, 0.05), loss=loss or (lambda net, x: net(x)[0]),
                      **kw)


def loop_config(tmp_path, **kw) -> engine.LoopConfig:
    base = dict(output_dir=str(tmp_path / "run"), epochs=1, warmup_epochs=0, batch_size=2, lr=1e-4, num_workers=0,
                log_every=4, save_every=1000, device="cpu")
    return engine.LoopConfig(**{**base, **kw})


@pytest.fixture
def backend(request):
    """cxrfast.ops' backend for one test, then back to auto."""
    ops.set_backend(request.param)
    yield request.param
    ops.set_backend("auto")


def small_mae():
    """Two encoder blocks of width 32 on 16 patches: small enough for the Triton interpreter."""
    torch.manual_seed(0)
    return mae("vit_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32,
               decoder_depth=1, decoder_num_heads=2)


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
SYNC_BACKENDS = ["auto", "reference",
                 pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs "
                                                                 "TRITON_INTERPRET=1 (set by conftest without CUDA)"))]


@pytest.mark.parametrize("backend", SYNC_BACKENDS, indirect=True)
def test_steps_between_check_steps_make_no_host_sync(tmp_path, backend):
    """Logging every 4th step (every 2nd under the slow Triton interpreter, on a smaller model):
    the steps in between make no host sync at all (the old loop called loss.item() and read
    the non-finite flag every micro-batch), whichever implementation runs the ops."""
    counter = SyncsPerStep()
    calls = [0]
    accum, steps, every = (1, 4, 2) if backend == "triton" else (2, 16, 4)

    def loss(net, x):
        calls[0] += 1
        counter.step = (calls[0] + accum - 1) // accum  # micro-batches 1..accum are step 1
        return net(x)[0]

    job = tiny_job(n=64, loss=loss)
    if backend == "triton":
        job.model = small_mae()
        job.param_groups = param_groups(job.model, 0.05)
    cfg = loop_config(tmp_path, accum_iter=accum, clip_grad=1.0, max_steps=steps, log_every=every)
    with counter:
        summary = engine.run(cfg, CPU, job, None)
    assert summary["steps"] == steps
    quiet = {s: counter.syncs.get(s, 0) for s in range(1, steps + 1) if s % every}
    assert quiet == dict.fromkeys(quiet, 0), quiet
    checks = range(every, steps + 1, every)
    assert all(counter.syncs.get(s, 0) > 0 for s in checks), counter.syncs  # the counter does see syncs


def test_non_finite_loss_stops_at_the_next_check_step_and_writes_nothing(tmp_path, monkeypatch):
    """A NaN loss at step 2 (log_every 100) stops the run at step 3, a checkpoint step, before
    its checkpoint is written: the message names step 2 and says no checkpoint exists yet."""
    monkeypatch.setenv(engine.FAULT_ENV, "0:2")
    cfg = loop_config(tmp_path, save_every=3, log_every=100, max_steps=10)
    job = tiny_job()
    with pytest.raises(engine.NonFiniteLoss) as info:
        engine.run(cfg, CPU, job, None)
    message = str(info.value)
    assert "loss is nan at step 2" in message and "No checkpoint has been written yet" in message, message
    assert not list((tmp_path / "run").glob("checkpoint-*.pth"))
    assert all(torch.isfinite(p).all() for p in job.model.parameters())  # step 2's update was skipped


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.FAULT_ENV, "0:3")
    cfg = loop_config(tmp_path, save_every=2, log_every=100, max_steps=10)
    with pytest.raises(engine.NonFiniteLoss) as info:
        engine.run(cfg, CPU, tiny_job(), None)
    good = tmp_path / "run" / "checkpoint-00000002.pth"
    assert "at step 3" in str(info.value) and f"last good checkpoint is {good}" in str(info.value)
    assert [p.name for p in good.parent.glob("checkpoint-*.pth")] == [good.name]  # step 4's was never written


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """Copies of the parameters and of every optimizer state tensor (moments and step count)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()]
    return params, state


def _assert_same(a: tuple[dict, list], b: tuple[dict, list]) -> None:
    for name in a[0]:
        assert torch.equal(a[0][name], b[0][name]), name
    for i, (sa, sb) in enumerate(zip(a[1], b[1])):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), i


class Fault:
    """Makes one step bad: its loss NaN (``nan_loss``), or one gradient entry NaN or inf
    through a tensor hook (the loss stays finite)."""

    def __init__(self, model: torch.nn.Module, kind: str):
        self.kind, self.on = kind, False
        if kind != "nan_loss":
            model.blocks[0].attn.qkv.weight.register_hook(self.hook)

    def hook(self, grad: torch.Tensor) -> torch.Tensor:
        if not self.on:
            return grad
        grad = grad.clone()
        grad.view(-1)[7] = float("nan") if self.kind == "nan_grad" else float("inf")
        return grad


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("kind", ["nan_loss", "nan_grad", "inf_grad"])
def test_a_non_finite_step_changes_no_parameter_and_no_optimizer_state(kind, clip):
    """Steps 1-2 are good, step 3 is bad, step 4 good: after step 3 the parameters, AdamW's
    moments and its step count equal those after step 2 exactly, step 3 made no host sync,
    and step 4 updates again, counting 3 steps. With clipping too (an inf norm scales the
    other gradients into finite zeros, so the flag is taken from the unclipped norm)."""
    job = tiny_job(n=8)
    model, fault = job.model, Fault(job.model, kind)
    cfg = engine.LoopConfig(output_dir="unused", batch_size=2, lr=1e-3, clip_grad=clip, device="cpu")
    optimizer, _ = engine.make_optimizer(cfg, CPU, job)
    guard = engine.Guard(CPU.device)
    data = torch.randn(8, 2, 1, 32, 32, generator=torch.Generator().manual_seed(1))

    def step(k: int, bad: bool = False) -> None:
        fault.on = bad and kind != "nan_loss"
        engine.train_step(model, optimizer, lambda: data[k], job.loss, guard, step=k, lr=1e-3, cfg=cfg, rt=CPU,
                          poison=bad and kind == "nan_loss")

    step(1)
    step(2)
    before = _snapshot(model, optimizer)
    trained = [p for p in model.parameters() if p.requires_grad]
    counter = SyncsPerStep()
    with counter:
        step(3, bad=True)
    assert counter.syncs == {}, counter.syncs
    _assert_same(before, _snapshot(model, optimizer))
    assert all(optimizer.state[p]["step"].item() == 2 for p in trained)
    assert guard.first_bad_step(CPU) == 3
    step(4)
    assert all(optimizer.state[p]["step"].item() == 3 for p in trained)
    after = _snapshot(model, optimizer)[0]
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(after[n], before[0][n]) for n in after)  # step 4 was applied
    assert guard.first_bad_step(CPU) == 3  # the first bad step is kept


def test_optimizer_skip_flag_is_all_reduced_max_across_ranks(monkeypatch):
    """Under DDP every rank must skip the same step: the flag goes through an all-reduce MAX
    (a device collective) before the optimizer reads it."""
    calls = []

    def all_reduce(t, op=None):
        calls.append((t.dtype, t.shape, op))
        t.fill_(1.0)  # another rank's step was bad

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    guard = engine.Guard(CPU.device)
    guard.record(torch.tensor(0.5))
    ddp = runtime.Runtime(0, 2, 0, torch.device("cpu"))
    flag = guard.found_inf(torch.tensor(1.0), 5, ddp)
    assert calls == [(torch.float32, (), torch.distributed.ReduceOp.MAX)]
    assert flag.dtype == torch.float32 and flag.shape == () and flag.item() == 1.0
    assert guard.first_bad.item() == 5


def test_non_finite_gradients_stop_the_run_at_the_next_check_step_and_save_nothing_of_them(tmp_path):
    """A NaN gradient (finite loss) at step 3, checkpoints every 2 steps: the update is
    skipped with no host sync on step 3, the run stops at step 4 before its checkpoint, the
    message names step 3 and checkpoint 2, and the model is left finite."""
    counter = SyncsPerStep()
    calls = [0]

    def loss(net, x):
        calls[0] += 1
        counter.step = calls[0]
        fault.on = calls[0] == 3
        return net(x)[0]

    job = tiny_job(loss=loss)
    fault = Fault(job.model, "nan_grad")
    cfg = loop_config(tmp_path, save_every=2, log_every=100, max_steps=10)
    with counter, pytest.raises(engine.NonFiniteLoss) as info:
        engine.run(cfg, CPU, job, None)
    message, good = str(info.value), tmp_path / "run" / "checkpoint-00000002.pth"
    assert "gradients are not finite" in message and "at step 3" in message and "update was skipped" in message
    assert f"last good checkpoint is {good}" in message, message
    assert [p.name for p in good.parent.glob("checkpoint-*.pth")] == [good.name]
    assert counter.syncs.get(3, 0) == 0 and counter.syncs.get(4, 0) > 0, counter.syncs
    assert calls[0] == 4  # stopped at the check step, not later
    assert all(torch.isfinite(p).all() for p in job.model.parameters())


@pytest.mark.parametrize("backend", ["triton", "reference"], indirect=True)
def test_a_training_step_on_fake_tensors_syncs_nothing_and_calls_each_op_once_per_layer(backend):
    """engine.train_step (forward, backward, clipping, the skip flag, fused AdamW) on CPU fake
    tensors: no data, no Triton launch, so the kernel path (triton: kernel=True) is traced
    where no GPU is. A host sync would fail on fake tensors and is counted too; every block
    calls attention and (add +) LayerNorm once, each with its backward."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    seen: dict = {}

    class Ops(SyncsPerStep):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "cxrfast" and "unshuffle" not in func.name():  # plain torch, no kernel flag
                names = [a.name for a in func._schema.arguments]
                key = (func.name(), args[names.index("kernel")])
                seen[key] = seen.get(key, 0) + 1
            return super().__torch_dispatch__(func, types, args, kwargs)

    model = small_mae()
    cfg = engine.LoopConfig(output_dir="unused", batch_size=2, lr=1e-3, clip_grad=1.0, device="cpu")
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:  # to_empty reads the real parameters once
        model.to_empty(device="cpu")
        job = engine.Job("pretrain", model, Images(2), param_groups(model, 0.05), loss=lambda net, x: net(x)[0])
        optimizer, _ = engine.make_optimizer(cfg, CPU, job)
        guard, imgs = engine.Guard(CPU.device), torch.empty(2, 1, 32, 32)
    assert all(isinstance(p, FakeTensor) for p in model.parameters())
    counter = Ops()
    with fake, counter:
        engine.train_step(model, optimizer, lambda: imgs, job.loss, guard, step=1, lr=1e-3, cfg=cfg, rt=CPU)
    assert counter.syncs == {}, counter.syncs
    kernel = backend == "triton"
    blocks = len(model.blocks) + len(model.decoder_blocks)  # 2 + 1
    # per stack (encoder, decoder) one plain norm (the first norm1); every other norm adds the
    # residual before it (norm2, the next norm1, the final norm: vit.run_blocks), two per block
    assert seen == {("cxrfast::layer_norm", kernel): 2, ("cxrfast::add_layer_norm", kernel): 2 * blocks,
                    ("cxrfast::attention_qkv", kernel): blocks, ("cxrfast::mae_loss", kernel): 1,
                    ("cxrfast::layer_norm_backward", kernel): 2 * blocks + 2,
                    ("cxrfast::attention_qkv_backward", kernel): blocks, ("cxrfast::mae_loss_backward", kernel): 1,
                    ("cxrfast::mlp", kernel): blocks, ("cxrfast::mlp_backward", kernel): blocks}, seen
    qkv = model.blocks[0].attn.qkv.weight
    assert optimizer.state[qkv]["exp_avg"].shape == qkv.shape and qkv.grad is None  # stepped, then zeroed


class SlowBatches:
    """A fake GPU loader: each batch takes 200 ms to arrive."""

    def __init__(self, data: torch.Tensor, batch: int):
        self.data, self.batch = data, batch

    def __call__(self, sampler):
        idx = list(sampler)
        for i in range(0, len(idx) - self.batch + 1, self.batch):
            time.sleep(0.2)
            yield self.data[[index for index, _ in idx[i:i + self.batch]]]


def test_slow_loader_is_reported_and_named(tmp_path, capsys):
    job = tiny_job(n=16)
    job.batches, job.loader = SlowBatches(job.dataset.x, 2), "slow test loader"
    cfg = loop_config(tmp_path, log_every=2, max_steps=6)
    engine.run(cfg, CPU, job, None)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning: the data loader" in line]
    assert len(warnings) == 1 and "(slow test loader)" in warnings[0], err  # once per run
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert r["data_wait_ms"] >= 190 and r["step_ms"] >= r["data_wait_ms"] and r["data_wait_frac"] > 0.05, r
        assert "mfu" not in r  # MFU is reported on CUDA only


def test_wait_warning_threshold():
    wait = logs.DataWait(torch.device("cpu"), "x loader")
    assert wait.warning({"data_wait_frac": 0.05}, 1, 10) is None
    line = wait.warning({"data_wait_frac": 0.2}, 11, 20)
    assert line.startswith("warning: ") and "(x loader)" in line and "20%" in line and "11-20" in line
    assert wait.warning({"data_wait_frac": 0.9}, 21, 30) is None  # given once


def test_fast_loader_waits_little(tmp_path):
    """The in-memory dataset through a DataLoader: the wait is measured and stays small."""
    engine.run(loop_config(tmp_path, log_every=4, max_steps=8), CPU, tiny_job(), None)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(0 <= r["data_wait_ms"] < r["step_ms"] for r in records), records
    assert all(r["data_wait_frac"] < 0.5 for r in records), records  # in-memory data: far from a stall


@pytest.mark.parametrize("kind", ["mae", "classifier"])
def test_analytic_flops_match_the_flop_counter(kind):
    """forward + backward of a tiny model, counted by torch.utils.flop_counter (attention on the
    math path, which the counter sees as bmm), equals the analytic formula exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    if kind == "mae":
        model = mae("vit_tiny", img_size=64, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, mask_ratio=0.6)
        size = 64
    else:
        model = classifier("vit_tiny", img_size=48, num_classes=5, in_chans=1)
        size = 48
    batch = 3
    x = torch.randn(batch, 1, size, size)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert counter.get_total_flops() == batch * logs.train_flops(model)


def test_peak_flops_is_none_off_cuda():
    assert logs.peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.4), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA A10", 125.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA A10G", None), ("NVIDIA H800", None), ("Tesla V100-SXM2-16GB", None)])
def test_peak_tflops_by_device_name(name, tflops):
    """Each card name torch reports picks its own dense bf16 peak (H100 variants differ:
    SXM 989.4, PCIe 756, NVL 835), and an unknown card gets none rather than a neighbour's."""
    assert logs.peak_tflops(name) == tflops


def test_cuda_step_clock_is_read_after_the_logging_sync(monkeypatch):
    """On CUDA the window's wall time must include the device work queued before the logging
    step: the clock is read after torch.cuda.synchronize(), which here takes 50 ms."""
    wait = logs.DataWait(torch.device("cpu"), "x")
    wait.cuda = True
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: time.sleep(0.05))
    timing = wait.window(1)
    assert timing["step_ms"] >= 50, timing
