"""Every DICOM file under a folder, whatever the layout: headers read (never pixels), files grouped into series by
SeriesInstanceUID, each series classified (an axial CT scan, or a localizer, dose report, secondary capture,
reformat, another modality or a non-image object to skip), and one reconstruction of each acquisition chosen.

What a PACS export or a public archive holds, as dcm2niix, SimpleITK's series reader and 3D Slicer's DICOM
browser take it: series split over folders, several series in one folder, scouts beside the axial images,
several reconstructions (kernels, thicknesses) of one acquisition, multi-frame Enhanced CT, a DICOMDIR, a
directory file in every folder (Philips' DIRFILE), objects that are no image and name no series, and files that
are no DICOM at all.
"""

import os
import re
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pydicom
from pydicom.filereader import read_partial
from pydicom.tag import Tag
from pydicom.uid import UID

from nodulesynth.data.dicom_series import AXIAL_LIMIT_DEG, MEDIA_STORAGE_DIRECTORY, is_non_dicom_name, plane_tilt_deg
from nodulesynth.data.multiframe import CT_IMAGE_CLASSES, frame_count, frame_value, is_multiframe
from nodulesynth.errors import InputError

DICOMDIR_NAME = "dicomdir"

# Series and image kinds. Only AXIAL (and CT whose orientation is missing, which ingestion then rejects with
# the reason) are scans; the others are skipped and counted, never rejected as scans.
AXIAL, NO_ORIENTATION = "axial CT", "CT without orientation"
LOCALIZER, DOSE, SECONDARY = "localizer", "dose report", "secondary capture"
REFORMAT, OTHER_IMAGE, NON_IMAGE = "non-axial CT", "other modality", "non-image object"
DIRECTORY = "directory"  # the Media Storage Directory class: a DICOMDIR, or a DIRFILE whatever its name
SCAN_KINDS = (AXIAL, NO_ORIENTATION)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STRUCTURED_REPORT = "1.2.840.10008.5.1.4.1.1.88."
DOSE_TEXT = re.compile(r"\bdose\b|dose report|dose info|patient protocol", re.IGNORECASE)

RECONSTRUCTION_RULES = "all | thinnest | kernel:<regex>"
# A classic header needs nothing past FrameOfReferenceUID (0020,0052): reading stops there, before the image
# pixel module, overlays and private blocks; and at group 0004, the records of a directory file (whose class is
# in its file meta information). A multi-frame file (told by its SOP class) is read again whole, without pixel
# data, for its functional groups.
_LAST_TAG = Tag(0x0020, 0x0052)
_DIRECTORY_GROUP = 0x0004
PARALLEL_MIN_FILES = 1000  # below this, starting worker processes costs more than it saves


class Header(NamedTuple):
    """What discovery needs of one file (small: a 100,000-file cohort is held in memory). A readable file with
    no series_uid (and no error) is an object that is no CT image and names no series (a directory file, raw
    data): skipped and counted, never a lost slice."""
    path: str
    error: str = ""                 # why the file cannot be read; empty when it can
    sop_class: str = ""
    modality: str = ""
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    frame_uid: str = ""
    series_number: int | None = None
    image_type: tuple = ()
    description: str = ""
    orientation: tuple | None = None  # ImageOrientationPatient (of the first frame)
    positions: tuple = ()             # ImagePositionPatient of each frame
    thickness: float | None = None
    kernel: str = ""
    frames: int = 1
    foreign: bool = False             # unreadable, and a text file not named as DICOM: a note, not a lost slice


@dataclass
class Listing:
    files: list                               # candidate DICOM files, sorted
    dicomdirs: list = field(default_factory=list)
    ignored: int = 0                          # files skipped by name (dicom_series.is_non_dicom_name)


def list_files(root) -> Listing:
    """Walk `root` to any depth (links to folders are not followed: no loops). Folders and files sorted."""
    listing = Listing([])
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            path = os.path.join(folder, name)
            if name.lower() == DICOMDIR_NAME:
                listing.dicomdirs.append(path)
            elif is_non_dicom_name(name):
                listing.ignored += 1
            else:
                listing.files.append(path)
    return listing


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


_KEYWORDS = ("SOPClassUID", "Modality", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
             "SeriesNumber", "ImageType", "SeriesDescription", "ImagePositionPatient", "ImageOrientationPatient",
             "SliceThickness", "ConvolutionKernel")
_TAGS = {keyword: Tag(keyword) for keyword in _KEYWORDS}


