"""cxrfast.prepare in parts (--part i/N, torchrun's RANK/WORLD_SIZE) and the merge (issue 12, part 2):
four processes at once into one folder give the index, images, labels and splits of a one-process run."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cxrfast.prepare as prepare_module
from cxrfast.data.shards import PreparedData
from cxrfast.manifest import PrepareError
from cxrfast.prepare import env_part, merge, parse_part, part_slice, prepare
from cxrfast import cli
from dicom_factory import make_dicom
from prepared_tables import index_rows, table_rows

ROOT = Path(__file__).resolve().parents[1]
TWO_PER_SHARD = 2 * 32 * 32 / 2**30  # shard_gb that puts two 32x32 uint8 images in a shard


def _dicom(path: Path, level: int, patient: str) -> None:
    rng = np.random.default_rng(level)
    a = (level + rng.integers(0, 200, (40, 28))).astype(np.uint16)
    path.write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096), extra={"PatientID": patient}))


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """22 files: DICOM and PNG, a copy of an early file sorted into the last part, a PNG copy across
    parts, a truncated first copy (same SOP Instance UID) whose good copy lies in a later part, an
    unreadable file; and a label CSV with a split column for some rows only."""
    src = tmp_path / "src"
    (src / "b").mkdir(parents=True)
    names = [f"a{k:02d}.dcm" for k in range(10)] + [f"b/c{k:02d}.dcm" for k in range(6)]
    for k, name in enumerate(names):
        _dicom(src / name, 300 + 150 * k, f"P{k % 7}")
    for k in range(2):
        a = (np.arange(30 * 36).reshape(30, 36) * (k + 3) % 251).astype(np.uint8)
        Image.fromarray(a).save(src / f"a{k:02d}_img.png")
    (src / "zz_copy.dcm").write_bytes((src / "a01.dcm").read_bytes())  # same UID as a01, last part
    (src / "zz_copy.png").write_bytes((src / "a00_img.png").read_bytes())  # same bytes as a00_img
    good = (src / "b/c04.dcm").read_bytes()
    (src / "a00_trunc.dcm").write_bytes(good[:-200])  # first part, same UID, does not decode
    (src / "a05.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")  # unreadable header
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "Bright", "split"])
        for k, name in enumerate(names + ["a00_img.png", "a01_img.png"]):
            w.writerow([name, k % 2, "test" if k % 5 == 0 else ""])
    return src, labels


def _same_result(a: Path, b: Path) -> None:
    """Same images (pixels), in the same order, with the same index columns, labels and splits;
    the same errors and duplicates."""
    rows_a, rows_b = index_rows(a), index_rows(b)
    assert [r["source"] for r in rows_a] == [r["source"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k not in ("shard", "offset")} == \
               {k: v for k, v in rb.items() if k not in ("shard", "offset")}
    da, db = PreparedData(a), PreparedData(b)
    assert len(da) == len(db) == len(rows_a)
    for i in range(len(da)):
        np.testing.assert_array_equal(da.image(i), db.image(i))
    np.testing.assert_array_equal(da.labels, db.labels)
    assert list(da.column("split")) == list(db.column("split"))
    for log in ("errors.csv", "duplicates.csv"):
        assert table_rows(a / log) == table_rows(b / log), log


def _command(src: Path, out: Path, labels: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cxrfast.prepare", str(src), str(out), "--size", "32", "--workers", "1",
            "--shard-gb", str(TWO_PER_SHARD), "--labels", str(labels), *extra]


def _env(**values: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **values}


def _run_parts(src: Path, out: Path, labels: Path, parts: int = 4) -> list[str]:
    """Every part at once: half with --part (SLURM array tasks), half with RANK/WORLD_SIZE (torchrun)."""
    procs = []
    for k in range(parts):
        if k % 2:
            cmd, env = _command(src, out, labels), _env(RANK=str(k), WORLD_SIZE=str(parts), LOCAL_WORLD_SIZE="2")
        else:
            cmd, env = _command(src, out, labels, "--part", f"{k}/{parts}"), _env()
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outputs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        outputs.append(stdout)
    return outputs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The tree and its one-process result."""
    tmp = tmp_path_factory.mktemp("one")
    src, labels = _tree(tmp)
    out = tmp / "one"
    meta = prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD)
    assert meta["duplicates"] == 2 and meta["errors"] == 2 and meta["images"] == 17
    return src, labels, out


