"""python -m cxrfast.prepare: every user mistake is one line ``error: ...``, exit 2, nothing on disk."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrfast.prepare import main
from dicom_factory import make_dicom

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    for k in range(3):
        a = (500 + 300 * k + np.arange(40 * 30).reshape(40, 30) % 200).astype(np.uint16)
        (folder / f"img{k}.dcm").write_bytes(make_dicom(a, bits_stored=12, window=(2048, 4096)))
    return folder


def _fails(capsys, argv: list[str], *names: str) -> str:
    """Runs main(argv) expecting a user error; returns its one stderr line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize("options, named", [
    (["--size", "0"], "0"),
    (["--size", "-32"], "-32"),
    (["--size", "big"], "big"),
    (["--workers", "0"], "0"),
    (["--workers", "-2"], "-2"),
    (["--dtype", "float32"], "float32"),
    (["--label-format", "xml"], "xml"),
    (["--uncertain", "maybe"], "maybe"),
    (["--labels", "no_such_labels.csv"], "no_such_labels.csv"),
    (["--shard-gb", "0"], "0"),
    (["--split-fractions", "0.5,0.5"], "0.5,0.5"),
    (["--split-fractions", "0.7,0.2,0.2"], "0.2"),
])
def test_bad_option_is_one_error_line_and_creates_nothing(tmp_path, capsys, src, options, named):
    out = tmp_path / "out"
    _fails(capsys, [str(src), str(out)] + options, named)
    assert not out.exists()


def test_missing_source_folder(tmp_path, capsys):
    _fails(capsys, [str(tmp_path / "no_such_archive"), str(tmp_path / "out")], "no_such_archive")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [[], ["notes.txt"]])
def test_source_without_images(tmp_path, capsys, content):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in content:
        (empty / name).write_text("not an image")
    line = _fails(capsys, [str(empty), str(tmp_path / "out")])
    assert line == f"error: {empty}: no image files (DICOM, PNG, JPEG) found there"  # as train.* says it
    assert not (tmp_path / "out").exists()


def test_malformed_label_csv(tmp_path, capsys, src):
    (tmp_path / "labels.csv").write_text("name,score\na,1\n")
    _fails(capsys, [str(src), str(tmp_path / "out"), "--labels", str(tmp_path / "labels.csv")], "labels.csv")
    assert not (tmp_path / "out").exists()


def test_rerun_with_another_size_is_refused_then_overwrite_rebuilds(tmp_path, capsys, src):
    out = tmp_path / "out"
    main([str(src), str(out), "--size", "16", "--workers", "1"])
    capsys.readouterr()  # the first run's output (its progress lines) is not the rerun's
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    line = _fails(capsys, [str(src), str(out), "--size", "24", "--workers", "1"], str(out), "16", "24", "--overwrite")
    assert "size" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    main([str(src), str(out), "--size", "24", "--workers", "1", "--overwrite"])
    assert np.load(out / "shard_00000.npy").shape == (3, 24, 24)


def test_real_process_prints_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "cxrfast.prepare", str(tmp_path / "missing"), str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing'}: no such folder"]
    assert not (tmp_path / "o").exists()


def test_progress_off_a_terminal_is_plain_lines(tmp_path, capsys, src):
    """Under a scheduler or `> log 2>&1` the header and decode passes print plain lines (no
    carriage returns), ending with the full count (cxrfast.progress)."""
    main([str(src), str(tmp_path / "out"), "--size", "16", "--workers", "1"])
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "headers: file 3/3 (100%)" in err and "decode: file 3/3 (100%)" in err
