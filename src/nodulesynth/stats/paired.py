"""Fold-paired comparisons of the study's arms (B and C against A, C against B), with honest n and a plain word on
what n folds can show.

Each fold's test slices are the same in every arm, so the unit of pairing is the fold: n is the number of folds
paired, never inflated by repeating values. For each arm against its baseline:

- the mean difference (arm - baseline) with a t-based 95% confidence interval;
- the Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided). Zero differences: Wilcoxon's own convention,
  they carry no sign and are dropped before ranking (`n_nonzero` says how many were left); all differences zero
  gives p = 1. With no ties the exact null distribution is used; with tied |differences| and at most 13 non-zero
  ones, scipy's permutation test enumerates all 2**n sign flips, which is exact too; beyond that the normal
  approximation. The method used is written in `wilcoxon_method`.
- the paired t-test (scipy.stats.ttest_rel), which treats the folds as independent;
- the Nadeau-Bengio corrected resampled t-test (`nb_ttest_p`): the folds' training sets overlap, so their
  differences are positively correlated and the plain t-test's variance d.var / k is too small. Nadeau and Bengio
  (2003, Machine Learning 52:239) multiply the variance by (1/k + n_test/n_train) instead of 1/k; `nb_ratio` is
  the n_test/n_train used (from the counts in metrics.json, else 1/(k-1), the k-fold ratio).

Multiple comparisons: `holm` adjusts the p-values of the primary endpoints (Holm's step-down method).

A second view, `bootstrap_comparisons`, resamples test *patients* within each fold (the same patients for every
arm, stratified by nodule status) and recomputes the fold-mean difference of detection metrics from the
predictions: slices of one patient are correlated, so resampling slices would understate the uncertainty.
"""

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from nodulesynth.errors import InputError
from nodulesynth.stats.inputs import is_proportion, metric_values

# Differences are rounded before ranking so that floating-point noise does not split ties (scipy's own advice).
_DIFF_DECIMALS = 10
# Up to this many non-zero differences, 2**n sign flips are fewer than scipy's default 9999 resamples, so its
# permutation test is an exact enumeration.
_MAX_EXACT_PERMUTATION = 13
PAIR_KEYS = ("scan_id", "slice_index")
# metrics.json counts behind the Nadeau-Bengio ratio: the test slices over the real training slices, which are
# what the folds' training sets share (an arm's synthetic slices are drawn afresh in each fold); n_train (all
# training slices) where a file predates n_train_real.
TEST_COUNT, TRAIN_COUNTS = "n_test", ("n_train_real", "n_train")


def min_wilcoxon_p(n: int) -> float:
    """Smallest two-sided p the Wilcoxon signed-rank test can give with n differences (all of one sign).

    Computed by scipy on n distinct positive differences, not typed in: 0.0625 for n = 5.
    """
    if n < 1:
        raise InputError(f"min_wilcoxon_p: n must be at least 1, got {n}")
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


