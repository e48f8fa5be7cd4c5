"""Reading the downstream study's outputs for the statistics: metrics.json and predictions.tsv of every task, arm, fold.

Files live at `.../{task}/{arm}/fold{k}/metrics.json` (and `predictions.tsv` beside it); task, arm and fold are
taken from the path, so a file in the wrong place or a second file for the same (task, arm, fold) is refused
with an error naming the file rather than silently counted twice.
"""

import json
import re
from pathlib import Path

import pandas as pd

from nodulesynth.downstream.datasets import ARMS as ARM_GENERATORS
from nodulesynth.downstream.datasets import CONTROLS, TASKS, fold_number
from nodulesynth.errors import InputError
from nodulesynth.io import read_columns

ARMS = tuple(ARM_GENERATORS)  # the study's arms: A real, B + SPADE, C + SDM (its summary tables show these)
CONTROL_ARMS = tuple(CONTROLS)  # P positive and N negative control: read too, shown in the controls table only
PREDICTION_COLUMNS = {
    "detection": ("scan_id", "patient_id", "slice_index", "source", "label", "score"),
    "localization": ("scan_id", "patient_id", "slice_index", "x0", "y0", "x1", "y1", "score"),
}

# Metrics that are fractions in 0..1 (shown in percent); every other metric (slice counts, tp/fp/...) is shown as is.
# FROC sensitivities and their mean, the CPM, are fractions of nodules found, so they are proportions too.
_PROPORTION = re.compile(r"^(accuracy|precision|recall|sensitivity|specificity|f1|auc|cpm|map|ap\d*|ar\d*"
                         r"|average_precision|balanced_accuracy)$"
                         r"|^(ap|ar|froc|sens)[_@].*$")


def is_proportion(metric: str) -> bool:
    """True for metrics reported as fractions in 0..1 (accuracy, AUC, AP50, AR70, CPM, froc_*, ...)."""
    return bool(_PROPORTION.match(metric))


def parse_result_path(path, filename: str = "metrics.json") -> tuple[str, str, int]:
    """(task, arm, fold) of `.../{task}/{arm}/fold{k}/{filename}`; ValueError naming the file otherwise."""
    path = Path(path)
    parts = path.parts
    layout = f".../{{task}}/{{arm}}/fold{{k}}/{filename}"
    if len(parts) < 4 or parts[-1] != filename:
        raise InputError(f"{path}: not a downstream result file (expected {layout})")
    task, arm, fold_dir = parts[-4], parts[-3], parts[-2]
    try:
        fold = fold_number(fold_dir)
    except ValueError:
        fold = None
    if task not in TASKS or arm not in ARMS + CONTROL_ARMS or fold is None:
        raise InputError(f"{path}: unknown layout (expected {layout} with task in {TASKS}, arm in "
                         f"{ARMS + CONTROL_ARMS}); "
                         f"got task={task!r}, arm={arm!r}, fold directory={fold_dir!r}")
    return task, arm, fold


def _check_unique(keys: dict, key, path):
    if key in keys:
        task, arm, fold = key
        raise InputError(f"{path}: duplicated {task} arm {arm} fold {fold} (already read from {keys[key]})")
    keys[key] = path


def _read_metrics_file(path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path}: expected a non-empty flat JSON object metric -> number")
    for key, value in data.items():
        # bool is an int in Python; a true/false is not a metric value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{path}: metric {key!r} is not a number ({value!r}); metrics.json must be flat")
    return data


def load_metrics(paths) -> pd.DataFrame:
    """Long table (task, arm, fold, metric, value) of every metrics.json in `paths`.

    NaN values (JSON NaN, e.g. an AUC with one class) are kept; the tables and tests decide what to do with them.
    """
    rows, seen = [], {}
    for path in sorted(Path(p) for p in paths):
        key = parse_result_path(path, "metrics.json")
        _check_unique(seen, key, path)
        for metric, value in _read_metrics_file(path).items():
            rows.append((*key, metric, float(value)))
    if not rows:
        raise InputError("load_metrics: no metrics.json files given")
    frame = pd.DataFrame(rows, columns=["task", "arm", "fold", "metric", "value"])
    return frame.sort_values(["task", "arm", "fold", "metric"], ignore_index=True)


def load_predictions(paths) -> pd.DataFrame:
    """All predictions.tsv in `paths` as one table with task, arm and fold columns in front (one task only)."""
    frames, seen = [], {}
    for path in sorted(Path(p) for p in paths):
        key = parse_result_path(path, "predictions.tsv")
        _check_unique(seen, key, path)
        frame = read_columns(path, PREDICTION_COLUMNS[key[0]])
        frames.append(frame.assign(task=key[0], arm=key[1], fold=key[2]))
    if not frames:
        raise InputError("load_predictions: no predictions.tsv files given")
    tasks = {f["task"].iat[0] for f in frames if len(f)}
    if len(tasks) > 1:
        raise InputError(f"load_predictions: files of several tasks {sorted(tasks)}; load one task at a time")
    out = pd.concat(frames, ignore_index=True)
    return out[["task", "arm", "fold", *[c for c in out.columns if c not in ("task", "arm", "fold")]]]


def metric_values(metrics: pd.DataFrame, task: str, metric: str, scale: float = 100) -> pd.DataFrame:
    """(arm, fold, value) of one task's metric, proportions multiplied by `scale`; refuses duplicated folds.

    A proportion outside 0..1 (say a value already in percent, or COCO's -1 for "undefined") is refused rather
    than printed as 8576 %.
    """
    missing = {"task", "arm", "fold", "metric", "value"} - set(metrics.columns)
    if missing:
        raise InputError(f"metrics table lacks column(s) {sorted(missing)}; build it with load_metrics")
    rows = metrics[(metrics["task"] == task) & (metrics["metric"] == metric)][["arm", "fold", "value"]]
    if rows.empty:
        raise InputError(f"no values of metric {metric!r} for task {task!r}")
    dup = rows[rows.duplicated(["arm", "fold"], keep=False)]
    if not dup.empty:
        arm, fold = dup.iloc[0][["arm", "fold"]]
        count = int(((dup["arm"] == arm) & (dup["fold"] == fold)).sum())
        raise InputError(f"{task} {metric}: arm {arm} fold {fold} appears {count} times; "
                         "each fold must be counted once")
    # a metric absent from one fold's file while that fold is otherwise present is a broken file, not a smaller n
    task_folds = metrics.loc[metrics["task"] == task, ["arm", "fold"]].drop_duplicates()
    lacking = task_folds.merge(rows[["arm", "fold"]], how="left", indicator=True).query("_merge == 'left_only'")
    if not lacking.empty:
        arm, fold = lacking.iloc[0][["arm", "fold"]]
        raise InputError(f"{task}: arm {arm} fold {fold} has no {metric!r} although its other metrics are there")
    rows = rows.astype({"fold": int, "value": float})
    if is_proportion(metric):
        bad = rows[(rows["value"] < 0) | (rows["value"] > 1)]
        if not bad.empty:
            arm, fold, value = bad.iloc[0]
            raise InputError(f"{task} {metric}: arm {arm} fold {fold} has {value}, outside 0..1 for a proportion")
        rows["value"] = rows["value"] * scale
    return rows.sort_values(["arm", "fold"], ignore_index=True)
