"""Read one CT series from a folder of DICOM files into a HU volume, or say why it can't be used."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

# Files that sit beside DICOM in real downloads (LIDC's XML, notes) and are not slices.
NON_DICOM_SUFFIXES = {".xml", ".txt", ".csv", ".json", ".md", ".tsv"}


class ScanRejected(Exception):
    """A scan that cannot be used; the message is the reason recorded in rejected.tsv."""


@dataclass
class CTVolume:
    hu: np.ndarray            # int16 [Z, H, W], slices ordered by ImagePositionPatient z
    z: np.ndarray             # float [Z], slice z position (mm), increasing (inferior -> superior)
    spacing: tuple            # (slice, row, column) spacing in mm
    origin: np.ndarray        # ImagePositionPatient of the first slice (mm)
    orientation: np.ndarray   # ImageOrientationPatient: row cosine (3), column cosine (3)
    patient_id: str
    series_uid: str
    study_uid: str

    @property
    def columns_toward_patient_left(self) -> bool:
        """True when the column index grows toward the patient's left (+x in DICOM's LPS frame)."""
        return bool(self.orientation[0] > 0)

    def world_to_voxel(self, xyz):
        """World (x, y, z) mm -> fractional (slice, row, column) index; slice is NaN outside the scan."""
        xyz = np.asarray(xyz, float)
        offset = xyz - self.origin
        column = offset @ self.orientation[:3] / self.spacing[2]
        row = offset @ self.orientation[3:] / self.spacing[1]
        slice_ = np.interp(xyz[2], self.z, np.arange(len(self.z)), left=np.nan, right=np.nan)
        return np.array([slice_, row, column])


def _read_headers(folder: Path):
    datasets = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.suffix.lower() in NON_DICOM_SUFFIXES or path.name.startswith("."):
            continue
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError as err:
            raise ScanRejected(f"unreadable DICOM file {path.name}: {err}") from err
        except Exception as err:  # truncated or corrupt files raise many kinds of errors
            raise ScanRejected(f"unreadable DICOM file {path.name}: {type(err).__name__}: {err}") from err
        datasets.append((path, ds))
    return datasets


def read_series(folder, max_gap_factor: float = 1.5, spacing_tolerance: float = 0.1) -> CTVolume:
    """Read a single axial CT series. Raises ScanRejected with a reason for anything unusable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ScanRejected(f"DICOM folder {folder} does not exist")
    datasets = _read_headers(folder)
    if len(datasets) < 3:
        raise ScanRejected(f"only {len(datasets)} DICOM slices in {folder}")

    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) != 1:
        raise ScanRejected(f"folder holds {len(series)} series, expected one")
    for path, ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise ScanRejected(f"modality {modality or 'missing'} in {path.name}, not CT")
        if "PixelData" not in ds:
            raise ScanRejected(f"no pixel data in {path.name}")
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if key not in ds:
                raise ScanRejected(f"{key} missing in {path.name}")

    first = datasets[0][1]
    orientation = np.array(first.ImageOrientationPatient, float)
    pixel_spacing = np.array(first.PixelSpacing, float)
    shape = (int(first.Rows), int(first.Columns))
    for path, ds in datasets:
        if not np.allclose(np.array(ds.ImageOrientationPatient, float), orientation, atol=1e-3):
            raise ScanRejected(f"inconsistent orientation in {path.name}")
        if not np.allclose(np.array(ds.PixelSpacing, float), pixel_spacing, rtol=1e-3):
            raise ScanRejected(f"inconsistent pixel spacing in {path.name}: "
                               f"{list(ds.PixelSpacing)} vs {list(pixel_spacing)}")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise ScanRejected(f"inconsistent image size in {path.name}")

    normal = np.cross(orientation[:3], orientation[3:])
    if abs(abs(normal[2]) - 1) > 0.05:
        raise ScanRejected("not an axial series (slice normal is not along z)")
    # Slices go inferior -> superior (z increasing) whichever way the normal points.
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in datasets])
    order = np.argsort(positions[:, 2], kind="stable")
    along = positions[order, 2]
    datasets = [datasets[i] for i in order]

    gaps = np.diff(along)
    step = float(np.median(gaps))
    duplicated = np.flatnonzero(gaps < 1e-3)
    if len(duplicated):
        raise ScanRejected(f"duplicated slice at position {along[duplicated[0]]:.2f} mm "
                           f"({datasets[duplicated[0]][0].name}, {datasets[duplicated[0] + 1][0].name})")
    missing = np.flatnonzero(gaps > max_gap_factor * step)
    if len(missing):
        i = missing[0]
        raise ScanRejected(f"missing slice(s) between {along[i]:.2f} and {along[i + 1]:.2f} mm "
                           f"(spacing {step:.2f} mm)")
    if np.abs(gaps - step).max() > spacing_tolerance * step:
        raise ScanRejected(f"inconsistent slice spacing: {gaps.min():.2f} to {gaps.max():.2f} mm")

    hu = np.empty((len(datasets), *shape), np.int16)
    for i, (path, ds) in enumerate(datasets):
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
            syntax = getattr(syntax, "name", syntax)
            raise ScanRejected(f"pixel data of {path.name} ({syntax}) cannot be decoded: {err}") from err
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu[i] = np.clip(pixels * slope + intercept, -32768, 32767).astype(np.int16)

    return CTVolume(
        hu=hu, z=along, spacing=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=positions[order[0]], orientation=orientation,
        patient_id=str(first.get("PatientID", "")), series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")),
    )


def window(hu, min_hu: float = -1000, max_hu: float = 400) -> np.ndarray:
    """HU -> uint8 with [min_hu, max_hu] mapped linearly onto 0..255."""
    scaled = (hu.astype(np.float32) - min_hu) * (255.0 / (max_hu - min_hu))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
