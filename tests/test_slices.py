"""The slice-stack file is a contract: `load_slices` and `load_slice_info` refuse a stack missing any key,
naming the file and the key, instead of filling in defaults (status "ok", z zeros, ...)."""

import numpy as np
import pytest

from nodulesynth.data.slices import REQUIRED_KEYS, SliceStack, load_slice_info, load_slices, save_slices


def small_stack():
    label = np.zeros((3, 8, 8), np.uint8)
    label[1, 2:4, 2:4] = 5
    image = (np.arange(3 * 8 * 8) % 256).astype(np.uint8).reshape(3, 8, 8)
    return SliceStack(image, label, np.array([0.0, 2.5, 5.0]), np.array([4, 5, 6]), (label == 5).any((1, 2)),
                      "S1", "P1", "ok", "", extra={"spacing": np.array([0.7, 0.7])})


def test_roundtrip_keeps_every_key(tmp_path):
    path = tmp_path / "S1.npz"
    save_slices(path, small_stack())
    with np.load(path) as data:
        assert set(REQUIRED_KEYS) <= set(data.files)
    stack, info = load_slices(path), load_slice_info(path)
    assert np.array_equal(stack.z, [0.0, 2.5, 5.0]) and stack.slice_index.tolist() == [4, 5, 6]
    assert stack.has_nodule.tolist() == [False, True, False] and (stack.scan_id, stack.patient_id) == ("S1", "P1")
    assert np.array_equal(stack.extra["spacing"], [0.7, 0.7]) and set(stack.extra) == {"spacing"}
    assert (info["scan_id"], info["patient_id"], info["status"], info["slices"]) == ("S1", "P1", "ok", 3)
    assert set(info["extra"]) == {"spacing"}


@pytest.mark.parametrize("missing", ["status", "z", "slice_index", "has_nodule", "scan_id", "patient_id", "reason",
                                     "label"])
def test_a_missing_key_is_an_error_naming_file_and_key(tmp_path, missing):
    stack = small_stack()
    arrays = dict(image=stack.image, label=stack.label, z=stack.z, slice_index=stack.slice_index,
                  has_nodule=stack.has_nodule, scan_id=stack.scan_id, patient_id=stack.patient_id,
                  status=stack.status, reason=stack.reason)
    del arrays[missing]
    path = tmp_path / "partial.npz"
    np.savez(path, **arrays)
    for load in (load_slices, load_slice_info):
        with pytest.raises(KeyError) as err:
            load(path)
        message = err.value.args[0]
        assert str(path) in message and repr(missing) in message


def test_resize_averages_when_shrinking_and_interpolates_when_enlarging():
    from nodulesynth.data.slices import resize_slices

    image = np.zeros((1, 4, 4), np.uint8)
    image[0, :, 2:] = 200
    label = (image // 200 * 5).astype(np.uint8)
    small, small_label = resize_slices(image, label, 2)
    np.testing.assert_array_equal(small[0], [[0, 200], [0, 200]])  # 2x2 blocks averaged
    big, big_label = resize_slices(image, label, 8)
    row = big[0, 0].astype(int)
    assert row[0] == 0 and row[-1] == 200 and 0 < row[3] < 200 and 0 < row[4] < 200  # a ramp at the edge, no blocks
    assert set(np.unique(big_label)) == {0, 5}  # maps keep their labels (nearest neighbour)
    np.testing.assert_array_equal(big_label[0, :, :4], 0)
