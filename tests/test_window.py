"""The one HU window of every stage (nodulesynth.data.window)."""

import numpy as np
import pytest

from nodulesynth.data.window import DEFAULT_WINDOW, apply_window, hu_per_level, hu_to_level, window_from_config


def test_window_maps_its_bounds_onto_0_and_255_and_clips_outside():
    hu = np.array([-3000, -1000, -300, 400, 3000], dtype=np.int16)
    assert apply_window(hu).tolist() == [0, 0, 128, 255, 255]  # -300 HU: level 127.5, rounded to even
    assert apply_window(hu, (-1000.0, 3000.0)).tolist() == [0, 0, 45, 89, 255]
    assert apply_window(hu).dtype == np.uint8


def test_hu_threshold_and_contrast_go_through_the_same_mapping():
    for window in (DEFAULT_WINDOW, (-1350.0, 150.0)):
        level = hu_to_level(-400.0, window)
        assert np.isclose(window[0] + level * hu_per_level(window), -400.0)
        assert apply_window(np.array([-400.0]), window)[0] == round(level)


def test_window_config_is_checked():
    assert window_from_config({}) == DEFAULT_WINDOW
    assert window_from_config({"min_hu": -1200, "max_hu": 600}) == (-1200.0, 600.0)
    with pytest.raises(KeyError, match="window.max"):
        window_from_config({"max": 400})
    with pytest.raises(ValueError, match="window.min_hu"):
        window_from_config({"min_hu": 400, "max_hu": 400})
