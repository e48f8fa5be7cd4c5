"""The study's cost in GPU-hours, per stage, for a config and a cohort size.

  python benchmarks/cost.py                                  # the schema defaults (the paper's study), LIDC-IDRI
  python benchmarks/cost.py --config my.yaml --scans 300 --slices 37000
  python benchmarks/cost.py --measured sdm_h100.json         # SDM stages from benchmarks/sdm.py --write-throughput

FLOPs are counted on the real networks, built by the package from the config (nodulesynth.cost, whose per-job
estimates also size the GPU rules' runtimes: nodulesynth.resources). Time is FLOPs / an achieved throughput: an
assumption stated as an option (--achieved-tflops), or, for the SDM stages, images/s measured on a GPU by
benchmarks/sdm.py.

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
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

# The counts and the per-job estimates are the package's (nodulesynth.cost), which the rules' runtimes use too.
from nodulesynth.cost import (DEVICES, achieved_rates, detection_job_flops, guidance_branches,
                              localization_job_flops, network_evaluations, precision, realism_job_flops,
                              sample_sdm_flops, sample_spade_flops, sdm_flops, train_sdm_flops, train_spade_flops)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "schemas" / "config.schema.yaml"

# LIDC-IDRI: 1,018 CT scans of 1,010 patients; about 125k slices through the lungs, about 5 % of them holding a
# consensus nodule (the study's masks of the scans; README).
LIDC_SCANS = 1018
LIDC_SLICES = 125_000
LIDC_NODULE_FRACTION = 0.05

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

    sdm_f = sdm_flops(sdm)
    # Realism per fold: the fold's real slices (training and test) and both generators' samples of its training
    # scans ((k-1)/k of each generator's maps), through the classifier once; realism reads subsets of these.
    realism_slices = k * (cohort.slices + 2 * maps * (k - 1) / k)
    # SPADE's sampling and the realism features run in fp32, whose convolutions cuDNN runs on TF32 tensor cores (PyTorch's
    # default); detection and localization train under AMP (mmlab.optim_wrapper: fp16, the bf16 rate).
    return [
        Stage("train SDM", generators, generators * train_sdm_flops(sdm), precision(sdm),
              note=f"{sdm.max_steps} steps x {sdm.batch_size}, {sdm_f['train'] / sdm_f['forward']:.2f} forwards "
                   f"an image (grad_checkpoint {sdm.grad_checkpoint})"),
        Stage("sample SDM", generators, generators * sample_sdm_flops(sdm, maps), precision(sdm),
              note=f"{maps:,.0f} maps x {sdm.sample_steps} steps ({sdm.sampler}) x {guidance_branches(sdm)} "
                   f"guidance branches"),
        Stage("train SPADE", generators, generators * train_spade_flops(spade), precision(spade),
              note=f"{spade.max_steps} steps x {spade.batch_size}, G and D steps; {precision(spade)}"),
        Stage("sample SPADE", generators, generators * sample_spade_flops(spade, maps), "tf32",
              note=f"{maps:,.0f} maps, one generator pass"),
        Stage("detection", trainings, trainings * detection_job_flops(detection, size, test_slices), "bf16",
              note=f"{detection.epochs} x {detection.iters_per_epoch} it x {detection.batch_size} "
                   f"({detection.input}), AMP; + {test_slices:,.0f} test slices"),
        Stage("localization", trainings, trainings * localization_job_flops(localization, size, test_slices), "bf16",
              note=f"{localization.epochs} x {localization.iters_per_epoch} it x {localization.batch_size}, "
                   f"{localization.roi_samples} RoIs, AMP; + test"),
        Stage("realism", k, realism_job_flops(detection, size, realism_slices), "tf32",
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
    try:
        rates = achieved_rates(args.device, args.achieved_tflops)
    except ValueError as error:
        raise SystemExit(f"--achieved-tflops: {error}") from None
    achieved = rates["bf16"] / 1e12
    utilisation = achieved / bf16_peak
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
