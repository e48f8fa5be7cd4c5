"""Per-scan lesion maps: the volume file -> kept slices with labels, nodule boxes, and the annotated nodules
that gave no mask (each with the reason, for results/cohort/dropped_nodules.tsv); the boxes of the annotated
findings that do not count (`excluded_boxes`, `{scan}.excluded.tsv`)."""

import numpy as np
import pandas as pd

from nodulesynth.data.cohort import DROPPED_COLUMNS
from nodulesynth.data.slices import SliceStack
from nodulesynth.data.window import DEFAULT_WINDOW, apply_window
from nodulesynth import labels as L
from nodulesynth.masks.segment import MaskOptions, nodule_mask, segment_volume

NODULE_COLUMNS = ["slice_index", "nodule", "x0", "y0", "x1", "y1"]
EXCLUDED_COLUMNS = ["slice_index", "finding", "x0", "y0", "x1", "y1"]  # `{scan}.excluded.tsv`


def lesion_maps(hu, z, spacing, orientation, nodules, opts: MaskOptions, window=DEFAULT_WINDOW):
    """HU volume -> (windowed image, label volume, keep mask over slices, per-nodule masks).

    Raises ValueError when the scan holds no lung.
    """
    image = apply_window(hu, window)
    columns_toward_left = bool(orientation[0] > 0)
    masks = segment_volume(image, spacing, columns_toward_left, opts, window)
    nodule_masks = {int(n[0]): nodule_mask(image, z, spacing[1:], n[1:4], n[4]) for n in nodules}
    any_nodule = np.zeros_like(masks.body)
    for m in nodule_masks.values():
        any_nodule |= m
    label = L.compose(masks.body, masks.left_lung, masks.right_lung, masks.trachea, any_nodule)
    lung_area = (masks.left_lung | masks.right_lung).sum((1, 2)) * spacing[1] * spacing[2]
    keep = lung_area >= opts.min_lung_area_mm2
    return image, label, keep, nodule_masks


def nodule_boxes(nodule_masks, keep):
    """One row per (kept slice, nodule): the pixel box, x1 and y1 exclusive."""
    rows = []
    for nodule_id, mask in nodule_masks.items():
        for k in np.flatnonzero(mask.any((1, 2)) & keep):
            ys, xs = np.nonzero(mask[k])
            rows.append(dict(slice_index=int(k), nodule=nodule_id, x0=int(xs.min()), y0=int(ys.min()),
                             x1=int(xs.max()) + 1, y1=int(ys.max()) + 1))
    return pd.DataFrame(rows, columns=NODULE_COLUMNS).sort_values(["slice_index", "nodule"], ignore_index=True)


def empty_mask_reason(image_shape, z, spacing_rc, center, diameter_mm):
    """Why `nodule_mask` found no voxel for a nodule: its early exits, read off the same geometry."""
    radius = diameter_mm / 2
    zc = float(np.interp(center[0], np.arange(len(z)), z))
    if not (np.abs(np.asarray(z) - zc) <= radius).any():
        return f"no slice within its radius ({radius:.1f} mm) of its centre at z {zc:.1f} mm"
    reach = (radius / spacing_rc[0], radius / spacing_rc[1])
    if not all(-r <= c < n + r for c, r, n in zip(center[1:], reach, image_shape[1:])):
        return "its sphere lies outside the image"
    return "no contrast inside its sphere (one intensity throughout, or under two voxels: nothing to cut)"


def dropped_nodules(scan_id, nodules, nodule_masks, keep, z, spacing) -> pd.DataFrame:
    """One row (scan_id, nodule, reason) per annotated nodule that appears on no kept slice."""
    rows = []
    for n in nodules:
        mask = nodule_masks[int(n[0])]
        if not mask.any():
            reason = "empty mask: " + empty_mask_reason(mask.shape, z, spacing[1:], n[1:4], n[4])
        elif not (mask.any((1, 2)) & keep).any():
            reason = "its mask lies only on slices dropped for too little lung (masks.min_lung_area_mm2)"
        else:
            continue
        rows.append(dict(scan_id=scan_id, nodule=int(n[0]), reason=reason))
    return pd.DataFrame(rows, columns=DROPPED_COLUMNS)


