"""Downstream metrics against hand computations: slice detection, COCO AP/AR, LUNA16's FROC/CPM per nodule (and the
slice-level variant), Fréchet distance."""

import math
import warnings

import numpy as np
import pytest

from nodulesynth.downstream.coco import coco_metrics
from nodulesynth.downstream.metrics import (detection_metrics, frechet_distance, froc, froc_curve, merge_candidates,
                                           slice_froc, slice_froc_curve)

# ---------------------------------------------------------------- detection

LABELS = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.05, 0.5]


def test_detection_metrics_by_hand():
    # threshold 0.5, positive when score >= 0.5:
    # positives 0.9 0.8 0.7 -> 3 TP, 0.3 -> 1 FN; negatives 0.6 0.5 -> 2 FP, 0.4 0.2 0.1 0.05 -> 4 TN
    m = detection_metrics(LABELS, SCORES)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 2, 1, 4)
    assert all(type(m[k]) is int for k in ("tp", "fp", "fn", "tn"))
    assert m["accuracy"] == pytest.approx(7 / 10)  # (3 + 4) / 10
    assert m["precision"] == pytest.approx(3 / 5)  # 3 / (3 + 2)
    assert m["recall"] == pytest.approx(3 / 4)  # 3 / (3 + 1)
    assert m["specificity"] == pytest.approx(4 / 6)  # 4 / (4 + 2)
    assert m["f1"] == pytest.approx(6 / 9)  # 2 TP / (2 TP + FP + FN)


def test_auc_is_the_fraction_of_concordant_pairs():
    # 4 positives x 6 negatives = 24 pairs; 0.9, 0.8, 0.7 outrank all 6 negatives (18), 0.3 outranks
    # 0.2, 0.1, 0.05 (3): 21 / 24
    assert detection_metrics(LABELS, SCORES)["auc"] == pytest.approx(21 / 24)
    # a tie counts half a pair
    assert detection_metrics([1, 0, 0], [0.5, 0.5, 0.1])["auc"] == pytest.approx(1.5 / 2)


def test_threshold_moves_the_operating_point():
    # threshold 0.75: 0.9 0.8 -> 2 TP, 0.7 0.3 -> 2 FN, no FP
    m = detection_metrics(LABELS, SCORES, threshold=0.75)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 0, 2, 6)
    assert m["precision"] == 1.0 and m["recall"] == pytest.approx(0.5)


def test_zero_division_gives_zero_and_one_class_gives_nan_auc():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = detection_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    assert math.isnan(m["auc"])


