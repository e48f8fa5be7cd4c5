"""Measuring on equal terms: the control arms P and N, the class-balanced training sampler, and the
threshold-free detection metrics beside the study's."""

import numpy as np
import pytest

from conftest import write_boxed_stack
from nodulesynth.downstream.datasets import (RELABELLED, SliceSet, build_arm_dataset, relabelled_slices,
                                             study_arms, withhold_nodule_patients)
from nodulesynth.downstream.metrics import detection_metrics
from nodulesynth.labels import NODULE


@pytest.fixture
def cohort(tmp_path):
    """Four training patients with nodules, two without, one test patient."""
    for i, (patient, rows) in enumerate([("N1", (1, 2)), ("N2", (0,)), ("N3", (3, 4)), ("N4", (2,)),
                                         ("F1", ()), ("F2", ()), ("T1", (1,))]):
        write_boxed_stack(tmp_path, patient, patient, 6, 64, rows, seed=i)
    return tmp_path, ["N1", "N2", "N3", "N4", "F1", "F2"], ["T1"]


def test_study_arms_add_the_controls_only_when_asked():
    assert study_arms() == ["A", "B", "C"]
    assert study_arms(controls=True) == ["A", "B", "C", "P", "N"]


def test_positive_control_withholds_half_the_nodule_patients_and_nothing_else(cohort):
    folder, train, test = cohort
    a = build_arm_dataset("A", 0, train, test, folder, image_size=64)
    p = build_arm_dataset("P", 0, train, test, folder, image_size=64)
    kept = set(p.train.patient_id)
    assert {"F1", "F2"} <= kept  # nodule-free patients all stay
    nodule_patients = {"N1", "N2", "N3", "N4"}
    assert len(nodule_patients & kept) == 2 and p.info["n_patients_withheld"] == 2
    assert p.info["n_train_real_positive"] < a.info["n_train_real_positive"]
    # The same test set as every arm of the fold (paired), and the same choice on a rerun (seeded).
    np.testing.assert_array_equal(p.test.image, a.test.image)
    again = build_arm_dataset("P", 0, train, test, folder, image_size=64)
    assert set(again.train.patient_id) == kept
    # Every withheld patient's slices are gone, every kept patient's are all there.
    for patient in kept:
        assert (p.train.patient_id == patient).sum() == (a.train.patient_id == patient).sum()


@pytest.mark.parametrize("fraction, withheld", [(0.25, 1), (0.75, 3), (0.99, 3)])
def test_positive_control_withholds_the_configured_share_and_keeps_one_nodule_patient(cohort, fraction, withheld):
    folder, train, test = cohort
    p = build_arm_dataset("P", 0, train, test, folder, image_size=64, withheld_fraction=fraction)
    kept = set(p.train.patient_id)
    assert p.info["n_patients_withheld"] == withheld and len({"N1", "N2", "N3", "N4"} & kept) == 4 - withheld
    assert {"F1", "F2"} <= kept


def test_positive_control_needs_two_nodule_patients():
    s = SliceSet(np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4), np.uint8), np.array([True, False]),
                 np.array([[0, 0, 0, 1, 1]], np.float32), np.array(["a", "b"]), np.array(["a", "b"]),
                 np.arange(2), np.array(["real"] * 2))
    with pytest.raises(ValueError, match="1 nodule patient"):
        withhold_nodule_patients(s, np.random.default_rng(0))


def test_negative_control_adds_relabelled_real_negatives_as_many_as_b_and_c(cohort):
    folder, train, test = cohort
    a = build_arm_dataset("A", 0, train, test, folder, image_size=64)
    n = build_arm_dataset("N", 0, train, test, folder, image_size=64, synthetic_ratio=1.0)
    added = n.train.source == RELABELLED
    positives = int(a.train.has_nodule.sum())
    assert added.sum() == positives == n.info["n_train_synthetic"] == n.info["n_synthetic_wanted"]
    assert n.train.has_nodule[added].all()
    # They are real nodule-free training slices: each image is one of arm A's negatives, none repeated.
    negatives = {a.train.image[i].tobytes() for i in np.flatnonzero(~a.train.has_nodule)}
    added_images = [n.train.image[i].tobytes() for i in np.flatnonzero(added)]
    assert set(added_images) <= negatives and len(set(added_images)) == len(added_images)
    # Their maps hold no nodule (no information) while each carries the box of a real nodule.
    assert not (n.train.label[added] == NODULE).any()
    for row in np.flatnonzero(added):
        assert len(n.train.boxes_of(row)) >= 1
    np.testing.assert_array_equal(n.test.image, a.test.image)


def test_relabelled_slices_refuse_a_set_without_negatives():
    s = SliceSet(np.zeros((1, 4, 4), np.uint8), np.zeros((1, 4, 4), np.uint8), np.array([True]),
                 np.array([[0, 0, 0, 1, 1]], np.float32), np.array(["a"]), np.array(["a"]), np.arange(1),
                 np.array(["real"]))
    with pytest.raises(ValueError, match="with and without a nodule"):
        relabelled_slices(s, 1, np.random.default_rng(0))


