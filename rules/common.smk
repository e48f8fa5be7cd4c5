# Shared helpers of the rules: the cohort's scan ids (known once the `cohort` checkpoint has run),
# the per-step-group container image, and config sections as JSON for `params:`.
import json

import pandas as pd


wildcard_constraints:
    scan=r"[A-Za-z0-9._-]+",
    fold=r"\d+|holdout",
    generator=r"sdm|spade",


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


def training_stacks(wildcards):
    """Slice stacks of the patients a generator for `wildcards.fold` may see (never its test fold)."""
    folds = pd.read_csv(checkpoints.folds.get().output[0], sep="\t", dtype={"patient_id": str})
    manifest = pd.read_csv("results/cohort/manifest.tsv", sep="\t", dtype={"scan_id": str, "patient_id": str})
    usable = manifest[manifest.status == "ok"].merge(folds, on="patient_id")
    if wildcards.fold != "holdout":
        usable = usable[usable.fold != int(wildcards.fold)]
    return expand("results/slices/{scan}.npz", scan=sorted(usable.scan_id))


def generator_folds():
    return [str(k) for k in range(config["folds"]["k"])] + ["holdout"]


# Sampling keys of the `sdm:` section (nodulesynth's SDMOptions.SAMPLING_KEYS; the Snakefile does not
# import the package): a change reruns sampling only, not training.
SDM_SAMPLING_KEYS = ["sampler", "sample_steps", "guidance_scale", "ddim_eta", "sample_batch_size"]


def sdm_training_params():
    return json.dumps({k: v for k, v in config["sdm"].items() if k not in SDM_SAMPLING_KEYS}, sort_keys=True)


def sdm_sampling_params():
    return json.dumps({k: v for k, v in config["sdm"].items() if k in SDM_SAMPLING_KEYS}, sort_keys=True)
