"""Training on several GPUs of one node: one process per GPU, started by torchrun, gradients averaged by DDP.

- `launcher(gpus)`: the command prefix the workflow puts before `nodulesynth train-sdm` (none for one GPU).
- `Ranks`: this process's place among them (rank, local rank, world size), from torchrun's environment.
- `process_group(device, ranks)`: gloo on the CPU, nccl on CUDA, for the length of a training run.
- `broadcast`, `all_reduce_sum`, `barrier`: what the training loop shares; each is a no-op in one process.

One node only: torchrun `--standalone` runs its own rendezvous on localhost. Several nodes (`srun torchrun` with
a shared rendezvous endpoint) would need only another launcher and RANK-based sharding, which already holds.
torch is imported where it is used: the Snakefile reads `launcher` from here without it.
"""

import contextlib
import os
from dataclasses import dataclass

from nodulesynth.errors import InputError

LAUNCH = "torchrun --standalone --nproc-per-node {n} --no-python"


def launcher(gpus: int) -> str:
    """The prefix that runs a `nodulesynth` command as `gpus` processes ("" for one: the command as it is)."""
    gpus = int(gpus)
    if gpus < 1:
        raise InputError(f"gpus must be at least 1, got {gpus}")
    return LAUNCH.format(n=gpus) if gpus > 1 else ""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0          # among all processes of the run
    local_rank: int = 0    # on this node: the index of this process's GPU among the job's
    size: int = 1          # processes in all (the world size)

    @classmethod
    def from_environ(cls, environ=None) -> "Ranks":
        """torchrun's RANK, LOCAL_RANK, WORLD_SIZE; one process where they are unset."""
        environ = os.environ if environ is None else environ
        ranks = cls(int(environ.get("RANK", 0)), int(environ.get("LOCAL_RANK", 0)),
                    int(environ.get("WORLD_SIZE", 1)))
        if not 0 <= ranks.rank < ranks.size:
            raise InputError(f"RANK {ranks.rank} is not below WORLD_SIZE {ranks.size}")
        return ranks

    @property
    def main(self) -> bool:
        """The process that writes the files (checkpoint, model, loss curve) and prints."""
        return self.rank == 0

    def shard(self, total: int) -> slice:
        """This process's contiguous share of `total` items (`total` divisible by the world size)."""
        share = total // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


def rank_device(device, ranks: Ranks):
    """A bare "cuda" becomes this process's own GPU, cuda:LOCAL_RANK, where several processes share a job."""
    import torch

    device = torch.device(device)
    if ranks.size > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # nccl and autocast use the current device
    return device


def require_processes(gpus: int, ranks: Ranks, key: str):
    """Refuse a run whose process count is not the configured number of GPUs (`key`), saying how to start it."""
    if ranks.size != gpus:
        raise InputError(f"{key} is {gpus} but {ranks.size} process(es) run: start {gpus} with "
                         f"`{launcher(gpus) or '(no launcher: one process)'} nodulesynth ...`")


def backend(device) -> str:
    """The collective backend for processes on `device`: nccl between GPUs, gloo between CPU processes."""
    import torch

    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device, ranks: Ranks):
    """The process group of a run of several processes (nothing for one), destroyed when the run ends."""
    if ranks.size == 1:
        yield
        return
    import torch.distributed as dist

    dist.init_process_group(backend(device), rank=ranks.rank, world_size=ranks.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(value):
    """Rank 0's `value` (any picklable object) in every process."""
    if not _active():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor):
    """`tensor` summed over all processes (in place, and returned)."""
    if _active():
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if _active():
        import torch.distributed as dist

        dist.barrier()
