"""Statistics of the downstream study against hand computations: mean ± sd, Wilcoxon and t-test, CIs, refusals,
the LaTeX/Markdown writers and reading metrics.json files from disk."""

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from nodulesynth.stats.inputs import load_metrics, load_predictions
from nodulesynth.stats.paired import (accuracy_metric, auc_metric, bootstrap_difference, five_fold_caveat,
                                      min_wilcoxon_p, paired_tests)
from nodulesynth.stats.tables import format_mean_sd, latex_escape, run_stats, summary_table, write_tables

DETECTION = ("accuracy", "precision", "recall", "specificity", "f1", "auc")
LOCALIZATION = ("ap50", "ap60", "ar50", "ar60", "ar70", "cpm")


def metrics_frame(values: dict, metric="accuracy", task="detection") -> pd.DataFrame:
    """{arm: [value per fold 0..]} -> the long table load_metrics returns."""
    rows = [(task, arm, fold, metric, v) for arm, vals in values.items() for fold, v in enumerate(vals)]
    return pd.DataFrame(rows, columns=["task", "arm", "fold", "metric", "value"])


def with_differences(d, base=0.5, metric="accuracy") -> pd.DataFrame:
    """Arm A at `base` (a fraction); arm B = A + d/100 so the differences are d in percentage points; C = A."""
    a = [base] * len(d)
    return metrics_frame({"A": a, "B": [base + x / 100 for x in d], "C": a}, metric)


def row_of(tests: pd.DataFrame, arm: str) -> pd.Series:
    return tests.set_index("arm").loc[arm]


# --- mean ± sd -------------------------------------------------------------------------------------------------

def test_summary_mean_sd_against_hand_values():
    metrics = pd.concat([
        metrics_frame({"A": [0.80, 0.82, 0.84, 0.86, 0.88], "B": [0.90, 0.90, 0.90, 0.90, 0.90]}),
        metrics_frame({"A": [10, 12, 14, 12, 12], "B": [1, 2, 3, 4, 5]}, metric="tp"),
    ])
    table = summary_table(metrics, "detection", ["accuracy", "tp"]).set_index(["arm", "metric"])
    # accuracy A in percent: 80, 82, 84, 86, 88 -> mean 84, deviations -4 -2 0 2 4 -> sum sq 40, /4 = 10, sd 3.1623
    assert table.loc[("A", "accuracy"), "mean"] == pytest.approx(84.0)
    assert table.loc[("A", "accuracy"), "sd"] == pytest.approx(math.sqrt(10))
    assert table.loc[("A", "accuracy"), "text"] == "84.00 ± 3.16"
    assert table.loc[("B", "accuracy"), "text"] == "90.00 ± 0.00"
    assert table.loc[("A", "accuracy"), "unit"] == "%"
    # a count is not scaled: tp A 10 12 14 12 12 -> mean 12, sum sq 8, /4 = 2, sd 1.4142
    assert table.loc[("A", "tp"), "text"] == "12.00 ± 1.41"
    assert table.loc[("B", "tp"), "text"] == "3.00 ± 1.58"  # 1..5: sum sq 10, /4, sqrt 2.5
    assert table.loc[("A", "tp"), "unit"] == ""
    assert (table["n"] == 5).all()
    assert format_mean_sd(85.7612, 1.6888) == "85.76 ± 1.69"
    assert format_mean_sd(85.7612, float("nan")) == "85.76"  # one fold: no sd


def test_summary_refuses_percent_given_as_proportion_and_missing_metric():
    with pytest.raises(ValueError, match="arm A fold 0.*outside 0..1"):
        summary_table(metrics_frame({"A": [85.0, 0.8]}), "detection", ["accuracy"])
    metrics = pd.concat([metrics_frame({"A": [0.8, 0.9]}), metrics_frame({"A": [0.7]}, metric="auc")])
    with pytest.raises(ValueError, match="arm A fold 1 has no 'auc'"):
        summary_table(metrics, "detection", ["accuracy", "auc"])


# --- paired tests against hand computations --------------------------------------------------------------------

