"""SDM options: the network, the diffusion, training and sampling, in one flat dataclass.

Defaults are the paper's 256-pixel setting (Wang et al. 2022, official ADE20K/Cityscapes scripts:
256 channels, channel_mult (1,1,2,2,4,4), 2 res blocks, attention at 32/16/8 px with 64-channel
heads, BigGAN-style up/down res blocks, learned sigma, linear 1000-step schedule, lr 1e-4 at a
total batch of 32, EMA 0.9999, guidance scale 1.5; 1000-step ancestral sampling, where the study samples with
SDE-DPM-Solver++(2M) at 25 steps, see `sampler`) and its training
recipe: no gradient clipping, and two stages, the first without dropping maps, the second
fine-tuning for classifier-free guidance with drop rate 0.2 at lr 2e-5 (the official scripts run
these as two trainings, the second resumed from the first; the length of each is not given, so
`finetune_steps` is ours: the last fifth of `max_steps`).
A CPU demo overrides the size keys from the config (e.g. image_size 64, model_channels 32,
channel_mult [1, 2], num_res_blocks 1, attention_resolutions [32], spade_hidden 32).
"""

from dataclasses import dataclass

from nodulesynth.errors import InputError
from nodulesynth.options import SectionOptions

SCHEDULES = ("linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde")  # models/sdm/samplers.py
ATTENTION = ("sdpa", "plain")


