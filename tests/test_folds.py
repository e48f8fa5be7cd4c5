"""Patient-level folds: each patient in exactly one fold, rejected scans left out, deterministic."""

import pandas as pd
import pytest

from nodulesynth.data.folds import assign_folds, evaluation_scans, patient_has_nodule, training_scans


def manifest(n_patients, scans_per_patient=2):
    rows = [dict(scan_id=f"P{p:02d}_{s}", patient_id=f"P{p:02d}", status="ok")
            for p in range(n_patients) for s in range(scans_per_patient)]
    rows.append(dict(scan_id="BAD", patient_id="BAD", status="rejected"))
    return pd.DataFrame(rows)


def test_every_usable_patient_lands_in_exactly_one_fold():
    folds = assign_folds(manifest(23), k=5, seed=3)
    assert folds.patient_id.is_unique and "BAD" not in set(folds.patient_id)
    assert len(folds) == 23 and set(folds.fold) == set(range(5))
    assert folds.fold.value_counts().max() - folds.fold.value_counts().min() <= 1
    pd.testing.assert_frame_equal(folds, assign_folds(manifest(23), k=5, seed=3))
    assert not folds.equals(assign_folds(manifest(23), k=5, seed=4))


def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ValueError, match="folds.k is 5 but only 3 patients"):
        assign_folds(manifest(3), k=5)


def test_folds_are_stratified_by_nodule_patients():
    # 10 patients, 5 with a nodule: plain KFold with seed 1 leaves folds without any, the stratified split
    # puts one nodule patient in every fold.
    table = manifest(10, scans_per_patient=1)
    has_nodule = pd.Series({f"P{p:02d}": p % 2 == 0 for p in range(10)})
    for seed in range(5):
        folds = assign_folds(table, k=5, seed=seed, has_nodule=has_nodule)
        per_fold = folds.assign(nodule=has_nodule[folds.patient_id].to_numpy()).groupby("fold").nodule.sum()
        assert per_fold.tolist() == [1] * 5
        assert folds.patient_id.is_unique


def test_a_pilot_cohort_with_every_stratum_under_k_is_still_split_by_patient():
    # 8 patients, 4 with a nodule, k=5: every stratum is smaller than k, which scikit-learn refuses to stratify.
    table = manifest(8, scans_per_patient=1)
    has_nodule = pd.Series({f"P{p:02d}": p < 4 for p in range(8)})
    folds = assign_folds(table, k=5, seed=0, has_nodule=has_nodule)
    assert folds.patient_id.is_unique and len(folds) == 8 and set(folds.fold) == set(range(5))
    for stratum in (True, False):
        assert folds[has_nodule[folds.patient_id].to_numpy() == stratum].fold.is_unique
    pd.testing.assert_frame_equal(folds, assign_folds(table, k=5, seed=0, has_nodule=has_nodule))
    assert not folds.equals(assign_folds(table, k=5, seed=1, has_nodule=has_nodule))


def test_missing_nodule_status_names_the_patient():
    with pytest.raises(KeyError, match="P03"):
        assign_folds(manifest(5, 1), k=5, has_nodule=pd.Series({f"P{p:02d}": True for p in range(3)}))


def test_patient_has_nodule_reads_the_stacks(tmp_path):
    import numpy as np

    from nodulesynth.data.slices import SliceStack, save_slices

    def stack(scan, patient, nodules, status="ok"):
        n = len(nodules)
        image = np.zeros((n, 4, 4), np.uint8)
        save_slices(tmp_path / f"{scan}.npz", SliceStack(image, image.copy(), np.arange(n, dtype=float),
                                                          np.arange(n, dtype=np.int32), np.array(nodules, bool),
                                                          scan, patient, status))
        return tmp_path / f"{scan}.npz"

    paths = [stack("a1", "A", [0, 0]), stack("a2", "A", [0, 1]), stack("b", "B", [0, 0]),
             stack("c", "C", [1], status="rejected")]
    flags = patient_has_nodule(paths)
    assert flags.to_dict() == {"A": True, "B": False}


def test_fold_plan_keeps_test_patients_out_of_training():
    table = manifest(6)
    folds = assign_folds(table, k=3, seed=0)
    for fold in range(3):
        train, test = training_scans(table, folds, fold), evaluation_scans(table, folds, fold)
        train_patients = {s.split("_")[0] for s in train}
        test_patients = {s.split("_")[0] for s in test}
        assert train_patients.isdisjoint(test_patients) and "BAD" not in train + test
        assert train_patients | test_patients == set(folds.patient_id)
        assert set(test_patients) == set(folds.patient_id[folds.fold == fold])
    assert training_scans(table, folds, "holdout") == sorted(table.scan_id[table.status == "ok"])
    with pytest.raises(KeyError, match="P05"):
        training_scans(table, folds[folds.patient_id != "P05"], 0)
