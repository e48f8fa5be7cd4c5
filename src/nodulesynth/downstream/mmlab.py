"""Plumbing shared by the downstream study's OpenMMLab trainings (mmpretrain detection, mmdet localization).

- `allow_full_checkpoint_loading`: mmengine 0.10.7 calls `torch.load` without `weights_only`, which newer
  torch refuses for mmengine's checkpoints (they hold numpy and config objects); set before any load.
- `resolve_device`: `nodulesynth.models.device.pick_device` as mmengine's string, the device index kept ("cuda:1"
  stays itself and becomes torch's current device, which the parts of mmengine that say only "cuda" then use).
- `package_config`: a config read from the installed package's own shipped configs (`mmpretrain::...`),
  never a copy kept in this repository.
- `runtime_settings` / `apply_settings`: the common run-time part of a config (work dir, seed, device, quiet logging, no
  automatic checkpoints, no visualisation, the loss-curve hook).
- `optim_wrapper`: `AmpOptimWrapper` on CUDA, plain `OptimWrapper` on CPU (AMP there would only slow down).
- `optimizer_config`: the task's optimizer, fused (one kernel for every parameter).
- `StudyRunner`: mmengine's `Runner`, honouring the chosen device (and `cfg.channels_last`) and keeping the
  console quiet.
- `close_log_files`: closes a finished run's log file.
- `BalancedSampler`: an endless stream of training indices, half from slices with a nodule and half from slices
  without, so that every arm trains at the same class prior whatever synthetic positives it adds.
- `LossCurveHook`: writes `iter, loss, lr` (plus any other logged losses) to a TSV in the work dir, and stops a
  run whose loss is no longer finite; `final_loss` reads the mean of its last iterations back.
"""

import csv
import importlib.util
import logging
import math
import os
import uuid
from pathlib import Path

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import DATA_SAMPLERS, HOOKS
from mmengine.runner import Runner
from torch.utils.data import Sampler

from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path
from nodulesynth.models.device import pick_device

LOSS_HOOK = "NoduleSynthLossCurveHook"
BALANCED_SAMPLER = "NoduleSynthBalancedSampler"
SAMPLERS = ("balanced", "shuffle")


def is_positive(data_info: dict) -> bool:
    """Whether a training sample holds a nodule: mmpretrain's `gt_label` 1, or an mmdet sample with a box."""
    if "gt_label" in data_info:
        return int(data_info["gt_label"]) == 1
    return any(not box.get("ignore_flag", 0) for box in data_info.get("instances", ()))


@DATA_SAMPLERS.register_module(name=BALANCED_SAMPLER)
class BalancedSampler(Sampler):
    """Training indices drawn forever, a nodule slice with probability `positive_fraction` (else a slice without),
    uniformly within each class, seeded. Written here because mmengine ships no class-weighted sampler, and
    torch's WeightedRandomSampler takes neither the dataset nor the seed that mmengine builds samplers with. A torch
    `Sampler`: mmdet's AspectRatioBatchSampler (the localization loader's) refuses anything else.

    Why: arms B and C add synthetic positives to arm A's training set, which moves a plain shuffle's class prior
    (and with it recall, precision and F1 at a fixed cut) with no new information; drawn at one prior, the arms
    differ only in which positives they hold. Distributed: each rank takes every world_size-th draw. A torch
    `Sampler`, as mmdet's aspect-ratio batch sampler requires.
    """

    def __init__(self, dataset, seed=None, positive_fraction: float = 0.5):
        from mmengine.dist import get_dist_info, sync_random_seed

        if not 0.0 < positive_fraction < 1.0:
            raise InputError(f"positive_fraction must lie in (0, 1), got {positive_fraction}")
        self.dataset = dataset  # mmdet's aspect-ratio batch sampler reads it
        labels = np.array([is_positive(dataset.get_data_info(i)) for i in range(len(dataset))], bool)
        self.positive, self.negative = np.flatnonzero(labels), np.flatnonzero(~labels)
        if not len(self.positive) or not len(self.negative):
            raise InputError(f"a balanced sampler needs slices with and without a nodule; the training set has "
                             f"{len(self.positive)} with and {len(self.negative)} without")
        self.positive_fraction = float(positive_fraction)
        self.seed = sync_random_seed() if seed is None else int(seed)
        self.rank, self.world_size = get_dist_info()
        self.size = len(dataset)
        self.dataset = dataset  # AspectRatioBatchSampler reads each drawn sample's shape from it

    def _draws(self):
        rng = np.random.default_rng(self.seed)
        while True:
            take_positive = rng.random(1024) < self.positive_fraction
            n_pos = int(take_positive.sum())
            drawn = np.empty(1024, np.int64)
            drawn[take_positive] = self.positive[rng.integers(len(self.positive), size=n_pos)]
            drawn[~take_positive] = self.negative[rng.integers(len(self.negative), size=1024 - n_pos)]
            yield from drawn.tolist()

    def __iter__(self):
        for i, index in enumerate(self._draws()):
            if i % self.world_size == self.rank:
                yield index

    def __len__(self):
        return self.size

    def set_epoch(self, epoch: int) -> None:  # endless: epochs do not exist here (as mmengine's InfiniteSampler)
        pass