def test_detection_bad_input():
    with pytest.raises(ValueError, match="length"):
        detection_metrics([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 or 1"):
        detection_metrics([0, 2], [0.5, 0.5])


# ---------------------------------------------------------------- COCO

def test_coco_perfect_prediction():
    m = coco_metrics([1, 2], [(1, 10, 10, 30, 20)], [(1, 10, 10, 30, 20, 0.9)])
    for key in ("ap50", "ap60", "ar50", "ar60", "ar70", "coco_ap", "coco_ap50", "coco_ap75", "coco_ar100",
                "coco_ap_s"):
        assert m[key] == pytest.approx(1.0), key
    # the box is 20 x 10 = 200 px, small by COCO's ranges: no medium or large ground truth -> undefined
    assert math.isnan(m["coco_ap_m"]) and math.isnan(m["coco_ap_l"])


def test_coco_iou_055_counts_at_05_not_at_06():
    # gt 20 x 10, prediction its left 11 x 10: IoU = 110 / 200 = 0.55 (x1 exclusive: widths are differences)
    m = coco_metrics(["a"], [("a", 0, 0, 20, 10)], [("a", 0, 0, 11, 10, 0.8)])
    assert m["ap50"] == pytest.approx(1.0) and m["ar50"] == pytest.approx(1.0)
    assert m["ap60"] == pytest.approx(0.0) and m["ar60"] == 0.0 and m["ar70"] == 0.0
    assert m["coco_ap50"] == pytest.approx(1.0) and m["coco_ap75"] == 0.0


def test_coco_false_positive_above_true_positives_101_point_ap():
    # three images with one nodule each, a fourth without; ranked detections: TP 0.9, FP 0.8, TP 0.7, TP 0.6
    # recall    1/3, 1/3, 2/3, 1
    # precision 1,   1/2, 2/3, 3/4  -> interpolated (max to the right): 1, 3/4, 3/4, 3/4
    # 101 recall points 0.00..1.00: 0.00..0.33 (34 points) reach recall 1/3 at precision 1, 0.34..1.00
    # (67 points) need the later ranks at precision 3/4: AP = (34 * 1 + 67 * 3/4) / 101 = 84.25 / 101
    box = (10, 10, 20, 20)
    gt = [(i, *box) for i in (1, 2, 3)]
    pred = [(1, *box, 0.9), (4, *box, 0.8), (2, *box, 0.7), (3, *box, 0.6)]
    m = coco_metrics([1, 2, 3, 4], gt, pred)
    assert m["ap50"] == pytest.approx(84.25 / 101)
    assert m["ap60"] == pytest.approx(84.25 / 101)
    assert m["coco_ap"] == pytest.approx(84.25 / 101)  # exact boxes: the same at every IoU threshold
    assert m["ar50"] == pytest.approx(1.0)


def test_coco_no_predictions_is_zero():
    m = coco_metrics([1, 2], [(1, 0, 0, 10, 10)], [])
    for key in ("ap50", "ap60", "ar50", "ar60", "ar70", "coco_ap", "coco_ap50", "coco_ar100", "coco_ap_s"):
        assert m[key] == 0.0, key


def test_coco_bad_input_names_the_row():
    with pytest.raises(ValueError, match=r"pred_boxes\[0\].*image_id 9"):
        coco_metrics([1], [(1, 0, 0, 10, 10)], [(9, 0, 0, 10, 10, 0.5)])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\]"):
        coco_metrics([1], [(1, 10, 0, 5, 10)], [])


# ---------------------------------------------------------------- FROC per nodule (LUNA16)

RATES = ("0.125", "0.25", "0.5", "1", "2", "4", "8")


def test_froc_counts_nodules_not_slices():
    """One nodule on 7 slices found on all of them, one nodule on a single slice missed: LUNA16 counts 1 of 2
    nodules found (CPM 0.5); the slice-level count, 7 of 8 boxes, gives 0.875."""
    gt = [("s1", k, 0, 20, 20, 30, 30) for k in range(10, 17)] + [("s1", 40, 1, 60, 60, 66, 66)]
    pred = [("s1", k, 21, 21, 31, 31, 0.9) for k in range(10, 17)]
    assert len(merge_candidates(pred)) == 1  # seven adjacent boxes on one spot: one 3-D candidate
    m = froc(gt, pred, ["s1"])
    assert m["cpm"] == pytest.approx(0.5) and all(m[f"froc_{r}"] == pytest.approx(0.5) for r in RATES)
    image = {(scan, k): f"{scan}:{k}" for scan, k, *_ in gt}
    slice_level = slice_froc([(image[g[:2]], *g[3:]) for g in gt], [(image[p[:2]], *p[2:]) for p in pred],
                             {v: k[0] for k, v in image.items()})
    assert slice_level["slice_cpm"] == pytest.approx(0.875)


def test_a_hit_on_an_excluded_finding_is_no_false_positive():
    gt = [("s1", 5, 0, 10, 10, 20, 20)]
    pred = [("s1", 20, 50, 50, 60, 60, 0.9),  # on the excluded finding, scored above the nodule
            ("s1", 5, 11, 11, 21, 21, 0.6)]  # the nodule
    excluded = [("s1", 20, 49, 49, 61, 61)]
    fps, sens = froc_curve(gt, pred, ["s1"], excluded)
    np.testing.assert_allclose(fps, [0, 0])
    np.testing.assert_allclose(sens, [0, 1])
    assert froc(gt, pred, ["s1"], excluded)["cpm"] == pytest.approx(1.0)
    # Without the excluded finding it is a false positive above the nodule: curve (0, 0), (1, 0), (1, 1); the
    # sensitivity is 0 up to 1 FP per scan and 1 from there on.
    fps, sens = froc_curve(gt, pred, ["s1"])
    np.testing.assert_allclose(fps, [0, 1, 1])
    np.testing.assert_allclose(sens, [0, 0, 1])
    assert froc(gt, pred, ["s1"])["cpm"] == pytest.approx(4 / 7)
    # A candidate on both a nodule and an excluded finding counts for the nodule.
    assert froc(gt, pred[1:], ["s1"], [("s1", 5, 10, 10, 20, 20)])["cpm"] == pytest.approx(1.0)


def test_boxes_on_adjacent_slices_are_one_candidate_and_fps_are_per_scan():
    gt = [("s1", 30, 0, 10, 10, 20, 20)]
    found = ("s1", 30, 10, 10, 20, 20, 0.5)
    spot = [("s1", 7, 50, 50, 60, 60, 0.9), ("s1", 8, 51, 51, 61, 61, 0.8)]  # one spot on two adjacent slices
    fps, sens = froc_curve(gt, spot + [found], ["s1", "s2"])
    # one false positive (at 0.9, the higher score) over 2 scans: 1/2 FP per scan, then the nodule at 0.5
    np.testing.assert_allclose(fps, [0, 0.5, 0.5])
    np.testing.assert_allclose(sens, [0, 0, 1])
    # not merged: the same spot two slices apart, or adjacent slices of different scans, or far apart
    for apart in ([("s1", 7, 50, 50, 60, 60, 0.9), ("s1", 9, 51, 51, 61, 61, 0.8)],
                  [("s1", 7, 50, 50, 60, 60, 0.9), ("s2", 8, 51, 51, 61, 61, 0.8)],
                  [("s1", 7, 50, 50, 60, 60, 0.9), ("s1", 8, 70, 70, 80, 80, 0.8)]):
        assert len(merge_candidates(apart)) == 2
        assert froc_curve(gt, apart + [found], ["s1", "s2"])[0].max() == pytest.approx(1.0)
    # a small box beside a large one: within the large box's radius but not the small one's, so not merged
    assert len(merge_candidates([("s1", 7, 0, 0, 40, 40, 0.9), ("s1", 8, 30, 30, 34, 34, 0.8)])) == 2
    assert merge_candidates(spot) == [("s1", 0.9, [(7, 50, 50, 60, 60), (8, 51, 51, 61, 61)])]


def test_false_positives_are_divided_by_every_evaluated_scan():
    gt = [("s1", 0, 0, 10, 10, 20, 20)]
    pred = [("s1", 0, 11, 11, 21, 21, 0.95)] + [("s1", 10 * k, 70, 70, 80, 80, 0.9 - 0.1 * k) for k in range(3)]
    assert froc_curve(gt, pred, ["s1", "s2", "s3"])[0].max() == pytest.approx(1.0)  # 3 FP / 3 scans
    assert froc_curve(gt, pred, ["s1"])[0].max() == pytest.approx(3.0)


def test_froc_interpolates_the_curve_linearly_at_luna16s_rates():
    """A hit and a false positive tied at one score: the curve goes from (0, 0) straight to (1 FP/scan, 1), and
    LUNA16 reads it there by linear interpolation (np.interp), not as a step."""
    gt = [("s1", 0, 0, 10, 10, 20, 20)]
    pred = [("s1", 0, 11, 11, 21, 21, 0.7), ("s1", 4, 70, 70, 80, 80, 0.7)]
    m = froc(gt, pred, ["s1"])
    expected = dict(zip(RATES, (0.125, 0.25, 0.5, 1, 1, 1, 1)))
    for rate, value in expected.items():
        assert m[f"froc_{rate}"] == pytest.approx(value), rate
    assert m["cpm"] == pytest.approx(sum(expected.values()) / 7)


def test_the_existing_hand_case_per_nodule():
    """The slice-level hand case with every image a slice of its own nodule, no two adjacent: the same curve."""
    where = {"a0": ("s1", 0), "a1": ("s1", 5), "b0": ("s2", 0), "b1": ("s2", 5)}
    gt = [(*where[g[0]], k, *g[1:]) for k, g in enumerate(FROC_GT)]
    pred = [(*where[p[0]], *p[1:]) for p in FROC_PRED]
    fps, sens = froc_curve(gt, pred, ["s1", "s2"])
    np.testing.assert_allclose(fps, CURVE_FPS)
    np.testing.assert_allclose(sens, CURVE_SENS)


def test_froc_refuses_unknown_scans_and_nodules_without_an_id():
    gt = [("s1", 0, 0, 10, 10, 20, 20)]
    with pytest.raises(ValueError, match=r"pred_boxes\[0\].*'s9'"):
        froc(gt, [("s9", 0, 0, 0, 4, 4, 0.5)], ["s1"])
    with pytest.raises(ValueError, match=r"excluded\[0\].*'s9'"):
        froc(gt, [], ["s1"], [("s9", 0, 0, 0, 4, 4)])
    with pytest.raises(ValueError, match="nodule id"):
        froc([("s1", 0, -1, 10, 10, 20, 20)], [], ["s1"])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\] must be"):
        froc([("s1", 0, 10, 10, 20, 20)], [], ["s1"])


