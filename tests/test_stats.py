"""Statistics of the downstream study against hand computations: mean ± sd, Wilcoxon, t and Nadeau-Bengio
corrected t tests, Holm's adjustment of the primary endpoints, CIs, the patient bootstrap, the controls table,
refusals, the LaTeX/Markdown writers and reading metrics.json files from disk."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats
import yaml

from nodulesynth.cli import main
from nodulesynth.downstream.metrics import detection_metrics
from nodulesynth.stats.inputs import load_metrics, load_predictions
from nodulesynth.stats.paired import (BOOTSTRAP_METRICS, bootstrap_difference, corrected_ttest,
                                      detection_evaluator, five_fold_caveat, holm, min_wilcoxon_p, paired_tests)
from nodulesynth.stats.tables import StatsOptions, controls_table, format_mean_sd, latex_escape, run_stats, summary_table
from nodulesynth.stats.tables import tests_table as comparisons_table  # a name pytest does not collect
from nodulesynth.stats.tables import write_tables

DETECTION = ("accuracy", "precision", "recall", "specificity", "f1", "auc", "average_precision", "balanced_accuracy")
FROM_PREDICTIONS = ("accuracy", "auc", "average_precision", "balanced_accuracy")
LOCALIZATION = ("ap50", "ap60", "ar50", "ar60", "ar70", "cpm")
SCHEMA = Path(__file__).parents[1] / "schemas" / "config.schema.yaml"


def auc(labels, scores):
    """The bootstrap's own AUC (test_the_bootstraps_metrics_are_detection_metrics checks it against scikit-learn's)."""
    return detection_evaluator(0.5)(labels, scores)["auc"]


def accuracy(labels, scores):
    return float(((np.asarray(scores) >= 0.5) == (np.asarray(labels) == 1)).mean())


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


GAINS = {"A": 0.0, "B": 0.03, "C": 0.0, "P": -0.10, "N": 0.0}  # the set metrics: arm minus A
SIGNAL = {"A": 0.25, "B": 0.25, "C": 0.25, "P": 0.0, "N": 0.25}  # how far a nodule slice's score is raised


def study_files(root, folds=5, arms=("A", "B", "C"), threshold=0.5):
    """metrics.json of both tasks and detection predictions.tsv: per fold four patients of five slices, two of them
    with two nodule slices each. The detection metrics that predictions.tsv allows are computed from it at
    `threshold` (as the detect step does; arm P's scores carry no signal); the other metrics are set: B 3 points
    above A, C and N equal to A, P 10 points below (localization with a little noise per fold); N's detection
    predictions are A's."""
    rng = np.random.default_rng(1)
    paths = []
    labels = np.array([0, 1, 0, 1, 0] * 2 + [0] * 10)
    drawn = {}
    for arm in arms:
        for k in range(folds):
            base = 0.7 + 0.02 * k
            drawn[arm, k] = np.clip(labels * SIGNAL[arm] + rng.uniform(0, 0.5, labels.size), 0, 1)
            scores = drawn["A", k] if arm == "N" and ("A", k) in drawn else drawn[arm, k]  # N: A's predictions
            computed = detection_metrics(labels, scores, threshold)
            counts = {"n_test": 20, "n_train_real": 80}
            paths.append(write_json(root, "detection", arm, f"fold{k}", {
                **{m: base + GAINS[arm] for m in DETECTION}, **{m: computed[m] for m in FROM_PREDICTIONS},
                "tp": 10 + k, **counts}))
            pd.DataFrame({"scan_id": [f"S{k}{i // 5}" for i in range(20)],
                          "patient_id": [f"P{k}{i // 5}" for i in range(20)], "slice_index": np.arange(20),
                          "source": "real", "label": labels, "score": scores}).to_csv(
                paths[-1].with_name("predictions.tsv"), sep="\t", index=False)
            paths.append(write_json(root, "localization", arm, f"fold{k}", {
                **{m: base / 2 + GAINS[arm] + rng.normal(0, 0.01) for m in LOCALIZATION}, **counts}))
    return paths


def test_load_metrics_from_files(tmp_path):
    paths = study_files(tmp_path, folds=2)
    metrics = load_metrics(paths)
    assert set(metrics["task"]) == {"detection", "localization"} and set(metrics["arm"]) == {"A", "B", "C"}
    assert sorted(metrics["fold"].unique()) == [0, 1]
    value = metrics.query("task == 'detection' and arm == 'B' and fold == 1 and metric == 'recall'")["value"]
    assert value.tolist() == [pytest.approx(0.75)]
    assert len(metrics) == 3 * 2 * (len(DETECTION) + 3) + 3 * 2 * (len(LOCALIZATION) + 2)
    # fold01 and fold1 are the same fold: refused, naming the file
    twin = write_json(tmp_path, "detection", "A", "fold01", {"accuracy": 0.5})
    with pytest.raises(ValueError, match="duplicated detection arm A fold 1") as refused:
        load_metrics([*paths, twin])
    assert str(twin) in str(refused.value)  # both files named
    assert str(twin.parents[1] / "fold1" / "metrics.json") in str(refused.value)
    controls = load_metrics([write_json(tmp_path, "detection", arm, "fold0", {"auc": 0.5}) for arm in "PN"])
    assert sorted(controls["arm"]) == ["N", "P"]  # the control arms are read (their own table shows them)
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
    tests = comparisons_table(metrics, "detection", DETECTION, primary=("auc",))
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
    assert len(body) == 3 * len(DETECTION)  # B vs A, C vs A, C vs B
    assert "0.0625" in tests_tex  # the caveat, in the caption
    md_tests = (tmp_path / "stats" / "detection_tests.md").read_text()
    assert "| AUC (pp) | C vs B | primary |" in md_tests and "| Precision (pp) | C vs B | exploratory |" in md_tests
    md = (tmp_path / "stats" / "detection_summary.md").read_text().strip().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert len(table) == 2 + 3 and table[2].split(" | ")[2] == "74.00 ± 3.16"
    assert latex_escape("f1_score 5% ± a&b") == r"f1\_score 5\% $\pm$ a\&b"
    back = pd.read_csv(paths[0], sep="\t")
    assert back["mean"].tolist() == pytest.approx(summary["mean"].tolist())


def test_run_stats_writes_both_tasks(tmp_path):
    paths = study_files(tmp_path)
    written = run_stats(paths, tmp_path / "results" / "stats", StatsOptions(n_boot=20))
    assert sorted(p.name for p in written) == sorted(f"{task}_{kind}.{ext}" for task in ("detection", "localization")
                                                     for kind in ("summary", "tests") for ext in ("tsv", "md", "tex"))
    assert all(p.exists() for p in written)
    tests = pd.read_csv(tmp_path / "results" / "stats" / "detection_tests.tsv", sep="\t")
    b = tests[(tests["metric"] == "precision") & (tests["arm"] == "B")].iloc[0]
    assert b["n"] == 5 and b["mean_diff"] == pytest.approx(3.0) and b["wilcoxon_p"] == pytest.approx(0.0625)
    # C against B as well as B and C against A
    assert set(zip(tests["baseline"], tests["arm"])) == {("A", "B"), ("A", "C"), ("B", "C")}
    cb = tests[(tests["metric"] == "precision") & (tests["baseline"] == "B")].iloc[0]
    assert cb["arm"] == "C" and cb["mean_diff"] == pytest.approx(-3.0)
    # the bootstrap's observed difference, recomputed from predictions.tsv, equals the metrics.json one
    boot = tests[tests["metric"].isin(FROM_PREDICTIONS)]
    assert len(boot) == 3 * len(FROM_PREDICTIONS) and (boot["boot_low"] <= boot["boot_high"]).all()
    assert boot["boot_diff"].to_numpy() == pytest.approx(boot["mean_diff"].to_numpy(), abs=1e-6)
    assert not boot["note"].fillna("").str.contains("predictions.tsv gives").any()
    assert (boot["boot_unit"] == "patient").all()
    assert tests.loc[~tests["metric"].isin(FROM_PREDICTIONS), "boot_diff"].isna().all()
    loc = pd.read_csv(tmp_path / "results" / "stats" / "localization_summary.tsv", sep="\t")
    assert set(loc["metric"]) == set(LOCALIZATION)
    summary = pd.read_csv(tmp_path / "results" / "stats" / "detection_summary.tsv", sep="\t")
    assert {"average_precision", "balanced_accuracy"} <= set(summary["metric"])
    assert not (tmp_path / "results" / "stats" / "controls.tsv").exists()  # no control arms, no controls table


def test_primary_endpoints_are_holm_adjusted_together_the_rest_exploratory(tmp_path):
    run_stats(study_files(tmp_path), tmp_path / "stats", StatsOptions(n_boot=0))
    tests = pd.concat([pd.read_csv(tmp_path / "stats" / f"{task}_tests.tsv", sep="\t") for task in
                       ("detection", "localization")], ignore_index=True)
    primary = tests[tests["endpoint"] == "primary"]
    # the default primary endpoints: detection AUC and localization CPM, each in B-A, C-A and C-B: one family of 6
    assert sorted(zip(primary["task"], primary["metric"], primary["baseline"], primary["arm"])) == sorted(
        (task, metric, baseline, arm) for task, metric in (("detection", "auc"), ("localization", "cpm"))
        for baseline, arm in (("A", "B"), ("A", "C"), ("B", "C")))
    assert (tests.loc[tests["endpoint"] != "primary", "endpoint"] == "exploratory").all()
    assert tests.loc[tests["endpoint"] == "exploratory", "p_holm"].isna().all()
    # Holm over the six corrected-t p-values of both tasks together (a family per task would adjust less)
    p = primary["nb_ttest_p"].to_numpy()
    assert np.isfinite(p).all()
    order = np.argsort(p)
    expected = np.empty(6)
    expected[order] = np.minimum(1, np.maximum.accumulate((6 - np.arange(6)) * p[order]))
    assert primary["p_holm"].to_numpy() == pytest.approx(expected)
    assert (primary["p_holm"].to_numpy() >= p).all()
    md = (tmp_path / "stats" / "localization_tests.md").read_text()
    assert "Holm" in md and "Nadeau-Bengio" in md
    # another primary set, from the config: only detection average precision
    run_stats(study_files(tmp_path / "other"), tmp_path / "other_stats",
              StatsOptions.from_config({"n_boot": 0, "primary": {"detection": ["average_precision"]}}))
    other = pd.read_csv(tmp_path / "other_stats" / "detection_tests.tsv", sep="\t")
    assert set(other.loc[other["endpoint"] == "primary", "metric"]) == {"average_precision"}
    other_loc = pd.read_csv(tmp_path / "other_stats" / "localization_tests.tsv", sep="\t")
    assert (other_loc["endpoint"] == "exploratory").all()


def test_stats_options_match_the_schema_and_refuse_bad_primary():
    schema = yaml.safe_load(SCHEMA.read_text())["properties"]["stats"]["properties"]
    defaults = StatsOptions()
    assert defaults.primary == schema["primary"]["default"] == {"detection": ["auc"], "localization": ["cpm"]}
    assert (defaults.n_boot, defaults.seed) == (schema["n_boot"]["default"], schema["seed"]["default"])
    for task in ("detection", "localization"):  # the schema lists every metric a primary endpoint may be
        from nodulesynth.stats.tables import TASK_METRICS
        assert tuple(schema["primary"]["properties"][task]["items"]["enum"]) == TASK_METRICS[task]
    with pytest.raises(KeyError, match=r"stats.primary.detection: unknown metric 'cpm'"):
        StatsOptions.from_config({"primary": {"detection": ["cpm"]}})
    with pytest.raises(KeyError, match=r"stats.primary: unknown task 'segmentation'"):
        StatsOptions.from_config({"primary": {"segmentation": ["auc"]}})
    with pytest.raises(KeyError, match=r"unknown option stats.alpha"):
        StatsOptions.from_config({"alpha": 0.05})


def test_the_detection_threshold_reaches_the_bootstrap_through_the_cli(tmp_path):
    """metrics.json's accuracy and balanced accuracy are cut at detection.threshold = 0.3: the stats command,
    given the detection section, recomputes the same values from predictions.tsv; cut at 0.5 they differ."""
    paths = [str(p) for p in study_files(tmp_path, threshold=0.3)]
    params = json.dumps({"n_boot": 10, "seed": 0})
    assert main(["stats", "--metrics", *paths, "--params", params, "--detection", '{"threshold": 0.3, "epochs": 50}',
                 "--out-dir", str(tmp_path / "at03")]) == 0
    tests = pd.read_csv(tmp_path / "at03" / "detection_tests.tsv", sep="\t")
    cut = tests[tests["metric"].isin(["accuracy", "balanced_accuracy"])]
    assert cut["boot_diff"].to_numpy() == pytest.approx(cut["mean_diff"].to_numpy(), abs=1e-9)
    assert main(["stats", "--metrics", *paths, "--params", params, "--out-dir", str(tmp_path / "at05")]) == 0
    tests = pd.read_csv(tmp_path / "at05" / "detection_tests.tsv", sep="\t")
    cut = tests[tests["metric"].isin(["accuracy", "balanced_accuracy"])]
    assert (np.abs(cut["boot_diff"] - cut["mean_diff"]) > 1e-6).any()
    assert cut["note"].fillna("").str.contains("predictions.tsv gives").any()


def test_controls_table(tmp_path):
    paths = study_files(tmp_path, arms=("A", "B", "C", "P", "N"))
    written = run_stats(paths, tmp_path / "stats", StatsOptions(n_boot=100))
    assert tmp_path / "stats" / "controls.tsv" in written
    controls = pd.read_csv(tmp_path / "stats" / "controls.tsv", sep="\t")
    assert list(controls.columns[:3]) == ["task", "metric", "control"]
    assert {"difference", "ci_low", "ci_high", "detected", "ci_method", "expected"} <= set(controls.columns)
    # the primary endpoints (auc, cpm) and detection average precision, localization AP50; both controls each
    assert sorted(zip(controls["task"], controls["metric"], controls["control"])) == sorted(
        (task, metric, control) for task, metric in (("detection", "auc"), ("detection", "average_precision"),
                                                     ("localization", "cpm"), ("localization", "ap50"))
        for control in ("positive", "negative"))
    rows = controls.set_index(["task", "metric", "control"])
    # positive: A - P; P's scores carry no nodule signal, its localization metrics are 10 points lower
    assert rows.loc[("detection", "auc", "positive"), "ci_method"].startswith("patient bootstrap")
    assert rows.loc[("localization", "cpm", "positive"), "ci_method"].startswith("t interval")
    assert rows.loc[(slice(None), slice(None), "positive"), "detected"].all()
    assert (rows.loc[(slice(None), slice(None), "positive"), "expected"] == "> 0").all()
    # negative: N - A; N is A's equal, so nothing is detected (the intervals hold zero)
    negative = rows.loc[(slice(None), slice(None), "negative")]
    assert (negative["expected"] == "< 0").all() and not negative["detected"].any()
    assert ((negative["ci_low"] <= 0) & (negative["ci_high"] >= 0)).all()
    # the localization interval by hand: t over the 5 fold differences A - P of CPM, in percentage points
    metrics = load_metrics(paths)
    cpm = metrics[(metrics["task"] == "localization") & (metrics["metric"] == "cpm")].set_index(["arm", "fold"])
    d = (cpm.loc["A", "value"] - cpm.loc["P", "value"]).to_numpy() * 100
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    row = rows.loc[("localization", "cpm", "positive")]
    assert (row["difference"], row["ci_low"], row["ci_high"]) == pytest.approx((d.mean(), d.mean() - half,
                                                                                 d.mean() + half))
    # the detection difference is metrics.json's, its interval the patient bootstrap's, here around it
    auc_row = rows.loc[("detection", "auc", "positive")]
    auc_values = metrics[(metrics["task"] == "detection") & (metrics["metric"] == "auc")].set_index(["arm", "fold"])
    a_minus_p = 100 * (auc_values.loc["A", "value"] - auc_values.loc["P", "value"]).mean()
    assert auc_row["difference"] == pytest.approx(a_minus_p)
    assert 0 < auc_row["ci_low"] < auc_row["difference"] < auc_row["ci_high"]
    # the study's tables keep rows A, B, C; the controls appear in controls.tsv only
    summary = pd.read_csv(tmp_path / "stats" / "detection_summary.tsv", sep="\t")
    assert set(summary["arm"]) == {"A", "B", "C"}
    tests = pd.read_csv(tmp_path / "stats" / "detection_tests.tsv", sep="\t")
    assert not (set(tests["arm"]) | set(tests["baseline"])) & {"P", "N"}
    # a control whose interval crosses zero the wrong way is not detected
    flipped = metrics.copy()
    flipped.loc[(flipped["arm"] == "P"), "value"] = flipped.loc[(flipped["arm"] == "A"), "value"].to_numpy()
    table = controls_table(flipped, {"localization": ["cpm"]}).set_index(["task", "metric", "control"])
    assert not table.loc[("localization", "cpm", "positive"), "detected"]
    # other primary endpoints come first, the study's stay in the table
    other = controls_table(metrics, {"detection": ["balanced_accuracy"], "localization": ["ar50"]})
    assert list(dict.fromkeys(other["metric"])) == ["balanced_accuracy", "auc", "average_precision", "ar50", "cpm",
                                                    "ap50"]


# --- Nadeau-Bengio and Holm by hand ------------------------------------------------------------------------------

def test_corrected_ttest_against_hand_value():
    # d = 1 2 3 4 5 (pp): mean 3, var 2.5, k = 5. n_test/n_train = 20/80 = 0.25.
    # t = 3 / sqrt((1/5 + 0.25) * 2.5) = 3 / sqrt(1.125) = 2.8284 on 4 df; the plain t: 3 / sqrt(2.5 / 5) = 4.2426
    t = 3 / math.sqrt(1.125)
    assert corrected_ttest([1, 2, 3, 4, 5], 0.25) == pytest.approx(2 * stats.t.sf(t, 4))
    assert corrected_ttest([1, 2, 3, 4, 5], 0.0) == pytest.approx(stats.ttest_1samp([1, 2, 3, 4, 5], 0).pvalue)
    assert math.isnan(corrected_ttest([2, 2, 2], 0.25))
    metrics = with_differences([1, 2, 3, 4, 5])  # no counts: k-fold's ratio 1/(k-1) = 1/4, the same p here
    row = row_of(paired_tests(metrics, "detection", "accuracy"), "B")
    assert row["nb_ratio"] == pytest.approx(0.25) and row["nb_ratio_from"] == "1/(k-1)"
    assert row["nb_ttest_p"] == pytest.approx(2 * stats.t.sf(t, 4))
    assert row["nb_ttest_p"] > row["ttest_p"]  # the overlap widens the variance
    # counts in metrics.json: the baseline's n_test / n_train_real per fold, averaged: 30/60 = 0.5 in every fold
    counts = pd.concat([metrics, metrics_frame({"A": [30] * 5}, "n_test"),
                        metrics_frame({"A": [60] * 5}, "n_train_real"), metrics_frame({"A": [90] * 5}, "n_train")])
    row = row_of(paired_tests(counts, "detection", "accuracy", arms=("B",)), "B")
    assert row["nb_ratio"] == pytest.approx(0.5) and row["nb_ratio_from"] == "n_test/n_train_real"
    assert row["nb_ttest_p"] == pytest.approx(2 * stats.t.sf(3 / math.sqrt((0.2 + 0.5) * 2.5), 4))


def test_holm_against_hand_values():
    # p = .01 .04 .03 .005, m = 4. Sorted .005 .01 .03 .04 times 4 3 2 1: .02 .03 .06 .04 -> running max
    # .02 .03 .06 .06; back in input order: .03 .06 .06 .02
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.4]) == pytest.approx([0.8, 0.8])  # capped below by the running max, 2 * .4 = .8
    assert holm([0.9, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    # a test that could not be made stays NaN and is not counted: m = 2
    out = holm([0.01, float("nan"), 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)


def test_the_bootstraps_metrics_are_detection_metrics():
    """The bootstrap's fast metrics equal nodulesynth.downstream.metrics.detection_metrics (metrics.json's), ties
    and one-class resamples included."""
    rng = np.random.default_rng(3)
    for threshold in (0.3, 0.5):
        for _ in range(20):
            n = int(rng.integers(2, 60))
            labels = (rng.uniform(size=n) < 0.3).astype(int)
            scores = np.round(rng.uniform(size=n), 1)  # many ties
            fast = detection_evaluator(threshold)(labels, scores)
            reference = detection_metrics(labels, scores, threshold)
            for metric in BOOTSTRAP_METRICS:
                assert fast[metric] == pytest.approx(reference[metric], nan_ok=True), (metric, labels, scores)


# --- bootstrap over patients ----------------------------------------------------------------------------------

def detection_predictions(fold, labels, scores, arm="A", patients=None):
    n = len(labels)
    return pd.DataFrame({"task": "detection", "arm": arm, "fold": fold, "scan_id": [f"S{fold}"] * n,
                         "patient_id": patients if patients is not None else "P", "slice_index": np.arange(n),
                         "source": "real", "label": labels, "score": scores})


def test_bootstrap_pairs_slices_by_key_not_row_order():
    labels = [0, 0, 0, 1, 1, 1]
    patients = ["p1", "p2", "p3", "p1", "p2", "p4"]
    a = pd.concat([detection_predictions(0, labels, [0.1, 0.7, 0.3, 0.6, 0.2, 0.9], patients=patients),
                   detection_predictions(1, labels, [0.2, 0.1, 0.6, 0.8, 0.7, 0.4], patients=patients)],
                  ignore_index=True)
    b = a.sample(frac=1.0, random_state=3).assign(arm="B")  # same predictions, shuffled rows
    assert bootstrap_difference(a, b, auc, n_boot=100) == (0.0, 0.0, 0.0)
    # B right on every slice, A wrong on every slice: accuracy 1 vs 0 in every resample
    right = a.assign(score=a["label"].astype(float))
    wrong = a.assign(score=1.0 - a["label"])
    assert bootstrap_difference(wrong, right, accuracy, n_boot=100) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="fold 1: the test slices of arms a and b differ"):
        bootstrap_difference(a, b[~((b["fold"] == 1) & (b["slice_index"] == 2))], auc, n_boot=10)
    moved = b.copy()
    moved.loc[(moved["fold"] == 0) & (moved["slice_index"] == 0), "patient_id"] = "p3"
    with pytest.raises(ValueError, match="fold 0: .*(differ|disagree on a slice's patient_id)"):
        bootstrap_difference(a, moved, auc, n_boot=10)


def test_bootstrap_observed_auc_difference_by_hand():
    # fold 0: labels 0 0 1 1. A scores .1 .6 .4 .9: of the 4 (neg, pos) pairs, (.6, .4) is misordered -> AUC 3/4.
    # B scores .1 .2 .8 .9 -> AUC 1. Fold 1: A and B equal -> difference 0. Fold mean: (0.25 + 0) / 2 = 0.125.
    patients = ["n1", "n2", "p1", "p2"]
    a = pd.concat([detection_predictions(0, [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], patients=patients),
                   detection_predictions(1, [0, 0, 1, 1], [0.3, 0.2, 0.6, 0.5], patients=patients)],
                  ignore_index=True)
    b = a.copy()
    b.loc[b["fold"] == 0, "score"] = [0.1, 0.2, 0.8, 0.9]
    diff, low, high = bootstrap_difference(a, b, auc, n_boot=100, seed=5)
    assert diff == pytest.approx(0.125)
    assert 0.0 <= low <= diff <= high <= 0.5  # B never worse than A on any resample; at most 1 - 0 in one fold
    assert bootstrap_difference(a, b, auc, n_boot=100, seed=5) == (diff, low, high)  # seeded


def test_patient_bootstrap_draws_whole_patients_within_their_stratum():
    """One fold: a nodule patient with 2 slices (one positive) and two nodule-free patients with 1 and 3 slices.
    Arm A scores 0, arm B 1, and the metric sums the scores: each resample's difference is its number of slices.
    Patients are drawn within their stratum, so the nodule patient is drawn exactly once (2 slices) and the two
    others twice between them, whole, a patient drawn twice counting twice: 2 + 1 + 1, 2 + 1 + 3 or 2 + 3 + 3,
    i.e. 4, 6 or 8 slices (observed 6). Resampling slices instead would give 4 or 6 slices every time."""
    labels, patients = [1, 0, 0, 0, 0, 0], ["pos", "pos", "one", "three", "three", "three"]
    a = detection_predictions(0, labels, [0.0] * 6, patients=patients)
    b = a.assign(score=1.0)
    total = lambda labels, scores: float(np.sum(scores))  # noqa: E731
    assert bootstrap_difference(a, b, total, n_boot=300) == (6.0, 4.0, 8.0)
    diff, low, high = bootstrap_difference(a, b, total, n_boot=300, unit="slice")
    assert (diff, low, high) == (6.0, 6.0, 6.0)  # slices: always one positive and five negative


def test_patient_bootstrap_is_wider_than_a_slice_bootstrap_when_patients_matter():
    """A simulated cohort with strong patient effects: arm B shifts every slice of a patient by that patient's own
    amount, so B - A varies by patient, not by slice. Resampling slices treats the 20 slices of a patient as 20
    independent pieces of evidence and understates the spread; resampling patients does not."""
    rng = np.random.default_rng(7)
    frames = []
    for fold in range(2):
        for p in range(16):
            n = 20
            labels = np.zeros(n, int)
            if p < 8:
                labels[:4] = 1  # eight nodule patients with four nodule slices each
            a_scores = labels * 1.0 + rng.normal(0, 1, n)
            shift = rng.normal(0, 1.5)  # the patient's effect in arm B
            frame = detection_predictions(fold, labels, a_scores, patients=f"f{fold}p{p}").assign(
                scan_id=f"f{fold}p{p}", b_score=a_scores + shift * (labels == 1))
            frames.append(frame)
    a = pd.concat(frames, ignore_index=True)
    b = a.assign(score=a["b_score"])
    diff_p, low_p, high_p = bootstrap_difference(a, b, auc, n_boot=300, seed=1)
    diff_s, low_s, high_s = bootstrap_difference(a, b, auc, n_boot=300, seed=1, unit="slice")
    assert diff_p == diff_s  # the same observed difference
    assert high_p - low_p > 1.5 * (high_s - low_s)
    # pairing: identical arms give a zero difference in every patient resample
    assert bootstrap_difference(a, a.assign(arm="B"), auc, n_boot=50) == (0.0, 0.0, 0.0)


def test_load_predictions_checks_columns(tmp_path):
    path = tmp_path / "detection" / "A" / "fold0" / "predictions.tsv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"scan_id": ["S"], "slice_index": [0], "score": [0.5]}).to_csv(path, sep="\t", index=False)
    with pytest.raises(ValueError, match=r"predictions.tsv: missing column\(s\) \['patient_id', 'source', 'label'\]"):
        load_predictions([path])
