"""cxrfast.prepare reruns: changed trees, interrupted runs, other settings, dedup among decoded
files, errors.csv per shard (issue 9)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cxrfast.prepare as prepare_module
from cxrfast import dicom
from cxrfast.prepare import prepare
from dicom_factory import make_dicom
from prepared_tables import index_rows, table_rows

TWO_PER_SHARD = 2 * 32 * 32 / 2**30  # shard_gb that puts two 32x32 uint8 images in a shard


def _dicom(path: Path, level: int, width: int = 20) -> None:
    rng = np.random.default_rng(level)
    a = (level + rng.integers(0, 200, (40, width))).astype(np.uint16)
    path.write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))


def _tree(src: Path, names: list[str]) -> None:
    src.mkdir(exist_ok=True)
    for k, name in enumerate(names):
        _dicom(src / name, 300 + 350 * k)


def _images(out: Path) -> dict[str, np.ndarray]:
    """source -> its image, through the index alone."""
    return {r["source"]: np.load(out / f"shard_{int(r['shard']):05d}.npy")[int(r["offset"])] for r in index_rows(out)}


@pytest.fixture
def decoded(monkeypatch):
    """Names of the files read_many decodes (the native decode of every DICOM in prepare)."""
    names: list[str] = []
    real = dicom.read_many

    def counting(paths, *args, **kwargs):
        names.extend(Path(p).name for p in paths)
        return real(paths, *args, **kwargs)

    monkeypatch.setattr(dicom, "read_many", counting)
    return names


def _stop_after(monkeypatch, shards: int) -> None:
    """Makes prepare raise when it starts shard number ``shards`` + 1 (a kill mid-run)."""
    real = prepare_module.Preparer.write_shard
    calls = []

    def write_shard(self, *args, **kwargs):
        if len(calls) == shards:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(prepare_module.Preparer, "write_shard", write_shard)


@pytest.mark.parametrize("change", ["add", "remove", "both"])
def test_rerun_over_a_changed_tree_indexes_every_file_once(tmp_path, decoded, change):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, [f"img{k:02d}.dcm" for k in range(0, 16, 2)])  # img00, img02, ... img14: four shards
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    added = ["img01.dcm", "img07.dcm", "img15.dcm"] if change != "remove" else []
    removed = ["img04.dcm", "img10.dcm"] if change != "add" else []
    for name in added:
        _dicom(src / name, 5000 + len(name) * int(name[3:5]), width=25)
    for name in removed:
        (src / name).unlink()
    decoded.clear()
    meta = prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)

    current = sorted(p.name for p in src.iterdir())
    sources = [r["source"] for r in index_rows(out)]
    assert sorted(sources) == current  # every current file exactly once, removed ones gone
    assert meta["images"] == len(current) and meta["dropped_this_run"] == len(removed)
    assert sorted(decoded) == sorted(added)  # only new files were decoded
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard_*.npy")}
    assert all(after[name] == t for name, t in before.items())  # finished shards untouched
    # each row shows its own file: the same pixels as a fresh run over the current tree
    fresh = tmp_path / "fresh"
    prepare(str(src), str(fresh), size=32, workers=1)
    expected, got = _images(fresh), _images(out)
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # a third run has nothing to do and changes nothing
    index = (out / "index.csv").read_text()
    decoded.clear()
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert decoded == [] and (out / "index.csv").read_text() == index


def test_changed_file_is_read_again(tmp_path, decoded):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "b.dcm", "c.dcm"])
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    old = _images(out)["b.dcm"].copy()
    _dicom(src / "b.dcm", 3900, width=30)  # new content under the same name
    decoded.clear()
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert decoded == ["b.dcm"]
    rows = index_rows(out)
    assert sorted(r["source"] for r in rows) == ["a.dcm", "b.dcm", "c.dcm"]
    assert not np.array_equal(_images(out)["b.dcm"], old)


def test_interrupted_run_then_rerun_gives_the_full_run_index(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _tree(src, [f"img{k:02d}.dcm" for k in range(9)])
    (src / "img03_broken.dcm").write_bytes((src / "img03.dcm").read_bytes()[:400])
    full = tmp_path / "full"
    prepare(str(src), str(full), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert len(list(out.glob("shard_*.npy"))) == 2 and not (out / "index.csv").exists()
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert (out / "index.csv").read_text() == (full / "index.csv").read_text()
    assert (out / "errors.csv").read_text() == (full / "errors.csv").read_text()
    got, expected = _images(out), _images(full)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


@pytest.mark.parametrize("change", [{"size": 64}, {"dtype": "uint16"}, {"labels": True}])
def test_rerun_with_other_settings_stops(tmp_path, change):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "b.dcm", "c.dcm"])
    (tmp_path / "labels.csv").write_text("path,Effusion\na.dcm,1\nb.dcm,0\nc.dcm,1\n")
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    listing = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    kwargs = dict(size=32, workers=1, shard_gb=TWO_PER_SHARD)
    kwargs.update(change)
    if change.get("labels"):
        kwargs["labels"] = str(tmp_path / "labels.csv")
    with pytest.raises(prepare_module.PrepareError, match="prepared with"):
        prepare(str(src), str(out), **kwargs)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == listing  # nothing touched


def test_settings_are_recorded_before_the_first_shard(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, [f"img{k}.dcm" for k in range(5)])
    with monkeypatch.context() as m:
        _stop_after(m, 1)  # killed after one shard: no meta.json yet
        with pytest.raises(KeyboardInterrupt):
            prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert not (out / "meta.json").exists()
    with pytest.raises(prepare_module.PrepareError, match="size 32, not 64"):
        prepare(str(src), str(out), size=64, workers=1, shard_gb=TWO_PER_SHARD)
    prepare(str(src), str(out), size=64, workers=1, shard_gb=TWO_PER_SHARD, overwrite=True)
    for p in out.glob("shard_*.npy"):
        assert np.load(p).shape[1:] == (64, 64), p


def test_overwrite_removes_only_what_prepare_wrote(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, [f"img{k}.dcm" for k in range(5)])
    (src / "img9_broken.dcm").write_bytes((src / "img0.dcm").read_bytes()[:300])
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert len(list(out.glob("shard_*.npy"))) == 3
    (out / "notes.txt").write_text("mine")
    (out / "parts" / "mine.txt").write_text("mine too")
    (out / "shard_notes.npy").write_bytes(b"keep")
    (out / "sub").mkdir()
    (out / "sub" / "index.csv").write_text("keep")
    meta = prepare(str(src), str(out), size=48, workers=1, overwrite=True)  # one shard of 48x48 now
    assert meta["shards"] == ["shard_00000.npy"]
    assert sorted(p.name for p in out.glob("shard_*.npy")) == ["shard_00000.npy", "shard_notes.npy"]
    assert np.load(out / "shard_00000.npy").shape == (5, 48, 48)
    assert (out / "notes.txt").read_text() == "mine" and (out / "parts" / "mine.txt").exists()
    assert (out / "sub" / "index.csv").read_text() == "keep"
    assert sorted(p.name for p in (out / "parts").glob("shard_*.csv")) == ["shard_00000.csv"]
    assert [r["source"] for r in table_rows(out / "errors.csv")] == ["img9_broken.dcm"]


def test_dedup_keeps_the_copy_that_decodes(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["b_good.dcm", "d_other.dcm"])
    good = (src / "b_good.dcm").read_bytes()
    (src / "a_truncated.dcm").write_bytes(good[:-300])  # same SOP Instance UID, sorted first, header intact
    (src / "c_copy.dcm").write_bytes(good)
    assert dicom.read_header(src / "a_truncated.dcm")["sop_instance_uid"] == \
        dicom.read_header(src / "b_good.dcm")["sop_instance_uid"]
    meta = prepare(str(src), str(out), size=32, workers=1)
    assert sorted(r["source"] for r in index_rows(out)) == ["b_good.dcm", "d_other.dcm"]
    errors = table_rows(out / "errors.csv")
    assert [r["source"] for r in errors] == ["a_truncated.dcm"] and errors[0]["error"] == "TruncatedError"
    duplicates = table_rows(out / "duplicates.csv")
    assert [(r["source"], r["duplicate_of"]) for r in duplicates] == [("c_copy.dcm", "b_good.dcm")]
    assert meta["duplicates"] == 1 and meta["errors"] == 1 and meta["images"] == 2
    assert _images(out)["b_good.dcm"].max() > 0


def test_removing_the_kept_copy_brings_back_its_duplicate(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "z.dcm"])
    (src / "b_copy.dcm").write_bytes((src / "a.dcm").read_bytes())
    prepare(str(src), str(out), size=32, workers=1)
    assert sorted(r["source"] for r in index_rows(out)) == ["a.dcm", "z.dcm"]
    (src / "a.dcm").unlink()
    prepare(str(src), str(out), size=32, workers=1)
    assert sorted(r["source"] for r in index_rows(out)) == ["b_copy.dcm", "z.dcm"]
    assert table_rows(out / "duplicates.csv") == []


def test_errors_are_written_once_per_file_across_reruns(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "b.dcm", "c.dcm"])
    (src / "a_broken.dcm").write_bytes((src / "a.dcm").read_bytes()[:300])
    _dicom(src / "c_truncated.dcm", 3000)
    (src / "c_truncated.dcm").write_bytes((src / "c_truncated.dcm").read_bytes()[:-500])  # fails in decode
    for _ in range(3):
        prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    rows = table_rows(out / "errors.csv")
    assert sorted(r["source"] for r in rows) == ["a_broken.dcm", "c_truncated.dcm"]
    assert len(rows) == 2  # one row per file, however many reruns


def test_killed_run_keeps_the_errors_of_finished_shards(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "c.dcm", "d.dcm", "e.dcm"])
    (src / "b_broken.dcm").write_bytes((src / "a.dcm").read_bytes()[:300])  # in the first shard
    with monkeypatch.context() as m:
        _stop_after(m, 1)
        with pytest.raises(KeyboardInterrupt):
            prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert [r["source"] for r in table_rows(out / "errors.csv")] == ["b_broken.dcm"]


def test_no_readable_image_is_an_error_without_an_index(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm"])
    (src / "b.dcm").write_bytes((src / "a.dcm").read_bytes()[:300])
    (src / "a.dcm").write_bytes((src / "a.dcm").read_bytes()[:300])
    with pytest.raises(prepare_module.PrepareError, match="no readable images"):
        prepare(str(src), str(out), size=32, workers=1)
    assert not (out / "index.csv").exists() and not (out / "meta.json").exists()
    assert len(table_rows(out / "errors.csv")) == 2


def test_reader_refuses_other_format_versions_and_mixed_shards(tmp_path):
    from cxrfast.data.shards import PreparedData, PreparedFormatError

    src, out = tmp_path / "src", tmp_path / "out"
    _tree(src, ["a.dcm", "b.dcm", "c.dcm"])
    prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    assert len(PreparedData(out)) == 3
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(dict(meta, format_version=1)))
    with pytest.raises(PreparedFormatError, match="format_version 1.*--overwrite"):
        PreparedData(out)
    with pytest.raises(prepare_module.PrepareError, match="format_version 1"):  # prepare will not resume it
        (out / "parts" / "settings.json").unlink()
        prepare(str(src), str(out), size=32, workers=1, shard_gb=TWO_PER_SHARD)
    (out / "meta.json").write_text(json.dumps(meta))
    np.save(out / "shard_00001.npy", np.zeros((1, 64, 64), np.uint8))  # a shard of another size
    with pytest.raises(PreparedFormatError, match="shard_00001.npy"):
        PreparedData(out)
