"""The downstream arms: real slices split by the fold plan, synthetic nodule slices added in
proportion, one size, boxes that follow the resize, the same test set in every arm."""

import numpy as np
import pandas as pd
import pytest

from conftest import write_boxed_stack
from nodulesynth.data.slices import SliceStack
from nodulesynth.downstream.datasets import (SliceSet, build_arm_dataset, component_boxes, load_dataset, map_boxes,
                                             real_slices, save_dataset, study_arms, synthetic_slices)
from nodulesynth.labels import LEFT_LUNG, NODULE


@pytest.fixture
def cohort(tmp_path):
    real, synth = tmp_path / "slices", tmp_path / "synth"
    real.mkdir(), synth.mkdir()
    write_boxed_stack(real, "P1", "P1", 6, 128, nodule_rows=(1, 2, 3), first_index=100)
    write_boxed_stack(real, "P2", "P2", 5, 128, nodule_rows=(4,), seed=1, first_index=100)
    write_boxed_stack(real, "P3", "P3", 4, 128, nodule_rows=(0,), seed=2, first_index=100)  # the test patient
    # The generator's samples of the training scans, at 64 px: 2 + 1 nodule maps.
    write_boxed_stack(synth, "P1", "P1", 3, 64, nodule_rows=(0, 2), seed=3, first_index=100, boxes=False)
    write_boxed_stack(synth, "P2", "P2", 2, 64, nodule_rows=(1,), seed=4, first_index=100, boxes=False)
    return real, synth


def test_arm_a_holds_real_slices_at_the_generators_size_with_scaled_boxes(cohort):
    real, _ = cohort
    data = build_arm_dataset("A", 0, ["P1", "P2"], ["P3"], real, image_size=64)
    assert data.train.image.shape == (11, 64, 64) and data.test.image.shape == (4, 64, 64)
    assert set(data.train.patient_id) == {"P1", "P2"} and set(data.test.patient_id) == {"P3"}
    assert (data.train.source == "real").all()
    # 128 -> 64 px: the box (30, 20, 36, 24) halves; it sits on the row of slice_index 101 of P1.
    row = int(np.flatnonzero((data.train.scan_id == "P1") & (data.train.slice_index == 101))[0])
    np.testing.assert_allclose(data.train.boxes_of(row), [[15, 10, 18, 12]])
    assert len(data.train.boxes) == 4 and data.train.has_nodule.sum() == 4
    assert data.info["n_train_positive"] == 4 and data.info["n_train_negative"] == 7
    assert data.info["n_test"] == 4 and data.info["n_train_synthetic"] == 0


def test_synthetic_arms_add_nodule_slices_in_proportion_without_repeats(cohort):
    real, synth = cohort
    a = build_arm_dataset("A", 0, ["P1", "P2"], ["P3"], real, image_size=64)
    c = build_arm_dataset("C", 0, ["P1", "P2"], ["P3"], real, synth_dir=synth, image_size=64, synthetic_ratio=0.5)
    added = c.train.source == "sdm"
    assert added.sum() == 2 == c.info["n_train_synthetic"] == c.info["n_synthetic_wanted"]  # 0.5 x 4 real
    assert c.train.has_nodule[added].all()
    keys = list(zip(c.train.scan_id[added], c.train.slice_index[added]))
    assert len(set(keys)) == len(keys)
    # Synthetic boxes come from the maps: the nodule square at (30, 20)-(36, 24) of the 64-px map.
    for row in np.flatnonzero(added):
        np.testing.assert_allclose(c.train.boxes_of(row), [[30, 20, 36, 24]])
    # Paired arms: the same real training slices and the same test set.
    np.testing.assert_array_equal(c.train.image[~added], a.train.image)
    np.testing.assert_array_equal(c.test.image, a.test.image)
    # Asking for more than there is records the shortfall instead of repeating slices.
    b = build_arm_dataset("B", 0, ["P1", "P2"], ["P3"], real, synth_dir=synth, image_size=64, synthetic_ratio=2.0)
    assert b.info["n_synthetic_wanted"] == 8 and b.info["n_train_synthetic"] == 3 == b.info["n_synthetic_available"]
    assert (b.train.source == "spade").sum() == 3


