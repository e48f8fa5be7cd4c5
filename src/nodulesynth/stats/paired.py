"""Fold-paired comparisons of arms B and C against arm A, with honest n and a plain word on what n folds can show.

Each fold's test slices are the same in every arm, so the unit of pairing is the fold: n is the number of folds
paired, never inflated by repeating values. For each arm against the baseline:

- the mean difference (arm - baseline) with a t-based 95% confidence interval;
- the Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided). Zero differences: Wilcoxon's own convention,
  they carry no sign and are dropped before ranking (`n_nonzero` says how many were left); all differences zero
  gives p = 1. With no ties the exact null distribution is used; with tied |differences| and at most 13 non-zero
  ones, scipy's permutation test enumerates all 2**n sign flips, which is exact too; beyond that the normal
  approximation. The method used is written in `wilcoxon_method`.
- the paired t-test (scipy.stats.ttest_rel).

A second view, `bootstrap_difference`, resamples test slices within each fold (the same slices for both arms)
and recomputes the fold-mean difference of a metric from the predictions.
"""

import warnings

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import roc_auc_score

from nodulesynth.stats.inputs import is_proportion, metric_values

# Differences are rounded before ranking so that floating-point noise does not split ties (scipy's own advice).
_DIFF_DECIMALS = 10
# Up to this many non-zero differences, 2**n sign flips are fewer than scipy's default 9999 resamples, so its
# permutation test is an exact enumeration.
_MAX_EXACT_PERMUTATION = 13
PAIR_KEYS = ("scan_id", "slice_index")


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p the Wilcoxon signed-rank test can give with n differences (all of one sign).

    Computed by scipy on n distinct positive differences, not typed in: 0.0625 for n = 5.
    """
    if n < 1:
        raise ValueError(f"min_wilcoxon_p: n must be at least 1, got {n}")
    return float(stats.wilcoxon(np.arange(1.0, n + 1.0), alternative="two-sided", method="exact").pvalue)


def _wilcoxon_method(nonzero: np.ndarray):
    """scipy method argument and its name for these non-zero differences."""
    has_ties = np.unique(np.abs(nonzero)).size < nonzero.size
    if not has_ties:
        return "exact", "exact"
    if nonzero.size <= _MAX_EXACT_PERMUTATION:
        return stats.PermutationMethod(), "exact permutation (tied differences)"
    return "asymptotic", "normal approximation (tied differences)"


def wilcoxon_test(differences) -> tuple[float, int, str]:
    """(two-sided p, number of non-zero differences, method) of the signed-rank test; zeros handled as documented."""
    d = np.round(np.asarray(differences, dtype=float), _DIFF_DECIMALS)
    nonzero = d[d != 0]
    if nonzero.size == 0:
        return 1.0, 0, "all differences zero (p = 1 by definition)"
    method, name = _wilcoxon_method(nonzero)
    result = stats.wilcoxon(nonzero, zero_method="wilcox", alternative="two-sided", method=method)
    return float(result.pvalue), int(nonzero.size), name


def t_interval(differences, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): mean difference and its t-based confidence interval (n - 1 degrees of freedom)."""
    d = np.asarray(differences, dtype=float)
    mean = float(d.mean())
    if d.size < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size)
    return mean, float(mean - half), float(mean + half)


def paired_values(metrics: pd.DataFrame, task: str, metric: str, arm: str, baseline: str = "A",
                  scale: float = 100) -> pd.DataFrame:
    """(fold, baseline value, arm value) of the folds both arms have; refuses anything that is not cleanly paired."""
    values = metric_values(metrics, task, metric, scale)  # refuses duplicated (arm, fold)
    for name in (baseline, arm):
        if not (values["arm"] == name).any():
            raise ValueError(f"{task} {metric}: arm {name} has no folds; cannot pair it")
    base = values[values["arm"] == baseline].set_index("fold")["value"]
    other = values[values["arm"] == arm].set_index("fold")["value"]
    for fold in sorted(set(base.index) ^ set(other.index)):
        has, lacks = (baseline, arm) if fold in base.index else (arm, baseline)
        raise ValueError(f"{task} {metric}: fold {fold} is in arm {has} but missing from arm {lacks}; "
                         "unpaired folds cannot be compared")
    for name, series in ((baseline, base), (arm, other)):
        for fold, value in series.items():
            if not np.isfinite(value):
                raise ValueError(f"{task} {metric}: arm {name} fold {fold} is {value}; "
                                 "a missing value cannot be paired")
    return pd.DataFrame({"fold": base.index, "baseline": base.values, "arm": other.loc[base.index].values})


