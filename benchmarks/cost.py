"""The study's cost in GPU-hours, per stage, for a config and a cohort size.

  python benchmarks/cost.py                                  # the schema defaults (the paper's study), LIDC-IDRI
  python benchmarks/cost.py --config my.yaml --scans 300 --slices 37000
  python benchmarks/cost.py --measured sdm_h100.json         # SDM stages from benchmarks/sdm.py --write-throughput

FLOPs are counted on the real networks, built by the package from the config: the SDM U-Net and SPADE's
generator and discriminator on the meta device (no memory, no data), SE-ResNet-101 and Faster R-CNN built by
mmpretrain/mmdet from the study's own configs (`detection_config`, `build_config`), moved to the meta device, and
run through `torch.utils.flop_counter.FlopCounterMode` (2 FLOPs a multiply-add; convolutions and matmuls only,
which is nearly all of these networks' work). Time is FLOPs / an achieved throughput: an assumption stated as an
option (--achieved-tflops), or, for the SDM stages, images/s measured on a GPU by benchmarks/sdm.py.

Stages (what the workflow runs, counted from the same options the rules pass):
  train SDM / SPADE     k fold generators + the holdout generator, max_steps x batch_size images each
  sample SDM / SPADE    per generator, the maps the sampling plans choose (synthesis.*): for a fold generator
                        its training scans (sample_*) plus its test scans (sample_*_heldout), i.e. every scan; the
                        holdout generator every scan. SDM: sample_steps network evaluations a map, both
                        classifier-free guidance branches in each (one batched pass of twice the batch)
  detection/localization  one training per arm per fold (A, B, C and, with downstream.controls, P and N), then
                        the fold's test slices scored
  realism               per fold, the arm-A classifier's features over that fold's slices (real and both
                        generators' synthetic sets): an upper bound, the stage draws subsets of them
Not counted: ingest, masks, folds, audit, fidelity, stats, report (CPU jobs).

The last line: `total: <N> GPU-hours (<device>, <assumption>)`.
"""

import argparse
import json
import math
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"

# LIDC-IDRI: 1,018 CT scans of 1,010 patients; about 125k slices through the lungs, about 5 % of them holding a
# consensus nodule (the study's masks of the scans; README).
LIDC_SCANS = 1018
LIDC_SLICES = 125_000
LIDC_NODULE_FRACTION = 0.05

# Dense (no sparsity) peak tensor-core throughput, TFLOP/s, from NVIDIA's data sheets: H100 SXM 989 bf16/fp16 and
# 494.5 TF32; the H200 has the H100 SXM's compute (more, faster memory); A100 SXM 312 and 156.
DEVICES = {"h100": ("H100 SXM", 989.0, 494.5), "h200": ("H200", 989.0, 494.5), "a100": ("A100 SXM", 312.0, 156.0)}
# Achieved fraction of that peak for these convolutional U-Nets and ResNets trained at batch 8-32 on one GPU:
# model-FLOP utilisation of 30-40 % is what well-fed convolutional training reaches in bf16 (attention and
# GroupNorm are memory-bound, small late layers starve the tensor cores); 35 % is an assumption, not a
# measurement: --measured replaces it for the SDM stages.
DEFAULT_UTILISATION = 0.35
TARGET_HOURS = 150.0


# ------------------------------------------------------------------------------------------------------------
# The config


def study_config(path=None) -> dict:
    """The config the workflow would run: `path`'s sections over the schema's defaults, validated by the schema
    (snakemake's validate, as the Snakefile does: it fills in every default)."""
    from snakemake.utils import validate

    config = {}
    if path:
        config = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: not a YAML mapping of config sections")
    validate(config, str(SCHEMA))
    return config


# ------------------------------------------------------------------------------------------------------------
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
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@cached
def sdm_flops(options) -> dict:
    """Per image: `forward` (one network evaluation) and `train` (forward, backward and, with grad_checkpoint,
    the residual blocks' recomputation), counted on the meta device."""
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


