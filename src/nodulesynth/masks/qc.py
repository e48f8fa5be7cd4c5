"""QC montage: a grid of slices with their lesion maps overlaid in the display palette."""

import cv2
import numpy as np

from nodulesynth.io import atomic_path
from nodulesynth import labels as L


def pick_slices(has_nodule, count):
    """Evenly spaced slices through the stack, plus the middle slice of the nodules when there are any."""
    n, nodule_idx = len(has_nodule), np.flatnonzero(has_nodule)
    even = np.linspace(0, n - 1, min(count - (len(nodule_idx) > 0), n)).round().astype(int)
    picks = set(even.tolist())
    if len(nodule_idx):
        picks.add(int(nodule_idx[len(nodule_idx) // 2]))
    return np.array(sorted(picks), int)


def overlay(image, label, alpha=0.4):
    gray = np.repeat(image[..., None], 3, axis=-1).astype(np.float32)
    colour = L.colorize(label).astype(np.float32)
    tinted = np.where((label > 0)[..., None], (1 - alpha) * gray + alpha * colour, gray)
    return tinted.clip(0, 255).astype(np.uint8)


def montage(stack, count=12, columns=4, tile=192):
    """RGB montage of `count` slices: image | overlay pairs with the slice index written on each."""
    if len(stack) == 0:
        canvas = np.zeros((tile, 2 * tile, 3), np.uint8)
        cv2.putText(canvas, f"{stack.scan_id}: rejected", (8, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        for i, start in enumerate(range(0, len(stack.reason), 40)):
            cv2.putText(canvas, stack.reason[start:start + 40], (8, 50 + 20 * i), cv2.FONT_HERSHEY_SIMPLEX,
                        0.45, (200, 200, 200), 1)
        return canvas
    idx = pick_slices(stack.has_nodule, count)
    tiles = []
    for i in idx:
        img = cv2.resize(stack.image[i], (tile, tile), interpolation=cv2.INTER_AREA)
        lab = cv2.resize(stack.label[i], (tile, tile), interpolation=cv2.INTER_NEAREST)
        pair = np.concatenate([np.repeat(img[..., None], 3, -1), overlay(img, lab)], axis=1)
        cv2.putText(pair, f"slice {stack.slice_index[i]}", (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        tiles.append(pair)
    rows = -(-len(tiles) // columns)
    while len(tiles) < rows * columns:
        tiles.append(np.zeros_like(tiles[0]))
    grid = [np.concatenate(tiles[r * columns:(r + 1) * columns], axis=1) for r in range(rows)]
    return np.concatenate(grid, axis=0)


def write_montage(path, stack, count=12):
    with atomic_path(path) as tmp:
        # OpenCV writes BGR; the palette is RGB.
        if not cv2.imwrite(str(tmp), montage(stack, count)[..., ::-1]):
            raise OSError(f"could not write {path}")
