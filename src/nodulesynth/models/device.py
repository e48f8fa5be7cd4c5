"""Which torch device a GPU job runs on: its own GPU when it was given one, the CPU only where none was.

- `gpu_request`: whether this job was given a GPU (the workflow's `gpu` resource, `--resources gpu=N` or the GPUs
  the driver lists, passed on as NODULESYNTH_GPU_SLOTS; CUDA_VISIBLE_DEVICES; SLURM's GPU variables), in words.
- `pick_device`: "auto" is CUDA where torch can use it, the CPU where no GPU was asked for, and otherwise an
  error that says why torch cannot use the GPU (a driver older than the pinned torch's CUDA, most often).
- `claim_gpu` / `job_device`: one GPU per job on a machine that runs several at once. Each job holds an
  exclusive lock on one slot file (the lowest free one) for its lifetime; the kernel drops the lock when the
  process ends, killed or not, so no stale slot outlives its job. Under SLURM each job sees only its own GPUs
  already (SLURM sets CUDA_VISIBLE_DEVICES), and no slot is claimed.
  A job with N GPUs (SDM's `sdm.gpus`) runs N processes (torchrun), and each is one of the above: locally each
  claims its own slot, so the job holds N; under SLURM process LOCAL_RANK takes the job's GPU of that index.
"""

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nodulesynth.errors import InputError
from nodulesynth.errors import DeviceError

# torch is imported where it is used: the Snakefile reads `local_gpu_count` from here without it.

SLOTS_VARIABLE = "NODULESYNTH_GPU_SLOTS"      # GPUs of this machine the run shares (rules/common.smk sets it)
LOCK_DIR_VARIABLE = "NODULESYNTH_GPU_LOCK_DIR"
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE",
                       "SLURM_GPUS_PER_TASK")
DRIVER_HELP = ("see the README, 'GPU drivers': the lock's torch needs an NVIDIA driver that supports its CUDA "
               "(or lock a CUDA 12 build)")
_held = {}  # lock file path -> its open file, locked for the life of the process


def visible_devices(environ=None) -> list | None:
    """The entries of CUDA_VISIBLE_DEVICES; None when it is unset. Empty, "-1" or SLURM's "NoDevFiles" hide all."""
    environ = os.environ if environ is None else environ
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    entries = [v.strip() for v in value.split(",") if v.strip()]
    if not entries or entries[0] in ("-1", "NoDevFiles"):
        return []
    return entries


def gpu_request(environ=None) -> str | None:
    """What gave this job a GPU, in words (e.g. "CUDA_VISIBLE_DEVICES=1"); None when nothing did."""
    environ = os.environ if environ is None else environ
    slots = environ.get(SLOTS_VARIABLE, "").strip()
    if slots and slots != "0":
        return f"{SLOTS_VARIABLE}={slots}: the workflow's gpu resource, {slots} GPU(s) of this machine"
    for name in SLURM_GPU_VARIABLES:
        value = environ.get(name, "").strip()
        if value and value not in ("0", "(null)", "N/A"):
            return f"{name}={value}"
    if visible_devices(environ):
        return f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}"
    return None


def local_gpu_count(environ=None) -> int:
    """The NVIDIA GPUs a local run may use, without torch: CUDA_VISIBLE_DEVICES's entries where it is set, else the
    lines of `nvidia-smi -L`; 0 where there is no driver."""
    environ = os.environ if environ is None else environ
    visible = visible_devices(environ)
    if visible is not None:
        return len(visible)
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    if not smi:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def cuda_unavailable_reason() -> str:
    """Why torch cannot use CUDA here, from torch's own initialisation error."""
    import torch

    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as error:  # torch raises RuntimeError or AssertionError, with the driver's reason
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}): {str(error).strip().splitlines()[0]}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"


