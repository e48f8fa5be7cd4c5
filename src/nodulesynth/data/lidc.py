"""LIDC-IDRI through pylidc: the scans under a root folder, their DICOM folders and consensus nodules."""

import contextlib
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nodulesynth.errors import InputError


def import_pylidc():
    """Import pylidc 0.2.3, which still uses aliases removed in numpy 2 (np.int, np.float)."""
    for name, alias in (("int", int), ("float", float)):
        if name not in np.__dict__:
            setattr(np, name, alias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its pkg_resources import is deprecated, not broken
        import pylidc
    return pylidc


@contextlib.contextmanager
def pylidc_root(lidc_root):
    """Point pylidc at `lidc_root` for the duration, without touching the user's ~/.pylidcrc.

    pylidc reads its DICOM root from ~/.pylidcrc on every lookup; HOME is swapped for a private
    folder holding a generated one.
    """
    old_home = os.environ.get("HOME")
    with tempfile.TemporaryDirectory(prefix="nodulesynth-pylidc-") as home:
        Path(home, ".pylidcrc").write_text(f"[dicom]\npath = {Path(lidc_root).resolve()}\nwarn = True\n")
        os.environ["HOME"] = home
        try:
            yield
        finally:
            if old_home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = old_home


@dataclass
class ConsensusNodule:
    nodule_id: int
    index: tuple          # (slice, row, column) fractional index in pylidc's z-sorted volume
    z_mm: float
    diameter_mm: float
    readers: int


def _clusters(scan, min_readers: int, min_diameter_mm: float):
    """(kept, excluded): the annotation clusters of a pylidc Scan as ConsensusNodules (each list numbered from 0),
    kept when marked by at least `min_readers` with a mean diameter of at least `min_diameter_mm`, as LUNA16 does;
    the others are the findings LUNA16 excludes from its evaluation (annotations_excluded.csv)."""
    zvals = np.asarray(scan.slice_zvals, float)
    kept, excluded = [], []
    for cluster in scan.cluster_annotations():
        diameter = float(np.mean([ann.diameter for ann in cluster]))
        i, j, k = np.mean([ann.centroid for ann in cluster], axis=0)
        z = float(np.interp(k, np.arange(len(zvals)), zvals))
        into = kept if len(cluster) >= min_readers and diameter >= min_diameter_mm else excluded
        into.append(ConsensusNodule(len(into), (float(k), float(i), float(j)), z, diameter, len(cluster)))
    return kept, excluded


def consensus_nodules(scan, min_readers: int = 3, min_diameter_mm: float = 3.0):
    """Annotation clusters of a pylidc Scan marked by at least `min_readers`, as LUNA16 does."""
    return _clusters(scan, min_readers, min_diameter_mm)[0]


def excluded_findings(scan, min_readers: int = 3, min_diameter_mm: float = 3.0):
    """The annotation clusters `consensus_nodules` leaves out (fewer readers, smaller): findings that the FROC
    counts neither as hits nor as false positives."""
    return _clusters(scan, min_readers, min_diameter_mm)[1]


def scans_under(lidc_root):
    """pylidc Scans whose patient folder exists under `lidc_root`, ordered by patient and series."""
    pl = import_pylidc()
    patients = sorted(p.name for p in Path(lidc_root).glob("LIDC-IDRI-*") if p.is_dir())
    if not patients:
        raise FileNotFoundError(f"cohort.lidc_root {lidc_root}: no LIDC-IDRI-dddd folders")
    scans = pl.query(pl.Scan).filter(pl.Scan.patient_id.in_(patients)).all()
    return sorted(scans, key=lambda s: (s.patient_id, s.series_instance_uid))


def series_folder(scan, lidc_root):
    """(folder or None, unreadable): the DICOM folder of a pylidc Scan under `lidc_root`, None where it is not
    downloaded. pylidc finds it (Scan.get_path_to_dicom_files) by reading the first .dcm of each folder of the
    patient, in full, and stops at the first file it cannot read (an interrupted download). There the patient
    folder is searched again the same way, reading headers only and passing over unreadable files, which are
    returned as (path, error) so that a series not found is not taken for one never downloaded."""
    from nodulesynth.data.dicom_index import read_header

    try:
        return Path(scan.get_path_to_dicom_files()), []
    except (RuntimeError, OSError):
        return None, []  # not under the root
    except Exception:
        pass
    unreadable = []
    for folder, _, names in sorted(os.walk(Path(lidc_root) / scan.patient_id)):
        for name in sorted(n for n in names if n.endswith(".dcm") and not n.startswith(".")):
            header = read_header(Path(folder) / name)
            if header.error:
                unreadable.append((header.path, header.error))
                continue
            if (header.study_uid, header.series_uid) == (scan.study_instance_uid, scan.series_instance_uid):
                return Path(folder), unreadable
            break  # the folder's first readable file names its series, as in pylidc
    return None, unreadable


def database_scan_count():
    """How many scans pylidc's annotation database holds (1018 in pylidc 0.2.3: all of LIDC-IDRI)."""
    pl = import_pylidc()
    return pl.query(pl.Scan).count()


def scan_by_series(series_uid):
    pl = import_pylidc()
    scan = pl.query(pl.Scan).filter(pl.Scan.series_instance_uid == series_uid).first()
    if scan is None:
        raise InputError(f"series {series_uid} is not in pylidc's annotation database")
    return scan
