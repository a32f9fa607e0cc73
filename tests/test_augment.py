"""Crop drawing and the native crop-resize (cxrfast.data.augment) against float64 torch."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cxrfast.data import ResumableSampler
from cxrfast.data.augment import MEAN, STD, OutputPool, crop_resize, draw_crops, uniforms, whole_images
from cxrfast.data.shards import PreparedData, PreparedDataset, collate
from test_data_loaders import write_prepared


def reference(img: np.ndarray, box, mirror: bool, size: int, value_scale: float) -> torch.Tensor:
    """float64 torch: crop, antialiased bilinear resize, flip, normalise."""
    top, left, h, w = (int(v) for v in box)
    x = torch.from_numpy(img[top:top + h, left:left + w].astype(np.float64) / value_scale)[None, None]
    y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    if mirror:
        y = y.flip(-1)
    return (y - MEAN) / STD


def random_box(rng, h: int, w: int) -> tuple[int, int, int, int]:
    ch, cw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
    return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw


@pytest.mark.parametrize("dtype,value_scale", [(np.uint8, 255.0), (np.uint16, 65535.0), (np.float32, 1.0)])
@pytest.mark.parametrize("size", [1, 7, 31, 64])
def test_crop_resize_matches_float64_torch(dtype, value_scale, size):
    rng = np.random.default_rng()  # fresh inputs every run
    images, boxes, mirror = [], [], []
    for _ in range(12):
        h, w = (int(v) for v in rng.integers(1, 97, 2))
        if dtype == np.float32:
            full = rng.random((h, w + 5), dtype=np.float32)
        else:
            full = rng.integers(0, np.iinfo(dtype).max + 1, (h, w + 5)).astype(dtype)
        images.append(full[:, 3:3 + w])  # a row stride wider than the image
        boxes.append(random_box(rng, h, w))
        mirror.append(bool(rng.integers(2)))
    out = torch.full((12, 1, size, size), float("nan"))
    crop_resize(images, np.array(boxes), np.array(mirror), size, value_scale=value_scale, mean=MEAN, std=STD, out=out)
    for k in range(12):
        ref = reference(images[k], boxes[k], mirror[k], size, value_scale)
        torch.testing.assert_close(out[k, 0].double(), ref, atol=2e-5, rtol=1e-5)


def test_crop_resize_large_downscale_and_threads():
    rng = np.random.default_rng()
    images = [rng.integers(0, 256, (300, 280)).astype(np.uint8) for _ in range(9)]
    boxes = np.array([[0, 0, 300, 280], [10, 3, 250, 17], [0, 0, 1, 280]] * 3)
    mirror = np.array([False, True, True] * 3)
    one = crop_resize(images, boxes, mirror, 9, value_scale=255.0, mean=MEAN, std=STD, threads=1)
    many = crop_resize(images, boxes, mirror, 9, value_scale=255.0, mean=MEAN, std=STD, threads=4)
    assert torch.equal(one, many)
    for k in range(9):
        torch.testing.assert_close(one[k, 0].double(), reference(images[k], boxes[k], mirror[k], 9, 255.0),
                                   atol=2e-5, rtol=1e-5)


def test_crop_resize_rejects_bad_arguments():
    img = np.zeros((10, 12), np.uint8)
    out = torch.empty(1, 1, 4, 4)
    ok = dict(value_scale=255.0, mean=MEAN, std=STD, out=out)
    with pytest.raises(ValueError, match="outside"):
        crop_resize([img], np.array([[5, 0, 6, 4]]), np.array([False]), 4, **ok)
    with pytest.raises(ValueError, match="outside"):
        crop_resize([img], np.array([[0, 0, 0, 4]]), np.array([False]), 4, **ok)
    with pytest.raises(ValueError, match="uint8, uint16 or float32"):
        crop_resize([img.astype(np.int16)], np.array([[0, 0, 4, 4]]), np.array([False]), 4, **ok)
    with pytest.raises(ValueError, match="contiguous"):
        crop_resize([img[:, ::2]], np.array([[0, 0, 4, 4]]), np.array([False]), 4, **ok)
    with pytest.raises(ValueError, match="one dtype"):
        crop_resize([img, img.astype(np.uint16)], np.array([[0, 0, 4, 4]] * 2), np.array([False] * 2), 4,
                    value_scale=255.0, mean=MEAN, std=STD, out=torch.empty(2, 1, 4, 4))
    with pytest.raises(ValueError, match="boxes"):
        crop_resize([img], np.array([[0, 0, 4]]), np.array([False]), 4, **ok)


_MUTATE_DURING_CROP = """
import sys, threading
import numpy as np
from cxrfast import _dicom
# The main thread keeps the GIL until the native call releases it, so the mutating thread
# runs exactly then: while crop_resize works on the batch (issue 9).
sys.setswitchinterval(30.0)
raced = 0
for trial in range(4):
    n = 24
    images = [np.full((2000, 2000), k + 1, np.uint16) for k in range(n)]
    boxes = np.array([[0, 0, 2000, 2000]] * n, np.int64)
    out = np.zeros((n, 32, 32), np.float32)
    go = threading.Event()
    during = []
    def mutate():
        go.wait()
        during.append(out[-1, 0, 0] == 0)  # the last image not written yet: the call is running
        images.clear()  # the list held the only references: the arrays are freed unless kept
        junk = [np.ones((2000, 2000), np.uint16) for _ in range(4)]  # and their memory reused
    t = threading.Thread(target=mutate)
    t.start()
    go.set()
    try:
        _dicom.crop_resize(images, boxes, np.zeros(n, bool), out, 1.0, 0.0, 1)
    except ValueError:  # emptied before the call looked at it: nothing raced
        t.join()
        continue
    t.join()
    raced += bool(during and during[0])
    expected = np.arange(1, n + 1, dtype=np.float32)[:, None, None] * np.ones((n, 32, 32), np.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5)
