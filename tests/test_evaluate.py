"""python -m train.evaluate: unreadable images are dropped with their labels (never replaced
by another file under the same labels), counted and listed; DDP evaluation gathers the
ranks' scores into the same result as one process."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrfast.data.direct import ImageDataset, UnreadableImage
from cxrfast.models import classifier, mae
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import evaluate, inference, metrics

ROOT = Path(__file__).resolve().parents[1]
BAD = ("cxr_003.dcm", "cxr_010.dcm", "cxr_017.dcm")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """22 test-split DICOMs (3 of them truncated), a label CSV of all 22, one of the 19 good
    ones, and a small classifier checkpoint that names neither."""
    root = tmp_path_factory.mktemp("eval")
    demo = ensure_demo_dataset(root / "demo", count=22, size=64)
    images = root / "images"
    images.mkdir()
    with open(demo / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        data = (demo / r["path"]).read_bytes()
        (images / r["path"]).write_bytes(data[:400] if r["path"] in BAD else data)

    def write(path, keep, columns=FINDINGS, extra=()):
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "patient_id", "split", *columns, *extra])
            for i, r in enumerate(rows):
                if keep(r["path"]):
                    w.writerow([r["path"], r["path"], "test", *(r[k] for k in columns), *(i % 2 for _ in extra)])

    write(root / "all.csv", lambda p: True)
    write(root / "good.csv", lambda p: p not in BAD)
    write(root / "reversed.csv", lambda p: True, columns=FINDINGS[::-1], extra=("Hernia",))
    write(root / "partial.csv", lambda p: True, columns=FINDINGS[1:])
    with open(root / "mixed.csv", "w", newline="") as f:  # Nodule: no positives; Effusion: some ignored
        w = csv.writer(f)
        w.writerow(["path", "patient_id", "split", *FINDINGS])
        for i, r in enumerate(rows):
            values = {k: r[k] for k in FINDINGS}
            values["Nodule"] = "0"
            if i % 5 == 1:
                values["Effusion"] = "-1"  # uncertain: ignored under --uncertain ignore
            w.writerow([r["path"], f"P{i // 2:03d}", "test", *(values[k] for k in FINDINGS)])
    torch.manual_seed(0)
    model = classifier("vit_tiny", img_size=64, in_chans=1, num_classes=len(FINDINGS), global_pool=True)
    ckpt = root / "model.pth"
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": 64, "in_chans": 1, "global_pool": True}}, ckpt)
    return root, images, ckpt


def _evaluate(setup, labels, out, capsys, ckpt=None, data=None):
    root, images, model = setup
    labels = ["--labels", str(root / labels)] if labels else []
    result = evaluate.main(["--checkpoint", str(ckpt or model), "--data", str(data or images), *labels,
                            "--output_dir", str(out), "--device", "cpu", "--batch_size", "5"])
    return result, capsys.readouterr().out


def _fails(capsys, code, *argv):
    """Runs train.evaluate expecting exit ``code``; returns its one stderr line."""
    with pytest.raises(SystemExit) as info:
        evaluate.main([*map(str, argv), "--device", "cpu"])
    err = capsys.readouterr().err
    assert info.value.code == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_unreadable_images_are_dropped_with_their_labels(setup, tmp_path, capsys):
    result, stdout = _evaluate(setup, "all.csv", tmp_path / "all", capsys)
    alone, _ = _evaluate(setup, "good.csv", tmp_path / "good", capsys)
    assert alone["images"] == 19 and alone["unreadable"] == 0
    for name in FINDINGS:  # the scores of the 19 good images, each with its own labels
        assert result["classes"][name]["auroc"] == pytest.approx(alone["classes"][name]["auroc"], abs=1e-9)
        assert result["classes"][name]["positives"] == alone["classes"][name]["positives"]
    assert result["mean_auroc"] == pytest.approx(alone["mean_auroc"], abs=1e-9)
    errors_csv = tmp_path / "all" / "errors.csv"
    assert f"evaluated 19 of 22 images; 3 unreadable, see {errors_csv}" in stdout
    saved = json.loads((tmp_path / "all" / "metrics.json").read_text())
    assert (saved["images"], saved["images_in_split"], saved["unreadable"]) == (19, 22, 3)
    with open(errors_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["source"]).name for r in rows) == sorted(BAD)
    assert [r["error"] for r in rows] == ["TruncatedError"] * len(BAD)  # cut at 400 bytes
    assert all(Path(r["source"]).name in r["reason"] for r in rows)  # the message names the file
    assert "evaluated 19 of 22 images" in (tmp_path / "all" / "metrics.md").read_text()


def test_rerun_rewrites_the_errors_file(setup, tmp_path, capsys):
    out = tmp_path / "again"
    _evaluate(setup, "all.csv", out, capsys)
    _evaluate(setup, "all.csv", out, capsys)
    assert len((out / "errors.csv").read_text().splitlines()) == 1 + len(BAD)
    _evaluate(setup, "good.csv", out, capsys)  # nothing unreadable now: no stale rows
    assert (out / "errors.csv").read_text().splitlines() == ["source,error,reason"]


def test_training_substitute_brings_its_own_label(setup):
    _, images, _ = setup
    files = [images / "cxr_002.dcm", images / "cxr_003.dcm", images / "cxr_004.dcm"]  # the middle one is bad
    labels = np.array([[0.0], [1.0], [2.0]], np.float32)
    train = ImageDataset(files, img_size=32, train=True, labels=labels)
    x, y = train[1]
    assert float(y[0]) == 2.0  # the substitute (cxr_004) with cxr_004's label, not cxr_003's
    x_next, _ = ImageDataset(files, img_size=32, train=False, labels=labels)[2]
    assert x.shape == x_next.shape
    strict = ImageDataset(files, img_size=32, train=False, labels=labels, substitute=False)
    with pytest.raises(UnreadableImage) as info:
        strict[1]
    assert info.value.index == 1 and "cxr_003.dcm" in str(info.value)


def test_merge_drops_duplicate_indices_and_sorts():
    # rank shares as a padded DistributedSampler would give them: index 0 twice
    a = (np.array([0, 2, 4]), np.array([[0.0], [0.2], [0.4]]), [])
    b = (np.array([1, 3, 0]), np.array([[0.1], [0.3], [0.0]]), [(5, "f5", "TruncatedError", "x")])
    merged = inference._merge([a, b], 6)
    np.testing.assert_array_equal(merged.indices, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(merged.values[:, 0], [0.0, 0.1, 0.2, 0.3, 0.4])
    assert merged.total == 6 and merged.unreadable == 1


def test_two_process_evaluation_matches_one_process(setup, tmp_path, capsys):
    root, images, ckpt = setup
    one, _ = _evaluate(setup, "all.csv", tmp_path / "one", capsys)
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "train.evaluate", "--checkpoint", str(ckpt), "--data", str(images),
                           "--labels", str(root / "all.csv"), "--output_dir", str(out), "--device", "cpu",
                           "--batch_size", "5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((out / "metrics.json").read_text())
    assert (two["images"], two["unreadable"]) == (19, 3)
    for name in FINDINGS:
        assert two["classes"][name]["auroc"] == pytest.approx(one["classes"][name]["auroc"], abs=1e-6)
        assert two["classes"][name]["auprc"] == pytest.approx(one["classes"][name]["auprc"], abs=1e-6)
    assert two["mean_auroc"] == pytest.approx(one["mean_auroc"], abs=1e-6)
    for key in ("mean_auroc_low", "mean_auroc_high", "mean_auprc_low", "mean_auprc_high"):
        assert two[key] == pytest.approx(one[key], abs=1e-6)  # same images in the same order: same resamples
    rows_one, p_one, y_one = _read_predictions(tmp_path / "one" / "predictions.csv")
    rows_two, p_two, y_two = _read_predictions(out / "predictions.csv")
    assert [r["path"] for r in rows_two] == [r["path"] for r in rows_one] and len(rows_two) == 19
    np.testing.assert_allclose(p_two, p_one, atol=1e-6)
    np.testing.assert_array_equal(y_two, y_one)
    assert proc.stdout.count("evaluated 19 of 22 images") == 1  # rank 0 reports, once


def test_label_columns_are_paired_by_name_not_position(setup, tmp_path, capsys):
    """A CSV with its label columns in another order (and one the model does not predict)
    gives the same per-class metrics; the ignored column is named in the summary."""
    same, _ = _evaluate(setup, "all.csv", tmp_path / "same", capsys)
    turned, stdout = _evaluate(setup, "reversed.csv", tmp_path / "turned", capsys)
    assert list(turned["classes"]) == list(FINDINGS)
    for name in FINDINGS:
        assert turned["classes"][name] == pytest.approx(same["classes"][name], abs=1e-9, nan_ok=True)
    assert turned["ignored_labels"] == ["Hernia"]
    assert "label columns not in the checkpoint, ignored: Hernia" in stdout


def test_prepared_folder_pairs_labels_by_name(setup, tmp_path, capsys):
    from cxrfast.prepare import prepare

    root, images, _ = setup
    prepare(str(images), str(tmp_path / "p_same"), size=64, workers=1, labels=str(root / "all.csv"))
    prepare(str(images), str(tmp_path / "p_turned"), size=64, workers=1, labels=str(root / "reversed.csv"))
    same, _ = _evaluate(setup, None, tmp_path / "same", capsys, data=tmp_path / "p_same")
    turned, _ = _evaluate(setup, None, tmp_path / "turned", capsys, data=tmp_path / "p_turned")
    assert same["images"] == turned["images"] == 19
    rows, _, y = _read_predictions(tmp_path / "same" / "predictions.csv")
    assert len(rows) == 19 and all(Path(r["path"]).is_file() and r["path"].startswith(str(images)) for r in rows)
    _, _, y_turned = _read_predictions(tmp_path / "turned" / "predictions.csv")
    np.testing.assert_array_equal(y_turned, y)  # y_<name> follow the names, not the CSV's column order
    for name in FINDINGS:
        assert turned["classes"][name] == pytest.approx(same["classes"][name], abs=1e-9, nan_ok=True)


def test_checkpoint_label_missing_from_the_data_is_dropped_and_named(setup, tmp_path, capsys):
    """A label the data lacks is left out of the evaluation (never scored against zeros) and
    named; a checkpoint that shares no label with the data is one error line."""
    root, images, ckpt = setup
    result, stdout = _evaluate(setup, "partial.csv", tmp_path / "out", capsys)
    assert result["dropped_labels"] == [FINDINGS[0]] and set(result["classes"]) == set(FINDINGS[1:])
    assert f"checkpoint labels not in the data, dropped: {FINDINGS[0]}" in stdout
    (root / "none_shared.csv").write_text("path,Hernia\n" + "".join(f"{p.name},0\n" for p in sorted(images.iterdir())))
    line = _fails(capsys, 2, "--checkpoint", ckpt, "--data", images, "--labels", root / "none_shared.csv",
                  "--output_dir", tmp_path / "none")
    assert "shares no label" in line and "none_shared.csv" in line
    assert not (tmp_path / "none").exists()


def test_non_finite_scores_are_an_error_not_a_metric():
    labels = np.array([[0.0], [1.0], [0.0], [1.0], [1.0], [0.0]])
    with pytest.raises(ValueError, match="6 of 6 scores are non-finite"):
        metrics.per_class(labels, np.full((6, 1), np.nan), ["a"])  # was AUROC 0.833
    with pytest.raises(ValueError, match="1 of 6"):
        metrics.per_class(labels, np.array([[0.1], [0.9], [np.inf], [0.8], [0.7], [0.2]]), ["a"])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.average_precision(labels[:, 0], np.full(6, np.nan))
    assert metrics.per_class(labels, np.array([[0.1], [0.9], [0.3], [0.8], [0.7], [0.2]]), ["a"])["mean_auroc"] == 1.0


def test_nan_model_exits_3_with_one_error_line(setup, tmp_path, capsys):
    root, images, ckpt = setup
    saved = torch.load(ckpt, weights_only=True)
    saved["model"]["head.bias"] = torch.full_like(saved["model"]["head.bias"], float("nan"))
    torch.save(saved, tmp_path / "nan.pth")
    out = tmp_path / "out"
    line = _fails(capsys, 3, "--checkpoint", tmp_path / "nan.pth", "--data", images, "--labels", root / "all.csv",
                  "--output_dir", out)
    assert "non-finite" in line and "nan.pth" in line
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("with_kind", [True, False])
def test_pretraining_checkpoint_points_to_linear_probe(setup, tmp_path, capsys, with_kind):
    root, images, _ = setup
    model = mae("vit_tiny", img_size=64, in_chans=1)
    ckpt = {"model": model.state_dict(), "config": {"model": "vit_tiny", "img_size": 64}}
    if with_kind:
        ckpt["kind"] = "pretrain"
    torch.save(ckpt, tmp_path / "pre.pth")
    out = tmp_path / "out"
    line = _fails(capsys, 2, "--checkpoint", tmp_path / "pre.pth", "--data", images, "--labels", root / "all.csv",
                  "--output_dir", out)
    assert "--linear_probe true" in line and "pre.pth" in line
    assert not out.exists()


def test_classifier_that_does_not_fit_is_a_checkpoint_error(setup, tmp_path, capsys):
    root, images, _ = setup
    model = classifier("vit_tiny", img_size=64, in_chans=1, num_classes=2)  # 2 outputs, 3 label names
    torch.save({"model": model.state_dict(), "label_names": list(FINDINGS), "kind": "cxrfast-classifier",
                "config": {"model": "vit_tiny", "img_size": 64}}, tmp_path / "odd.pth")
    out = tmp_path / "out"
    line = _fails(capsys, 2, "--checkpoint", tmp_path / "odd.pth", "--data", images, "--labels", root / "all.csv",
                  "--output_dir", out)
    assert "odd.pth" in line and "head.weight" in line
    assert not out.exists()


def test_training_errors_file_lists_each_bad_file_once(setup, tmp_path):
    """Epochs, workers, a resumed run (a new dataset on the same run folder): one row per file."""
    from torch.utils.data import DataLoader

    _, images, _ = setup
    files = sorted(images.glob("*.dcm"))
    errors = tmp_path / "errors.csv"
    for run in range(2):  # the second is a rerun / resume into the same folder
        ds = ImageDataset(files, img_size=32, train=True, errors_path=errors)
        for epoch in range(2):
            for i in range(len(ds)):
                ds[(i, epoch)]
        loader = DataLoader(list(range(len(ds))), batch_size=4, num_workers=2,
                            collate_fn=lambda idx, ds=ds: [ds[(i, 5)] for i in idx])
        for _ in loader:
            pass
    with open(errors, newline="") as f:
        rows = list(csv.DictReader(f))  # the header once, then one row per bad file
    assert sorted(Path(r["source"]).name for r in rows) == sorted(BAD)
    assert all(r["error"] == "TruncatedError" and Path(r["source"]).name in r["reason"] for r in rows)


def test_clean_validation_rewrites_a_stale_val_errors_file(tmp_path):
    from train import finetune

    data = ensure_demo_dataset(tmp_path / "cxr", count=12, size=64)
    out = tmp_path / "ft"
    out.mkdir()
    (out / "val_errors.csv").write_text("source,error,reason\nold.dcm,TruncatedError,from an earlier run\n")
    finetune.main(["--data", str(data), "--labels", str(data / "labels.csv"), "--output_dir", str(out),
                   "--model", "vit_tiny", "--img_size", "64", "--device", "cpu", "--num_workers", "0",
                   "--max_steps", "1", "--batch_size", "4", "--split_fractions", "0.5,0.5,0.0"])
    assert (out / "val_errors.csv").read_text().splitlines() == ["source,error,reason"]


def _read_predictions(path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """predictions.csv as (rows, probabilities (N, K), labels (N, K), blank = NaN) in FINDINGS order."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    p = np.array([[float(r[f"p_{n}"]) for n in FINDINGS] for r in rows]).reshape(len(rows), -1)
    y = np.array([[float(r[f"y_{n}"]) if r[f"y_{n}"] != "" else np.nan for n in FINDINGS] for r in rows])
    return rows, p, y.reshape(len(rows), -1)


