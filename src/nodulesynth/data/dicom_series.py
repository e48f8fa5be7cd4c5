"""Read one CT series from a folder of DICOM files into a HU volume, or say why it can't be used; bring an
axial volume into the canonical orientation (columns toward the patient's left, rows toward posterior,
slices inferior to superior); find gantry tilt and reject it or resample the volume onto an axial grid; tell
missing slices from a slice spacing that varies, and reject the latter or resample it onto a regular spacing."""

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from nodulesynth.data.multiframe import is_multiframe, split_frames
from nodulesynth.errors import InputError

# Files that sit beside DICOM in real downloads and exports (LIDC's XML, notes, viewers, reports, converted
# volumes, archives) and are not slices: never read. Other files that fail to read are unreadable DICOM.
NON_DICOM_SUFFIXES = {
    ".xml", ".txt", ".csv", ".json", ".md", ".tsv", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".pdf",
    ".htm", ".html", ".css", ".js", ".zip", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".tar", ".nii", ".nrrd",
    ".mha", ".mhd", ".npy", ".npz", ".exe", ".dll", ".ini", ".inf", ".log", ".yaml", ".yml", ".py", ".sh", ".bat",
    ".doc", ".docx", ".xls", ".xlsx", ".db"}
NON_DICOM_NAMES = {"readme", "license", "licence", "copying", "notice", "version", "lockfile", "dicomdir"}


def is_non_dicom_name(path) -> bool:
    """True for a file known by its name not to be a slice (hidden files, the suffixes and names above)."""
    name = Path(path).name
    return name.startswith(".") or name.lower() in NON_DICOM_NAMES or Path(name).suffix.lower() in NON_DICOM_SUFFIXES


# Scanners write positions and direction cosines to about 1e-4, an untilted series lies within a hundredth of
# a degree of the z axis; gantry tilts are whole degrees (up to about 30).
TILT_TOLERANCE_DEG = 0.5
AXIAL_LIMIT_DEG = 45.0  # slice normal further than this from z: a coronal or sagittal series, not a tilted axial one
CANONICAL_ORIENTATION = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
TILTED_POLICIES = ("reject", "resample")  # cohort.tilted
VARIABLE_SPACING_POLICIES = ("reject", "resample")  # cohort.variable_spacing
# A gap between slices within this fraction of the series' common spacing of it (or of a whole multiple of it)
# is that spacing: scanners write positions to about 1e-3 mm, and some jitter a slice by a few percent.
SPACING_TOLERANCE = 0.1
# DICOMDIR's SOP class. Philips writes a file of it (DIRFILE) into every folder of an export: a directory,
# never a slice.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


def _line_angle_deg(u, v) -> float:
    """Angle between the lines along u and v, 0 to 90 degrees."""
    cos = abs(float(np.dot(u, v))) / (np.linalg.norm(u) * np.linalg.norm(v))
    return float(np.degrees(np.arccos(min(cos, 1.0))))


def is_directory_file(ds) -> bool:
    """True for a dataset of the Media Storage Directory class (a DICOMDIR, or a Philips DIRFILE), whatever
    the file's name: its class is in the file meta information, often not in the dataset."""
    meta = ds.get("file_meta") or {}
    return MEDIA_STORAGE_DIRECTORY in (str(ds.get("SOPClassUID", "")), str(meta.get("MediaStorageSOPClassUID", "")))


