"""SLURM, tested for real: a one-node cluster on localhost (Debian's `slurm-wlm` and `munge`) runs the demo
DAG's data rules (cohort, ingest, masks, qc, manifest) through `--executor slurm` with profiles/slurm.

The test starts munged, slurmctld and slurmd itself, with their own key, sockets, ports, state and logs in one
temporary folder (SLURM_CONF points there; no system configuration is written), and stops each by its PID.
It checks that every job went through sbatch with its rule's resources and the partition the profile chose
from them, and that the outputs equal a local run's. Skipped, saying why, where SLURM is not installed.
"""

import getpass
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

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO
from nodulesynth.models.sdm.options import SDMOptions

PROFILE = REPO / "profiles" / "slurm" / "config.yaml"
CONF_TEMPLATE = Path(__file__).parent / "slurm" / "slurm.conf"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
# What only this test cluster needs, on top of profiles/slurm. There is no accounting database (slurmdbd),
# so `sacct` knows no jobs and the plugin's default sacct polling would wait forever: poll squeue instead
# (MinJobAge=300 keeps finished jobs visible to it). No account to charge. Short waits: a local disk.
TEST_PROFILE = {
    "slurm-status-command": "squeue",
    # Plugin 2.8.0 defines but does not read this flag: with no account given it asks sacct for one, which
    # fails at once here ("accounting storage is disabled"), and submits without -A. Kept to say the intent.
    "slurm-no-account": True,
    "slurm-init-seconds-before-status-checks": 2,
    "slurm-keep-successful-logs": True,
    "latency-wait": 5,
    "jobs": 4,
}
RUN_TIMEOUT_S = 420  # a hung status poll fails the test instead of hanging CI


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
            # train_sdm asks for config sdm.gpus (schema default 1): counted at its default here.
            gpu = re.search(r"^\s+gpu\s*=\s*(\d+|config\[\"sdm\"\]\[\"gpus\"\])", body, flags=re.M)
            count = gpu and (int(gpu.group(1)) if gpu.group(1).isdigit() else SDMOptions().gpus)
            if count:
                found[name] = count
    return found


def test_profile_chooses_partitions_from_the_rules_resources():
    profile = load_profile()
    assert profile["executor"] == "slurm"
    partitions = profile_partitions(profile)
    gpu = gpu_rules()
    assert {"train_sdm", "sample_sdm", "train_spade", "sample_spade", "detect", "localize"} <= set(gpu)
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


def write_cluster_config(root, partitions):
    """slurm.conf (from tests/slurm/slurm.conf), gres.conf and an empty plugstack.conf in `root`."""
    host = socket.gethostname().split(".")[0]
    hardware = node_hardware()
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
        partitions = profile_partitions(load_profile())  # CPU partitions first: the first is the default
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


def two_scan_config(path):
    """The demo config with two small scans."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["cohort"]["demo"].update(n_scans=2, image_size=96)
    config["folds"]["k"] = 2
    path.write_text(yaml.safe_dump(config))
    return path


def write_test_profile(folder):
    """profiles/slurm with the settings only the test cluster needs (TEST_PROFILE)."""
    shutil.copytree(PROFILE.parent, folder)
    profile = load_profile()
    profile.update(TEST_PROFILE)
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def submitted_jobs(log):
    """Snakemake's own record of the jobs it ran: (rule, wildcard values) -> resources as printed."""
    jobs = {}
    for block in re.split(r"\n\s*\n", log):
        head = re.search(r"^(?:local)?(?:rule|checkpoint) (\w+):\s*$", block, flags=re.M)
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
    """slurmctld's record of every job it was given (kept MinJobAge=300 s after it ends)."""
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


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory):
    """The slice run locally, then through SLURM in a fresh folder."""
    local = tmp_path_factory.mktemp("local")
    config = two_scan_config(local / "config.yaml")
    first = checked(snakemake(local, "results/cohort/manifest.tsv", "--configfile", str(config)))
    scans = pd.read_csv(local / "results/cohort/scans.tsv", sep="\t", dtype=str).scan_id.tolist()
    targets = ["results/cohort/manifest.tsv"] + [f"results/qc/{scan}.png" for scan in scans]
    second = checked(snakemake(local, *targets, "--configfile", str(config)))
    local_log = "\n\n".join(p.stdout + p.stderr for p in (first, second))

    work = tmp_path_factory.mktemp("slurm")
    profile = write_test_profile(work / "test-profile")
    proc = checked(snakemake(work, *targets, "--executor", "slurm", "--workflow-profile", str(profile),
                             "--configfile", str(config), env=cluster.env))
    return SimpleNamespace(local=local, work=work, local_log=local_log, log=proc.stdout + proc.stderr, scans=scans)


