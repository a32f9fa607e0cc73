"""The parallel folder walk (cxrfast.data.files.walk_images) finds exactly what the serial
os.walk of earlier cxrfast found, in the same sorted order, on a tree with every case the
filters decide: nested and empty folders, hidden files, DICOM without extension, symlinks,
and folders that cannot be listed."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cxrfast.data import files

PREAMBLE = bytes(128) + b"DICM"


def walk_reference(source: Path) -> list[Path]:
    """find_images' folder walk before the parallel one: os.walk, then the same filters."""
    found = []
    for root, _, names in os.walk(source):
        for name in names:
            p = Path(root) / name
            if p.suffix.lower() in files.IMAGE_SUFFIXES or files._is_dicom(p):
                found.append(p)
    return sorted(found)


def _write(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def tree(tmp_path) -> Path:
    """A nested tree: 3 levels of studies, empty folders, and the filter's corner cases."""
    root = tmp_path / "archive"
    for a in range(3):
        for b in range(4):
            study = root / f"p{a}" / f"s{b}"
            _write(study / "img.dcm", PREAMBLE)
            _write(study / f"{a}{b}", PREAMBLE)  # DICOM without extension: found by its preamble
            _write(study / "notes", b"not a dicom")  # no extension, no preamble: left out
            _write(study / "scan.PNG")
            _write(study / "deep" / "deeper" / "x.JpEg")
    (root / "empty").mkdir()
    (root / "p0" / "empty" / "also_empty").mkdir(parents=True)
    _write(root / ".hidden.dcm", PREAMBLE)  # hidden files are files like any other
    _write(root / ".DS_Store", b"\0" * 200)
    _write(root / "report.txt", PREAMBLE)  # a DICOM preamble behind another extension: found
    _write(root / "a.jpg")
    outside = tmp_path / "outside"
    _write(outside / "o.dcm", PREAMBLE)
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)  # listed, not entered
    (root / "linked.dcm").symlink_to(outside / "o.dcm")  # a symlinked file is a file
    (root / "broken.png").symlink_to(tmp_path / "nowhere.png")  # found by its name, fails at decode
    (root / "broken").symlink_to(tmp_path / "nowhere")  # no name to go by, no preamble: left out
    return root


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_walk_equals_the_serial_os_walk(tree, threads):
    expected = walk_reference(tree)
    got = files.find_images(tree, threads=threads)
    assert got == expected
    names = {p.relative_to(tree).as_posix() for p in got}
    assert len(got) == 3 * 4 * 4 + 5
    assert {"p1/s2/12", ".hidden.dcm", "report.txt", "linked.dcm", "broken.png", "p2/s3/deep/deeper/x.JpEg"} <= names
    assert not any(n.startswith("linked_folder") or n.endswith("notes") or n in {".DS_Store", "broken"} for n in names)


@pytest.mark.parametrize("threads", [1, 3])
def test_walk_reports_each_folders_images_as_it_goes(tree, threads):
    counts = []
    got = files.find_images(tree, threads=threads, on_found=counts.append)
    assert sum(counts) == len(got) == len(walk_reference(tree))
    assert len(counts) > 1 and all(n > 0 for n in counts)  # folder by folder, empty folders not reported


