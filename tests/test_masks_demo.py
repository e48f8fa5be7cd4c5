"""Lesion maps of the demo phantoms against their true label volumes (issue acceptance: Dice per class)."""

import numpy as np
import pytest

from conftest import dice, process_scan
from nodulesynth import labels as L

THRESHOLDS = {L.LEFT_LUNG: 0.95, L.RIGHT_LUNG: 0.95, L.BODY: 0.97, L.TRACHEA: 0.80, L.NODULE: 0.80}


def truth_of(demo_cohort, geometry, slice_index):
    out, _ = demo_cohort
    return np.load(out / "truth" / f"{geometry.patient_id}.npz")["label"][slice_index]


def test_every_class_matches_the_phantom_truth(demo_cohort, demo_processed):
    for geometry, _, stack, _ in demo_processed:
        assert stack.status == "ok", stack.reason
        truth = truth_of(demo_cohort, geometry, stack.slice_index)
        for c, minimum in THRESHOLDS.items():
            score = dice(stack.label == c, truth == c)
            assert score >= minimum, f"{geometry.patient_id} {L.NAMES[c]}: {score:.3f}"


def test_left_and_right_are_never_swapped(demo_cohort, demo_processed):
    for geometry, _, stack, _ in demo_processed:
        truth = truth_of(demo_cohort, geometry, stack.slice_index)
        for k in range(len(stack)):
            pred_left, true_left = stack.label[k] == L.LEFT_LUNG, truth[k] == L.LEFT_LUNG
            true_right = truth[k] == L.RIGHT_LUNG
            # No predicted left-lung pixel may sit mostly in the true right lung.
            assert (pred_left & true_right).sum() <= 0.05 * max(pred_left.sum(), 1)
            assert (pred_left & true_left).sum() >= 0.9 * pred_left.sum()


def test_only_lung_slices_are_kept_and_nodule_boxes_match_labels(demo_cohort, demo_processed):
    for geometry, _, stack, boxes in demo_processed:
        assert ((stack.label == L.LEFT_LUNG) | (stack.label == L.RIGHT_LUNG)).any((1, 2)).all()
        full = np.load(demo_cohort[0] / "truth" / f"{geometry.patient_id}.npz")["label"]
        dropped = np.setdiff1d(np.arange(len(full)), stack.slice_index)
        lung_area = np.isin(full[dropped], [L.LEFT_LUNG, L.RIGHT_LUNG]).sum((1, 2))
        assert (lung_area < 20).all()  # what was dropped held (almost) no lung
        assert stack.has_nodule.sum() > 0
        for row in boxes.itertuples():
            k = int(np.flatnonzero(stack.slice_index == row.slice_index)[0])
            ys, xs = np.nonzero(stack.label[k] == L.NODULE)
            assert xs.min() <= row.x0 < row.x1 <= xs.max() + 1 and ys.min() <= row.y0 < row.y1 <= ys.max() + 1


@pytest.mark.parametrize("flip", [True])
def test_flipped_orientation_keeps_patient_sides(tmp_path, demo_cohort, flip):
    """A series whose rows run toward the patient's right: ingestion brings it to the canonical orientation,
    so the labels follow the patient and the patient's left lung lies on the image's right either way."""
    from dataclasses import replace

    from nodulesynth.data.demo import annotations_frame, write_phantom

    _, geometries = demo_cohort
    geometry = replace(geometries[0], flip_columns=flip)
    folder = write_phantom(geometry, tmp_path, seed=0)
    annotations_frame([geometry]).to_csv(tmp_path / "annotations.csv", index=False)
    _, stack, _ = process_scan(folder, geometry.patient_id, tmp_path / "annotations.csv", tmp_path / "out")
    truth = np.load(tmp_path / "truth" / f"{geometry.patient_id}.npz")["label"][stack.slice_index]
    if flip:  # the truth is stored as the series was: flipped columns
        truth = truth[:, :, ::-1]
    assert dice(stack.label == L.LEFT_LUNG, truth == L.LEFT_LUNG) >= 0.95
    assert dice(stack.label == L.RIGHT_LUNG, truth == L.RIGHT_LUNG) >= 0.95
    cols = np.nonzero(stack.label == L.LEFT_LUNG)[2]
    assert cols.mean() > stack.label.shape[2] / 2  # canonical orientation: the left lung on the image's right


