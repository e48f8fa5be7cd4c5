# What a run outside this folder's plain processes needs, included last (it reads every rule); the decisions
# are nodulesynth.cluster's (tested there), applied here to the workflow:
# - under --use-singularity, the configured data folders bound into the containers;
# - on SLURM (profiles/slurm), partitions that exist on the cluster, checked before anything is submitted,
#   each job's disk_mb asked for as node-local scratch (`sbatch --tmp`), and its runtime kept within what a
#   partition that can take it allows.
from snakemake.exceptions import WorkflowError

from nodulesynth import cluster
from nodulesynth.errors import InputError

if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    try:
        binds = cluster.data_binds(config["cohort"], os.getcwd())
    except InputError as err:
        raise WorkflowError(str(err))
    settings = workflow.deployment_settings
    settings.apptainer_args = cluster.with_binds(settings.apptainer_args, binds)


def on_slurm():
    """Whether this process submits jobs to SLURM (not the job step inside one); known once the run starts."""
    plugin = workflow.executor_plugin
    return plugin is not None and plugin.name == "slurm"


def partition_file():
    """The SLURM plugin's partition file: profiles/slurm's `slurm-partition-config`, or
    $SNAKEMAKE_SLURM_PARTITIONS; None where neither is set."""
    return getattr(workflow.executor_settings, "partition_config", None) or os.environ.get("SNAKEMAKE_SLURM_PARTITIONS")


onstart:
    # After the DAG is built and before the first job is submitted; never in a dry run or inside a job.
    if on_slurm() and partition_file():
        try:
            cluster.check_partitions(partition_file(), cluster.cluster_partitions())
        except InputError as err:
            raise WorkflowError(str(err))


def node_scratch_request(smk_rule):
    """A `slurm_extra` resource for `smk_rule`: its disk_mb as `--tmp` when the job goes to SLURM, nothing
    otherwise. A job in a group (the per-scan rules, rules/cohort.smk) asks for none: Snakemake requires a
    string resource to be the same for every job of a group, and those jobs write only to results/."""

    def slurm_extra(wildcards, input, attempt):
        if not on_slurm() or smk_rule.group is not None:
            return None
        resources = smk_rule.expand_resources(dict(wildcards.items()), input, attempt, skip_evaluation={"slurm_extra"})
        return cluster.scratch_request(resources.get("disk_mb"))

    return slurm_extra


def runtime_within_partitions(smk_rule, runtime):
    """The rule's `runtime` resource, on SLURM cut to the longest a partition that can take the job (its other
    resources and threads) allows (cluster.runtime_limit, cluster.capped_runtime); as declared otherwise."""

    def capped(wildcards, input, threads, attempt):
        minutes = runtime.evaluate(
            wildcards, input=input, threads=threads, attempt=attempt, rulename=smk_rule.name
        ).value
        if not on_slurm() or not partition_file():
            return minutes
        others = smk_rule.expand_resources(
            dict(wildcards.items()), input, attempt, skip_evaluation={"runtime", "slurm_extra"}
        )
        resources = {name: value for name, value in others.items() if name not in ("runtime", "slurm_extra", "_cores")}
        return cluster.capped_runtime(minutes, cluster.runtime_limit(partition_file(), resources, threads))

    return capped


for declared in workflow.rules:
    # A rule given its own slurm_extra (a rule, or the profile's set-resources) keeps it as it is.
    if "slurm_extra" not in declared.resources:
        declared.resources["slurm_extra"] = node_scratch_request(declared)
    if "runtime" in declared.resources:
        declared.resources["runtime"] = runtime_within_partitions(declared, declared.resources["runtime"])
