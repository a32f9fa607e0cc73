"""prepare on PNG/JPEG: each file read once (hash, size and pixels from the same bytes), the
shard holds exactly files.decode + the native resize, and byte-identical copies are
duplicates within a run and across reruns."""
from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cxrfast.data import files
from cxrfast.prepare import prepare
from cxrfast.synthetic import chest_image


def _tree(folder: Path) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir()
    paths = []
    for i in range(4):
        img = chest_image(rng, 96)[:, 8:88]  # 96x80: padded in the shard
        p = folder / f"img{i}.png" if i % 2 else folder / f"img{i}.jpg"
        if i % 2:
            Image.fromarray(np.clip(img, 0, 4095).astype(np.uint16)).save(p)  # 12-bit values, 16-bit PNG
        else:
            Image.fromarray(np.clip(img / 16, 0, 255).astype(np.uint8)).save(p, quality=92)
        paths.append(p)
    (folder / "zz_copy.png").write_bytes(paths[1].read_bytes())
    (folder / "zz_broken.jpg").write_bytes(paths[0].read_bytes()[:300])
    return paths


def test_images_read_once_and_equal_the_library_path(tmp_path, monkeypatch):
    paths = _tree(tmp_path / "src")
    reads: Counter = Counter()
    original = Path.read_bytes

    def counting(self):
        reads[self.name] += 1
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", counting)
    opened = []
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(fp), _pil_open(fp, *a, **k))[1])
    meta = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=32, workers=2)
    assert meta["images"] == 4 and meta["duplicates"] == 1 and meta["errors"] == 1
    assert all(reads[n] == 1 for n in ("img0.jpg", "img1.png", "img2.jpg", "img3.png", "zz_copy.png", "zz_broken.jpg"))
    assert not any(isinstance(fp, (str, Path)) for fp in opened)  # Pillow only ever sees bytes in memory
    monkeypatch.undo()
    rows = {r["source"]: r for r in csv.DictReader(open(tmp_path / "out" / "index.csv"))}
    shard = np.load(tmp_path / "out" / "shard_00000.npy")
    for p in paths:
        r = rows[p.name]
        assert (int(r["rows"]), int(r["columns"])) == (96, 80)
        top, left, h, w = (int(r[k]) for k in ("pad_top", "pad_left", "content_h", "content_w"))
        expect = files.decoded_image(files.decode(p.read_bytes(), 32), 32)
        np.testing.assert_array_equal(shard[int(r["offset"])][top:top + h, left:left + w],
                                      np.clip(np.rint(expect * 255), 0, 255).astype(np.uint8))
    dups = list(csv.DictReader(open(tmp_path / "out" / "duplicates.csv")))
    assert [Path(d["source"]).name for d in dups] == ["zz_copy.png"]
    assert "zz_broken.jpg" in (tmp_path / "out" / "errors.csv").read_text()


_pil_open = Image.open


def test_a_copy_added_later_is_a_duplicate_of_the_finished_shard(tmp_path):
    paths = _tree(tmp_path / "src")
    out = tmp_path / "out"
    prepare(str(tmp_path / "src"), str(out), size=32, workers=1)
    (tmp_path / "src" / "later.jpg").write_bytes(paths[2].read_bytes())
    meta = prepare(str(tmp_path / "src"), str(out), size=32, workers=1)
    assert meta["images"] == 4 and meta["duplicates"] == 2 and meta["decoded_this_run"] == 1
    dups = {Path(d["source"]).name for d in csv.DictReader(open(out / "duplicates.csv"))}
    assert dups == {"zz_copy.png", "later.jpg"}


def test_a_png_with_corrupt_rows_is_an_error_with_its_reason(tmp_path):
    """The split PNG path's errors (a filter type above 4) reach errors.csv; the good files are kept."""
    import struct
    import zlib

    paths = _tree(tmp_path / "src")
    good = paths[1].read_bytes()
    raw = bytearray(b"".join(b"\0" + bytes(range(8)) for _ in range(4)))
    raw[2 * 9] = 9  # row 2: filter type 9

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    bad = (good[:8] + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 4, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
    (tmp_path / "src" / "rows.png").write_bytes(bad)
    meta = prepare(str(tmp_path / "src"), str(tmp_path / "out"), size=32, workers=2)
    assert meta["images"] == 4 and meta["errors"] == 2  # rows.png and zz_broken.jpg
    errors = {Path(r["source"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "errors.csv"))}
    assert "rows.png" in errors
    assert "row 2 has filter type 9" in " ".join(errors["rows.png"].values())
