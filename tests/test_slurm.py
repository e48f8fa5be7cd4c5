"""SLURM, tested for real: a one-node cluster on localhost (Debian's `slurm-wlm` and `munge`) runs the data
rules (cohort, ingest, masks, qc, manifest) of a 12-scan DICOM cohort through `--executor slurm` with
profiles/slurm and `--use-singularity` (the recording stand-in `apptainer`, tests/standins/apptainer).

The test starts munged, slurmctld and slurmd itself, with their own key, sockets, ports, state and logs in one
temporary folder (SLURM_CONF points there; no system configuration is written), and stops each by its PID.
It checks that the per-scan rules went out as a few grouped submissions and every other job as its own, each
with its resources, `--tmp` and the partition the profile chose; that the containers were given the data
folders; that placeholder partition names stop a run before anything is submitted; and that the outputs
equal a local run's. Skipped, saying why, where SLURM is not installed.
"""

import base64
import getpass
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from nodulesynth.models.sdm.options import SDMOptions

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
CONF_TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf"
STANDINS = Path(__file__).parent / "standins"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
# What only this test cluster needs, on top of profiles/slurm. There is no accounting database (slurmdbd),
# so `sacct` knows no jobs and the plugin's default sacct polling would wait forever: poll squeue instead
# (MinJobAge keeps finished jobs visible to it). No account to charge. Short waits: a local disk.
TEST_PROFILE = {
    "slurm-status-command": "squeue",
    # Plugin 2.8.0 defines but does not read this flag: with no account given it asks sacct for one, which
    # fails at once here ("accounting storage is disabled"), and submits without -A. Kept to say the intent.
    "slurm-no-account": True,
    "slurm-init-seconds-before-status-checks": 2,
    "slurm-keep-successful-logs": True,
    "latency-wait": 5,
    "jobs": 4,
    # 12 scans in groups of 4 (3 submissions, the LIDC profile's 40 would make one), 2 at once on this
    # 2-CPU node.
    "group-components": {"scan": 4},
    "resources": {"scan_jobs": 2},
}
# The test cluster's partitions: profiles/slurm/partitions.yaml's placeholders (cpu, gpu) renamed, as a user
# puts their cluster's names there; the placeholders themselves must stop a run (test_placeholder_partitions_...).
TEST_PARTITION_PREFIX = "nstest-"
N_SCANS = 12
RUN_TIMEOUT_S = 900  # a hung status poll fails the test instead of hanging CI


def missing_slurm():
    """Why the real-cluster test cannot run here, or None."""
    absent = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if absent:
        return f"SLURM/munge not installed (apt-get install slurm-wlm munge): no {', '.join(absent)}"
    if os.geteuid() != 0:
        return "the one-node test cluster runs slurmd as root (SlurmUser=root); run the tests as root"
    return None


# ---------------------------------------------------------------------------------------------- the profile

