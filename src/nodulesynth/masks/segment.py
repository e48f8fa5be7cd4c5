"""Classical lesion-map segmentation of windowed CT: body, lungs (patient left/right), trachea, nodules.

All thresholds work on the windowed uint8 image (nodulesynth.data.window), so the same
code segments a real slice and a synthetic one (mask fidelity). Morphology is scipy.ndimage; the
nodule's two-class intensity split is scikit-learn's k-means.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from sklearn.cluster import KMeans

from nodulesynth import labels as L
from nodulesynth.data.window import DEFAULT_WINDOW, hu_to_level
from nodulesynth.errors import InputError
from nodulesynth.options import SectionOptions


@dataclass
class MaskOptions(SectionOptions):
    """The config's `masks` section: the lesion maps' segmentation settings."""

    SECTION = "masks"

    body_threshold: int = 127          # windowed value; the study's body threshold
    lung_threshold_hu: float = -400    # air-like voxels inside the body
    min_lung_volume_ml: float = 100.0  # a scan with no air region this large has no lung
    min_lung_area_mm2: float = 100.0   # a slice is kept when it holds this much lung
    trachea_min_area_mm2: float = 20.0
    trachea_max_area_mm2: float = 800.0
    trachea_search_fraction: float = 0.35  # the trachea is sought in this top fraction of slices


def body_mask_2d(image, threshold=127):
    """Threshold, fill holes, keep the largest region: the table and the padding stay out."""
    filled = ndimage.binary_fill_holes(image > threshold)
    lab, n = ndimage.label(filled)
    if n == 0:
        return filled
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax()


def split_left_right(lung, body, columns_toward_left=True):
    """Split one slice's lung mask into (patient left, patient right).

    A region on one side of the body's midline goes to that side; a region that crosses it (lungs
    touching at the anterior junction, or joined through the carina) is cut at the thinnest
    column near the midline.
    """
    left_img = np.zeros_like(lung)  # image-left half (low column index)
    right_img = np.zeros_like(lung)
    cols = np.flatnonzero(body.any(0))
    if len(cols) == 0 or not lung.any():
        return left_img, right_img
    mid = (cols[0] + cols[-1]) / 2
    band = max(2, int(0.2 * (cols[-1] - cols[0])))
    lab, n = ndimage.label(lung)
    for region in range(1, n + 1):
        comp = lab == region
        rows_cols = np.nonzero(comp)
        c = rows_cols[1]
        share_low = np.mean(c < mid)
        if 0.1 < share_low < 0.9:
            lo, hi = int(max(mid - band, c.min())), int(min(mid + band, c.max()))
            counts = comp[:, lo:hi + 1].sum(0)
            cut = lo + int(np.argmin(counts))
            left_img[:, :cut] |= comp[:, :cut]
            right_img[:, cut:] |= comp[:, cut:]
        elif share_low >= 0.9:
            left_img |= comp
        else:
            right_img |= comp
    # Column index grows toward the patient's left in the standard orientation.
    return (right_img, left_img) if columns_toward_left else (left_img, right_img)


def _central_round_components(air, body, min_px, max_px):
    """Candidate airway cross-sections: small, roundish regions near the body's midline."""
    cols = np.flatnonzero(body.any(0))
    if len(cols) == 0:
        return []
    mid, width = (cols[0] + cols[-1]) / 2, cols[-1] - cols[0]
    lab, n = ndimage.label(air)
    found = []
    for region, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == region
        area = int(comp.sum())
        if not (min_px <= area <= max_px):
            continue
        centre_col = (sl[1].start + sl[1].stop - 1) / 2
        fill = area / comp.size
        if abs(centre_col - mid) < 0.12 * width and fill > 0.5:
            found.append((area, lab == region))
    return found


# Where the airway's air region has merged with a lung's (track_trachea), the airway is taken as the part of it
# within a disc the size of the airway last seen apart, about the previous slice's airway. Around an airway that
# has entered a lung that disc widened by AIRWAY_STEP_MM (about 2 pixels of a LIDC-IDRI slice: how far the
# outline moves between slices) is all air, more than AIRWAY_MERGE_GROWTH times the airway: tracking ends. Such
# slices count as trachea only where the airway is seen apart again below them, within AIRWAY_MERGED_MM: a
# trachea that touches a lung on its way down, not one that ends in it.
AIRWAY_STEP_MM = 1.5
AIRWAY_MERGE_GROWTH = 1.2
AIRWAY_MERGED_MM = 15.0