def _paired_row(pairs: pd.DataFrame, task, metric, arm, baseline, level) -> dict:
    d = np.round(pairs["arm"].to_numpy() - pairs["baseline"].to_numpy(), _DIFF_DECIMALS)
    n = int(d.size)
    mean, low, high = t_interval(d, level)
    notes = []
    if n >= 2:
        p_wilcoxon, n_nonzero, method = wilcoxon_test(d)
        if np.ptp(d) == 0:
            p_t = float("nan")  # t undefined with zero spread; scipy would warn and return NaN anyway
            notes.append("all fold differences equal: t-test undefined")
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                p_t = float(stats.ttest_rel(pairs["arm"], pairs["baseline"]).pvalue)
        floor = min_wilcoxon_p(n_nonzero) if n_nonzero else 0.0
        if floor >= 0.05:
            notes.append(f"with {n_nonzero} non-zero differences Wilcoxon p cannot fall below {floor:.4g}")
    else:
        p_wilcoxon, n_nonzero, method, p_t = float("nan"), int(np.count_nonzero(d)), "", float("nan")
        notes.append("one fold: no test possible")
    return {"task": task, "metric": metric, "arm": arm, "baseline": baseline, "n": n, "n_nonzero": n_nonzero,
            "mean_baseline": float(pairs["baseline"].mean()), "mean_arm": float(pairs["arm"].mean()),
            "mean_diff": mean, "ci_low": low, "ci_high": high, "ci_level": level,
            "wilcoxon_p": p_wilcoxon, "wilcoxon_method": method, "ttest_p": p_t,
            "unit": "pp" if is_proportion(metric) else "", "note": "; ".join(notes)}


def paired_tests(metrics: pd.DataFrame, task: str, metric: str, baseline: str = "A", arms=("B", "C"),
                 scale: float = 100, level: float = 0.95) -> pd.DataFrame:
    """One row per arm compared with `baseline`, fold by fold (see the module docstring for the columns' meaning).

    Differences are arm - baseline, in percentage points for proportion metrics (`scale`), else in the metric's
    own unit. Refuses missing, duplicated, unpaired or non-finite fold values with an error naming arm and fold.
    """
    rows = [_paired_row(paired_values(metrics, task, metric, arm, baseline, scale), task, metric, arm, baseline,
                        level) for arm in arms if arm != baseline]
    return pd.DataFrame(rows)


def five_fold_caveat(n: int) -> str:
    """A plain sentence on what n fold-paired differences can and cannot show."""
    if n < 2:
        return (f"With {n} fold, no paired test is possible: the table shows the single difference, "
                "which says nothing about how much it would vary from fold to fold.")
    floor = min_wilcoxon_p(n)
    if floor >= 0.05:
        reach = (f"so it cannot reach p < 0.05 however large and consistent the effect; the paired t-test can, "
                 f"but only by assuming the fold differences are normally distributed, which {n} values cannot check.")
    else:
        reach = (f"so p < 0.05 needs nearly every fold to move in the same direction; the paired t-test leans on "
                 f"the fold differences being roughly normal, which {n} values can barely check.")
    return (f"With n = {n} folds, each comparison rests on {n} paired differences. The smallest two-sided p-value "
            f"the Wilcoxon signed-rank test can give with {n} differences is {floor:.4g} (all of one sign), "
            f"{reach} The folds' training sets overlap, so the differences are not fully independent and every "
            f"p-value is approximate. Read the mean difference and its 95% confidence interval as the size of "
            f"the effect on this cohort, not as proof that it holds elsewhere.")


# --- bootstrap over test slices within folds -------------------------------------------------------------------

def auc_metric(frame: pd.DataFrame) -> float:
    """ROC AUC of detection predictions (columns label 0/1 and score), by scikit-learn."""
    return float(roc_auc_score(frame["label"].to_numpy(), frame["score"].to_numpy()))


def accuracy_metric(frame: pd.DataFrame, threshold: float = 0.5) -> float:
    """Accuracy of detection predictions, a slice called positive when score >= threshold (as in metrics.json)."""
    return float(((frame["score"].to_numpy() >= threshold) == (frame["label"].to_numpy() == 1)).mean())


DETECTION_METRIC_FNS = {"auc": auc_metric, "accuracy": accuracy_metric}


def _fold_groups(frame: pd.DataFrame, name: str, fold) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of one arm's fold sorted by slice, and per slice (key, first row, row count, label)."""
    missing = [c for c in PAIR_KEYS if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} fold {fold}: predictions lack column(s) {missing}")
    if frame[list(PAIR_KEYS)].isna().any(axis=None):
        raise ValueError(f"{name} fold {fold}: predictions with an empty scan_id or slice_index")
    rows = frame.sort_values(list(PAIR_KEYS), kind="stable", ignore_index=True)
    slices = rows.groupby(list(PAIR_KEYS), sort=True)  # same order as the sort, so each slice's rows are contiguous
    counts = slices.size()
    table = pd.DataFrame({"start": np.cumsum(counts.to_numpy()) - counts.to_numpy(), "count": counts.to_numpy()},
                         index=counts.index)
    if "label" in rows.columns:
        table["label"] = slices["label"].first()
    return rows, table


