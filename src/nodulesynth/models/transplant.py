"""New lesion maps beyond the real ones: a real nodule's shape placed inside the lung of a nodule-free map.

The shape (size and outline) is drawn from the nodules of the given stacks, turned by a random
multiple of 90 degrees and possibly mirrored, and put where it and a one-pixel ring around it lie
entirely inside ONE lung label, so it touches neither the other lung, the trachea, the body wall nor
the background. Shared by the SDM and SPADE samplers; with the same numpy Generator both arms
get the same maps.
"""

import numpy as np
from scipy import ndimage

from nodulesynth.errors import InputError
from nodulesynth.labels import LEFT_LUNG, NODULE, RIGHT_LUNG

RING = np.ones((3, 3), bool)  # 8-connected: the ring also covers diagonal neighbours


def nodule_shapes(labels: np.ndarray, min_area: int = 3) -> list:
    """Bounding-box crops (bool) of every 8-connected nodule component in label maps [N,H,W] or [H,W]."""
    labels = np.asarray(labels)
    labels = labels[None] if labels.ndim == 2 else labels
    shapes = []
    for label in labels:
        nodule = label == NODULE
        if not nodule.any():
            continue
        components, count = ndimage.label(nodule, structure=RING)
        for box_index, box in enumerate(ndimage.find_objects(components), start=1):
            crop = components[box] == box_index
            if crop.sum() >= min_area:
                shapes.append(crop)
    return shapes


def is_nodule_free(label: np.ndarray) -> bool:
    return not (np.asarray(label) == NODULE).any()


def _valid_centres(region: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """Pixels p where the footprint, anchored at p - shape // 2, lies wholly inside `region`."""
    inside = ndimage.correlate(region.astype(np.int32), footprint.astype(np.int32), mode="constant", cval=0)
    return inside == int(footprint.sum())


def transplant_nodule(label: np.ndarray, shapes: list, rng: np.random.Generator, max_tries: int = 10):
    """`label` with one nodule added inside a lung, or None when no drawn shape fits anywhere."""
    label = np.asarray(label)
    if not shapes:
        raise InputError("no nodule shapes to transplant")
    for _ in range(max_tries):
        shape = np.rot90(shapes[rng.integers(len(shapes))], int(rng.integers(4)))
        if rng.random() < 0.5:
            shape = shape[:, ::-1]
        padded = np.pad(shape, 1)
        footprint = ndimage.binary_dilation(padded, structure=RING)
        for lung_id in rng.permutation([LEFT_LUNG, RIGHT_LUNG]):
            valid = _valid_centres(label == lung_id, footprint)
            ys, xs = np.nonzero(valid)
            if not len(ys):
                continue
            j = rng.integers(len(ys))
            top, left = ys[j] - footprint.shape[0] // 2, xs[j] - footprint.shape[1] // 2
            out = label.copy()
            window = out[top:top + padded.shape[0], left:left + padded.shape[1]]
            window[padded] = NODULE
            return out
    return None


def choose_maps(labels: np.ndarray, mask_source: str, rng: np.random.Generator, shapes=None,
                max_slices: int | None = None, nodule_maps: int | None = 0):
    """The lesion maps to synthesise from one stack: (indices into the stack, label maps [n,H,W]).

    "real": the stack's own maps (evenly spaced subset when `max_slices` is given), together with
    `nodule_maps` evenly spaced maps that hold a nodule (None: every one), each map at most once: the
    downstream arms add synthetic nodule slices in proportion to the real ones.
    "transplant": its nodule-free maps (evenly spaced subset) each given a transplanted nodule; a
    map where no shape fits (a lung apex) is replaced by other nodule-free maps, evenly spread
    again, until `max_slices` maps are made or none are left.
    """
    labels = np.asarray(labels)
    if mask_source == "real":
        indices = _evenly(np.arange(len(labels)), max_slices)
        if nodule_maps != 0:
            with_nodule = np.flatnonzero((labels == NODULE).any((1, 2)))
            indices = np.union1d(indices, _evenly(with_nodule, nodule_maps)).astype(np.int64)
        return indices, labels[indices]
    if mask_source != "transplant":
        raise InputError(f"mask_source must be 'real' or 'transplant', got {mask_source!r}")
    remaining = [i for i in range(len(labels)) if is_nodule_free(labels[i])]
    made = {}
    while remaining and (max_slices is None or len(made) < max_slices):
        wanted = None if max_slices is None else max_slices - len(made)
        for i in _evenly(np.array(remaining, np.int64), wanted).tolist():
            remaining.remove(i)
            new = transplant_nodule(labels[i], shapes, rng)
            if new is not None:
                made[i] = new
    if not made:
        return np.zeros(0, np.int64), np.zeros((0, *labels.shape[1:]), labels.dtype)
    indices = np.array(sorted(made), np.int64)
    return indices, np.stack([made[i] for i in indices])


def _evenly(indices: np.ndarray, count: int | None) -> np.ndarray:
    if count is None or len(indices) <= count:
        return np.asarray(indices, np.int64)
    return np.asarray(indices)[np.round(np.linspace(0, len(indices) - 1, count)).astype(np.int64)]
