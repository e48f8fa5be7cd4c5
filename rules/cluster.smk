# What a run outside this folder's plain processes needs, included last (it reads every rule):
# - under --use-singularity, the configured data folders bound into the containers;
# - on SLURM (profiles/slurm), partitions that exist on the cluster, checked before anything is submitted, and
#   each job's disk_mb asked for as node-local scratch (`sbatch --tmp`).
import subprocess
import yaml
from snakemake.exceptions import WorkflowError


def data_binds(cohort, working_dir):
    """Apptainer `--bind SRC:DST:ro` specs for the cohort's configured input folders (cohort.lidc_root,
    cohort.dicom_root, the folder of cohort.annotations) that a container would not see: Snakemake binds only
    the working directory. A folder outside it is bound at the path the commands use (its real folder behind
    any link); a link inside it that leads out is bound at its target, where the link leads inside the
    container too. Absent folders are left to the cohort step, whose error names them."""
    working_dir = os.path.realpath(working_dir)
    folders = [cohort.get("lidc_root"), cohort.get("dicom_root")]
    if cohort.get("annotations"):
        folders.append(os.path.dirname(os.path.join(working_dir, cohort["annotations"])))
    binds = []
    for folder in filter(None, folders):
        used = os.path.normpath(os.path.join(working_dir, folder))
        real = os.path.realpath(used)
        if not os.path.isdir(real) or Path(real).is_relative_to(working_dir):
            continue
        target = real if Path(used).is_relative_to(working_dir) else used
        if any(c in real + target for c in ":,"):
            raise WorkflowError(
                f"cohort: {folder!r} holds ':' or ',', which Apptainer's --bind cannot take: "
                "link the folder from a path without them and configure that"
            )
        spec = f"{real}:{target}:ro"
        if spec not in binds:
            binds.append(spec)
    return binds


def add_apptainer_binds(binds):
    """Append `--bind` options to the run's apptainer arguments (the profiles' `apptainer-args`), each once: a
    SLURM job's Snakemake is handed the submitting run's arguments, binds included, and parses this file again."""
    settings = workflow.deployment_settings
    present = shlex.split(settings.apptainer_args or "")
    added = [f"--bind {shlex.quote(spec)}" for spec in binds if spec not in present]
    if added:
        settings.apptainer_args = " ".join(filter(None, [settings.apptainer_args, *added]))


if DeploymentMethod.APPTAINER in workflow.deployment_settings.deployment_method:
    add_apptainer_binds(data_binds(config["cohort"], os.getcwd()))


def on_slurm():
    """Whether this process submits jobs to SLURM (not the job step inside one); known once the run starts."""
    plugin = workflow.executor_plugin
    return plugin is not None and plugin.name == "slurm"


def slurm_partition_file():
    """The plugin's partition file: profiles/slurm's `slurm-partition-config`, or $SNAKEMAKE_SLURM_PARTITIONS."""
    path = getattr(workflow.executor_settings, "partition_config", None) or os.environ.get("SNAKEMAKE_SLURM_PARTITIONS")
    return Path(path) if path else None


def check_slurm_partitions():
    """Stop a SLURM run before its first submission when the partition file names a partition that `sinfo`
    does not list: profiles/slurm/partitions.yaml ships with placeholder names (cpu, gpu) to be replaced by
    the cluster's. Comparing with sinfo rather than looking for the placeholders also catches a typo, and
    passes a cluster whose partitions really are called cpu and gpu."""
    path = slurm_partition_file()
    if path is None:
        return
    named = list((yaml.safe_load(path.read_text()) or {}).get("partitions") or {})
    try:
        listed = subprocess.run(
            ["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise WorkflowError(f"{path}: cannot check its partitions against the cluster's (sinfo): {err}")
    unknown = [name for name in named if name not in listed]
    if unknown:
        raise WorkflowError(
            f"{path} names partition(s) {', '.join(unknown)} that this cluster does not have "
            f"(sinfo lists: {', '.join(sorted(set(listed))) or 'none'}). Put your cluster's partition names and "
            "limits there (`scontrol show partition`); nothing was submitted."
        )


onstart:
    # After the DAG is built and before the first job is submitted; never in a dry run or inside a job.
    if on_slurm():
        check_slurm_partitions()


def node_scratch_request(smk_rule):
    """A `slurm_extra` resource for `smk_rule`: `--tmp=<disk_mb>` when the job goes to SLURM, nothing otherwise.

    snakemake-executor-plugin-slurm 2.8 passes mem_mb, runtime, threads and gpu to sbatch but not disk_mb,
    so without this a job that stages data in $TMPDIR (the generators) may land on a node without the room.
    A job in a group (the per-scan rules, rules/cohort.smk) asks for none: Snakemake requires a string
    resource to be the same for every job of a group, and those jobs write only to results/."""

    def slurm_extra(wildcards, input, attempt):
        if not on_slurm() or smk_rule.group is not None:
            return None
        resources = smk_rule.expand_resources(dict(wildcards.items()), input, attempt, skip_evaluation={"slurm_extra"})
        disk_mb = resources.get("disk_mb")
        return f"--tmp={disk_mb}" if isinstance(disk_mb, int) else None

    return slurm_extra


for declared in workflow.rules:
    # A rule given its own slurm_extra (a rule, or the profile's set-resources) keeps it as it is.
    if "slurm_extra" not in declared.resources:
        declared.resources["slurm_extra"] = node_scratch_request(declared)