def test_dataset_round_trip_and_clear_errors(cohort, tmp_path):
    real, synth = cohort
    data = build_arm_dataset("B", 1, ["P1", "P2"], ["P3"], real, synth_dir=synth, image_size=64)
    save_dataset(tmp_path / "B" / "fold1.npz", data)
    back = load_dataset(tmp_path / "B" / "fold1.npz")
    assert back.arm == "B" and back.fold == 1 and back.info == data.info
    for split in ("train", "test"):
        for name in ("image", "label", "has_nodule", "boxes", "scan_id", "patient_id", "slice_index", "source",
                     "box_nodule", "excluded"):
            np.testing.assert_array_equal(getattr(getattr(back, split), name), getattr(getattr(data, split), name))
    with pytest.raises(FileNotFoundError, match="P9"):
        build_arm_dataset("C", 0, ["P1", "P9"], ["P3"], real, synth_dir=synth, image_size=64)
    with pytest.raises(KeyError, match="arm 'D'"):
        build_arm_dataset("D", 0, ["P1"], ["P3"], real, image_size=64)
    np.savez(tmp_path / "broken.npz", arm="A")
    with pytest.raises(KeyError, match="broken.npz"):
        load_dataset(tmp_path / "broken.npz")


def test_component_boxes_and_subset():
    label = np.zeros((16, 16), np.uint8)
    label[2:4, 3:6] = NODULE
    label[10, 10] = NODULE
    np.testing.assert_array_equal(component_boxes(label), [[3, 2, 6, 4], [10, 10, 11, 11]])
    n = 3
    s = SliceSet(np.zeros((n, 4, 4), np.uint8), np.zeros((n, 4, 4), np.uint8), np.array([1, 0, 1], bool),
                 np.array([[0, 1, 1, 2, 2], [2, 0, 0, 1, 1]], np.float32), np.array(["a", "b", "c"]),
                 np.array(["a", "b", "c"]), np.arange(n), np.array(["real"] * n))
    sub = s.subset([2, 1])
    assert list(sub.scan_id) == ["c", "b"] and sub.boxes.tolist() == [[0, 0, 0, 1, 1]]
    assert sub.box_nodule.tolist() == [-1]  # no ids given: unknown


def test_nodule_ids_and_excluded_findings_follow_subset_and_concatenate():
    n = 3
    s = SliceSet(np.zeros((n, 4, 4), np.uint8), np.zeros((n, 4, 4), np.uint8), np.array([1, 0, 1], bool),
                 np.array([[0, 1, 1, 2, 2], [2, 0, 0, 1, 1], [2, 2, 2, 3, 3]], np.float32), np.array(["a", "a", "a"]),
                 np.array(["p", "p", "p"]), np.arange(n), np.array(["real"] * n), box_nodule=np.array([4, 5, 6]),
                 excluded=np.array([[1, 0, 0, 2, 2], [2, 1, 1, 3, 3]], np.float32))
    sub = s.subset([2, 1])
    assert sub.boxes[:, 0].tolist() == [0, 0] and sub.box_nodule.tolist() == [5, 6]
    assert sub.excluded.tolist() == [[1, 0, 0, 2, 2], [0, 1, 1, 3, 3]]
    both = SliceSet.concatenate([s, sub])
    assert both.box_nodule.tolist() == [4, 5, 6, 5, 6] and both.boxes[:, 0].tolist() == [0, 2, 2, 3, 3]
    assert both.excluded[:, 0].tolist() == [1, 2, 4, 3]
    assert both.nodule_rows()[3] == ("a", 2, 5, 0.0, 0.0, 1.0, 1.0)
    assert both.excluded_rows()[0] == ("a", 1, 0.0, 0.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="box_nodule"):
        SliceSet(s.image, s.label, s.has_nodule, s.boxes, s.scan_id, s.patient_id, s.slice_index, s.source,
                 box_nodule=np.array([1]))


