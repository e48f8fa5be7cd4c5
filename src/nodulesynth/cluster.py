"""What a run outside plain local processes needs, decided here and applied by rules/cluster.smk: the data
folders bound into Apptainer containers, the SLURM partitions checked against the cluster, node-local
scratch asked of sbatch, and runtimes within the partitions' limits. Pure functions of their arguments (no
Snakemake objects), so they are tested alone."""

import math
import os
import shlex
import subprocess
from pathlib import Path

import yaml

from nodulesynth.errors import InputError


def data_binds(cohort: dict, working_dir) -> list[str]:
    """Apptainer `SRC:DST:ro` bind specs for the cohort's configured input folders (cohort.lidc_root,
    cohort.dicom_root, the folders of cohort.annotations and annotations_excluded) that a container would not see: Snakemake binds only
    the working directory. A folder outside it is bound at the path the commands use (its real folder behind
    any link); a link inside it that leads out is bound at its target, where the link leads inside the
    container too. Absent folders are left to the cohort step, whose error names them."""
    working_dir = os.path.realpath(working_dir)
    folders = [cohort.get("lidc_root"), cohort.get("dicom_root")]
    for table in ("annotations", "annotations_excluded"):
        if cohort.get(table):
            folders.append(os.path.dirname(os.path.join(working_dir, cohort[table])))
    binds = []
    for folder in filter(None, folders):
        used = os.path.normpath(os.path.join(working_dir, folder))
        real = os.path.realpath(used)
        if not os.path.isdir(real) or Path(real).is_relative_to(working_dir):
            continue
        target = real if Path(used).is_relative_to(working_dir) else used
        if any(c in real + target for c in ":,"):
            raise InputError(
                f"cohort: {folder!r} holds ':' or ',', which Apptainer's --bind cannot take: "
                "link the folder from a path without them and configure that"
            )
        spec = f"{real}:{target}:ro"
        if spec not in binds:
            binds.append(spec)
    return binds


def with_binds(apptainer_args: str | None, binds: list[str]) -> str | None:
    """`apptainer_args` (the profiles' `apptainer-args`) with a `--bind` option for each spec not yet there.
    Idempotent: a SLURM job's Snakemake is handed the submitting run's arguments, binds included, and parses
    the workflow again."""
    present = shlex.split(apptainer_args or "")
    added = [f"--bind {shlex.quote(spec)}" for spec in binds if spec not in present]
    return " ".join(filter(None, [apptainer_args, *added])) if added else apptainer_args


def partition_names(path) -> list[str]:
    """The partitions a slurm-partition-config file (profiles/slurm/partitions.yaml) names."""
    try:
        return list((yaml.safe_load(Path(path).read_text()) or {}).get("partitions") or {})
    except (OSError, yaml.YAMLError, AttributeError) as err:
        raise InputError(f"{path}: not a partition file with a `partitions:` mapping ({err})") from None


def cluster_partitions() -> list[str]:
    """The partitions `sinfo` lists on this cluster."""
    try:
        return subprocess.run(
            ["sinfo", "--noheader", "--format=%R"], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as err:
        raise InputError(f"cannot list the cluster's partitions (sinfo): {err}") from None


def check_partitions(path, listed: list[str]) -> None:
    """Refuse a partition file that names a partition the cluster does not list: profiles/slurm/partitions.yaml
    ships with placeholder names (cpu, gpu) to be replaced by the cluster's. Comparing with the cluster's list
    rather than looking for the placeholders also catches a typo, and passes a cluster whose partitions really
    are called cpu and gpu."""
    unknown = [name for name in partition_names(path) if name not in listed]
    if unknown:
        raise InputError(
            f"{path} names partition(s) {', '.join(unknown)} that this cluster does not have "
            f"(sinfo lists: {', '.join(sorted(set(listed))) or 'none'}). Put your cluster's partition names and "
            "limits there (`scontrol show partition`); nothing was submitted."
        )


def scratch_request(disk_mb) -> str | None:
    """The sbatch option asking for `disk_mb` of node-local scratch ($TMPDIR), or None where none is set.
    snakemake-executor-plugin-slurm 2.8 passes mem_mb, runtime, threads and gpu to sbatch but not disk_mb,
    so without it a job that stages data in $TMPDIR (the generators) may land on a node without the room."""
    return f"--tmp={disk_mb}" if isinstance(disk_mb, int) and not isinstance(disk_mb, bool) else None


def runtime_limit(partition_file, resources: dict, threads: int = 1) -> int | None:
    """The longest runtime (minutes) that a partition of the SLURM plugin's partition file able to take a job of
    these `resources` and `threads` allows: the partitions the plugin's own fit (Partition.score_job_fit: GPUs,
    GPU model, memory, CPUs, constraints, cluster) accepts for the job with its runtime left out. None where one
    of them sets no limit, or none can take the job (left to the plugin to report)."""
    from types import SimpleNamespace

    from snakemake_executor_plugin_slurm.partitions import read_partition_file

    job = SimpleNamespace(name="runtime limit", threads=threads,
                          resources={name: value for name, value in resources.items() if name != "runtime"})
    limits = [p.limits.max_runtime for p in read_partition_file(Path(partition_file))
              if p.score_job_fit(job) is not None]
    if not limits or any(math.isinf(limit) for limit in limits):
        return None
    return int(max(limits))


def capped_runtime(minutes, limit):
    """A job's runtime (minutes) cut to `limit` (runtime_limit; None: none). snakemake-executor-plugin-slurm 2.8
    sends a job that asks for more than every partition allows to the cluster's default partition, where a GPU
    job finds no GPU, or that refuses or holds it (PartitionTimeLimit). The trainings and sampling resume where a
    killed attempt stopped, so the rules' retries finish a job cut at the limit. A value not yet known (a
    dry run's TBD) passes as it is."""
    if limit is None or isinstance(minutes, bool) or not isinstance(minutes, (int, float)):
        return minutes
    return min(int(minutes), int(limit))