def load_profile(path=PROFILE):
    profile = yaml.safe_load(Path(path).read_text())
    if not isinstance(profile, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return profile


def profile_partitions(profile, profile_dir=PROFILE.parent):
    """The partitions the profile's `slurm-partition-config` describes: name -> limits."""
    path = profile_dir / profile["slurm-partition-config"]
    partitions = (yaml.safe_load(path.read_text()) or {}).get("partitions")
    if not partitions:
        raise ValueError(f"{path}: no `partitions:` mapping")
    return partitions


def gpu_rules():
    """Rules whose `resources:` ask for GPUs, read from rules/*.smk: name -> count."""
    found = {}
    for path in sorted((REPO / "rules").glob("*.smk")):
        blocks = re.split(r"^(?:rule|checkpoint) (\w+):\s*$", path.read_text(), flags=re.M)
        for name, body in zip(blocks[1::2], blocks[2::2]):
            # train_generator asks for sdm.gpus for the SDM (generator_gpus; schema default 1): counted at 1 here.
            gpu = re.search(r"^\s+gpu\s*=\s*(\d+|generator_gpus)", body, flags=re.M)
            count = gpu and (int(gpu.group(1)) if gpu.group(1).isdigit() else SDMOptions().gpus)
            if count:
                found[name] = count
    return found


def test_profile_chooses_partitions_from_the_rules_resources():
    profile = load_profile()
    assert profile["executor"] == "slurm"
    partitions = profile_partitions(profile)
    gpu = gpu_rules()
    assert {"train_generator", "sample_generator", "downstream_model", "realism"} <= set(gpu)
    # The plugin sends a GPU rule only to a partition with max_gpu, and prefers one without for the others.
    assert any(limits.get("max_gpu", 0) >= max(gpu.values()) for limits in partitions.values()), partitions
    assert any(not limits.get("max_gpu") for limits in partitions.values()), partitions
    # A fixed partition, or a per-rule mem_mb, runtime or gpu here, would override what the rules declare.
    assert "slurm_partition" not in (profile.get("default-resources") or {})
    for rule, resources in (profile.get("set-resources") or {}).items():
        assert not {"slurm_partition", "mem_mb", "runtime", "gpu", "cpus_per_task", "gres"} & set(resources), rule


def test_snakemake_accepts_the_profile(tmp_path):
    """Every key of profiles/slurm must be an option Snakemake 9 and the installed SLURM plugin know."""
    proc = snakemake(tmp_path, "--workflow-profile", str(PROFILE.parent), "--dry-run", "results/cohort/scans.tsv",
                     "--configfile", str(REPO / "config.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^cohort\s+1$", proc.stdout + proc.stderr, flags=re.M)


# ---------------------------------------------------------------------------------------------- the cluster

@dataclass
class Cluster:
    root: Path
    env: dict
    processes: dict = field(default_factory=dict)  # daemon name -> Popen, in start order

    def run(self, *cmd, timeout=20):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log_tail(self, name, lines=30):
        path = self.root / "log" / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware():
    """This machine's CPUs, topology and memory as slurmd itself detects them (`slurmd -C`)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0] if out else ""))
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    if not all(k in fields for k in keys):
        raise RuntimeError(f"`slurmd -C` gave no node description: {out!r}")
    return {k: fields[k] for k in keys}


def cluster_partitions():
    """profiles/slurm's partitions under the test cluster's names: name -> limits."""
    return {TEST_PARTITION_PREFIX + name: limits for name, limits in profile_partitions(load_profile()).items()}


def write_cluster_config(root, partitions):
    """slurm.conf (from tests/slurm/slurm.conf), gres.conf and an empty plugstack.conf in `root`."""
    host = socket.gethostname().split(".")[0]
    hardware = node_hardware()
    # Node-local scratch for `--tmp` requests: what the file system holding TmpFS (/tmp) has, as slurmd
    # measures it (a node configured with more is drained); slurmd -C does not report it.
    hardware["TmpDisk"] = shutil.disk_usage("/tmp").total // 2**20
    lines = [f"PartitionName={name} Nodes={host} MaxTime=INFINITE State=UP" + (" Default=YES" if i == 0 else "")
             for i, name in enumerate(partitions)]
    conf = string.Template(CONF_TEMPLATE.read_text()).substitute(
        root=root, host=host, ctld_port=free_port(), slurmd_port=free_port(),
        hardware=" ".join(f"{k}={v}" for k, v in hardware.items()), partitions="\n".join(lines))
    (root / "slurm.conf").write_text(conf)
    (root / "gres.conf").write_text("Name=gpu File=/dev/null\n")  # read from slurm.conf's folder
    (root / "plugstack.conf").write_text("")
    return host, hardware


def write_srun_passthrough(root):
    """A folder holding `srun` that runs the real srun with SLURM_CONF set again.

    Inside each job, snakemake-executor-plugin-slurm-jobstep (0.6.1) starts the rule with `srun` after
    dropping every SLURM_* variable, SLURM_CONF included: srun then finds no configuration on a cluster
    configured only through SLURM_CONF, as this one is (a real cluster has /etc/slurm/slurm.conf). This
    restores the one variable; what runs is still the real srun, step and all."""
    folder = root / "bin"
    folder.mkdir()
    srun = folder / "srun"
    srun.write_text(f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(root / "slurm.conf"))} exec {shutil.which("srun")} "$@"\n')
    srun.chmod(0o755)
    return folder


def wait_for(check, what, cluster, timeout=40):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n"
                                   f"{cluster.log_tail(name)}")
        try:
            if check():
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
    logs = "\n".join(f"--- {name}\n{cluster.log_tail(name)}" for name in cluster.processes)
    raise RuntimeError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def start(cluster, name, cmd):
    # Foreground daemons (-F / -D) are this process's children: their PIDs are known and theirs alone to stop.
    out = open(cluster.root / "log" / f"{name}.out", "w")
    cluster.processes[name] = subprocess.Popen(cmd, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
    out.close()


def stop(proc, grace=15):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def start_cluster(cluster, host):
    root = cluster.root
    munge_dir = root / "munge"  # munged wants its socket's folder open to all, its key private
    munge_dir.mkdir(mode=0o755)
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    os.write(fd, os.urandom(1024))
    os.close(fd)
    socket_path = munge_dir / "munge.socket"
    start(cluster, "munged", ["munged", "-F", f"--key-file={key}", f"--socket={socket_path}",
                              f"--pid-file={munge_dir / 'munged.pid'}", f"--seed-file={munge_dir / 'munged.seed'}",
                              f"--log-file={root / 'log' / 'munged.log'}"])
    wait_for(lambda: cluster.run("munge", "-n", "-S", str(socket_path), timeout=5).returncode == 0,
             "munged", cluster)
    start(cluster, "slurmctld", ["slurmctld", "-D"])
    wait_for(lambda: "UP" in cluster.run("scontrol", "ping", timeout=5).stdout, "slurmctld", cluster)
    start(cluster, "slurmd", ["slurmd", "-D", "-N", host])
    wait_for(lambda: cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=5).stdout.split() == ["idle"]
             * len(cluster.run("sinfo", "-h", "-N", "-o", "%P", timeout=5).stdout.split()), "the node idle", cluster)


def cancel_jobs(cluster):
    """Cancel what is still queued or running, and give slurmd the time to end the job steps it started."""
    cluster.run("scancel", "--user", getpass.getuser(), timeout=10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and cluster.run("squeue", "-h", "-t", "PD,R,CG,S", timeout=10).stdout.strip():
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    reason = missing_slurm()
    if reason:
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="nodulesynth-slurm-"))  # not under pytest's 0700 tmp: munged checks
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}  # not a job of an outer cluster
    env.update(SLURM_CONF=str(root / "slurm.conf"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cluster = Cluster(root, env)
    try:
        root.chmod(0o755)
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        env["PATH"] = f"{write_srun_passthrough(root)}{os.pathsep}{env['PATH']}"
        partitions = cluster_partitions()  # CPU partitions first: the first is the default
        host, _ = write_cluster_config(root, sorted(partitions, key=lambda p: bool(partitions[p].get("max_gpu"))))
        start_cluster(cluster, host)
        yield cluster
    finally:
        try:
            if "slurmctld" in cluster.processes and cluster.processes["slurmctld"].poll() is None:
                cancel_jobs(cluster)
        finally:
            for proc in reversed(list(cluster.processes.values())):  # slurmd, slurmctld, munged: each by PID
                stop(proc)
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- the runs

def snakemake(workdir, *args, env=None, timeout=RUN_TIMEOUT_S):
    env = env or dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--nocolor", *args]
    try:
        return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        raise AssertionError(f"snakemake ran past {timeout} s:\n{out[-4000:]}") from err


def checked(proc):
    assert proc.returncode == 0, f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def cohort_config(path, data):
    """The demo config on a 12-scan DICOM cohort written to `data`, outside every working directory (so the
    containers must be given it), its annotations in a folder of their own; the data rules' image is a
    placeholder file (the stand-in apptainer only checks that it exists)."""
    from nodulesynth.data.demo import write_demo_cohort

    write_demo_cohort(data / "export", n_scans=N_SCANS, image_size=64)
    (data / "tables").mkdir()
    shutil.move(data / "export" / "annotations.csv", data / "tables" / "annotations.csv")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["cohort"].update(source="dicom", dicom_root=str(data / "export" / "dicom"),
                            annotations=str(data / "tables" / "annotations.csv"))
    config["folds"]["k"] = 2
    # The GPU rule the SLURM run adds: 2 steps on the CPU (SLURM's GPU here is /dev/null), 2 loader threads.
    config["generators"].update(device="cpu", threads=2)
    config["sdm"].update(max_steps=2, checkpoint_every=2, log_every=2)
    for group in ("data", "generators"):
        config["containers"][group] = str(data / f"{group}.sif")
        (data / f"{group}.sif").write_text("placeholder image\n")
    path.write_text(yaml.safe_dump(config))
    return path


def write_test_profile(folder, partitions=True, gpu_runtime=None):
    """profiles/slurm with the settings only the test cluster needs (TEST_PROFILE) and, unless `partitions` is
    False, the test cluster's partition names in its partitions.yaml; `gpu_runtime`: the GPU partitions'
    max_runtime there instead of the profile's."""
    shutil.copytree(PROFILE.parent, folder)
    profile = load_profile()
    profile.update(TEST_PROFILE)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    if partitions:
        limits = cluster_partitions()
        for partition in limits.values():
            if gpu_runtime is not None and partition.get("max_gpu"):
                partition["max_runtime"] = gpu_runtime
        (folder / profile["slurm-partition-config"]).write_text(yaml.safe_dump({"partitions": limits}))
    return folder


def submissions(cluster):
    """The job ids slurmctld logged a batch submission for, in order."""
    return re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", (cluster.root / "log" / "slurmctld.log").read_text())


def submitted_jobs(log):
    """Snakemake's own record of the jobs it ran: (rule, wildcard values) -> resources as printed."""
    jobs = {}
    # One block per job, from its `rule NAME:` line (indented within a group job's record) to the next.
    for block in re.split(r"(?=^\s*(?:local)?(?:rule|checkpoint) \w+:\s*$)", log, flags=re.M):
        head = re.search(r"^\s*(?:local)?(?:rule|checkpoint) (\w+):\s*$", block, flags=re.M)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if not (head and res):
            continue
        wild = re.search(r"^\s+wildcards: (.*)$", block, flags=re.M)
        values = tuple(kv.split("=", 1)[1] for kv in wild.group(1).split(", ")) if wild else ()
        threads = re.search(r"^\s+threads: (\d+)$", block, flags=re.M)
        resources = dict(kv.split("=", 1) for kv in res.group(1).split(", "))
        resources["threads"] = threads.group(1) if threads else "1"
        jobs[head.group(1), values] = resources
    return jobs


def slurm_jobs(cluster):
    """slurmctld's record of every job it was given (kept MinJobAge s after it ends)."""
    out = cluster.run("scontrol", "show", "job", "-o").stdout
    jobs = []
    for line in out.splitlines():
        if line.startswith("JobId="):
            jobs.append(dict(token.split("=", 1) for token in line.split(" ") if "=" in token))
    return jobs


def megabytes(memory):
    """SLURM's memory with its unit (3000M, 4G) as MB."""
    return int(float(memory[:-1]) * {"M": 1, "G": 1024, "T": 1024 ** 2}[memory[-1]])


def minutes(limit):
    """SLURM's [D-]HH:MM:SS as minutes."""
    days, _, clock = limit.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + s / 60


def sbatch_calls(log):
    """The sbatch command lines the plugin ran, from its debug log (--verbose), as lists of words."""
    return [shlex.split(line) for line in re.findall(r"sbatch call: (sbatch .*)$", log, flags=re.M)]


def option(words, name):
    """The value of `name VALUE` or `name=VALUE` among `words`, or None."""
    for i, word in enumerate(words):
        if word == name:
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def apptainer_args(words):
    """The `--apptainer-args` that a submitted job's Snakemake is given (base64, as Snakemake passes them)."""
    value = option(shlex.split(option(words, "--wrap")), "--apptainer-args")
    assert value.startswith("base64//"), value
    return base64.b64decode(value[len("base64//"):]).decode()


GPU_TARGETS = ("results/generators/sdm/holdout/model.pt", "results/generators/spade/holdout/model.pt")
# The GPU partitions' max_runtime in the run's partition file (the slurm.conf allows any): below what the GPU jobs
# ask for (nodulesynth.resources: their start-up, GPU_START_MINUTES, plus twice their estimate), as a 48-hour GPU
# partition is below an SDM training's 67 hours at the study's defaults.
GPU_RUNTIME_LIMIT = 10


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The cohort's data rules run locally, then through SLURM in containers in a fresh folder, with two GPU
    jobs (train_generator: the holdout SDM, 2 steps, and SPADE, on the CPU) after them, submitted from a
    machine whose driver lists one GPU (CUDA_VISIBLE_DEVICES=0), as a login node with a GPU."""
    config = cohort_config(tmp_path_factory.mktemp("config") / "config.yaml", tmp_path_factory.mktemp("data"))
    local = tmp_path_factory.mktemp("local")
    first = checked(snakemake(local, "results/cohort/manifest.tsv", "--configfile", str(config)))
    scans = pd.read_csv(local / "results/cohort/scans.tsv", sep="\t", dtype=str).scan_id.tolist()
    assert len(scans) == N_SCANS
    targets = ["results/cohort/manifest.tsv"] + [f"results/qc/{scan}.png" for scan in scans]
    second = checked(snakemake(local, *targets, "--configfile", str(config)))
    local_log = "\n\n".join(p.stdout + p.stderr for p in (first, second))

    work = tmp_path_factory.mktemp("slurm")
    profile = write_test_profile(work / "test-profile", gpu_runtime=GPU_RUNTIME_LIMIT)
    apptainer_log = work / "apptainer.log"
    env = dict(cluster.env, PATH=f"{STANDINS}{os.pathsep}{cluster.env['PATH']}",
               APPTAINER_STANDIN_LOG=str(apptainer_log), CUDA_VISIBLE_DEVICES="0")
    before = set(submissions(cluster))
    proc = checked(snakemake(work, *targets, *GPU_TARGETS, "--executor", "slurm",
                             "--workflow-profile", str(profile), "--configfile", str(config), "--use-singularity",
                             "--verbose", env=env))
    submitted = [job for job in submissions(cluster) if job not in before]
    jobs = [job for job in slurm_jobs(cluster) if job["JobId"] in submitted]
    log = proc.stdout + proc.stderr
    return SimpleNamespace(local=local, work=work, local_log=local_log, log=log, scans=scans,
                           config=yaml.safe_load(config.read_text()), submitted=submitted, jobs=jobs,
                           calls=sbatch_calls(log), apptainer_log=apptainer_log)


def test_placeholder_partitions_stop_the_run_before_any_submission(cluster, tmp_path):
    """profiles/slurm/partitions.yaml as shipped names partitions (cpu, gpu) this cluster does not have."""
    profile = write_test_profile(tmp_path / "test-profile", partitions=False)
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    before = submissions(cluster)
    proc = snakemake(tmp_path, "results/cohort/scans.tsv", "--executor", "slurm", "--workflow-profile", str(profile),
                     "--configfile", str(tmp_path / "config.yaml"), env=cluster.env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    placeholders = ", ".join(profile_partitions(load_profile()))
    assert f"{profile / 'partitions.yaml'} names partition(s) {placeholders} that this cluster does not have" in out, \
        out[-3000:]
    assert submissions(cluster) == before, "a job was submitted"


def test_containers_bind_the_data_folders_that_lie_outside_the_working_directory(tmp_path):
    """Without SLURM too: a folder outside is bound at its path, a link inside that leads out at its target, a
    folder inside is not (Snakemake binds the working directory); read-only, each once."""
    from nodulesynth.data.demo import write_demo_cohort

    data, work = tmp_path / "data", tmp_path / "work"
    write_demo_cohort(data / "export", n_scans=1, image_size=32)
    (data / "tables").mkdir()
    shutil.move(data / "export" / "annotations.csv", data / "tables" / "annotations.csv")
    (data / "data.sif").write_text("placeholder image\n")
    (work / "inside").mkdir(parents=True)
    (work / "linked").symlink_to(data / "export")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["cohort"].update(source="dicom", dicom_root="linked/dicom", lidc_root="inside",
                            annotations=str(data / "tables" / "annotations.csv"))
    config["containers"]["data"] = str(data / "data.sif")
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "apptainer.log"
    env = dict(os.environ, PATH=f"{STANDINS}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               APPTAINER_STANDIN_LOG=str(log))
    checked(snakemake(work, "results/cohort/scans.tsv", "--configfile", str(work / "config.yaml"),
                      "--use-singularity", env=env))
    [argv] = [record["argv"][1:] for record in map(json.loads, log.read_text().splitlines())
              if record["argv"][1] == "exec"]
    # Snakemake binds its source cache itself.
    binds = [value for name, value in zip(argv, argv[1:]) if name == "--bind" and value.startswith(str(tmp_path))]
    real = os.path.realpath
    assert binds == [f"{real(data / 'export' / 'dicom')}:{real(data / 'export' / 'dicom')}:ro",
                     f"{real(data / 'tables')}:{data / 'tables'}:ro"], binds
    assert len(pd.read_csv(work / "results/cohort/scans.tsv", sep="\t")) == 1  # the cohort was read through them


PER_SCAN_RULES = ("ingest", "masks", "qc")


def test_profile_sends_lidc_per_scan_rules_in_a_few_dozen_submissions():
    """The shipped arithmetic (profiles/slurm, README): LIDC-IDRI's 1,018 scans in groups of group-components."""
    profile = load_profile()
    text = (REPO / "rules" / "cohort.smk").read_text()
    for rule in PER_SCAN_RULES:
        body = re.search(rf"^rule {rule}:\n((?:[ \t]+.*\n|\n)+)", text, flags=re.M).group(1)
        assert re.search(r"^    group:\n        scan_group$", body, flags=re.M), f"rule {rule} is not grouped by scan"
        assert profile["set-resources"][rule]["scan_jobs"] == 1
    assert math.ceil(1018 / profile["group-components"]["scan"]) == 26  # against 3 x 1,018 = 3,054 ungrouped
    # scan_jobs bounds each group's request, not the run: a local scope.
    assert profile["set-resource-scopes"]["scan_jobs"] == "local" and profile["resources"]["scan_jobs"] > 1


def group_request(rules, scans, at_once):
    """What one group submission asks for, by profiles/slurm's arithmetic: `at_once` chains side by side (CPUs
    and memory of the largest step, times at_once), ceil(scans / at_once) rounds of the three steps' runtimes."""
    return {"cpus": at_once * max(int(r["threads"]) for r in rules.values()),
            "mem_mb": at_once * max(int(r["mem_mb"]) for r in rules.values()),
            "runtime": math.ceil(scans / at_once) * sum(int(r["runtime"]) for r in rules.values())}


def test_per_scan_rules_went_out_in_a_few_grouped_submissions(slurm_run):
    printed = submitted_jobs(slurm_run.log)
    # The local run's jobs (ingest, masks and qc one by one: a local run ignores groups), and the GPU jobs.
    local = submitted_jobs(slurm_run.local_log)
    gpu_jobs = {("train_generator", (generator, "holdout")) for generator in ("sdm", "spade")}
    assert set(printed) == set(local) | {("folds", ())} | gpu_jobs, sorted(printed)
    assert "Group job" not in slurm_run.local_log and "Group job scan0" in slurm_run.log
    assert not re.search(r"^local(rule|checkpoint) ", slurm_run.log, flags=re.M), "a job ran outside SLURM"

    per_group, at_once = TEST_PROFILE["group-components"]["scan"], TEST_PROFILE["resources"]["scan_jobs"]
    calls = sbatch_calls(slurm_run.log)
    assert len(calls) == len(slurm_run.submitted) == len(slurm_run.jobs)  # nothing else was submitted
    groups = [words for words in calls if "/group_scan" in option(words, "--output")]
    singles = [words for words in calls if words not in groups]
    # 12 scans x 3 steps in ceil(12 / 4) = 3 submissions; cohort, manifest, folds one each, the two GPU jobs.
    assert len(groups) == math.ceil(N_SCANS / per_group) and len(singles) == 5

    rules = {rule: printed[rule, (slurm_run.scans[0],)] for rule in PER_SCAN_RULES}
    request = group_request(rules, per_group, at_once)
    ran, blocks = [], []
    for words in groups:
        assert option(words, "--cpus-per-task") == str(request["cpus"]), words
        assert option(words, "--mem") == str(request["mem_mb"]) and option(words, "-t") == str(request["runtime"])
        assert option(words, "--tmp") is None  # grouped jobs ask for no node scratch (rules/cluster.smk)
        inner = shlex.split(option(words, "--wrap"))
        targets = inner[inner.index("--target-jobs") + 1:]
        jobs = [tuple(t.replace("scan=", "").split(":")) for t in targets[:next(
            i for i, t in enumerate(targets) if t.startswith("--"))]]
        ran += jobs
        blocks.append(sorted({scan for _, scan in jobs}))
    assert sorted(ran) == sorted((rule, scan) for rule in PER_SCAN_RULES for scan in slurm_run.scans)
    # Each group is a run of consecutive scans of the cohort's table (scan_group, rules/common.smk).
    scans = slurm_run.scans
    assert sorted(blocks) == sorted(sorted(scans[i:i + per_group]) for i in range(0, len(scans), per_group))

    # What slurmctld made of them.
    cpu = {name for name, limits in cluster_partitions().items() if not limits.get("max_gpu")}
    for job in slurm_run.jobs:
        assert job["JobState"] == "COMPLETED", (job["Comment"], job["JobState"], job.get("Reason"))
        assert Path(job["StdOut"]).is_file() and Path(job["StdOut"]).is_relative_to(
            slurm_run.work / ".snakemake" / "slurm_logs")
    group_jobs = [job for job in slurm_run.jobs if "/group_scan" in job["StdOut"]]
    assert len(group_jobs) == len(groups)
    for job in group_jobs:
        assert job["Partition"] in cpu and int(job["NumCPUs"]) == request["cpus"], job
        assert megabytes(job["MinMemoryNode"]) == request["mem_mb"], job["MinMemoryNode"]
        assert minutes(job["TimeLimit"]) == request["runtime"], job["TimeLimit"]


def test_ungrouped_jobs_asked_for_their_rules_resources_and_scratch(slurm_run):
    """cohort, manifest, folds and the GPU rule train_generator (the SDM): mem_mb, runtime, threads (--cpus-per-task: a GPU
    rule's loader threads), disk_mb (--tmp), gpu (--gpus and a GPU partition), each as the rule declares."""
    printed = submitted_jobs(slurm_run.log)
    partitions = cluster_partitions()
    by_comment = {job["Comment"]: job for job in slurm_run.jobs}
    calls = {option(words, "--comment"): words for words in sbatch_calls(slurm_run.log)}
    for rule, values in [("cohort", ()), ("manifest", ()), ("folds", ()), ("train_generator", ("sdm", "holdout"))]:
        resources = printed[rule, values]
        comment = f"rule_{rule}" + (f"_wildcards_{'_'.join(values)}" if values else "")
        words, job = calls[comment], by_comment[comment]
        assert option(words, "--cpus-per-task") == resources["threads"] == job["NumCPUs"], (comment, words)
        assert option(words, "--tmp") == resources["disk_mb"], (comment, words)
        assert megabytes(job["MinTmpDiskNode"]) == int(resources["disk_mb"]), (comment, job["MinTmpDiskNode"])
        assert megabytes(job["MinMemoryNode"]) == int(resources["mem_mb"]), (comment, job["MinMemoryNode"])
        assert minutes(job["TimeLimit"]) == float(resources["runtime"]), (comment, job["TimeLimit"])
        gpu = int(resources.get("gpu", 0))
        assert (option(words, "--gpus") == str(gpu)) if gpu else option(words, "--gpus") is None, (comment, words)
        assert bool(partitions[job["Partition"]].get("max_gpu")) == bool(gpu), (comment, job["Partition"])
    assert int(printed["train_generator", ("sdm", "holdout")]["threads"]) == 2  # generators.threads of the test config
    # The GPU jobs asked for more than the GPU partitions allow (GPU_RUNTIME_LIMIT): cut to it, on a GPU partition,
    # not sent to the default partition (the CPU one here) by the plugin's fallback.
    from nodulesynth import resources as sizing

    for generator in ("sdm", "spade"):
        comment = f"rule_train_generator_wildcards_{generator}_holdout"
        job = by_comment[comment]
        assert minutes(job["TimeLimit"]) == GPU_RUNTIME_LIMIT, (comment, job["TimeLimit"])
        assert partitions[job["Partition"]].get("max_gpu"), (comment, job["Partition"])
        asked = sizing.train_generator_runtime(generator, slurm_run.config, slurm_run.config["generators"]["device"], 2)
        assert asked > GPU_RUNTIME_LIMIT, asked
    # the SDM's GPUs (sdm.gpus) on one node, where torchrun --standalone starts its processes
    words = calls["rule_train_generator_wildcards_sdm_holdout"]
    assert option(words, "--nodes") == "1" and by_comment["rule_train_generator_wildcards_sdm_holdout"]["NumNodes"] == "1"


def test_a_gpu_on_the_submitting_machine_does_not_hold_back_the_clusters_gpu_jobs(slurm_run):
    """rules/common.smk registers the GPUs the submitting machine's driver lists (here one) as the run's gpu
    resource, for local runs; profiles/slurm scopes it local, so both GPU jobs went to SLURM at once (SLURM, whose
    node has one GPU, runs them in turn) rather than the second waiting for the first to end."""
    from datetime import datetime

    comments = {f"rule_train_generator_wildcards_{generator}_holdout" for generator in ("sdm", "spade")}
    jobs = [job for job in slurm_run.jobs if job["Comment"] in comments]
    assert len(jobs) == 2, [job["Comment"] for job in slurm_run.jobs]
    first, second = sorted(jobs, key=lambda job: job["SubmitTime"])
    assert datetime.fromisoformat(second["SubmitTime"]) < datetime.fromisoformat(first["EndTime"]), \
        (first["SubmitTime"], first["EndTime"], second["SubmitTime"])


def test_containers_were_given_the_data_folders(slurm_run):
    """The DICOM folder and the annotations' folder lie outside the working directory: every submitted job's
    apptainer arguments bind them (read-only, at the paths the config gives), and so did every container."""
    cohort = slurm_run.config["cohort"]
    folders = [cohort["dicom_root"], str(Path(cohort["annotations"]).parent)]
    binds = [f"{os.path.realpath(folder)}:{folder}:ro" for folder in folders]
    calls = sbatch_calls(slurm_run.log)
    for words in calls:
        args = shlex.split(apptainer_args(words))
        assert "--nv" in args, args
        for bind in binds:
            assert args.count(bind) == 1 and args[args.index(bind) - 1] == "--bind", (bind, args)
    execs = [record["argv"][1:] for record in map(json.loads, slurm_run.apptainer_log.read_text().splitlines())
             if record["argv"][1] == "exec"]
    # One container per job: cohort, 3 steps per scan, manifest, folds, the two train_generator jobs; each given
    # both folders once (the jobs' Snakemake parses the workflow again and must not bind twice).
    assert len(execs) == 1 + 3 * N_SCANS + 4
    for argv in execs:
        for bind in binds:
            assert argv.count(bind) == 1 and argv[argv.index(bind) - 1] == "--bind", (bind, argv)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_slurm_outputs_equal_a_local_run(slurm_run):
    local, work, scans = slurm_run.local, slurm_run.work, slurm_run.scans
    outputs = [f"results/slices/{scan}.{ext}" for scan in scans
               for ext in ("npz", "nodules.tsv", "dropped.tsv", "excluded.tsv")]
    outputs += [f"results/qc/{scan}.png" for scan in scans]
    outputs += [f"results/cohort/{table}.tsv" for table in ("scans", "manifest", "rejected", "dropped_nodules")]
    different = [path for path in outputs if digest(local / path) != digest(work / path)]
    assert not different, different
    with np.load(work / f"results/slices/{scans[0]}.npz") as data:
        assert data["image"].shape[1:] == (64, 64) and data["label"].max() == 5  # a real stack, nodule included