def test_wilcoxon_ttest_and_ci_against_hand_values():
    d = [-1.0, 2.0, 3.0, 4.0, 5.0]
    row = row_of(paired_tests(with_differences(d), "detection", "accuracy"), "B")
    assert row["n"] == 5 and row["n_nonzero"] == 5
    # Wilcoxon by hand: |d| ranks 1..5, the only negative has rank 1, so R- = 1. Of the 2**5 = 32 sign patterns,
    # R- <= 1 for {} and {1}: 2. Two-sided p = 2 * 2/32 = 0.125, exact.
    assert row["wilcoxon_p"] == pytest.approx(0.125)
    assert row["wilcoxon_method"] == "exact"
    # t by hand: mean 2.6; deviations -3.6 -0.6 0.4 1.4 2.4 -> sum sq 21.2, var 5.3; se = sqrt(5.3 / 5)
    se = math.sqrt(5.3 / 5)
    t = 2.6 / se  # 2.5253
    assert row["ttest_p"] == pytest.approx(2 * stats.t.sf(t, 4), rel=1e-6)
    assert row["mean_diff"] == pytest.approx(2.6)
    half = stats.t.ppf(0.975, 4) * se  # 2.7764 * 1.0296 = 2.8585
    assert row["ci_low"] == pytest.approx(2.6 - half)
    assert row["ci_high"] == pytest.approx(2.6 + half)
    assert row["unit"] == "pp"
    # arm C equals A in every fold: all differences zero
    c = row_of(paired_tests(with_differences(d), "detection", "accuracy"), "C")
    assert c["wilcoxon_p"] == 1.0 and c["n_nonzero"] == 0 and c["n"] == 5
    assert math.isnan(c["ttest_p"]) and "t-test undefined" in c["note"]


def test_wilcoxon_and_ttest_disagree_on_an_outlier():
    # n = 6, all differences positive, one large outlier: d = 1 2 3 4 5 60.
    # Wilcoxon: R- = 0, one of 2**6 = 64 patterns -> two-sided p = 2/64 = 0.03125 (its minimum), < 0.05.
    # t: mean 12.5; deviations -11.5 -10.5 -9.5 -8.5 -7.5 47.5 -> sum sq 2717.5, var 543.5, se = sqrt(543.5 / 6)
    #    = 9.5175, t = 1.3134 on 5 df -> p = 0.246, not significant: the outlier inflates the sd.
    row = row_of(paired_tests(with_differences([1, 2, 3, 4, 5, 60], base=0.3), "detection", "accuracy"), "B")
    assert row["wilcoxon_p"] == pytest.approx(2 / 64)
    t = 12.5 / math.sqrt(543.5 / 6)
    assert row["ttest_p"] == pytest.approx(2 * stats.t.sf(t, 5), rel=1e-6)
    assert row["wilcoxon_p"] < 0.05 < 0.2 < row["ttest_p"]


def test_ttest_significant_while_five_fold_wilcoxon_cannot_be():
    # n = 5, consistent gains: d = 1.0 1.1 0.9 1.05 0.95 (pp). mean 1.0; deviations 0 .1 -.1 .05 -.05 -> sum sq
    # 0.025, var 0.00625, se = sqrt(0.00625 / 5) = 0.035355, t = 28.28 on 4 df -> p ~ 9e-6.
    # Wilcoxon: all positive, p = 2/32 = 0.0625, its floor for n = 5.
    row = row_of(paired_tests(with_differences([1.0, 1.1, 0.9, 1.05, 0.95]), "detection", "accuracy"), "B")
    assert row["ttest_p"] == pytest.approx(2 * stats.t.sf(1.0 / math.sqrt(0.00625 / 5), 4), rel=1e-4)
    assert row["ttest_p"] < 0.001
    assert row["wilcoxon_p"] == pytest.approx(0.0625)
    assert "cannot fall below 0.0625" in row["note"]


def test_five_fold_wilcoxon_floor_and_caveat():
    # two-sided: 2 * (1/2)**5 = 0.0625; with 6 folds 2/64
    assert min_wilcoxon_p(5) == pytest.approx(0.0625)
    assert min_wilcoxon_p(6) == pytest.approx(0.03125)
    caveat = five_fold_caveat(5)
    assert "0.0625" in caveat and "cannot reach p < 0.05" in caveat
    assert "cannot reach" not in five_fold_caveat(8)
    assert f"{min_wilcoxon_p(8):.4g}" in five_fold_caveat(8)


