"""What the report reads from a results tree: the study's metrics and statistics (required), the optional
inputs behind its figures and tables, and the run's provenance.

Required inputs raise a clear error naming the file; an optional one that is absent comes back as None
(the report then says "not available"). What a results tree holds beyond the run's folds and arms (`RunScope`) is
not read.
"""

import importlib.metadata
import json
import subprocess
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from nodulesynth.downstream.datasets import ARMS, CONTROLS, GENERATORS, SliceSet, fold_number, study_arms
from nodulesynth.data.folds import read_folds
from nodulesynth.errors import InputError
from nodulesynth.io import read_columns, read_tsv
from nodulesynth.stats.inputs import PREDICTION_COLUMNS

SUMMARY_COLUMNS = ("arm", "metric", "mean", "sd", "text")
TESTS_COLUMNS = ("arm", "baseline", "metric", "n", "mean_diff", "ci_low", "ci_high", "wilcoxon_p", "ttest_p",
                 "nb_ttest_p", "endpoint", "p_holm")
CONTROLS_COLUMNS = ("task", "metric", "control", "difference", "ci_low", "ci_high", "ci_method", "expected",
                    "detected", "unit")
SOFTWARE = ("torch", "mmdet", "mmpretrain", "mmengine", "snakemake", "pydicom", "numpy")


@dataclass(frozen=True)
class RunScope:
    """The folds and arms of the run a report is of, from its config (folds.k, downstream.controls). A results tree
    can hold more: Snakemake deletes no file a run stops producing, so after folds.k was lowered or the controls
    turned off, an earlier run's fold3/ or controls.tsv is still there, from another patient split or arms this run
    has not trained; the report must not show them beside this run's statistics. folds None: every fold found."""

    folds: tuple | None = None
    arms: tuple = tuple(study_arms(controls=True))

    @classmethod
    def of(cls, config: dict | None) -> "RunScope":
        config = config or {}
        k = (config.get("folds") or {}).get("k")
        controls = bool((config.get("downstream") or {}).get("controls", True))
        return cls(None if k is None else tuple(range(int(k))), tuple(study_arms(controls=controls)))

    def has_fold(self, fold) -> bool:
        """Whether a fold (3, "3", or the generators' "holdout") is one of this run's."""
        if self.folds is None or str(fold) == "holdout":
            return True
        return str(fold).isdigit() and int(fold) in self.folds

    @property
    def has_controls(self) -> bool:
        return any(arm in CONTROLS for arm in self.arms)


# ---------------------------------------------------------------- required: metrics and statistics

def _metrics_rows(path, arm) -> list[tuple]:
    """(arm, fold, metric, value) of one metrics.json's numbers."""
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(metrics, dict):
        raise InputError(f"{path}: expected one flat JSON object")
    return [(arm, fold_number(path.parent), metric, float(value)) for metric, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)]


def read_metrics(results_dir, task, scope: RunScope = RunScope()) -> pd.DataFrame:
    """Every fold's metrics.json of one task (of the run's folds), long form: arm, fold, metric, value.

    All three arms must be there with the same folds (the arms are paired by fold).
    """
    rows, folds_by_arm = [], {}
    for arm in ARMS:
        arm_dir = Path(results_dir) / "downstream" / task / arm
        paths = sorted((p for p in arm_dir.glob("fold*/metrics.json") if scope.has_fold(fold_number(p.parent))),
                       key=lambda p: fold_number(p.parent))
        if not paths:
            raise FileNotFoundError(f"{arm_dir}: no fold*/metrics.json (task {task}, arm {arm}): required input")
        folds_by_arm[arm] = [fold_number(p.parent) for p in paths]
        for path in paths:
            rows += _metrics_rows(path, arm)
    reference = folds_by_arm["A"]
    for arm, folds in folds_by_arm.items():
        if folds != reference:
            raise InputError(f"{Path(results_dir) / 'downstream' / task}: arm {arm} has folds {folds}, "
                             f"arm A has {reference}: the arms must be paired fold by fold")
    return pd.DataFrame(rows, columns=["arm", "fold", "metric", "value"])


def read_stats(results_dir, task):
    """(summary, tests) tables of one task from results/stats/."""
    stats_dir = Path(results_dir) / "stats"
    summary = read_columns(stats_dir / f"{task}_summary.tsv", SUMMARY_COLUMNS)
    tests = read_columns(stats_dir / f"{task}_tests.tsv", TESTS_COLUMNS)
    summary["arm"], tests["arm"] = summary["arm"].astype(str), tests["arm"].astype(str)
    tests["baseline"] = tests["baseline"].astype(str)
    return summary, tests


