"""The study's report: tables, figures and provenance from a results tree, rendered with Jinja2 into one
self-contained HTML file (figures as base64 PNG data URIs, CSS inline) and printed to PDF.

`build_report(results_dir, config, out_html)` is the entry point; the metrics.json files and the
statistics tables are required, every other input is optional and reported as "not available" when absent.
"""

import datetime
import math
import platform
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from nodulesynth.downstream.datasets import ARMS, TASKS, DownstreamOptions, study_arms
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path, read_table
from nodulesynth.report import figures, inputs

TEMPLATES = Path(__file__).parent / "templates"
# the study's two tables. Detection leads with the threshold-free metrics (AUC, average precision) and balanced
# accuracy, which a rare positive class does not flatter, then the study's own columns at detection.threshold.
HEADLINE = {
    "detection": (("auc", "AUC"), ("average_precision", "AP"), ("balanced_accuracy", "Balanced accuracy"),
                  ("accuracy", "Accuracy"), ("precision", "Precision"), ("recall", "Recall"),
                  ("specificity", "Specificity"), ("f1", "F1")),
    "localization": (("ap50", "AP50"), ("ap60", "AP60"), ("ar50", "AR50"), ("ar60", "AR60"), ("ar70", "AR70"),
                     ("cpm", "CPM")),
}
FROC_GRID = 0.125 * 2 ** (np.arange(49) / 8)  # FP per scan, log-spaced over LUNA16's range, its rates exactly
COMPARISONS = (("B", "A"), ("C", "A"), ("C", "B"))  # (arm, baseline), as the stats stage writes them
SIGNIFICANCE = 0.05  # a primary endpoint's Holm-adjusted p below this is bolded
COUNTS = (("n_train_real", "real training slices"), ("n_train_real_positive", "of them with a nodule"),
          ("n_train_synthetic", "added slices"), ("n_train_patients", "training patients"),
          ("n_test_positive", "test slices with a nodule"), ("n_test_negative", "test slices without"),
          ("n_test_patients", "test patients"))
CONTROL_MEANING = {
    "positive": "Arm A against arm P, which withholds {withheld:.0%} of A's real nodule patients "
                "(downstream.positive_control_withheld): less real data should cost, so A − P is expected above "
                "zero. Detected, it shows the study can see a loss of that size.",
    "negative": "Arm N (arm A plus real nodule-free slices relabelled “nodule”, with real nodules' boxes, as "
                "many as B and C add) against A: slices without nodule information should not help, so N − A is "
                "expected below zero. An interval wholly above zero would mean that added positive slices help "
                "whatever they show, and that B's and C's gains could be that alone.",
}


def control_meaning(config) -> dict:
    """CONTROL_MEANING with the run's share of nodule patients P withholds (the config's, else the default)."""
    withheld = DownstreamOptions.from_config((config or {}).get("downstream")).positive_control_withheld
    return {name: text.format(withheld=withheld) for name, text in CONTROL_MEANING.items()}


# ---------------------------------------------------------------- formatting

def fmt_p(value) -> str:
    value = float(value)
    if not math.isfinite(value):
        return "–"
    return "<0.001" if value < 0.001 else f"{value:.3g}"


