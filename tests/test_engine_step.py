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
    with pytest.raises(engine.NonFiniteLoss) as info:
        engine.run(cfg, CPU, tiny_job(), None)
    message = str(info.value)
    assert "loss is nan at step 2" in message and "No checkpoint has been written yet" in message, message
    assert not list((tmp_path / "run").glob("checkpoint-*.pth"))


def test_non_finite_loss_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(engine.FAULT_ENV, "0:3")
    cfg = loop_config(tmp_path, save_every=2, log_every=100, max_steps=10)
    with pytest.raises(engine.NonFiniteLoss) as info:
        engine.run(cfg, CPU, tiny_job(), None)
    good = tmp_path / "run" / "checkpoint-00000002.pth"
    assert "at step 3" in str(info.value) and f"last good checkpoint is {good}" in str(info.value)
    assert [p.name for p in good.parent.glob("checkpoint-*.pth")] == [good.name]  # step 4's was never written


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