print("raced", raced)
"""


def test_crop_resize_survives_the_list_changing_while_it_runs():
    # Another thread empties the list while the native call runs with the GIL released.
    # Before the binding kept its own references this read freed memory (SIGSEGV or wrong
    # values). A subprocess, so that a crash fails this test instead of ending the session;
    # at least one trial must really have raced, or the test proves nothing.
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", _MUTATE_DURING_CROP], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"rc {res.returncode}: {res.stderr[-2000:]}"
    word, count = res.stdout.split()
    assert word == "raced" and int(count) >= 1, res.stdout


def test_crop_resize_rejects_non_arrays_in_the_list():
    out = torch.empty(1, 1, 4, 4)
    with pytest.raises(ValueError, match="uint8, uint16 or float32"):
        crop_resize([[[0] * 5] * 5], np.array([[0, 0, 4, 4]]), np.array([False]), 4, value_scale=255.0,
                    mean=MEAN, std=STD, out=out)


def test_draw_crops_follow_the_recipe():
    n = 4000
    boxes, mirror = draw_crops(256, 200, np.arange(n), seed=3, epochs=1, scale=(0.2, 1.0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 256).all() and (left + w <= 200).all()
    area = h * w / (256 * 200)
    aspect = w / h
    centre = (h == 200) & (w == 200) & (top == 28) & (left == 0)
    drawn = ~centre
    assert drawn.mean() > 0.95
    assert area[drawn].min() > 0.19 and area[drawn].max() <= 1.0  # rounding moves the area a little
    assert aspect[drawn].min() > 0.74 and aspect[drawn].max() < 1.35
    # the distribution of torchvision's recipe, drawn independently with Python's random
    rnd, ref_area, ref_log_aspect = random.Random(0), [], []
    for _ in range(n):
        for _ in range(10):
            target = 256 * 200 * rnd.uniform(0.2, 1.0)
            a = math.exp(rnd.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(target * a)), round(math.sqrt(target / a))
            if 0 < cw <= 200 and 0 < ch <= 256:
                ref_area.append(cw * ch / (256 * 200))
                ref_log_aspect.append(math.log(cw / ch))
                break
    assert abs(np.median(area[drawn]) - np.median(ref_area)) < 0.03
    assert abs(np.log(aspect[drawn]).mean() - np.mean(ref_log_aspect)) < 0.02
    assert 0.47 < mirror.mean() < 0.53
    # a pure function of (seed, epoch, index); any of the three changes the draw
    again, _ = draw_crops(256, 200, np.arange(n), seed=3, epochs=1, scale=(0.2, 1.0))
    assert np.array_equal(boxes, again)
    for other in (dict(seed=4, epochs=1), dict(seed=3, epochs=2)):
        moved, _ = draw_crops(256, 200, np.arange(n), scale=(0.2, 1.0), **other)
        assert (moved != boxes).any(axis=1).mean() > 0.9
    single = np.stack([draw_crops(256, 200, [i], seed=3, epochs=1, scale=(0.2, 1.0))[0][0] for i in range(50)])
    assert np.array_equal(single, boxes[:50])  # batch composition does not matter


def test_draw_crops_fall_back_to_a_centre_square():
    boxes, _ = draw_crops(100, 1, np.arange(20), seed=0, epochs=0, scale=(0.2, 1.0))
    assert (boxes == [[49, 0, 1, 1]]).all()
    boxes, _ = whole_images(5, 7, 3)
    assert (boxes == [[0, 0, 5, 7]]).all()


def test_uniforms_are_uniform():
    u = uniforms(0, 0, np.arange(20000), 8)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    counts = np.histogram(u, bins=10, range=(0, 1))[0]
    assert counts.min() > 0.95 * u.size / 10


@pytest.fixture(scope="module")
def ramp_data(tmp_path_factory):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (40, 36, 36)).astype(np.uint8)
    return PreparedData(write_prepared(tmp_path_factory.mktemp("aug") / "p", images, (images[:, 0, 0] > 127), 15))


def test_prepared_batches_match_reference_and_worker_count(ramp_data):
    s = ResumableSampler(len(ramp_data), seed=1)
    s.set_epoch(2)
    ds = PreparedDataset(ramp_data, img_size=24, train=True, seed=9, with_labels=True)
    batches = {}
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=8, sampler=s, num_workers=workers, collate_fn=collate, drop_last=True)
        batches[workers] = list(loader)
    assert len(batches[0]) == 5
    keys = list(s)
    for b, ((x0, y0), (x2, y2)) in enumerate(zip(batches[0], batches[2])):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        chunk = keys[8 * b:8 * b + 8]
        boxes, mirror = draw_crops(36, 36, [i for i, _ in chunk], seed=9, epochs=2, scale=(0.2, 1.0))
        for k, (index, _) in enumerate(chunk):
            ref = reference(ramp_data.image(index), boxes[k], mirror[k], 24, 255.0)
            torch.testing.assert_close(x0[k, 0].double(), ref, atol=2e-5, rtol=1e-5)
            assert y0[k].item() == ramp_data.labels[index][0]
    single = ds[keys[3]]
    assert torch.equal(single[0], batches[0][0][0][3])
    assert math.isclose(float(single[1]), float(batches[0][0][1][3]))


def test_output_pool_reuses_only_memory_nothing_holds():
    pool = OutputPool(keep=2)
    shape = (3, 1, 4, 4)
    a = pool.get(shape)
    b = pool.get(shape)
    assert a.data_ptr() != b.data_ptr()  # a is still held
    a_ptr = a.data_ptr()
    view = a[1:]
    del a
    assert pool.get(shape).data_ptr() not in (a_ptr, b.data_ptr())  # a view of a still holds it
    array = b.numpy()
    del view, b
    c = pool.get(shape)
    assert c.data_ptr() != array.ctypes.data  # an array over b's memory still holds it
    del array, c
    assert pool.get(shape).data_ptr() in {p.data_ptr() for p, _ in pool.buffers}  # reused, not new


def test_random_batches_and_bad_boxes_short_fuzz():
    import crop_fuzz

    assert crop_fuzz.run(seconds=2.0, seed=int(np.random.default_rng().integers(2**31))) > 50


def _batch_script(count: int, fault: str, threads: int) -> str:
    """A child process that crops a batch on one thread, then again on ``threads`` after
    ``fault`` (Python lines) made thread creation fail, and prints whether the two agree."""
    import textwrap

    return textwrap.dedent(f"""
        import ctypes, resource
        import numpy as np
        from cxrfast.data.augment import crop_resize
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 255, (40, 40), dtype=np.uint8) for _ in range({count})]
        boxes = np.array([[2, 3, 30, 31]] * {count}, dtype=np.int64)
        mirror = np.zeros({count}, dtype=bool)
        expected = crop_resize(images, boxes, mirror, 16, value_scale=255.0, mean=0.5, std=0.25, threads=1)
    """) + textwrap.dedent(fault) + textwrap.dedent(f"""
        got = crop_resize(images, boxes, mirror, 16, value_scale=255.0, mean=0.5, std=0.25, threads={threads})
        print("equal" if bool((got == expected).all()) else "different")
    """)


def _assert_same_batch(proc) -> None:
    assert "terminate called" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "equal"


def test_crop_resize_with_more_threads_than_can_start_still_gives_the_result(tmp_path):
    """Thread creation that fails (an address-space cap) must not abort the process: the
    threads that did start and the caller finish the batch, with the same values."""
    import os
    import subprocess
    import sys

    cap = """
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                limit = int(line.split()[1]) * 1024 + (256 << 20)  # a few thread stacks, not 1000
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    """
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _batch_script(1000, cap, 1000)], capture_output=True, text=True,
                          timeout=120, env=env)
    _assert_same_batch(proc)


def test_crop_resize_survives_bad_alloc_while_growing_its_thread_pool(tmp_path):
    """std::bad_alloc (not std::system_error) after one thread started: the started thread
    and the caller finish the batch instead of std::terminate (issue 9)."""
    import thread_fault

    lib = thread_fault.build(tmp_path)
    if lib is None:
        pytest.skip("needs Linux and a C++ compiler for the fault-injection library")
    fault = """
        ctypes.CDLL(None).cxr_fault_after_threads(1)
    """
    _assert_same_batch(thread_fault.run(_batch_script(64, fault, 4), lib))