def test_slice_info_reads_what_load_slices_reads(demo_processed, tmp_path):
    """The manifest and training_scans.tsv read stacks through load_slice_info (no images)."""
    from nodulesynth.data.slices import SliceStack, load_slice_info, load_slices, save_slices

    rejected = tmp_path / "rejected.npz"
    save_slices(rejected, SliceStack.rejected("S9", "P9", "no lung"))
    for path in [p for _, p, _, _ in demo_processed[:3]] + [rejected]:
        stack, info = load_slices(path), load_slice_info(path)
        assert (info["scan_id"], info["patient_id"], info["status"], info["reason"], info["slices"]) == \
               (stack.scan_id, stack.patient_id, stack.status, stack.reason, len(stack))
        assert info["extra"].keys() == stack.extra.keys()
        for key, value in stack.extra.items():
            assert np.array_equal(info["extra"][key], value)
    assert load_slice_info(rejected)["status"] == "rejected" and load_slice_info(rejected)["slices"] == 0
    first = load_slice_info(demo_processed[0][1])
    assert first["slices"] > 0 and "spacing" in first["extra"]


def test_a_finding_too_small_to_count_is_kept_apart_and_ignored_by_the_froc(tmp_path, demo_cohort):
    """An annotation under nodules.min_diameter_mm is no nodule (no mask, no box) but is kept as an excluded
    finding: ingest stores it, masks boxes its disc on the slices that cut it ({scan}.excluded.tsv), the arm's
    SliceSet carries it, and the per-nodule FROC counts a detection on it neither as a hit nor as an FP."""
    import pandas as pd

    from nodulesynth.data.demo import annotations_frame
    from nodulesynth.downstream.datasets import real_slices, synthetic_slices
    from nodulesynth.downstream.metrics import froc_curve
    from nodulesynth.masks.lesion_map import excluded_boxes

    out, geometries = demo_cohort
    geometry = geometries[0]
    folder = out / "dicom" / geometry.patient_id / geometry.series_uid
    frame = annotations_frame([geometry])
    first = frame.iloc[0]
    z = float(np.asarray(geometry.z)[np.argmin(np.abs(np.asarray(geometry.z) - first.coordZ))])  # on a slice
    small = dict(seriesuid=first.seriesuid, coordX=first.coordX + first.diameter_mm + 10, coordY=first.coordY,
                 coordZ=z, diameter_mm=2.0)
    pd.concat([frame, pd.DataFrame([small])]).to_csv(tmp_path / "annotations.csv", index=False)
    _, stack, boxes = process_scan(folder, geometry.patient_id, tmp_path / "annotations.csv", tmp_path / "out")
    volume = tmp_path / "out" / "volumes" / f"{geometry.patient_id}.npz"
    with np.load(volume) as data:
        assert len(data["nodules"]) == len(frame) and data["excluded"].shape == (1, 5)
        _, slice_, row, column, diameter = data["excluded"][0]
    assert diameter == 2.0 and set(boxes.nodule) == set(range(len(frame)))

    table = excluded_boxes(volume, stack.slice_index, stack.z)
    assert len(table) >= 1 and (table.finding == 0).all()
    assert set(table.slice_index) <= set(stack.slice_index.tolist()) and round(slice_) in set(table.slice_index)
    on_centre = table[table.slice_index == round(slice_)].iloc[0]
    np.testing.assert_allclose([(on_centre.x0 + on_centre.x1) / 2, (on_centre.y0 + on_centre.y1) / 2],
                               [column + 0.5, row + 0.5], atol=0.01)

    test = real_slices(stack, boxes, 64, table)
    assert len(test.excluded) == len(table)
    # at 64 px every (slice, nodule) of nodules.tsv keeps a box named by its nodule, the same boxes as the same
    # maps drawn as synthetic slices
    assert set(zip(test.slice_index[test.boxes[:, 0].astype(int)].tolist(), test.box_nodule.tolist())) == \
        set(zip(boxes.slice_index.tolist(), boxes.nodule.tolist()))
    np.testing.assert_array_equal(test.boxes, synthetic_slices(stack, "sdm", 64).boxes)
    scan_id = str(test.scan_id[0])
    on_finding = [(scan_id, slice_index, *box, 0.9) for slice_index, *box in
                  ((s, x0, y0, x1, y1) for _, s, x0, y0, x1, y1 in test.excluded_rows())]
    fps, _ = froc_curve(test.nodule_rows(), on_finding, [scan_id], test.excluded_rows())
    assert fps.max() == 0
    fps, _ = froc_curve(test.nodule_rows(), on_finding, [scan_id])
    assert fps.max() == 1  # without the record it is one false positive (its boxes on adjacent slices: one candidate)