def test_zero_and_tied_differences():
    # a zero difference is dropped (Wilcoxon's convention): 4 positive left, p = 2/16 = 0.125; n stays 5
    row = row_of(paired_tests(with_differences([0.0, 1.0, 2.0, 3.0, 4.0]), "detection", "accuracy"), "B")
    assert row["n"] == 5 and row["n_nonzero"] == 4
    assert row["wilcoxon_p"] == pytest.approx(0.125)
    # ties: d = 1 1 2 -3 4 -> ranks 1.5 1.5 3 4 5, R- = 4. Sign patterns with R- <= 4: {}, {1.5a}, {1.5b}, {3},
    # {4}, {1.5a, 1.5b}: 6 of 32 -> two-sided p = 2 * 6/32 = 0.375, by exact enumeration
    row = row_of(paired_tests(with_differences([1.0, 1.0, 2.0, -3.0, 4.0]), "detection", "accuracy"), "B")
    assert row["wilcoxon_p"] == pytest.approx(0.375)
    assert row["wilcoxon_method"].startswith("exact permutation")


# --- refusals --------------------------------------------------------------------------------------------------

def test_refuses_missing_fold():
    metrics = metrics_frame({"A": [0.8, 0.8, 0.8, 0.8, 0.8], "B": [0.9, 0.9, 0.9, 0.9, 0.9], "C": [0.9] * 5})
    metrics = metrics[~((metrics["arm"] == "B") & (metrics["fold"] == 3))]
    with pytest.raises(ValueError, match="fold 3 is in arm A but missing from arm B"):
        paired_tests(metrics, "detection", "accuracy")


def test_refuses_duplicated_fold():
    metrics = metrics_frame({"A": [0.8] * 5, "B": [0.9] * 5, "C": [0.9] * 5})
    duplicate = metrics[(metrics["arm"] == "C") & (metrics["fold"] == 2)]
    with pytest.raises(ValueError, match="arm C fold 2 appears 2 times"):
        paired_tests(pd.concat([metrics, duplicate]), "detection", "accuracy")


def test_refuses_unpaired_arms_and_missing_values():
    a = metrics_frame({"A": [0.8] * 5})
    b = metrics_frame({"B": [0.9] * 5}).assign(fold=lambda f: f["fold"] + 5)  # folds 5..9: none shared with A
    with pytest.raises(ValueError, match="fold 0 is in arm A but missing from arm B"):
        paired_tests(pd.concat([a, b]), "detection", "accuracy", arms=("B",))
    with pytest.raises(ValueError, match="arm C has no folds"):
        paired_tests(metrics_frame({"A": [0.8] * 5, "B": [0.9] * 5}), "detection", "accuracy")
    nan = metrics_frame({"A": [0.8] * 5, "B": [0.9, 0.9, float("nan"), 0.9, 0.9], "C": [0.9] * 5})
    with pytest.raises(ValueError, match="arm B fold 2 is nan"):
        paired_tests(nan, "detection", "accuracy")


# --- files -----------------------------------------------------------------------------------------------------

def write_json(root, task, arm, fold_dir, values):
    path = root / "results" / "downstream" / task / arm / fold_dir / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def study_files(root, folds=5):
    """metrics.json of both tasks and detection predictions.tsv. Detection accuracy and AUC are computed from the
    predictions (as the detect step does); the other metrics are set: arm B 3 points above A, C equal to A."""
    rng = np.random.default_rng(1)
    paths = []
    for arm, gain in (("A", 0.0), ("B", 0.03), ("C", 0.0)):
        for k in range(folds):
            base = 0.7 + 0.02 * k
            labels = np.tile([0, 1], 10)
            scores = np.clip(labels * 0.3 + rng.uniform(0, 0.7, labels.size), 0, 1)
            from_predictions = {"accuracy": float(((scores >= 0.5) == labels).mean()),
                                "auc": float(roc_auc_score(labels, scores))}
            paths.append(write_json(root, "detection", arm, f"fold{k}", {
                **{m: base + gain for m in DETECTION}, **from_predictions, "tp": 10 + k, "n_test": 20}))
            pd.DataFrame({"scan_id": [f"S{k}{i // 5}" for i in range(20)], "patient_id": [f"P{k}"] * 20,
                          "slice_index": np.arange(20), "source": "real", "label": labels, "score": scores}).to_csv(
                paths[-1].with_name("predictions.tsv"), sep="\t", index=False)
            paths.append(write_json(root, "localization", arm, f"fold{k}", {m: base / 2 + gain for m in LOCALIZATION}))
    return paths


