"""Patient-level k-fold split, stratified by whether a patient has a nodule slice, and the fold plan:
which scans each generator and each arm of the downstream study may see. Decided here (and tested
here), so the Snakefile only asks."""

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from nodulesynth.errors import InputError
from nodulesynth.io import read_table
from nodulesynth.options import SectionOptions

FOLD_COLUMNS = ["patient_id", "fold"]  # schemas/folds.schema.yaml


@dataclass(frozen=True)
class FoldOptions(SectionOptions):
    """The config's `folds` section."""

    SECTION = "folds"

    k: int = 5
    seed: int = 0


def patient_has_nodule(stack_paths) -> pd.Series:
    """patient_id -> whether any of the patient's usable stacks holds a nodule slice.

    Reads only the small `has_nodule`, `patient_id` and `status` members of each npz."""
    flags = {}
    for path in stack_paths:
        with np.load(path, allow_pickle=False) as data:
            for key in ("patient_id", "status", "has_nodule"):
                if key not in data.files:
                    raise InputError(f"{path}: missing array {key!r}")
            if str(data["status"]) != "ok":
                continue
            patient = str(data["patient_id"])
            flags[patient] = flags.get(patient, False) or bool(np.asarray(data["has_nodule"]).any())
    return pd.Series(flags, dtype=bool, name="has_nodule")


def assign_folds(manifest: pd.DataFrame, k=5, seed=0, has_nodule: pd.Series | None = None) -> pd.DataFrame:
    """One fold per usable patient. With `has_nodule` (patient -> bool) the split is stratified, so no
    test fold is left without nodule patients while there are at least k of them."""
    patients = np.array(sorted(manifest.loc[manifest.status == "ok", "patient_id"].astype(str).unique()))
    if len(patients) < k:
        raise InputError(f"folds.k is {k} but only {len(patients)} patients have usable scans")
    if has_nodule is None:
        strata = np.zeros(len(patients), int)
    else:
        missing = sorted(set(patients) - set(has_nodule.index))
        if missing:
            raise InputError(f"no slice stack gives the nodule status of patient {missing[0]}")
        strata = has_nodule.reindex(patients).astype(int).to_numpy()
    fold = np.empty(len(patients), int)
    if np.bincount(strata).max() < k:
        # A pilot cohort whose every stratum is smaller than k, which scikit-learn refuses to stratify: deal
        # each stratum's patients, shuffled, round the folds, so that no fold gets two of a stratum's patients.
        order = np.lexsort((np.random.default_rng(seed).permutation(len(patients)), strata))
        fold[order] = np.arange(len(patients)) % k
        return pd.DataFrame({"patient_id": patients, "fold": fold})
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    # Each patient is its own group here (one row per patient), which keeps the split patient-level
    # by construction; a stratum smaller than k only warns in scikit-learn.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for i, (_, test) in enumerate(splitter.split(patients, strata, groups=patients)):
            fold[test] = i
    return pd.DataFrame({"patient_id": patients, "fold": fold})


def read_folds(path) -> pd.DataFrame:
    """folds.tsv, checked against its schema (a patient in two rows would be in two folds)."""
    return read_table(path, "folds")


def _usable(manifest: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    usable = manifest[manifest.status == "ok"].astype({"scan_id": str, "patient_id": str})
    unknown = sorted(set(usable.patient_id) - set(folds.patient_id.astype(str)))
    if unknown:
        raise InputError(f"patient {unknown[0]} of the manifest has no fold")
    return usable.merge(folds.astype({"patient_id": str}), on="patient_id")


def training_scans(manifest: pd.DataFrame, folds: pd.DataFrame, fold) -> list:
    """Scans a model of `fold` may learn from: every usable scan of the other folds' patients
    ("holdout": every usable scan, for a generator that feeds no downstream arm)."""
    usable = _usable(manifest, folds)
    if has_test_patients(fold):
        usable = usable[usable.fold != int(fold)]
    return sorted(usable.scan_id)


def has_test_patients(fold) -> bool:
    """Whether `fold` has patients of its own to test on: every downstream fold; not "holdout", whose generator
    trains on every patient (so it has no held-out maps either)."""
    return str(fold) != "holdout"


def evaluation_scans(manifest: pd.DataFrame, folds: pd.DataFrame, fold) -> list:
    """Scans of `fold`'s own patients: the downstream test set, never seen by its models (none for "holdout")."""
    if not has_test_patients(fold):
        return []
    usable = _usable(manifest, folds)
    return sorted(usable[usable.fold == int(fold)].scan_id)