@pytest.mark.parametrize("size", [64, 256])
def test_one_map_gives_the_same_boxes_as_a_real_and_as_a_synthetic_slice(size):
    """Real boxes (named by the masks stage's nodules.tsv) and synthetic boxes (from the map alone) come from one
    rule: the same map gives the same boxes at every size, and no nodule vanishes, not even one of 2 pixels that
    the nearest-neighbour resize of the map to 64 px drops."""
    from nodulesynth.masks.lesion_map import nodule_boxes

    shape, n = (512, 512), 3
    masks = {nodule: np.zeros((n, *shape), bool) for nodule in (0, 1, 2)}
    masks[0][0:2, 100:130, 200:236] = True   # a large nodule on slices 0 and 1
    masks[1][1:3, 301:303, 401:402] = True   # 2 x 1 pixels: lost to a 64-px nearest-neighbour map
    masks[2][2, 40:47, 60:70] = True
    masks[2][2, 50:53, 75:79] = True         # nodule 2 in two pieces on one slice: two boxes, both its own
    label = np.full((n, *shape), LEFT_LUNG, np.uint8)
    for mask in masks.values():
        label[mask] = NODULE
    stack = SliceStack(np.zeros((n, *shape), np.uint8), label, np.arange(n, dtype=float), 7 + np.arange(n),
                       (label == NODULE).any((1, 2)), "S1", "P1")
    table = nodule_boxes(masks, np.ones(n, bool))
    table["slice_index"] += 7
    real, synthetic = real_slices(stack, table, size), synthetic_slices(stack, "sdm", size)
    np.testing.assert_array_equal(real.boxes, synthetic.boxes)
    np.testing.assert_array_equal(real.has_nodule, synthetic.has_nodule)
    assert (synthetic.box_nodule == -1).all()
    # every (slice, nodule) of nodules.tsv has its box, named by the nodule
    assert sorted(zip(real.slice_index[real.boxes[:, 0].astype(int)].tolist(), real.box_nodule.tolist())) == \
        [(7, 0), (8, 0), (8, 1), (9, 1), (9, 2), (9, 2)]
    # scaled once from the full-resolution component by size / 512, as floats; a side under a pixel at `size`
    # becomes one pixel about its centre (at 64 px: 0.125 x 0.25 px; at 256: 0.5 x 1)
    k = int(np.flatnonzero((real.box_nodule == 0) & (real.boxes[:, 0] == 0))[0])
    np.testing.assert_allclose(real.boxes[k, 1:], np.array([200, 100, 236, 130]) * size / 512)
    k = int(np.flatnonzero((real.box_nodule == 1) & (real.boxes[:, 0] == 1))[0])
    x0, y0, x1, y1 = np.array([401, 301, 402, 303]) * size / 512
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    expected = [centre_x - 0.5, y0, centre_x + 0.5, y1] if y1 - y0 >= 1 else \
        [centre_x - 0.5, centre_y - 0.5, centre_x + 0.5, centre_y + 0.5]
    np.testing.assert_allclose(real.boxes[k, 1:], expected)
    assert ((real.boxes[:, 3] - real.boxes[:, 1] >= 1) & (real.boxes[:, 4] - real.boxes[:, 2] >= 1)).all()


def test_a_box_under_a_pixel_becomes_one_pixel_within_the_image_and_mmdet_trains_on_it(tmp_path):
    """mmdet's CocoDataset drops a box under a pixel wide or tall; the evaluation counts every box. A nodule's
    1-pixel edge on a 512-px map (half a pixel at 256) is widened to a pixel about its centre, inside the image
    where it lies on the border, and the localizer's training loader keeps it."""
    from mmdet.datasets import CocoDataset

    from nodulesynth.downstream.localization import write_coco

    label = np.zeros((512, 512), np.uint8)
    label[200:203, 300] = NODULE      # 3 x 1 pixels
    label[100:110, 100:110] = NODULE  # 10 x 10
    label[0, 511] = NODULE            # one pixel in the corner
    boxes, _ = map_boxes(label, 256)
    np.testing.assert_allclose(boxes, [[255, 0, 256, 1], [50, 50, 55, 55], [149.75, 100, 150.75, 101.5]])
    slices = SliceSet(np.zeros((1, 256, 256), np.uint8), np.zeros((1, 256, 256), np.uint8), np.ones(1, bool),
                      np.c_[np.zeros(len(boxes)), boxes].astype(np.float32), np.array(["S"]), np.array(["P"]),
                      np.array([0]), np.array(["real"]))
    write_coco(slices, tmp_path, "train")
    dataset = CocoDataset(data_root=str(tmp_path), ann_file="train.json", data_prefix=dict(img="train/"),
                          metainfo=dict(classes=("nodule",)), filter_cfg=dict(filter_empty_gt=False), pipeline=[])
    assert sorted(inst["bbox"] for inst in dataset.get_data_info(0)["instances"]) == sorted(boxes.tolist())