def slice_normal(orientation) -> np.ndarray:
    """The unit normal of an ImageOrientationPatient plane, pointing superior (z increasing)."""
    orientation = np.asarray(orientation, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return normal * np.sign(normal[2]) / np.linalg.norm(normal)


def plane_tilt_deg(orientation) -> float:
    """Angle (0 to 90 degrees) between the slice normal of ImageOrientationPatient and the patient's z axis;
    NaN for a degenerate orientation (parallel cosines)."""
    orientation = np.asarray(orientation, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return _line_angle_deg(normal, (0, 0, 1)) if np.linalg.norm(normal) > 0 else float("nan")


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
    positions: np.ndarray     # ImagePositionPatient of every slice [Z, 3], in slice order

    @property
    def columns_toward_patient_left(self) -> bool:
        """True when the column index grows toward the patient's left (+x in DICOM's LPS frame)."""
        return bool(self.orientation[0] > 0)

    @property
    def slice_step(self) -> np.ndarray:
        """World displacement (mm) from one slice's first pixel to the next one's, over the series."""
        return (self.positions[-1] - self.positions[0]) / max(len(self.positions) - 1, 1)

    @property
    def slice_gaps(self) -> np.ndarray:
        """Distance (mm) from each slice to the next along the slice normal, as read_series measures it."""
        return np.diff(self.positions @ slice_normal(self.orientation))

    @property
    def spacing_varies(self) -> bool:
        """True when some gap between slices is off the series' common (median) spacing by more than
        SPACING_TOLERANCE of it (read_series passes such a series only under cohort.variable_spacing: resample)."""
        gaps = self.slice_gaps
        return bool(len(gaps)) and bool(np.abs(gaps - np.median(gaps)).max() > SPACING_TOLERANCE * np.median(gaps))

    @property
    def tilt_deg(self) -> float:
        """Gantry tilt: the larger angle of the slice normal (ImageOrientationPatient) and of the slices'
        stacking direction (ImagePositionPatient) to the patient's z axis; 0 for an untilted axial series."""
        normal = np.cross(self.orientation[:3], self.orientation[3:])
        return max(_line_angle_deg(normal, (0, 0, 1)), _line_angle_deg(self.slice_step, (0, 0, 1)))

    def voxel_to_world(self, index):
        """Fractional (slice, row, column) index -> world (x, y, z) mm, through each slice's own position
        (linear beyond the first and last slice)."""
        s, r, c = (float(v) for v in index)
        last = len(self.positions) - 1
        corner = np.array([np.interp(s, np.arange(last + 1), self.positions[:, i]) for i in range(3)])
        corner += self.slice_step * (min(s, 0.0) + max(s - last, 0.0))
        return corner + r * self.spacing[1] * self.orientation[3:] + c * self.spacing[2] * self.orientation[:3]

    def world_to_voxel(self, xyz):
        """World (x, y, z) mm -> fractional (slice, row, column) index of an axial, untilted volume; slice is
        NaN outside the scan."""
        xyz = np.asarray(xyz, float)
        offset = xyz - self.origin
        column = offset @ self.orientation[:3] / self.spacing[2]
        row = offset @ self.orientation[3:] / self.spacing[1]
        slice_ = np.interp(xyz[2], self.z, np.arange(len(self.z)), left=np.nan, right=np.nan)
        return np.array([slice_, row, column])


def _series_paths(source):
    """(paths, where): the files of a folder (names of non-DICOM files skipped), or a list of files as given."""
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ScanRejected(f"DICOM folder {folder} does not exist")
        paths = [p for p in sorted(folder.iterdir()) if p.is_file() and not is_non_dicom_name(p)]
        return paths, str(folder)
    paths = [Path(p) for p in source]
    return paths, (os.path.commonpath([str(p.parent) for p in paths]) if paths else "an empty file list")


def _read_headers(paths, series_uid=None):
    """[(name, dataset)] of the files, one per slice: a multi-frame file gives one per frame. With `series_uid`,
    files of other series are passed over (their pixel data never read: values over 64 KB are deferred)."""
    datasets = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, defer_size="64 KB" if series_uid else None)
        except InvalidDicomError as err:
            raise ScanRejected(f"unreadable DICOM file {path.name}: {err}") from err
        except Exception as err:  # truncated or corrupt files raise many kinds of errors
            raise ScanRejected(f"unreadable DICOM file {path.name}: {type(err).__name__}: {err}") from err
        if series_uid and str(ds.get("SeriesInstanceUID", "")) != series_uid or is_directory_file(ds):
            continue  # another series, or a directory (a Philips DIRFILE beside the slices)
        if not is_multiframe(ds):
            datasets.append((path, ds))
            continue
        try:
            datasets += split_frames(path, ds)
        except Exception as err:  # the frames are decoded here, so a codec's error is raised here
            raise ScanRejected(f"pixel data of {path.name} cannot be decoded: {type(err).__name__}: {err}") from err
    return datasets


def check_slice_gaps(along, variable_spacing: str = "reject", tolerance: float = SPACING_TOLERANCE) -> float:
    """The common slice spacing (mm) of slices at distances `along` (mm along the slice normal, increasing, no
    duplicate); raises ScanRejected for missing slices and (variable_spacing "reject") for a spacing that
    varies. The rule that tells the last two apart: the common spacing is the median gap; a gap within
    `tolerance` of it of a whole multiple (2, 3, ...) of it is where files of a regular series were lost
    (missing slices, never interpolated over); any gap that is off every multiple (a non-multiple, or shorter
    than the common spacing) means the scanner wrote a varying spacing, as variable-pitch protocols and some
    GE series (1.08 to 6.99 mm) do. Under "resample" such a series passes and axial_volume resamples it."""
    if variable_spacing not in VARIABLE_SPACING_POLICIES:
        raise InputError(f"cohort.variable_spacing must be one of {', '.join(VARIABLE_SPACING_POLICIES)}, "
                         f"not {variable_spacing!r}")
    along = np.asarray(along, float)
    gaps = np.diff(along)
    step = float(np.median(gaps))
    multiple = np.rint(gaps / step)
    off_grid = np.abs(gaps - multiple * step) > tolerance * step  # also every gap shorter than step / 2
    if off_grid.any():
        if variable_spacing == "reject":
            raise ScanRejected(f"slice spacing varies from {gaps.min():.2f} to {gaps.max():.2f} mm (gaps that are no "
                               f"whole multiple of the common {step:.2f} mm, so not missing slices); "
                               "cohort.variable_spacing: resample resamples such a series onto its finest spacing")
        return step
    missing = np.flatnonzero(multiple >= 2)
    if len(missing):
        i = missing[0]
        raise ScanRejected(f"missing slice(s) between {along[i]:.2f} and {along[i + 1]:.2f} mm "
                           f"(spacing {step:.2f} mm)")
    return step


# The geometry tags a slice needs, and how many numbers each holds.
GEOMETRY_TAGS = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2, "Rows": 1, "Columns": 1}