def test_demo_nodules_can_be_drawn_larger_at_their_real_heights():
    """cohort.demo.min_nodule_diameter_mm: a nodule under the size is drawn, and annotated, at it; the others
    keep their diameters, every nodule its height (where it lies in the slice is place_nodules_in_lung's)."""
    from scipy import ndimage

    from nodulesynth.data.demo import annotations_frame, demo_geometries
    from nodulesynth.data.phantom import render

    real = demo_geometries(n_scans=2, image_size=64)
    large = demo_geometries(n_scans=2, image_size=64, min_nodule_diameter_mm=20.0)
    real_rows, large_rows = annotations_frame(real), annotations_frame(large)
    assert (real_rows.diameter_mm < 20).any() and (real_rows.diameter_mm >= 20).any()  # both kinds are here
    assert large_rows[["seriesuid", "coordZ"]].equals(real_rows[["seriesuid", "coordZ"]])
    assert np.allclose(large_rows.diameter_mm, np.maximum(real_rows.diameter_mm, 20.0))
    # Drawn at that size: every nodule's widest slice spans at least the minor axes' 0.65 of 20 mm.
    for geometry in large:
        _, truth = render(geometry)
        nodule = truth == L.NODULE
        widest = max(max(s[0].stop - s[0].start, s[1].stop - s[1].start)
                     for k in range(len(truth)) for s in ndimage.find_objects(ndimage.label(nodule[k])[0]))
        assert widest * geometry.pixel_spacing >= 0.65 * 20.0 - geometry.pixel_spacing


def test_nodules_are_drawn_inside_the_phantom_lung_and_those_already_there_stay():
    """A real centre the phantom's elliptic lungs do not hold deep inside (here: in the chest wall, in the
    spine, under the table) moves into a lung, at its height and size; the nodule is then surrounded by lung,
    where before it was soft tissue on soft tissue. A centre deep in the lung is kept as it was."""
    from scipy import ndimage

    from nodulesynth.data.phantom import Nodule, PhantomGeometry, place_nodules_in_lung, render

    z = np.arange(-120.0, 120.0, 2.5)
    deep = Nodule((70.0, 0.0, -10.0), 10.0)                      # the patient's left lung, near its middle
    astray = [Nodule((150.0, -20.0, 20.0), 12.0),                 # beyond the left lung, in the chest wall
              Nodule((-5.0, 95.0, 0.0), 8.0),                      # behind the mediastinum, in the spine
              Nodule((-60.0, 170.0, 40.0), 20.0)]                  # below the body, on the table
    geometry = PhantomGeometry("P", "1.2.3", "1.2.4", z, pixel_spacing=350 / 128, image_size=128,
                               nodules=[deep, *astray])
    placed = place_nodules_in_lung(geometry, seed=4)
    assert placed.nodules[0] == deep
    for before, after in zip(astray, placed.nodules[1:]):
        assert after.center_mm != before.center_mm
        assert after.center_mm[2] == before.center_mm[2] and after.diameter_mm == before.diameter_mm

    def surroundings(geometry):
        """Per nodule, the share of lung among the pixels just around it, over the slices through it."""
        _, truth = render(geometry, seed=4)
        shares = []
        for nod in geometry.nodules:
            k = int(np.argmin(np.abs(z - nod.center_mm[2])))
            one = ndimage.label(truth[k] == L.NODULE)[0]
            centre = (np.array(nod.center_mm[1::-1]) / geometry.pixel_spacing + (geometry.image_size - 1) / 2)
            piece = one == one[tuple(np.round(centre).astype(int))]
            ring = ndimage.binary_dilation(piece, iterations=2) & ~piece
            shares.append(np.isin(truth[k][ring], (L.LEFT_LUNG, L.RIGHT_LUNG)).mean())
        return shares

    before, after = surroundings(geometry), surroundings(placed)
    assert after[0] == before[0] and after[0] > 0.9
    assert min(before[1:]) < 0.5           # drawn where the real scan had them, one at least sat in tissue
    assert min(after) > 0.9                # placed: every nodule is in lung


