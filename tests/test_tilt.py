"""Gantry tilt: a series whose slices are not stacked along the patient's z axis is rejected with its angle, or
(cohort.tilted: resample) resampled onto an axial grid where anatomy and world-coordinate nodules line up; also
when its slice spacing varies (cohort.variable_spacing: resample).

The tilted series are demo phantom series with their headers edited as tilted scanners write them: axial
ImageOrientationPatient with ImagePositionPatient shifted along y slice by slice (a sheared stack), or the
image plane itself tilted (column cosine out of the axial plane, positions along the slice normal).
"""

import logging

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid

from nodulesynth.cli import main
from nodulesynth.data.demo import write_phantom
from nodulesynth.data.dicom_series import CANONICAL_ORIENTATION, read_series
from nodulesynth.data.ingest import ScanRecord, ingest_scan
from nodulesynth.data.phantom import Nodule, PhantomGeometry
from nodulesynth import labels as L
from nodulesynth.masks.lesion_map import slice_stack
from nodulesynth.masks.segment import MaskOptions

TILT_DEG = 12.0
PIXEL_MM = 3.6
NODULE = Nodule((60.0, 10.0, -170.0), 16.0)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """One demo phantom series (96 px, 48 slices of 5 mm) with its true labels; the module's tests copy it."""
    out = tmp_path_factory.mktemp("phantom")
    geometry = PhantomGeometry(patient_id="TILT1", series_uid=generate_uid(), study_uid=generate_uid(),
                               z=np.arange(48) * 5.0 - 300, pixel_spacing=PIXEL_MM, image_size=96, nodules=[NODULE])
    folder = write_phantom(geometry, out, seed=3)
    return geometry, folder, np.load(out / "truth" / "TILT1.npz")["label"]


def copy_series(folder, dest, edit):
    dest.mkdir(parents=True)
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        edit(ds)
        ds.save_as(dest / path.name)
    return dest


def shear(z_ref):
    """Axial planes, positions shifted in y by (z - z_ref) tan(tilt): how many scanners write a tilted gantry."""
    def edit(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + (z - z_ref) * np.tan(np.radians(TILT_DEG)), z]
    return edit