@dataclass(frozen=True)
class SDMOptions(SectionOptions):

    SECTION = "sdm"
    # --- network ---
    image_size: int = 256
    in_channels: int = 1                # one CT channel
    num_classes: int = 6                # nodulesynth.labels.NUM_CLASSES
    model_channels: int = 256
    channel_mult: tuple = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple = (32, 16, 8)  # feature-map sizes in pixels that get self-attention
    num_head_channels: int = 64         # channels per attention head (heads = channels // this, at least 1)
    dropout: float = 0.0
    resblock_updown: bool = True        # resample inside residual blocks (BigGAN style) rather than by conv
    spade_hidden: int = 128             # hidden width of the spatially-adaptive norm's shared conv
    norm_groups: int = 32               # GroupNorm groups (reduced to a divisor for narrow layers)
    learn_sigma: bool = True            # second output channel: learned-range variance interpolation
    # --- diffusion ---
    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    vlb_weight: float = 0.001           # lambda of the hybrid loss L_simple + lambda * L_vlb
    # --- training ---
    batch_size: int = 32                # the effective batch of one optimiser step (the paper's 32)
    # Samples per forward/backward pass: batch_size is split into passes of at most this many, their
    # gradients summed, so one step is the full batch's step (up to float rounding) in less memory.
    # None: the whole batch in one pass. 16 with grad_checkpoint fits the paper's network at 256 px on
    # an 80 GB GPU (`python benchmarks/sdm.py --memory`, nodulesynth.models.sdm.memory).
    micro_batch_size: int | None = 16
    # GPUs of one node that train together (torchrun, DistributedDataParallel): each takes batch_size / gpus
    # samples of every step, so the step is the same as on one GPU; micro_batch_size then cuts each GPU's share.
    gpus: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float | None = None      # max gradient norm; None: no clipping (the official code clips nothing)
    ema_decay: float = 0.9999
    ema_warmup: bool = False            # min(decay, (1+n)/(10+n)): for short CPU runs
    drop_rate: float = 0.2              # classifier-free guidance: P(map replaced by the null map), in stage 2
    max_steps: int = 100_000            # all steps, both stages; not fixed by the paper for this data
    # Stage 2 = the last `finetune_steps` steps: maps dropped at drop_rate, learning rate finetune_lr;
    # stage 1 before it drops nothing. 0: one stage, dropping at drop_rate from step 0 at lr (the demo).
    finetune_steps: int = 20_000
    finetune_lr: float = 2e-5
    checkpoint_every: int = 2_000
    log_every: int = 100
    seed: int = 0
    # --- speed features (the benchmark switches them off to measure the plain implementation) ---
    bf16: bool = True                   # bf16 autocast, CUDA only
    channels_last: bool = True          # CUDA only
    attention: str = "sdpa"             # "sdpa" (F.scaled_dot_product_attention) or "plain"
    # Recompute each residual block's activations in backward instead of keeping them (torch.utils.checkpoint):
    # about a third more compute for several times less activation memory; the paper's network at 256 px
    # needs it on an 80 GB GPU. The demo's tiny network turns it off.
    grad_checkpoint: bool = True
    # --- sampling ---
    # The study's: SDE-DPM-Solver++(2M) at 25 steps, within a few hundredths of the paper's 1000-step DDPM in mask
    # Dice at 1/40 of the cost (README, benchmarks/sdm.py); the paper's is sampler "ddpm", sample_steps 1000.
    sampler: str = "dpmpp_2m_sde"
    sample_steps: int = 25
    guidance_scale: float = 1.5
    ddim_eta: float = 0.0
    sample_batch_size: int = 16

    def __post_init__(self):
        # Lists from YAML become tuples so options stay hashable and compare equal after a round trip.
        for name in ("channel_mult", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if self.noise_schedule not in SCHEDULES:
            raise InputError(f"sdm.noise_schedule must be one of {SCHEDULES}, got {self.noise_schedule!r}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"sdm.sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.attention not in ATTENTION:
            raise InputError(f"sdm.attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.image_size % 2 ** (len(self.channel_mult) - 1):
            raise InputError(f"sdm.image_size {self.image_size} is not divisible by "
                             f"2**{len(self.channel_mult) - 1} (len(channel_mult) - 1 downsamplings)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise InputError(f"sdm.micro_batch_size must be at least 1 or null (the whole batch), "
                             f"got {self.micro_batch_size}")
        if self.gpus < 1:
            raise InputError(f"sdm.gpus must be at least 1, got {self.gpus}")
        if self.batch_size % self.gpus:
            raise InputError(f"sdm.batch_size {self.batch_size} is not divisible by sdm.gpus {self.gpus}: each GPU "
                             f"takes an equal share of every step's batch (choose a batch_size that is a multiple "
                             f"of gpus)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"sdm.grad_clip must be positive or null (no clipping), got {self.grad_clip}")
        if not 0 <= self.finetune_steps <= self.max_steps:
            raise InputError(f"sdm.finetune_steps must be in [0, sdm.max_steps = {self.max_steps}], "
                             f"got {self.finetune_steps}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise InputError(f"sdm.drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.sample_steps < 1 or self.sample_steps > self.diffusion_steps:
            raise InputError(f"sdm.sample_steps must be in [1, {self.diffusion_steps}], got {self.sample_steps}")

    @property
    def gpu_batch_size(self) -> int:
        """The samples of each step that one GPU (one process) takes."""
        return self.batch_size // self.gpus

    @property
    def micro_batches(self) -> list:
        """The sizes of one GPU's forward/backward passes of a step: its share of the batch (all of it on one
        GPU) cut into micro_batch_size pieces."""
        share = self.gpu_batch_size
        size = min(self.micro_batch_size or share, share)
        return [min(size, share - start) for start in range(0, share, size)]

    @property
    def finetune_start(self) -> int:
        """Index of the first step of stage 2 (max_steps when there is none)."""
        return self.max_steps - self.finetune_steps

    def drop_rate_at(self, step: int) -> float:
        """The probability of dropping a map at (0-based) training step `step`."""
        if self.finetune_steps and step < self.finetune_start:
            return 0.0
        return self.drop_rate

    def lr_at(self, step: int) -> float:
        """The learning rate of (0-based) training step `step`."""
        return self.finetune_lr if self.finetune_steps and step >= self.finetune_start else self.lr

    # Keys used only when sampling: the workflow's sample rule gets them, the training rule does not.
    SAMPLING_KEYS = ("sampler", "sample_steps", "guidance_scale", "ddim_eta", "sample_batch_size")
    # Keys a restarted run may change and still resume its checkpoint: length, bookkeeping, sampling, and
    # how a step's memory is spent (micro-batches, recomputation) and over how many GPUs, which leaves its
    # gradient unchanged.
    RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "micro_batch_size",
                         "grad_checkpoint", "gpus") + SAMPLING_KEYS

    # Keys that define the trained network and its diffusion; a checkpoint with other values cannot resume.
    MODEL_KEYS = ("image_size", "in_channels", "num_classes", "model_channels", "channel_mult",
                  "num_res_blocks", "attention_resolutions", "num_head_channels", "resblock_updown",
                  "spade_hidden", "norm_groups", "learn_sigma", "diffusion_steps", "noise_schedule")
