# Shared helpers of the rules: the cohort's scan ids (known once the `cohort` checkpoint has run),
# the per-step-group container image, and config sections as JSON for `params:`.
import functools
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake_interface_executor_plugins.settings import DeploymentMethod

# What each model may see is decided in the package (tested there); the rules only ask it.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
# Jobs run this workflow's own package: the project's environment (scripts/setup-env.sh) is shared by every clone of
# one lock, and its editable install points at whichever clone was set up last. Not in containers, whose image
# holds the package (and which see the host's variables).
if DeploymentMethod.APPTAINER not in workflow.deployment_settings.deployment_method:
    _inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ.update(PYTHONPATH=os.pathsep.join([str(Path(workflow.basedir) / "src"), *_inherited]))
# envs/*.yaml install the lock and this checkout from here (Snakemake copies env files elsewhere).
os.environ.setdefault("NODULESYNTH_ROOT", str(Path(workflow.basedir)))
from nodulesynth.models.device import SLOTS_VARIABLE, local_gpu_count

# The GPUs of this machine that the run's GPU jobs (`gpu=1`) share: `--resources gpu=N`, or in a local run that gives
# none the GPUs the driver lists, so that Snakemake starts no more GPU jobs than there are GPUs. Each job claims one
# of them (nodulesynth.models.device.job_device) and stops with the reason where it cannot use it. An environment
# variable rather than a `params:` entry: the jobs inherit it (Apptainer too), and a run with more or fewer GPUs
# must not rerun every GPU step as a changed param would. No GPU (the demo, CI): nothing is set. A local run inside a
# SLURM allocation (`salloc --gpus=2`, then snakemake) shares the allocation's GPUs the same way. A cluster run's
# jobs own their GPUs: Snakemake reads the workflow again in each (remote mode), which drops the slots there, also
# those sbatch passes on from the submitting host; profiles/slurm scopes `gpu` local.
_gpu_slots = getattr(workflow.global_resources.get("gpu"), "value", None)
if workflow.remote_exec:
    os.environ.pop(SLOTS_VARIABLE, None)
elif workflow.local_exec:
    if not _gpu_slots:
        _gpu_slots = local_gpu_count()
        if _gpu_slots:
            workflow.register_resource("gpu", _gpu_slots)
    if _gpu_slots:
        os.environ[SLOTS_VARIABLE] = str(int(_gpu_slots))
from nodulesynth.data.folds import evaluation_scans, has_test_patients, read_folds, training_scans
from nodulesynth.commands.downstream import TASK_COMMANDS
from nodulesynth.downstream.datasets import ARMS, GENERATORS, TASKS, DownstreamOptions, study_arms, study_image_size
from nodulesynth.io import read_table
from nodulesynth.models.distributed import launcher
from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.report.pdf import pdf_wanted

# Each job's mem_mb, runtime and disk_mb, sized from its inputs and the config (tested there).
from nodulesynth import resources as sizing
from snakemake.logging import logger


wildcard_constraints:
    scan=r"[A-Za-z0-9._-]+",
    fold=r"\d+|holdout",
    generator=r"sdm|spade",
    arm=r"A|B|C|P|N",
    task=r"detection|localization",


def section(name, keys=None):
    """A config section as compact JSON, for `params:` (a changed value reruns the step); only `keys` of it for a
    command that reads only those, so that a change of another key does not rerun its jobs."""
    values = config.get(name, {})
    if keys is not None:
        values = {key: values[key] for key in keys if key in values}
    return json.dumps(values, sort_keys=True)


def scan_ids():
    scans = checkpoints.cohort.get().output.scans
    return read_table(scans, "scans").scan_id.astype(str).tolist()


@functools.lru_cache(maxsize=4)
def _scan_positions(path, mtime_ns):
    """scan id -> its row in the cohort's scans table (read once per version of the table)."""
    return {scan: i for i, scan in enumerate(read_table(path, "scans").scan_id.astype(str))}


def scan_group(wildcards):
    """The cluster submission of a scan's ingest, masks and qc: group `scan<k>`, the k-th run of N scans in the
    cohort's order, N from `group-components: scan=N` (profiles/slurm; 1 without it).

    Not one group `scan` left to group-components alone: Snakemake 9.27 merges its merged groups again on every
    pass of DAG postprocessing (GroupJobFactory hands back the merged objects), so 12 scans in groups of 4 went
    out as one job of 12 in one run and as three of 4 in another: a LIDC run could become one job of 1,018
    scans. Registered as instances of `scan` (as Snakemake does for a group named with wildcards), each
    `scan<k>` is merged by group-components from its own N scans only, however often that runs."""
    per_group = max(1, int(workflow.group_settings.group_components.get("scan", 1)))
    scans = checkpoints.cohort.get().output.scans
    position = _scan_positions(scans, os.stat(scans).st_mtime_ns).get(wildcards.scan, 0)
    group = f"scan{position // per_group}"
    workflow.parent_groupids[group] = "scan"
    return group


def slice_stacks(wildcards=None):
    return expand("results/slices/{scan}.npz", scan=scan_ids())


def config_file(name, key, source=None):
    """[the file config[name][key] names], or [] where it names none (or cohort.source is not `source`): an input
    of the step that reads it, so that a replaced file reruns that step as an edited value does (the step reads its
    path from its params, where only the path is). LUNA16's annotations.csv and annotations_excluded.csv (source
    dicom), SPADE's VGG19 weights, the downstream models' load_from."""
    path = config.get(name, {}).get(key)
    if not path or (source is not None and config["cohort"].get("source") != source):
        return []
    return [path]