def pick_device(requested: str = "auto", environ=None) -> "torch.device":
    """"auto": CUDA where torch can use it; the CPU only where this job was given no GPU (`gpu_request`).
    Anything else is taken literally, an index included; a CUDA index becomes the current device, so that
    libraries that say only "cuda" (mmengine, autocast, AMP's scaler) use the same one."""
    import torch

    requested = str(requested or "auto")
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        asked = gpu_request(environ)
        if asked:
            # A GPU job quietly trained on the CPU runs for days and looks like a success.
            raise DeviceError(f"this job was given a GPU ({asked}) but cannot use it: {cuda_unavailable_reason()}; "
                               f"{DRIVER_HELP}. Run with --device cpu to train on the CPU on purpose")
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            # An explicit request must not silently fall back either.
            raise DeviceError(f"device {requested!r} requested but CUDA is not available: {cuda_unavailable_reason()}"
                               f"; {DRIVER_HELP}")
        if device.index is not None:
            if device.index >= torch.cuda.device_count():
                raise DeviceError(f"device {requested!r} requested but this job sees {torch.cuda.device_count()} "
                                   f"GPU(s) (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
            torch.cuda.set_device(device)
    return device


def lock_dir() -> Path:
    """One folder of slot locks per user and machine (/tmp is bound into the Apptainer images too)."""
    default = Path(tempfile.gettempdir()) / f"nodulesynth-gpu-slots-{os.getuid()}"
    return Path(os.environ.get(LOCK_DIR_VARIABLE) or default)


def claim_gpu(n_slots: int, directory=None, timeout: float | None = None, names=None, poll: float = 1.0) -> int:
    """The lowest of `n_slots` GPU slots no other process holds, held until this process ends.

    `names`: the lock file of each slot (default: the slot's device in CUDA_VISIBLE_DEVICES, so that two runs
    that see the same GPU under other indices still take turns on it). Where all are held, waits for one
    (Snakemake starts at most as many GPU jobs as its `gpu` resource, so the wait is short), up to `timeout` seconds
    (None: for ever), then raises DeviceError naming the lock folder.
    """
    if n_slots < 1:
        raise InputError(f"claim_gpu needs at least one slot, got {n_slots}")
    if names is None:
        visible = visible_devices() or [str(i) for i in range(n_slots)]
        names = [visible[i] if i < len(visible) else str(i) for i in range(n_slots)]
    directory = Path(directory or lock_dir())
    directory.mkdir(parents=True, exist_ok=True)
    start, told = time.monotonic(), False
    while True:
        for slot in range(n_slots):
            path = directory / f"gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', str(names[slot]))}.lock"
            if path in _held:
                return slot
            handle = open(path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            _held[path] = handle
            return slot
        waited = time.monotonic() - start
        if timeout is not None and waited >= timeout:
            raise DeviceError(f"all {n_slots} GPU slot(s) stayed held by other jobs for {waited:.0f} s "
                               f"(lock files in {directory}; each holds its job's process id)")
        if not told:
            print(f"waiting for a free GPU: all {n_slots} slot(s) in {directory} are held", file=sys.stderr)
            told = True
        time.sleep(poll)


def shares_gpus(environ=None) -> bool:
    """Whether a job shares its machine's GPUs with the run's other jobs (and so claims a slot) rather than owning
    its GPUs. A local run sets NODULESYNTH_GPU_SLOTS (rules/common.smk), inside a SLURM allocation too: after
    `salloc --gpus=2`, `snakemake --cores 8` runs its GPU jobs side by side on the allocation's two GPUs. A job the
    SLURM executor submitted (its variables set, no slots) was given GPUs of its own."""
    environ = os.environ if environ is None else environ
    if int(environ.get(SLOTS_VARIABLE) or 0) > 0:
        return True
    return not any(environ.get(name) for name in SLURM_GPU_VARIABLES + ("SLURM_JOB_ID", "SLURM_STEP_ID"))


def job_device(requested: str = "auto", environ=None, timeout: float | None = None) -> str:
    """The device of one workflow job, as a string for the library calls: its own GPU on a shared machine.

    "auto" or a bare "cuda" on a machine with CUDA claims a slot (`claim_gpu`) among the run's GPUs
    (NODULESYNTH_GPU_SLOTS, else all that torch sees) and becomes "cuda:<slot>"; a job the SLURM executor submitted
    owns its GPUs already ("cuda"; `shares_gpus`). "cpu" and an indexed "cuda:N" are taken as they are.
    """
    import torch

    environ = os.environ if environ is None else environ
    requested = str(requested or "auto")
    device = pick_device(requested, environ)
    if device.type != "cuda" or device.index is not None or requested not in ("auto", "cuda"):
        return str(device)
    if not shares_gpus(environ):
        # SLURM gives a job its own GPUs (and may number them from 0 in every job): slots would only collide.
        # Of a job's several processes (torchrun's WORLD_SIZE), each takes the GPU of its LOCAL_RANK.
        if int(environ.get("WORLD_SIZE") or 1) > 1:
            return str(pick_device(f"cuda:{int(environ.get('LOCAL_RANK') or 0)}", environ))
        return "cuda"
    slots = int(environ.get(SLOTS_VARIABLE) or 0) or torch.cuda.device_count()
    slot = claim_gpu(slots, timeout=timeout)
    return str(pick_device(f"cuda:{slot}", environ))