def read_controls(results_dir, scope: RunScope = RunScope()):
    """results/stats/controls.tsv (written where the control arms ran), or None when absent or when the run has no
    control arms (a file of an earlier run)."""
    path = Path(results_dir) / "stats" / "controls.tsv"
    return read_columns(path, CONTROLS_COLUMNS) if scope.has_controls and path.is_file() else None


def read_counts(results_dir, task, scope: RunScope = RunScope()) -> pd.DataFrame:
    """arm, fold, metric, value of every metrics.json of one task that is present for the run's arms (the control
    arms too) and folds, for the counts table."""
    rows = []
    for arm in scope.arms:
        for path in sorted((Path(results_dir) / "downstream" / task / arm).glob("fold*/metrics.json")):
            if scope.has_fold(fold_number(path.parent)):
                rows += _metrics_rows(path, arm)
    return pd.DataFrame(rows, columns=["arm", "fold", "metric", "value"])


# ---------------------------------------------------------------- optional inputs

def read_predictions(results_dir, task, arm, fold):
    """predictions.tsv of one task, arm and fold, or None when absent."""
    path = Path(results_dir) / "downstream" / task / arm / f"fold{fold}" / "predictions.tsv"
    if not path.is_file():
        return None
    return read_columns(path, PREDICTION_COLUMNS[task])


def read_test_set(results_dir, fold, arm="A"):
    """The fold's test SliceSet (identical in every arm, so arm A's by default), or None when its dataset file
    is absent. Reads only the test arrays: at the real run's size the training arrays can take gigabytes, and
    npz members are decompressed only when asked for (load_dataset reads them all)."""
    path = Path(results_dir) / "downstream" / "data" / arm / f"fold{fold}.npz"
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        missing = [f"test_{f.name}" for f in fields(SliceSet) if f"test_{f.name}" not in data.files]
        if missing:
            raise InputError(f"{path}: missing arrays {missing}")
        return SliceSet(**{f.name: data[f"test_{f.name}"] for f in fields(SliceSet)})


def read_loss_curves(results_dir, scope: RunScope = RunScope()) -> dict:
    """{generator: {fold: DataFrame}} of every loss.tsv found of the run's generators (empty when none)."""
    curves = {}
    for generator in GENERATORS:
        for path in sorted((Path(results_dir) / "generators" / generator).glob("*/loss.tsv")):
            if not scope.has_fold(path.parent.name):
                continue
            table = read_columns(path, ("step",))
            if len(table):
                curves.setdefault(generator, {})[path.parent.name] = table
    return curves


def read_fidelity(results_dir, scope: RunScope = RunScope()):
    """Mean mask fidelity per generator and fold (and split, when the table has one) of the run's generators, or
    None."""
    paths = sorted(p for g in GENERATORS for p in (Path(results_dir) / "synth" / g).glob("*.fidelity.tsv")
                   if scope.has_fold(p.name[: -len(".fidelity.tsv")]))
    tables = []
    for path in paths:
        table = read_tsv(path)
        table["generator"] = path.parent.name
        table["fold"] = path.name[: -len(".fidelity.tsv")]
        tables.append(table)
    if not tables:
        return None
    table = pd.concat(tables, ignore_index=True)
    keys = ["generator", "fold"] + [c for c in ("split",) if c in table.columns]
    values = [c for c in table.select_dtypes("number").columns if c not in ("slice_index",) and c not in keys]
    grouped = table.groupby(keys, sort=True)
    means = grouped[values].mean()
    means.insert(0, "slices", grouped.size())
    return means.reset_index()


REALISM_CLASSES = ("nodule", "nodule_free")  # nodulesynth.downstream.realism.CLASSES (imports torch: not here)


def read_realism(results_dir, scope: RunScope = RunScope()):
    """Class-matched feature-space Fréchet distances per fold, or None: fold, and per class compared (nodule
    always, nodule-free where a generator's set held some) the count every set was drawn to, the floor (real
    training slices), each generator's distance and its ratio to the floor. A null distance (too few slices)
    reads as NaN."""
    rows = []
    paths = (p for p in (Path(results_dir) / "downstream" / "realism").glob("fold*.json")
             if scope.has_fold(fold_number(p)))
    for path in sorted(paths, key=lambda p: fold_number(p)):
        values = json.loads(path.read_text())
        required = ["n_nodule", "fd_nodule_real_train"] + [f"fd_nodule_{g}" for g in GENERATORS]
        missing = [k for k in required if k not in values]
        if missing:
            raise InputError(f"{path}: missing key(s) {missing}")
        row = {"fold": fold_number(path)}
        for name in (c for c in REALISM_CLASSES if f"n_{c}" in values):
            words = name.replace("_", "-")
            floor = values[f"fd_{name}_real_train"]
            floor = float("nan") if floor is None else float(floor)
            row[f"{words} slices per set"] = int(values[f"n_{name}"])
            row[f"{words}: real train (floor)"] = floor
            for generator in (g for g in GENERATORS if f"fd_{name}_{g}" in values):
                distance = values[f"fd_{name}_{generator}"]
                distance = float("nan") if distance is None else float(distance)
                row[f"{words}: {generator.upper()}"] = distance
                row[f"{words}: {generator.upper()} / floor"] = distance / floor if floor > 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows) if rows else None