def test_luna16_excluded_findings_are_ignored_by_the_froc_whatever_their_size(tmp_path, demo_cohort):
    """cohort.annotations_excluded (LUNA16's annotations_excluded.csv), through `nodulesynth ingest`: its rows
    of the series become excluded findings beside the annotations under the minimum diameter, a sized one at
    its size even when large enough to count, an unsized one (diameter -1) at 10 mm; rows of other series
    are ignored; masks box them all, and the FROC ignores detections on them."""
    import json

    import pandas as pd

    from nodulesynth.cli import main
    from nodulesynth.data.demo import annotations_frame
    from nodulesynth.downstream.datasets import real_slices
    from nodulesynth.downstream.metrics import froc_curve
    from nodulesynth.masks.lesion_map import excluded_boxes, slice_stack
    from nodulesynth.masks.segment import MaskOptions

    out, geometries = demo_cohort
    geometry = geometries[0]
    frame = annotations_frame([geometry])
    frame.to_csv(tmp_path / "annotations.csv", index=False)
    first, z = frame.iloc[0], np.asarray(geometry.z)
    on_slice = float(z[len(z) // 2])
    listed = pd.DataFrame([
        dict(seriesuid=geometry.series_uid, coordX=first.coordX - 40, coordY=first.coordY, coordZ=on_slice,
             diameter_mm=-1.0),
        dict(seriesuid=geometry.series_uid, coordX=first.coordX - 40, coordY=first.coordY - 30, coordZ=on_slice,
             diameter_mm=6.0),
        dict(seriesuid="1.2.3.4", coordX=0.0, coordY=0.0, coordZ=0.0, diameter_mm=5.0),
    ])
    listed.to_csv(tmp_path / "annotations_excluded.csv", index=False)
    folder = out / "dicom" / geometry.patient_id / geometry.series_uid
    pd.DataFrame([dict(scan_id="s0", patient_id=geometry.patient_id, series_uid=geometry.series_uid,
                       dicom_dir=str(folder))]).to_csv(tmp_path / "scans.tsv", sep="\t", index=False)
    volume = tmp_path / "s0.npz"
    params = {"source": "dicom", "annotations_excluded": str(tmp_path / "annotations_excluded.csv")}
    main(["ingest", "--scans", str(tmp_path / "scans.tsv"), "--scan", "s0", "--annotations",
          str(tmp_path / "annotations.csv"), "--params", json.dumps(params), "--out", str(volume)])
    with np.load(volume) as data:
        assert len(data["nodules"]) == len(frame)
        excluded = data["excluded"]
    assert excluded[:, 0].tolist() == [0, 1] and excluded[:, 4].tolist() == [10.0, 6.0]

    stack, boxes = slice_stack(volume, MaskOptions())
    table = excluded_boxes(volume, stack.slice_index, stack.z)
    assert set(table.finding) == {0, 1}
    centre = table[(table.finding == 0) & (table.slice_index == round(excluded[0, 1]))].iloc[0]
    spacing = geometry.pixel_spacing
    assert (centre.x1 - centre.x0) * spacing == pytest.approx(10.0, abs=0.1)  # the unsized finding's 10 mm
    test = real_slices(stack, boxes, 64, table)
    scan_id = str(test.scan_id[0])
    on_findings = [(scan_id, s, x0, y0, x1, y1, 0.9) for _, s, x0, y0, x1, y1 in test.excluded_rows()]
    assert froc_curve(test.nodule_rows(), on_findings, [scan_id], test.excluded_rows())[0].max() == 0
    assert froc_curve(test.nodule_rows(), on_findings, [scan_id])[0].max() == 2  # two findings: two FPs without
