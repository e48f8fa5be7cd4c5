"""Bad input never takes the cohort down: each broken scan is rejected with its reason, the rest goes on.

A `dicom`-source cohort of small phantom series, one good and one broken in each way, runs through the
real Snakemake workflow; rejected.tsv must name each reason and the good scan must finish. An annotated
nodule whose mask comes out empty is not dropped without a word: dropped_nodules.tsv names it.
"""

import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from conftest import run_snakemake
from nodulesynth.data.dicom_series import ScanRejected, read_series
from nodulesynth.data.ingest import ScanRecord, ingest_scan
from nodulesynth.data.phantom import Nodule, PhantomGeometry, render, write_dicom_series


def small_geometry(patient_id, lungs=True):
    return PhantomGeometry(patient_id=patient_id, series_uid=generate_uid(), study_uid=generate_uid(),
                           z=np.arange(36) * 5.0 - 300, pixel_spacing=5.4, image_size=64,
                           nodules=[Nodule((70.0, 0.0, -180.0), 14.0)] if lungs else [], lungs=lungs)


def write_scan(root, patient_id, lungs=True):
    geometry = small_geometry(patient_id, lungs)
    hu, _ = render(geometry, seed=1)
    folder = root / patient_id / geometry.series_uid
    write_dicom_series(geometry, hu, folder)
    return geometry, folder


def edit_all(folder, change):
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path)


def blank_patient_id(folder):
    edit_all(folder, lambda ds: setattr(ds, "PatientID", ""))


def break_unreadable(folder):
    (folder / "000010.dcm").write_bytes(b"\0" * 64)


def break_modality(folder):
    edit_all(folder, lambda ds: setattr(ds, "Modality", "MR"))


def break_pixels(folder):
    path = folder / "000012.dcm"
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)


def break_duplicate(folder):
    shutil.copy(folder / "000007.dcm", folder / "000007b.dcm")


def break_missing(folder):
    (folder / "000020.dcm").unlink()


def break_spacing(folder):
    path = folder / "000015.dcm"
    ds = pydicom.dcmread(path)
    ds.PixelSpacing = [2.0, 2.0]
    ds.save_as(path)


def break_position(folder):
    path = folder / "000005.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = list(ds.ImagePositionPatient)[:2]
    ds.save_as(path)


def break_orientation(folder):
    path = folder / "000008.dcm"
    ds = pydicom.dcmread(path)
    ds.ImageOrientationPatient = list(ds.ImageOrientationPatient)[:5]
    ds.save_as(path)


