"""GPU loading from prepared shards at 224: the plain-torch GPU path (and DALI when
installed) in images/s per GPU, and the direct-from-DICOM path (CPU decode) for reference.
Skipped without CUDA. Run: pytest bench/test_bench_gpu_loader.py --benchmark-only"""
from __future__ import annotations

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU loader benchmarks need CUDA", allow_module_level=True)

from cxrfast.data import ResumableSampler, dali  # noqa: E402
from cxrfast.data.gpu_torch import TorchBatchLoader  # noqa: E402
from cxrfast.data.shards import FORMAT_VERSION, PreparedData  # noqa: E402


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_shards")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8192, 256, 256), dtype=np.uint8)
    np.save(folder / "shard_00000.npy", images)
    import csv
    import json

    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shard", "offset", "source", "patient_id", "split"])
        w.writerows([[0, i, f"{i}.png", f"p{i}", "train"] for i in range(len(images))])
    (folder / "meta.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "size": 256, "dtype": "uint8", "label_names": [],
                                                  "shards": ["shard_00000.npy"]}))
    return PreparedData(folder)


@pytest.mark.parametrize("backend", ["cxrfast torch GPU path", "DALI"])
def test_gpu_loader_images_per_second(benchmark, shards, backend):
    benchmark.group = "GPU loading from prepared 256 shards -> 224 bf16 (crop, flip, normalise), batch 256"
    sampler = ResumableSampler(len(shards), seed=0)
    if backend == "DALI":
        if not dali.available():
            pytest.skip("DALI not installed")
        loader = dali.DALILoader(shards, sampler, batch_size=256, img_size=224, device_id=0)
    else:
        loader = TorchBatchLoader(shards, sampler, batch_size=256, img_size=224, device="cuda")

    def epoch():
        n = 0
        for x in loader:
            n += x.shape[0]
        torch.cuda.synchronize()
        return n
    n = benchmark.pedantic(epoch, rounds=3, iterations=1, warmup_rounds=1)
    if benchmark.stats:
        benchmark.extra_info["img/s"] = round(n / benchmark.stats.stats.median)


@pytest.mark.parametrize("path", ["cxrfast direct-DICOM GPU path", "cxrfast CPU path (read_many)"])
def test_direct_dicom_sv1(benchmark, rg1, path):
    """SV1 chest radiographs straight from DICOM to 224x224 display tensors on the GPU."""
    from cxrfast import dicom
    from cxrfast.data.dicom_gpu import DicomReader

    benchmark.group = "direct DICOM (RG1 SV1, 8 files) -> 224x224 display on the GPU" + \
        (" (DALI decode)" if dali.available() else " (no DALI: CPU decode, GPU display)")
    paths = [rg1["paths"]["sv1"]] * 8
    if path.startswith("cxrfast direct"):
        reader = DicomReader("cuda", size=(224, 224))

        def run():
            out = reader(paths)
            torch.cuda.synchronize()
            return out
    else:
        def run():
            imgs = dicom.read_many(paths, size=(224, 224), dtype="float32")
            out = [torch.from_numpy(i.pixels).cuda(non_blocking=True) for i in imgs]
            torch.cuda.synchronize()
            return out
    out = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert len(out) == 8 and out[0].shape == (224, 224)
    if benchmark.stats:
        benchmark.extra_info["img/s"] = round(8 / benchmark.stats.stats.median)