def fmt_number(value, spec="{:.3g}") -> str:
    if isinstance(value, (int, np.integer)):
        return str(value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "–" if not math.isfinite(value) else spec.format(value)


def mean_sd(column: pd.Series, folds: int, spec="{:.3f}") -> str:
    """Mean ± sd over a column's folds; a fold without a value (a null distance) is left out and said so."""
    values = pd.to_numeric(column, errors="coerce").dropna()
    if len(values) < 2:
        text = fmt_number(values.mean() if len(values) else float("nan"), spec)
    else:
        text = f"{spec.format(values.mean())} ± {spec.format(values.std(ddof=1))}"
    return text if len(values) in (0, folds) else f"{text} ({len(values)} of {folds} folds)"


def frame_table(frame: pd.DataFrame, spec="{:.3f}") -> dict:
    """A DataFrame as template rows of cells (text, numeric) so numbers align right and words left."""
    def cell(value):
        if isinstance(value, str):
            return {"text": value, "numeric": bool(re.fullmatch(r"[-+]?[\d.]+( ± [\d.]+)?", value))}
        return {"text": fmt_number(value, spec), "numeric": True}

    rows = [[cell(value) for value in row] for row in frame.itertuples(index=False)]
    return {"columns": [str(c) for c in frame.columns], "rows": rows}


# ---------------------------------------------------------------- the study's tables

def _one_row(table, path, arm, metric, baseline=None):
    hit = table[(table["arm"] == arm) & (table["metric"] == metric)]
    if baseline is not None:
        hit = hit[hit["baseline"] == baseline]
    if len(hit) != 1:
        against = f" against {baseline}" if baseline is not None else ""
        raise InputError(f"{path}: expected one row for arm {arm}{against}, metric {metric}; found {len(hit)}")
    return hit.iloc[0]


def supported(test) -> bool:
    """A primary endpoint whose Holm-adjusted p is below SIGNIFICANCE, in the arm's favour (every headline metric
    is higher-is-better)."""
    p_holm = float(test["p_holm"])
    return (test["endpoint"] == "primary" and math.isfinite(p_holm) and p_holm < SIGNIFICANCE
            and float(test["mean_diff"]) > 0)


def study_table(task, summary, tests, summary_path="summary", tests_path="tests") -> dict:
    """Rows A, B, C of one task's headline metrics: "mean ± sd" text, bold where the primary test supports it
    (B or C beating A on a primary endpoint, Holm-adjusted p < SIGNIFICANCE), the Wilcoxon, t and corrected t
    p-values of B and C against A; plus the paired differences (B−A, C−A, C−B) with their CIs, primary endpoints
    marked with their Holm-adjusted p."""
    metrics = HEADLINE[task]
    rows, n_folds = [], set()
    for arm in ARMS:
        cells = []
        for metric, label in metrics:
            cell = {"text": str(_one_row(summary, summary_path, arm, metric)["text"]), "best": False}
            if arm != "A":
                test = _one_row(tests, tests_path, arm, metric, "A")
                cell.update(wilcoxon_p=fmt_p(test["wilcoxon_p"]), ttest_p=fmt_p(test["ttest_p"]),
                            nb_ttest_p=fmt_p(test["nb_ttest_p"]), best=supported(test),
                            p_holm=fmt_p(test["p_holm"]) if test["endpoint"] == "primary" else None)
            cells.append(cell)
        rows.append({"arm": arm, "name": figures.ARM_NAMES[arm], "cells": cells})
    differences = []
    for metric, label in metrics:
        per_comparison = []
        for arm, baseline in COMPARISONS:
            test = _one_row(tests, tests_path, arm, metric, baseline)
            n_folds.add(int(test["n"]))
            per_comparison.append({
                "n": int(test["n"]), "mean_diff": fmt_number(test["mean_diff"]),
                "ci": f"[{fmt_number(test['ci_low'])}, {fmt_number(test['ci_high'])}]",
                "wilcoxon_p": fmt_p(test["wilcoxon_p"]), "ttest_p": fmt_p(test["ttest_p"]),
                "nb_ttest_p": fmt_p(test["nb_ttest_p"]),
                "p_holm": fmt_p(test["p_holm"]) if test["endpoint"] == "primary" else "exploratory"})
        primary = {str(e) for e in tests.loc[tests["metric"] == metric, "endpoint"]} == {"primary"}
        differences.append({"metric": label, "primary": primary, "arms": per_comparison})
    # exact two-sided Wilcoxon signed-rank test: the smallest p with n pairs is 2 / 2**n
    floor = {n: 2.0 / 2 ** n for n in sorted(n_folds) if n > 0}
    return {"task": task, "columns": [label for _, label in metrics], "rows": rows, "differences": differences,
            "compared": [f"{arm} − {baseline}" for arm, baseline in COMPARISONS],
            "primary": [label for (metric, label), d in zip(metrics, differences) if d["primary"]],
            "wilcoxon_floor": {n: f"{p:.4g}" for n, p in floor.items()}}


def controls_rows(controls: pd.DataFrame, path="controls.tsv") -> list[dict]:
    """The controls table (stats' controls.tsv) as the report shows it: control, task, metric, difference [CI],
    detected yes/no, how the interval was made."""
    labels = {m: label for task in HEADLINE for m, label in HEADLINE[task]}
    rows = []
    for row in controls.itertuples(index=False):
        detected = str(row.detected).strip().lower()
        if detected not in ("true", "false"):
            raise InputError(f"{path}: detected must be True or False, got {row.detected!r}")
        unit = f" {row.unit}" if isinstance(row.unit, str) and row.unit else ""
        rows.append({"control": row.control, "task": row.task, "metric": labels.get(row.metric, row.metric),
                     "expected": row.expected,
                     "difference": f"{fmt_number(row.difference)}{unit} "
                                   f"[{fmt_number(row.ci_low)}, {fmt_number(row.ci_high)}]",
                     "detected": "yes" if detected == "true" else "no", "ci_method": row.ci_method})
    return rows


def counts_table(counts: pd.DataFrame) -> pd.DataFrame | None:
    """Mean per arm over the folds of the training and test counts (COUNTS) that metrics.json carries; None
    when it carries none of them."""
    present = [(key, label) for key, label in COUNTS if key in set(counts["metric"])]
    if not present:
        return None
    wide = counts.pivot_table(index="arm", columns="metric", values="value", aggfunc="mean")
    folds = counts.groupby("arm")["fold"].nunique()
    order = [arm for arm in study_arms(controls=True) if arm in wide.index]
    table = pd.DataFrame({"arm": [figures.ARM_NAMES.get(arm, arm) for arm in order],
                          "folds": [int(folds[arm]) for arm in order]})
    for key, label in present:
        table[label] = [fmt_number(wide.at[arm, key], "{:.1f}") for arm in order]
    return table


# ---------------------------------------------------------------- figures from the results tree

def fold_values(metrics: pd.DataFrame, task) -> dict:
    """{metric: {arm: per-fold values in percent}} of the task's headline metrics (fold order shared)."""
    out = {}
    for metric, _ in HEADLINE[task]:
        rows = metrics[metrics["metric"] == metric]
        if rows.empty:
            continue
        out[metric] = {arm: rows[rows["arm"] == arm].sort_values("fold")["value"].to_numpy() * 100 for arm in ARMS}
    return out


def _pred_rows(predictions, test, path):
    """Predictions as (test row, x0, y0, x1, y1, score), matched to the test set by scan and slice."""
    row_of = {(str(s), int(i)): r for r, (s, i) in enumerate(zip(test.scan_id, test.slice_index))}
    rows = []
    for p in predictions.itertuples(index=False):
        key = (str(p.scan_id), int(p.slice_index))
        if key not in row_of:
            raise InputError(f"{path}: prediction for scan {key[0]} slice {key[1]}, "
                             "which is not in the fold's test set")
        rows.append((row_of[key], float(p.x0), float(p.y0), float(p.x1), float(p.y1), float(p.score)))
    return rows


def froc_curves(results_dir, folds):
    """{arm: (grid, mean sensitivity, sd)} of LUNA16's per-nodule FROC (nodulesynth.downstream.metrics.froc_curve:
    3-D candidates, FP per test scan), each fold's curve interpolated on FROC_GRID as the metrics' froc_<rate>
    are, over the folds where the arm's predictions and the test set are both present (one test set per fold:
    it is the same in every arm)."""
    from nodulesynth.downstream.metrics import froc_curve, sensitivity_at

    per_arm = {arm: [] for arm in ARMS}
    for fold in folds:
        test = inputs.read_test_set(results_dir, fold)
        if test is None or not len(test.boxes):
            continue
        gt, excluded, scans = test.nodule_rows(), test.excluded_rows(), set(test.scan_id.tolist())
        for arm in ARMS:
            predictions = inputs.read_predictions(results_dir, "localization", arm, fold)
            if predictions is None:
                continue
            path = Path(results_dir) / "downstream" / "localization" / arm / f"fold{fold}" / "predictions.tsv"
            _pred_rows(predictions, test, path)  # every prediction on a slice of the fold's test set
            pred = [(str(p.scan_id), int(p.slice_index), float(p.x0), float(p.y0), float(p.x1), float(p.y1),
                     float(p.score)) for p in predictions.itertuples(index=False)]
            fps, sens = froc_curve(gt, pred, scans, excluded)
            per_arm[arm].append(sensitivity_at(fps, sens, FROC_GRID))
    curves = {}
    for arm, per_fold in per_arm.items():
        if per_fold:
            stacked = np.vstack(per_fold)
            curves[arm] = (FROC_GRID, stacked.mean(0), stacked.std(0, ddof=1) if len(stacked) > 1 else 0 * stacked[0])
    return curves


def froc_points(metrics: pd.DataFrame):
    """{arm: (rates, mean sensitivity over folds)} from the metrics' froc_<rate> keys."""
    points = {}
    for arm in ARMS:
        rows = metrics[(metrics["arm"] == arm) & metrics["metric"].str.startswith("froc_")]
        if rows.empty:
            continue
        means = rows.groupby("metric")["value"].mean()
        rates = np.array([float(m[len("froc_"):]) for m in means.index])
        order = np.argsort(rates)
        points[arm] = (rates[order], means.to_numpy()[order])
    return points


def _hit(box, pred):
    """The FROC hit rule of nodulesynth.downstream.metrics: prediction centre within the nodule's radius (half
    the larger box side) of its centre."""
    gx, gy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    px, py = (pred[0] + pred[2]) / 2, (pred[1] + pred[3]) / 2
    return math.hypot(px - gx, py - gy) < max(box[2] - box[0], box[3] - box[1]) / 2


def _outcome(gt, pred):
    hits = sum(any(_hit(b, p) for p in pred) for b in gt)
    fps = sum(not any(_hit(b, p) for b in gt) for p in pred)
    return hits, len(gt) - hits, fps


def localization_panels(results_dir, folds, threshold=0.5, n_examples=4):
    """Nodule slices of the first fold with a test set and every arm's predictions, chosen so that arm A both
    finds and misses nodules among them; the same slices in every arm. (panels per arm, fold) or None."""
    for fold in folds:
        test = inputs.read_test_set(results_dir, fold)
        predictions = {arm: inputs.read_predictions(results_dir, "localization", arm, fold) for arm in ARMS}
        if test is None or any(p is None for p in predictions.values()):
            continue
        kept = {}
        for arm, table in predictions.items():
            path = Path(results_dir) / "downstream" / "localization" / arm / f"fold{fold}" / "predictions.tsv"
            kept[arm] = {}
            for row, *box, score in _pred_rows(table, test, path):
                if score >= threshold:
                    kept[arm].setdefault(row, []).append((*box, score))
        positives = [r for r in range(len(test)) if len(test.boxes_of(r))]
        if not positives:
            continue
        found, missed = [], []
        for r in positives:
            hits, misses, _ = _outcome(test.boxes_of(r).tolist(), kept["A"].get(r, []))
            (missed if misses else found).append(r)
        half = n_examples // 2
        chosen = found[:half] + missed[: n_examples - half]
        chosen += [r for r in positives if r not in chosen][: n_examples - len(chosen)]
        panels = []
        for arm in ARMS:
            row_panels = []
            for r in chosen:
                gt, pred = test.boxes_of(r).tolist(), kept[arm].get(r, [])
                hits, misses, fps = _outcome(gt, pred)
                row_panels.append({"image": test.image[r], "gt": gt, "pred": pred,
                                   "title": f"{test.scan_id[r]} #{test.slice_index[r]}\n"
                                            f"{hits} found, {misses} missed, {fps} FP"})
            panels.append(row_panels)
        return panels, fold
    return None


# ---------------------------------------------------------------- the whole report

def _figure(make, *args):
    """A figure drawn by `make(*args)`, as a PNG data URI."""
    return figures.data_uri(make(*args))


def report_context(results_dir, config: dict) -> dict:
    """Everything the template shows, read from `results_dir`; raises on missing required inputs."""
    results_dir = Path(results_dir)
    scope = inputs.RunScope.of(config)  # the run's folds and arms: what else the tree holds is an earlier run's
    settings = dict((config or {}).get("report") or {})
    threshold = float(settings.get("score_threshold", 0.5))
    n_examples = int(settings.get("examples", 4))

    metrics, tables = {}, {}
    for task in TASKS:
        metrics[task] = inputs.read_metrics(results_dir, task, scope)
        summary, tests = inputs.read_stats(results_dir, task)
        tables[task] = study_table(task, summary, tests, results_dir / "stats" / f"{task}_summary.tsv",
                                   results_dir / "stats" / f"{task}_tests.tsv")
    folds = sorted(metrics["localization"]["fold"].unique().tolist())
    labels = {m: label for task in HEADLINE for m, label in HEADLINE[task]}

    figs = {f"folds_{task}": _figure(figures.paired_folds, fold_values(metrics[task], task), labels)
            for task in TASKS}
    grid = inputs.grid_slices(results_dir, scope)
    figs["grid"] = _figure(figures.image_grid, grid) if grid else None
    examples = localization_panels(results_dir, folds, threshold, n_examples)
    figs["examples"] = _figure(figures.localization_examples, examples[0], list(ARMS)) if examples else None
    curves, points = froc_curves(results_dir, folds), froc_points(metrics["localization"])
    figs["froc"] = _figure(figures.froc_figure, curves, points) if curves or points else None
    losses = inputs.read_loss_curves(results_dir, scope)
    figs["loss"] = _figure(figures.loss_curves, losses) if losses else None
    memorised = inputs.read_memorisation(results_dir, scope)
    near_duplicate = ((config or {}).get("downstream") or {}).get("near_duplicate_threshold")
    figs["memorisation"] = (_figure(figures.memorisation_figure, memorised, near_duplicate)
                            if memorised is not None else None)

    controls = inputs.read_controls(results_dir, scope)
    counts = counts_table(inputs.read_counts(results_dir, "detection", scope))

    fidelity = inputs.read_fidelity(results_dir, scope)
    realism = inputs.read_realism(results_dir, scope)
    if realism is not None:
        values = realism.drop(columns="fold")
        summary_row = {"fold": "mean ± sd", **{c: mean_sd(values[c], len(values)) for c in values.columns}}
        realism = pd.concat([realism.astype(object), pd.DataFrame([summary_row])], ignore_index=True)

    manifest_tsv = results_dir / "cohort" / "manifest.tsv"
    manifest = read_table(manifest_tsv, "manifest") if manifest_tsv.is_file() else None
    rejected = inputs.read_optional_tsv(results_dir / "cohort" / "rejected.tsv")
    leakage = inputs.read_optional_tsv(results_dir / "audit" / "leakage.tsv")
    bench = inputs.benchmarks(results_dir)
    return {
        "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tables": [tables[task] for task in TASKS],
        "significance": SIGNIFICANCE,
        "controls": controls_rows(controls, results_dir / "stats" / "controls.tsv") if controls is not None else None,
        "control_meaning": control_meaning(config),
        "counts": frame_table(counts) if counts is not None else None,
        "folds": folds,
        "figures": figs,
        "example_fold": examples[1] if examples else None,
        "grid_fold": grid[0]["fold"] if grid else None,
        "score_threshold": threshold,
        "froc_from_predictions": sorted(curves),
        "fidelity": frame_table(fidelity) if fidelity is not None else None,
        "realism": frame_table(realism) if realism is not None else None,
        "config": yaml.safe_dump(config or {}, sort_keys=False, default_flow_style=None),
        "software": {"python": platform.python_version(), **inputs.software_versions()},
        "commit": inputs.git_commit(Path(__file__).parent, Path.cwd()),
        "cohort": inputs.cohort_counts(manifest) if manifest is not None else None,
        "rejected": frame_table(rejected) if rejected is not None else None,
        "leakage": frame_table(leakage) if leakage is not None else None,
        "spade_vgg": inputs.spade_vgg(results_dir, scope),
        "benchmarks": frame_table(bench, "{:.1f}") if bench is not None else None,
        "benchmark_total": f"{bench['seconds'].sum():.1f}" if bench is not None else None,
    }


def render_html(context: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context)


def build_report(results_dir, config: dict, out_html) -> None:
    """Write the self-contained HTML report of `results_dir` (its PDF print: nodulesynth.report.pdf.html_to_pdf).

    config: the config as run (shown in the provenance; its `report` section sets score_threshold and examples).
    """
    html = render_html(report_context(results_dir, config))
    with atomic_path(out_html) as tmp:
        Path(tmp).write_text(html, encoding="utf-8")
