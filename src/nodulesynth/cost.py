"""What a GPU job of the study costs: FLOPs counted on the real networks, and the time they take at an assumed
achieved throughput. One estimate, shared by the rules (`nodulesynth.resources`: each GPU rule's `runtime`) and
benchmarks/cost.py (the whole study's GPU-hours).

FLOPs are counted on the networks the package builds from the options: the SDM U-Net and SPADE's generator and
discriminator on the meta device (no memory, no data), SE-ResNet-101 and Faster R-CNN built by mmpretrain/mmdet from
the study's own configs (`build_config` of each), moved to the meta device, through
`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs a multiply-add; convolutions and matmuls only, which is nearly
all of these networks' work). Each network is counted once per process and options. torch, mmpretrain and mmdet are
imported only when a count is asked for: the Snakefile imports this module without them.
"""

import tempfile
import warnings

from nodulesynth.errors import InputError

# Dense (no sparsity) peak tensor-core throughput, TFLOP/s, from NVIDIA's data sheets: H100 SXM 989 bf16/fp16 and
# 494.5 TF32; the H200 has the H100 SXM's compute (more, faster memory); A100 SXM 312 and 156.
DEVICES = {"h100": ("H100 SXM", 989.0, 494.5), "h200": ("H200", 989.0, 494.5), "a100": ("A100 SXM", 312.0, 156.0)}
# Achieved fraction of that peak for these convolutional U-Nets and ResNets trained at batch 8-32 on one GPU:
# model-FLOP utilisation of 30-40 % is what well-fed convolutional training reaches in bf16 (attention and
# GroupNorm are memory-bound, small late layers starve the tensor cores); 35 % is an assumption, not a
# measurement: benchmarks/cost.py --measured replaces it for the SDM stages.
DEFAULT_UTILISATION = 0.35
# A CPU core (device cpu, or a GPU job that found no GPU): fp32 convolutions through oneDNN reach some tens of
# GFLOP/s a core (AVX2 FMA peaks near 100); 0.02 TFLOP/s a thread is an assumption on the low side, so that a
# CPU job is not given too little time.
CPU_TFLOPS_PER_THREAD = 0.02


def achieved_rates(device: str = "h100", achieved_tflops: float | None = None) -> dict:
    """FLOP/s by precision ("bf16": bf16/fp16 tensor cores; "tf32": fp32 paths, which cuDNN runs on TF32 tensor
    cores) on one of DEVICES, at `achieved_tflops` bf16 (default DEFAULT_UTILISATION of its peak) and the TF32 rate
    at the same fraction of the TF32 peak."""
    if device not in DEVICES:
        raise InputError(f"device {device!r}: expected one of {sorted(DEVICES)}")
    name, bf16_peak, tf32_peak = DEVICES[device]
    achieved = DEFAULT_UTILISATION * bf16_peak if achieved_tflops is None else float(achieved_tflops)
    if achieved <= 0 or achieved > bf16_peak:
        raise InputError(f"achieved {achieved} TFLOP/s is not in (0, {bf16_peak}] ({name}'s dense bf16 peak)")
    return {"bf16": achieved * 1e12, "tf32": achieved / bf16_peak * tf32_peak * 1e12}


def cpu_rates(threads: int) -> dict:
    """FLOP/s of `threads` CPU cores (CPU_TFLOPS_PER_THREAD), whatever the precision (no tensor cores)."""
    rate = CPU_TFLOPS_PER_THREAD * max(int(threads), 1) * 1e12
    return {"bf16": rate, "tf32": rate}


# FLOPs of the real networks


def cached(count):
    """Each network is counted once for the same options (the paper-sampler variant and tests reuse the downstream
    counts); keyed by repr, as DetectionOptions is not hashable."""
    results = {}

    def wrapper(*args):
        key = repr(args)
        if key not in results:
            results[key] = count(*args)
        return results[key]

    wrapper.__doc__ = count.__doc__
    return wrapper