@cached
def detection_flops(options, image_size: int) -> dict:
    """SE-ResNet-101 as run_detection builds it (mmpretrain, `detection_config`): forward FLOPs of one training
    unit (a slice, or a patch) and of one test slice (its tiles, for patch input)."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    from nodulesynth.downstream.detection import detection_config, tile_origins

    with tempfile.TemporaryDirectory() as work_dir:
        cfg = detection_config(options, work_dir, "cpu", 0.0, 1.0, "cost")
    model_cfg = cfg.model.copy()
    model_cfg.setdefault("data_preprocessor", cfg.data_preprocessor)
    # Built on the CPU (mmpretrain's ResNet reads a tensor's value while building), then moved to meta.
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        model = MODELS.build(model_cfg).to("meta").eval()

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
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    from nodulesynth.downstream.localization import build_config

    register_all_modules(init_default_scope=False)
    with tempfile.TemporaryDirectory() as data_root:
        cfg = build_config(options, image_size, data_root, data_root, "cpu")
    with DefaultScope.overwrite_default_scope("mmdet"):  # its data preprocessor is registered in mmdet's scope
        model = MODELS.build(cfg.model).to("meta").eval()
    x = torch.zeros(1, 3, image_size, image_size, device="meta")  # mmdet loads the slices as 3-channel images

    def dense():
        with torch.no_grad():
            model.rpn_head(model.extract_feat(x))

    per_roi = sum(2 * m.in_features * m.out_features for m in model.roi_head.bbox_head.modules()
                  if isinstance(m, torch.nn.Linear))
    base = counted(dense)
    return {"dense": base, "per_roi": per_roi, "train": base + options.roi_samples * per_roi,
            "test": base + options.test_proposals * per_roi}


# ------------------------------------------------------------------------------------------------------------
# What the workflow runs


@dataclass(frozen=True)
class Cohort:
    scans: int = LIDC_SCANS
    slices: int = LIDC_SLICES
    nodule_fraction: float = LIDC_NODULE_FRACTION

    def __post_init__(self):
        if self.scans < 1 or self.slices < self.scans:
            raise ValueError(f"cohort: {self.slices} slices in {self.scans} scans (need at least a slice a scan)")
        if not 0 <= self.nodule_fraction <= 1:
            raise ValueError(f"cohort: nodule fraction {self.nodule_fraction} is not in [0, 1]")

    @property
    def slices_per_scan(self) -> float:
        return self.slices / self.scans


def maps_per_scan(synthesis: dict, cohort: Cohort) -> float:
    """Expected maps `choose_maps` picks from one scan (models/transplant.py), on average over the cohort."""
    per_scan = cohort.slices_per_scan
    nodule = per_scan * cohort.nodule_fraction
    spaced_max = synthesis["max_slices_per_scan"]
    if synthesis["mask_source"] == "transplant":  # nodule-free maps, each given a nodule
        free = per_scan - nodule
        return free if spaced_max is None else min(spaced_max, free)
    if spaced_max is None:
        return per_scan  # every slice, the nodule ones among them
    spaced = min(spaced_max, per_scan)
    wanted = synthesis["nodule_maps_per_scan"]
    nodule_maps = nodule if wanted is None else min(wanted, nodule)
    # The union: an evenly spaced map that holds a nodule (with the nodule fraction's chance) is one map, not two.
    overlap = spaced * cohort.nodule_fraction * (nodule_maps / nodule if nodule else 0.0)
    return spaced + nodule_maps - overlap


def sampled_maps(config: dict, cohort: Cohort) -> float:
    """Maps each generator samples: a fold generator its training scans (sample_*) and its test scans
    (sample_*_heldout), i.e. every scan once; the holdout generator every scan (it has no test scans)."""
    return cohort.scans * maps_per_scan(config["synthesis"], cohort)


def network_evaluations(options) -> int:
    """Network passes of one map: `sample_steps` for every sampler (models/sdm/samplers.py: DDPM and DDIM one a
    respaced step; DPM-Solver++(2M) one a log-SNR time); guidance_branches says how wide each pass is."""
    return options.sample_steps


def guidance_branches(options) -> int:
    """guided_model: scale 1 is the conditional pass alone; otherwise [x; x] with [map; null] in ONE pass of
    twice the batch, i.e. twice the FLOPs of one branch."""
    return 1 if float(options.guidance_scale) == 1.0 else 2


@dataclass
class Stage:
    name: str
    count: int            # jobs
    flops: float          # all jobs together
    precision: str        # "bf16" (bf16/fp16 tensor cores) or "tf32" (fp32 paths)
    seconds: float = None  # measured time, all jobs together; None: FLOPs / the assumed rate
    note: str = ""


def study_stages(config: dict, cohort: Cohort, sdm_options=None) -> list[Stage]:
    """The study's GPU stages with their FLOPs (see the module docstring for what each counts)."""
    from nodulesynth.downstream.datasets import study_arms
    from nodulesynth.downstream.detection import DetectionOptions
    from nodulesynth.downstream.localization import LocalizationOptions
    from nodulesynth.models.sdm.options import SDMOptions
    from nodulesynth.models.spade.options import SPADEOptions

    sdm = sdm_options or SDMOptions.from_config(config["sdm"])
    spade = SPADEOptions.from_config(config["spade"])
    detection = DetectionOptions.from_config(config["detection"])
    localization = LocalizationOptions.from_config(config["localization"])
    if sdm.image_size != spade.image_size:
        raise ValueError(f"sdm.image_size {sdm.image_size} and spade.image_size {spade.image_size} differ: the "
                         f"downstream arms need one size")
    size = sdm.image_size  # the downstream slices are the generators' size (rules/common.smk)
    k = config["folds"]["k"]
    generators = k + 1  # the fold generators and the holdout generator
    trainings = len(study_arms(controls=config["downstream"]["controls"])) * k
    maps = sampled_maps(config, cohort)
    test_slices = cohort.slices / k  # a fold's test patients' slices

    sdm_f, spade_f = sdm_flops(sdm), spade_flops(spade)
    det_f, loc_f = detection_flops(detection, size), localization_flops(localization, size)
    # Training ~ 3 forward passes (forward, then backward's two products: gradients of inputs and of weights).
    det_train = 3 * det_f["unit"] * detection.epochs * detection.iters_per_epoch * detection.batch_size
    loc_train = 3 * loc_f["train"] * localization.total_iters * localization.batch_size
    # Realism per fold: the fold's real slices (training and test) and both generators' samples of its training
    # scans ((k-1)/k of each generator's maps), through the classifier once; realism reads subsets of these.
    realism_slices = k * (cohort.slices + 2 * maps * (k - 1) / k)
    sdm_precision = "bf16" if sdm.bf16 else "tf32"
    # SPADE's sampling and the realism features run in fp32 (SPADE trains in bf16 unless spade.bf16 is false), whose convolutions cuDNN runs on TF32 tensor cores (PyTorch's
    # default); detection and localization train under AMP (mmlab.optim_wrapper: fp16, the bf16 rate).
    return [
        Stage("train SDM", generators, generators * sdm.max_steps * sdm.batch_size * sdm_f["train"], sdm_precision,
              note=f"{sdm.max_steps} steps x {sdm.batch_size}, {sdm_f['train'] / sdm_f['forward']:.2f} forwards "
                   f"an image (grad_checkpoint {sdm.grad_checkpoint})"),
        Stage("sample SDM", generators, generators * maps * network_evaluations(sdm) * guidance_branches(sdm)
              * sdm_f["forward"], sdm_precision,
              note=f"{maps:,.0f} maps x {sdm.sample_steps} steps ({sdm.sampler}) x {guidance_branches(sdm)} "
                   f"guidance branches"),
        Stage("train SPADE", generators, generators * spade.max_steps * spade.batch_size * spade_f["train"],
              "bf16" if spade.bf16 else "tf32",
              note=f"{spade.max_steps} steps x {spade.batch_size}, G and D steps; {'bf16' if spade.bf16 else 'fp32'}"),
        Stage("sample SPADE", generators, generators * maps * spade_f["forward"], "tf32",
              note=f"{maps:,.0f} maps, one generator pass"),
        Stage("detection", trainings, trainings * (det_train + test_slices * det_f["test_slice"]), "bf16",
              note=f"{detection.epochs} x {detection.iters_per_epoch} it x {detection.batch_size} "
                   f"({detection.input}), AMP; + {test_slices:,.0f} test slices"),
        Stage("localization", trainings, trainings * (loc_train + test_slices * loc_f["test"]), "bf16",
              note=f"{localization.epochs} x {localization.iters_per_epoch} it x {localization.batch_size}, "
                   f"{localization.roi_samples} RoIs, AMP; + test"),
        Stage("realism", k, realism_slices * det_f["feature_slice"], "tf32",
              note=f"{realism_slices / k:,.0f} slices a fold (upper bound)"),
    ]


