"""Nodule detection for the downstream study: does this slice (or patch) show a nodule?

mmpretrain's own `seresnet101_8xb32_in1k` config, read from the installed package, adapted with
mmengine's `Config`: two classes (no nodule / nodule), one input channel, our in-memory dataset and
pipeline, SGD with step decay over an iteration-based loop, trained with mmengine's `Runner`.

Input units (`DetectionOptions.input`):
- "slice": the whole slice, label = has_nodule.
- "patch": in training, a `patch_size` square centred on the slice's (largest) nodule box for nodule slices,
  at a random lung pixel (label 1 or 2) for the others; deterministic given the seed. A test slice is cut
  without its labels (which a detector in use would not have): into tiles of `patch_size` every
  `patch_stride` pixels (default half a patch, so any nodule up to half a patch wide lies whole in some
  tile) covering the slice, and scored as its highest tile score: still one prediction per test slice.

`run_detection` trains on an `ArmDataset`'s training slices and scores its test slices;
`detection_features` gives a trained classifier's pooled 2048-d features (for the feature-space Fréchet
distance).
"""

import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mmpretrain.datasets import BaseDataset
from mmpretrain.registry import DATASETS

from nodulesynth.downstream import mmlab
from nodulesynth.downstream.datasets import ArmDataset, SliceSet, split_counts
from nodulesynth.downstream.metrics import detection_metrics
from nodulesynth.errors import InputError
from nodulesynth.labels import LEFT_LUNG, NODULE, RIGHT_LUNG
from nodulesynth.options import SectionOptions

BASE_CONFIG = "mmpretrain::seresnet/seresnet101_8xb32_in1k.py"
CLASSES = ("no_nodule", "nodule")
INPUTS = ("slice", "patch")
DEPTHS = (50, 101, 152)  # mmpretrain's SE-ResNets


