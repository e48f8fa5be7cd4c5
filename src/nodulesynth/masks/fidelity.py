"""Mask fidelity of synthetic slices: segment each one with our own lesion-map code and compare with
the map that conditioned it. Needs no downloaded weights, unlike FID-style scores.

The segmentation uses the run's own `window` and `masks` settings and each stack's own pixel size (from
the real stack its maps came from), so a change of either moves the measure with the lesion maps. Every
stack is in the canonical orientation (column index toward the patient's left: see nodulesynth.data.ingest),
so left and right need no per-stack orientation. Slices synthesised from a fold's training maps and from
its held-out test maps (evaluation only) are scored apart, labelled by `split`.
"""

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.cluster import KMeans

from nodulesynth.data.slices import load_slice_info, load_slices
from nodulesynth import labels as L
from nodulesynth.data.window import DEFAULT_WINDOW, hu_per_level
from nodulesynth.errors import InputError
from nodulesynth.masks.segment import MaskOptions, segment_slice

CLASSES = (L.LEFT_LUNG, L.RIGHT_LUNG, L.TRACHEA, L.BODY)
COLUMNS = [L.NAMES[c] for c in CLASSES] + ["nodule", "nodule_contrast_hu"]
SPLITS = ("train", "heldout")  # maps of the fold's training patients | of its test patients (evaluation only)


def _dice(a, b):
    total = a.sum() + b.sum()
    return np.nan if total == 0 else 2.0 * (a & b).sum() / total


def field_of_view(path, info: dict | None = None) -> tuple:
    """(rows, columns) extent in mm of a real slice stack: its `spacing` (slice, row, column mm) times its
    image size. `info`: the stack's `load_slice_info`, when already read. The size is read from the .npy header
    inside the npz, so the images are not decompressed (a fold's stacks hold tens of thousands of slices)."""
    info = info or load_slice_info(path)
    if "spacing" not in info["extra"]:
        raise InputError(f"{path}: no 'spacing' array (a slice stack of the masks step has one)")
    spacing = np.asarray(info["extra"]["spacing"], float)
    with zipfile.ZipFile(path) as archive, archive.open("image.npy") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(fh)[0]
    return float(spacing[1] * shape[1]), float(spacing[2] * shape[2])


def pixel_mm(fov, shape) -> float:
    """Side (mm) of a square pixel of the same area as one of an image of `shape` (…, H, W) over `fov` (mm)."""
    return float(np.sqrt(fov[0] / shape[-2] * fov[1] / shape[-1]))


def nodule_scores(image, label, margin=3, window=DEFAULT_WINDOW):
    """(Dice, contrast in HU) of the nodule: a k-means cut inside a disc around the conditioning nodule,
    as the mask stage does in 3D, and the nodule's mean minus the surrounding lung's mean."""
    nodule = label == L.NODULE
    if not nodule.any():
        return np.nan, np.nan
    disc = ndimage.binary_dilation(nodule, iterations=margin)
    values = image[disc].astype(np.float64).reshape(-1, 1)
    if values.min() == values.max():
        predicted = np.zeros_like(nodule)
    else:
        threshold = KMeans(n_clusters=2, n_init=3, random_state=0).fit(values).cluster_centers_.mean()
        predicted = disc & (image > threshold)
    ring = ndimage.binary_dilation(nodule, iterations=2 * margin) & ~disc
    ring &= (label == L.LEFT_LUNG) | (label == L.RIGHT_LUNG)
    contrast = np.nan if not ring.any() else (image[nodule].mean() - image[ring].mean()) * hu_per_level(window)
    return _dice(predicted, nodule), contrast


def fidelity_table(images, labels, pixel_mm=None, opts: MaskOptions | None = None,
                   window=DEFAULT_WINDOW) -> pd.DataFrame:
    """One row per slice: Dice per class between our segmentation of the image and its map.

    pixel_mm: the images' pixel size (None: segment_slice's assumed chest field of view); opts and window:
    the run's masks and window settings, as the lesion maps were made with.
    """
    opts = opts or MaskOptions()
    rows = []
    for image, label in zip(images, labels):
        seg = segment_slice(image, True, pixel_mm, opts, window)
        row = {L.NAMES[c]: _dice(seg == c, label == c) for c in CLASSES}
        row["nodule"], row["nodule_contrast_hu"] = nodule_scores(image, label, window=window)
        rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


def mask_fidelity(images, labels, pixel_mm=None, opts: MaskOptions | None = None, window=DEFAULT_WINDOW) -> dict:
    """Mean of each fidelity column over the slices where it is defined."""
    table = fidelity_table(images, labels, pixel_mm, opts, window)
    return {name: float(table[name].mean()) for name in table.columns}


def synthetic_fidelity(synth_dirs: dict, source_paths, opts: MaskOptions | None = None,
                       window=DEFAULT_WINDOW) -> pd.DataFrame:
    """Fidelity of every synthetic slice under each folder of `synth_dirs` ({split: folder}): columns split,
    scan_id, slice_index and the fidelity columns. A stack's pixel size is its source stack's field of view
    (`source_paths`, the real stacks whose maps were sampled, matched by scan_id) over its own image size."""
    fovs = {}
    for path in source_paths:
        info = load_slice_info(path)
        if info["status"] == "ok":
            fovs[info["scan_id"]] = field_of_view(path, info)
    tables = []
    for split, folder in synth_dirs.items():
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        before = len(tables)
        for path in sorted(Path(folder).glob("*.npz")):
            stack = load_slices(path)
            if stack.status != "ok" or not len(stack):
                continue
            if stack.scan_id not in fovs:
                raise InputError(f"{path}: its source stack (scan {stack.scan_id}) is not among the given slice stacks")
            table = fidelity_table(stack.image, stack.label, pixel_mm(fovs[stack.scan_id], stack.image.shape),
                                   opts, window)
            table.insert(0, "slice_index", stack.slice_index)
            table.insert(0, "scan_id", stack.scan_id)
            table.insert(0, "split", split)
            tables.append(table)
        if len(tables) == before:
            raise InputError(f"no synthetic slices under {folder} ({split})")
    if not tables:
        raise InputError("no synthetic folders given")
    return pd.concat(tables, ignore_index=True)