def test_the_walk_progress_line_counts_files_and_their_rate(tree, capsys, monkeypatch):
    from cxrfast import cli

    got = cli.image_files(tree, show_walk=True)
    assert capsys.readouterr().err == ""  # a walk shorter than the delay shows nothing
    monkeypatch.setattr(cli, "WALK_PROGRESS_DELAY", 0.0)
    monkeypatch.setenv("CXRFAST_PROGRESS_SECONDS", "1000")  # only the closing line
    got = cli.image_files(tree, show_walk=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert got == walk_reference(tree)
    assert len(err) == 1 and err[0].startswith(f"walk {tree}: file {len(got)}, ") and " files/s=" in err[0]


MOUNTS = """overlay / overlay rw,relatime 0 0
proc /proc proc rw 0 0
server:/export /data nfs4 rw,vers=4.2 0 0
/dev/nvme0n1p1 /data/scratch ext4 rw 0 0
//nas/x\\040y /mnt/x\\040y cifs rw 0 0
sshfs#me@host: /mnt/remote fuse.sshfs rw 0 0
"""


@pytest.mark.parametrize("folder, kind, threads", [
    ("/data/mimic/p10", "nfs4", files.WALK_THREADS), ("/data", "nfs4", files.WALK_THREADS),
    ("/data/scratch/a", "ext4", 1), ("/datab", "overlay", 1), ("/mnt/x y/dicom", "cifs", files.WALK_THREADS),
    ("/mnt/remote/z", "fuse.sshfs", files.WALK_THREADS), ("/home/me", "overlay", 1)])
def test_walk_threads_by_the_mount_holding_the_folder(folder, kind, threads):
    assert files.filesystem(folder, MOUNTS) == kind
    assert files.walk_threads(folder, MOUNTS) == threads
    assert files.walk_threads(folder, "") == 1  # no mount table: one thread, as before


@pytest.mark.parametrize("network", [False, True])
def test_default_threads_follow_the_filesystem(tree, monkeypatch, network):
    listed = []
    real = files._scan_folder
    monkeypatch.setattr(files, "_scan_folder", lambda f: listed.append(f) or real(f))
    used = []
    real_walk = files.walk_images
    monkeypatch.setattr(files, "walk_images",
                        lambda folder, threads, on_found=None: used.append(threads) or real_walk(folder, threads, on_found))
    monkeypatch.setattr(files, "filesystem", lambda folder, mounts=None: "nfs" if network else "ext4")
    assert files.find_images(tree) == walk_reference(tree)
    assert used == [files.WALK_THREADS if network else 1] and files.WALK_THREADS > 1
    assert len(listed) == 1 + 3 + 12 + 24 + 2 + 1  # every real folder listed once, the symlinked one never


def _failing_scandir(monkeypatch, unreadable: set[str], broken: set[str]) -> None:
    """os.scandir, but folders in ``unreadable`` cannot be opened and those in ``broken`` fail
    after their first entry (a server dropping the listing), for os.walk and the new walk alike.
    (Permissions cannot do it here: the tests may run as root.)"""
    real = os.scandir

    class Failing:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.it.close()

        def __iter__(self):
            return self

        def __next__(self):
            self.n += 1
            if self.n > 1:
                raise OSError(5, "Input/output error")
            return next(self.it)

        def close(self):
            self.it.close()

    def scandir(path="."):
        key = os.fspath(path)
        if key in unreadable:
            raise PermissionError(13, "Permission denied", key)
        return Failing(real(path)) if key in broken else real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("threads", [1, 4])
def test_unreadable_folders_are_skipped_as_os_walk_skips_them(tree, monkeypatch, threads):
    full = walk_reference(tree)
    unreadable, broken = str(tree / "p1"), str(tree / "p0" / "s2")
    _failing_scandir(monkeypatch, {unreadable}, {broken})
    expected = walk_reference(tree)
    assert len(expected) == len(full) - 4 * 4 - 4  # p1 gone whole; p0/s2 gone with its subfolders
    assert not any(str(p).startswith(unreadable + os.sep) or str(p).startswith(broken + os.sep) for p in expected)
    assert files.find_images(tree, threads=threads) == expected


def test_unreadable_top_folder_finds_nothing(tree, monkeypatch):
    _failing_scandir(monkeypatch, {str(tree)}, set())
    assert walk_reference(tree) == []
    assert files.find_images(tree, threads=3) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root lists folders whatever their permissions")
def test_folder_without_permission_is_skipped(tree):
    locked = tree / "p2"
    locked.chmod(0)
    try:
        assert files.find_images(tree, threads=3) == walk_reference(tree)
        assert not any(locked in p.parents for p in files.find_images(tree, threads=3))
    finally:
        locked.chmod(0o755)


def test_walk_of_a_relative_folder_keeps_relative_paths(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    got = files.find_images(Path("archive"), threads=3)
    assert got == walk_reference(Path("archive"))
    assert not got[0].is_absolute()


@pytest.mark.parametrize("name", ["a.dcm", "a.tar.gz", ".hidden", ".hidden.dcm", "a.", "a..", "..", "noext",
                                  "A.JPEG", "x.y.", ".a.b", "a b.png", "é.Dicom"])
def test_suffix_is_the_suffix_of_pathlib(name):
    assert files._suffix(name) == Path(name).suffix