@dataclass
class DetectionOptions(SectionOptions):
    """The `detection` config section; defaults are the study's real run (50 epochs of 128 iterations)."""

    SECTION = "detection"

    epochs: int = 50
    iters_per_epoch: int = 128
    batch_size: int = 8
    lr: float = 0.1
    # "sgd" (with momentum: the study's) or "adamw" (momentum unused; the demo's few iterations from scratch: SGD's
    # loss did not fall within 32 iterations at lr 0.01 and diverged at 0.05-0.1)
    optimizer: str = "sgd"
    lr_steps: list[int] = field(default_factory=lambda: [30, 40])  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    # The network: SE-ResNet of this depth, its stem and first stage this many channels wide (each later stage
    # doubles them). The study's is SE-ResNet-101 at mmpretrain's 64; the demo's narrow SE-ResNet-50 at 16 (a
    # sixteenth of the FLOPs) learns on a CPU within minutes what the full one does not (README).
    depth: int = 101
    base_channels: int = 64
    momentum: float = 0.9
    weight_decay: float = 1e-4
    flip_prob: float = 0.5  # random horizontal flip of training inputs
    input: str = "slice"
    patch_size: int = 64
    patch_stride: int | None = None  # test tiles' stride (input "patch"); None: patch_size // 2
    # Training nodule patches: the centre moved by up to this many pixels on each axis (uniform, seeded), so the
    # classifier also sees nodules off-centre, as the test tiles show them (0: centred on the box, as before).
    patch_jitter: int = 0
    # Training nodule-free patches: this fraction is centred anywhere a tile can lie (body wall, mediastinum, air),
    # the rest in the lung. Test tiles cover the whole slice, and a classifier that saw lung only scores the
    # rest at random (measured on the demo: body-wall tiles at 1.0 in every slice, AUC 0.5). 0: lung only.
    negatives_anywhere: float = 0.0
    # Input units enlarged this many times (pixel replication) before the network: SE-ResNet's stem divides a
    # unit by 4, leaving a 3-px nodule of a 32-px patch under one feature pixel (1: as cut).
    zoom: int = 1
    load_from: str | None = None  # optional local mmpretrain checkpoint (never downloaded)
    threshold: float = 0.5
    # Training draws: "balanced" (half with a nodule, in every arm: see mmlab.BalancedSampler), or "shuffle"
    # (a plain shuffle, as the study did: its class prior moves with the synthetic positives an arm adds).
    sampler: str = "balanced"
    num_workers: int = 0  # set by the job from its threads (cli: all but one), not a config key
    seed: int = 0

    def __post_init__(self):
        self.validate()

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage, globally pooled by the config's neck: the head's input (2048 in the study)."""
        return self.base_channels * 8 * 4  # three doublings, and the bottleneck's expansion of 4

    def validate(self):
        def bad(key, why):
            raise InputError(f"detection.{key} = {getattr(self, key)!r}: {why}")

        for key in ("epochs", "iters_per_epoch", "batch_size", "patch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            bad("num_workers", "must be an integer >= 0")
        if not isinstance(self.lr_steps, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in self.lr_steps):
            bad("lr_steps", "must be a list of positive epoch numbers")
        for key in ("lr", "momentum", "weight_decay", "lr_gamma"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                bad(key, "must be a number >= 0")
        if self.optimizer not in mmlab.OPTIMIZERS:
            bad("optimizer", f"must be one of {tuple(mmlab.OPTIMIZERS)}")
        if self.depth not in DEPTHS:
            bad("depth", f"must be one of mmpretrain's SE-ResNet depths {DEPTHS}")
        # Each squeeze-and-excitation block squeezes its channels 16-fold: the first stage's 4 x base_channels.
        if not isinstance(self.base_channels, int) or self.base_channels < 4:
            bad("base_channels", "must be an integer of at least 4")
        if self.input not in INPUTS:
            bad("input", f"must be one of {INPUTS}")
        if not 0.0 <= self.threshold <= 1.0:
            bad("threshold", "must lie in [0, 1]")
        if self.sampler not in mmlab.SAMPLERS:
            bad("sampler", f"must be one of {mmlab.SAMPLERS}")
        if not 0.0 <= self.flip_prob <= 1.0:
            bad("flip_prob", "must lie in [0, 1]")
        if self.patch_stride is not None and (not isinstance(self.patch_stride, int)
                                              or not 1 <= self.patch_stride <= self.patch_size):
            bad("patch_stride", f"must be an integer from 1 to patch_size ({self.patch_size}), so the test tiles "
                                "cover the slice, or null (half a patch)")
        if not isinstance(self.patch_jitter, int) or not 0 <= self.patch_jitter < self.patch_size // 2:
            bad("patch_jitter", f"must be an integer from 0 to below half a patch ({self.patch_size // 2}), so the "
                                "nodule's centre stays inside the patch")
        if not isinstance(self.zoom, int) or self.zoom < 1:
            bad("zoom", "must be a positive integer")
        if not isinstance(self.negatives_anywhere, (int, float)) or not 0.0 <= self.negatives_anywhere <= 1.0:
            bad("negatives_anywhere", "must lie in [0, 1]")


    @property
    def tile_stride(self) -> int:
        return self.patch_stride or max(1, self.patch_size // 2)


# ---------------------------------------------------------------------------------------------------------
# Input units


def unit_centres(slices: SliceSet, seed) -> np.ndarray:
    """[N,2] (x, y) integer patch centres: the largest nodule box's centre on nodule slices, a random lung
    pixel (label 1 or 2; the body, then the image centre, where a map has no lung) on the others."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((len(slices), 2), np.int64)
    for row in range(len(slices)):
        label = slices.label[row]
        if slices.has_nodule[row]:
            boxes = slices.boxes_of(row)
            if len(boxes):
                x0, y0, x1, y1 = boxes[np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))]
                centres[row] = int((x0 + x1 - 1) // 2), int((y0 + y1 - 1) // 2)  # x1, y1 exclusive
                continue
            ys, xs = np.nonzero(label == NODULE)
            if not len(ys):
                raise InputError(f"slice {row} ({slices.scan_id[row]}, index {slices.slice_index[row]}) "
                                 "has a nodule but neither a box nor nodule pixels")
            centres[row] = int(round(xs.mean())), int(round(ys.mean()))
            continue
        ys, xs = np.nonzero(np.isin(label, (LEFT_LUNG, RIGHT_LUNG)))
        if not len(ys):
            ys, xs = np.nonzero(label > 0)
        if len(ys):
            pick = rng.integers(len(ys))
            centres[row] = xs[pick], ys[pick]
        else:
            centres[row] = label.shape[1] // 2, label.shape[0] // 2
    return centres


def crop_patches(images: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """[N,size,size] crops with pixel (x, y) of `centres` at [size//2, size//2]; zero (air) outside the slice,
    so a patch stays centred near the border."""
    padded = np.pad(images, ((0, 0), (size, size), (size, size)))
    out = np.empty((len(images), size, size), images.dtype)
    for i, (x, y) in enumerate(centres):
        top, left = y + size - size // 2, x + size - size // 2
        out[i] = padded[i, top:top + size, left:left + size]
    return out


def unit_images(slices: SliceSet, options: DetectionOptions, seed) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,s,s], labels int64 [N]) of the chosen training input unit, one per slice (patches are
    placed by the labels: training may use them; test slices go through `slice_units`, which does not). Nodule
    patches move off their box centre by up to `patch_jitter` pixels per axis, and a `negatives_anywhere` share of
    the nodule-free ones is centred anywhere a test tile can lie (draws of their own for `seed`). Each kind of
    draw has its own stream, drawn row by row: a row's patch does not depend on the rows after it, so the real
    slices every arm shares (first in its training set) give every arm the same patches."""
    labels = np.asarray(slices.has_nodule, bool).astype(np.int64)
    if options.input == "slice":
        return zoomed(np.ascontiguousarray(slices.image), options.zoom), labels
    centres = unit_centres(slices, seed)
    jitter_rng, anywhere_rng, where_rng = (np.random.default_rng([*np.atleast_1d(seed), k]) for k in (1, 2, 3))
    if options.patch_jitter:
        jitter = jitter_rng.integers(-options.patch_jitter, options.patch_jitter + 1, centres.shape)
        centres = centres + jitter * labels[:, None]  # nodule-free patches are already drawn anywhere in the lung
    anywhere = (labels == 0) & (anywhere_rng.random(len(labels)) < options.negatives_anywhere)
    if anywhere.any():
        # uniform over the centres of patches lying within the slice, as test tiles do (slice_units)
        size, (height, width) = options.patch_size, slices.image.shape[1:]
        low = size // 2
        high = [max(low, width - size + low) + 1, max(low, height - size + low) + 1]
        centres[anywhere] = where_rng.integers(low, high, (int(anywhere.sum()), 2))
    return zoomed(crop_patches(slices.image, centres, options.patch_size), options.zoom), labels


def zoomed(units: np.ndarray, factor: int) -> np.ndarray:
    """Units [..., h, w] enlarged `factor` times along h and w by pixel replication (nearest neighbour)."""
    if factor == 1:
        return units
    return np.repeat(np.repeat(units, factor, axis=-2), factor, axis=-1)


def tile_origins(length: int, size: int, stride: int) -> np.ndarray:
    """Offsets of tiles of `size` every `stride` pixels along a side of `length`, the last one flush with the
    far edge so the tiles cover the side; [0] where one tile covers it."""
    if length <= size:
        return np.zeros(1, np.int64)
    origins = np.arange(0, length - size + 1, stride)
    return origins if origins[-1] == length - size else np.append(origins, length - size)


def slice_units(images: np.ndarray, options: DetectionOptions) -> np.ndarray:
    """uint8 [N,T,s,s]: the T units scored for each of N test slices, from the images alone (no label, box or
    lesion map). Input "slice": the slice itself (T = 1); "patch": tiles of `patch_size` at the options'
    stride covering the slice (a slice smaller than a patch is zero-padded around it, as `crop_patches` pads)."""
    images = np.asarray(images)
    if options.input == "slice":
        return images[:, None]
    size = options.patch_size
    pad = [(0, 0)] + [((size - n) // 2, size - n - (size - n) // 2) if n < size else (0, 0) for n in images.shape[1:]]
    images = np.pad(images, pad)
    ys, xs = (tile_origins(n, size, options.tile_stride) for n in images.shape[1:])
    windows = np.lib.stride_tricks.sliding_window_view(images, (size, size), axis=(1, 2))  # a view: no copy yet
    return windows[:, ys][:, :, xs].reshape(len(images), len(ys) * len(xs), size, size)


# Pixels per inference batch when scoring test units: small units go through many at a time, because on a CPU a
# batch of 8 32-px patches costs SE-ResNet-101 about as much per batch as 64 of them (the cost is per layer, not per
# pixel, at that size: 26 ms a patch at batch 8, 5 ms at 64). Eval mode: the batch does not change a score.
INFERENCE_PIXELS = 64 * 32 * 32


def inference_batch_size(unit_shape, options: DetectionOptions) -> int:
    """Units per inference batch: INFERENCE_PIXELS' worth of `unit_shape` (h, w), at least the training batch."""
    return max(options.batch_size, INFERENCE_PIXELS // int(np.prod(unit_shape)))


def score_slices(model, images: np.ndarray, options: DetectionOptions, max_units: int = 4096) -> np.ndarray:
    """Score per test slice: the highest of its units' scores (`slice_units`; one unit for whole slices), with
    at most `max_units` units in memory at a time (a fold's tiles at the real size would take gigabytes)."""
    images = np.asarray(images)
    scores = []
    per_chunk = max(1, max_units // slice_units(images[:1], options).shape[1]) if len(images) else 1
    for start in range(0, len(images), per_chunk):
        units = zoomed(slice_units(images[start:start + per_chunk], options), options.zoom)
        unit_scores = predict_scores(model, units.reshape(-1, *units.shape[2:]),
                                     inference_batch_size(units.shape[2:], options))
        scores.append(unit_scores.reshape(units.shape[:2]).max(axis=1))
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------------------
# Dataset: mmpretrain's BaseDataset over arrays handed over in memory (no image files are written)

_IN_MEMORY: dict = {}


@DATASETS.register_module()
class NoduleSliceDataset(BaseDataset):
    """Images and labels registered under `memory_key` by `run_detection` for the time of the training."""

    METAINFO = {"classes": CLASSES}

    def __init__(self, memory_key: str, **kwargs):
        self.memory_key = memory_key
        super().__init__(ann_file="", **kwargs)

    def load_data_list(self):
        if self.memory_key not in _IN_MEMORY:
            raise InputError(f"no in-memory detection data under {self.memory_key!r} (build it through run_detection)")
        images, labels = _IN_MEMORY[self.memory_key]
        return [dict(img=image, gt_label=int(label), img_shape=image.shape, ori_shape=image.shape, sample_idx=i)
                for i, (image, label) in enumerate(zip(images, labels))]


def _train_pipeline(options: DetectionOptions) -> list:
    flip = [dict(type="RandomFlip", prob=options.flip_prob, direction="horizontal")] if options.flip_prob > 0 else []
    return flip + [dict(type="PackInputs")]


# ---------------------------------------------------------------------------------------------------------
# Config


def build_config(options: DetectionOptions, work_dir, device: str, mean: float, std: float, memory_key: str):
    """mmpretrain's installed `seresnet101_8xb32_in1k` config, adapted to the study (mmengine `Config`)."""
    cfg = mmlab.package_config(BASE_CONFIG)
    # One input channel: CT is grey, and no ImageNet weights can be downloaded, so repeating the slice to three
    # channels would only triple the stem's input. Nothing is lost even with a local RGB checkpoint:
    # `fold_rgb_stem` sums its stem filters over colour, exactly what a grey image repeated 3x would see.
    cfg.model.backbone.in_channels = 1
    cfg.model.backbone.update(depth=options.depth, base_channels=options.base_channels,
                              stem_channels=options.base_channels)
    cfg.model.head.in_channels = options.feature_dim
    cfg.model.head.num_classes = len(CLASSES)
    cfg.model.head.topk = (1,)
    # Intensities: uint8 CT (nodulesynth.data.window), normalised with the training images' own mean and std.
    cfg.data_preprocessor = dict(type="ClsDataPreprocessor", num_classes=len(CLASSES), mean=[float(mean)],
                                 std=[float(std)], to_rgb=False)
    cfg.train_dataloader = dict(
        batch_size=options.batch_size, num_workers=options.num_workers, persistent_workers=options.num_workers > 0,
        sampler=mmlab.train_sampler(options.sampler, options.seed),
        dataset=dict(type="NoduleSliceDataset", memory_key=memory_key, pipeline=_train_pipeline(options)))
    for stage in ("val", "test"):  # the test fold is scored after training, by `predict_scores`
        for part in ("dataloader", "cfg", "evaluator"):
            cfg[f"{stage}_{part}"] = None
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=options.total_iters)
    cfg.log_processor = dict(by_epoch=False)
    cfg.optim_wrapper = mmlab.optim_wrapper(
        device, mmlab.optimizer_config(options.optimizer, options.lr, options.momentum, options.weight_decay))
    cfg.param_scheduler = [dict(type="MultiStepLR", by_epoch=False, gamma=options.lr_gamma,
                                milestones=[s * options.iters_per_epoch for s in options.lr_steps])]
    cfg.auto_scale_lr = None
    for leftover in ("dataset_type", "train_pipeline", "test_pipeline"):  # ImageNet's, unused: keep the dump clear
        cfg.pop(leftover, None)
    cfg.load_from = None
    # Channels-last weights (mmlab.StudyRunner): oneDNN's convolutions run a sixth faster on them on the CPU
    # (SE-ResNet-50/16: 40 instead of 47 ms a step of 16 patches; benchmarks/downstream_step.py), and tensor cores
    # want them on CUDA. A classifier of plain convolutions takes any layout; localization stays NCHW (mmcv's
    # RoIAlign reads its features as NCHW memory).
    cfg.channels_last = True
    settings = mmlab.runtime_settings(work_dir, options.seed, device, log_interval=options.iters_per_epoch)
    mmlab.apply_settings(cfg, settings)
    return cfg


def fold_rgb_stem(state_dict: dict, num_classes: int = len(CLASSES)) -> dict:
    """A 3-channel checkpoint made fit for the 1-channel, 2-class model: stem filters summed over colour
    (conv(repeat(x, 3), W) == conv(x, sum_c W)), head weights of another class count dropped."""
    out = {}
    for key, value in state_dict.items():
        if torch.is_tensor(value) and value.ndim == 4 and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        if key.split(".")[0] == "head" and torch.is_tensor(value) and value.shape[0] != num_classes:
            continue
        out[key] = value
    return out


def _initial_checkpoint(load_from, work_dir) -> str:
    raw = torch.load(load_from, map_location="cpu", weights_only=False)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"detection.load_from = {load_from}: not a checkpoint with a state_dict")
    path = Path(work_dir) / "init_checkpoint.pth"
    torch.save({"state_dict": fold_rgb_stem(state), "meta": {"source": str(load_from)}}, path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------
# Training, scoring, features


def run_detection(dataset: ArmDataset, options: DetectionOptions, work_dir, device="auto"):
    """Train on `dataset.train`, score `dataset.test`; returns (metrics, predictions).

    Writes work_dir/model.pth (final weights, an mmengine checkpoint whose meta holds the config),
    work_dir/loss.tsv (iter, loss, lr) and mmengine's log under work_dir/<timestamp>/.
    """
    mmlab.require_checkpoint("detection", options.load_from)
    mmlab.allow_full_checkpoint_loading()
    device = mmlab.resolve_device(device)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        if not len(getattr(dataset, split)):
            raise InputError(f"arm {dataset.arm} fold {dataset.fold}: no {split} slices")
    train_images, train_labels = unit_images(dataset.train, options, seed=[options.seed, 0])
    test_labels = np.asarray(dataset.test.has_nodule, bool).astype(np.int64)  # for the metrics only

    key = uuid.uuid4().hex
    mean, std = mmlab.image_stats(train_images)
    cfg = build_config(options, work_dir, device, mean, std or 1.0, key)
    if options.load_from:
        cfg.load_from = _initial_checkpoint(options.load_from, work_dir)
    _IN_MEMORY[key] = (train_images, train_labels)
    try:
        runner = mmlab.StudyRunner.from_cfg(cfg)
        try:
            runner.train()
            mmlab.save_model(runner, work_dir)
        finally:
            mmlab.close_log_files(runner)
    finally:
        _IN_MEMORY.pop(key, None)

    scores = score_slices(runner.model, dataset.test.image, options)
    metrics = dict(detection_metrics(test_labels, scores, options.threshold))
    metrics.update(split_counts("train", train_labels), **split_counts("test", test_labels),
                   final_loss=mmlab.final_loss(work_dir / "loss.tsv", options.iters_per_epoch))
    test = dataset.test
    predictions = pd.DataFrame({"scan_id": test.scan_id.astype(str), "patient_id": test.patient_id.astype(str),
                                "slice_index": test.slice_index.astype(np.int64), "source": test.source.astype(str),
                                "label": test_labels, "score": scores.astype(np.float64)})
    return metrics, predictions


@torch.no_grad()
def _forward(model, images: np.ndarray, batch_size: int, head) -> np.ndarray:
    """`head(model, normalised inputs)` over `images` (uint8 [N,S,S]) in eval mode, batch by batch."""
    model.eval()
    out = []
    for start in range(0, len(images), max(1, batch_size)):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))[:, None]
        inputs = model.data_preprocessor(dict(inputs=chunk), False)["inputs"]
        out.append(head(model, inputs).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0,), np.float32)