def _check_geometry(path, ds):
    """ScanRejected naming the file and tag where a geometry tag is missing, has the wrong number of values or
    a value that is no finite number, a pixel spacing or image size is not positive, or the orientation's two
    directions are parallel (exports and anonymisers do write such headers)."""
    values = {}
    for key, count in GEOMETRY_TAGS.items():
        if key not in ds:
            raise ScanRejected(f"{key} missing in {path.name}")
        raw = ds.get(key)
        try:
            value = np.array(raw, float).reshape(-1)
        except (TypeError, ValueError):
            raise ScanRejected(f"{key} of {path.name} is not numeric: {raw!r}") from None
        if value.size != count or not np.isfinite(value).all():
            raise ScanRejected(f"{key} of {path.name} is {raw!r}: expected {count} numbers")
        values[key] = value
    if (values["PixelSpacing"] <= 0).any() or values["Rows"][0] < 1 or values["Columns"][0] < 1:
        raise ScanRejected(f"PixelSpacing or Rows x Columns of {path.name} not positive")
    cosines = values["ImageOrientationPatient"]
    if np.linalg.norm(np.cross(cosines[:3], cosines[3:])) < 1e-3:
        raise ScanRejected(f"ImageOrientationPatient of {path.name} is degenerate (its directions are parallel "
                           f"or zero): {cosines.tolist()}")