def scan_lesion_maps(volume_file, opts: MaskOptions, window=DEFAULT_WINDOW):
    """Load a volume file (see nodulesynth.data.ingest) -> (SliceStack, nodule box table, dropped-nodule table)."""
    no_boxes, none_dropped = pd.DataFrame(columns=NODULE_COLUMNS), pd.DataFrame(columns=DROPPED_COLUMNS)
    with np.load(volume_file, allow_pickle=False) as data:
        scan_id, patient_id = str(data["scan_id"]), str(data["patient_id"])
        if str(data["status"]) != "ok":  # already in rejected.tsv with its reason
            return SliceStack.rejected(scan_id, patient_id, str(data["reason"])), no_boxes, none_dropped
        hu, z, spacing = data["hu"], data["z"], tuple(data["spacing"])
        orientation, nodules = data["orientation"], data["nodules"]
    try:
        image, label, keep, nodule_masks = lesion_maps(hu, z, spacing, orientation, nodules, opts, window)
    except ValueError as err:
        return SliceStack.rejected(scan_id, patient_id, str(err), hu.shape[1:]), no_boxes, none_dropped
    if not keep.any():  # an "ok" stack of no slice would reach the folds and stop every arm of its fold
        reason = f"no slice holds {opts.min_lung_area_mm2:g} mm² of lung (masks.min_lung_area_mm2)"
        return SliceStack.rejected(scan_id, patient_id, reason, hu.shape[1:]), no_boxes, none_dropped
    idx = np.flatnonzero(keep)
    stack = SliceStack(image=image[idx], label=label[idx], z=z[idx], slice_index=idx.astype(np.int32),
                       has_nodule=(label[idx] == L.NODULE).any((1, 2)), scan_id=scan_id,
                       patient_id=patient_id, extra={"spacing": np.array(spacing)})
    return stack, nodule_boxes(nodule_masks, keep), dropped_nodules(scan_id, nodules, nodule_masks, keep, z, spacing)


def slice_stack(volume_file, opts: MaskOptions, window=DEFAULT_WINDOW):
    """(SliceStack, nodule box table) of `scan_lesion_maps`, for callers that write no dropped-nodule table."""
    stack, boxes, _ = scan_lesion_maps(volume_file, opts, window)
    return stack, boxes


def excluded_boxes(volume_file, slice_index, slice_z) -> pd.DataFrame:
    """`{scan}.excluded.tsv`: one row (slice_index, finding, x0, y0, x1, y1) per kept slice (`slice_index`, at
    `slice_z` mm: the slice stack's) that cuts the sphere of an excluded finding (the volume file's `excluded`: id,
    slice, row, column, diameter mm), boxed as nodules are (pixels, x1 and y1 exclusive) around its disc on that
    slice. The per-nodule FROC ignores detections within them. A volume without the array (ingested before
    findings were kept) has none."""
    rows = []
    with np.load(volume_file, allow_pickle=False) as data:
        if str(data["status"]) == "ok" and "excluded" in data.files:
            findings, z, spacing = data["excluded"].reshape(-1, 5), data["z"], tuple(data["spacing"])
            for finding, slice_, row, column, diameter in findings:
                radius = diameter / 2
                zc = float(np.interp(slice_, np.arange(len(z)), z))
                for k, zk in zip(slice_index, slice_z):
                    if abs(zk - zc) >= radius:
                        continue
                    disc = np.sqrt(radius ** 2 - (zk - zc) ** 2)  # mm: the sphere's cut at this slice
                    # pixel i spans [i, i + 1) in box coordinates: a centre at index c lies at c + 0.5
                    rows.append(dict(slice_index=int(k), finding=int(finding),
                                     x0=round(column + 0.5 - disc / spacing[2], 2),
                                     y0=round(row + 0.5 - disc / spacing[1], 2),
                                     x1=round(column + 0.5 + disc / spacing[2], 2),
                                     y1=round(row + 0.5 + disc / spacing[1], 2)))
    return pd.DataFrame(rows, columns=EXCLUDED_COLUMNS)