def _markdown_table(text: str) -> list[list[str]]:
    """The rows of the one pipe table in ``text`` (header first, separator checked and dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, text
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    assert len({len(c) for c in cells}) == 1, "every row of the table has the same number of cells"
    assert all(c and set(c) <= set("-:") and c.count("-") >= 3 for c in cells[1]), lines[1]
    return [cells[0]] + cells[2:]


@pytest.fixture(scope="module")
def mixed(setup, tmp_path_factory):
    """One evaluation of mixed.csv (3 unreadable images, a class without positives, ignored labels)."""
    root, images, ckpt = setup
    out = tmp_path_factory.mktemp("mixed")
    result = evaluate.main(["--checkpoint", str(ckpt), "--data", str(images), "--labels", str(root / "mixed.csv"),
                            "--uncertain", "ignore", "--output_dir", str(out), "--device", "cpu",
                            "--batch_size", "5", "--bootstrap", "300", "--seed", "5"])
    return result, out


def test_predictions_csv_has_one_row_per_evaluated_image(mixed, setup, capsys):
    result, out = mixed
    rows, p, y = _read_predictions(out / "predictions.csv")
    assert len(rows) == result["images"] == 19
    with open(out / "errors.csv", newline="") as f:
        bad = {Path(r["source"]).name for r in csv.DictReader(f)}
    names = [Path(r["path"]).name for r in rows]
    assert bad == set(BAD) and not bad & set(names) and len(set(names)) == 19  # unreadable: absent
    assert all(Path(r["path"]).is_file() for r in rows)
    with open(setup[0] / "mixed.csv", newline="") as f:  # each row carries its own image's patient and labels
        given = {r["path"]: r for r in csv.DictReader(f)}
    for r in rows:
        g = given[Path(r["path"]).name]
        assert r["patient_id"] == g["patient_id"]
        for n in FINDINGS:
            assert r[f"y_{n}"] == ("" if g[n] == "-1" else g[n])
    assert np.all((p >= 0) & (p <= 1))
    ignored = int(np.isnan(y[:, 0]).sum())
    assert ignored == result["classes"]["Effusion"]["ignored"] == 5  # rows 1, 6, 11, 16, 21: all readable


def test_metrics_json_is_reproduced_by_the_predictions(mixed):
    result, out = mixed
    saved = json.loads((out / "metrics.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}"))  # strict JSON
    _, p, y = _read_predictions(out / "predictions.csv")
    defined = []
    for k, name in enumerate(FINDINGS):
        c = saved["classes"][name]
        known = ~np.isnan(y[:, k])
        assert (c["positives"], c["negatives"], c["ignored"]) == (int((y[known, k] == 1).sum()),
                                                                  int((y[known, k] == 0).sum()), int((~known).sum()))
        assert c["brier"] == pytest.approx(np.mean((p[known, k] - y[known, k]) ** 2), abs=1e-12)
        if c["status"] != "ok":
            continue
        defined.append(name)
        assert c["auroc"] == pytest.approx(metrics.auroc(y[:, k], p[:, k]), abs=1e-12)
        assert c["auprc"] == pytest.approx(metrics.average_precision(y[:, k], p[:, k]), abs=1e-12)
        assert c["prevalence"] == pytest.approx(c["positives"] / (c["positives"] + c["negatives"]))
        for m in ("auroc", "auprc"):
            assert c[f"{m}_low"] <= c[m] <= c[f"{m}_high"]
    assert defined == ["Effusion", "Cardiomegaly"] and saved["mean_over"] == 2 and saved["classes_total"] == 3
    for m in ("auroc", "auprc", "brier"):
        assert saved[f"mean_{m}"] == pytest.approx(np.mean([saved["classes"][n][m] for n in defined]))
    for m in ("auroc", "auprc"):
        assert saved[f"mean_{m}_low"] <= saved[f"mean_{m}"] <= saved[f"mean_{m}_high"]
    assert saved["bootstrap"] == {"resamples": 300, "seed": 5, "level": 0.95, "method": "percentile"}
    assert saved["classes"] == result["classes"]  # the returned report is the one written


def test_a_class_without_positives_is_reported_as_such_everywhere(mixed, setup, tmp_path, capsys):
    result, out = mixed
    nodule = json.loads((out / "metrics.json").read_text())["classes"]["Nodule"]
    assert nodule["status"] == "no positives in test" and nodule["positives"] == 0 and nodule["negatives"] == 19
    assert all(nodule[k] is None for k in ("auroc", "auroc_low", "auroc_high", "auprc", "auprc_low", "auprc_high"))
    assert result["undefined"] == {"Nodule": "no positives in test"}
    md = (out / "metrics.md").read_text()
    assert "NaN" not in md and "nan" not in md
    row = next(r for r in _markdown_table(md)[1:] if r[0] == "Nodule")
    assert row[1] == "no positives in test"
    root, images, ckpt = setup  # and on screen
    evaluate.main(["--checkpoint", str(ckpt), "--data", str(images), "--labels", str(root / "mixed.csv"),
                   "--output_dir", str(tmp_path), "--device", "cpu", "--bootstrap", "20"])
    screen = capsys.readouterr().out
    line = next(s for s in screen.splitlines() if s.startswith("Nodule"))
    assert "no positives in test" in line and "nan" not in screen.lower()
    assert "mean (2 of 3 classes)" in screen


def test_metrics_md_is_a_markdown_table_of_the_json(mixed):
    result, out = mixed
    md = (out / "metrics.md").read_text()
    assert "```" not in md and "evaluated 19 of 22 images; 3 unreadable" in md
    table = _markdown_table(md)
    head, body = table[0], table[1:]
    assert head[:5] == ["class", "AUROC", "AUROC 95% CI", "AUPRC", "AUPRC 95% CI"] and "Brier" in head
    assert [r[0] for r in body] == [*FINDINGS, "**mean (2 of 3 classes)**"]
    col = {h: i for i, h in enumerate(head)}
    for r in body[:-1]:
        c = result["classes"][r[0]]
        assert int(r[col["positives"]]) == c["positives"] and int(r[col["ignored"]]) == c["ignored"]
        assert float(r[col["Brier"]]) == pytest.approx(c["brier"], abs=5e-5)
        if c["status"] == "ok":
            assert float(r[col["AUROC"]]) == pytest.approx(c["auroc"], abs=5e-4)
            lo, hi = map(float, r[col["AUROC 95% CI"]].split("-"))
            assert (lo, hi) == pytest.approx((c["auroc_low"], c["auroc_high"]), abs=5e-4)
    assert float(body[-1][col["AUPRC"]]) == pytest.approx(result["mean_auprc"], abs=5e-4)


def test_curves_are_written_as_pngs(mixed):
    from PIL import Image

    _, out = mixed
    for name in ("roc.png", "pr.png", "calibration.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300
            # not a blank canvas: curves and text in more than a few colours
            assert len(im.convert("RGB").getcolors(1 << 16) or range(1 << 16)) > 20


def test_intervals_follow_the_seed_and_resamples():
    from train import report

    rng = np.random.default_rng(0)
    y = (rng.random((60, 2)) < 0.4).astype(np.float64)
    s = rng.random((60, 2)) + 0.3 * y
    a = report.build(y, s, ["a", "b"], "val", resamples=200, seed=1)
    assert a == report.build(y, s, ["a", "b"], "val", resamples=200, seed=1)
    b = report.build(y, s, ["a", "b"], "val", resamples=200, seed=2)
    assert (a["classes"]["a"]["auroc_low"], a["mean_auroc_high"]) != (b["classes"]["a"]["auroc_low"],
                                                                     b["mean_auroc_high"])
    assert a["classes"]["a"]["auroc"] == b["classes"]["a"]["auroc"]
    none = report.build(y, s, ["a", "b"], "val", resamples=0)
    assert none["classes"]["a"]["auroc"] == a["classes"]["a"]["auroc"] and none["classes"]["a"]["auroc_low"] is None
    assert "no bootstrap intervals" in report.markdown({**none, "checkpoint": "x"}, "h", "c")


def test_one_value_classes_and_unlabelled_classes_stay_out_of_the_means():
    from train import report

    y = np.array([[1, 1, np.nan, 0], [0, 1, np.nan, 0], [1, 1, np.nan, 0], [0, 1, np.nan, 0]], np.float64)
    s = np.array([[0.9, 0.2, 0.5, 0.1], [0.1, 0.7, 0.5, 0.3], [0.8, 0.6, 0.5, 0.2], [0.3, 0.4, 0.5, 0.4]])
    r = report.build(y, s, ["ok", "allpos", "unlabelled", "allneg"], "test", resamples=50)
    assert [c["status"] for c in r["classes"].values()] == ["ok", "no negatives in test", "no labels in test",
                                                             "no positives in test"]
    assert r["mean_over"] == 1 and r["mean_auroc"] == r["classes"]["ok"]["auroc"] == 1.0
    assert r["classes"]["unlabelled"]["brier"] is None and r["classes"]["unlabelled"]["prevalence"] is None
    assert r["classes"]["allpos"]["brier"] == pytest.approx(np.mean((s[:, 1] - 1) ** 2))
    assert r["mean_brier"] == pytest.approx(r["classes"]["ok"]["brier"])
    nothing = report.build(y[:, 1:], s[:, 1:], ["allpos", "unlabelled", "allneg"], "test", resamples=50)
    assert nothing["mean_over"] == 0 and nothing["mean_auroc"] is None and nothing["mean_brier"] is None
    assert "mean (0 of 3 classes)" in report.screen_table(nothing)


@pytest.mark.parametrize("value", ["-1", "many", "2.5"])
def test_bad_bootstrap_count_is_one_error_line(capsys, value):
    line = _fails(capsys, 2, "--bootstrap", value)
    assert "--bootstrap" in line and value in line
