"""Which device a GPU job uses: no quiet CPU fallback for a job given a GPU, one GPU slot per job, the index kept.

CPU only: where this machine has no CUDA, a job that was given a GPU must stop with the reason; two processes
sharing two (fake) GPU slots get different ones and a third waits; a `cuda:1` survives into mmengine's config.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nodulesynth.models.device import (SLOTS_VARIABLE, DeviceError, claim_gpu, gpu_request, job_device,
                                       local_gpu_count, pick_device, shares_gpus, visible_devices)

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a usable GPU")


@pytest.mark.parametrize("environ, asked", [
    ({}, None),
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),   # SLURM, in a job without GPUs
    ({SLOTS_VARIABLE: "0"}, None),
    ({"SLURM_GPUS_ON_NODE": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "1"}, "CUDA_VISIBLE_DEVICES=1"),
    ({"SLURM_JOB_GPUS": "3"}, "SLURM_JOB_GPUS=3"),
    ({SLOTS_VARIABLE: "2"}, f"{SLOTS_VARIABLE}=2: the workflow's gpu resource, 2 GPU(s) of this machine"),
])
def test_what_gives_a_job_a_gpu(environ, asked):
    assert gpu_request(environ) == asked


def test_visible_devices_and_the_gpus_a_local_run_shares(tmp_path):
    assert visible_devices({}) is None
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "-1"}) == []
    # The count the Snakefile registers as the `gpu` resource of a local run that gives none.
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert local_gpu_count({"PATH": str(tmp_path)}) == 0  # no driver, no nvidia-smi
    smi = tmp_path / "nvidia-smi"  # the driver's own listing, as a two-GPU machine prints it
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-a)'\necho 'GPU 1: NVIDIA H100 (UUID: GPU-b)'\n")
    smi.chmod(0o755)
    assert local_gpu_count({"PATH": str(tmp_path)}) == 2



@pytest.mark.parametrize("environ, shared", [
    ({}, True),                                                          # a local run without GPU slots set
    ({SLOTS_VARIABLE: "2"}, True),                                       # a local run sharing 2 GPUs
    # a local run inside `salloc --gpus=2`: its jobs share the allocation's GPUs, one slot each
    ({SLOTS_VARIABLE: "2", "SLURM_JOB_ID": "42", "SLURM_GPUS_ON_NODE": "2", "CUDA_VISIBLE_DEVICES": "0,1"}, True),
    # a job the SLURM executor submitted (srun's step, its own GPU)
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_STEP_GPUS": "3", "CUDA_VISIBLE_DEVICES": "0"}, False),
    ({"SLURM_JOB_ID": "42", SLOTS_VARIABLE: "0"}, False),
])
def test_a_job_shares_the_gpus_of_a_local_run_and_owns_those_slurm_gave_it(environ, shared):
    assert shares_gpus(environ) is shared


# The workflow read as Snakemake reads it in the main process and in a job the SLURM executor submitted (remote
# mode), on a host whose one GPU is visible and whose submitting environment passed slots on.
READ_WORKFLOW = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import OutputSettings, ResourceSettings, WorkflowSettings
    from snakemake_interface_executor_plugins.settings import ExecMode

    mode = ExecMode.REMOTE if sys.argv[2] == "remote" else ExecMode.DEFAULT
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        api.workflow(resource_settings=ResourceSettings(cores=1), workflow_settings=WorkflowSettings(exec_mode=mode),
                     snakefile=Path(sys.argv[1]) / "Snakefile", workdir=Path.cwd()).list_rules()
    print("slots:", os.environ.get(sys.argv[3]))
""")


@pytest.mark.parametrize("mode, slots", [("default", "1"), ("remote", "None")])
def test_a_job_slurm_submitted_claims_no_slot(tmp_path, mode, slots):
    """Each SLURM job reads the workflow again; there it must not set slots (which would make it queue for a
    lock on the node's GPU 0 behind a user's other jobs), and drops those inherited from the submitting host."""
    from conftest import REPO

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0", SLOTS_VARIABLE: "2",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", READ_WORKFLOW, str(REPO), mode, SLOTS_VARIABLE], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"slots: {slots}"