def _heldout_folds(results_dir, scope: RunScope = RunScope()) -> list:
    """The run's folds whose generators sampled their test patients' maps (results/synth_heldout/sdm/<k>), in
    order."""
    folds = [p.name for p in (Path(results_dir) / "synth_heldout" / "sdm").glob("*") if p.is_dir()]
    return sorted((f for f in folds if f.isdigit() and scope.has_fold(f)), key=int)


def read_memorisation(results_dir, scope: RunScope = RunScope()):
    """The audit's memorisation scores of arms B and C (results/audit/{arm}/fold{k}.memorisation.tsv: generator,
    fold, scan_id, slice_index, to_train, to_test per synthetic slice), or None when there are none."""
    tables = []
    for arm, generator in ARMS.items():
        if generator is None:
            continue
        for path in sorted((Path(results_dir) / "audit" / arm).glob("fold*.memorisation.tsv")):
            if not scope.has_fold(fold_number(path)):
                continue
            table = read_columns(path, ("generator", "fold", "to_train", "to_test"))
            if len(table):
                tables.append(table)
    return pd.concat(tables, ignore_index=True) if tables else None


def grid_slices(results_dir, scope: RunScope = RunScope()):
    """For the image grid (Figure 1): a nodule slice and a nodule-free slice of a test patient of the first fold
    that has one, with the images that fold's own generators (which never saw the patient) made from its maps
    (results/synth_heldout/{generator}/{fold}): dicts with fold, scan_id, patient_id, CT (the real slice), the
    lesion map, the SDM and the SPADE image. None if no such scan has both kinds of slice in both generators'
    output. Where results/folds/folds.tsv is present, the patient must be in that fold: a heldout sample of
    another fold's patient (stale results) is an error."""
    from nodulesynth.data.slices import load_slices

    results_dir = Path(results_dir)
    folds_tsv = results_dir / "folds" / "folds.tsv"
    fold_of_patient = None
    if folds_tsv.is_file():
        table = read_folds(folds_tsv)
        fold_of_patient = dict(zip(table["patient_id"].astype(str), table["fold"].astype(int)))
    for fold in _heldout_folds(results_dir, scope):
        for sdm_path in sorted((results_dir / "synth_heldout" / "sdm" / fold).glob("*.npz")):
            spade_path = results_dir / "synth_heldout" / "spade" / fold / sdm_path.name
            real_path = results_dir / "slices" / sdm_path.name
            if not (spade_path.is_file() and real_path.is_file()):
                continue
            sdm, spade, real = load_slices(sdm_path), load_slices(spade_path), load_slices(real_path)
            if min(len(sdm), len(spade), len(real)) == 0:
                continue
            if fold_of_patient is not None and fold_of_patient.get(str(real.patient_id)) != int(fold):
                raise InputError(f"{sdm_path}: patient {real.patient_id} is not a test patient of fold {fold} in "
                                 f"{folds_tsv} (fold {fold_of_patient.get(str(real.patient_id))}): stale results?")
            for stack, path in ((sdm, sdm_path), (spade, spade_path)):
                if "source_index" not in stack.extra:
                    raise InputError(f"{path}: missing array 'source_index' "
                                     "(the row of the real stack behind each map)")
            sdm_row = {int(s): i for i, s in enumerate(sdm.extra["source_index"])}
            spade_row = {int(s): i for i, s in enumerate(spade.extra["source_index"])}
            common = sorted(set(sdm_row) & set(spade_row))
            nodule = [s for s in common if (sdm.label[sdm_row[s]] == 5).any()]
            free = [s for s in common if not (sdm.label[sdm_row[s]] == 5).any()]
            if not (nodule and free):
                continue
            # the slice with the largest nodule shows it best; the middle nodule-free map is a typical one
            picks = [("nodule slice", max(nodule, key=lambda s: int((sdm.label[sdm_row[s]] == 5).sum()))),
                     ("nodule-free slice", free[len(free) // 2])]
            return [dict(kind=kind, fold=int(fold), scan_id=real.scan_id, patient_id=str(real.patient_id),
                         slice_index=int(real.slice_index[s]), ct=real.image[s], label=sdm.label[sdm_row[s]],
                         sdm=sdm.image[sdm_row[s]], spade=spade.image[spade_row[s]])
                    for kind, s in picks]
    return None


# ---------------------------------------------------------------- provenance

def software_versions(packages=SOFTWARE) -> dict:
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit(*places) -> str:
    """HEAD of the first of `places` inside a git work tree ("+ local changes" when it differs), else "unknown"."""
    for place in places:
        try:
            commit = subprocess.run(["git", "-C", str(place), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=20)
            if commit.returncode != 0:
                continue
            dirty = subprocess.run(["git", "-C", str(place), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=20)
            return commit.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")
        except (OSError, subprocess.TimeoutExpired):
            continue
    return "unknown"


def read_optional_tsv(path):
    path = Path(path)
    return read_tsv(path) if path.is_file() else None


def cohort_counts(manifest: pd.DataFrame) -> dict:
    counts = {"scans": len(manifest)}
    if "patient_id" in manifest:
        counts["patients"] = int(manifest["patient_id"].nunique())
    if "status" in manifest:
        counts.update({f"status {k}": int(v) for k, v in manifest["status"].value_counts().sort_index().items()})
    if "slices" in manifest:
        counts["slices"] = int(pd.to_numeric(manifest["slices"], errors="coerce").fillna(0).sum())
    return counts


def _vgg_from_options(path: Path):
    """(True/False, detail) when an options file says whether the VGG loss was on, else (None, "")."""
    try:
        text = path.read_text(errors="replace")
        if path.suffix == ".json":
            options = json.loads(text)
        else:
            import yaml

            options = yaml.safe_load(text)
    except (OSError, ValueError, ImportError) as err:  # an unreadable options file is no evidence either way
        return None, f"{path.name} unreadable: {err}"
    if not isinstance(options, dict):
        return None, ""
    status = options.get("perceptual_loss")  # the trainer's own words: "on (...)" or "off (...)"
    if isinstance(status, str) and status.split(" ")[0] in ("on", "off"):
        return status.startswith("on"), status
    inner = options.get("options", options)
    if isinstance(inner, dict) and "vgg_weights" in inner:
        on = bool(inner["vgg_weights"]) and float(inner.get("lambda_vgg", 1) or 0) != 0
        return on, f"vgg_weights {inner['vgg_weights']}"
    return None, ""


def spade_vgg(results_dir, scope: RunScope = RunScope()) -> dict:
    """Per SPADE run folder of the run's folds: "with VGG loss", "without VGG loss" or "unknown", from its options
    file or, failing that, from its loss curve (a g_vgg column that is not all zero)."""
    out = {}
    for folder in sorted(p for p in (Path(results_dir) / "generators" / "spade").glob("*")
                         if p.is_dir() and scope.has_fold(p.name)):
        verdict, detail = None, ""
        for path in sorted(folder.glob("options*")):
            if path.suffix in (".json", ".yaml", ".yml"):
                verdict, detail = _vgg_from_options(path)
                detail = f"{path.name}: {detail}" if detail else path.name
                if verdict is not None:
                    break
        if verdict is None and (folder / "loss.tsv").is_file():
            curve = read_tsv(folder / "loss.tsv")
            if "g_vgg" in curve and len(curve):
                verdict = bool((pd.to_numeric(curve["g_vgg"], errors="coerce").fillna(0) != 0).any())
                detail = "loss.tsv: g_vgg " + ("non-zero" if verdict else "all zero")
        text = "unknown" if verdict is None else ("with VGG loss" if verdict else "without VGG loss")
        out[folder.name] = f"{text} ({detail})" if detail else text
    return out


def benchmarks(results_dir):
    """Run time of each job from Snakemake's benchmark files (column `s`): rule, job, seconds; or None."""
    root = Path(results_dir) / "benchmarks"
    rows = []
    for path in sorted(root.rglob("*.tsv")):
        table = read_tsv(path)
        if "s" not in table.columns:
            raise InputError(f"{path}: missing column 's' (not a Snakemake benchmark file?)")
        seconds = pd.to_numeric(table["s"], errors="coerce")
        relative = path.relative_to(root)
        rows.append({"rule": relative.parts[0] if len(relative.parts) > 1 else "",
                     "job": str(relative.with_suffix("")), "seconds": float(seconds.mean()),
                     "repeats": int(seconds.notna().sum())})
    return pd.DataFrame(rows) if rows else None
