"""The lesion-map label set shared by every stage."""

import numpy as np

BACKGROUND, LEFT_LUNG, RIGHT_LUNG, TRACHEA, BODY, NODULE = range(6)
NUM_CLASSES = 6
NAMES = ("background", "left_lung", "right_lung", "trachea", "body", "nodule")

# Display palette (RGB): black, orange, green, cyan, blue, and magenta for nodules.
PALETTE = np.array(
    [[0, 0, 0], [255, 140, 0], [0, 200, 0], [0, 220, 220], [40, 80, 255], [255, 0, 200]],
    dtype=np.uint8,
)


def compose(body, left_lung, right_lung, trachea, nodule):
    """Boolean masks -> one label map, precedence nodule > trachea > lungs > body > background."""
    label = np.zeros(body.shape, dtype=np.uint8)
    for mask, value in ((body, BODY), (left_lung, LEFT_LUNG), (right_lung, RIGHT_LUNG),
                        (trachea, TRACHEA), (nodule, NODULE)):
        label[mask] = value
    return label


def colorize(label):
    """Label map -> RGB image in the display palette."""
    return PALETTE[label]