def read_series(source, spacing_tolerance: float = SPACING_TOLERANCE, series_uid=None,
                variable_spacing: str = "reject") -> CTVolume:
    """Read a single axial CT series from a folder or a list of files (classic single-frame files, or an
    Enhanced / Legacy Converted Enhanced CT multi-frame file); with `series_uid`, only that series' files.
    Raises ScanRejected with a reason for anything unusable; a slice spacing that varies is one under
    `variable_spacing` "reject" (see check_slice_gaps), and under "resample" is passed on as stored, for
    axial_volume to resample."""
    paths, where = _series_paths(source)
    datasets = _read_headers(paths, series_uid)
    if len(datasets) < 3:
        of = f" of series {series_uid}" if series_uid else ""
        raise ScanRejected(f"only {len(datasets)} DICOM slices{of} in {where}")

    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) != 1:
        raise ScanRejected(f"folder holds {len(series)} series, expected one")
    for path, ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise ScanRejected(f"modality {modality or 'missing'} in {path.name}, not CT")
        if "PixelData" not in ds:
            raise ScanRejected(f"no pixel data in {path.name}")
        _check_geometry(path, ds)

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

    plane_tilt = plane_tilt_deg(orientation)
    if plane_tilt > AXIAL_LIMIT_DEG:
        raise ScanRejected(f"not an axial series (slice normal is not along z: {plane_tilt:.0f}° from it)")
    # Slices are ordered along the normal (their distance apart, also in a tilted series), inferior ->
    # superior (z increasing) whichever way the normal points.
    normal = slice_normal(orientation)
    positions = np.array([np.array(ds.ImagePositionPatient, float) for _, ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    along = positions[order] @ normal
    datasets = [datasets[i] for i in order]

    duplicated = np.flatnonzero(np.diff(along) < 1e-3)
    if len(duplicated):
        raise ScanRejected(f"duplicated slice at position {along[duplicated[0]]:.2f} mm "
                           f"({datasets[duplicated[0]][0].name}, {datasets[duplicated[0] + 1][0].name})")
    step = check_slice_gaps(along, variable_spacing, spacing_tolerance)

    hu = np.empty((len(datasets), *shape), np.int16)
    for i, (path, ds) in enumerate(datasets):
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:
            syntax = ds.file_meta.get("TransferSyntaxUID", "unknown transfer syntax")
            syntax = getattr(syntax, "name", syntax)
            raise ScanRejected(f"pixel data of {path.name} ({syntax}) cannot be decoded: {err}") from err
        if pixels.shape != shape:
            raise ScanRejected(f"pixel data of {path.name} has the shape {pixels.shape}, not its Rows x Columns "
                               f"{shape}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        hu[i] = np.clip(pixels * slope + intercept, -32768, 32767).astype(np.int16)

    return CTVolume(
        hu=hu, z=positions[order, 2], spacing=(step, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=positions[order[0]], orientation=orientation,
        patient_id=str(first.get("PatientID", "")), series_uid=str(first.SeriesInstanceUID),
        study_uid=str(first.get("StudyInstanceUID", "")), positions=positions[order],
    )


def reorient_canonical(volume: CTVolume) -> CTVolume:
    """An untilted axial volume in the canonical orientation: column index toward the patient's left (+x),
    row index toward posterior (+y), by flips (and a transpose when the rows run along x). Exact: no
    resampling; origin, positions and cosines follow, so world coordinates map to the same tissue."""
    row, col = volume.orientation[:3], volume.orientation[3:]
    hu, spacing = volume.hu, tuple(volume.spacing)
    if abs(row[1]) > abs(row[0]):  # the column index runs along y: swap the in-plane axes
        hu, row, col = hu.transpose(0, 2, 1), col, row
        spacing = (spacing[0], spacing[2], spacing[1])
    offset = np.zeros(3)
    if row[0] < 0:
        hu, offset, row = hu[:, :, ::-1], offset + (hu.shape[2] - 1) * spacing[2] * row, -row
    if col[1] < 0:
        hu, offset, col = hu[:, ::-1, :], offset + (hu.shape[1] - 1) * spacing[1] * col, -col
    positions = volume.positions + offset
    return replace(volume, hu=np.ascontiguousarray(hu), z=positions[:, 2], spacing=spacing, origin=positions[0],
                   orientation=np.concatenate([row, col]), positions=positions)


def resample_axial(volume: CTVolume) -> CTVolume:
    """A tilted volume resampled (trilinear, SimpleITK) onto an axial grid in the canonical orientation: the
    series' in-plane pixel spacing and matrix, its z step between slices, centred on the series' centre."""
    import SimpleITK as sitk  # only tilted series need it

    depth, rows, cols = volume.hu.shape
    # world = first + grid @ (column, row, slice): SimpleITK's index order.
    grid = np.column_stack([volume.spacing[2] * volume.orientation[:3], volume.spacing[1] * volume.orientation[3:],
                            volume.slice_step])
    first = volume.positions[0]
    # The input gets unit geometry (its physical points are its indices); one affine transform carries each
    # output point (world mm) to them, which holds for a tilted plane and for sheared slice positions alike.
    to_index = np.linalg.inv(grid)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(to_index.ravel().tolist())
    transform.SetTranslation((-to_index @ first).tolist())
    row_along_x = abs(volume.orientation[0]) >= abs(volume.orientation[1])
    size = (cols, rows) if row_along_x else (rows, cols)
    step_xy = (volume.spacing[2], volume.spacing[1]) if row_along_x else (volume.spacing[1], volume.spacing[2])
    spacing = (*step_xy, abs(float(volume.slice_step[2])))
    centre = first + grid @ np.array([cols - 1, rows - 1, depth - 1]) / 2
    origin = centre - (np.array([size[0], size[1], depth]) - 1) / 2 * np.array(spacing)
    image = sitk.GetImageFromArray(volume.hu.astype(np.float32))
    out = sitk.Resample(image, (int(size[0]), int(size[1]), int(depth)), transform, sitk.sitkLinear,
                        origin.tolist(), spacing, np.eye(3).ravel().tolist(), float(volume.hu.min()),
                        sitk.sitkFloat32)
    hu = np.clip(np.rint(sitk.GetArrayFromImage(out)), -32768, 32767).astype(np.int16)
    positions = origin + np.outer(np.arange(depth), [0.0, 0.0, spacing[2]])
    return replace(volume, hu=hu, z=positions[:, 2], spacing=(spacing[2], spacing[1], spacing[0]),
                   origin=positions[0], orientation=CANONICAL_ORIENTATION.copy(), positions=positions)


def resample_regular_spacing(volume: CTVolume) -> CTVolume:
    """A volume whose slice spacing varies, resampled (linear along the stack, SimpleITK) onto a regular one:
    the finest gap between its slices, shortened just enough that the grid runs from its first slice to its
    last. Slices stay in their plane; their positions follow the stack's (also a tilted one's)."""
    import SimpleITK as sitk  # only series whose spacing varies need it

    depth, rows, cols = volume.hu.shape
    along = (volume.positions - volume.positions[0]) @ slice_normal(volume.orientation)
    count = int(np.ceil(along[-1] / np.diff(along).min() - 1e-6)) + 1
    target = np.linspace(0.0, along[-1], count)
    source = np.interp(target, along, np.arange(depth))  # each output slice's fractional input slice
    # The slices' positions are no affine function of their index, so the affine transform of resample_axial
    # cannot carry the grid: a displacement field does, moving output slice k (the input has unit geometry:
    # its physical points are its indices) to input slice source[k]. The field has a node at every output
    # slice and at the corners of the plane, where its linear interpolation is exact.
    field = np.zeros((count, 2, 2, 3))
    field[..., 2] = (source - np.arange(count))[:, None, None]
    displacement = sitk.GetImageFromArray(field, isVector=True)
    displacement.SetSpacing((float(max(cols - 1, 1)), float(max(rows - 1, 1)), 1.0))
    image = sitk.GetImageFromArray(volume.hu.astype(np.float32))
    out = sitk.Resample(image, (cols, rows, count), sitk.DisplacementFieldTransform(displacement), sitk.sitkLinear,
                        (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), np.eye(3).ravel().tolist(), float(volume.hu.min()),
                        sitk.sitkFloat32)
    hu = np.clip(np.rint(sitk.GetArrayFromImage(out)), -32768, 32767).astype(np.int16)
    positions = np.column_stack([np.interp(target, along, volume.positions[:, i]) for i in range(3)])
    step = float(target[1] - target[0]) if count > 1 else float(volume.spacing[0])
    return replace(volume, hu=hu, z=positions[:, 2], spacing=(step, *volume.spacing[1:]), origin=positions[0],
                   positions=positions)


def axial_volume(volume: CTVolume, tilted: str = "reject", tolerance_deg: float = TILT_TOLERANCE_DEG) -> CTVolume:
    """The volume as every later stage takes it: axial, canonical orientation, a regular slice spacing. A
    series whose spacing varies (read_series passes one only under cohort.variable_spacing: resample) is
    resampled onto its finest spacing first. A gantry-tilted series is rejected with its angle (tilted
    "reject") or resampled onto an axial grid (tilted "resample")."""
    if tilted not in TILTED_POLICIES:
        raise InputError(f"cohort.tilted must be one of {', '.join(TILTED_POLICIES)}, not {tilted!r}")
    if volume.spacing_varies:
        volume = resample_regular_spacing(volume)
    tilt = volume.tilt_deg
    if tilt <= tolerance_deg:
        return reorient_canonical(volume)
    if tilted == "reject":
        raise ScanRejected(f"gantry tilt of {tilt:.1f}° (slice planes or positions off the patient's z axis); "
                           "cohort.tilted: resample resamples such a series onto an axial grid")
    return resample_axial(volume)

