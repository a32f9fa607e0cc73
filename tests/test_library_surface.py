"""What `import cxrfast` offers (issue 11): a version, lazy entry points, the one-call
loader over a prepared folder, and a plain DataLoader that says what it needs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import cxrfast
from cxrfast.data.shards import COLLATE_HINT, PreparedData, PreparedDataset, collate
from test_data_loaders import write_prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """20 images of 24 x 24, image i filled with value 10 i (so a batch says which images it
    holds), label A = i odd, splits train (14) / val (6)."""
    images = np.stack([np.full((24, 24), 10 * i, np.uint8) for i in range(20)])
    out = write_prepared(tmp_path_factory.mktemp("surface") / "prep", images, np.arange(20) % 2, per_shard=8)
    index = (out / "index.csv").read_text().splitlines()
    rows = [index[0]] + [r.replace(",train", ",val") if k >= 14 else r for k, r in enumerate(index[1:])]
    (out / "index.csv").write_text("\n".join(rows) + "\n")
    return out


def _ids(x: torch.Tensor) -> list[int]:
    """The image numbers in a batch of whole (un-augmented) images: value 10 i, normalised."""
    raw = (x[:, 0].mean((1, 2)) * 0.25 + 0.5) * 255 / 10
    return raw.round().int().tolist()


def test_import_is_cheap_and_has_a_version():
    code = "import sys, cxrfast; print(cxrfast.__version__); print('torch' in sys.modules, 'cxrfast._dicom' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, loaded = proc.stdout.splitlines()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{version}"' in pyproject
    assert loaded == "False False"


def test_preparing_imports_no_torch():
    """Every part of a parallel prepare starts a process: torch's import would be seconds of each."""
    code = "import sys, cxrfast.prepare, cxrfast.manifest; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    from cxrfast.data import ResumableSampler, shards

    assert shards.FORMAT_VERSION == 2 and ResumableSampler.__module__ == "cxrfast.data.sampler"


def test_version_falls_back_to_pyproject(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cxrfast._version() == cxrfast.__version__ != "0+unknown"


def test_entry_points_resolve_lazily():
    from cxrfast import dicom, errors, prepare

    assert cxrfast.read is dicom.read and cxrfast.read_many is dicom.read_many
    assert cxrfast.dicom is dicom and cxrfast.DicomError is errors.DicomError
    assert cxrfast.prepare is prepare and callable(cxrfast.prepare.prepare)
    from cxrfast.data.loaders import loader

    assert cxrfast.data.loader is loader
    assert {"read", "prepare", "data", "__version__"} <= set(dir(cxrfast))
    with pytest.raises(AttributeError, match="no_such_thing"):
        cxrfast.no_such_thing


def test_loader_eval_gives_every_image_once_in_order_with_labels(folder):
    batches = cxrfast.data.loader(folder, batch_size=6, train=False, with_labels=True)
    got = list(batches)
    assert len(batches) == len(got) == 4  # 6 + 6 + 6 + 2: nothing dropped when not training
    ids = [i for x, _ in got for i in _ids(x)]
    assert ids == list(range(20))
    labels = torch.cat([y for _, y in got])
    assert labels.shape == (20, 1) and labels[:, 0].tolist() == [i % 2 for i in range(20)]
    x, _ = got[0]
    assert x.shape == (6, 1, 24, 24) and x.dtype == torch.float32


def test_loader_train_shuffles_crops_and_moves_to_the_next_epoch(folder):
    batches = cxrfast.data.loader(folder, batch_size=4, split="train", img_size=16, in_chans=3, seed=3)
    first, second = list(batches), list(batches)
    assert len(batches) == len(first) == 3  # 14 training images: 3 full batches, the rest dropped
    assert first[0].shape == (4, 3, 16, 16)
    assert not all(torch.equal(a, b) for a, b in zip(first, second))  # another epoch: other order and crops
    batches.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(first, batches))  # the same epoch again: the same batches


def test_loader_split_and_mistakes(folder):
    val = list(cxrfast.data.loader(folder, batch_size=4, train=False, split="val"))
    assert [i for x in val for i in _ids(x)] == list(range(14, 20))
    with pytest.raises(ValueError, match="no images in split 'test'"):
        cxrfast.data.loader(folder, batch_size=4, split="test")
    with pytest.raises(ValueError, match="too few for one batch of 64"):
        cxrfast.data.loader(folder, batch_size=64)
    with pytest.raises(ValueError, match="loader must be one of"):
        cxrfast.data.loader(folder, batch_size=4, backend="fast")


def test_plain_dataloader_says_which_collate_to_pass(folder):
    dataset = PreparedDataset(PreparedData(folder), img_size=24, train=False)
    with pytest.raises(TypeError) as info:
        next(iter(DataLoader(dataset, batch_size=4)))
    assert str(info.value) == COLLATE_HINT
    assert "collate_fn=cxrfast.data.shards.collate" in COLLATE_HINT and "cxrfast.data.loader(" in COLLATE_HINT
    x = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))  # as the message says: it works
    assert _ids(x) == [0, 1, 2, 3]
    assert _ids(torch.stack([dataset[i] for i in range(2)])) == [0, 1]  # one item at a time works too
