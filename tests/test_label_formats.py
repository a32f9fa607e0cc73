"""The label-format registry: what it lists, what ``auto`` detects from each format's real
column layout, the RSNA Pneumonia format, CheXpert values parsed once for CheXpert and MIMIC,
and the errors and --help texts built from it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrfast.data import label_formats
from cxrfast.data.label_formats import LabelFormat, LabelTable
from cxrfast.data.labels import FORMATS, match_files, read_labels

ROOT = Path(__file__).resolve().parents[1]

# the header lines of the files as the datasets ship them (NIH's ends in a comma)
HEADERS = {
    "nih14": "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
             "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],",
    "chexpert": "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
                "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
                "Pleural Effusion,Pleural Other,Fracture,Support Devices",
    "mimic": "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,"
             "Fracture,Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,"
             "Pneumothorax,Support Devices",
    "rsna": "patientId,x,y,width,height,Target",
    "generic": "path,patient_id,split,Effusion,Nodule",
}

RSNA_CSV = ("patientId,x,y,width,height,Target\n"
            "0004cfab-14fd-4e49-80ba-63a80b6bddd6,,,,,0\n"
            "00436515-870c-4b36-a041-de91049b9ab4,264.0,152.0,213.0,379.0,1\n"
            "00436515-870c-4b36-a041-de91049b9ab4,562.0,152.0,256.0,453.0,1\n"
            "00313ee0-9eaa-42f4-b0ab-c148ed3241cd,,,,,0\n"
            "00704310-78a8-4b38-8475-49f4573b2dbb,323.0,577.0,160.0,104.0,1\n"
            "00704310-78a8-4b38-8475-49f4573b2dbb,695.0,575.0,162.0,137.0,1\n"
            "00704310-78a8-4b38-8475-49f4573b2dbb,317.0,330.0,131.0,240.0,1\n")


def test_registry_lists_every_format():
    assert label_formats.names() == ("nih14", "chexpert", "mimic", "rsna", "padchest", "vindr", "generic")
    assert FORMATS == ("auto", *label_formats.names()) == label_formats.choices()
    for name in label_formats.names():
        fmt = label_formats.get(name)
        assert fmt.name == name and fmt.columns and "\n" not in fmt.description
    assert label_formats.choices_text() == "auto, nih14, chexpert, mimic, rsna, padchest, vindr or generic"


@pytest.mark.parametrize("name", list(HEADERS))
def test_auto_detects_each_real_layout(name):
    assert label_formats.detect(HEADERS[name].split(",")).name == name


def test_detection_prefers_a_specific_format_over_generic():
    columns = ["path", *HEADERS["rsna"].split(",")]
    assert label_formats.detect(columns).name == "rsna"
    # CheXpert's observations without the 'Path' column are not CheXpert
    assert label_formats.detect(["path", "Cardiomegaly"]).name == "generic"


def test_undetectable_columns_name_what_was_found_and_expected():
    with pytest.raises(ValueError) as err:
        label_formats.detect(["file_name", "Effusion"])
    message = str(err.value)
    assert "['file_name', 'Effusion']" in message
    assert all(f"{n}:" in message for n in label_formats.names())


def test_rsna_image_labels_are_the_max_over_boxes(tmp_path):
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(RSNA_CSV)
    for fmt in ("auto", "rsna"):
        t = read_labels(path, fmt)
        assert t.names == ["Pneumonia"]
        assert t.keys == ["0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm", "00436515-870c-4b36-a041-de91049b9ab4.dcm",
                          "00313ee0-9eaa-42f4-b0ab-c148ed3241cd.dcm", "00704310-78a8-4b38-8475-49f4573b2dbb.dcm"]
        assert t.patients == [Path(k).stem for k in t.keys]
        assert t.labels.dtype == np.float32 and t.labels.shape == (4, 1)
        np.testing.assert_array_equal(t.labels[:, 0], [0, 1, 0, 1])


def test_rsna_max_does_not_depend_on_row_order(tmp_path):
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text("patientId,x,y,width,height,Target\nA,1,2,3,4,1\nA,,,,,0\nB,,,,,0\nB,1,2,3,4,1\n")
    np.testing.assert_array_equal(read_labels(path).labels[:, 0], [1, 1])


def test_rsna_rows_match_dicom_files(tmp_path):
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text(RSNA_CSV)
    images = tmp_path / "stage_2_train_images"
    images.mkdir()
    files = [images / "00704310-78a8-4b38-8475-49f4573b2dbb.dcm", images / "0004cfab-14fd-4e49-80ba-63a80b6bddd6.dcm",
             images / "not-in-the-csv.dcm"]
    matched, labels, rows = match_files(read_labels(path), files, images)
    assert matched == files[:2] and rows == [3, 0]
    np.testing.assert_array_equal(labels[:, 0], [1, 0])


def test_rsna_bad_target_names_the_file(tmp_path):
    path = tmp_path / "stage_2_train_labels.csv"
    path.write_text("patientId,x,y,width,height,Target\nA,,,,,maybe\n")
    with pytest.raises(ValueError, match="stage_2_train_labels.csv"):
        read_labels(path)


@pytest.mark.parametrize("uncertain", ["ones", "zeros", "ignore"])
def test_mimic_and_chexpert_parse_the_same_values(tmp_path, uncertain):
    cells = ["1.0", "0.0", "-1.0", "", "1", "-1"]
    names = ["Edema", "Cardiomegaly", "Pneumonia", "Fracture", "Atelectasis", "Pneumothorax"]
    chexpert = tmp_path / "train.csv"
    chexpert.write_text("Path," + ",".join(names) + "\nCheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg,"
                        + ",".join(cells) + "\n")
    mimic = tmp_path / "mimic-cxr-2.0.0-chexpert.csv"
    mimic.write_text("subject_id,study_id," + ",".join(names) + "\n10000032,50414267," + ",".join(cells) + "\n")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition\n02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,PA\n")
    a, b = read_labels(chexpert, uncertain=uncertain), read_labels(mimic, uncertain=uncertain)
    u = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}[uncertain]
    assert a.names == b.names
    expected = dict(zip(names, [1, 0, u, 0, 1, u]))
    np.testing.assert_array_equal(a.labels[0], [expected[n] for n in a.names])
    np.testing.assert_array_equal(b.labels, a.labels)
    assert b.keys == ["02aa804e-bde0afdd-112c0b34-7bc16630-4e384014"] and b.patients == ["10000032"]


def test_unknown_format_is_a_clear_error(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,A\nx.dcm,1\n")
    for call in (lambda: read_labels(path, "xml"), lambda: label_formats.get("xml")):
        with pytest.raises(ValueError) as err:
            call()
        assert "'xml'" in str(err.value) and "auto, nih14, chexpert, mimic, rsna, padchest, vindr, generic" in str(err.value)


def test_explicit_format_checks_its_columns(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("path,A\nx.dcm,1\n")
    with pytest.raises(ValueError, match=r"rsna labels need the columns \['patientId', 'Target'\]"):
        read_labels(path, "rsna")


def test_a_registered_format_is_read_and_detected(tmp_path, monkeypatch):
    monkeypatch.setattr(label_formats, "_REGISTRY", dict(label_formats._REGISTRY))

    def read(path, rows, columns, uncertain):
        return LabelTable([r["image"] for r in rows], ["Nodule"],
                          np.array([[float(r["nodule"])] for r in rows], np.float32), [None] * len(rows))

    label_formats.register(LabelFormat("toy", "a test format", ("image", "nodule"), read))
    assert label_formats.names()[-1] == "toy"
    with pytest.raises(ValueError, match="already taken"):
        label_formats.register(LabelFormat("toy", "again", ("image",), read))
    path = tmp_path / "toy.csv"
    path.write_text("image,nodule\na.png,1\nb.png,0\n")
    for fmt in ("auto", "toy"):
        t = read_labels(path, fmt)
        assert t.keys == ["a.png", "b.png"]
        np.testing.assert_array_equal(t.labels[:, 0], [1, 0])


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("module", ["train.finetune", "train.evaluate", "cxrfast.prepare"])
def test_help_names_every_registered_format(module):
    r = _run(module, "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps the help lines
    for name in label_formats.names():
        assert f"{name}: {' '.join(label_formats.get(name).description.split())}" in text


def test_finetune_rejects_an_unknown_format_naming_the_choices():
    r = _run("train.finetune", "--label_format", "xml")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--label_format xml: not one of auto, nih14, chexpert, mimic, rsna, padchest, vindr, generic" in r.stderr