def test_two_nodules_are_two_boxes_when_they_touch_or_one_lies_in_the_others_box():
    """The per-nodule FROC counts each nodule of nodules.tsv: two that touch (one component of the map) are split
    by their boxes, and a small one within a larger one's box keeps its own id, not the first row's."""
    touching = np.full((64, 64), LEFT_LUNG, np.uint8)
    touching[20:26, 10:16] = NODULE
    touching[21:24, 16:19] = NODULE
    boxes, ids = map_boxes(touching, 64, [(1, 10, 20, 16, 26), (2, 16, 21, 19, 24)])
    assert sorted(zip(ids.tolist(), boxes.tolist())) == [(1, [10, 20, 16, 26]), (2, [16, 21, 19, 24])]
    assert len(map_boxes(touching, 64)[0]) == 1  # a synthetic map: no nodules.tsv to tell them apart

    nested = np.full((64, 64), LEFT_LUNG, np.uint8)
    nested[10:30, 10:14] = NODULE
    nested[10:14, 10:30] = NODULE  # an L-shaped nodule
    nested[20:23, 20:23] = NODULE  # a small one in its bend, within its box
    boxes, ids = map_boxes(nested, 32, [(1, 10, 10, 30, 30), (2, 20, 20, 23, 23)])
    assert sorted(zip(ids.tolist(), boxes.tolist())) == [(1, [5, 5, 15, 15]), (2, [10, 10, 11.5, 11.5])]

    stack = SliceStack(np.zeros((1, 64, 64), np.uint8), touching[None], np.zeros(1), np.array([5]), np.ones(1, bool),
                       "S1", "P1")
    table = pd.DataFrame([dict(slice_index=5, nodule=1, x0=10, y0=20, x1=16, y1=26),
                          dict(slice_index=5, nodule=2, x0=16, y0=21, x1=19, y1=24)])
    assert sorted(row[2] for row in real_slices(stack, table, 64).nodule_rows()) == [1, 2]


def test_a_nodules_tsv_row_the_map_contradicts_is_an_error(tmp_path):
    label = np.full((1, 32, 32), LEFT_LUNG, np.uint8)
    stack = SliceStack(np.zeros_like(label), label, np.zeros(1), np.array([3]), np.zeros(1, bool), "S1", "P1")
    table = pd.DataFrame([dict(slice_index=3, nodule=0, x0=4, y0=4, x1=8, y1=8)])
    with pytest.raises(ValueError, match="S1: nodule 0 .* slice 3"):
        real_slices(stack, table, 16)
    with pytest.raises(KeyError, match="S1: nodule box on slice 5"):
        real_slices(stack, table.assign(slice_index=5), 16)
    excluded = pd.DataFrame([dict(slice_index=3, finding=0, x0=4, y0=4, x1=8, y1=12)])
    got = real_slices(stack, table.iloc[:0], 16, excluded)
    assert got.excluded.tolist() == [[0, 2, 2, 4, 6]]  # scaled by the boxes' rule, 32 -> 16 px


def test_study_image_size_is_the_downstream_setting_else_the_generators_agreed_size():
    from nodulesynth.downstream.datasets import study_image_size

    assert study_image_size(None, {"sdm": 64, "spade": 64}) == 64
    # Set: the generators' slices are resampled to it, whatever their (even differing) sizes.
    assert study_image_size(128, {"sdm": 64, "spade": 32}) == 128
    with pytest.raises(ValueError, match=r"sdm.image_size 64, spade.image_size 32 differ"):
        study_image_size(None, {"sdm": 64, "spade": 32})
    with pytest.raises(ValueError, match=r"downstream.image_size = 4"):
        study_image_size(4, {"sdm": 64, "spade": 64})


def test_synthetic_slices_follow_a_study_size_above_the_generators(cohort):
    real, synth = cohort  # real slices at 128 px, the generator's at 64
    data = build_arm_dataset("B", 0, ["P1", "P2"], ["P3"], real, synth_dir=synth, image_size=128)
    assert data.train.image.shape[1:] == (128, 128) and data.info["image_size"] == 128
    spade = np.flatnonzero(data.train.source == "spade")
    assert len(spade) == 3
    # The 64-px map's nodule (30, 20, 36, 24) doubles with the upsampling.
    np.testing.assert_allclose(data.train.boxes_of(int(spade[0])), [[60, 40, 72, 48]])