def corrected_ttest(differences, test_train_ratio: float) -> float:
    """Two-sided p of the Nadeau-Bengio corrected resampled t-test of k fold differences.

    t = mean(d) / sqrt((1/k + test_train_ratio) * var(d)), k - 1 degrees of freedom (Nadeau & Bengio 2003).
    NaN when it is undefined (fewer than two folds, or all differences equal).
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2 or np.ptp(d) == 0:
        return float("nan")
    if not np.isfinite(test_train_ratio) or test_train_ratio < 0:
        raise InputError(f"corrected_ttest: n_test/n_train must be a finite ratio >= 0, got {test_train_ratio}")
    t = d.mean() / np.sqrt((1.0 / d.size + test_train_ratio) * d.var(ddof=1))
    return float(2 * stats.t.sf(abs(t), d.size - 1))


def overlap_ratio(metrics: pd.DataFrame, task: str, arm: str, folds) -> tuple[float, str]:
    """(n_test/n_train, where it came from) for the Nadeau-Bengio correction: the mean over `folds` of `arm`'s
    n_test / n_train_real (n_train where n_train_real is absent) from metrics.json, or 1/(k-1), the k-fold
    ratio, where the counts are absent."""
    rows = metrics[(metrics["task"] == task) & (metrics["arm"] == arm) & metrics["fold"].isin(list(folds))]
    counts = rows.pivot_table(index="fold", columns="metric", values="value", aggfunc="first")
    train = next((c for c in TRAIN_COUNTS if c in counts.columns), None)
    k = len(folds)
    has_counts = TEST_COUNT in counts.columns and train is not None and len(counts) == k
    if has_counts and counts[[TEST_COUNT, train]].notna().all(axis=None):
        if (counts[train] <= 0).any():
            fold = counts.index[(counts[train] <= 0).argmax()]
            raise InputError(f"{task}: arm {arm} fold {fold} has {train} = {counts.loc[fold, train]}; "
                             "a fold needs training slices")
        return float((counts[TEST_COUNT] / counts[train]).mean()), f"{TEST_COUNT}/{train}"
    return (1.0 / (k - 1) if k > 1 else float("nan")), "1/(k-1)"


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the input order; NaN (a test that could not be
    made) stays NaN and is not counted in the family.

    Written here (a few lines) because statsmodels, whose multipletests(method="holm") does this, is not in the
    project's environment, and scipy has only Benjamini-Hochberg (false_discovery_control), which controls the
    false discovery rate, not the family-wise error a set of primary endpoints needs.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    order = finite[np.argsort(p[finite], kind="stable")]
    # the i-th smallest (0-based) is multiplied by m - i; adjusted values never decrease along the order
    stepped = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out[order] = stepped
    return out


def paired_values(metrics: pd.DataFrame, task: str, metric: str, arm: str, baseline: str = "A",
                  scale: float = 100) -> pd.DataFrame:
    """(fold, baseline value, arm value) of the folds both arms have; refuses anything that is not cleanly paired."""
    values = metric_values(metrics, task, metric, scale)  # refuses duplicated (arm, fold)
    for name in (baseline, arm):
        if not (values["arm"] == name).any():
            raise InputError(f"{task} {metric}: arm {name} has no folds; cannot pair it")
    base = values[values["arm"] == baseline].set_index("fold")["value"]
    other = values[values["arm"] == arm].set_index("fold")["value"]
    for fold in sorted(set(base.index) ^ set(other.index)):
        has, lacks = (baseline, arm) if fold in base.index else (arm, baseline)
        raise InputError(f"{task} {metric}: fold {fold} is in arm {has} but missing from arm {lacks}; "
                         "unpaired folds cannot be compared")
    for name, series in ((baseline, base), (arm, other)):
        for fold, value in series.items():
            if not np.isfinite(value):
                raise InputError(f"{task} {metric}: arm {name} fold {fold} is {value}; "
                                 "a missing value cannot be paired")
    return pd.DataFrame({"fold": base.index, "baseline": base.values, "arm": other.loc[base.index].values})


def _paired_row(pairs: pd.DataFrame, task, metric, arm, baseline, level, ratio) -> dict:
    d = np.round(pairs["arm"].to_numpy() - pairs["baseline"].to_numpy(), _DIFF_DECIMALS)
    n = int(d.size)
    mean, low, high = t_interval(d, level)
    ratio, ratio_source = ratio
    p_nb = corrected_ttest(d, ratio) if n >= 2 else float("nan")
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
            "nb_ttest_p": p_nb, "nb_ratio": ratio, "nb_ratio_from": ratio_source,
            "unit": "pp" if is_proportion(metric) else "", "note": "; ".join(notes)}


def paired_tests(metrics: pd.DataFrame, task: str, metric: str, baseline: str = "A", arms=("B", "C"),
                 scale: float = 100, level: float = 0.95) -> pd.DataFrame:
    """One row per arm compared with `baseline`, fold by fold (see the module docstring for the columns' meaning).

    Differences are arm - baseline, in percentage points for proportion metrics (`scale`), else in the metric's
    own unit. Refuses missing, duplicated, unpaired or non-finite fold values with an error naming arm and fold.
    The Nadeau-Bengio ratio n_test/n_train is the baseline's (overlap_ratio).
    """
    rows = []
    for arm in arms:
        if arm == baseline:
            continue
        pairs = paired_values(metrics, task, metric, arm, baseline, scale)
        ratio = overlap_ratio(metrics, task, baseline, pairs["fold"])
        rows.append(_paired_row(pairs, task, metric, arm, baseline, level, ratio))
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
            f"{reach} The folds' training sets overlap, so the differences are not fully independent: the "
            f"Nadeau-Bengio corrected t-test widens the t-test's variance for that overlap, and every p-value is "
            f"approximate. Read the mean difference and its 95% confidence interval as the size of "
            f"the effect on this cohort, not as proof that it holds elsewhere.")


# --- bootstrap over test patients within folds -----------------------------------------------------------------

BOOTSTRAP_UNITS = {"patient": ("patient_id",), "slice": PAIR_KEYS}  # what one draw takes along
BOOTSTRAP_METRICS = ("auc", "average_precision", "accuracy", "balanced_accuracy")  # from predictions.tsv


def detection_evaluator(threshold: float):
    """labels, scores -> the BOOTSTRAP_METRICS at `threshold` (the config's detection.threshold), as
    nodulesynth.downstream.metrics.detection_metrics defines them for metrics.json.

    Computed here with numpy and scipy.stats.rankdata rather than by calling detection_metrics: its scikit-learn
    calls validate their input at some 5-10 ms a call, and the bootstrap makes one call per arm, fold and resample
    (50,000 in the study). The values are the same (tests/test_stats.py checks them against detection_metrics,
    and run_stats notes any fold-mean difference that is not metrics.json's).
    """
    def evaluate(labels, scores) -> dict:
        labels = np.asarray(labels).astype(int)
        scores = np.asarray(scores, dtype=float)
        positive = labels == 1
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        called = scores >= threshold
        recall = (called & positive).sum() / n_pos if n_pos else 0.0
        specificity = (~called & ~positive).sum() / n_neg if n_neg else 0.0
        values = {"accuracy": float((called == positive).mean()),
                  "balanced_accuracy": float((recall + specificity) / 2), "auc": float("nan"),
                  "average_precision": float("nan")}
        if n_pos and n_neg:
            # ROC AUC as the Mann-Whitney U over n_pos * n_neg (ties count one half), as roc_auc_score
            ranks = stats.rankdata(scores)
            values["auc"] = float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
            # average precision: precision at each distinct score, weighted by the recall it adds, as
            # average_precision_score
            order = np.argsort(-scores, kind="stable")
            ordered = scores[order]
            last = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]  # last row of each distinct score
            true_pos = np.cumsum(positive[order])[last]
            precision = true_pos / (last + 1)
            values["average_precision"] = float(np.sum(np.diff(np.r_[0, true_pos]) / n_pos * precision))
        return values
    return evaluate


def _sorted_fold(frame: pd.DataFrame, arm, fold) -> pd.DataFrame:
    """One arm's detection predictions of one fold, one row per test slice, sorted by patient, scan, slice."""
    keys = ["patient_id", *PAIR_KEYS]
    missing = [c for c in (*keys, "label", "score") if c not in frame.columns]
    if missing:
        raise InputError(f"arm {arm} fold {fold}: predictions lack column(s) {missing}")
    if frame[keys].isna().any(axis=None):
        raise InputError(f"arm {arm} fold {fold}: predictions with an empty patient_id, scan_id or slice_index")
    twice = frame[frame.duplicated(list(PAIR_KEYS), keep=False)]
    if not twice.empty:
        scan, index = twice.iloc[0][list(PAIR_KEYS)]
        raise InputError(f"arm {arm} fold {fold}: slice {index} of scan {scan} has several predictions; "
                         "the bootstrap takes one score per test slice")
    return frame.astype({"patient_id": str, "scan_id": str}).sort_values(keys, kind="stable", ignore_index=True)


def _prepare_fold(frames: dict, fold, unit: str):
    """(labels, {arm: scores}, units, strata) of one fold: every arm's slices in one order (checked to be the
    same slices with the same patient and label in every arm), the row indices of each resampling unit, and
    the units grouped by nodule status (a patient is positive when any of its test slices is)."""
    reference, ref_rows = None, None
    scores = {}
    for arm, frame in frames.items():
        rows = _sorted_fold(frame, arm, fold)
        if ref_rows is None:
            reference, ref_rows = arm, rows
        else:
            same = len(rows) == len(ref_rows) and all(
                (rows[c].to_numpy() == ref_rows[c].to_numpy()).all() for c in PAIR_KEYS)
            if not same:
                ours = set(zip(rows["scan_id"], rows["slice_index"]))
                theirs = set(zip(ref_rows["scan_id"], ref_rows["slice_index"]))
                only = sorted(ours ^ theirs)[:3] or "the same slices under other patients"
                raise InputError(f"fold {fold}: the test slices of arms {reference} and {arm} differ (e.g. {only}); "
                                 "they must be paired")
            for column in ("patient_id", "label"):
                if not (rows[column].to_numpy() == ref_rows[column].to_numpy()).all():
                    raise InputError(f"fold {fold}: arms {reference} and {arm} disagree on a slice's {column}")
        scores[arm] = rows["score"].to_numpy(dtype=float)
    labels = ref_rows["label"].to_numpy().astype(int)
    codes = ref_rows.groupby(list(BOOTSTRAP_UNITS[unit]), sort=False).ngroup().to_numpy()  # contiguous: sorted
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    units = np.split(np.arange(len(codes)), starts[1:])
    positive = np.array([labels[u].max() == 1 for u in units])
    strata = [np.flatnonzero(positive == value) for value in (True, False) if (positive == value).any()]
    return labels, scores, units, strata


def bootstrap_comparisons(predictions: pd.DataFrame, evaluate, comparisons, n_boot: int = 2000, seed: int = 0,
                          level: float = 0.95, unit: str = "patient", scale: float = 100) -> pd.DataFrame:
    """Percentile bootstrap of fold-mean differences: one row per comparison (baseline, arm) and metric, with
    columns metric, baseline, arm, boot_diff (observed), boot_low, boot_high, n_boot, boot_unit.

    predictions: detection predictions.tsv rows of several arms (columns arm, fold, patient_id, scan_id,
    slice_index, label, score; load_predictions gives them). evaluate(labels, scores) -> {metric: value}
    (detection_evaluator). In each fold and resample, the units (`unit` "patient": test patients; "slice": test
    slices) are drawn with replacement within the positive and within the negative ones, so every resample
    keeps the fold's mix; the same units for every arm (the arms share their test slices, checked); all slices of
    a drawn patient come along, and a patient drawn twice counts twice. A difference is arm - baseline of the
    mean over folds, proportions in percentage points (`scale`).
    """
    if n_boot < 1:
        raise InputError(f"bootstrap: n_boot must be at least 1, got {n_boot}")
    if unit not in BOOTSTRAP_UNITS:
        raise InputError(f"bootstrap: unit must be one of {sorted(BOOTSTRAP_UNITS)}, got {unit!r}")
    arms = list(dict.fromkeys(arm for pair in comparisons for arm in pair))
    folds = {}
    for arm in arms:
        rows = predictions[predictions["arm"] == arm]
        if rows.empty:
            raise InputError(f"bootstrap: no predictions of arm {arm}")
        folds[arm] = sorted(set(rows["fold"]))
    for arm in arms[1:]:
        if folds[arm] != folds[arms[0]]:
            raise InputError(f"bootstrap: arm {arm} has folds {folds[arm]}, arm {arms[0]} {folds[arms[0]]}; "
                             "the arms must be paired fold by fold")
    prepared = [(fold, *_prepare_fold({arm: predictions[(predictions["arm"] == arm) & (predictions["fold"] == fold)]
                                       for arm in arms}, fold, unit)) for fold in folds[arms[0]]]

    def fold_values(fold, labels, scores, chosen) -> dict:
        """{arm: {metric: value}} on the rows `chosen` of one fold."""
        values = {arm: evaluate(labels[chosen], scores[arm][chosen]) for arm in arms}
        for arm, metrics in values.items():
            bad = [m for m, v in metrics.items() if not np.isfinite(v)]
            if bad:
                raise InputError(f"bootstrap: {bad[0]} of arm {arm} fold {fold} is undefined on a resample of "
                                 f"{len(chosen)} slices with {int(labels[chosen].sum())} positive")
        return values

    def arm_means(draws) -> dict:
        """{arm: {metric: mean over folds}} for one set of row indices per fold."""
        per_fold = [fold_values(fold, labels, scores, chosen)
                    for (fold, labels, scores, _, _), chosen in zip(prepared, draws)]
        return {arm: {m: float(np.mean([f[arm][m] for f in per_fold])) for m in per_fold[0][arm]} for arm in arms}

    rng = np.random.default_rng(seed)

    def draw(units, strata) -> np.ndarray:
        chosen = np.concatenate([rng.choice(members, size=members.size, replace=True) for members in strata])
        return np.concatenate([units[u] for u in chosen])

    observed = arm_means([np.arange(len(p[1])) for p in prepared])
    replicates = [arm_means([draw(p[3], p[4]) for p in prepared]) for _ in range(n_boot)]
    rows = []
    for metric in observed[arms[0]]:
        factor = scale if is_proportion(metric) else 1
        for baseline, arm in comparisons:
            diffs = np.array([r[arm][metric] - r[baseline][metric] for r in replicates]) * factor
            low, high = np.percentile(diffs, [50 * (1 - level), 50 * (1 + level)])
            rows.append({"metric": metric, "baseline": baseline, "arm": arm,
                         "boot_diff": (observed[arm][metric] - observed[baseline][metric]) * factor,
                         "boot_low": float(low), "boot_high": float(high), "n_boot": n_boot, "boot_unit": unit})
    return pd.DataFrame(rows)


def bootstrap_difference(pred_a: pd.DataFrame, pred_b: pd.DataFrame, metric_fn, n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95, unit: str = "patient") -> tuple[float, float, float]:
    """(observed, low, high) of the fold mean of metric_fn(B) - metric_fn(A), metric_fn(labels, scores) -> float,
    by bootstrap_comparisons (both frames need `fold`, which load_predictions adds); no scaling."""
    for name, frame in (("pred_a", pred_a), ("pred_b", pred_b)):
        if "fold" not in frame.columns:
            raise InputError(f"{name} lacks a 'fold' column (load_predictions adds it)")
    both = pd.concat([pred_a.assign(arm="a"), pred_b.assign(arm="b")], ignore_index=True)
    row = bootstrap_comparisons(both, lambda labels, scores: {"value": metric_fn(labels, scores)}, [("a", "b")],
                                n_boot, seed, level, unit, scale=1).iloc[0]
    return float(row["boot_diff"]), float(row["boot_low"]), float(row["boot_high"])