# ---------------------------------------------------------------- FROC, slice-level variant

IMAGE_SCAN = {"a0": "s1", "a1": "s1", "b0": "s2", "b1": "s2"}  # 4 slices of 2 scans
FROC_GT = [
    ("a0", 10, 10, 20, 20),  # g1 centre (15, 15), radius 5
    ("a1", 40, 40, 60, 50),  # g2 centre (50, 45), radius 10 (half the larger side, 20)
    ("b0", 0, 0, 10, 10),  # g3 centre (5, 5), radius 5
    ("b1", 30, 30, 34, 34),  # g4 centre (32, 32), radius 2
]
FROC_PRED = [
    ("a0", 11, 11, 21, 21, 0.9),  # centre (16, 16), 1.4 from g1: TP
    ("a0", 12, 12, 22, 22, 0.85),  # 2.8 from g1, already hit: ignored
    ("b1", 100, 100, 110, 110, 0.8),  # FP
    ("a1", 52, 40, 62, 50, 0.7),  # centre (57, 45), 7 from g2 (< 10, though > half the smaller side): TP
    ("b0", 20, 20, 30, 30, 0.6),  # FP
    ("a1", 0, 0, 4, 4, 0.5),  # FP
    ("b0", 4, 4, 8, 8, 0.4),  # centre (6, 6), 1.4 from g3: TP
    ("b1", 33, 33, 37, 37, 0.3),  # centre (35, 35), 4.2 from g4 (> 2): FP; g4 is never found
]
# thresholds 0.9 0.8 0.7 0.6 0.5 0.4 0.3 -> FP 0 1 1 2 3 3 4 (/2 scans), found 1 1 2 2 2 3 3 (/4 nodules)
CURVE_FPS = [0, 0, 0.5, 0.5, 1.0, 1.5, 1.5, 2.0]
CURVE_SENS = [0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75]