def test_four_processes_at_once_equal_a_one_process_run(reference, tmp_path):
    src, labels, one = reference
    out = tmp_path / "parts"
    outputs = _run_parts(src, out, labels)
    assert sum("merged from 4 parts" in o for o in outputs) >= 1  # the last to finish merged
    _same_result(out, one)
    dups = {r["source"]: r["duplicate_of"] for r in table_rows(out / "duplicates.csv")}
    assert dups == {"zz_copy.dcm": "a01.dcm", "zz_copy.png": "a00_img.png"}  # kept: first in sorted order
    errors = {r["source"] for r in table_rows(out / "errors.csv")}
    assert errors == {"a00_trunc.dcm", "a05.dcm"}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["parts"] == 4 and all(name.startswith("shard_p000") for name in meta["shards"])
    # every part wrote only its own shards: the 4 namespaces, no shard_00000.npy
    assert sorted({n[:11] for n in meta["shards"]}) == [f"shard_p{k:04d}" for k in range(4)]
    assert not (out / "shard_00000.npy").exists()
    # the explicit merge gives the same index again
    before = (out / "index.csv").read_bytes()
    done = subprocess.run([sys.executable, "-m", "cxrfast.prepare", "merge", str(out)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "17 images" in done.stdout and (out / "index.csv").read_bytes() == before


def test_the_copy_kept_across_parts_is_the_first_that_decodes(reference, tmp_path):
    """a00_trunc.dcm (part 0) fails, its good copy b/c04.dcm (another part) is the image, in the
    place a one-process run gives it (where its key first appears)."""
    src, labels, one = reference
    files = cli.image_files(str(src), option="")
    slices = [[p.relative_to(src).as_posix() for p in part_slice(files, (k, 4))] for k in range(4)]
    assert "a00_trunc.dcm" in slices[0] and "b/c04.dcm" not in slices[0]
    assert "a01.dcm" in slices[0] and "zz_copy.dcm" in slices[3]
    out = tmp_path / "parts"
    for k in range(4):
        prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD, part=(k, 4))
    _same_result(out, one)
    assert "b/c04.dcm" in [r["source"] for r in index_rows(out)]


def test_parts_that_name_the_source_differently_still_merge(reference, tmp_path, monkeypatch):
    """The tree's fingerprint is read from the path strings relative to SRC as each part names
    it (no resolve per file): a symlink to SRC, or a relative path, is the same tree."""
    src, labels, one = reference
    (tmp_path / "link").symlink_to(src, target_is_directory=True)
    monkeypatch.chdir(src.parent)
    files = cli.image_files(str(src), option="")
    early = [p.relative_to(src).as_posix() for k in (0, 1) for p in part_slice(files, (k, 4))]
    assert {"a00_trunc.dcm", "a05.dcm"} <= set(early)  # the error reasons name the path as SRC was named
    names = [str(src), str(src) + "/", str(tmp_path / "link"), os.path.relpath(src)]
    out = tmp_path / "parts"
    metas = [prepare(name, str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD, part=(k, 4))
             for k, name in enumerate(names)]
    assert [m["merged"] for m in metas] == [False, False, False, True]
    _same_result(out, one)


def test_rerun_of_a_part_decodes_nothing_and_changes_nothing(reference, tmp_path):
    src, labels, one = reference
    out = tmp_path / "parts"
    for k in range(4):
        prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD, part=(k, 4))
    before = {p.name: p.read_bytes() for p in out.glob("*.npy")}
    meta = prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD, part=(2, 4))
    assert meta["merged"] and meta["part_decoded"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.npy")} == before
    _same_result(out, one)


def test_part_that_died_is_completed_on_rerun(reference, tmp_path, monkeypatch):
    src, labels, one = reference
    out = tmp_path / "parts"
    kw = dict(size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD)
    waits = [prepare(str(src), str(out), **kw, part=(k, 4))["waiting_for"] for k in (0, 1, 3)]
    assert waits == [[1, 2, 3], [2, 3], [2]] and not (out / "index.csv").exists()
    real, written = prepare_module.Preparer.write_shard, []

    def dies_after_one(self, *args, **kwargs):
        if written:
            raise KeyboardInterrupt  # killed after its first shard
        written.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(prepare_module.Preparer, "write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(src), str(out), **kw, part=(2, 4))
    monkeypatch.setattr(prepare_module.Preparer, "write_shard", real)
    assert (out / "shard_p0002_00000.npy").is_file() and not (out / "parts/part_p0002.json").exists()
    with pytest.raises(PrepareError, match=r"part\(s\) 2/4 not finished"):
        merge(out)
    meta = prepare(str(src), str(out), **kw, part=(2, 4))
    assert meta["merged"] and 0 < meta["part_decoded"] < 6  # the files its first shard did not cover
    _same_result(out, one)


def test_settings_that_differ_between_parts_are_an_error_line(reference, tmp_path):
    src, labels, _ = reference
    out = tmp_path / "parts"
    done = subprocess.run(_command(src, out, labels, "--part", "0/4"), cwd=ROOT, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for extra, word in ((["--size", "16"], "size"), (["--dtype", "uint16"], "dtype"), (["--part", "1/3"], "parts")):
        cmd = _command(src, out, labels, "--part", "1/4") + extra
        bad = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], \
            bad.stderr
    no_labels = [c for c in _command(src, out, labels, "--part", "1/4") if c not in ("--labels", str(labels))]
    bad = subprocess.run(no_labels, cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "label" in bad.stderr
    assert not list(out.glob("shard_p0001_*.npy"))  # refused before anything was written


@pytest.mark.parametrize("text", ["4/4", "-1/4", "1", "a/b", "1/0"])
def test_bad_part_is_an_error_naming_it(text):
    with pytest.raises(cli.UsageError, match=f"--part {text}:"):
        parse_part(text)


def test_torchrun_environment_gives_the_part():
    assert env_part({"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert env_part({}) is None and env_part({"RANK": "0", "WORLD_SIZE": "1"}) is None
    with pytest.raises(cli.UsageError):
        env_part({"WORLD_SIZE": "4"})


def test_slices_cover_the_list_once_in_order():
    files = list(range(10))
    for n in (1, 3, 4, 12):
        assert sum((part_slice(files, (k, n)) for k in range(n)), []) == files


def test_merge_errors(tmp_path, reference):
    src, labels, _ = reference
    with pytest.raises(PrepareError, match="not a folder prepared with --part"):
        merge(tmp_path / "nothing")
    one = tmp_path / "one"
    prepare(str(src), str(one), size=32, workers=1)
    with pytest.raises(PrepareError, match="one process"):
        merge(one)
    with pytest.raises(PrepareError, match="--overwrite with --part"):
        prepare(str(src), str(tmp_path / "x"), size=32, workers=1, part=(0, 2), overwrite=True)


def test_one_process_run_into_a_parted_folder_is_refused(reference, tmp_path):
    src, labels, _ = reference
    out = tmp_path / "parts"
    prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD, part=(0, 2))
    with pytest.raises(PrepareError, match="parts 2"):
        prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD)


def test_after_the_tree_changed_the_merge_waits_for_every_part(tmp_path):
    src, labels = _tree(tmp_path)
    out = tmp_path / "parts"
    kw = dict(size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD)
    for k in range(4):
        prepare(str(src), str(out), **kw, part=(k, 4))
    _dicom(src / "a00_new.dcm", 3000, "P9")
    meta = prepare(str(src), str(out), **kw, part=(0, 4))
    assert not meta["merged"] and meta["waiting_for"] == [1, 2, 3]
    with pytest.raises(PrepareError, match="saw another file list"):
        merge(out)
    for k in (3, 1, 2):
        meta = prepare(str(src), str(out), **kw, part=(k, 4))
    assert meta["merged"] and meta["images"] == 18
    one = tmp_path / "one"
    prepare(str(src), str(one), **kw)
    _same_result(out, one)


def _write_list(path: Path, names: list[str]) -> Path:
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "note"])
            w.writerows([n, "x"] for n in names)
    else:
        path.write_text("".join(n + "\n" for n in names))
    return path


@pytest.mark.parametrize("kind", ["txt", "csv"])
def test_file_list_instead_of_walking_gives_the_walking_result(reference, tmp_path, kind):
    src, labels, one = reference
    names = sorted(p.relative_to(src).as_posix() for p in cli.image_files(str(src), option=""))
    listed = names[::-1] + [names[3]]  # any order; a repeated line is read once
    listed[0] = str(src / listed[0])  # absolute paths too
    listing = _write_list(tmp_path / f"list.{kind}", listed)
    out = tmp_path / "listed"
    meta = prepare(str(src), str(out), size=32, labels=str(labels), workers=1, shard_gb=TWO_PER_SHARD,
                   file_list=str(listing))
    assert any("1 repeated lines read once" in n for n in meta["notes"])
    _same_result(out, one)


def test_file_list_with_parts_and_a_missing_file(reference, tmp_path):
    src, labels, _ = reference
    names = ["a02.dcm", "a03.dcm", "gone.dcm", "b/c01.dcm", "a01_img.png"]
    listing = _write_list(tmp_path / "list.txt", names)
    out = tmp_path / "parts"
    for k in range(2):
        meta = prepare(str(src), str(out), size=32, labels=str(labels), workers=1, part=(k, 2),
                       file_list=str(listing))
    assert meta["merged"] and meta["images"] == 4 and meta["errors"] == 1
    assert [r["source"] for r in table_rows(out / "errors.csv")] == ["gone.dcm"]  # counted, not fatal
    assert sorted(r["source"] for r in index_rows(out)) == sorted(n for n in names if n != "gone.dcm")


@pytest.mark.parametrize("name, content, message", [("list.txt", None, "no such file"), ("list.txt", "\n\n", "lists no file"),
                                                    ("list.csv", "name,other\na.dcm,1\n", "no 'path' column")])
def test_bad_file_list_is_an_error_line(reference, tmp_path, capsys, name, content, message):
    src, _, _ = reference
    listing = tmp_path / name
    if content is not None:
        listing.write_text(content)
    with pytest.raises(SystemExit) as exc:
        prepare_module.main([str(src), str(tmp_path / "out"), "--files", str(listing)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --files ") and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_progress_lines_report_files_per_second(reference, tmp_path, capsys):
    src, _, _ = reference
    prepare(str(src), str(tmp_path / "out"), size=32, workers=1)
    err = capsys.readouterr().err
    decode = [line for line in err.splitlines() if line.startswith("decode:")]
    headers = [line for line in err.splitlines() if line.startswith("headers:")]
    assert decode and "files/s=" in decode[-1] and headers and "files/s=" in headers[-1], err


def test_shards_written_in_place_are_the_npy_files_np_save_writes(reference):
    """Through open_memmap, sized for every entry then cut to the images written (errors and
    duplicates take no slot): byte for byte what np.save writes for the same array."""
    _, _, one = reference
    meta = json.loads((one / "meta.json").read_text())
    counts = []
    for name in meta["shards"]:
        array = np.load(one / name)
        buffer = io.BytesIO()
        np.save(buffer, array)
        assert (one / name).read_bytes() == buffer.getvalue(), name
        counts.append(len(array))
    assert sum(counts) == meta["images"] and min(counts) < 2 == max(counts)  # a shard with an unreadable entry
    assert not list(one.glob(".*.tmp"))


def test_a_shard_is_never_held_in_memory(tmp_path):
    """Peak Python/numpy allocations while preparing one 150-image shard stay under half of it
    (the list of canvases plus np.stack took twice the shard)."""
    import tracemalloc

    src = tmp_path / "src"
    src.mkdir()
    for k in range(150):
        _dicom(src / f"f{k:03d}.dcm", 300 + k, "P")
    shard_bytes = 150 * 128 * 128 * 2
    tracemalloc.start()
    try:
        meta = prepare(str(src), str(tmp_path / "out"), size=128, dtype="uint16", workers=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta["images"] == 150 and len(meta["shards"]) == 1
    assert peak < shard_bytes / 2, (peak, shard_bytes)
