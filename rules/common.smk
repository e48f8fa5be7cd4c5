# Shared helpers of the rules: the cohort's scan ids (known once the `cohort` checkpoint has run),
# the per-step-group container image, and config sections as JSON for `params:`.
import json
import os
import shlex
import sys
from pathlib import Path

import pandas as pd

# What each model may see is decided in the package (tested there); the rules only ask it.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
# envs/*.yaml install the lock and this checkout from here (Snakemake copies env files elsewhere).
os.environ.setdefault("NODULESYNTH_ROOT", str(Path(workflow.basedir)))
from nodulesynth.data.folds import evaluation_scans, read_folds, training_scans
from nodulesynth.downstream.datasets import ARMS, study_arms, study_image_size
from nodulesynth.report.pdf import pdf_wanted
from snakemake.logging import logger
from snakemake_interface_executor_plugins.settings import DeploymentMethod


wildcard_constraints:
    scan=r"[A-Za-z0-9._-]+",
    fold=r"\d+|holdout",
    generator=r"sdm|spade",
    arm=r"A|B|C|P|N",
    task=r"detection|localization",


def section(name):
    """A config section as compact JSON, for `params:` (a changed value reruns the step)."""
    return json.dumps(config.get(name, {}), sort_keys=True)


def scan_ids():
    scans = checkpoints.cohort.get().output.scans
    return pd.read_csv(scans, sep="\t", dtype=str).scan_id.tolist()


def slice_stacks(wildcards=None):
    return expand("results/slices/{scan}.npz", scan=scan_ids())


def qc_montages(wildcards=None):
    return expand("results/qc/{scan}.png", scan=scan_ids())


def _fold_plan():
    """The manifest and folds tables, once the `folds` checkpoint has run."""
    folds = read_folds(checkpoints.folds.get().output[0])
    return pd.read_csv("results/cohort/manifest.tsv", sep="\t", dtype={"scan_id": str, "patient_id": str}), folds


def training_stacks(wildcards):
    """Slice stacks a model of `wildcards.fold` may learn from (nodulesynth.data.folds.training_scans)."""
    return expand("results/slices/{scan}.npz", scan=training_scans(*_fold_plan(), wildcards.fold))


def heldout_stacks(wildcards):
    """Slice stacks of `wildcards.fold`'s test patients (nodulesynth.data.folds.evaluation_scans), whose maps
    are sampled for evaluation only (held-out mask fidelity); none for the holdout generator."""
    if wildcards.fold == "holdout":
        return []
    return expand("results/slices/{scan}.npz", scan=evaluation_scans(*_fold_plan(), wildcards.fold))


def fold_stacks(wildcards):
    """Slice stacks and nodule boxes of a downstream fold: its training and its test scans."""
    manifest, folds = _fold_plan()
    scans = training_scans(manifest, folds, wildcards.fold) + evaluation_scans(manifest, folds, wildcards.fold)
    return expand("results/slices/{scan}.{ext}", scan=scans, ext=["npz", "nodules.tsv"])


def downstream_folds():
    return [str(k) for k in range(config["folds"]["k"])]


def generator_folds():
    return downstream_folds() + ["holdout"]


TASKS = ["detection", "localization"]
# The arms the DAG trains: A, B, C, and the controls P and N where downstream.controls is on (the default).
ARM_NAMES = study_arms(controls=config["downstream"].get("controls", True))


def arm_synthetic(wildcards):
    """The synthetic stacks an arm adds: none for A, the fold's SPADE (B) or SDM (C) samples."""
    generator = ARMS.get(wildcards.arm)
    return [] if generator is None else [f"results/synth/{generator}/{wildcards.fold}"]


def arm_generator_files(wildcards):
    """The training list of the generator whose slices an arm adds (none for A), for the audit."""
    generator = ARMS.get(wildcards.arm)
    return [] if generator is None else [f"results/generators/{generator}/{wildcards.fold}/training_scans.tsv"]


def downstream_image_size():
    """The study's slice size: downstream.image_size, or (null) the generators' size (both must agree)."""
    return study_image_size(config["downstream"].get("image_size"),
                            {name: config[name]["image_size"] for name in ("sdm", "spade")})


# Sampling keys of the `sdm:` section (nodulesynth's SDMOptions.SAMPLING_KEYS; the Snakefile does not
# import the package): a change reruns sampling only, not training.
SDM_SAMPLING_KEYS = ["sampler", "sample_steps", "guidance_scale", "ddim_eta", "sample_batch_size"]


def sdm_training_params():
    return json.dumps({k: v for k, v in config["sdm"].items() if k not in SDM_SAMPLING_KEYS}, sort_keys=True)


def sdm_sampling_params():
    return json.dumps({k: v for k, v in config["sdm"].items() if k in SDM_SAMPLING_KEYS}, sort_keys=True)


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