def track_trachea(air, body, pixel_area_mm2, slice_mm, opts: MaskOptions):
    """Find the trachea in the top slices and follow it down until it divides (the carina) or enters a lung.

    At masks.lung_threshold_hu a thin tracheal wall against a lung reads as air, merging the two regions; where
    the airway runs on apart below such slices, it is cut out of them (AIRWAY_STEP_MM, AIRWAY_MERGED_MM) rather
    than ended there, which gave the rest of the trachea to that lung. `slice_mm`: the slice spacing.
    """
    n = len(air)
    trachea = np.zeros_like(air)
    min_px = opts.trachea_min_area_mm2 / pixel_area_mm2
    max_px = opts.trachea_max_area_mm2 / pixel_area_mm2
    top = n - 1
    stop = n - 1 - int(np.ceil(opts.trachea_search_fraction * n))
    start = None
    for k in range(top, max(stop, -1), -1):  # slices are ordered inferior -> superior
        candidates = _central_round_components(air[k], body[k], min_px, max_px)
        if candidates:
            start = k
            trachea[k] = max(candidates, key=lambda c: c[0])[1]
            break
    if start is None:
        return trachea
    step = AIRWAY_STEP_MM / np.sqrt(pixel_area_mm2)
    most_merged = int(AIRWAY_MERGED_MM // slice_mm)
    rows, cols = np.indices(air.shape[1:])
    # Follow it down to the carina, then up: one air region must continue it in the next slice
    # without dividing into the main bronchi.
    for direction in (-1, 1):
        previous = apart = trachea[start]  # the airway on the slice before, and last seen as a region of its own
        merged = []  # (slice, airway) since then, kept once it is seen apart again
        k = start + direction
        while 0 <= k < n:
            lab, _ = ndimage.label(air[k])
            touching = np.unique(lab[previous & (lab > 0)])
            if len(touching) != 1:
                break
            comp = lab == touching[0]
            area = comp.sum()
            # The airway widens from the larynx down (about twice per slice at most); a lung it
            # merges with is far larger than masks.trachea_max_area_mm2.
            if area > max_px or area > 2.5 * previous.sum() + 4:
                centre_row, centre_col = ndimage.center_of_mass(previous)
                distance2 = (rows - centre_row) ** 2 + (cols - centre_col) ** 2
                radius = np.sqrt(apart.sum() / np.pi)
                if (comp & (distance2 <= (radius + step) ** 2)).sum() > AIRWAY_MERGE_GROWTH * apart.sum() \
                        or len(merged) >= most_merged:
                    break
                # the airway's own disc: a wider one would reach past a thin wall into the lung of the next slice
                comp &= distance2 <= radius ** 2
                merged.append((k, comp))
            else:
                for j, part in merged:
                    trachea[j] = part
                merged, apart = [], comp
                trachea[k] = comp
            previous = comp
            k += direction
    return trachea


@dataclass
class VolumeMasks:
    body: np.ndarray
    left_lung: np.ndarray
    right_lung: np.ndarray
    trachea: np.ndarray


def segment_volume(image, spacing, columns_toward_left=True, opts: MaskOptions | None = None,
                   window=DEFAULT_WINDOW):
    """Windowed volume uint8 [Z,H,W] -> boolean body, lungs and trachea. Raises ValueError without lung."""
    opts = opts or MaskOptions()
    pixel_area = spacing[1] * spacing[2]
    voxel_ml = spacing[0] * pixel_area / 1000.0
    body = np.stack([body_mask_2d(s, opts.body_threshold) for s in image])
    air = (image < hu_to_level(opts.lung_threshold_hu, window)) & body
    trachea = track_trachea(air, body, pixel_area, float(spacing[0]), opts)

    lab, n = ndimage.label(air & ~trachea)
    volumes = np.bincount(lab.ravel())[1:] * voxel_ml
    if n == 0 or volumes.max() < opts.min_lung_volume_ml:
        largest = 0.0 if n == 0 else volumes.max()
        raise InputError(f"no lung found (largest air region {largest:.0f} ml, "
                         f"masks.min_lung_volume_ml is {opts.min_lung_volume_ml:g})")
    # The lungs: the largest air region and any other of at least a fifth of its size (the other
    # lung when they do not touch); bowel gas and the oesophagus are far smaller.
    keep = np.flatnonzero((volumes >= 0.2 * volumes.max()) & (volumes >= opts.min_lung_volume_ml)) + 1
    lungs = np.isin(lab, keep)
    left = np.zeros_like(lungs)
    right = np.zeros_like(lungs)
    for k in range(len(image)):
        if lungs[k].any():
            lung_k = ndimage.binary_fill_holes(lungs[k]) & ~trachea[k]  # vessels and nodules are lung
            left[k], right[k] = split_left_right(lung_k, body[k], columns_toward_left)
    return VolumeMasks(body, left, right, trachea)


def segment_slice(image, columns_toward_left=True, pixel_mm=None, opts: MaskOptions | None = None,
                  window=DEFAULT_WINDOW):
    """One windowed slice (uint8 [H,W]) -> label map without nodules, for synthetic images.

    Without a series around it, the trachea is the central, round air region that is not a lung;
    `pixel_mm` defaults to a 360 mm chest field of view.
    """
    opts = opts or MaskOptions()
    pixel_mm = pixel_mm or 360.0 / image.shape[-1]
    pixel_area = pixel_mm * pixel_mm
    body = body_mask_2d(image, opts.body_threshold)
    air = (image < hu_to_level(opts.lung_threshold_hu, window)) & body
    candidates = _central_round_components(air, body, opts.trachea_min_area_mm2 / pixel_area,
                                           opts.trachea_max_area_mm2 / pixel_area)
    lab, n = ndimage.label(air)
    areas = np.bincount(lab.ravel())[1:] * pixel_area
    trachea = np.zeros_like(air)
    if candidates and n:
        area, comp = max(candidates, key=lambda c: c[0])
        # A candidate as large as the biggest air region is a lung apex, not the trachea.
        if area * pixel_area < 0.5 * areas.max():
            trachea = comp
    lungs = np.isin(lab, np.flatnonzero(areas >= opts.min_lung_area_mm2) + 1) & ~trachea
    lungs = ndimage.binary_fill_holes(lungs) & ~trachea
    left, right = split_left_right(lungs, body, columns_toward_left)
    return L.compose(body, left, right, trachea, np.zeros_like(body))


NODULE_MIN_PART = 0.1  # a nodule mask's part apart from its largest, as a share of it, that is kept


def nodule_mask(image, z, spacing_rc, center, diameter_mm):
    """The study's nodule mask: a sphere of the annotated diameter at the annotated centre, cut at
    the mean of the two k-means centres of the intensities inside it, less specks apart from the lesion.

    image: windowed uint8 [Z,H,W]; z: slice positions (mm); spacing_rc: (row, column) mm;
    center: fractional (slice, row, column) index.
    """
    mask = np.zeros(image.shape, bool)
    radius = diameter_mm / 2
    zc = float(np.interp(center[0], np.arange(len(z)), z))
    ks = np.flatnonzero(np.abs(z - zc) <= radius)
    if len(ks) == 0:
        return mask
    r0, r1 = int(np.floor(center[1] - radius / spacing_rc[0])), int(np.ceil(center[1] + radius / spacing_rc[0])) + 1
    c0, c1 = int(np.floor(center[2] - radius / spacing_rc[1])), int(np.ceil(center[2] + radius / spacing_rc[1])) + 1
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, image.shape[1]), min(c1, image.shape[2])
    if r0 >= r1 or c0 >= c1:
        return mask
    rr, cc = np.mgrid[r0:r1, c0:c1]
    planar = ((rr - center[1]) * spacing_rc[0]) ** 2 + ((cc - center[2]) * spacing_rc[1]) ** 2
    sphere = (z[ks, None, None] - zc) ** 2 + planar[None] <= radius ** 2
    values = image[ks][:, r0:r1, c0:c1][sphere].astype(np.float64)
    if values.size < 2 or values.min() == values.max():
        return mask
    centres = KMeans(n_clusters=2, n_init=3, random_state=0).fit(values.reshape(-1, 1)).cluster_centers_
    threshold = float(centres.mean())
    cut = sphere & (image[ks][:, r0:r1, c0:c1] > threshold)
    # The cut also keeps specks at the sphere's edge (a vessel: a voxel or two, on a slice of their own a
    # nodule slice with a 1-pixel box): the nodule is its largest connected part and any other of at least
    # NODULE_MIN_PART of it (a nodule the cut splits).
    parts, count = ndimage.label(cut, structure=np.ones((3, 3, 3)))
    if count > 1:
        sizes = np.bincount(parts.ravel())[1:]
        cut = np.isin(parts, np.flatnonzero(sizes >= NODULE_MIN_PART * sizes.max()) + 1)
    mask[ks[:, None, None], rr[None], cc[None]] = cut
    return mask