# ------------------------------------------------------------------------------------------------------------
# Time


def read_measured(path, options) -> dict:
    """The throughput file of benchmarks/sdm.py --write-throughput; refused when its network is not `options`'."""
    from nodulesynth.models.sdm.options import SDMOptions

    path = Path(path)
    try:
        measured = json.loads(path.read_text())
        recorded = measured["options"]
        rate, sampling = float(measured["train_images_per_s"]), measured["sampling"]
        float(sampling["seconds_per_image"]), int(sampling["steps"]), float(sampling["guidance_scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a throughput file of benchmarks/sdm.py --write-throughput ({error})") \
            from None
    keys = SDMOptions.MODEL_KEYS + ("grad_checkpoint", "bf16")
    differ = [f"{key} {recorded.get(key)!r} (config {getattr(options, key)!r})" for key in keys
              if json.loads(json.dumps(getattr(options, key))) != recorded.get(key)]
    if differ:
        raise ValueError(f"{path}: measured on another SDM than the config's: {'; '.join(differ)}")
    if rate <= 0:
        raise ValueError(f"{path}: train_images_per_s must be positive, got {rate}")
    return measured


def apply_measured(stages: list[Stage], measured: dict, options, config: dict, cohort: Cohort):
    """SDM training and sampling times from measured images/s and seconds an image (scaled to the config's
    sample_steps and guidance branches: a network evaluation costs the same whatever the sampler)."""
    from nodulesynth.models.sdm.options import SDMOptions

    generators = config["folds"]["k"] + 1
    sampling = measured["sampling"]
    measured_branches = guidance_branches(SDMOptions(guidance_scale=float(sampling["guidance_scale"])))
    per_evaluation = float(sampling["seconds_per_image"]) / int(sampling["steps"]) / measured_branches
    for stage in stages:
        if stage.name == "train SDM":
            stage.seconds = generators * options.max_steps * options.batch_size / float(measured["train_images_per_s"])
        elif stage.name == "sample SDM":
            stage.seconds = (generators * sampled_maps(config, cohort) * network_evaluations(options)
                             * guidance_branches(options) * per_evaluation)


def hours_text(hours: float) -> str:
    return f"{hours:,.0f}" if hours >= 100 else f"{hours:.2f}"


def stage_hours(stage: Stage, rates: dict) -> float:
    seconds = stage.seconds if stage.seconds is not None else stage.flops / rates[stage.precision]
    return seconds / 3600


def over_target(target: float, stages: list[Stage], hours: list[float], sdm):
    """Which stage dominates, and what would bring the total under `target` (nothing is changed to get there)."""
    total = sum(hours)
    top_hours, top = max(zip(hours, stages), key=lambda pair: pair[0])
    rest = total - top_hours
    print(f"above the target of {target:g} GPU-hours: {top.name} takes {100 * top_hours / total:.0f} % "
          f"({top_hours:,.0f} h); the other stages {rest:,.0f} h")
    if top.name != "train SDM" or rest >= target:
        return
    fraction = (target - rest) / top_hours  # of the SDM training's hours that fit
    print(f"  under it: sdm.max_steps {math.floor(sdm.max_steps * fraction):,} (of {sdm.max_steps:,}), or an "
          f"achieved throughput {1 / fraction:.2f}x the one used here, or a smaller network "
          f"(sdm.model_channels, channel_mult)")
    if sdm.grad_checkpoint and top.seconds is None:
        ratio = sdm_flops(sdm.replace(grad_checkpoint=False))["train"] / sdm_flops(sdm)["train"]
        print(f"  sdm.grad_checkpoint off saves the recomputation: {top_hours * ratio:,.0f} h for SDM training, if "
              f"its activations fit (smaller micro_batch_size; benchmarks/sdm.py --memory)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (as `snakemake --configfile`): keys it leaves out take the "
                                    "schema's defaults, the paper's study (default: the defaults alone)")
    p.add_argument("--scans", type=int, default=LIDC_SCANS, help=f"CT scans in the cohort (LIDC-IDRI: {LIDC_SCANS})")
    p.add_argument("--slices", type=int, default=LIDC_SLICES, help=f"lung slices in the cohort (LIDC-IDRI: "
                                                                   f"about {LIDC_SLICES:,})")
    p.add_argument("--nodule-fraction", type=float, default=LIDC_NODULE_FRACTION,
                   help="fraction of the slices that hold a nodule (LIDC-IDRI consensus nodules: about 0.05)")
    p.add_argument("--device", choices=sorted(DEVICES), default="h100")
    p.add_argument("--achieved-tflops", type=float, help="achieved bf16 TFLOP/s (default: 35 %% of the device's "
                   "dense peak, 346 on an H100 SXM); fp32 paths run at the same fraction of the TF32 peak")
    p.add_argument("--measured", help="JSON of benchmarks/sdm.py --write-throughput: measured SDM training "
                                      "images/s and sampling s/image replace the assumption for the SDM stages")
    p.add_argument("--target", type=float, default=TARGET_HOURS, help="GPU-hours the study should fit in")
    return p.parse_args(argv)


def main(argv=None):
    from nodulesynth.models.sdm.options import SDMOptions

    args = parse_args(argv)
    torch.set_num_threads(1)  # the models are built on the CPU once; nothing else runs there
    config = study_config(args.config)
    cohort = Cohort(args.scans, args.slices, args.nodule_fraction)
    name, bf16_peak, tf32_peak = DEVICES[args.device]
    achieved = args.achieved_tflops if args.achieved_tflops is not None else DEFAULT_UTILISATION * bf16_peak
    if achieved <= 0 or achieved > bf16_peak:
        raise SystemExit(f"--achieved-tflops {achieved} is not in (0, {bf16_peak}] ({name}'s dense bf16 peak)")
    utilisation = achieved / bf16_peak
    rates = {"bf16": achieved * 1e12, "tf32": utilisation * tf32_peak * 1e12}
    assumption = (f"{achieved:.0f} bf16 TFLOP/s achieved = {100 * utilisation:.0f} % of {bf16_peak:g}, TF32 at "
                  f"{utilisation * tf32_peak:.0f}")

    sdm = SDMOptions.from_config(config["sdm"])
    stages = study_stages(config, cohort, sdm)
    if args.measured:
        measured = read_measured(args.measured, sdm)
        apply_measured(stages, measured, sdm, config, cohort)
        assumption = f"SDM measured on {measured.get('device', '?')} ({args.measured}); others {assumption}"

    hours = [stage_hours(stage, rates) for stage in stages]
    total = sum(hours)
    print(f"cohort: {cohort.scans:,} scans, {cohort.slices:,} slices, {100 * cohort.nodule_fraction:.1f} % with a "
          f"nodule; {config['folds']['k']} folds; config: {args.config or 'schema defaults, the paper study'}")
    print(f"\n{'stage':<14}{'count':>6}{'PFLOP':>12}{'GPU-hours':>11}{'share':>8}  what")
    for stage, hour in zip(stages, hours):
        timing = " [measured]" if stage.seconds is not None else ""
        print(f"{stage.name:<14}{stage.count:>6}{stage.flops / 1e15:>12,.0f}{hour:>11,.1f}{100 * hour / total:>7.1f}%"
              f"  {stage.note}{timing}")

    # Where the earlier estimate of ~5,000 came from: the paper's sampler on every lung slice.
    paper = sdm.replace(sampler="ddpm", sample_steps=sdm.diffusion_steps)
    every_slice = {**config, "synthesis": {**config["synthesis"], "max_slices_per_scan": None}}
    paper_stages = study_stages(every_slice, cohort, paper)
    if args.measured:
        apply_measured(paper_stages, measured, paper, every_slice, cohort)
    paper_total = sum(stage_hours(stage, rates) for stage in paper_stages)
    paper_sampling = stage_hours(next(s for s in paper_stages if s.name == "sample SDM"), rates)
    print(f"\nwith the paper's sampler (ddpm {paper.sample_steps}) on every lung slice: "
          f"{hours_text(paper_total)} GPU-hours, "
          f"{100 * paper_sampling / paper_total:.0f} % of it SDM sampling")

    if total > args.target:
        over_target(args.target, stages, hours, sdm)
    print(f"total: {hours_text(total)} GPU-hours ({name}, {assumption})")
    return total


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
