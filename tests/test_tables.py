"""The contract tables between stages (scans, manifest, folds) are checked against their schemas where they are
read, and a bad one fails naming the file, the column and the row."""

import logging

import pandas as pd
import pytest

from nodulesynth.cli import main
from nodulesynth.data.folds import read_folds
from nodulesynth.io import TABLES, read_table, table_schema

VALID = {
    "scans": pd.DataFrame({"scan_id": ["P1", "P1_2", "P2"], "patient_id": ["P1", "P1", "0042"],
                           "series_uid": ["1.2.840.1", "1.2.840.2", "1.3"], "dicom_dir": ["a", "b", "c"],
                           "files": ["", "", "c/files.txt"]}),
    "manifest": pd.DataFrame({"scan_id": ["P1", "P1_2", "P2"], "patient_id": ["P1", "P1", "0042"],
                              "series_uid": ["1.2.840.1", "1.2.840.2", "1.3"], "slices": [40, 0, 12],
                              "spacing": ["2.5,0.7,0.7", "", "1.25,0.625,0.625"], "status": ["ok", "rejected", "ok"]}),
    "folds": pd.DataFrame({"patient_id": ["P1", "0042"], "fold": [0, 1]}),
}


def write(frame, path):
    frame.to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize("name", TABLES)
def test_a_valid_table_passes_with_its_ids_as_text(name, tmp_path):
    table = read_table(write(VALID[name], tmp_path / f"{name}.tsv"), name)
    assert len(table) == len(VALID[name])
    assert "0042" in set(table.patient_id)  # a numeric-looking id keeps its leading zeros
    if "series_uid" in table:
        assert "1.3" in set(table.series_uid)  # and a short UID is not read as a number


@pytest.mark.parametrize("name", TABLES)
def test_a_missing_column_names_the_file_and_the_column(name, tmp_path):
    column = table_schema(name)["required"][-1]
    path = write(VALID[name].drop(columns=column), tmp_path / f"{name}.tsv")
    with pytest.raises(ValueError, match=rf"{name}\.tsv: missing column '{column}'"):
        read_table(path, name)
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(ValueError, match=rf"empty\.tsv: empty file, not even the header of a {name} table"):
        read_table(tmp_path / "empty.tsv", name)


@pytest.mark.parametrize("name, column, value, why", [
    ("manifest", "slices", "many", "'many' is not of type 'integer'"),
    ("manifest", "slices", "2.5", "2.5 is not of type 'integer'"),
    ("manifest", "status", "done", "'done' is not one of"),
    ("manifest", "spacing", "0.7", "does not match"),
    ("folds", "fold", "first", "'first' is not of type 'integer'"),
    ("folds", "fold", "-1", "less than the minimum of 0"),
    ("scans", "scan_id", "P 2", "does not match"),
    ("scans", "dicom_dir", None, "empty"),
])
def test_a_bad_value_names_the_file_the_column_and_the_row(name, column, value, why, tmp_path):
    frame = VALID[name].astype(object)
    frame.loc[1, column] = value
    path = write(frame, tmp_path / f"{name}.tsv")
    with pytest.raises(ValueError, match=rf"{name}\.tsv: row 2, column '{column}': .*") as err:
        read_table(path, name)
    assert why in str(err.value)


@pytest.mark.parametrize("name, column", [("scans", "scan_id"), ("manifest", "scan_id"), ("folds", "patient_id")])
def test_a_repeated_key_names_the_file_the_column_and_the_rows(name, column, tmp_path):
    frame = pd.concat([VALID[name], VALID[name].iloc[[0]]], ignore_index=True)
    path = write(frame, tmp_path / f"{name}.tsv")
    with pytest.raises(ValueError, match=rf"{name}\.tsv: column '{column}': 'P1' repeated in rows 1, {len(frame)}"):
        read_table(path, name)


def test_the_readers_of_the_package_check_the_schema(tmp_path, caplog):
    # folds.tsv through the reader the rules and the downstream datasets use; a patient in two folds.
    folds = write(pd.DataFrame({"patient_id": ["P1", "P1"], "fold": [0, 1]}), tmp_path / "folds.tsv")
    with pytest.raises(ValueError, match=r"folds\.tsv: column 'patient_id': 'P1' repeated"):
        read_folds(folds)
    # manifest.tsv through the folds command: one clear line, exit status 1.
    manifest = VALID["manifest"].astype(object)
    manifest.loc[2, "slices"] = "twelve"
    write(manifest, tmp_path / "manifest.tsv")
    with caplog.at_level(logging.ERROR):
        assert main(["folds", "--manifest", str(tmp_path / "manifest.tsv"), "--slices", str(tmp_path / "x.npz"),
                     "--out", str(tmp_path / "out.tsv")]) == 1
    assert "manifest.tsv: row 3, column 'slices': 'twelve' is not of type 'integer'" in caplog.text