@needs_no_cuda
def test_auto_is_the_cpu_only_where_no_gpu_was_asked_for():
    """The demo and CI (no GPU, none asked): the CPU. A job given a GPU it cannot use: one line with the reason."""
    assert pick_device("auto", environ={}) == torch.device("cpu")
    assert pick_device("cpu", environ={"CUDA_VISIBLE_DEVICES": "0"}) == torch.device("cpu")  # on purpose
    for environ, named in (({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
                           ({"SLURM_STEP_GPUS": "1"}, "SLURM_STEP_GPUS=1"),
                           ({SLOTS_VARIABLE: "2"}, "gpu resource, 2 GPU(s)")):
        with pytest.raises(DeviceError) as refused:
            pick_device("auto", environ=environ)
        message = str(refused.value)
        assert named in message and f"torch {torch.__version__}" in message and "GPU drivers" in message
        assert "--device cpu" in message and "\n" not in message
    with pytest.raises(DeviceError, match="'cuda:1' requested but CUDA is not available"):
        pick_device("cuda:1", environ={})
    # A workflow job (the CLI's job_device): the same rules, and no GPU slot claimed for the CPU.
    assert job_device("auto", environ={}) == "cpu" == job_device("cpu", environ={SLOTS_VARIABLE: "2"})
    with pytest.raises(DeviceError, match="gpu resource, 2 GPU"):
        job_device("auto", environ={SLOTS_VARIABLE: "2"})


@needs_no_cuda
def test_cli_refuses_a_gpu_job_without_a_usable_gpu_in_one_line(tmp_path, monkeypatch, caplog):
    from nodulesynth.cli import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    code = main(["train-sdm", "--slices", str(tmp_path / "none.npz"), "--out-dir", str(tmp_path / "out")])
    assert code == 1 and not (tmp_path / "out").exists()
    assert any("this job was given a GPU (CUDA_VISIBLE_DEVICES=0)" in r.getMessage() for r in caplog.records)


CLAIMER = textwrap.dedent("""
    import sys, time
    from nodulesynth.models.device import DeviceError, claim_gpu
    try:
        slot = claim_gpu(2, sys.argv[1], timeout=float(sys.argv[2]), poll=0.1)
    except DeviceError as error:
        print("timeout:", error, flush=True)
        sys.exit(3)
    print(slot, flush=True)
    time.sleep(float(sys.argv[3]))
""")


def _claimer(lock_dir, timeout, hold):
    return subprocess.Popen([sys.executable, "-c", CLAIMER, str(lock_dir), str(timeout), str(hold)],
                            stdout=subprocess.PIPE, text=True)


def test_two_jobs_get_two_gpus_and_a_third_waits_for_one(tmp_path):
    """Two fake GPU slots: two processes hold slots 0 and 1 (so devices cuda:0 and cuda:1); a third cannot
    get one while they run and says so; once a holder exits (killed, even) its slot is free again."""
    first = _claimer(tmp_path, 5, 60)
    assert first.stdout.readline().strip() == "0"
    second = _claimer(tmp_path, 5, 60)
    assert second.stdout.readline().strip() == "1"
    third = _claimer(tmp_path, 0.5, 0)
    out, _ = third.communicate(timeout=30)
    assert third.returncode == 3 and "all 2 GPU slot(s) stayed held by other jobs" in out and str(tmp_path) in out
    waiting = _claimer(tmp_path, 30, 0)
    time.sleep(0.5)
    second.kill()  # no clean-up runs: the kernel releases its lock
    second.wait()
    assert waiting.communicate(timeout=30)[0].strip() == "1"
    first.kill()
    first.wait()
    # In this process: the lowest free slot, and the same slot again for a second ask.
    assert claim_gpu(2, tmp_path, timeout=0) == 0 == claim_gpu(2, tmp_path, timeout=0)
    with pytest.raises(ValueError, match="at least one slot, got 0"):
        claim_gpu(0, tmp_path)


def test_the_device_index_survives_into_mmengine_config(tmp_path):
    """A job on GPU 1 trains on GPU 1: mmlab used to turn `cuda:1` into `cuda` (GPU 0)."""
    from nodulesynth.downstream import mmlab
    from nodulesynth.downstream.localization import LocalizationOptions, build_config

    cfg = build_config(LocalizationOptions(), 64, tmp_path / "coco", tmp_path, device="cuda:1")
    assert cfg.device == "cuda:1" and cfg.optim_wrapper.type == "AmpOptimWrapper"
    assert mmlab.optim_wrapper("cpu", {})["type"] == "OptimWrapper"
    if torch.cuda.device_count() > 1:  # on a machine with two GPUs: the index is kept and made current
        assert mmlab.resolve_device("cuda:1") == "cuda:1" and torch.cuda.current_device() == 1