def test_load_metrics_from_files(tmp_path):
    paths = study_files(tmp_path, folds=2)
    metrics = load_metrics(paths)
    assert set(metrics["task"]) == {"detection", "localization"} and set(metrics["arm"]) == {"A", "B", "C"}
    assert sorted(metrics["fold"].unique()) == [0, 1]
    value = metrics.query("task == 'detection' and arm == 'B' and fold == 1 and metric == 'recall'")["value"]
    assert value.tolist() == [pytest.approx(0.75)]
    assert len(metrics) == 3 * 2 * (len(DETECTION) + 2) + 3 * 2 * len(LOCALIZATION)
    # fold01 and fold1 are the same fold: refused, naming the file
    twin = write_json(tmp_path, "detection", "A", "fold01", {"accuracy": 0.5})
    with pytest.raises(ValueError, match="duplicated detection arm A fold 1") as refused:
        load_metrics([*paths, twin])
    assert str(twin) in str(refused.value)  # both files named
    assert str(twin.parents[1] / "fold1" / "metrics.json") in str(refused.value)
    for bad in (write_json(tmp_path, "detection", "D", "fold0", {"accuracy": 0.5}),
                write_json(tmp_path, "detection", "A", "foldX", {"accuracy": 0.5}),
                write_json(tmp_path, "segmentation", "A", "fold0", {"accuracy": 0.5})):
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            load_metrics([bad])
    nested = write_json(tmp_path, "detection", "B", "fold7", {"accuracy": 0.5, "confusion": [[1, 2], [3, 4]]})
    with pytest.raises(ValueError, match="fold7.*'confusion' is not a number"):
        load_metrics([nested])


def test_tables_latex_and_markdown(tmp_path):
    metrics = load_metrics(study_files(tmp_path))
    summary = summary_table(metrics, "detection", DETECTION)
    tests = pd.concat([paired_tests(metrics, "detection", m) for m in DETECTION], ignore_index=True)
    paths = write_tables(summary, tests, tmp_path / "stats", "detection")
    assert [p.name for p in paths] == [f"detection_{kind}.{ext}" for kind in ("summary", "tests")
                                       for ext in ("tsv", "md", "tex")]
    tex = (tmp_path / "stats" / "detection_summary.tex").read_text()
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule")
    assert "±" not in tex and not re.search(r"(?<!\\)%", tex)  # ± as $\pm$, every % escaped
    body = tex[tex.index(r"\midrule") + len(r"\midrule"):tex.index(r"\bottomrule")].strip().splitlines()
    rows = [[cell.strip() for cell in line.removesuffix(r"\\").split(" & ")] for line in body]
    assert [r[0] for r in rows] == ["A: real", "B: real + SPADE", "C: real + SDM"]
    assert all(len(r) == 1 + len(DETECTION) for r in rows)
    # precision per fold 0.70 .. 0.78 (+0.03 for B): mean 74 %, sd sqrt(10) = 3.16
    assert rows[0][2] == r"74.00 $\pm$ 3.16" and rows[1][2] == r"77.00 $\pm$ 3.16"
    header = tex[tex.index(r"\toprule"):tex.index(r"\midrule")]
    assert r"Accuracy (\%)" in header
    tests_tex = (tmp_path / "stats" / "detection_tests.tex").read_text()
    body = tests_tex[tests_tex.index(r"\midrule"):tests_tex.index(r"\bottomrule")].strip().splitlines()[1:]
    assert len(body) == 2 * len(DETECTION)
    assert "0.0625" in tests_tex  # the caveat, in the caption
    md = (tmp_path / "stats" / "detection_summary.md").read_text().strip().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 3 and table[2].split(" | ")[2] == "74.00 ± 3.16"
    assert latex_escape("f1_score 5% ± a&b") == r"f1\_score 5\% $\pm$ a\&b"
    back = pd.read_csv(paths[0], sep="\t")
    assert back["mean"].tolist() == pytest.approx(summary["mean"].tolist())


