# nodulesynth: lesion maps of chest CT, lesion-map-to-CT synthesis and a downstream study.
# Run: snakemake --cores N [--use-singularity] ; see README.md. Every rule calls one `nodulesynth` command.

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config.yaml"


validate(config, "schemas/config.schema.yaml")


# The method, as the workflow page of `snakemake --report` (README.md keeps the user's page).
report: "rules/captions/workflow.rst"


include: "rules/common.smk"
include: "rules/cohort.smk"
include: "rules/folds.smk"
include: "rules/generators.smk"
include: "rules/audit.smk"
include: "rules/downstream.smk"
include: "rules/stats.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        "results/cohort/manifest.tsv",
        "results/cohort/rejected.tsv",
        "results/folds/folds.tsv",
        qc_montages,
        expand("results/synth/{generator}/{fold}.fidelity.tsv", generator=GENERATORS, fold=generator_folds()),
        "results/audit/leakage.tsv",
        expand(
            "results/downstream/{task}/{arm}/fold{fold}/metrics.json",
            task=TASKS,
            arm=ARM_NAMES,
            fold=downstream_folds(),
        ),
        expand("results/downstream/realism/fold{fold}.json", fold=downstream_folds()),
        report_targets(),


# Last: it reads every rule above (containers' data binds, SLURM partitions and node scratch).
include: "rules/cluster.smk"