def test_slice_froc_curve_by_hand():
    fps, sens = slice_froc_curve(FROC_GT, FROC_PRED, IMAGE_SCAN)
    np.testing.assert_allclose(fps, CURVE_FPS)
    np.testing.assert_allclose(sens, CURVE_SENS)


def test_slice_froc_points_and_cpm_by_hand():
    m = slice_froc(FROC_GT, FROC_PRED, IMAGE_SCAN)
    # best sensitivity with FP/scan <= rate: 1/8 -> 0.25, 1/4 -> 0.25, 1/2 -> 0.5, 1 -> 0.5, 2, 4, 8 -> 0.75
    expected = {"slice_froc_0.125": 0.25, "slice_froc_0.25": 0.25, "slice_froc_0.5": 0.5, "slice_froc_1": 0.5,
                "slice_froc_2": 0.75, "slice_froc_4": 0.75, "slice_froc_8": 0.75}
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    assert m["slice_cpm"] == pytest.approx(3.75 / 7)  # (0.25 + 0.25 + 0.5 + 0.5 + 3 * 0.75) / 7


def test_slice_froc_fp_rate_divides_by_all_evaluated_scans():
    # a third scan with nothing on it: FP/scan 0 1/3 1/3 2/3 1 1 4/3 at thresholds 0.9 .. 0.3, so threshold 0.4
    # (3 FP, 3 of 4 found) now fits under 1 FP/scan: froc_1 rises from 0.5 to 0.75
    fps, _ = slice_froc_curve(FROC_GT, FROC_PRED, {**IMAGE_SCAN, "c0": "s3"})
    assert fps.max() == pytest.approx(4 / 3)
    m = slice_froc(FROC_GT, FROC_PRED, {**IMAGE_SCAN, "c0": "s3"})
    assert m["slice_froc_1"] == pytest.approx(0.75) and m["slice_froc_0.25"] == pytest.approx(0.25)


def test_slice_froc_rejects_unknown_images():
    with pytest.raises(ValueError, match=r"pred_boxes\[0\].*'zz'"):
        slice_froc(FROC_GT, [("zz", 0, 0, 4, 4, 0.5)], IMAGE_SCAN)


# ---------------------------------------------------------------- Fréchet distance

def test_frechet_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 6))
    assert abs(frechet_distance(x, x)) < 1e-6


def test_frechet_one_dimensional_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, (20000, 1)), rng.normal(-0.5, 0.5, (20000, 1))
    d = frechet_distance(a, b)
    # exact for the fitted Gaussians: (mu1 - mu2)^2 + (s1 - s2)^2 with the sample moments
    fitted = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert d == pytest.approx(fitted, rel=1e-6)
    assert d == pytest.approx(1.5 ** 2 + 1.5 ** 2, abs=0.15)  # the true parameters


def test_frechet_singular_covariance_stays_finite():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 8)), rng.normal(size=(4, 8))  # fewer rows than features: rank-deficient
    assert np.isfinite(frechet_distance(a, b))


def test_frechet_needs_two_rows():
    with pytest.raises(ValueError, match="features_b"):
        frechet_distance(np.zeros((5, 3)), np.zeros((1, 3)))


def test_frechet_distance_fewer_samples_than_features_matches_the_matrix_root():
    # 30 and 20 samples of 40 features take the nuclear-norm route; the same sets with the D x D matrix
    # root (scipy's sqrtm, on covariances made full rank by more samples of the same draw) must agree.
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 40)), rng.normal(1.0, 2.0, size=(20, 40))
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    by_root = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
               - 2 * np.trace(np.real(linalg.sqrtm(cov_a @ cov_b))))
    assert frechet_distance(a, b) == pytest.approx(by_root, rel=1e-6)
    wide = rng.normal(size=(200, 5)), rng.normal(0.5, 1.0, size=(300, 5))  # more samples than features
    assert frechet_distance(*wide) > 0