def test_every_job_went_through_sbatch_with_its_rules_resources(cluster, slurm_run):
    work, log = slurm_run.work, slurm_run.log
    expected = submitted_jobs(log)
    # The same jobs as the local run, the slice asked for: cohort, and ingest, masks and qc per scan.
    assert set(expected) == set(submitted_jobs(slurm_run.local_log)), sorted(expected)
    rules = [rule for rule, _ in expected]
    assert rules.count("cohort") == 1 and all(rules.count(r) == len(slurm_run.scans) for r in ("ingest", "masks", "qc"))
    assert not re.search(r"^local(rule|checkpoint) ", log, flags=re.M), "a job ran outside SLURM"

    # The plugin names each job by its rule and wildcards in the SLURM comment.
    by_comment = {job["Comment"]: job for job in slurm_jobs(cluster)}
    assert len(by_comment) == len(expected), sorted(by_comment)
    partitions = profile_partitions(load_profile())
    cpu_partitions = {name for name, limits in partitions.items() if not limits.get("max_gpu")}
    for (rule, values), resources in expected.items():
        comment = f"rule_{rule}" + (f"_wildcards_{'_'.join(values)}" if values else "")
        job = by_comment[comment]
        assert job["JobState"] == "COMPLETED", (comment, job["JobState"], job.get("Reason"))
        assert job["Partition"] in cpu_partitions, (comment, job["Partition"])
        assert megabytes(job["MinMemoryNode"]) == int(resources["mem_mb"]), (comment, job["MinMemoryNode"])
        assert minutes(job["TimeLimit"]) == float(resources["runtime"]), (comment, job["TimeLimit"])
        assert job["NumCPUs"] == resources["threads"], (comment, job["NumCPUs"])
        assert Path(job["StdOut"]).is_file(), f"no SLURM log for {comment}: {job['StdOut']}"
        assert Path(job["StdOut"]).is_relative_to(work / ".snakemake" / "slurm_logs")

    # slurmctld logged one sbatch submission per job, and nothing else was submitted.
    ctld_log = (cluster.root / "log" / "slurmctld.log").read_text()
    submissions = re.findall(r"_slurm_rpc_submit_batch_job: JobId=(\d+)", ctld_log)
    assert sorted(submissions, key=int) == sorted((job["JobId"] for job in by_comment.values()), key=int)


def assert_same_stack(a, b):
    with np.load(a) as x, np.load(b) as y:
        assert sorted(x.files) == sorted(y.files), (a, x.files, y.files)
        for key in x.files:
            np.testing.assert_array_equal(x[key], y[key], err_msg=f"{b.name}: {key}")


def test_slurm_outputs_equal_a_local_run(slurm_run):
    local, work, scans = slurm_run.local, slurm_run.work, slurm_run.scans
    for scan in scans:
        assert_same_stack(local / f"results/slices/{scan}.npz", work / f"results/slices/{scan}.npz")
        for table in (f"results/slices/{scan}.nodules.tsv", f"results/slices/{scan}.dropped.tsv"):
            pd.testing.assert_frame_equal(pd.read_csv(local / table, sep="\t"), pd.read_csv(work / table, sep="\t"))
        png = f"results/qc/{scan}.png"
        np.testing.assert_array_equal(cv2.imread(str(local / png)), cv2.imread(str(work / png)), err_msg=png)
    for table in ("scans.tsv", "manifest.tsv", "rejected.tsv", "dropped_nodules.tsv"):
        path = f"results/cohort/{table}"
        pd.testing.assert_frame_equal(pd.read_csv(local / path, sep="\t"), pd.read_csv(work / path, sep="\t"))
    with np.load(work / f"results/slices/{scans[0]}.npz") as data:
        assert data["image"].shape[1:] == (96, 96) and data["label"].max() == 5  # a real stack, nodule included