def test_run_stats_writes_both_tasks(tmp_path):
    paths = study_files(tmp_path)
    written = run_stats(paths, tmp_path / "results" / "stats", n_boot=20)
    assert sorted(p.name for p in written) == sorted(f"{task}_{kind}.{ext}" for task in ("detection", "localization")
                                                     for kind in ("summary", "tests") for ext in ("tsv", "md", "tex"))
    assert all(p.exists() for p in written)
    tests = pd.read_csv(tmp_path / "results" / "stats" / "detection_tests.tsv", sep="\t")
    b = tests[(tests["metric"] == "precision") & (tests["arm"] == "B")].iloc[0]
    assert b["n"] == 5 and b["mean_diff"] == pytest.approx(3.0) and b["wilcoxon_p"] == pytest.approx(0.0625)
    # the bootstrap's observed difference, recomputed from predictions.tsv, equals the metrics.json one
    boot = tests[tests["metric"].isin(["accuracy", "auc"])]
    assert len(boot) == 4 and (boot["boot_low"] <= boot["boot_high"]).all()
    assert boot["boot_diff"].to_numpy() == pytest.approx(boot["mean_diff"].to_numpy(), abs=1e-6)
    assert not boot["note"].fillna("").str.contains("predictions.tsv gives").any()
    assert tests.loc[~tests["metric"].isin(["accuracy", "auc"]), "boot_diff"].isna().all()
    loc = pd.read_csv(tmp_path / "results" / "stats" / "localization_summary.tsv", sep="\t")
    assert set(loc["metric"]) == set(LOCALIZATION)


# --- bootstrap over slices -------------------------------------------------------------------------------------

def detection_predictions(fold, labels, scores, arm="A"):
    n = len(labels)
    return pd.DataFrame({"task": "detection", "arm": arm, "fold": fold, "scan_id": [f"S{fold}"] * n,
                         "patient_id": "P", "slice_index": np.arange(n), "source": "real", "label": labels,
                         "score": scores})


def test_bootstrap_pairs_slices_by_key_not_row_order():
    labels = [0, 0, 0, 1, 1, 1]
    a = pd.concat([detection_predictions(0, labels, [0.1, 0.7, 0.3, 0.6, 0.2, 0.9]),
                   detection_predictions(1, labels, [0.2, 0.1, 0.6, 0.8, 0.7, 0.4])], ignore_index=True)
    b = a.sample(frac=1.0, random_state=3).assign(arm="B")  # same predictions, shuffled rows
    assert bootstrap_difference(a, b, auc_metric, n_boot=100) == (0.0, 0.0, 0.0)
    # B right on every slice, A wrong on every slice: accuracy 1 vs 0 in every resample
    right = a.assign(score=a["label"].astype(float))
    wrong = a.assign(score=1.0 - a["label"])
    assert bootstrap_difference(wrong, right, accuracy_metric, n_boot=100) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="fold 1: the arms' test slices differ"):
        bootstrap_difference(a, b[~((b["fold"] == 1) & (b["slice_index"] == 2))], auc_metric, n_boot=10)


def test_bootstrap_observed_auc_difference_by_hand():
    # fold 0: labels 0 0 1 1. A scores .1 .6 .4 .9: of the 4 (neg, pos) pairs, (.6, .4) is misordered -> AUC 3/4.
    # B scores .1 .2 .8 .9 -> AUC 1. Fold 1: A and B equal -> difference 0. Fold mean: (0.25 + 0) / 2 = 0.125.
    a = pd.concat([detection_predictions(0, [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]),
                   detection_predictions(1, [0, 0, 1, 1], [0.3, 0.2, 0.6, 0.5])], ignore_index=True)
    b = a.copy()
    b.loc[b["fold"] == 0, "score"] = [0.1, 0.2, 0.8, 0.9]
    diff, low, high = bootstrap_difference(a, b, auc_metric, n_boot=100, seed=5)
    assert diff == pytest.approx(0.125)
    assert 0.0 <= low <= diff <= high <= 0.5  # B never worse than A on any resample; at most 1 - 0 in one fold
    assert bootstrap_difference(a, b, auc_metric, n_boot=100, seed=5) == (diff, low, high)  # seeded


def test_load_predictions_checks_columns(tmp_path):
    path = tmp_path / "detection" / "A" / "fold0" / "predictions.tsv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"scan_id": ["S"], "slice_index": [0], "score": [0.5]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"predictions.tsv: missing column\(s\) \['patient_id', 'source', 'label'\]"):
        load_predictions([path])
