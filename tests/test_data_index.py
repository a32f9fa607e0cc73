"""The columnar index (cxrfast.data.index): prepare writes it, it equals index.csv, folders
without it are read from the CSV, broken ones are refused; 8 gloo ranks see disjoint,
complete shards of the data every epoch."""
from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cxrfast import manifest
from cxrfast.data import ResumableSampler
from cxrfast.data import index as columnar
from cxrfast.data.shards import PreparedData, PreparedDataset, PreparedFormatError
from cxrfast.prepare import prepare
from dicom_factory import make_dicom
from index_factory import write_synthetic


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A prepared folder of DICOMs (with Patient ID) and PNGs (without), labels with gaps."""
    from PIL import Image

    root = tmp_path_factory.mktemp("idx")
    src, out = root / "src", root / "out"
    src.mkdir()
    rng = np.random.default_rng(3)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "A", "B"])
        for i in range(9):
            a = (500 + 300 * i + rng.integers(0, 40, (30, 20 + i))).astype(np.uint16)
            name = f"im{i}.dcm" if i % 3 else f"im{i}.png"
            if i % 3:
                (src / name).write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
            else:
                Image.fromarray(a * 8).save(src / name)
            if i != 8:  # an image the label CSV does not list: NaN labels in the index
                w.writerow([name, i % 2, i % 3 % 2])
    prepare(str(src), str(out), size=16, labels=str(root / "labels.csv"), workers=1, shard_gb=3 * 16 * 16 / 2**30)
    return out


def _csv(folder: Path) -> list[dict]:
    with open(folder / "index.csv", newline="") as f:
        return list(csv.DictReader(f))


def _same_table(a: columnar.Table, b: columnar.Table) -> None:
    assert a.rows == b.rows and list(a.columns) == list(b.columns) and a.label_names == b.label_names
    for name in a.columns:
        x, y = a.columns[name], b.columns[name]
        assert type(x) is type(y), name
        if isinstance(x, columnar.Text):
            assert x.take() == y.take(), name
        elif isinstance(x, columnar.Category):
            assert x.take().tolist() == y.take().tolist(), name
        else:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_prepare_writes_a_columnar_index_equal_to_the_csv(prepared):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["index"]["rows"] == 9 and meta["index"]["csv_bytes"] == (prepared / "index.csv").stat().st_size
    stored = columnar.load(prepared, meta["index"], meta["label_names"])
    assert stored.columns["shard"].dtype == np.int16 and stored.columns["offset"].dtype == np.int16
    assert stored.labels.dtype == np.float32 and stored.labels.shape == (9, 2)
    assert isinstance(stored.columns["source"], columnar.Text)
    assert stored.columns["split"].codes.dtype == np.int8
    _same_table(stored, columnar.read_csv(prepared / "index.csv", meta["label_names"]))

    data, rows = PreparedData(prepared), _csv(prepared)
    assert data.rows == rows  # every cell, as the CSV spells it (empty pixel spacing of the PNGs too)
    assert data.sources() == [r["source"] for r in rows]
    assert data.patient_ids() == [r["patient_id"] or r["source"] for r in rows]
    assert any(r["patient_id"] == "" for r in rows) and any(r["patient_id"] for r in rows)
    assert np.isnan(data.labels[:, 1]).sum() == sum(r["label_B"] == "" for r in rows) == 1
    for split in ("train", "val", "test"):
        expect = [i for i, r in enumerate(rows) if r["split"] == split]
        assert data.where("split", split).tolist() == expect
        assert len(PreparedData(prepared, split)) == len(expect)
    assert data.where("split", "nope").tolist() == []
    for i, r in enumerate(rows):  # the columns lead to the image the CSV names
        shard = np.load(prepared / f"shard_{int(r['shard']):05d}.npy")
        np.testing.assert_array_equal(data.image(i), shard[int(r["offset"])])


def test_subset_shares_the_columns_and_maps_its_rows(prepared):
    data = PreparedData(prepared)
    pick = np.array([7, 2, 5])
    view = data.subset(pick)
    assert view.table is data.table  # no text column copied
    assert view.sources() == [data.sources()[i] for i in pick]
    np.testing.assert_array_equal(view.labels, data.labels[pick])
    np.testing.assert_array_equal(view.labels_of([2, 0]), data.labels[[5, 7]])
    inner = view.subset([2])
    assert inner.sources() == [data.sources()[5]] and inner.rows == [data.rows[5]]
    np.testing.assert_array_equal(inner.image(0), data.image(5))
    np.testing.assert_array_equal(view.column("offset"), data.column("offset")[pick])
    x, y = PreparedDataset(view, img_size=16, train=False, with_labels=True).__getitems__([1, 2]).value
    torch.testing.assert_close(y, torch.from_numpy(data.labels[[2, 5]]), equal_nan=True)


def _copy_prepared(prepared: Path, folder: Path, with_index: bool = True) -> Path:
    """A copy of a prepared folder's files (and its index/ unless ``with_index`` is False)."""
    folder.mkdir()
    for p in prepared.iterdir():
        if p.is_file():
            (folder / p.name).write_bytes(p.read_bytes())
    if with_index:
        (folder / "index").mkdir()
        for p in (prepared / "index").iterdir():
            (folder / "index" / p.name).write_bytes(p.read_bytes())
    return folder