def spade_vgg_weights(wildcards):
    return config_file("spade", "vgg_weights") if wildcards.generator == "spade" else []


def task_load_from(wildcards):
    return config_file(wildcards.task, "load_from")


def qc_montages(wildcards=None):
    return expand("results/qc/{scan}.png", scan=scan_ids())


def _fold_plan():
    """The manifest and folds tables, once the `folds` checkpoint has run."""
    folds = read_folds(checkpoints.folds.get().output[0])
    return read_table("results/cohort/manifest.tsv", "manifest"), folds


def training_stacks(wildcards):
    """Slice stacks a model of `wildcards.fold` may learn from (nodulesynth.data.folds.training_scans)."""
    return expand("results/slices/{scan}.npz", scan=training_scans(*_fold_plan(), wildcards.fold))


def heldout_stacks(wildcards):
    """Slice stacks of `wildcards.fold`'s test patients (nodulesynth.data.folds.evaluation_scans), whose maps
    are sampled for evaluation only (held-out mask fidelity); none for the holdout generator."""
    return expand("results/slices/{scan}.npz", scan=evaluation_scans(*_fold_plan(), wildcards.fold))


def fold_stacks(wildcards):
    """Slice stacks, nodule boxes and excluded findings of a downstream fold: its training and its test scans."""
    manifest, folds = _fold_plan()
    scans = training_scans(manifest, folds, wildcards.fold) + evaluation_scans(manifest, folds, wildcards.fold)
    return expand("results/slices/{scan}.{ext}", scan=scans, ext=["npz", "nodules.tsv", "excluded.tsv"])


def heldout_samples(wildcards):
    """The fold generator's samples of its test patients' maps (none for the holdout generator)."""
    if not has_test_patients(wildcards.fold):
        return []
    return [f"results/synth_heldout/{wildcards.generator}/{wildcards.fold}"]


def downstream_folds():
    return [str(k) for k in range(config["folds"]["k"])]


def generator_folds():
    return downstream_folds() + ["holdout"]


# The arms the DAG trains: A, B, C, and the controls P and N where downstream.controls is on (the default).
ARM_NAMES = study_arms(controls=config["downstream"].get("controls", True))


def arm_synthetic(wildcards):
    """The synthetic stacks an arm adds: none for A, the fold's SPADE (B) or SDM (C) samples."""
    generator = ARMS.get(wildcards.arm)
    return [] if generator is None else [f"results/synth/{generator}/{wildcards.fold}"]


def arm_generator_files(wildcards):
    """The training list and model file of the generator whose slices an arm adds (none for A, P, N), for the
    audit: its synthetic stacks must record that model's sha256."""
    generator = ARMS.get(wildcards.arm)
    if generator is None:
        return []
    return [f"results/generators/{generator}/{wildcards.fold}/{name}" for name in ("training_scans.tsv", "model.pt")]


def downstream_image_size():
    """The study's slice size: downstream.image_size, or (null) the generators' size (both must agree)."""
    return study_image_size(
        config["downstream"].get("image_size"), {name: config[name]["image_size"] for name in GENERATORS}
    )


# Sampling keys of the `sdm:` section: a change reruns sampling only, not training.
SDM_SAMPLING_KEYS = SDMOptions.SAMPLING_KEYS


def sdm_training_params():
    return section("sdm", [key for key in config["sdm"] if key not in SDM_SAMPLING_KEYS])


def sdm_sampling_params():
    return section("sdm", SDM_SAMPLING_KEYS)


# What the generator rules (wildcard generator) take from each generator's section. The SDM's sampling keys
# are read by sampling only, so that a new guidance scale resamples without retraining; SPADE samples with its
# model's own options.
def generator_training_params(wildcards):
    return sdm_training_params() if wildcards.generator == "sdm" else section("spade")


def generator_sampling_args(wildcards):
    return f"--params {shlex.quote(sdm_sampling_params())}" if wildcards.generator == "sdm" else ""


# The GPUs one SDM trains on (sdm.gpus), read once through its options when the workflow is parsed: a batch_size
# that does not split over them stops the run before any job starts, naming the key. SDM_LAUNCHER: the prefix
# that runs train-sdm on them (torchrun; "" for one).
SDM_GPUS = SDMOptions.from_config(config["sdm"]).gpus
SDM_LAUNCHER = launcher(SDM_GPUS)


def generator_launcher(wildcards):
    """torchrun for an SDM trained on several GPUs (sdm.gpus); nothing otherwise."""
    return SDM_LAUNCHER if wildcards.generator == "sdm" else ""


def generator_gpus(wildcards):
    return SDM_GPUS if wildcards.generator == "sdm" else 1


def report_targets():
    """The report's files: report.html, and report.pdf where nodulesynth.report.pdf.pdf_wanted says so (config
    report.pdf); its warning, when the PDF is left out, is logged once here."""
    settings = config.get("report", {})
    wanted, warning = pdf_wanted(
        settings.get("pdf", "auto"),
        settings.get("chromium"),
        in_containers=DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method,
    )
    if warning:
        logger.warning(warning)
    return ["results/report/report.html"] + (["results/report/report.pdf"] if wanted else [])


def chromium_option():
    """`--chromium PATH` for report-pdf when config report.chromium names one (else found on PATH)."""
    chromium = config.get("report", {}).get("chromium")
    return f"--chromium {shlex.quote(chromium)}" if chromium else ""
