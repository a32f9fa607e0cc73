"""Loaders over prepared shards: CPU DataLoader path, plain-torch batch path (run on CPU
tensors here), DALI in CPU-only mode; sharding; augmentation statistics; label alignment."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.data import ResumableSampler
from cxrfast.data import dali as dali_backend
from cxrfast.data.gpu_torch import TorchBatchLoader
from cxrfast.data.shards import FORMAT_VERSION, PreparedData, PreparedDataset

needs_dali = pytest.mark.skipif(not dali_backend.available(), reason="NVIDIA DALI not installed")


def write_prepared(folder: Path, images: np.ndarray, labels: np.ndarray | None = None, per_shard: int = 50) -> Path:
    """A prepared folder written by hand from the documented format (no cxrfast involved)."""
    folder.mkdir(parents=True)
    n, size, _ = images.shape
    shards = []
    for k, start in enumerate(range(0, n, per_shard)):
        np.save(folder / f"shard_{k:05d}.npy", images[start:start + per_shard])
        shards.append(f"shard_{k:05d}.npy")
    names = ["A"] if labels is not None else []
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shard", "offset", "source", "patient_id", "split"] + [f"label_{x}" for x in names])
        for i in range(n):
            w.writerow([i // per_shard, i % per_shard, f"img{i}.png", f"p{i}", "train"] +
                       ([int(labels[i])] if labels is not None else []))
    (folder / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "size": size, "dtype": str(images.dtype),
                                                  "label_names": names, "shards": shards}))
    return folder


@pytest.fixture(scope="module")
def random_data(tmp_path_factory):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 48, 48)).astype(np.uint8)
    labels = (images.reshape(64, -1).mean(1) > images.mean()).astype(np.float32)
    return PreparedData(write_prepared(tmp_path_factory.mktemp("p") / "rand", images, labels, per_shard=20))


@pytest.mark.parametrize("n,world", [(64, 2), (63, 2), (10, 3), (7, 8)])
def test_sharding_covers_every_sample_each_epoch(n, world):
    for epoch in (0, 1):
        seen = []
        for rank in range(world):
            s = ResumableSampler(n, rank=rank, world_size=world, seed=5)
            s.set_epoch(epoch)
            part = [i for i, e in s]
            assert all(e == epoch for _, e in s)
            assert len(part) == -(-n // world)  # equal counts keep DDP in step
            seen += part
        assert set(seen) == set(range(n))  # every sample at least once
        assert len(seen) - n == (-n) % world  # and the only repeats are the padding
    a, b = ResumableSampler(n, seed=5), ResumableSampler(n, seed=5)
    a.set_epoch(3)
    b.set_epoch(3, start=4)
    assert list(a)[4:] == list(b)  # resuming mid-epoch continues the same order


def test_torch_batch_path_matches_cpu_path(random_data):
    s = ResumableSampler(len(random_data), seed=0)
    s.set_epoch(1)
    for train, size in [(False, 48), (False, 32), (True, 40), (True, 24), (True, 64)]:
        cpu = PreparedDataset(random_data, img_size=size, train=train, seed=7, with_labels=True)
        loader = TorchBatchLoader(random_data, s, batch_size=16, img_size=size, train=train, seed=7, device="cpu",
                                  out_dtype=torch.float32, with_labels=True)
        keys = list(s)[:16]
        x, y = next(iter(loader))
        ref = torch.stack([cpu[k][0] for k in keys])
        assert torch.equal(y, torch.stack([cpu[k][1] for k in keys]))
        # same boxes, flips and antialiased filter: equal to float rounding
        torch.testing.assert_close(x, ref, atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_batch_path_on_cuda_matches_cpu_path(random_data):
    """Pinned gathering, uint8 upload and the batched-matmul resize on the GPU."""
    s = ResumableSampler(len(random_data), seed=0)
    s.set_epoch(2)
    cpu = PreparedDataset(random_data, img_size=40, train=True, seed=7, with_labels=True)
    for dtype, atol in [(torch.float32, 1e-4), (torch.bfloat16, 0.05)]:
        loader = TorchBatchLoader(random_data, s, batch_size=16, img_size=40, train=True, seed=7, device="cuda",
                                  out_dtype=dtype, with_labels=True)
        batches = list(loader)
        assert len(batches) == 4
        keys = list(s)
        for b, (x, y) in enumerate(batches):
            assert x.is_cuda and x.dtype == dtype and x.shape == (16, 1, 40, 40)
            ref = torch.stack([cpu[k][0] for k in keys[16 * b:16 * b + 16]])
            torch.testing.assert_close(x.float().cpu(), ref, atol=atol, rtol=0)
            assert torch.equal(y.cpu(), torch.stack([cpu[k][1] for k in keys[16 * b:16 * b + 16]]))


@needs_dali
@pytest.mark.parametrize("size", [48, 32])
def test_dali_cpu_matches_torch_fallback_without_augmentation(random_data, size):
    s = ResumableSampler(len(random_data), seed=0, shuffle=False)
    loader = dali_backend.DALILoader(random_data, s, batch_size=16, img_size=size, train=False, device_id=None,
                                     half="fp32", with_labels=True, num_threads=1)
    torch_loader = TorchBatchLoader(random_data, s, batch_size=16, img_size=size, train=False, device="cpu",
                                    out_dtype=torch.float32, with_labels=True)
    batches = 0
    for (xd, yd), (xt, yt) in zip(loader, torch_loader):
        assert xd.shape == xt.shape == (16, 1, size, size)
        assert torch.equal(yd.float(), yt)
        if size == 48:  # no resize: identical normalised values
            torch.testing.assert_close(xd, xt, atol=1e-5, rtol=0)
        else:  # two antialiased resamplers: close, not identical
            assert (xd - xt).abs().mean() < 0.05
        batches += 1
    assert batches == 4


def _ramp_data(tmp_path) -> PreparedData:
    """Horizontal ramps: after a crop, the output's left-right range is the crop width fraction,
    its sign the flip."""
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    return PreparedData(write_prepared(tmp_path / "ramp", np.repeat(ramp[None], 200, 0)))


def _crop_stats(batches) -> tuple[float, float]:
    widths, flips = [], []
    for x in batches:
        x = x.float() * 0.25 + 0.5  # undo normalisation: [0, 1] ramp values
        d = (x[:, 0, :, -1] - x[:, 0, :, 0]).mean(1)
        widths += d.abs().tolist()
        flips += (d < 0).float().tolist()
    return float(np.mean(widths)), float(np.mean(flips))


def test_augmentation_statistics_match(tmp_path):
    data = _ramp_data(tmp_path)
    s = ResumableSampler(len(data), seed=3)
    cpu = PreparedDataset(data, img_size=32, train=True, crop_scale=(0.2, 1.0), seed=3)
    cpu_batches = [torch.stack([cpu[k] for k in list(s)[i:i + 50]]) for i in range(0, 200, 50)]
    torch_batches = list(TorchBatchLoader(data, s, batch_size=50, img_size=32, train=True, seed=3, device="cpu",
                                          out_dtype=torch.float32))
    w_cpu, f_cpu = _crop_stats(cpu_batches)
    w_torch, f_torch = _crop_stats(torch_batches)
    assert abs(w_cpu - w_torch) < 0.02 and f_cpu == f_torch  # same boxes, same flips
    assert 0.35 < f_cpu < 0.65
    assert 0.4 < w_cpu < 0.85  # sqrt(area) over 0.2-1.0 with aspect jitter
    if dali_backend.available():
        dali_loader = dali_backend.DALILoader(data, s, batch_size=50, img_size=32, train=True, device_id=None,
                                              half="fp32", seed=3, num_threads=1)
        w_dali, f_dali = _crop_stats(list(dali_loader))
        assert abs(w_dali - w_cpu) < 0.08 and 0.35 < f_dali < 0.65


def test_prepared_labels_stay_aligned_through_every_loader(random_data):
    brightness = np.array([random_data.image(i).mean() for i in range(len(random_data))])
    np.testing.assert_array_equal(random_data.labels[:, 0], (brightness > brightness.mean()).astype(np.float32))
    s = ResumableSampler(len(random_data), seed=9)
    loaders = [TorchBatchLoader(random_data, s, batch_size=8, img_size=48, train=False, device="cpu",
                                out_dtype=torch.float32, with_labels=True)]
    if dali_backend.available():
        loaders.append(dali_backend.DALILoader(random_data, s, batch_size=8, img_size=48, train=False,
                                               device_id=None, half="fp32", with_labels=True, num_threads=1))
    for loader in loaders:
        for x, y in loader:
            means = x.float().mean((1, 2, 3)) * 0.25 + 0.5
            assert torch.equal(y[:, 0] > 0.5, means * 255 > float(brightness.mean()))


@needs_dali
def test_dali_parallel_workers_follow_the_sampler(random_data):
    """Worker processes recompute each epoch's order: same batches as the in-process source,
    including a resumed first epoch."""
    s = ResumableSampler(len(random_data), seed=4)
    s.set_epoch(2, start=16)
    args = dict(batch_size=8, img_size=48, train=False, device_id=None, half="fp32", with_labels=True, num_threads=1)
    parallel = dali_backend.DALILoader(random_data, s, py_workers=2, **args)
    serial = dali_backend.DALILoader(random_data, s, **args)
    for epoch in (2, 3):
        if epoch == 3:
            s.set_epoch(3)
        a, b = list(parallel), list(serial)
        assert len(a) == len(b) == len(s) // 8
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_batch_loader_thread_ends_when_the_consumer_stops_early(random_data):
    import threading

    before = threading.active_count()
    loader = TorchBatchLoader(random_data, ResumableSampler(len(random_data)), batch_size=4, img_size=48,
                              train=False, device="cpu", out_dtype=torch.float32, prefetch=1)
    it = iter(loader)
    next(it)
    it.close()  # what a `break` out of the training loop does
    assert threading.active_count() == before