def test_folder_without_columnar_index_is_read_from_the_csv(prepared, tmp_path):
    """Folders of an earlier cxrfast (same format_version 2, no index/) and hand-written ones."""
    old = _copy_prepared(prepared, tmp_path / "old", with_index=False)
    meta = json.loads((old / "meta.json").read_text())
    del meta["index"]
    (old / "meta.json").write_text(json.dumps(meta))
    a, b = PreparedData(prepared), PreparedData(old)
    _same_table(a.table, b.table)
    assert b.rows == a.rows and len(b) == 9

    # a hand edit of index.csv after prepare: the CSV wins, with a warning saying how to rebuild
    edited = _copy_prepared(prepared, tmp_path / "edited")
    rows = _csv(edited)
    rows[0]["label_A"] = "0.5"
    with open(edited / "index.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.warns(UserWarning, match="changed after .*index.*rerun"):
        data = PreparedData(edited)
    assert data.labels[0, 0] == 0.5


def test_large_csv_only_folder_says_how_to_add_the_index(tmp_path, monkeypatch):
    import cxrfast.data.shards as shards

    monkeypatch.setattr(shards, "LARGE_CSV", 50)
    folder = write_synthetic(tmp_path / "csv", 60, per_shard=16, labels=2, csv_rows=True, columnar_index=False)
    with pytest.warns(UserWarning, match="60 rows read as text.*cxrfast.prepare"):
        data = PreparedData(folder)
    mapped = PreparedData(write_synthetic(tmp_path / "npy", 60, per_shard=16, labels=2))
    _same_table(data.table, mapped.table)
    assert data.image(37)[0, :2].tolist() == [37, 0]


def test_broken_or_foreign_index_is_refused(prepared, tmp_path):
    folder = _copy_prepared(prepared, tmp_path / "broken")
    np.save(folder / "index" / "offset.npy", np.zeros(4, np.int16))  # a crash between index/ and meta.json
    with pytest.raises(PreparedFormatError, match=r"offset\.npy: 4 rows, meta.json says 9; rerun"):
        PreparedData(folder)
    np.save(folder / "index" / "offset.npy", np.full(9, 99, np.int16))
    with pytest.raises(PreparedFormatError, match="points at shard .* offset 99"):
        PreparedData(folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(dict(meta, format_version=3)))
    with pytest.raises(PreparedFormatError, match="format_version 3, this cxrfast reads 2.*--overwrite"):
        PreparedData(folder)
    removed = manifest.remove_outputs(folder)  # --overwrite takes index/ with the rest
    assert not (folder / "index").exists() and any(p.name == "labels.npy" for p in removed)


def _rank(rank: int, world: int, init: str, folder: str, out: str) -> None:
    """One simulated rank: its sampler's shard, read through the images (whose pixels spell their number)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        data = PreparedData(folder)
        sampler = ResumableSampler(len(data), rank=dist.get_rank(), world_size=dist.get_world_size(), seed=11)
        seen = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            keys = list(sampler)
            assert all(e == epoch for _, e in keys) and len(keys) == len(sampler)
            pixels = data.batch([i for i, _ in keys])[:, 0, :2].astype(np.int64)
            mine = (pixels[:, 0] + 256 * pixels[:, 1]).tolist()
            everyone = [None] * world
            dist.all_gather_object(everyone, mine)
            seen.append(everyone)
        if rank == 0:
            Path(out).write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def test_eight_gloo_ranks_see_disjoint_complete_shards_each_epoch(tmp_path):
    n, world = 301, 8
    folder = write_synthetic(tmp_path / "data", n, per_shard=64)
    out = tmp_path / "seen.json"
    mp.spawn(_rank, args=(world, f"file://{tmp_path / 'rendezvous'}", str(folder), str(out)), nprocs=world)
    epochs = json.loads(out.read_text())
    per_rank = -(-n // world)
    for shards in epochs:
        assert [len(s) for s in shards] == [per_rank] * world  # equal counts keep collectives in step
        flat = [i for s in shards for i in s]
        assert sorted(set(flat)) == list(range(n))  # complete
        assert len(flat) - n == per_rank * world - n  # disjoint but for the wrap-around padding
    assert epochs[0] != epochs[1]  # reshuffled per epoch