def test_downstream_commands_take_every_key_of_the_schema_section():
    """`--params` takes the whole `downstream:` section: each key the schema allows is read. The rules pass only
    the keys each command reads (dataset_keys of an arm, AUDIT_KEYS), fields of the section."""
    from dataclasses import asdict
    from pathlib import Path

    import yaml

    from nodulesynth.downstream.datasets import DownstreamOptions

    schema = yaml.safe_load((Path(__file__).parents[1] / "schemas" / "config.schema.yaml").read_text())
    properties = schema["properties"]["downstream"]["properties"]
    defaults = {key: spec["default"] for key, spec in properties.items()}
    assert asdict(DownstreamOptions.from_config(defaults)) == defaults
    assert asdict(DownstreamOptions.from_config({})) == defaults  # the command's own defaults are the schema's
    with pytest.raises(KeyError, match="downstream.imagesize"):
        DownstreamOptions.from_config({"imagesize": 128})
    dataset_keys = {key for arm in study_arms(controls=True) for key in DownstreamOptions.dataset_keys(arm)}
    assert dataset_keys | set(DownstreamOptions.AUDIT_KEYS) < set(defaults)
    rules = {name: (Path(__file__).parents[1] / "rules" / name).read_text() for name in ("downstream.smk", "audit.smk")}
    assert 'section("downstream", DownstreamOptions.dataset_keys(wildcards.arm))' in rules["downstream.smk"]
    assert 'section("downstream", DownstreamOptions.AUDIT_KEYS)' in rules["audit.smk"]


@pytest.mark.parametrize("arm", ["A", "B", "C", "P", "N"])
def test_an_arm_is_the_same_whatever_the_dataset_keys_it_does_not_read(cohort, arm):
    """The rule passes an arm only its own keys (DownstreamOptions.dataset_keys), so that a changed
    synthetic_ratio rebuilds (and retrains) B, C and N, not A or P: each key left out must leave the arm as it is,
    and each key passed must change it (else it need not be passed)."""
    from nodulesynth.downstream.datasets import DownstreamOptions

    real, synth = cohort
    base = dict(synthetic_ratio=0.5, seed=0, withheld_fraction=0.5)
    changed = dict(synthetic_ratio=1.0, seed=1, withheld_fraction=0.99)
    option = dict(synthetic_ratio="synthetic_ratio", seed="seed", withheld_fraction="positive_control_withheld")
    # four training patients with nodules, for P to withhold from and B, C to draw among 8 synthetic nodule maps
    write_boxed_stack(real, "P4", "P4", 6, 128, nodule_rows=(0, 1), seed=5, first_index=100)
    write_boxed_stack(real, "P5", "P5", 5, 128, nodule_rows=(2,), seed=6, first_index=100)
    write_boxed_stack(synth, "P4", "P4", 3, 64, nodule_rows=(0, 1, 2), seed=7, first_index=100, boxes=False)
    write_boxed_stack(synth, "P5", "P5", 2, 64, nodule_rows=(0, 1), seed=8, first_index=100, boxes=False)
    train = ["P1", "P2", "P4", "P5"]

    def build(**values):
        data = build_arm_dataset(arm, 0, train, ["P3"], real, synth_dir=synth, image_size=64, **values)
        return data.train.image, data.train.has_nodule

    reference = build(**base)
    for name, value in changed.items():
        image, has_nodule = build(**{**base, name: value})
        same = image.shape == reference[0].shape and (image == reference[0]).all() and (
            has_nodule == reference[1]).all()
        assert same == (option[name] not in DownstreamOptions.dataset_keys(arm)), (arm, name)


def test_downstream_dataset_command_takes_the_control_arms():
    from nodulesynth.cli import build_parser

    common = ["--fold", "0", "--manifest", "m.tsv", "--folds", "f.tsv", "--slices", "s.npz", "--image-size", "128",
              "--out", "o.npz"]
    for arm in ("A", "B", "C", "P", "N"):
        assert build_parser().parse_args(["downstream-dataset", "--arm", arm, *common]).arm == arm
    with pytest.raises(SystemExit):
        build_parser().parse_args(["downstream-dataset", "--arm", "Q", *common])
