"""One errors file for every command (issue 11): errors.csv, columns source,error,reason."""
from __future__ import annotations

import csv
from pathlib import Path

from cxrfast import errorfile, manifest
from train import inference


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_prepare_evaluate_and_training_write_the_same_columns(tmp_path):
    manifest.write_logs(tmp_path, {})  # prepare's errors.csv, with no records: the header alone
    inference.write_errors(tmp_path / "eval.csv", [(3, "a/b.dcm", "TruncatedError", "a/b.dcm: cut short")])
    errorfile.append_once(tmp_path / "train.csv", errorfile.row("c.dcm", OSError("c.dcm: gone")), set())
    assert _rows(tmp_path / errorfile.NAME)[0] == list(errorfile.COLUMNS) == ["source", "error", "reason"]
    assert _rows(tmp_path / "eval.csv") == [list(errorfile.COLUMNS), ["a/b.dcm", "TruncatedError", "a/b.dcm: cut short"]]
    assert _rows(tmp_path / "train.csv") == [list(errorfile.COLUMNS), ["c.dcm", "OSError", "c.dcm: gone"]]


def test_append_once_keeps_one_row_per_source_and_quotes_commas(tmp_path):
    path = tmp_path / "run" / "errors.csv"
    exc = ValueError("bad,\n value")  # a comma and a line break in the message
    errorfile.append_once(path, errorfile.row("x,1.dcm", exc), set())
    errorfile.append_once(path, errorfile.row("x,1.dcm", exc), set())  # a new process: learns it from the file
    errorfile.append_once(path, errorfile.row("y.dcm", exc), set())
    assert _rows(path) == [list(errorfile.COLUMNS), ["x,1.dcm", "ValueError", "bad, value"],
                           ["y.dcm", "ValueError", "bad, value"]]


def test_no_command_names_the_old_tsv_file():
    root = Path(__file__).resolve().parents[1]
    for folder in ("cxrfast", "train"):
        for py in (root / folder).rglob("*.py"):
            assert "errors.tsv" not in py.read_text(), py
