"""Dataset protocols on small CSVs in each release's real layout: NIH's official split lists,
CheXpert's label set, per-label uncertainty, views and valid.csv as the test split,
MIMIC-CXR-JPG's negbio labels + metadata + split CSV, PadChest's list column, VinDr-CXR's
radiologist votes, the shared vocabulary and --labels_map, and the view filter from the CSV
or the DICOM header."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxrfast.data.label_formats import Uncertainty, vocabulary
from cxrfast.data.label_formats.chexpert import CHEXPERT5, CHEXPERT_LABELS
from cxrfast.data.labels import Protocol, filter_views, header_view, read_labels, read_protocol, resolve_splits
from cxrfast.synthetic import FINDINGS, ensure_demo_dataset
from train import labelled
from train.evaluate import label_columns

ROOT = Path(__file__).resolve().parents[1]

NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
NIH_ROWS = ["00000001_000.png,Cardiomegaly,0,1,58,M,PA,2682,2749,0.143,0.143,",
            "00000001_001.png,Cardiomegaly|Emphysema,1,1,58,M,PA,2894,2729,0.143,0.143,",
            "00000002_000.png,No Finding,0,2,81,M,PA,2500,2048,0.171,0.171,",
            "00000003_000.png,Hernia,0,3,81,F,AP,2582,2991,0.143,0.143,",
            "00000004_000.png,Mass|Nodule,0,4,82,M,AP,2500,2048,0.168,0.168,",
            "00000005_000.png,Effusion,0,5,69,F,PA,2048,2500,0.168,0.168,"]

CHEXPERT_HEADER = ("Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(CHEXPERT_LABELS) + "\n")


def _chexpert_row(path: str, view: str, appa: str, values: dict[str, str]) -> str:
    return ",".join([path, "Female", "68", view, appa] + [values.get(n, "") for n in CHEXPERT_LABELS])


@pytest.fixture
def nih(tmp_path):
    (tmp_path / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n".join(NIH_ROWS) + "\n")
    (tmp_path / "train_val_list.txt").write_text("00000001_000.png\n00000001_001.png\n00000002_000.png\n"
                                                 "00000004_000.png\n")
    (tmp_path / "test_list.txt").write_text("00000003_000.png\n")
    return tmp_path


def test_nih_split_files_give_the_official_split(nih):
    lists = (str(nih / "train_val_list.txt"), str(nih / "test_list.txt"))
    table, notes = read_protocol(nih / "Data_Entry_2017.csv", protocol=Protocol(split_files=lists))
    assert table.keys == ["00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png",
                          "00000004_000.png"]
    assert table.splits == ["trainval", "trainval", "trainval", "test", "trainval"]
    assert notes == ["--split_files: 1 labelled images in neither list left out"]  # 00000005_000.png
    assert table.labels[3, table.names.index("Hernia")] == 1 and table.views[3] == "AP"
    splits = resolve_splits(table.splits, table.patients, (0.5, 0.5, 0.0))
    assert splits[3] == "test" and set(splits) <= {"train", "val", "test"}
    assert splits[0] == splits[1]  # one patient, one split
    with pytest.raises(ValueError, match="needs two lists"):
        read_protocol(nih / "Data_Entry_2017.csv", protocol=Protocol(split_files=lists[:1]))


def test_trainval_splits_by_patient_in_the_train_val_ratio():
    patients = [f"p{i}" for i in range(400)]
    splits = resolve_splits(["trainval"] * 400, patients, (0.7, 0.1, 0.2))
    assert "test" not in splits and 25 <= splits.count("val") <= 75  # 1/8 of 400 = 50
    assert resolve_splits(["trainval", "test"], ["a", "b"], (0.7, 0.0, 0.3)) == ["train", "test"]


def test_chexpert5_label_set_and_per_label_uncertainty(tmp_path):
    path = tmp_path / "train.csv"
    u = {n: "-1.0" for n in CHEXPERT_LABELS}
    path.write_text(CHEXPERT_HEADER + _chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                                                    "Frontal", "AP", u) + "\n")
    policy = "Atelectasis=ones,Edema=ones,*=zeros"
    table, _ = read_protocol(path, "chexpert", policy, Protocol(label_set="chexpert5"))
    assert table.names == list(CHEXPERT5)
    np.testing.assert_array_equal(table.labels[0], [1, 0, 0, 1, 0])  # Atelectasis, Cardiomegaly, Consol., Edema, PE
    full = read_labels(path, uncertain=policy)
    assert full.names == list(CHEXPERT_LABELS)  # the full 14 stay the default
    ignore = read_labels(path, uncertain="Edema=ignore")
    assert np.isnan(ignore.labels[0, ignore.names.index("Edema")]) and np.nansum(ignore.labels[0]) == 13


@pytest.mark.parametrize("spec, named", [("Atelectasis=ones,Edma=ones", "'Edma'"), ("Edema=maybe", "'maybe'"),
                                         ("=ones", "'=ones'")])
def test_bad_uncertainty_names_the_label_or_policy(tmp_path, spec, named):
    path = tmp_path / "train.csv"
    path.write_text(CHEXPERT_HEADER + _chexpert_row("p/patient00001/s/view1_frontal.jpg", "Frontal", "PA", {}) + "\n")
    with pytest.raises(ValueError) as err:
        read_labels(path, uncertain=spec)
    assert named in str(err.value) and str(err.value).startswith("--uncertain")


def test_uncertainty_spec_parses_plain_and_per_label():
    assert Uncertainty.parse("zeros") == Uncertainty("zeros")
    u = Uncertainty.parse("Pleural Effusion=ignore,*=zeros,Edema=ones")
    assert (u.policy("Pleural Effusion"), u.policy("Edema"), u.policy("Fracture")) == ("ignore", "ones", "zeros")


def test_chexpert_views_and_valid_csv_as_the_test_split(tmp_path):
    train, valid = tmp_path / "train.csv", tmp_path / "valid.csv"
    pre = "CheXpert-v1.0-small/"
    train.write_text(CHEXPERT_HEADER + "\n".join([
        _chexpert_row(pre + "train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP", {"Edema": "1.0"}),
        _chexpert_row(pre + "train/patient00001/study1/view2_lateral.jpg", "Lateral", "", {"Edema": "1.0"}),
        _chexpert_row(pre + "train/patient00002/study1/view1_frontal.jpg", "Frontal", "PA", {"Edema": "0.0"})]) + "\n")
    valid.write_text(CHEXPERT_HEADER + _chexpert_row(pre + "valid/patient64541/study1/view1_frontal.jpg", "Frontal",
                                                     "AP", {"Edema": "1.0"}) + "\n")
    table, _ = read_protocol(train, protocol=Protocol(test_labels=str(valid)))
    assert table.views == ["AP", "Lateral", "PA", "AP"]
    assert table.splits == ["trainval"] * 3 + ["test"]
    # the file names repeat across patients: a file is paired by its path, never by 'view1_frontal.jpg'
    lookup = table.lookup()
    assert "view1_frontal.jpg" not in lookup and lookup["valid/patient64541/study1/view1_frontal.jpg"] == 3
    files = [tmp_path / Path(k).name for k in table.keys]
    kept, note = filter_views(files, [0, 1, 2, 3], table, "frontal")
    assert kept == [0, 2, 3] and note == "--view frontal: kept 3 of 4 images; left out 1 of other views"
    assert filter_views(files, [0, 1, 2, 3], table, "PA")[0] == [2]


def test_mimic_negbio_with_metadata_and_official_split(tmp_path):
    names = "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion," \
            "Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
    (tmp_path / "mimic-cxr-2.0.0-negbio.csv").write_text(
        f"subject_id,study_id,{names}\n10000032,50414267,,,,,,,,,1.0,,,,,\n"
        "10000032,53189527,,1.0,,-1.0,,,,,,,,,,\n10000764,57375967,,,1.0,,,,,,,,,,,\n")
    (tmp_path / "mimic-cxr-2.0.0-metadata.csv").write_text(
        "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Columns\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,CHEST (PA AND LAT),PA,3056,2544\n"
        "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,CHEST (PA AND LAT),LATERAL,3056,2544\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,CHEST (PA AND LAT),AP,3056,2544\n"
        "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4,10000764,57375967,CHEST (PORTABLE AP),AP,3056,2544\n"
        "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714,10000898,50771383,CHEST (PA AND LAT),PA,3056,2544\n")
    (tmp_path / "mimic-cxr-2.0.0-split.csv").write_text(
        "dicom_id,study_id,subject_id,split\n"
        "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,50414267,10000032,train\n"
        "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,50414267,10000032,train\n"
        "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,53189527,10000032,validate\n"
        "096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4,57375967,10000764,test\n")
    table, notes = read_protocol(tmp_path / "mimic-cxr-2.0.0-negbio.csv", uncertain="zeros")
    assert [k[:8] for k in table.keys] == ["02aa804e", "174413ec", "2a2277a9", "096052b7"]
    assert table.views == ["PA", "LATERAL", "AP", "AP"]
    assert resolve_splits(table.splits, table.patients, (0.7, 0.1, 0.2)) == ["train", "train", "val", "test"]
    assert table.labels[2, table.names.index("Cardiomegaly")] == 1 and table.labels[2, table.names.index("Edema")] == 0
    assert notes == [f"{tmp_path / 'mimic-cxr-2.0.0-negbio.csv'}: 1 images of a study without labels left out"]


PADCHEST_HEADER = ("ImageID,ImageDir,StudyDate_DICOM,StudyID,PatientID,PatientBirth,PatientSex_DICOM,"
                   "ViewPosition_DICOM,Projection,MethodProjection,Pediatric,Modality_DICOM,ReportID,Report,"
                   "MethodLabel,Labels,Localizations,LabelsLocalizationsBySentence,labelCUIS,LocalizationsCUIS\n")


def _padchest_row(image: str, patient: str, projection: str, labels: str) -> str:
    return (f'{image},0,20140915,st1,{patient},1930,M,POSTEROANTERIOR,{projection},Manual review of DICOM fields,'
            f'No,CR,4765777,report,Physician,"{labels}",[],[],[],[]')


def test_padchest_list_column_normal_and_projection(tmp_path):
    path = tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
    path.write_text(PADCHEST_HEADER + "\n".join([
        _padchest_row("20536686640136348236148679891455886468_k6ga29.png", "839860488694292331637988235681460987",
                      "PA", "['normal']"),
        _padchest_row("135803415504923515076821959678074435083_fzis7d.png", "313572750430997347502932654319389875",
                      "L", "['pleural effusion', 'cardiomegaly', ' pulmonary edema']"),
        _padchest_row("113855343774216031107737439268243531979_3k951l.png", "50783093527901818115346441867348318",
                      "AP_horizontal", "['cardiomegaly']"),
        _padchest_row("broken_row.png", "1", "PA", "")]) + "\n")
    table, notes = read_protocol(path)
    assert table.names == ["cardiomegaly", "pleural effusion", "pulmonary edema"]
    np.testing.assert_array_equal(table.labels, [[0, 0, 0], [1, 1, 1], [1, 0, 0]])
    assert table.views == ["PA", "L", "AP_horizontal"] and table.patients[0] == "839860488694292331637988235681460987"
    assert notes == [f"{path}: 1 rows whose Labels are not a list left out"]
    kept, _ = filter_views([Path(k) for k in table.keys], [0, 1, 2], table, "PA,AP_horizontal")
    assert kept == [0, 2]
    five, _ = read_protocol(path, protocol=Protocol(label_set="chexpert5"))  # found through the vocabulary
    assert five.names == list(CHEXPERT5)
    assert np.isnan(five.labels[:, 0]).all()  # Atelectasis: not in this file -> ignored, not negative
    np.testing.assert_array_equal(five.labels[:, 1:], [[0, np.nan, 0, 0], [1, np.nan, 1, 1], [1, np.nan, 0, 0]])


VINDR_HEADER = ("image_id,rad_id,Aortic enlargement,Atelectasis,Calcification,Cardiomegaly,Clavicle fracture,"
                "Consolidation,Edema,Emphysema,Enlarged PA,ILD,Infiltration,Lung Opacity,Lung cavity,Lung cyst,"
                "Mediastinal shift,Nodule/Mass,Other lesion,Pleural effusion,Pleural thickening,Pneumothorax,"
                "Pulmonary fibrosis,Rib fracture,COPD,Lung tumor,Pneumonia,Tuberculosis,"
                "Other diseases,No finding\n")


def _vindr_row(image: str, rad: str, positive: tuple[str, ...]) -> str:
    names = VINDR_HEADER.strip().split(",")[2:]
    return ",".join([image, rad] + ["1" if n in positive else "0" for n in names])


@pytest.mark.parametrize("vote, expected", [("majority", [1, 0]), ("any", [1, 1])])
def test_vindr_three_radiologists_vote(tmp_path, vote, expected):
    path = tmp_path / "image_labels_train.csv"
    path.write_text(VINDR_HEADER + "\n".join([
        _vindr_row("000434271f63a053c4128a0ba6352c7f", "R2", ("Cardiomegaly", "Pleural effusion")),
        _vindr_row("000434271f63a053c4128a0ba6352c7f", "R3", ("Cardiomegaly",)),
        _vindr_row("000434271f63a053c4128a0ba6352c7f", "R6", ("No finding",)),
        _vindr_row("00053190460d56c53cc3e57321387478", "R11", ("No finding",)),
        _vindr_row("00053190460d56c53cc3e57321387478", "R15", ("Cardiomegaly",)),
        _vindr_row("00053190460d56c53cc3e57321387478", "R10", ("No finding",))]) + "\n")
    table = read_labels(path, vote=vote)
    assert table.keys == ["000434271f63a053c4128a0ba6352c7f.dicom", "00053190460d56c53cc3e57321387478.dicom"]
    assert len(table.names) == 28 and "rad_id" not in table.names
    np.testing.assert_array_equal(table.labels[:, table.names.index("Cardiomegaly")], expected)
    assert table.labels[0, table.names.index("Pleural effusion")] == (vote == "any")
    with pytest.raises(ValueError, match="--rad_vote all"):
        read_labels(path, vote="all")


def test_vocabulary_matches_the_standard_names():
    assert vocabulary.key("Effusion") == vocabulary.key("Pleural Effusion") == vocabulary.key("pleural effusion")
    assert vocabulary.key("Pleural_Thickening") == vocabulary.key("Pleural thickening")
    assert vocabulary.key("Edema") == vocabulary.key("pulmonary edema") != vocabulary.key("Effusion")
    assert vocabulary.find("Pleural Effusion", ["Cardiomegaly", "Effusion"]) == 1
    assert vocabulary.find("Mass", ["Nodule/Mass"]) is None


def test_evaluation_keeps_shared_labels_and_names_the_dropped():
    ckpt = ["Atelectasis", "Pleural Effusion", "Fracture", "Edema"]  # a CheXpert model on NIH data
    pairs, dropped, ignored = label_columns(ckpt, ["Atelectasis", "Cardiomegaly", "Effusion", "Edema"], "--labels x")
    assert pairs == [(0, 0), (1, 2), (3, 3)] and dropped == ["Fracture"] and ignored == ["Cardiomegaly"]
    with pytest.raises(Exception, match="shares no label"):
        label_columns(["Fracture"], ["Hernia"], "--labels x")


def test_labels_map_inline_and_json(nih, tmp_path):
    path = nih / "Data_Entry_2017.csv"
    t, _ = read_protocol(path, protocol=Protocol(labels_map='Effusion="Pleural Effusion",Hernia=Hiatus'))
    assert t.names[2] == "Pleural Effusion" and t.names[-1] == "Hiatus"
    (tmp_path / "map.json").write_text(json.dumps({"Effusion": "Pleural Effusion", "Not in NIH": "x"}))
    t, _ = read_protocol(path, protocol=Protocol(labels_map=str(tmp_path / "map.json")))
    assert t.names[2] == "Pleural Effusion"
    with pytest.raises(ValueError, match="'Efusion' is not one of the labels"):
        read_protocol(path, protocol=Protocol(labels_map="Efusion=Pleural Effusion"))
    with pytest.raises(ValueError, match="several labels would be called Mass"):
        read_protocol(path, protocol=Protocol(labels_map="Nodule=Mass"))


def test_view_from_the_dicom_header_when_the_csv_has_none(tmp_path):
    demo = ensure_demo_dataset(tmp_path / "demo", count=8, size=32)  # cxr_000, cxr_004 are AP, the rest PA
    assert header_view(demo / "cxr_000.dcm") == "AP" and header_view(demo / "cxr_001.dcm") == "PA"
    data = labelled.load(str(demo), str(demo / "labels.csv"), fractions=(1.0, 0.0, 0.0),
                         protocol=Protocol(view="AP"))
    assert sorted(f.name for f in data.splits["train"].files) == ["cxr_000.dcm", "cxr_004.dcm"]
    assert data.notes == ["--view AP: kept 2 of 8 images; left out 6 of other views"]
    assert data.names == list(FINDINGS)


def test_prepare_view_filter_before_decoding(nih, tmp_path):
    from PIL import Image

    from cxrfast.prepare import prepare

    src = tmp_path / "images"
    src.mkdir()
    for i, row in enumerate(NIH_ROWS):  # each its own pixels (equal files would be duplicates)
        Image.fromarray(np.full((24, 20), 40 + 30 * i, np.uint8)).save(src / row.split(",")[0])
    meta = prepare(str(src), str(tmp_path / "out"), size=16, labels=str(nih / "Data_Entry_2017.csv"), workers=1,
                   protocol=Protocol(view="AP", label_set="chexpert5",
                                     split_files=(str(nih / "train_val_list.txt"), str(nih / "test_list.txt"))))
    assert meta["images"] == 2 and meta["label_names"] == list(CHEXPERT5)
    # 00000005_000.png is in neither split list, so it has no row, and a PNG has no header view
    assert meta["notes"] == ["--split_files: 1 labelled images in neither list left out",
                             "--view AP: kept 2 of 6 images; left out 3 of other views and 1 with no view in the CSV "
                             "or the DICOM header"]
    index = (tmp_path / "out" / "index.csv").read_text()
    assert "00000003_000.png" in index and "00000004_000.png" in index and "00000001_000.png" not in index


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("module, args, named", [
    ("train.finetune", ["--uncertain", "Edema=maybe"], "--uncertain Edema=maybe"),
    ("train.evaluate", ["--label_set", ","], "--label_set"),
    ("train.finetune", ["--labels_map", "Effusion"], "--labels_map 'Effusion'"),
    ("train.evaluate", ["--view", "PA,,AP"], "--view"),
    ("train.finetune", ["--rad_vote", "all"], "--rad_vote all"),
    ("cxrfast.prepare", [".", "never_made", "--uncertain", "Edema=maybe"], "--uncertain Edema=maybe"),
    ("cxrfast.prepare", [".", "never_made", "--rad-vote", "all"], "all"),
    ("cxrfast.prepare", [".", "never_made", "--label-set", "chexpert5"], "--label-set: only with --labels"),
])
def test_bad_protocol_option_is_one_error_line(module, args, named):
    r = _run(module, *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], r.stderr


def test_unknown_uncertain_label_is_one_error_line_naming_it(tmp_path):
    demo = ensure_demo_dataset(tmp_path / "demo", count=4, size=32)
    r = _run("train.finetune", "--data", str(demo), "--labels", str(demo / "labels.csv"), "--uncertain",
             "Edma=ones", "--output_dir", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "'Edma'" in r.stderr and r.stderr.startswith("error: --uncertain") and not (tmp_path / "out").exists()