def tilt_plane(z_ref):
    """The image plane tilted about x (column cosine out of the axial plane), slices stacked along its normal."""
    t = np.radians(TILT_DEG)
    col, normal = np.array([0, np.cos(t), np.sin(t)]), np.array([0, -np.sin(t), np.cos(t)])

    def edit(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImageOrientationPatient = [*map(float, ds.ImageOrientationPatient[:3]), *map(float, col)]
        centre = np.array([x, 0.0, z_ref]) + (z - z_ref) * normal  # each slice's centre row moves along the normal
        ds.ImagePositionPatient = [float(v) for v in centre + y * col]  # y: the first row's offset from the centre
    return edit


def sheared_annotation(geometry, z_ref):
    """The phantom nodule's world position once the stack is sheared: its pixels moved with their slice."""
    x, y, z = NODULE.center_mm
    y += (z - z_ref) * np.tan(np.radians(TILT_DEG))
    return pd.DataFrame([dict(seriesuid=geometry.series_uid, coordX=x, coordY=y, coordZ=z,
                              diameter_mm=NODULE.diameter_mm)])


def test_an_untilted_series_measures_no_tilt(phantom):
    _, folder, _ = phantom
    assert read_series(folder).tilt_deg < 0.01


@pytest.mark.parametrize("kind", ["sheared positions", "tilted plane"])
def test_a_tilted_series_is_rejected_with_its_angle(phantom, tmp_path, kind):
    geometry, folder, _ = phantom
    z_ref = float(np.median(geometry.z))
    edit = shear(z_ref) if kind == "sheared positions" else tilt_plane(z_ref)
    tilted = copy_series(folder, tmp_path / "tilted", edit)
    assert read_series(tilted).tilt_deg == pytest.approx(TILT_DEG, abs=0.05)
    sheared_annotation(geometry, z_ref).to_csv(tmp_path / "annotations.csv", index=False)
    status, reason = ingest_scan(ScanRecord("T", "T", "", str(tilted)), tmp_path / "vol.npz",
                                 annotations=tmp_path / "annotations.csv")
    assert status == "rejected" and f"gantry tilt of {TILT_DEG:.1f}°" in reason, reason
    with np.load(tmp_path / "vol.npz") as data:
        assert str(data["status"]) == "rejected" and str(data["reason"]) == reason


def row_centroids(hu):
    """Per slice, the row centroid of the tissue above air (weights HU + 1000): linear interpolation keeps it."""
    weight = np.clip(hu.astype(np.float64) + 1000, 0, None)
    rows = np.arange(hu.shape[1])[None, :, None]
    return (weight * rows).sum((1, 2)) / weight.sum((1, 2))


def test_resampling_puts_anatomy_and_nodules_where_the_headers_say(phantom, tmp_path):
    geometry, folder, truth = phantom
    z_ref = float(np.median(geometry.z))
    tilted = copy_series(folder, tmp_path / "tilted", shear(z_ref))
    sheared_annotation(geometry, z_ref).to_csv(tmp_path / "annotations.csv", index=False)
    volume_file = tmp_path / "vol.npz"
    status, note = ingest_scan(ScanRecord("T", "T", "", str(tilted)), volume_file,
                               annotations=tmp_path / "annotations.csv", tilted="resample")
    assert status == "ok" and f"{TILT_DEG:.1f}°" in note, note
    with np.load(volume_file) as data:
        hu, z, nodules = data["hu"], data["z"], data["nodules"]
        assert np.allclose(data["orientation"], CANONICAL_ORIENTATION)
        assert np.allclose(data["spacing"], (5.0, PIXEL_MM, PIXEL_MM))
    assert hu.shape == truth.shape and np.allclose(z, geometry.z)

    # Each stored slice moved by its own y shift: the tissue's row centroid drifts by tan(tilt) / pixel per mm of z.
    shift = row_centroids(hu) - row_centroids(read_series(folder).hu)
    slope, intercept = np.polyfit(z, shift, 1)
    assert slope == pytest.approx(np.tan(np.radians(TILT_DEG)) / PIXEL_MM, rel=0.03)
    assert np.abs(shift - (slope * z + intercept)).max() < 0.3

    # The world-coordinate nodule lands on the nodule, not on lung; read as if axial it would have missed it.
    s, r, c = np.rint(nodules[0, 1:4]).astype(int)
    assert hu[s, r - 1:r + 2, c - 1:c + 2].mean() > -300
    naive = read_series(tilted).world_to_voxel(sheared_annotation(geometry, z_ref).iloc[0, 1:4].to_numpy(float))
    s0, r0, c0 = np.rint(naive).astype(int)
    assert truth[s0, r0, c0] != L.NODULE

    stack, boxes = slice_stack(volume_file, MaskOptions())
    assert stack.status == "ok" and len(boxes) > 0
    assert (stack.label == L.LEFT_LUNG).any() and (stack.label == L.RIGHT_LUNG).any()
    box = boxes[boxes.slice_index == s]
    assert len(box) == 1 and box.x0.iloc[0] <= c < box.x1.iloc[0] and box.y0.iloc[0] <= r < box.y1.iloc[0]


def test_the_ingest_command_takes_cohort_tilted(phantom, tmp_path, caplog):
    geometry, folder, _ = phantom
    z_ref = float(np.median(geometry.z))
    tilted = copy_series(folder, tmp_path / "tilted", shear(z_ref))
    sheared_annotation(geometry, z_ref).to_csv(tmp_path / "annotations.csv", index=False)
    pd.DataFrame([dict(scan_id="T", patient_id="T", series_uid=geometry.series_uid, dicom_dir=str(tilted))]).to_csv(
        tmp_path / "scans.tsv", sep="\t", index=False)
    common = ["ingest", "--scans", str(tmp_path / "scans.tsv"), "--scan", "T",
              "--annotations", str(tmp_path / "annotations.csv"), "--out", str(tmp_path / "vol.npz")]
    assert main(common) == 0
    assert str(np.load(tmp_path / "vol.npz")["status"]) == "rejected"
    assert main([*common, "--params", '{"tilted": "resample"}']) == 0
    assert str(np.load(tmp_path / "vol.npz")["status"]) == "ok"
    caplog.clear()
    assert main([*common, "--params", '{"tilted": "sideways"}']) == 1
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "cohort.tilted" in record.getMessage()


def test_a_tilted_series_whose_spacing_varies_is_resampled_on_both(phantom, tmp_path):
    """Slices dropped from the sheared stack so its gaps are 5, 10 and 15 mm (common 10 mm: 5 and 15 are no whole
    multiple of it): resampled onto its finest spacing, the phantom's 5 mm grid, then onto an axial grid; the
    world-coordinate nodule still lands on the nodule."""
    geometry, folder, truth = phantom
    z_ref = float(np.median(geometry.z))
    keep = [0, 1, 2, 3, 5, 7, 9, 12, 14, 16, 18, 20, 22, 25, 27, 29, 31, 33, 35, 38, 40, 42, 44, 46, 47]
    tilted = copy_series(folder, tmp_path / "tilted", shear(z_ref))
    for path in sorted(tilted.glob("*.dcm")):
        if int(np.rint((float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2]) + 300) / 5)) \
                not in keep:
            path.unlink()
    sheared_annotation(geometry, z_ref).to_csv(tmp_path / "annotations.csv", index=False)
    volume_file = tmp_path / "vol.npz"
    status, note = ingest_scan(ScanRecord("T", "T", "", str(tilted)), volume_file,
                               annotations=tmp_path / "annotations.csv", tilted="reject", variable_spacing="resample")
    assert status == "rejected" and "gantry tilt" in note, note  # regular now, but still tilted
    status, note = ingest_scan(ScanRecord("T", "T", "", str(tilted)), volume_file,
                               annotations=tmp_path / "annotations.csv", tilted="resample", variable_spacing="resample")
    assert status == "ok", note
    assert note.startswith("resampled onto a regular 5.00 mm slice spacing from a spacing varying from 5.00 to "
                           "15.00 mm; resampled onto an axial grid from a gantry tilt of 12.0°"), note
    with np.load(volume_file) as data:
        hu, z, nodules = data["hu"], data["z"], data["nodules"]
        assert np.allclose(data["spacing"], (5.0, PIXEL_MM, PIXEL_MM))
    assert hu.shape == truth.shape and np.allclose(z, geometry.z)
    s, r, c = np.rint(nodules[0, 1:4]).astype(int)
    assert hu[s, r - 1:r + 2, c - 1:c + 2].mean() > -300