def image_stats(images, chunk: int = 1024) -> tuple[float, float]:
    """(mean, std) of uint8 images [N,H,W] over every pixel, summed a chunk of images at a time: `images.std()`
    would make a float64 copy of them all (tens of GB for a LIDC-sized arm)."""
    total = total_sq = 0.0
    for start in range(0, len(images), chunk):
        part = np.asarray(images[start:start + chunk], np.float64)
        total += float(part.sum())
        total_sq += float(np.square(part).sum())
    count = float(np.prod(np.shape(images)))
    if not count:
        raise InputError("image_stats: no pixels")
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def train_sampler(kind: str, seed: int) -> dict:
    """The training dataloader's sampler config for `kind` (detection/localization.sampler)."""
    if kind not in SAMPLERS:
        raise InputError(f"sampler {kind!r}: expected one of {', '.join(SAMPLERS)}")
    if kind == "balanced":
        return dict(type=BALANCED_SAMPLER, seed=seed)
    return dict(type="InfiniteSampler", shuffle=True, seed=seed)


def allow_full_checkpoint_loading():
    """mmengine 0.10.7 checkpoints cannot be read by torch's weights-only loader: opt out, unless the user chose."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def resolve_device(device: str = "auto") -> str:
    """'cpu', 'cuda' or 'cuda:N': a job given GPU N (`nodulesynth.models.device.job_device`) must train there, not
    on GPU 0 beside another job (StudyRunner moves the model to exactly this; pick_device makes N current)."""
    return str(pick_device(device))


def is_cuda(device: str) -> bool:
    return device.split(":", 1)[0] == "cuda"


def package_config(spec: str):
    """mmengine `Config` of `package::relative/config.py`, read from the installed package's shipped configs.

    mmengine's `get_config` would pip-install a missing package: refuse instead (no network at run time).
    """
    from mmengine.hub import get_config

    package = spec.split("::", 1)[0]
    if "::" not in spec or importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(f"config {spec!r}: package {package!r} is not installed (see requirements.lock)")
    return get_config(spec, pretrained=False)


# The tasks' `optimizer` option -> torch optimizer (mmengine registry name): "sgd" with momentum (the study's) or
# "adamw" (beyond the study: from scratch it moves within a CPU demo's few iterations; momentum unused).
OPTIMIZERS = {"sgd": "SGD", "adamw": "AdamW"}


def optimizer_config(name: str, lr: float, momentum: float, weight_decay: float) -> dict:
    """The optimizer entry of a task's optim_wrapper for the `optimizer` option `name` (one of OPTIMIZERS).

    Fused: one kernel updates every parameter, where torch's default on the CPU loops over the tensors op by op
    (AdamW on the demo's SE-ResNet-50: 2.0 instead of 9.4 ms a step, a sixth of a training iteration;
    benchmarks/downstream_step.py). The same update; on CUDA, AMP's gradient scaler unscales inside the kernel."""
    entry = dict(type=OPTIMIZERS[name], lr=lr, weight_decay=weight_decay, fused=True)
    if name == "sgd":
        entry["momentum"] = momentum
    return entry


def optim_wrapper(device: str, optimizer: dict, **extra) -> dict:
    return dict(type="AmpOptimWrapper" if is_cuda(device) else "OptimWrapper", optimizer=optimizer, **extra)