def _take_slices(rows: pd.DataFrame, table: pd.DataFrame, chosen: np.ndarray) -> pd.DataFrame:
    """Rows of the chosen slices (indices into `table`, with repeats); a slice's rows are contiguous in `rows`."""
    counts = table["count"].to_numpy()[chosen]
    starts = table["start"].to_numpy()[chosen]
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return rows.take(np.repeat(starts, counts) + np.arange(counts.sum()) - offsets)


def _draw(rng, strata: list[np.ndarray]) -> np.ndarray:
    """One bootstrap sample of slice indices, resampled with replacement within each stratum."""
    return np.concatenate([rng.choice(members, size=members.size, replace=True) for members in strata])


def bootstrap_difference(pred_a: pd.DataFrame, pred_b: pd.DataFrame, metric_fn, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> tuple[float, float, float]:
    """(observed difference, low, high): the fold mean of metric_fn(B) - metric_fn(A), percentile bootstrap CI.

    Both frames need a `fold` column (load_predictions adds it) and scan_id, slice_index. In each fold the test
    slices are resampled with replacement, the same slices for both arms (paired by (scan_id, slice_index), not by
    row order), stratified by `label` when present so every resample keeps the fold's positives and negatives
    (an AUC stays defined). All rows of a chosen slice come along, so box predictions resample by slice too.
    """
    if n_boot < 1:
        raise ValueError(f"bootstrap_difference: n_boot must be at least 1, got {n_boot}")
    for name, frame in (("pred_a", pred_a), ("pred_b", pred_b)):
        if "fold" not in frame.columns:
            raise ValueError(f"{name} lacks a 'fold' column (load_predictions adds it)")
    folds_a, folds_b = set(pred_a["fold"]), set(pred_b["fold"])
    if folds_a != folds_b:
        raise ValueError(f"bootstrap_difference: folds differ between arms: {sorted(folds_a ^ folds_b)} in one only")
    rng = np.random.default_rng(seed)
    prepared = []
    for fold in sorted(folds_a):
        rows_a, table_a = _fold_groups(pred_a[pred_a["fold"] == fold], "pred_a", fold)
        rows_b, table_b = _fold_groups(pred_b[pred_b["fold"] == fold], "pred_b", fold)
        if not table_a.index.equals(table_b.index):
            only = table_a.index.symmetric_difference(table_b.index)[:3].tolist()
            raise ValueError(f"fold {fold}: the arms' test slices differ (e.g. {only}); they must be paired")
        if "label" in table_a.columns and "label" in table_b.columns:
            if not (table_a["label"].to_numpy() == table_b["label"].to_numpy()).all():
                raise ValueError(f"fold {fold}: the arms disagree on a slice's label")
            labels = table_a["label"].to_numpy()
            strata = [np.flatnonzero(labels == value) for value in np.unique(labels)]
        else:
            strata = [np.arange(len(table_a))]
        prepared.append((fold, rows_a, table_a, rows_b, table_b, strata))

    def fold_mean_difference(draws) -> float:
        diffs = []
        for (fold, rows_a, table_a, rows_b, table_b, _), chosen in zip(prepared, draws):
            diffs.append(metric_fn(_take_slices(rows_b, table_b, chosen)) -
                         metric_fn(_take_slices(rows_a, table_a, chosen)))
        return float(np.mean(diffs))

    observed = fold_mean_difference([np.arange(len(p[2])) for p in prepared])
    if not np.isfinite(observed):
        raise ValueError("bootstrap_difference: the metric is not finite on the observed predictions of some fold")
    replicates = np.array([fold_mean_difference([_draw(rng, p[5]) for p in prepared]) for _ in range(n_boot)])
    if not np.isfinite(replicates).all():
        raise ValueError(f"bootstrap_difference: the metric was undefined in {int((~np.isfinite(replicates)).sum())} "
                         f"of {n_boot} resamples")
    low, high = np.percentile(replicates, [50 * (1 - level), 50 * (1 + level)])
    return observed, float(low), float(high)


def bootstrap_tests(predictions: pd.DataFrame, metric_fns: dict, baseline: str = "A", arms=("B", "C"),
                    n_boot: int = 2000, seed: int = 0, scale: float = 100) -> pd.DataFrame:
    """(metric, arm, boot_diff, boot_low, boot_high) per metric function and arm; proportions in percentage points."""
    rows = []
    base = predictions[predictions["arm"] == baseline]
    if base.empty:
        raise ValueError(f"bootstrap: no predictions of the baseline arm {baseline}")
    for metric, fn in metric_fns.items():
        factor = scale if is_proportion(metric) else 1
        for arm in arms:
            other = predictions[predictions["arm"] == arm]
            if other.empty:
                raise ValueError(f"bootstrap: no predictions of arm {arm}")
            diff, low, high = bootstrap_difference(base, other, fn, n_boot=n_boot, seed=seed)
            rows.append({"metric": metric, "arm": arm, "boot_diff": diff * factor, "boot_low": low * factor,
                         "boot_high": high * factor, "n_boot": n_boot})
    return pd.DataFrame(rows)