def _get(ds, keyword) -> str:
    """A text attribute as a string ("\\" between values). Taken from the raw bytes where pydicom has not yet
    converted it: the conversion would be a third of the time a header takes (every attribute used is text)."""
    element = ds.get_item(_TAGS[keyword])
    if element is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            value = value.decode("latin-1")
        return "\\".join(v.strip(" \0") for v in value.split("\\")).strip("\\")
    return _text(value)


def _floats(text, n):
    parts = text.split("\\") if text else []
    try:
        return tuple(float(v) for v in parts) if len(parts) == n else None
    except ValueError:
        return None


def _number(text):
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _header_of(path, ds) -> Header:
    sop_class = _get(ds, "SOPClassUID") or str(getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", "") or "")
    series_uid = _get(ds, "SeriesInstanceUID")
    if not series_uid:
        # Only a CT image can be a slice of a scan (image_kind), so a readable object of another class is no lost
        # slice whatever it names: a directory file, a presentation state, a key object, raw data. One of a CT
        # class, or of no class, may be a damaged slice.
        if sop_class and sop_class not in CT_IMAGE_CLASSES:
            return Header(path, sop_class=sop_class, modality=_get(ds, "Modality"), patient_id=_get(ds, "PatientID"),
                          description=_get(ds, "SeriesDescription"))
        return Header(path, error="no SeriesInstanceUID", sop_class=sop_class)
    if is_multiframe(ds):
        frames = frame_count(ds)
        positions = tuple(_floats(_text(frame_value(ds, i, "ImagePositionPatient")), 3) for i in range(frames))
        positions = tuple(p for p in positions if p is not None)

        def value(keyword):
            return _text(frame_value(ds, 0, keyword))
    else:
        frames = 1
        position = _floats(_get(ds, "ImagePositionPatient"), 3)
        positions = (position,) if position else ()

        def value(keyword):
            return _get(ds, keyword)

    number = _number(_get(ds, "SeriesNumber"))
    return Header(
        path=path, sop_class=sop_class, modality=_get(ds, "Modality"), patient_id=_get(ds, "PatientID"),
        study_uid=_get(ds, "StudyInstanceUID"), series_uid=series_uid, frame_uid=_get(ds, "FrameOfReferenceUID"),
        series_number=None if number is None else int(number),
        image_type=tuple(v.strip().upper() for v in _get(ds, "ImageType").split("\\") if v.strip()),
        description=_get(ds, "SeriesDescription"), orientation=_floats(value("ImageOrientationPatient"), 6),
        positions=positions, thickness=_number(value("SliceThickness")), kernel=value("ConvolutionKernel"),
        frames=frames)


def read_header(path) -> Header:
    """One file's Header; an unreadable file gives a Header whose `error` says why."""
    try:
        with open(path, "rb") as fh:
            ds = read_partial(fh, stop_when=lambda tag, vr, length: tag > _LAST_TAG or tag.group == _DIRECTORY_GROUP)
        if is_multiframe(ds):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        return _header_of(path, ds)
    except Exception as err:  # truncated, corrupt or foreign files raise many kinds of errors
        return Header(path, error=f"{type(err).__name__}: {err}", foreign=_is_foreign(path))


DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}


def _is_foreign(path) -> bool:
    """An unreadable file that is plain text and not named as DICOM (an ATTRIBUTION or a notes file without a
    suffix) is no lost slice; a binary or zero-filled one, or one named .dcm, may be a truncated slice."""
    if os.path.splitext(path)[1].lower() in DICOM_SUFFIXES:
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
        text = head.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return bool(head) and all(c.isprintable() or c in "\r\n\t" for c in text)


