"""Mask fidelity of synthetic slices: segment each one with our own lesion-map code and compare with
the map that conditioned it. Needs no downloaded weights, unlike FID-style scores."""

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.cluster import KMeans

from nodulesynth.masks import labels as L
from nodulesynth.masks.segment import segment_slice

CLASSES = (L.LEFT_LUNG, L.RIGHT_LUNG, L.TRACHEA, L.BODY)
HU_PER_LEVEL = 1400.0 / 255.0  # the [-1000, 400] window


def _dice(a, b):
    total = a.sum() + b.sum()
    return np.nan if total == 0 else 2.0 * (a & b).sum() / total


def nodule_scores(image, label, margin=3):
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
    contrast = np.nan if not ring.any() else (image[nodule].mean() - image[ring].mean()) * HU_PER_LEVEL
    return _dice(predicted, nodule), contrast


def fidelity_table(images, labels, columns_toward_left=True) -> pd.DataFrame:
    """One row per slice: Dice per class between our segmentation of the image and its map."""
    rows = []
    for image, label in zip(images, labels):
        seg = segment_slice(image, columns_toward_left)
        row = {L.NAMES[c]: _dice(seg == c, label == c) for c in CLASSES}
        row["nodule"], row["nodule_contrast_hu"] = nodule_scores(image, label)
        rows.append(row)
    return pd.DataFrame(rows, columns=[L.NAMES[c] for c in CLASSES] + ["nodule", "nodule_contrast_hu"])


def mask_fidelity(images, labels, columns_toward_left=True) -> dict:
    """Mean of each fidelity column over the slices where it is defined."""
    table = fidelity_table(images, labels, columns_toward_left)
    return {name: float(table[name].mean()) for name in table.columns}
