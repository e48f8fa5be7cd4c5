"""nodulesynth.cluster: the container binds, partition check and scratch request that rules/cluster.smk
applies (the workflow and SLURM tests run them end to end: tests/test_slurm.py)."""

import os

import pytest

from nodulesynth import cluster
from nodulesynth.errors import InputError


def test_data_binds_cover_folders_outside_the_working_directory_once(tmp_path):
    data, work = tmp_path / "data", tmp_path / "work"
    (data / "dicom").mkdir(parents=True)
    (data / "tables").mkdir()
    (work / "inside").mkdir(parents=True)
    (work / "linked").symlink_to(data)
    real = os.path.realpath
    cohort = {"lidc_root": "inside", "dicom_root": "linked/dicom", "annotations": str(data / "tables" / "a.csv")}
    # Inside: not bound (Snakemake binds the working directory). A link inside leading out: at its target, where
    # the link leads inside the container too. Outside: at the path the commands use.
    assert cluster.data_binds(cohort, work) == [f"{real(data / 'dicom')}:{real(data / 'dicom')}:ro",
                                                f"{real(data / 'tables')}:{data / 'tables'}:ro"]
    # The same folder twice is bound once; an absent one is left to the cohort step, whose error names it.
    twice = {"lidc_root": str(data / "dicom"), "dicom_root": str(data / "dicom")}
    assert len(cluster.data_binds(twice, work)) == 1
    assert cluster.data_binds({"dicom_root": str(tmp_path / "absent")}, work) == []
    # LUNA16's list of excluded findings, in a folder of its own, is bound too.
    (data / "evaluation").mkdir()
    listed = {"annotations_excluded": str(data / "evaluation" / "annotations_excluded.csv")}
    assert cluster.data_binds(listed, work) == [f"{real(data / 'evaluation')}:{data / 'evaluation'}:ro"]
    assert cluster.data_binds({}, work) == []


def test_data_binds_refuse_a_folder_apptainer_cannot_bind(tmp_path):
    odd = tmp_path / "scans:2024"
    odd.mkdir()
    (tmp_path / "work").mkdir()
    with pytest.raises(InputError, match=r"'.*scans:2024' holds ':' or ','"):
        cluster.data_binds({"dicom_root": str(odd)}, tmp_path / "work")


def test_binds_join_the_apptainer_arguments_once():
    args = cluster.with_binds("--nv", ["/data/a:/data/a:ro", "/data/b c:/data/b c:ro"])
    assert args == "--nv --bind /data/a:/data/a:ro --bind '/data/b c:/data/b c:ro'"
    # A job's Snakemake is handed the submitting run's arguments and parses the workflow again: nothing is added.
    assert cluster.with_binds(args, ["/data/a:/data/a:ro", "/data/b c:/data/b c:ro"]) == args
    assert cluster.with_binds(None, []) is None
    assert cluster.with_binds(None, ["/d:/d:ro"]) == "--bind /d:/d:ro"


def test_partition_check_names_what_the_cluster_lacks(tmp_path):
    path = tmp_path / "partitions.yaml"
    path.write_text("partitions:\n  cpu: {max_runtime: 60}\n  gpu: {max_gpu: 1}\n")
    cluster.check_partitions(path, ["cpu", "gpu", "debug"])  # a cluster whose partitions are called so passes
    with pytest.raises(InputError, match=r"partitions.yaml names partition\(s\) gpu that this cluster does not "
                                         r"have \(sinfo lists: batch, cpu\)"):
        cluster.check_partitions(path, ["cpu", "batch"])
    path.write_text("- not a mapping\n")
    with pytest.raises(InputError, match="partitions.yaml: not a partition file"):
        cluster.check_partitions(path, ["cpu"])


def test_partition_listing_without_slurm_says_so(tmp_path, monkeypatch):
    # With a cluster, sinfo's list is compared (tests/test_slurm.py, the placeholder partitions).
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InputError, match=r"cannot list the cluster's partitions \(sinfo\)"):
        cluster.cluster_partitions()


def test_scratch_request_only_for_a_disk_size():
    assert cluster.scratch_request(4096) == "--tmp=4096"
    assert cluster.scratch_request(None) is None
    assert cluster.scratch_request("4 GB") is None  # a string disk resource is Snakemake's to convert, not sbatch's


def test_a_runtime_above_every_partitions_limit_is_cut_to_the_longest_that_can_take_the_job(tmp_path):
    """snakemake-executor-plugin-slurm sends a job no partition of its partition file fits to the cluster's default
    partition: an SDM training asking 67 h where the GPU partitions allow 48 would go to a CPU partition. The rules'
    runtime is cut to the longest a partition that can take the job (by the plugin's own fit, runtime aside)
    allows: the trainings and sampling resume, so the next attempt goes on where the cut one stopped."""
    import yaml

    path = tmp_path / "partitions.yaml"
    path.write_text(yaml.safe_dump({"partitions": {
        "short": {"max_runtime": 240},
        "long": {"max_runtime": "3-00:00:00", "max_mem_mb": 64000},
        "gpu": {"max_runtime": 1440, "max_gpu": 4, "max_mem_mb": 256000},
        "gpu-long": {"max_runtime": "2-00:00:00", "max_gpu": 8, "max_mem_mb": 64000,
                     "available_gpu_models": ["v100"]},
        "other-cluster": {"max_runtime": 99999, "max_gpu": 8, "cluster": "elsewhere"},  # jobs name no cluster
    }}))
    assert cluster.runtime_limit(path, {"mem_mb": 8000}) == 3 * 24 * 60
    assert cluster.runtime_limit(path, {"mem_mb": 128000}) == 1440  # "long" lacks the memory
    assert cluster.runtime_limit(path, {"mem_mb": 512000}) == 240  # "short" sets no memory limit
    assert cluster.runtime_limit(path, {"gpu": 1, "mem_mb": 16000}, threads=8) == 2 * 24 * 60
    assert cluster.runtime_limit(path, {"gpu": 8, "mem_mb": 16000}) == 2 * 24 * 60
    assert cluster.runtime_limit(path, {"gpu": 1, "mem_mb": 128000}) == 1440  # gpu-long has too little memory
    assert cluster.runtime_limit(path, {"gpu": 1, "gpu_model": "a100"}) == 1440  # and only V100s
    assert cluster.runtime_limit(path, {"gpu": 16}) is None  # none takes it: left to the plugin to report
    assert cluster.runtime_limit(path, {"gpu": 1, "runtime": 4043}) == 2 * 24 * 60  # its own runtime aside
    assert cluster.capped_runtime(4043, 2880) == 2880 and cluster.capped_runtime(60, 2880) == 60
    assert cluster.capped_runtime(4043, None) == 4043
    path.write_text(yaml.safe_dump({"partitions": {"gpu": {"max_gpu": 4}, "cpu": {"max_runtime": 60}}}))
    assert cluster.runtime_limit(path, {"gpu": 1}) is None  # no limit given: nothing to cut to
    assert cluster.runtime_limit(path, {}) is None
