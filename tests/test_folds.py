"""Patient-level folds: each patient in exactly one fold, rejected scans left out, deterministic."""

import pandas as pd
import pytest

from nodulesynth.data.folds import assign_folds


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
