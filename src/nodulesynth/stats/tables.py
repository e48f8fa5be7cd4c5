"""The study's tables: mean ± sd per arm and the paired tests (B and C against A, C against B), as TSV, Markdown and
LaTeX (booktabs); and the controls table (controls.tsv) where the control arms P and N were run.

Numbers are printed as the study prints them, `85.76 ± 1.69`: proportions (accuracy, AUC, AP50, AR70, FROC
sensitivities, CPM, ...) as percent, differences of proportions in percentage points (pp); counts (slices,
tp/fp/...) in their own unit. The sd is the sample sd over folds (ddof = 1). The TSV files keep the full-precision
long tables; Markdown and LaTeX hold the formatted paper tables.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path, write_tsv
from nodulesynth.options import SectionOptions
from nodulesynth.stats.inputs import ARMS, TASKS, is_proportion, load_metrics, load_predictions, metric_values
from nodulesynth.stats.paired import (bootstrap_comparisons, detection_evaluator, five_fold_caveat, holm,
                                      paired_tests, paired_values, t_interval)

# Every metric here is higher-is-better (the controls' expected directions rely on it).
TASK_METRICS = {
    "detection": ("accuracy", "precision", "recall", "specificity", "f1", "auc", "average_precision",
                  "balanced_accuracy"),
    "localization": ("ap50", "ap60", "ar50", "ar60", "ar70", "cpm"),
}
METRIC_NAMES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "specificity": "Specificity",
                "f1": "F1", "auc": "AUC", "average_precision": "Average precision",
                "balanced_accuracy": "Balanced accuracy", "ap50": "AP50", "ap60": "AP60", "ar50": "AR50",
                "ar60": "AR60", "ar70": "AR70", "cpm": "CPM"}
ARM_NAMES = {"A": "A: real", "B": "B: real + SPADE", "C": "C: real + SDM"}
PLUS_MINUS = "\u00b1"
# The study's comparisons as (baseline, arm), difference arm - baseline: each synthetic arm against real only, and
# SDM against SPADE (the study's claim).
COMPARISONS = (("A", "B"), ("A", "C"), ("B", "C"))
# The controls as (baseline, arm) and the sign their difference (arm - baseline) must have: A - P > 0 (more real
# nodule patients help), N - A < 0 (slices relabelled "nodule" without a nodule harm).
CONTROL_COMPARISONS = {"positive": (("P", "A"), 1), "negative": (("A", "N"), -1)}
# Beside the configured primary endpoints, every controls table holds the study's (AUC, CPM) and a threshold-free
# partner of each, so that a run naming other endpoints (the demo: AP50, CPM being at its ceiling there) still
# shows how the controls read on the study's.
CONTROL_EXTRA_METRICS = {"detection": ("auc", "average_precision"), "localization": ("cpm", "ap50")}
# The p-value Holm adjusts: the Nadeau-Bengio corrected t. With 5 folds the Wilcoxon test cannot fall below
# 0.0625, so an adjusted Wilcoxon p could never support a claim; the plain paired t ignores that the folds'
# training sets overlap and is too liberal; the corrected t accounts for that overlap.
ADJUSTED_P = "nb_ttest_p"


@dataclass
class StatsOptions(SectionOptions):
    """The `stats` config section (defaults: the study's)."""

    SECTION = "stats"

    n_boot: int = 2000  # patient-bootstrap resamples (0 skips the bootstrap)
    seed: int = 0
    # primary endpoints per task: their comparisons (B-A, C-A, C-B) are Holm-adjusted together, every other row
    # is exploratory
    primary: dict = field(default_factory=lambda: {"detection": ["auc"], "localization": ["cpm"]})

    def __post_init__(self):
        if self.n_boot < 0:
            raise InputError(f"stats.n_boot must be >= 0, got {self.n_boot}")
        if not isinstance(self.primary, dict):
            raise InputError(f"stats.primary must map a task to a list of metrics, got {self.primary!r}")
        for task, metrics in self.primary.items():
            if task not in TASK_METRICS:
                raise InputError(f"stats.primary: unknown task {task!r} (known: {', '.join(TASK_METRICS)})")
            if isinstance(metrics, str) or not isinstance(metrics, (list, tuple)):
                raise InputError(f"stats.primary.{task} must be a list of metrics, got {metrics!r}")
            for metric in metrics:
                if metric not in TASK_METRICS[task]:
                    raise InputError(f"stats.primary.{task}: unknown metric {metric!r} "
                                     f"(known: {', '.join(TASK_METRICS[task])})")


def format_mean_sd(mean: float, sd: float, decimals: int = 2) -> str:
    """'85.76 ± 1.69'; the mean alone when sd is undefined (one fold), 'n/a' when there is no value."""
    if not np.isfinite(mean):
        return "n/a"
    if not np.isfinite(sd):
        return f"{mean:.{decimals}f}"
    return f"{mean:.{decimals}f} {PLUS_MINUS} {sd:.{decimals}f}"


def format_p(p: float) -> str:
    """Four decimals (so the five-fold floor 0.0625 shows whole), '<0.0001' below that, 'n/a' when undefined."""
    if not np.isfinite(p):
        return "n/a"
    return "<0.0001" if p < 0.0001 else f"{p:.4f}"


def metric_label(metric: str, unit: str) -> str:
    name = METRIC_NAMES.get(metric, metric)
    return f"{name} ({unit})" if unit else name


def summary_table(metrics: pd.DataFrame, task: str, metrics_list, scale: float = 100,
                  decimals: int = 2) -> pd.DataFrame:
    """Long table of arms A, B, C: task, arm, metric, n (folds with a finite value), mean, sd (ddof 1), unit, text
    ('85.76 ± 1.69').

    Proportions are multiplied by `scale` (percent by default); other metrics are left in their unit.
    """
    rows = []
    for metric in metrics_list:
        values = metric_values(metrics, task, metric, scale)
        values = values[values["arm"].isin(ARMS)]  # the control arms have their own table (controls_table)
        for arm, group in values.groupby("arm", sort=True):
            finite = group["value"][np.isfinite(group["value"])]
            mean = float(finite.mean()) if len(finite) else float("nan")
            sd = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
            rows.append({"task": task, "arm": arm, "metric": metric, "n": int(len(finite)), "mean": mean, "sd": sd,
                         "unit": "%" if is_proportion(metric) and scale == 100 else "",
                         "text": format_mean_sd(mean, sd, decimals)})
    return pd.DataFrame(rows, columns=["task", "arm", "metric", "n", "mean", "sd", "unit", "text"])


def summary_paper_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Wide table for the paper: one row per arm, one column per metric (in the summary's order)."""
    metrics = list(dict.fromkeys(summary["metric"]))
    units = summary.drop_duplicates("metric").set_index("metric")["unit"]
    wide = summary.pivot(index="arm", columns="metric", values="text")[metrics]
    wide.columns = [metric_label(m, units[m]) for m in metrics]
    wide.insert(0, "Arm", [ARM_NAMES.get(a, a) for a in wide.index])
    return wide.reset_index(drop=True)


def _signed(value: float, decimals: int = 2) -> str:
    return f"{value:+.{decimals}f}" if np.isfinite(value) else "n/a"


def _interval(low: float, high: float, decimals: int = 2) -> str:
    return f"[{low:.{decimals}f}, {high:.{decimals}f}]" if np.isfinite(low) and np.isfinite(high) else "n/a"


def tests_paper_table(tests: pd.DataFrame) -> pd.DataFrame:
    """Wide table for the paper: one row per metric and comparison, primary or exploratory, differences with their
    intervals, the three p-values and, for primary rows, the Holm-adjusted one."""
    out = pd.DataFrame({
        "Metric": [metric_label(m, u) for m, u in zip(tests["metric"], tests["unit"])],
        "Comparison": [f"{a} vs {b}" for a, b in zip(tests["arm"], tests["baseline"])],
        "Endpoint": tests["endpoint"].tolist(),
        "n": tests["n"].astype(int).astype(str),
        "Difference": [_signed(v) for v in tests["mean_diff"]],
        "95% CI (t)": [_interval(lo, hi) for lo, hi in zip(tests["ci_low"], tests["ci_high"])],
    })
    if "boot_diff" in tests.columns and tests["boot_diff"].notna().any():
        out["95% CI (bootstrap)"] = [_interval(lo, hi) for lo, hi in zip(tests["boot_low"], tests["boot_high"])]
    out["Wilcoxon p"] = [format_p(p) for p in tests["wilcoxon_p"]]
    out["t-test p"] = [format_p(p) for p in tests["ttest_p"]]
    out["NB t p"] = [format_p(p) for p in tests["nb_ttest_p"]]
    out["Holm p"] = [format_p(p) if e == "primary" else "" for p, e in zip(tests["p_holm"], tests["endpoint"])]
    return out


def to_markdown(table: pd.DataFrame) -> str:
    """Pipe table. Written here (a few lines) rather than with DataFrame.to_markdown, which needs `tabulate`,
    a package the report step group does not otherwise install."""
    def cells(values):
        return "| " + " | ".join(str(v).replace("|", "\\|") for v in values) + " |"
    lines = [cells(table.columns), "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += [cells(row) for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   PLUS_MINUS: r"$\pm$"}


def latex_escape(text) -> str:
    """Escape LaTeX's special characters, and ± as $\\pm$ (so the file works without inputenc tricks)."""
    return "".join(_LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule) in a `table` float, every cell escaped.

    Built by hand rather than with DataFrame.to_latex: its escaping leaves ± alone (a bare Unicode character
    in the .tex) and it never escapes the caption; escaping every cell and the caption in one place is simpler.
    """
    align = "l" * min(2, table.shape[1]) + "r" * max(0, table.shape[1] - 2)
    lines = [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
             rf"\label{{{label}}}", rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _write_text(text: str, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_tables(summary: pd.DataFrame, tests: pd.DataFrame, out_dir, task: str) -> list[Path]:
    """{task}_summary.{tsv,md,tex} and {task}_tests.{tsv,md,tex} in out_dir; the paths written, in that order."""
    out_dir = Path(out_dir)
    n_folds = int(tests["n"].min()) if len(tests) else int(summary["n"].max())
    caveat = five_fold_caveat(n_folds)
    folds_text = f"{int(summary['n'].min())}" if summary["n"].nunique() == 1 else \
        f"{int(summary['n'].min())} to {int(summary['n'].max())}"
    summary_caption = (f"{task.capitalize()}: mean {PLUS_MINUS} sample standard deviation over {folds_text} folds "
                       "(proportions in %).")
    tests_caption = (f"{task.capitalize()}: paired differences fold by fold, B and C against A and C against B "
                     f"(arm minus baseline; proportions in percentage points, pp). p-values: Wilcoxon signed-rank, "
                     f"paired t, and the Nadeau-Bengio corrected t (NB t), whose variance allows for the folds' "
                     f"overlapping training sets. Holm p: the NB t p-values of the primary endpoints, Holm-adjusted "
                     f"together across tasks; every other row is exploratory. {caveat}")
    paper_summary, paper_tests = summary_paper_table(summary), tests_paper_table(tests)
    paths = []
    stem = out_dir / f"{task}_summary"
    write_tsv(summary, stem.with_suffix(".tsv"))
    paths.append(stem.with_suffix(".tsv"))
    paths.append(_write_text(f"{summary_caption}\n\n{to_markdown(paper_summary)}", stem.with_suffix(".md")))
    paths.append(_write_text(to_latex(paper_summary, summary_caption, f"tab:{task}_summary"),
                             stem.with_suffix(".tex")))
    stem = out_dir / f"{task}_tests"
    write_tsv(tests, stem.with_suffix(".tsv"))
    paths.append(stem.with_suffix(".tsv"))
    paths.append(_write_text(f"{tests_caption}\n\n{to_markdown(paper_tests)}", stem.with_suffix(".md")))
    paths.append(_write_text(to_latex(paper_tests, tests_caption, f"tab:{task}_tests"), stem.with_suffix(".tex")))
    return paths


def tests_table(metrics: pd.DataFrame, task: str, metrics_list, primary=(), comparisons=COMPARISONS) -> pd.DataFrame:
    """paired_tests of every metric in metrics_list and comparison (baseline, arm), one table; `endpoint` says
    primary (a metric in `primary`) or exploratory, `p_holm` is left for adjust_primary."""
    rows = [paired_tests(metrics, task, m, baseline, (arm,)) for m in metrics_list for baseline, arm in comparisons]
    tests = pd.concat(rows, ignore_index=True)
    tests["endpoint"] = np.where(tests["metric"].isin(list(primary)), "primary", "exploratory")
    tests["p_holm"] = np.nan
    return tests


def adjust_primary(tests_by_task: dict) -> None:
    """Holm-adjust the ADJUSTED_P of every primary row of every task as one family, into `p_holm` (in place)."""
    family = [(task, index) for task, tests in tests_by_task.items()
              for index in tests.index[tests["endpoint"] == "primary"]]
    adjusted = holm([tests_by_task[task].at[index, ADJUSTED_P] for task, index in family])
    for (task, index), p in zip(family, adjusted):
        tests_by_task[task].at[index, "p_holm"] = p


def _with_bootstrap(tests: pd.DataFrame, boot: pd.DataFrame) -> pd.DataFrame:
    """Add the patient bootstrap's columns to the rows it covers, noting where its observed difference (from
    predictions.tsv) is not the metrics.json one."""
    merged = tests.merge(boot, on=["metric", "baseline", "arm"], how="left")
    off = (merged["boot_diff"] - merged["mean_diff"]).abs() > 1e-6
    merged.loc[off, "note"] = [f"{note}; " if note else "" for note in merged.loc[off, "note"]]
    merged.loc[off, "note"] += [f"predictions.tsv gives a difference of {v:.4g}, metrics.json {m:.4g}"
                                for v, m in zip(merged.loc[off, "boot_diff"], merged.loc[off, "mean_diff"])]
    return merged


def _predictions_beside(metrics_paths, task: str, arms) -> list[Path]:
    paths = [Path(p).with_name("predictions.tsv") for p in metrics_paths
             if Path(p).parts[-4] == task and Path(p).parts[-3] in arms]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: predictions.tsv missing beside its metrics.json "
                                    "(needed for the bootstrap)")
    return paths


def controls_table(metrics: pd.DataFrame, primary: dict, boot: pd.DataFrame | None = None,
                   level: float = 0.95) -> pd.DataFrame:
    """One row per task, metric and control present (P: positive, N: negative) with columns task, metric, control,
    baseline, arm, n, difference (arm - baseline of the fold means: A - P, N - A), ci_low, ci_high, ci_method,
    expected, detected, unit.

    Metrics: each task's primary endpoints, then CONTROL_EXTRA_METRICS. The interval is the patient bootstrap's
    where `boot` (bootstrap_comparisons) has the row (detection metrics computed from predictions), else the t
    interval over folds. detected: the interval excludes zero in the expected direction.
    """
    arms = set(metrics["arm"])
    rows = []
    for task in [t for t in TASKS if (metrics["task"] == t).any()]:
        chosen = list(dict.fromkeys([*primary.get(task, ()), *CONTROL_EXTRA_METRICS[task]]))
        for metric in chosen:
            for control, ((baseline, arm), sign) in CONTROL_COMPARISONS.items():
                if not {baseline, arm} <= arms:
                    continue
                pairs = paired_values(metrics, task, metric, arm, baseline)
                difference, low, high = t_interval(pairs["arm"] - pairs["baseline"], level)
                method = f"t interval over {len(pairs)} folds"
                hit = pd.DataFrame() if boot is None or task != "detection" else boot[
                    (boot["metric"] == metric) & (boot["baseline"] == baseline) & (boot["arm"] == arm)]
                if len(hit):
                    low, high = float(hit["boot_low"].iat[0]), float(hit["boot_high"].iat[0])
                    method = f"patient bootstrap ({int(hit['n_boot'].iat[0])} resamples)"
                detected = bool(low > 0) if sign > 0 else bool(high < 0)  # NaN bounds: not detected
                rows.append({"task": task, "metric": metric, "control": control, "baseline": baseline, "arm": arm,
                             "n": len(pairs), "difference": difference, "ci_low": low, "ci_high": high,
                             "ci_method": method, "expected": "> 0" if sign > 0 else "< 0", "detected": detected,
                             "unit": "pp" if is_proportion(metric) else ""})
    return pd.DataFrame(rows, columns=["task", "metric", "control", "baseline", "arm", "n", "difference", "ci_low",
                                       "ci_high", "ci_method", "expected", "detected", "unit"])


def run_stats(metrics_paths, out_dir, options: StatsOptions | None = None, threshold: float = 0.5) -> list[Path]:
    """Summary and test tables of every task present in metrics_paths, and controls.tsv where the control arms
    are among them, written to out_dir; the paths written.

    options.n_boot > 0 adds the patient bootstrap of the detection metrics that predictions.tsv allows
    (paired.BOOTSTRAP_METRICS, thresholded metrics at `threshold`, the config's detection.threshold).
    """
    options = options or StatsOptions()
    metrics_paths = [Path(p) for p in metrics_paths]
    metrics = load_metrics(metrics_paths)
    tasks = [t for t in TASKS if (metrics["task"] == t).any()]
    controls = [pair for pair, _ in CONTROL_COMPARISONS.values() if set(pair) <= set(metrics["arm"])]
    boot = None
    if options.n_boot > 0 and "detection" in tasks:
        comparisons = [*COMPARISONS, *controls]
        arms = {arm for pair in comparisons for arm in pair}
        predictions = load_predictions(_predictions_beside(metrics_paths, "detection", arms))
        boot = bootstrap_comparisons(predictions, detection_evaluator(threshold), comparisons,
                                     n_boot=options.n_boot, seed=options.seed)
    tests = {task: tests_table(metrics, task, TASK_METRICS[task], options.primary.get(task, ())) for task in tasks}
    if boot is not None:
        tests["detection"] = _with_bootstrap(tests["detection"], boot)
    adjust_primary(tests)
    written = []
    for task in tasks:
        written += write_tables(summary_table(metrics, task, TASK_METRICS[task]), tests[task], out_dir, task)
    if controls:
        path = Path(out_dir) / "controls.tsv"
        write_tsv(controls_table(metrics, options.primary, boot), path)
        written.append(path)
    return written