def test_counts_per_arm_reach_the_dataset_info(cohort):
    folder, train, test = cohort
    a = build_arm_dataset("A", 0, train, test, folder, image_size=64)
    for key, value in dict(n_train_real=36, n_train_real_positive=6, n_train_synthetic=0, n_test_positive=1,
                           n_test_negative=5, n_train_patients=6, n_test_patients=1).items():
        assert a.info[key] == value, key


# ---------------------------------------------------------------- the class prior


class _Labelled:
    """The part of an mmengine dataset a sampler reads: its length and each sample's data info."""

    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)

    def get_data_info(self, i):
        return dict(gt_label=self.labels[i])


def _positive_fraction(sampler_cfg, labels, n=4000):
    from itertools import islice

    from mmengine.registry import DATA_SAMPLERS

    import nodulesynth.downstream.mmlab  # noqa: F401 (registers the sampler)

    dataset = _Labelled(labels)
    sampler = DATA_SAMPLERS.build(sampler_cfg, default_args=dict(dataset=dataset))
    drawn = np.array(list(islice(iter(sampler), n)))
    return float(np.mean([labels[i] for i in drawn])), drawn


def test_balanced_sampler_trains_every_arm_at_one_prior_where_a_shuffle_does_not():
    from nodulesynth.downstream.mmlab import train_sampler

    arm_a = [1] * 3 + [0] * 97  # 3 % prevalence, as LIDC's slices
    arm_c = arm_a + [1] * 3  # plus as many synthetic positives as real ones
    balanced = [_positive_fraction(train_sampler("balanced", 0), labels)[0] for labels in (arm_a, arm_c)]
    shuffled = [_positive_fraction(train_sampler("shuffle", 0), labels)[0] for labels in (arm_a, arm_c)]
    assert balanced[0] == pytest.approx(0.5, abs=0.03) and balanced[1] == pytest.approx(0.5, abs=0.03)
    # A plain shuffle follows the arm's own prior: adding positives doubles it.
    assert shuffled[0] == pytest.approx(0.03, abs=0.015) and shuffled[1] == pytest.approx(0.058, abs=0.02)
    # Seeded: the same draws on a rerun; uniform within a class (every positive drawn).
    _, first = _positive_fraction(train_sampler("balanced", 0), arm_c, 600)
    _, second = _positive_fraction(train_sampler("balanced", 0), arm_c, 600)
    np.testing.assert_array_equal(first, second)
    assert {0, 1, 2, 100, 101, 102} <= set(first.tolist())


def test_balanced_sampler_reads_mmdet_samples_and_refuses_one_class():
    from nodulesynth.downstream.mmlab import BalancedSampler, is_positive, train_sampler

    assert is_positive(dict(instances=[dict(bbox=[0, 0, 1, 1], ignore_flag=0)]))
    assert not is_positive(dict(instances=[]))
    assert not is_positive(dict(instances=[dict(bbox=[0, 0, 1, 1], ignore_flag=1)]))
    with pytest.raises(ValueError, match="0 without"):
        BalancedSampler(_Labelled([1, 1]), seed=0)
    with pytest.raises(ValueError, match="sampler 'weighted'"):
        train_sampler("weighted", 0)


# ---------------------------------------------------------------- threshold-free metrics


def test_average_precision_and_balanced_accuracy_by_hand():
    # threshold 0.5: TP 0.9 0.8 0.7, FN 0.3, FP 0.6 0.5, TN 4
    labels = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1, 0.05, 0.5]
    m = detection_metrics(labels, scores)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    # Ranked: 0.9+ 0.8+ 0.7+ 0.6- 0.5- 0.4- 0.3+ ...: precision at each positive 1, 1, 1, 4/7; AP = mean
    assert m["average_precision"] == pytest.approx((1 + 1 + 1 + 4 / 7) / 4)


def test_always_no_scores_high_accuracy_but_not_balanced_accuracy_or_ap():
    labels = [1] * 5 + [0] * 95
    m = detection_metrics(labels, [0.1] * 100)
    assert m["accuracy"] == pytest.approx(0.95)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    assert m["average_precision"] == pytest.approx(0.05)


# ---------------------------------------------------------------- the audit of the controls


def test_audit_accepts_relabelled_slices_only_in_arm_n_and_only_as_copies_of_real_training_slices(cohort):
    from nodulesynth.downstream.audit import check_provenance

    folder, train, test = cohort
    n = build_arm_dataset("N", 0, train, test, folder, image_size=64)
    ids = np.arange(len(n.train))
    row = check_provenance("N/fold0.npz", "N", 0, n, ids, {}, None, 0.98)
    assert row["status"] == "pass", row["detail"]
    row = check_provenance("A/fold0.npz", "A", 0, n, ids, {}, None, 0.98)
    assert row["status"] == "fail" and "only the negative control N" in row["detail"]
    # A "relabelled" slice that is no copy of the arm's real slices (here: a test slice) is caught.
    first = int(np.flatnonzero(n.train.source == RELABELLED)[0])
    n.train.image[first] = n.test.image[0]
    row = check_provenance("N/fold0.npz", "N", 0, n, ids, {}, None, 0.98)
    assert row["status"] == "fail" and "not copies of the arm's real training slices" in row["detail"]