def runtime_settings(work_dir, seed: int, device: str, log_interval: int = 50) -> dict:
    """Run-time top-level keys of a config, each meant to replace the package's whole entry (`apply_settings`).

    Checkpoints are saved once, by the caller, at the end; the visualisation hook is off, so no window
    or image dump; the loss curve goes to `work_dir/loss.tsv`.
    """
    return dict(
        work_dir=str(work_dir),
        # Unique: mmengine keeps loggers and visualizers global by this name, and two runs may start in one second.
        experiment_name=f"{Path(work_dir).name}-{uuid.uuid4().hex[:8]}",
        device=device,
        launcher="none",
        resume=False,
        log_level="INFO",
        randomness=dict(seed=int(seed), deterministic=False),
        # Fixed input sizes: cuDNN's autotuner picks the fastest convolutions once (no effect on the CPU).
        env_cfg=dict(cudnn_benchmark=is_cuda(device), mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        # Replaces the package's default hooks as a whole, so its visualisation hook is gone too.
        default_hooks=dict(timer=dict(type="IterTimerHook"),
                           logger=dict(type="LoggerHook", interval=int(log_interval)),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=None, sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=[dict(type=LOSS_HOOK, path=str(Path(work_dir) / "loss.tsv"), interval=int(log_interval))],
    )


def apply_settings(cfg, settings: dict):
    """Replace `cfg`'s top-level entries by `settings` (`Config.update` would merge nested dicts instead)."""
    for key, value in settings.items():
        cfg[key] = value
    return cfg


class StudyRunner(Runner):
    """mmengine's Runner with three changes: the model goes to `cfg.device` (mmengine always takes CUDA when it
    sees one), its weights to channels-last memory where `cfg.channels_last` says so, and the console shows
    warnings only while the log file keeps everything."""

    def wrap_model(self, model_wrapper_cfg, model):
        if self.cfg.get("channels_last"):
            model = model.to(memory_format=torch.channels_last)
        device = self.cfg.get("device")
        if device is None or self.distributed:
            return super().wrap_model(model_wrapper_cfg, model)
        return model.to(device)

    def build_logger(self, log_level="INFO", log_file=None, **kwargs):
        logger = super().build_logger(log_level, log_file, **kwargs)
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:  # FileHandler is a StreamHandler subclass: keep it
                handler.setLevel(logging.WARNING)
        return logger


def close_log_files(runner):
    """Close the run's log file (mmengine keeps its loggers alive for the whole process)."""
    for handler in list(runner.logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            runner.logger.removeHandler(handler)


@HOOKS.register_module(name=LOSS_HOOK)
class LossCurveHook(Hook):
    """Per training iteration: iter (1-based), loss, lr and the other logged losses, written to a TSV every
    `interval` iterations and at the end (atomically, so a reader never sees half a file)."""

    priority = "LOW"

    def __init__(self, path, interval: int = 50):
        self.path = Path(path)
        self.interval = max(1, int(interval))
        self.rows = []
        self._lr = float("nan")

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        # Read here: the scheduler hook steps the lr after the iteration, before this hook's after_train_iter.
        lr = runner.optim_wrapper.get_lr()
        self._lr = float(next(iter(lr.values()))[0] if isinstance(lr, dict) else lr)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        values = {k: _scalar(v) for k, v in (outputs or {}).items()}
        values = {k: v for k, v in values.items() if v is not None}
        row = {"iter": runner.iter + 1, "loss": values.pop("loss", float("nan")), "lr": self._lr, **values}
        self.rows.append(row)
        if not math.isfinite(row["loss"]):
            self.write()
            raise FloatingPointError(f"training loss is {row['loss']} at iteration {row['iter']} (lr {self._lr:g}): "
                                     "lower the lr, lengthen the warmup or clip gradients")
        if len(self.rows) % self.interval == 0:
            self.write()

    def after_train(self, runner):
        self.write()

    def write(self):
        columns = []
        for row in self.rows:
            columns.extend(k for k in row if k not in columns)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns or ["iter", "loss", "lr"], delimiter="\t", restval="")
                writer.writeheader()
                writer.writerows(self.rows)


def final_loss(path, window: int) -> float:
    """Mean loss of the last `window` iterations of a loss.tsv: one iteration's loss is too noisy to compare arms."""
    import pandas as pd

    loss = pd.read_csv(path, sep="\t")["loss"].to_numpy(float)
    return float(np.mean(loss[-window:])) if len(loss) else float("nan")


def _scalar(value):
    """float of a logged value (a 0-d tensor, usually); None for anything else."""
    if hasattr(value, "detach"):
        value = value.detach()
        return float(value) if value.numel() == 1 else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def require_checkpoint(section: str, load_from) -> None:
    """A task's `load_from` (a LOCAL checkpoint: nothing is downloaded) must be a file before training starts."""
    if load_from is not None and not Path(load_from).is_file():
        raise FileNotFoundError(f"{section}.load_from: no checkpoint file {load_from}")


def save_model(runner, work_dir) -> Path:
    """The trained weights as work_dir/model.pth (an mmengine checkpoint whose meta holds the config), written
    under a temporary name and renamed: a killed job leaves no half-written model behind."""
    path = Path(work_dir) / "model.pth"
    with atomic_path(path) as tmp:
        runner.save_checkpoint(str(tmp.parent), tmp.name, save_optimizer=False, save_param_scheduler=False,
                               by_epoch=False)
    return path