def break_rows(folder):
    edit_all(folder, lambda ds: setattr(ds, "Rows", ds.Rows // 2))


BREAKS = {
    "UNREADABLE": (break_unreadable, "unreadable DICOM file 000010.dcm"),
    "NONCT": (break_modality, "modality MR"),
    "NOPIXELS": (break_pixels, "no pixel data in 000012.dcm"),
    "DUPLICATE": (break_duplicate, "duplicated slice"),
    "MISSING": (break_missing, "missing slice"),
    "SPACING": (break_spacing, "inconsistent pixel spacing in 000015.dcm"),
    "POSITION": (break_position, "ImagePositionPatient of 000005.dcm is "),
    "ORIENTATION": (break_orientation, "ImageOrientationPatient of 000008.dcm is "),
    "ROWS": (break_rows, "pixel data of 000001.dcm has the shape"),
}


# A nodule annotated in the image corner, outside the scanner's circular field of view: uniform padding,
# so its mask comes out empty.
CORNER_NODULE = dict(coordX=-165.0, coordY=-165.0, coordZ=-200.0, diameter_mm=12.0)


@pytest.fixture(scope="module")
def broken_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    dicom = root / "dicom"
    rows, folders = [], {}
    for pid in ["GOOD1", "GOOD2", *BREAKS, "NOLUNG", "ANON"]:
        geometry, folder = write_scan(dicom, pid, lungs=pid not in ("NOLUNG", "ANON"))
        folders[pid] = folder
        for n in geometry.nodules:
            rows.append(dict(seriesuid=geometry.series_uid, coordX=n.center_mm[0], coordY=n.center_mm[1],
                             coordZ=n.center_mm[2], diameter_mm=n.diameter_mm))
        if pid == "GOOD2":
            rows.append(dict(seriesuid=geometry.series_uid, **CORNER_NODULE))
    for pid, (breaker, _) in BREAKS.items():
        breaker(folders[pid])
    blank_patient_id(folders["ANON"])
    rows.append(dict(seriesuid="1.2.826.0.1.3680043.99.99", coordX=0, coordY=0, coordZ=0, diameter_mm=10))
    pd.DataFrame(rows).to_csv(root / "annotations.csv", index=False)
    return root, folders


@pytest.mark.parametrize("pid", sorted(BREAKS))
def test_read_series_names_the_problem(broken_cohort, pid):
    _, folders = broken_cohort
    with pytest.raises(ScanRejected, match=BREAKS[pid][1]):
        read_series(folders[pid])


def test_a_degenerate_orientation_is_named(tmp_path):
    # Parallel direction cosines: no slice normal, so no order or tilt; named, not a NaN tilt or a singular matrix.
    _, folder = write_scan(tmp_path, "DEGENERATE")
    edit_all(folder, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))
    with pytest.raises(ScanRejected, match=r"ImageOrientationPatient of 000001.dcm is degenerate"):
        read_series(folder)


def test_workflow_rejects_each_bad_scan_and_finishes_the_others(broken_cohort, tmp_path):
    root, folders = broken_cohort
    config = yaml.safe_load(open(run_snakemake.__globals__["REPO"] / "config.yaml"))
    config["cohort"].update(source="dicom", dicom_root=str(root / "dicom"), annotations=str(root / "annotations.csv"))
    config["folds"]["k"] = 2
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    # The data half of the DAG is what bad input can break; the generators are tested elsewhere.
    run_snakemake(tmp_path, "results/cohort/manifest.tsv", "results/folds/folds.tsv",
                  "--configfile", str(tmp_path / "config.yaml"))

    rejected = pd.read_csv(tmp_path / "results/cohort/rejected.tsv", sep="\t", dtype=str).fillna("")
    reasons = dict(zip(rejected.scan_id, rejected.reason))
    # Turned away at discovery, before a scan id is given: keyed by the series folder under dicom_root.
    before = {pid: str(folders[pid].relative_to(root / "dicom")) for pid in ("UNREADABLE", "ANON")}
    for pid, (_, reason) in BREAKS.items():
        assert reason in reasons[before.get(pid, pid)], (pid, reasons.get(before.get(pid, pid)))
    assert reasons[before["ANON"]].startswith("empty PatientID")
    assert reasons["NOLUNG"].startswith("no lung found")
    assert reasons["1.2.826.0.1.3680043.99.99"] == "annotation for unknown series"

    manifest = pd.read_csv(tmp_path / "results/cohort/manifest.tsv", sep="\t", dtype={"scan_id": str})
    status = dict(zip(manifest.scan_id, manifest.status))
    assert status["GOOD1"] == status["GOOD2"] == "ok"
    assert set(status) == {"GOOD1", "GOOD2", "NOLUNG", *BREAKS} - {"UNREADABLE"}

    dropped = pd.read_csv(tmp_path / "results/cohort/dropped_nodules.tsv", sep="\t", dtype={"scan_id": str})
    assert dropped[["scan_id", "nodule"]].values.tolist() == [["GOOD2", 1]]
    assert dropped.reason[0].startswith("empty mask: no contrast")
    assert (tmp_path / "results/slices/GOOD1.dropped.tsv").is_file()
    for pid in ("GOOD1", "GOOD2"):
        with np.load(tmp_path / f"results/slices/{pid}.npz") as data:
            assert len(data["image"]) > 10 and data["has_nodule"].any()
    folds = pd.read_csv(tmp_path / "results/folds/folds.tsv", sep="\t", dtype=str)
    assert set(folds.patient_id) == {"GOOD1", "GOOD2"}  # rejected scans take no part in the study
    assert not list((tmp_path / "results").rglob(".*.tmp*"))  # nothing half-written remains


def test_a_nodule_with_an_empty_mask_is_recorded(tmp_path):
    from nodulesynth.masks.lesion_map import scan_lesion_maps
    from nodulesynth.masks.segment import MaskOptions

    geometry, folder = write_scan(tmp_path / "dicom", "P1")
    (n,) = geometry.nodules
    annotations = tmp_path / "annotations.csv"
    pd.DataFrame([dict(seriesuid=geometry.series_uid, coordX=n.center_mm[0], coordY=n.center_mm[1],
                       coordZ=n.center_mm[2], diameter_mm=n.diameter_mm),
                  dict(seriesuid=geometry.series_uid, **CORNER_NODULE)]).to_csv(annotations, index=False)
    status, reason = ingest_scan(ScanRecord("P1", "P1", geometry.series_uid, str(folder)), tmp_path / "vol.npz",
                                 annotations=annotations)
    assert status == "ok", reason
    stack, boxes, dropped = scan_lesion_maps(tmp_path / "vol.npz", MaskOptions())
    assert set(boxes.nodule) == {0}  # the real nodule is found, the corner one gives nothing
    assert dropped[["scan_id", "nodule"]].values.tolist() == [["P1", 1]]
    assert dropped.reason[0].startswith("empty mask: no contrast inside its sphere")


def test_a_scan_with_no_slice_of_enough_lung_is_rejected_not_an_empty_usable_stack(tmp_path):
    """An "ok" stack of no slice would be a usable scan of the fold plan, and stop every arm of its fold."""
    from nodulesynth.data.cohort import manifest
    from nodulesynth.data.slices import save_slices
    from nodulesynth.masks.lesion_map import scan_lesion_maps
    from nodulesynth.masks.segment import MaskOptions

    geometry, folder = write_scan(tmp_path / "dicom", "P1")
    ingest_scan(ScanRecord("P1", "P1", geometry.series_uid, str(folder)), tmp_path / "vol.npz")
    stack, _, _ = scan_lesion_maps(tmp_path / "vol.npz", MaskOptions(min_lung_area_mm2=1e9))
    assert stack.status == "rejected" and "masks.min_lung_area_mm2" in stack.reason
    save_slices(tmp_path / "P1.npz", stack)
    table, rejected = manifest(pd.DataFrame([dict(scan_id="P1", patient_id="P1", series_uid=geometry.series_uid)]),
                               [tmp_path / "P1.npz"])
    assert table.status.tolist() == ["rejected"] and "min_lung_area_mm2" in rejected.reason[0]


def test_an_annotation_outside_the_scan_rejects_it_unless_it_is_an_excluded_finding():
    """A nodule annotated outside the scan rejects the scan; a finding too small to count there is left out, as
    it would not be evaluated anyway. Findings under nodules.min_diameter_mm are kept apart, not dropped."""
    from nodulesynth.data.dicom_series import CANONICAL_ORIENTATION, CTVolume
    from nodulesynth.data.ingest import LUNA_COLUMNS, excluded_from_annotations, nodules_from_annotations

    z = np.arange(4) * 2.0
    volume = CTVolume(np.zeros((4, 8, 8), np.int16), z, (2.0, 1.0, 1.0), np.zeros(3), CANONICAL_ORIENTATION,
                      "P1", "1.2.3", "1.2", np.stack([np.zeros(4), np.zeros(4), z], 1))
    rows = pd.DataFrame([("1.2.3", 3, 5, 2, 5.0),      # a nodule: column 3, row 5, slice 1
                         ("1.2.3", 4, 4, 4, 2.0),      # too small: an excluded finding at slice 2
                         ("1.2.3", 100, 4, 4, 2.0),    # too small and outside: left out
                         ("9.9.9", 1, 1, 1, 2.0)], columns=LUNA_COLUMNS)  # another series
    np.testing.assert_allclose(nodules_from_annotations(volume, rows), [[0, 1, 5, 3, 5.0]])
    np.testing.assert_allclose(excluded_from_annotations(volume, rows), [[0, 2, 4, 4, 2.0]])
    outside = pd.concat([rows, pd.DataFrame([("1.2.3", 100, 4, 4, 6.0)], columns=LUNA_COLUMNS)])
    with pytest.raises(ScanRejected, match=r"annotation at \(100.0, 4.0, 4.0\) mm lies outside the scan"):
        nodules_from_annotations(volume, outside)
