"""Cohort discovery hides nothing: series without a patient and unreadable files are turned away with a reason
(in rejected.tsv through cohort_rejected.tsv), and `cohort.patient_id` says how anonymised series find their
patient.

Series are tiny real DICOM written by the project's phantom writer; discovery reads headers only.
"""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from pydicom.uid import generate_uid

from conftest import REPO
from nodulesynth.cli import main
from nodulesynth.data.cohort import REJECTED_COLUMNS, discover_dicom
from nodulesynth.data.phantom import PhantomGeometry, write_dicom_series

STUDY = generate_uid()


def tiny_series(parent, patient_id, study_uid=None):
    """Three 8x8 slices of one series under parent/<series uid>; returns the folder."""
    geometry = PhantomGeometry(patient_id=patient_id, series_uid=generate_uid(), study_uid=study_uid or generate_uid(),
                               z=np.arange(3) * 2.0, pixel_spacing=1.0, image_size=8)
    folder = parent / geometry.series_uid
    write_dicom_series(geometry, np.zeros((3, 8, 8), np.int16), folder)
    return folder


@pytest.fixture
def anonymised(tmp_path):
    """Root with one named patient and two series of one anonymised patient (empty PatientID, one study)."""
    root = tmp_path / "dicom"
    named = tiny_series(root / "P1", "P1")
    anon = [tiny_series(root / "ANON", "", STUDY), tiny_series(root / "ANON", "", STUDY)]
    return root, named, anon


def rel(folder, root):
    return str(folder.relative_to(root))


def test_empty_patient_id_is_rejected_by_default(anonymised):
    root, named, anon = anonymised
    found = discover_dicom(root)
    assert found.scans.dicom_dir.tolist() == [str(named)]
    assert found.scans.patient_id.tolist() == ["P1"]
    assert list(found.rejected.columns) == REJECTED_COLUMNS
    assert sorted(found.rejected.scan_id) == sorted(rel(f, root) for f in anon)
    for reason in found.rejected.reason:
        assert reason.startswith("empty PatientID") and "cohort.patient_id" in reason


@pytest.mark.parametrize("source, expected", [("StudyInstanceUID", STUDY), ("folder", "ANON")])
def test_patient_id_rule_keeps_a_patients_series_together(anonymised, source, expected):
    root, named, anon = anonymised
    found = discover_dicom(root, patient_id=source)
    assert found.rejected.empty
    by_dir = dict(zip(found.scans.dicom_dir, found.scans.patient_id))
    assert by_dir[str(anon[0])] == by_dir[str(anon[1])] == expected  # one patient: one fold
    assert by_dir[str(named)] != expected
    assert found.scans.scan_id.is_unique


def test_bad_patient_id_rule_names_the_key(anonymised):
    with pytest.raises(KeyError, match="cohort.patient_id"):
        discover_dicom(anonymised[0], patient_id="Folder")


@pytest.fixture
def unreadable(tmp_path):
    """A good series, a series with two corrupt files, a folder of files none of which is DICOM."""
    root = tmp_path / "dicom"
    good = tiny_series(root / "P1", "P1")
    partly = tiny_series(root / "P2", "P2")
    (partly / "000004.dcm").write_bytes(b"\0" * 64)
    (partly / "000005.dcm").write_bytes(b"not DICOM at all" * 20)
    junk = root / "JUNK" / "export"
    junk.mkdir(parents=True)
    for name in ("a.dcm", "b.dcm", "c"):
        (junk / name).write_bytes(b"\x89PNG" + bytes(200))
    annotations = tmp_path / "annotations.csv"
    pd.DataFrame(columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]).to_csv(annotations, index=False)
    return root, good, partly, junk, annotations


def test_each_unreadable_file_and_series_gets_a_row(unreadable):
    root, good, partly, junk, _ = unreadable
    found = discover_dicom(root)
    assert found.scans.dicom_dir.tolist() == [str(good)]  # neither broken folder is ingested
    rows = found.rejected
    partly_rows = rows[rows.scan_id == rel(partly, root)]
    assert sorted(partly_rows.reason.str.extract(r"^unreadable DICOM file (\S+):", expand=False)) == [
        "000004.dcm", "000005.dcm"]
    assert set(partly_rows.patient_id) == {"P2"}
    junk_rows = rows[rows.scan_id == rel(junk, root)]
    assert len(junk_rows) == 1  # one row for the folder, not one per file
    assert junk_rows.reason.iloc[0].startswith("no readable DICOM file among 3 files (first, a.dcm: ")
    assert len(rows) == 3