def predict_scores(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Softmax probability of 'nodule' per image."""
    return _forward(model, images, batch_size, lambda m, x: m(x, mode="tensor").softmax(dim=1)[:, 1])


def load_classifier(checkpoint, device="auto"):
    """The trained classifier of `checkpoint` (written by run_detection), rebuilt from the config in its meta."""
    from mmengine.config import Config
    from mmpretrain.registry import MODELS

    mmlab.allow_full_checkpoint_loading()
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"detection checkpoint {checkpoint} not found")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    text = saved.get("meta", {}).get("cfg") if isinstance(saved, dict) else None
    if not text or "state_dict" not in saved:
        raise InputError(f"{checkpoint}: not a run_detection checkpoint (no config in its meta, or no state_dict)")
    cfg = Config.fromstring(text, ".py")
    model_cfg = cfg.model.copy()
    model_cfg.setdefault("data_preprocessor", cfg.data_preprocessor)
    model = MODELS.build(model_cfg)
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.to(mmlab.resolve_device(device)).eval()


def detection_features(model_or_checkpoint, options: DetectionOptions, images: np.ndarray, device="auto"):
    """[N, options.feature_dim] globally pooled last-stage features (the head's input) of uint8 [N,S,S] images; the model is
    a loaded classifier (load_classifier, to reuse it for several sets), a checkpoint or its work dir."""
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise InputError(f"images must be uint8 [N,S,S], got {images.dtype} {images.shape}")
    if not len(images):
        return np.zeros((0, options.feature_dim), np.float32)
    model = model_or_checkpoint
    if not isinstance(model, torch.nn.Module):
        path = Path(model_or_checkpoint)
        model = load_classifier(path / "model.pth" if path.is_dir() else path, device)
    return _forward(model, images, options.batch_size, lambda m, x: m.extract_feat(x, stage="neck")[-1])