def counted(fn) -> int:
    """FLOPs of what `fn()` runs (FlopCounterMode: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@cached
def sdm_flops(options) -> dict:
    """Per image: `forward` (one network evaluation) and `train` (forward, backward and, with grad_checkpoint,
    the residual blocks' recomputation), counted on the meta device."""
    import torch

    from nodulesynth.models.sdm.unet import SDMUNet

    with torch.device("meta"):
        model = SDMUNet(options)
    size = options.image_size
    x = torch.zeros(1, options.in_channels, size, size, device="meta")
    t = torch.zeros(1, device="meta")
    cond = torch.zeros(1, options.num_classes, size, size, device="meta")

    def forward():
        with torch.no_grad():
            model.eval()(x, t, cond)

    def train():
        model.train()(x, t, cond).sum().backward()  # the loss itself is elementwise: no FLOPs worth counting

    return {"forward": counted(forward), "train": counted(train)}


@cached
def spade_flops(options) -> dict:
    """Per image: `train` (one SPADETrainer.training_step: G step and D step, D on fake and real) and `forward`
    (the generator alone, as sampling runs it), counted on the meta device."""
    import torch

    from nodulesynth.labels import NUM_CLASSES
    from nodulesynth.models.spade.train import SPADETrainer

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "VGG loss off": the count says whether it runs
        trainer = SPADETrainer(options, device="meta")
    size = options.image_size
    image = torch.zeros(1, 1, size, size, device="meta")
    label = torch.zeros(1, size, size, dtype=torch.long, device="meta")

    def train():
        trainer.training_step(image, label)  # its losses stay tensors (no host read), so meta ones do

    def forward():
        with torch.no_grad():
            trainer.generator.eval()(torch.zeros(1, NUM_CLASSES, size, size, device="meta"))

    return {"train": counted(train), "forward": counted(forward)}


def detection_model(options):
    """SE-ResNet as run_detection builds it (mmpretrain, `detection.build_config`), on the CPU."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    from nodulesynth.downstream.detection import build_config

    with tempfile.TemporaryDirectory() as work_dir:
        cfg = build_config(options, work_dir, "cpu", 0.0, 1.0, "cost")
    model_cfg = cfg.model.copy()
    model_cfg.setdefault("data_preprocessor", cfg.data_preprocessor)
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        return MODELS.build(model_cfg)


def localization_model(options, image_size: int):
    """Faster R-CNN as run_localization builds it (mmdet, `localization.build_config`), on the CPU."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    from nodulesynth.downstream.localization import build_config

    register_all_modules(init_default_scope=False)
    with tempfile.TemporaryDirectory() as data_root:
        cfg = build_config(options, image_size, data_root, data_root, "cpu")
    with DefaultScope.overwrite_default_scope("mmdet"):  # its data preprocessor is registered in mmdet's scope
        return MODELS.build(cfg.model)


@cached
def detection_flops(options, image_size: int) -> dict:
    """SE-ResNet-101 as run_detection builds it (mmpretrain, `detection.build_config`): forward FLOPs of one training
    unit (a slice, or a patch) and of one test slice (its tiles, for patch input)."""
    import torch

    from nodulesynth.downstream.detection import tile_origins

    # Built on the CPU (mmpretrain's ResNet reads a tensor's value while building), then moved to meta.
    model = detection_model(options).to("meta").eval()

    def forward_at(size):
        x = torch.zeros(1, 1, size, size, device="meta")
        with torch.no_grad():
            return counted(lambda: model(x, mode="tensor"))

    whole = forward_at(image_size)
    if options.input == "slice":
        return {"unit": whole, "test_slice": whole, "feature_slice": whole}
    patch = forward_at(options.patch_size)
    tiles = len(tile_origins(image_size, options.patch_size, options.tile_stride)) ** 2
    # realism's detection_features pools the features of whole slices, whatever the training input
    return {"unit": patch, "test_slice": tiles * patch, "feature_slice": whole}


@cached
def localization_flops(options, image_size: int) -> dict:
    """Faster R-CNN X101-32x4d FPN as run_localization builds it (mmdet, `build_config`), forward FLOPs per slice:
    `train` with roi_samples RoIs, `test` with test_proposals. mmcv's RoIAlign and NMS have no meta kernels, so
    backbone, neck and RPN head are counted on the meta device and the RoI head is added by hand: per RoI, its
    fully connected layers (2 x in x out FLOPs each, read off the built head); RoIAlign's bilinear sampling
    (7 x 7 x 256 x 4 points a RoI) is a rounding error beside the first FC's 12544 x 1024."""
    import torch

    model = localization_model(options, image_size).to("meta").eval()
    x = torch.zeros(1, 3, image_size, image_size, device="meta")  # mmdet loads the slices as 3-channel images

    def dense():
        with torch.no_grad():
            model.rpn_head(model.extract_feat(x))

    per_roi = sum(2 * m.in_features * m.out_features for m in model.roi_head.bbox_head.modules()
                  if isinstance(m, torch.nn.Linear))
    base = counted(dense)
    return {"dense": base, "per_roi": per_roi, "train": base + options.roi_samples * per_roi,
            "test": base + options.test_proposals * per_roi}


# What one job runs


def network_evaluations(options) -> int:
    """Network passes of one map: `sample_steps` for every sampler (models/sdm/samplers.py: DDPM and DDIM one a
    respaced step; DPM-Solver++(2M) one a log-SNR time); guidance_branches says how wide each pass is."""
    return options.sample_steps


def guidance_branches(options) -> int:
    """guided_model: scale 1 is the conditional pass alone; otherwise [x; x] with [map; null] in ONE pass of
    twice the batch, i.e. twice the FLOPs of one branch."""
    return 1 if float(options.guidance_scale) == 1.0 else 2


def precision(options) -> str:
    """The rate a generator's job runs at: bf16 where its options' `bf16` is on (SDM and SPADE train and sample
    under bf16 autocast), else TF32 (fp32 paths, as the papers' fp32)."""
    return "bf16" if options.bf16 else "tf32"


# FLOPs of one job of each GPU rule. Training ~ 3 forward passes (forward, then backward's two products: gradients
# of inputs and of weights); the counts above already hold the backward where they say `train`.

def train_sdm_flops(options) -> float:
    """train_sdm: max_steps x batch_size images (the step's passes add up to the batch)."""
    return options.max_steps * options.batch_size * sdm_flops(options)["train"]


def sample_sdm_flops(options, maps: float) -> float:
    """sample_sdm: `maps` maps, each sample_steps network evaluations of guidance_branches images."""
    return maps * network_evaluations(options) * guidance_branches(options) * sdm_flops(options)["forward"]


def train_spade_flops(options) -> float:
    """train_spade: max_steps x batch_size images, G and D steps (at `precision`)."""
    return options.max_steps * options.batch_size * spade_flops(options)["train"]


def sample_spade_flops(options, maps: float) -> float:
    """sample_spade: `maps` maps, one generator pass each."""
    return maps * spade_flops(options)["forward"]


def detection_job_flops(options, image_size: int, test_slices: float) -> float:
    """detect: the schedule's training units (slices or patches), then `test_slices` test slices scored."""
    counts = detection_flops(options, image_size)
    training = 3 * counts["unit"] * options.epochs * options.iters_per_epoch * options.batch_size
    return training + test_slices * counts["test_slice"]


def localization_job_flops(options, image_size: int, test_slices: float) -> float:
    """localize: the schedule's iterations with roi_samples RoIs a slice, then `test_slices` test slices."""
    counts = localization_flops(options, image_size)
    return 3 * counts["train"] * options.total_iters * options.batch_size + test_slices * counts["test"]


def realism_job_flops(options, image_size: int, slices: float) -> float:
    """realism: the arm-A classifier's features over `slices` slices (an upper bound: it draws subsets)."""
    return slices * detection_flops(options, image_size)["feature_slice"]


def job_seconds(flops: float, precision: str, rates: dict) -> float:
    """Seconds of `flops` at `rates` (achieved_rates or cpu_rates) for the job's precision."""
    return flops / rates[precision]