def test_rejections_reach_rejected_tsv_through_the_commands(unreadable, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nodulesynth")
    root, good, partly, junk, annotations = unreadable
    out = tmp_path / "results"
    params = json.dumps(dict(source="dicom", dicom_root=str(root), annotations=str(annotations)))
    assert main(["cohort", "--params", params, "--scans", str(out / "scans.tsv"), "--annotations",
                 str(out / "annotations.csv"), "--cohort-rejected", str(out / "cohort_rejected.tsv")]) == 0
    assert f"{rel(partly, root)} rejected: unreadable DICOM file 000004.dcm" in caplog.text
    scans = pd.read_csv(out / "scans.tsv", sep="\t", dtype=str)
    assert scans.scan_id.tolist() == ["P1"]
    # The one good scan through ingest and masks as the rules run them (8 px of water: no lung, rejected).
    volume, slices, dropped = out / "P1.volume.npz", out / "P1.npz", out / "P1.dropped.tsv"
    assert main(["ingest", "--scans", str(out / "scans.tsv"), "--scan", "P1", "--annotations",
                 str(out / "annotations.csv"), "--params", params, "--out", str(volume)]) == 0
    assert main(["masks", "--volume", str(volume), "--slices", str(slices), "--nodules", str(out / "P1.nodules.tsv"),
                 "--dropped", str(dropped), "--excluded", str(out / "P1.excluded.tsv")]) == 0
    excluded = pd.read_csv(out / "P1.excluded.tsv", sep="\t")
    assert list(excluded.columns) == ["slice_index", "finding", "x0", "y0", "x1", "y1"] and excluded.empty
    assert main(["manifest", "--scans", str(out / "scans.tsv"), "--cohort-rejected", str(out / "cohort_rejected.tsv"),
                 "--slices", str(slices), "--dropped", str(dropped), "--manifest", str(out / "manifest.tsv"),
                 "--rejected", str(out / "rejected.tsv"), "--dropped-nodules", str(out / "dropped.tsv")]) == 0
    rejected = pd.read_csv(out / "rejected.tsv", sep="\t", dtype=str)
    assert sorted(rejected.scan_id) == sorted(["P1", rel(partly, root), rel(partly, root), rel(junk, root)])
    assert rejected.set_index("scan_id").reason["P1"].startswith("no lung found")
    assert "1 rejected (ingestion, masks); 3 series, files or annotations rejected before ingestion" in caplog.text


def test_no_usable_series_is_an_error_naming_the_first_reason(anonymised):
    root, named, _ = anonymised
    for path in named.glob("*.dcm"):
        path.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError, match=r"none of 3 series folders is usable \(first, ANON/.*: empty PatientID"):
        discover_dicom(root)


def test_schema_documents_patient_id():
    from snakemake.utils import validate

    schema = str(REPO / "schemas" / "config.schema.yaml")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for value in ("PatientID", "StudyInstanceUID", "folder"):
        validate({**config, "cohort": {**config["cohort"], "patient_id": value}}, schema)
    with pytest.raises(Exception, match="patient_id|Folder"):
        validate({**config, "cohort": {**config["cohort"], "patient_id": "Folder"}}, schema)


def test_schema_documents_reconstruction_tilted_and_variable_spacing():
    from snakemake.utils import validate

    schema_path = REPO / "schemas" / "config.schema.yaml"
    keys = yaml.safe_load(schema_path.read_text())["properties"]["cohort"]["properties"]
    for key in ("dicom_root", "reconstruction", "tilted", "patient_id", "variable_spacing"):
        assert len(keys[key].get("description", "")) > 40, key
    assert (keys["tilted"]["default"], keys["variable_spacing"]["default"]) == ("reject", "reject")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for key, value in [("reconstruction", "all"), ("reconstruction", "thinnest"),
                       ("reconstruction", "kernel:B3.f|LUNG"), ("tilted", "reject"), ("tilted", "resample"),
                       ("variable_spacing", "reject"), ("variable_spacing", "resample")]:
        validate({**config, "cohort": {**config["cohort"], key: value}}, str(schema_path))
    for key, value in [("reconstruction", "thickest"), ("reconstruction", "kernel:"), ("tilted", "sideways"),
                       ("variable_spacing", "finest")]:
        with pytest.raises(Exception, match=key):
            validate({**config, "cohort": {**config["cohort"], key: value}}, str(schema_path))


def test_patient_ids_that_make_the_same_name_keep_their_own_scans(tmp_path):
    """"CHEST 01" and "CHEST_01" (two sites' spellings) are two patients: each gets its own scan_id and files,
    the next free suffix telling them apart."""
    root = tmp_path / "dicom"
    folders = {"CHEST 01": [tiny_series(root / "a", "CHEST 01")],
               "CHEST_01": [tiny_series(root / "b", "CHEST_01"), tiny_series(root / "b", "CHEST_01")],
               "CHEST/01": [tiny_series(root / "c", "CHEST/01")]}
    found = discover_dicom(root)
    scans = found.scans
    assert scans.scan_id.is_unique and len(scans) == 4
    for patient, series in folders.items():
        mine = scans[scans.patient_id == patient]
        assert sorted(map(str, series)) == sorted(mine.dicom_dir)
        for scan_id, folder in zip(mine.scan_id, mine.dicom_dir):
            assert {str(Path(path).parent) for path in found.files[scan_id]} == {folder}
    assert set(scans.scan_id) == {"CHEST_01", "CHEST_01_2", "CHEST_01_3", "CHEST_01_4"}
