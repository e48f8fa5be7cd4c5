"""The study's tables: mean ± sd per arm and the paired tests against arm A, as TSV, Markdown and LaTeX (booktabs).

Numbers are printed as the study prints them, `85.76 ± 1.69`: proportions (accuracy, AUC, AP50, AR70, FROC
sensitivities, CPM, ...) as percent, differences of proportions in percentage points (pp); counts (slices,
tp/fp/...) in their own unit. The sd is the sample sd over folds (ddof = 1). The TSV files keep the full-precision
long tables; Markdown and LaTeX hold the formatted paper tables.
"""

from pathlib import Path

import numpy as np
import pandas as pd

from nodulesynth.io import atomic_path, write_tsv
from nodulesynth.stats.inputs import TASKS, is_proportion, load_metrics, load_predictions, metric_values
from nodulesynth.stats.paired import DETECTION_METRIC_FNS, bootstrap_tests, five_fold_caveat, paired_tests

TASK_METRICS = {
    "detection": ("accuracy", "precision", "recall", "specificity", "f1", "auc"),
    "localization": ("ap50", "ap60", "ar50", "ar60", "ar70", "cpm"),
}
METRIC_NAMES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "specificity": "Specificity",
                "f1": "F1", "auc": "AUC", "ap50": "AP50", "ap60": "AP60", "ar50": "AR50", "ar60": "AR60",
                "ar70": "AR70", "cpm": "CPM"}
ARM_NAMES = {"A": "A: real", "B": "B: real + SPADE", "C": "C: real + SDM"}
PLUS_MINUS = "\u00b1"


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
    """Long table: task, arm, metric, n (folds with a finite value), mean, sd (ddof 1), unit, text ('85.76 ± 1.69').

    Proportions are multiplied by `scale` (percent by default); other metrics are left in their unit.
    """
    rows = []
    for metric in metrics_list:
        values = metric_values(metrics, task, metric, scale)
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
    """Wide table for the paper: one row per metric and arm, differences with their intervals and both p-values."""
    out = pd.DataFrame({
        "Metric": [metric_label(m, u) for m, u in zip(tests["metric"], tests["unit"])],
        "Comparison": [f"{a} vs {b}" for a, b in zip(tests["arm"], tests["baseline"])],
        "n": tests["n"].astype(int).astype(str),
        "Difference": [_signed(v) for v in tests["mean_diff"]],
        "95% CI (t)": [_interval(lo, hi) for lo, hi in zip(tests["ci_low"], tests["ci_high"])],
    })
    if "boot_diff" in tests.columns and tests["boot_diff"].notna().any():
        out["95% CI (bootstrap)"] = [_interval(lo, hi) for lo, hi in zip(tests["boot_low"], tests["boot_high"])]
    out["Wilcoxon p"] = [format_p(p) for p in tests["wilcoxon_p"]]
    out["t-test p"] = [format_p(p) for p in tests["ttest_p"]]
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
    tests_caption = (f"{task.capitalize()}: paired differences against arm A, fold by fold (arm minus A; "
                     f"proportions in percentage points, pp). {caveat}")
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


def tests_table(metrics: pd.DataFrame, task: str, metrics_list, baseline: str = "A", arms=("B", "C")) -> pd.DataFrame:
    """paired_tests of every metric in metrics_list, one table."""
    return pd.concat([paired_tests(metrics, task, m, baseline, arms) for m in metrics_list], ignore_index=True)


def _with_bootstrap(tests: pd.DataFrame, metrics_paths, task: str, n_boot: int, seed: int) -> pd.DataFrame:
    """Add the slice bootstrap (detection AUC and accuracy) from the predictions.tsv beside each metrics.json."""
    paths = [Path(p).with_name("predictions.tsv") for p in metrics_paths if Path(p).parts[-4] == task]
    for path in paths:
        if not path.exists():
            raise FileNotFoundError(f"{path}: predictions.tsv missing beside its metrics.json "
                                    "(needed for the bootstrap)")
    boot = bootstrap_tests(load_predictions(paths), DETECTION_METRIC_FNS, arms=tuple(tests["arm"].unique()),
                           n_boot=n_boot, seed=seed)
    merged = tests.merge(boot, on=["metric", "arm"], how="left")
    # the bootstrap's observed difference is recomputed from predictions.tsv; it should equal the metrics.json one
    off = (merged["boot_diff"] - merged["mean_diff"]).abs() > 1e-6
    merged.loc[off, "note"] = [f"{note}; " if note else "" for note in merged.loc[off, "note"]]
    merged.loc[off, "note"] += [f"predictions.tsv gives a difference of {v:.4g}, metrics.json {m:.4g}"
                                for v, m in zip(merged.loc[off, "boot_diff"], merged.loc[off, "mean_diff"])]
    return merged


def run_stats(metrics_paths, out_dir, n_boot: int = 2000, seed: int = 0) -> list[Path]:
    """Summary and test tables of every task present in metrics_paths, written to out_dir; the paths written.

    n_boot > 0 adds the slice bootstrap of detection AUC and accuracy (0 skips it).
    """
    metrics_paths = [Path(p) for p in metrics_paths]
    metrics = load_metrics(metrics_paths)
    written = []
    for task in [t for t in TASKS if (metrics["task"] == t).any()]:
        summary = summary_table(metrics, task, TASK_METRICS[task])
        tests = tests_table(metrics, task, TASK_METRICS[task])
        if n_boot > 0 and task == "detection":
            tests = _with_bootstrap(tests, metrics_paths, task, n_boot, seed)
        written += write_tables(summary, tests, out_dir, task)
    return written
