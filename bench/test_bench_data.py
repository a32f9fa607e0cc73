"""Dataset preparation and CPU loading against the pipelines people use today, same run.

- prepare: `cxrfast.prepare` (native decode + display pipeline + resize in threads) against
  pydicom + pylibjpeg + Pillow in a multiprocessing pool of the same size, on full-size
  chest radiographs (RG1, JPEG lossless SV1, 12 copies with distinct SOP Instance UIDs).
- loading: images/s at 224 (random resized crop, flip, normalise) from prepared 256 shards,
  by the CPU DataLoader path (in-process native threads, as training uses it, and in worker
  processes), by the batch path on CPU tensors, and straight from the PNG files by
  cxrfast's ImageDataset (training without prepare: native resize, no float Pillow), against an
  ImageFolder-style Dataset that opens PNG files with PIL and crops/flips with PIL
  (torchvision's RandomResizedCrop recipe, written out without torchvision).

Run: pytest bench/test_bench_data.py --benchmark-only
"""
from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cxrfast.data import ResumableSampler
from cxrfast.data.direct import ImageDataset
from cxrfast.data.gpu_torch import TorchBatchLoader
from cxrfast.data.shards import PreparedData, PreparedDataset, collate
from cxrfast.prepare import prepare
from reference_prepare import prepare_reference

WORKERS = 2
_counter = itertools.count()


@pytest.fixture(scope="session")
def cxr_folder(rg1, tmp_path_factory):
    import pydicom
    from pydicom.uid import generate_uid

    folder = tmp_path_factory.mktemp("cxr_full")
    for i in range(12):
        ds = pydicom.dcmread(rg1["paths"]["sv1"])
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"rg1_{i:02d}.dcm")
    return folder


@pytest.mark.parametrize("tool", ["cxrfast.prepare", "pydicom+pylibjpeg+Pillow pool"])
def test_prepare_throughput(benchmark, cxr_folder, tmp_path, tool):
    benchmark.group = f"prepare 12 full-size CXR (RG1 SV1) -> 256 uint8, {WORKERS} workers"
    paths = sorted(str(p) for p in cxr_folder.glob("*.dcm"))
    if tool == "cxrfast.prepare":
        def run():
            out = tmp_path / f"p{next(_counter)}"  # a fresh folder: no resume
            return prepare(str(cxr_folder), str(out), size=256, workers=WORKERS)["images"]
    else:
        def run():
            return len(prepare_reference(paths, str(tmp_path / f"r{next(_counter)}.npy"), 256, WORKERS))
    n = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert n == 12
    if benchmark.stats:
        benchmark.extra_info["files/s"] = round(12 / benchmark.stats.stats.median, 1)


@pytest.fixture(scope="session")
def loading_data(tmp_path_factory):
    """512 synthetic radiographs at 256: as PNG files and as prepared shards."""
    from PIL import Image

    from cxrfast.synthetic import chest_image

    root = tmp_path_factory.mktemp("load")
    png = root / "png"
    png.mkdir()
    rng = np.random.default_rng(0)
    for i in range(512):
        img = (chest_image(rng, 256) // 16).astype(np.uint8)
        Image.fromarray(img).save(png / f"{i:04d}.png")
    prepare(str(png), str(root / "prepared"), size=256, workers=WORKERS)
    return png, PreparedData(root / "prepared")


class PILImageFolder(Dataset):
    """torchvision's ImageFolder + RandomResizedCrop + flip + ToTensor + Normalize, in PIL."""

    def __init__(self, files, size=224, scale=(0.2, 1.0)):
        self.files, self.size, self.scale = files, size, scale

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.open(self.files[i]).convert("L")
        w, h = img.size
        for _ in range(10):
            area = w * h * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = random.randint(0, w - cw), random.randint(0, h - ch)
                break
        else:
            cw = ch = min(w, h)
            left, top = (w - cw) // 2, (h - ch) // 2
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if random.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        return (x - 0.5) / 0.25


def _epoch(loader) -> int:
    n = 0
    for x in loader:
        n += x.shape[0]
    return n


@pytest.mark.parametrize("pipeline", ["cxrfast shards, CPU DataLoader (native threads)",
                                      "cxrfast shards, CPU DataLoader in worker processes",
                                      "cxrfast shards, batch path on CPU tensors",
                                      "cxrfast ImageDataset over the PNG files, worker processes",
                                      "ImageFolder-style PNG + PIL"])
def test_cpu_loader_images_per_second(benchmark, loading_data, pipeline):
    benchmark.group = f"CPU loading at 224 (crop, flip, normalise), batch 64, {WORKERS} cores"
    png, prepared = loading_data
    sampler = ResumableSampler(len(prepared), seed=0)
    if pipeline.startswith("cxrfast shards, batch"):
        torch.set_num_threads(WORKERS)
        loader = TorchBatchLoader(prepared, sampler, batch_size=64, img_size=224, device="cpu", out_dtype=torch.float32)
    elif pipeline.endswith("(native threads)"):  # how training reads shards: no worker processes
        torch.set_num_threads(WORKERS)
        loader = DataLoader(PreparedDataset(prepared, img_size=224), batch_size=64, sampler=sampler,
                            collate_fn=collate, drop_last=True)
    elif pipeline.endswith("worker processes"):
        loader = DataLoader(PreparedDataset(prepared, img_size=224), batch_size=64, sampler=sampler,
                            num_workers=WORKERS, collate_fn=collate, drop_last=True, persistent_workers=True)
    elif pipeline.startswith("cxrfast ImageDataset"):  # training straight from an image folder, no prepare
        files = sorted(png.glob("*.png"))
        loader = DataLoader(ImageDataset(files, img_size=224), batch_size=64, sampler=sampler, num_workers=WORKERS,
                            drop_last=True, persistent_workers=True)
    else:
        files = sorted(png.glob("*.png"))
        loader = DataLoader(PILImageFolder(files), batch_size=64, shuffle=True, num_workers=WORKERS, drop_last=True,
                            persistent_workers=True)
    n = benchmark.pedantic(_epoch, args=(loader,), rounds=7, iterations=1, warmup_rounds=1)
    assert n == 512
    if benchmark.stats:
        benchmark.extra_info["img/s"] = round(512 / benchmark.stats.stats.median)
