"""The study's one HU window: CT numbers in [min_hu, max_hu] mapped linearly onto grey levels 0..255.

Every stage's images are uint8 in this window (slice stacks, the generators' training and output images, the
detectors' inputs). Thresholds given in HU (masks.lung_threshold_hu) and contrasts reported in HU (fidelity)
go through the same mapping, so a change of the config's `window` moves them all together.
"""

from dataclasses import dataclass

import numpy as np

from nodulesynth.errors import InputError
from nodulesynth.options import SectionOptions

DEFAULT_WINDOW = (-1000.0, 400.0)  # config.yaml window.min_hu, window.max_hu


@dataclass(frozen=True)
class WindowOptions(SectionOptions):
    """The config's `window` section: the HU range mapped onto 0..255."""

    SECTION = "window"

    min_hu: float = DEFAULT_WINDOW[0]
    max_hu: float = DEFAULT_WINDOW[1]

    def __post_init__(self):
        if not self.min_hu < self.max_hu:
            raise InputError(f"window.min_hu ({self.min_hu:g}) must be below window.max_hu ({self.max_hu:g})")


def window_from_config(cfg: dict | None) -> tuple[float, float]:
    """The config's `window` section -> (min_hu, max_hu); unknown keys and an empty window are errors."""
    options = WindowOptions.from_config(cfg)
    return options.min_hu, options.max_hu


def hu_to_level(hu, window=DEFAULT_WINDOW):
    """HU -> grey level, neither rounded nor clipped (an HU threshold compared with windowed images)."""
    min_hu, max_hu = window
    return (hu - min_hu) * (255.0 / (max_hu - min_hu))


def hu_per_level(window=DEFAULT_WINDOW) -> float:
    """HU per grey level of an image windowed onto 0..255."""
    return (window[1] - window[0]) / 255.0


def apply_window(hu, window=DEFAULT_WINDOW) -> np.ndarray:
    """HU array -> uint8 image, [min_hu, max_hu] mapped linearly onto 0..255 (float32 arithmetic)."""
    return np.clip(np.rint(hu_to_level(np.asarray(hu).astype(np.float32), window)), 0, 255).astype(np.uint8)
