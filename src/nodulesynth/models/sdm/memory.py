"""How much GPU memory one SDM training step needs, estimated without allocating it.

The network runs one forward pass on fake tensors (torch's FakeTensorMode: shapes and dtypes, no data), under
bf16 autocast where the training would use it, and every tensor autograd saves for the backward pass is counted
once (by its storage; weights aside). With gradient checkpointing a residual block keeps only its input, and
recomputes its own saved tensors, one block at a time, in the backward pass (composed here from the counts of a
pass without checkpointing, each attributed to the block that saved it). To the activations add the persistent
state: per parameter fp32 weights, gradients, Adam's two moments and the EMA copy (20 bytes). What this leaves
out (the backward pass's transient gradients, cuDNN workspaces, the allocator's fragmentation) is why a measured
peak is higher: benchmarks/sdm.py --memory prints both where a GPU exists.
"""

from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.unet import ResBlock, SDMUNet

# fp32 weight + fp32 gradient + Adam exp_avg + exp_avg_sq + fp32 EMA copy
STATE_BYTES_PER_PARAMETER = 4 + 4 + 4 + 4 + 4


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    micro_batch: int
    state_bytes: int          # weights, gradients, Adam moments, EMA
    activation_bytes: int     # saved for backward at the peak of one pass (micro_batch samples)

    @property
    def peak_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"{self.parameters / 1e6:.1f} M parameters, pass of {self.micro_batch}: state "
                f"{self.state_bytes / gib:.1f} GiB + activations {self.activation_bytes / gib:.1f} GiB = "
                f"estimated peak {self.peak_bytes / gib:.1f} GiB")


def _storage_key(tensor) -> int:
    return StorageWeakRef(tensor.untyped_storage()).cdata


def training_memory(options: SDMOptions, micro_batch: int | None = None, bf16: bool | None = None) -> MemoryEstimate:
    """Estimated peak memory of one training pass of `micro_batch` samples (default: the options'
    largest pass); bf16 None follows options.bf16 (autocast, as on a GPU)."""
    micro_batch = micro_batch or options.micro_batches[0]
    bf16 = options.bf16 if bf16 is None else bf16
    size = options.image_size
    with FakeTensorMode():
        # Checkpointing off here: every block's saved tensors are counted, then the checkpointed total is
        # composed from them below (torch.utils.checkpoint's own hooks would hide them from ours).
        model = SDMUNet(options.replace(grad_checkpoint=False)).train()
        weights = {_storage_key(p) for p in model.parameters()}
        x = torch.randn(micro_batch, options.in_channels, size, size)
        t = torch.zeros(micro_batch, dtype=torch.long)
        cond = torch.randn(micro_batch, options.num_classes, size, size)

        saved = {}            # storage -> bytes, each counted once
        owner = {}            # storage -> the innermost residual block that saved it (None: none)
        block_inputs = {}     # residual block -> the storage of its input h
        running = []

        def pack(tensor):
            key = _storage_key(tensor)
            if key not in weights and key not in saved:
                saved[key] = tensor.untyped_storage().nbytes()
                owner[key] = running[-1] if running else None
            return tensor

        def enter(block, args):
            h = args[0]
            block_inputs[block] = (_storage_key(h), h.untyped_storage().nbytes())
            running.append(block)

        def leave(block, args, output):
            running.pop()

        blocks = [m for m in model.modules() if isinstance(m, ResBlock)]
        for block in blocks:
            block.register_forward_pre_hook(enter)
            block.register_forward_hook(leave)
        # Autocast on the CPU device type, where fake tensors live (CUDA's autocast needs a GPU). Both run
        # convolutions, linears and attention in bf16, but CUDA's runs group norms in fp32, and with them what
        # follows up to the next convolution (SiLU, SPADE's modulation), while the CPU's leaves them in bf16:
        # each group norm's input is made fp32, as CUDA's autocast makes it.
        if bf16:
            for norm in (m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)):
                norm.register_forward_pre_hook(lambda module, args: (args[0].float(), *args[1:]))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x, t, cond)
        parameters = sum(p.numel() for p in model.parameters())

    if not options.grad_checkpoint:
        activations = sum(saved.values())
    else:
        outside = {k: n for k, n in saved.items() if owner[k] is None}
        kept_inputs = dict(block_inputs.values())
        per_block = {}
        for key, n in saved.items():
            if owner[key] is not None:
                per_block[owner[key]] = per_block.get(owner[key], 0) + n
        activations = sum({**outside, **kept_inputs}.values()) + max(per_block.values(), default=0)
        if bf16:
            # autocast's bf16 copies of the weights live through the forward pass (its cache), which the
            # blocks' recomputation no longer keeps for backward: count them once.
            activations += 2 * parameters
    return MemoryEstimate(parameters, micro_batch, parameters * STATE_BYTES_PER_PARAMETER, activations)
