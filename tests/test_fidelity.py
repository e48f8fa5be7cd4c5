"""Mask fidelity: real slices score high against their own maps; noise scores low."""

import numpy as np

from nodulesynth.data.slices import load_slices
from nodulesynth.masks.fidelity import mask_fidelity


def test_real_slices_score_high_and_noise_scores_low(demo_slice_paths):
    stack = load_slices(demo_slice_paths[0])
    real = mask_fidelity(stack.image, stack.label)
    for name in ("body", "left_lung", "right_lung"):
        assert real[name] > 0.95, (name, real[name])
    assert real["trachea"] > 0.6
    assert real["nodule"] > 0.6 and real["nodule_contrast_hu"] > 300

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, stack.image.shape, dtype=np.uint8)
    fake = mask_fidelity(noise, stack.label)
    for name in ("body", "left_lung", "right_lung"):
        assert fake[name] < 0.5, (name, fake[name])
    assert abs(fake["nodule_contrast_hu"]) < 100
