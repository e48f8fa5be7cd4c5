"""Options of the SPADE baseline (the `spade:` section of the config).

Defaults are a real run: the SPADE paper's 256-pixel setting (ngf/ndf 64, 2-scale 4-layer
PatchGAN, hinge loss, feature matching and VGG weights 10, TTUR Adam 1e-4/4e-4 with betas
0/0.9). The CPU demo overrides width, size and steps in its config.
"""

from dataclasses import dataclass
from typing import Optional

from nodulesynth.errors import InputError
from nodulesynth.options import SectionOptions

# The paper's generator starts from a small map and upsamples by 2 five times for 256 px (8x8
# start); a derived upsampling count keeps that 8-pixel start at any power-of-two size.
MIN_START_SIZE = 8
NORMS = ("instance", "batch")


@dataclass(frozen=True)
class SPADEOptions(SectionOptions):

    SECTION = "spade"
    image_size: int = 256             # training/sampling resolution (slices are resized to it)
    ngf: int = 64                     # generator width of the last block (the first has up to 16 x ngf)
    ndf: int = 64                     # discriminator width of the first layer
    num_upsampling: Optional[int] = None  # None: as many as bring image_size down to an 8-px start
    spade_hidden: int = 128           # hidden channels of the SPADE modulation conv (paper: 128)
    # Parameter-free norm inside SPADE. The paper uses (synchronised) batch norm; instance norm is
    # the default here because it does not depend on the batch or on running statistics, which
    # would belong to the live weights rather than to the EMA weights when ema is on.
    norm_g: str = "instance"
    n_scales: int = 2                 # discriminator scales
    n_layers_d: int = 4               # conv layers per PatchGAN before the 1-channel output
    lambda_feat: float = 10.0         # feature-matching weight
    lambda_vgg: float = 10.0          # VGG19 perceptual weight (used only with vgg_weights)
    vgg_weights: Optional[str] = None  # LOCAL torchvision vgg19 state-dict file; None: loss off
    lr_g: float = 1e-4                # TTUR: generator lr / 2 ...
    lr_d: float = 4e-4                # ... discriminator lr x 2 of the paper's 2e-4
    beta1: float = 0.0
    beta2: float = 0.9
    batch_size: int = 16
    max_steps: int = 50000
    ema: bool = False                 # the paper has no EMA; optional here
    ema_decay: float = 0.999
    ema_warmup: bool = False          # min(decay, (1+n)/(10+n)): for short CPU runs
    checkpoint_every: int = 1000
    log_every: int = 50               # loss-curve row every N steps
    bf16: bool = True                 # bf16 autocast, CUDA only (the paper trains in fp32)
    seed: int = 0
    sample_batch_size: int = 16

    # Keys a restarted run may change and still resume its checkpoint: length and bookkeeping.
    RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "sample_batch_size", "bf16")

    # Keys that define the trained network; a checkpoint with other values cannot be resumed.
    MODEL_KEYS = ("image_size", "ngf", "ndf", "num_upsampling", "spade_hidden", "norm_g", "n_scales",
                  "n_layers_d")

    def __post_init__(self):
        self.validate()

    @property
    def upsampling(self) -> int:
        if self.num_upsampling is not None:
            return int(self.num_upsampling)
        count, size = 0, self.image_size
        while size % 2 == 0 and size // 2 >= MIN_START_SIZE:
            count, size = count + 1, size // 2
        return max(count, 1)

    @property
    def start_size(self) -> int:
        return self.image_size // 2 ** self.upsampling

    def validate(self):
        if self.image_size < 8:
            raise InputError(f"spade.image_size must be at least 8, got {self.image_size}")
        up = self.upsampling
        if up < 1 or self.image_size % 2 ** up:
            raise InputError(f"spade.image_size {self.image_size} is not divisible by 2**num_upsampling ({up})")
        if self.norm_g not in NORMS:
            raise InputError(f"spade.norm_g must be one of {NORMS}, got {self.norm_g!r}")
        for key in ("ngf", "ndf", "spade_hidden", "n_scales", "n_layers_d", "batch_size", "checkpoint_every",
                    "log_every", "sample_batch_size"):
            if getattr(self, key) < 1:
                raise InputError(f"spade.{key} must be positive, got {getattr(self, key)}")
        if self.max_steps < 0:
            raise InputError(f"spade.max_steps must be >= 0, got {self.max_steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise InputError(f"spade.ema_decay must be in [0, 1), got {self.ema_decay}")