def read_headers(paths, workers: int = 1) -> list:
    """Headers of `paths` in order; in `workers` processes when there are enough files for it to pay
    (header parsing is pure Python, so threads would queue on the interpreter lock)."""
    paths = list(paths)
    if workers <= 1 or len(paths) < PARALLEL_MIN_FILES:
        return [read_header(p) for p in paths]
    chunk = max(64, len(paths) // (workers * 16))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(read_header, paths, chunksize=chunk))


def is_axial(orientation) -> bool:
    """True when the slice normal lies within AXIAL_LIMIT_DEG of the patient's z axis: axial, tilted or not
    (ingestion measures a tilt and rejects or resamples it); further off, a coronal or sagittal image."""
    return bool(plane_tilt_deg(orientation) <= AXIAL_LIMIT_DEG)  # False for NaN, a degenerate orientation


def _is_dose(h: Header) -> bool:
    return any("DOSE" in v for v in h.image_type) or bool(DOSE_TEXT.search(h.description))


def image_kind(h: Header) -> str:
    """The kind of one readable file's object."""
    sop = h.sop_class
    if sop == MEDIA_STORAGE_DIRECTORY:
        return DIRECTORY
    if sop in CT_IMAGE_CLASSES:
        if "LOCALIZER" in h.image_type:
            return LOCALIZER
        if _is_dose(h):
            return DOSE
        if h.orientation is None:
            return NO_ORIENTATION
        return AXIAL if is_axial(h.orientation) else REFORMAT
    if sop.startswith(STRUCTURED_REPORT):
        return DOSE if _is_dose(h) or "Dose" in UID(sop).name else NON_IMAGE
    if sop == SECONDARY_CAPTURE or sop.startswith(SECONDARY_CAPTURE + "."):
        return DOSE if _is_dose(h) else SECONDARY
    return OTHER_IMAGE if "Image Storage" in UID(sop).name else NON_IMAGE


@dataclass
class Series:
    """One SeriesInstanceUID: the images that make its scan (every image, for a skipped kind) and the images of
    the series left out of the scan, by kind (a scout stored inside the axial series)."""
    uid: str
    kind: str
    headers: list
    left_out: Counter = field(default_factory=Counter)

    @property
    def first(self) -> Header:
        return self.headers[0]

    @property
    def files(self) -> list:
        return [h.path for h in self.headers]

    @property
    def folders(self) -> list:
        return sorted({os.path.dirname(h.path) for h in self.headers})

    @property
    def slices(self) -> int:
        return sum(h.frames for h in self.headers)

    @property
    def kernel(self) -> str:
        return next((h.kernel for h in self.headers if h.kernel), "")

    @property
    def thickness(self) -> float | None:
        """SliceThickness (median over the images), else the median step between slice positions."""
        values = [h.thickness for h in self.headers if h.thickness]
        if values:
            return float(np.median(values))
        orientation = self.first.orientation
        positions = [p for h in self.headers for p in h.positions]
        if orientation is None or len(positions) < 2:
            return None
        normal = np.cross(orientation[:3], orientation[3:])
        steps = np.diff(np.sort(np.asarray(positions) @ normal))
        steps = steps[steps > 1e-3]
        return float(np.median(steps)) if len(steps) else None


def _series_of(uid, headers) -> Series:
    kinds = [image_kind(h) for h in headers]
    counts = Counter(kinds)
    if counts[AXIAL]:
        keep = {AXIAL, NO_ORIENTATION}
        # One image of another orientation beside axial ones is a scout stored in the series; several are not
        # (ingestion rejects the series for its inconsistent orientation rather than guessing).
        if counts[REFORMAT] > 1:
            keep.add(REFORMAT)
        scan = [h for h, k in zip(headers, kinds) if k in keep]
        return Series(uid, AXIAL, scan, Counter(k for k in kinds if k not in keep))
    if counts[NO_ORIENTATION]:
        return Series(uid, NO_ORIENTATION, headers)
    if counts[LOCALIZER] or (counts[REFORMAT] and sum(h.frames for h in headers) == 1):
        return Series(uid, LOCALIZER, headers)
    return Series(uid, counts.most_common(1)[0][0], headers)


def group_series(headers) -> tuple:
    """([Series] ordered by UID, [unreadable Header], Counter of the kinds of the readable objects that name no
    series: directory files, raw data, ...) from the headers of every file."""
    by_uid, unreadable, outside = {}, [], Counter()
    for h in headers:
        if h.foreign:
            continue
        if h.error:
            unreadable.append(h)
        elif not h.series_uid:
            outside[image_kind(h)] += 1
        else:
            by_uid.setdefault(h.series_uid, []).append(h)
    return [_series_of(uid, by_uid[uid]) for uid in sorted(by_uid)], unreadable, outside


def parse_reconstruction(rule: str) -> tuple:
    """("all" | "thinnest" | "kernel", compiled regex or None); a bad rule raises naming the key."""
    rule = str(rule or "").strip()
    if rule in ("all", "thinnest"):
        return rule, None
    if rule.startswith("kernel:") and rule[len("kernel:"):]:
        try:
            return "kernel", re.compile(rule[len("kernel:"):], re.IGNORECASE)
        except re.error as err:
            raise InputError(f"cohort.reconstruction {rule!r}: bad regular expression: {err}") from err
    raise InputError(f"cohort.reconstruction must be {RECONSTRUCTION_RULES}, not {rule!r}")


def acquisition_key(series: Series) -> tuple:
    """Reconstructions of one acquisition share study and FrameOfReference; without a FrameOfReferenceUID a
    series is its own acquisition (nothing says it shares one)."""
    return series.first.study_uid, series.first.frame_uid or series.uid


def _mm(value) -> str:
    return "unknown thickness" if value is None else f"{value:g} mm"


def _thinnest_order(series: Series):
    number = series.first.series_number
    return (np.inf if series.thickness is None else series.thickness,
            np.inf if number is None else number, series.uid)


def choose_reconstructions(group: list, rule: str, annotated=frozenset()) -> dict:
    """{series uid: (chosen, why)} for the usable scan series of one acquisition under `rule`
    (see parse_reconstruction). An annotated series is always chosen; where one is, the acquisition's
    unannotated reconstructions are left out (their nodules would count as nodule-free slices)."""
    mode, pattern = parse_reconstruction(rule)
    group = sorted(group, key=_thinnest_order)
    n = len(group)
    if mode == "all":
        return {s.uid: (True, f"chosen: reconstruction all ({n} of this acquisition)") for s in group}
    marked = [s for s in group if s.uid in annotated]
    if marked:
        names = ", ".join(s.uid for s in marked)
        return {s.uid: (True, "chosen: annotated") if s.uid in annotated else
                (False, f"left out: not annotated, and {names} of the same acquisition is") for s in group}
    if n == 1:
        return {group[0].uid: (True, "chosen: the only reconstruction of its acquisition")}
    pool, prefix, decisions = group, "", {}
    if mode == "kernel":
        matching = [s for s in group if pattern.search(s.kernel)]
        if matching:
            pool = matching
            for s in group:
                if s not in matching:
                    decisions[s.uid] = (False, f"left out: kernel {s.kernel or '(none)'!r} does not match "
                                               f"{pattern.pattern!r}")
            prefix = f"kernel {pattern.pattern!r}, "
        else:
            prefix = f"no kernel matched {pattern.pattern!r}, so "
    best = pool[0]
    decisions[best.uid] = (True, f"chosen: {prefix}thinnest of {len(pool)} ({_mm(best.thickness)}"
                                 f"{', lowest SeriesNumber' if len(pool) > 1 else ''})")
    for s in pool[1:]:
        if _thinnest_order(s)[0] == _thinnest_order(best)[0]:
            why = (f"left out: as thin as {best.uid} ({_mm(s.thickness)}) but SeriesNumber "
                   f"{s.first.series_number} is not the lowest ({best.first.series_number})")
        else:
            why = f"left out: {_mm(s.thickness)}, thicker than {best.uid} ({_mm(best.thickness)})"
        decisions[s.uid] = (False, why)
    return decisions


def dicomdir_files(dicomdir) -> list:
    """[(series uid, path)] of every file a DICOMDIR references, walking its record tree by the offsets that
    link each record to its next sibling and its first child (PS3.3 F.3.2.2); pydicom's FileSet would drop
    the records whose file is missing, which are the ones wanted here."""
    ds = pydicom.dcmread(dicomdir)
    records = {item.seq_item_tell: item for item in ds.get("DirectoryRecordSequence", [])}
    folder, found = os.path.dirname(dicomdir), []
    stack = [(ds.get("OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity", 0), "")]
    seen = set()
    while stack:
        offset, series_uid = stack.pop()
        while offset and offset in records and offset not in seen:
            seen.add(offset)
            record = records[offset]
            uid = str(record.get("SeriesInstanceUID", "") or series_uid) if record.get(
                "DirectoryRecordType") == "SERIES" else series_uid
            file_id = record.get("ReferencedFileID")
            if file_id:
                parts = [file_id] if isinstance(file_id, str) else list(file_id)
                found.append((uid, os.path.join(folder, *parts)))
            stack.append((record.get("OffsetOfReferencedLowerLevelDirectoryEntity", 0), uid))
            offset = record.get("OffsetOfTheNextDirectoryRecord", 0)
    return found


def dicomdir_missing(dicomdirs, present) -> tuple:
    """({series uid: (missing count, first missing path, DICOMDIR)}, [notes]) for the files each DICOMDIR lists
    that are not on disk (a copied CD missing files would otherwise give silently shorter series).
    `present` are the paths found by the walk; names compare case-insensitively (ISO 9660 media)."""
    present = {os.path.abspath(p).lower() for p in present}
    missing, notes = {}, []
    for dicomdir in dicomdirs:
        try:
            listed = dicomdir_files(dicomdir)
        except Exception as err:  # a DICOMDIR only helps: an unreadable one is noted, the walk goes on
            notes.append(f"DICOMDIR {dicomdir} could not be read ({type(err).__name__}: {err}); files found by "
                         "walking the folders only")
            continue
        for uid, path in listed:
            if os.path.abspath(path).lower() not in present:
                count, first, _ = missing.get(uid, (0, path, dicomdir))
                missing[uid] = (count + 1, first, dicomdir)
    return missing, notes