@pytest.mark.parametrize("orientation", [(1.0, 0, 0, 0, 1, 0), (-1.0, 0, 0, 0, -1, 0)])
def test_a_drift_within_the_tilt_tolerance_moves_no_nodule(orientation):
    """Slice positions drifting 0.4° in y (within TILT_TOLERANCE_DEG: reoriented, not resampled) leave every pixel
    where it was, so a nodule given in the stored pixels (pylidc's) keeps its pixel: not 2.8 mm off at the far end."""
    from nodulesynth.data.dicom_series import TILT_TOLERANCE_DEG, CTVolume, axial_volume
    from nodulesynth.data.ingest import nodules_onto

    n, step, pixel = 150, 2.0, 0.7
    drift = np.tan(np.radians(0.4)) * step
    positions = np.column_stack([np.full(n, -180.0), -180.0 + np.arange(n) * drift, -300 + np.arange(n) * step])
    hu = np.random.default_rng(0).integers(-1000, 400, (n, 64, 64)).astype(np.int16)
    stored = CTVolume(hu=hu, z=positions[:, 2], spacing=(step, pixel, pixel), origin=positions[0],
                      orientation=np.array(orientation), patient_id="P", series_uid="1.2", study_uid="1.3",
                      positions=positions)
    assert 0.3 < stored.tilt_deg <= TILT_TOLERANCE_DEG
    volume = axial_volume(stored)
    nodule = [0, 140.0, 20.0, 50.0, 10.0]
    moved = nodules_onto([nodule], stored, volume)[0]
    # the same voxel's value, wherever the reorientation put it
    s, r, c = (int(round(v)) for v in moved[1:4])
    assert s == 140 and hu[140, 20, 50] == volume.hu[s, r, c]
    assert np.allclose(moved[[1, 4]], [140.0, 10.0])
