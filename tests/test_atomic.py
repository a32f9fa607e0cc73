"""cxrfast.atomic: a target appears whole or not at all."""
import os

import pytest

from cxrfast import atomic


def test_write_text_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file_and_removes_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_atomic_path_for_libraries_that_want_a_name(tmp_path):
    target = tmp_path / "x.txt"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("done")
        assert not target.exists()
    assert target.read_text() == "done"


def test_read_modes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a write mode"):
        with atomic.atomic_open(tmp_path / "x", "rb"):
            pass
