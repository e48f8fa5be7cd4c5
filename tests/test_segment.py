"""nodulesynth.masks.segment on small constructed volumes: what the phantom's clean anatomy never shows."""

import numpy as np

from nodulesynth.masks.segment import MaskOptions, track_trachea


def disk(shape, centre, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def airway_volume(touching=(18, 19, 20), within_lung=range(0, 10), wall=None):
    """30 slices (inferior -> superior) of 128 x 128 pixels: a body, two lungs, and a trachea of radius 7 down the
    middle from the top to slice 10; on the `touching` slices the right lung reaches it over a broad front (a thin
    tracheal wall read as air), and on the `within_lung` slices the airway lies inside a lung's air. `wall`: the
    right lung lies that many pixels from the airway on every slice (its wall), and on the `touching` slices the
    wall is air."""
    n, shape = 30, (128, 128)
    body = np.zeros((n, *shape), bool)
    body[:, 10:118, 5:123] = True
    air = np.zeros_like(body)
    air[:, 30:100, 15:52] = True   # one lung
    air[:, 30:100, 76:113] = True  # the other
    for k in range(10, n):
        air[k] |= disk(shape, (62, 64), 7)
    if wall is not None:
        air[:, 58:70, 52:57 - wall] = True  # the lung up to the airway's wall
    for k in touching:
        air[k, 58:70, 52:58] = True  # the lung up against the airway
    for k in within_lung:
        air[k, 30:100, 15:113] = True
    return air, body


def test_the_trachea_is_followed_past_a_lung_it_touches_down_to_where_it_enters_one():
    """LIDC-IDRI-0001's trachea touches its right lung on three slices at -400 HU; tracking used to stop there and
    the 14 slices of trachea below went to the right lung (the study's lesion maps had a trachea on half its
    length, and mask fidelity a trachea ceiling of 0.3)."""
    air, body = airway_volume()
    trachea = track_trachea(air, body, 1.0, 1.0, MaskOptions())
    tube = disk(air.shape[1:], (62, 64), 7)
    found = np.flatnonzero(trachea.any((1, 2)))
    assert found.tolist() == list(range(10, 30)), found
    for k in (18, 19, 20):  # the airway (a disc its size about it), not the lung it touches
        assert (trachea[k] & ~tube).sum() <= 0.05 * tube.sum() and (trachea[k] & tube).sum() >= 0.95 * tube.sum()
    assert not trachea[:, :, :52].any()  # nothing of the lung itself (columns 15-51)
    # Without the contact the same airway, and inside lung nothing: an airway within lung is not the trachea.
    assert np.array_equal(track_trachea(*airway_volume(touching=()), 1.0, 1.0, MaskOptions()).any((1, 2)),
                          trachea.any((1, 2)))
    # A one-pixel wall at LIDC-IDRI's 0.7-mm pixels: the airway cut out of a merged slice (widened by 1.5 mm)
    # reaches past the wall into the lung; the slice below, the airway apart again, is still its continuation.
    thin = track_trachea(*airway_volume(wall=1, within_lung=()), 0.7 ** 2, 2.5, MaskOptions())
    assert np.flatnonzero(thin.any((1, 2))).tolist() == list(range(10, 30))
    assert not thin[:, :, :57].any()
    # Slices where the airway meets a lung and is not seen apart again below are not kept: it ends there.
    ending = track_trachea(*airway_volume(touching=(10, 11), within_lung=()), 1.0, 1.0, MaskOptions())
    assert np.flatnonzero(ending.any((1, 2))).tolist() == list(range(12, 30))


def test_a_nodule_mask_keeps_its_lesion_and_drops_specks_of_the_spheres_edge():
    """LIDC-IDRI-0001's sphere-and-k-means mask held a voxel on slice 84 and two on slice 85 apart from its
    nodule (vessels at the sphere's edge): each made a nodule slice with a 1-pixel box. A nodule is its largest
    connected part and any other at least a tenth of it (a nodule the cut splits in two keeps both)."""
    from nodulesynth.masks.segment import nodule_mask

    shape = (21, 64, 64)
    z = np.arange(shape[0]) * 1.0  # 1-mm slices and pixels
    image = np.full(shape, 40, np.uint8)  # lung
    blob = np.zeros(shape, bool)
    for k in range(7, 14):
        blob[k] |= disk(shape[1:], (32, 32), 5)
    image[blob] = 200
    image[3, 32, 36] = 200  # specks within the 20-mm sphere, apart from the nodule
    image[4, 33, 37] = image[4, 33, 38] = 200
    mask = nodule_mask(image, z, (1.0, 1.0), (10.0, 32.0, 32.0), 20.0)
    assert np.array_equal(mask, blob), (np.flatnonzero(mask.any((1, 2))), (mask & ~blob).sum())
    # A nodule cut into two parts of like size keeps both.
    second = np.zeros(shape, bool)
    for k in range(7, 14):
        second[k] |= disk(shape[1:], (32, 44), 3)
    image[second] = 200
    assert np.array_equal(nodule_mask(image, z, (1.0, 1.0), (10.0, 32.0, 36.0), 28.0), blob | second)
