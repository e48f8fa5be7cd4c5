"""Patient-level k-fold split: every slice of a patient lands in the same fold."""

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold


def assign_folds(manifest: pd.DataFrame, k=5, seed=0) -> pd.DataFrame:
    patients = np.array(sorted(manifest.loc[manifest.status == "ok", "patient_id"].astype(str).unique()))
    if len(patients) < k:
        raise ValueError(f"folds.k is {k} but only {len(patients)} patients have usable scans")
    fold = np.empty(len(patients), int)
    for i, (_, test) in enumerate(KFold(n_splits=k, shuffle=True, random_state=seed).split(patients)):
        fold[test] = i
    return pd.DataFrame({"patient_id": patients, "fold": fold})

