"""Nodule localization: mmdet's Faster R-CNN X101-32x4d FPN trained on one fold and arm of the study.

The model is mmdet's own `faster-rcnn_x101-32x4d_fpn_1x_coco` config, read from the installed package
(the configs mmdet ships under `.mim/configs`) and adapted with mmengine's `Config`:
one class "nodule", the slices written as PNG with COCO annotation files (`work_dir/coco/`) read by
mmdet's CocoDataset, the slice size kept (no 1333x800 rescale), anchors small enough for nodules of a
few pixels, no pretrained download, the study's schedule (SGD lr 0.1, 12 epochs of 510 iterations,
batch 2, linear decay to 0.1x), AMP on CUDA. Beyond the study, for a from-scratch CPU demo: training crops
around the nodules (`NoduleCrop`), AdamW, and the RPN's and RoI head's sampling and IoU cuts as options (their
defaults are mmdet's). mmengine's Runner trains and tests; the test-fold metrics
are `coco.coco_metrics` and `metrics.froc` (LUNA16's FROC per nodule) of `nodulesynth.downstream`.

Outputs in `work_dir`: model.pth, loss.tsv (iter, loss, lr and mmdet's partial losses), coco/{train,test}.json
with the PNG slices, mmengine's log and its dump of the config as run under `<timestamp>/` (the console gets
warnings only), mmdet_metrics.json (mmdet's own CocoMetric, a cross-check of `coco_metrics`).
"""

import contextlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
from mmdet.datasets.transforms import RandomCrop
from mmdet.registry import TRANSFORMS
from mmengine.hooks import Hook

from nodulesynth.downstream import mmlab
from nodulesynth.downstream.datasets import ArmDataset, SliceSet, split_counts
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path
from nodulesynth.models.device import DeviceError
from nodulesynth.options import SectionOptions, coerce

BASE_CONFIG = "mmdet::faster_rcnn/faster-rcnn_x101-32x4d_fpn_1x_coco.py"  # mmdet's shipped config
CLASSES = ("nodule",)
DEPTHS = (50, 101, 152)  # mmdet's ResNeXts
NODULE_CROP = "NoduleSynthNoduleCrop"
PREDICTION_COLUMNS = ["scan_id", "patient_id", "slice_index", "x0", "y0", "x1", "y1", "score"]


@dataclass(frozen=True)
class LocalizationOptions(SectionOptions):
    """The `localization:` config section. Defaults are the study's real run."""

    SECTION = "localization"

    epochs: int = 12
    iters_per_epoch: int = 510              # an "epoch" is a fixed iteration count, as in the study
    batch_size: int = 2
    lr: float = 0.1                         # SGD; the study's value
    lr_end_factor: float = 0.1              # linear decay of the lr to lr x this over the whole run
    # Linear warmup from lr/1000 over this many iterations (0: none), as mmdet's own 1x schedule does (500
    # iterations there). Beyond the study, with clip_grad: trained from scratch, this Faster R-CNN diverged
    # (loss 2 -> NaN within 13 iterations, 64-px slices) at lr 0.1 and even at 0.02 with warmup alone.
    warmup_iters: int = 100
    # The network: a ResNeXt of this depth with this many groups (cardinality; each group 4 channels wide in the
    # first stage, doubling per stage), its stem and stage outputs scaled to base_channels, and an FPN of
    # neck_channels that the RPN and the RoI head read. The study's is X101-32x4d at mmdet's 64 and 256; the
    # demo's narrow X50-8x4d at 16 and 64 learns on a CPU within minutes (README).
    depth: int = 101
    groups: int = 32
    base_channels: int = 64
    neck_channels: int = 256
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Anchor scales in units of each FPN level's stride (4, 8, 16, 32, 64 px). mmdet's default (8,) gives
    # anchors of 32 px and more, which cannot match a 4-pixel nodule at IoU 0.3; (1, 2, 4) gives 4, 8, 16 px
    # on the finest level, up to 256 px on the coarsest: a few-pixel nodule at 64 px to a large one at 256 px.
    anchor_scales: tuple[float, ...] = (1, 2, 4)
    # Train on slices without a nodule too (mmdet's filter_empty_gt off). The test folds hold such slices,
    # and FROC counts the false positives on them; without negatives the detector never sees healthy lung
    # during training. False: positive slices only (mmdet's COCO default).
    include_negatives: bool = True
    norm: str = "bn"
    # Training draws: "balanced" (half with a nodule, in every arm: see mmlab.BalancedSampler; needs
    # include_negatives), or "shuffle" (a plain shuffle, as the study did).
    sampler: str = "balanced"
    # Max gradient norm (None: off, as in mmdet's Faster R-CNN config). 35 is mmdet's usual value where it
    # clips (RetinaNet, FCOS); with it lr 0.1 trains from scratch (loss 2.0 -> 0.07 in 16 iterations).
    clip_grad: Optional[float] = 35.0
    load_from: Optional[str] = None         # LOCAL mmdet checkpoint to start from (no download)
    # Training inputs: whole slices (None, as the study), or square crops of this many pixels placed around a
    # nodule box (at a random offset) on slices with one and anywhere on slices without (`NoduleCrop`). The test
    # stays on whole slices (Faster R-CNN is fully convolutional). A crop costs a fraction of a slice, and a
    # few-pixel nodule is then a larger part of what the RPN and the RoI sampler see.
    train_crop: Optional[int] = None
    # "sgd" (the study's, with momentum) or "adamw" (beyond the study: from scratch it moves within the few
    # iterations a CPU demo affords, where SGD collapsed every box to background).
    optimizer: str = "sgd"
    # Test: RPN proposals kept per slice for the RoI head (mmdet's nms_pre and max_per_img, 1000 for COCO's
    # 1333 x 800 images). The RoI head's cost grows with it (about 13 GFLOP per slice at 1000), whatever the
    # slice size: a small slice holds far fewer candidate nodules, and the demo's 64-px slices use 100.
    test_proposals: int = 1000
    # Training: the RPN's proposals per slice that the RoI head samples its RoIs from (mmdet's rpn_proposal
    # max_per_img, 1000, after NMS over twice as many per level). On the CPU that NMS took a third of a narrow
    # network's 128-px iteration at mmdet's value; one or two nodules a slice need far fewer.
    train_proposals: int = 1000
    # Training: RoIs sampled per slice for the RoI head (mmdet's rcnn sampler, 512 for COCO). On the CPU the RoI
    # head's matrix products and mmcv's RoIAlign backward take most of an iteration at 512 (measured at 64 px);
    # the demo's small slices, with one nodule or none, use 64.
    roi_samples: int = 512
    # Training, the RPN: anchors sampled per slice (mmdet's 256) and the IoU cuts of its assigner: an anchor is a
    # positive above rpn_pos_iou and a negative below rpn_neg_iou, and each box's best anchor is a positive from
    # rpn_min_pos_iou up (mmdet's 0.7 / 0.3 / 0.3). A 2-px box overlaps the smallest (4-px) anchor at IoU 0.25 at
    # best: at mmdet's cuts no anchor learns it. With one small nodule among 256 sampled anchors, the few
    # positives also weigh almost nothing in the loss; fewer samples give them their share.
    rpn_samples: int = 256
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    rpn_min_pos_iou: float = 0.3
    # Training, the RoI head: a proposal is a positive from this IoU with a box (mmdet's 0.5, which is also its
    # negative cut), and positives make at most roi_positive_fraction of the roi_samples (mmdet's 0.25).
    roi_pos_iou: float = 0.5
    roi_positive_fraction: float = 0.25
    # Share of training draws with a nodule (sampler = balanced): with crops, a nodule-free crop holds little
    # to learn, and a crop around a nodule holds plenty of healthy tissue beside it.
    positive_fraction: float = 0.5
    score_threshold: float = 0.05           # test: boxes scoring below are dropped (mmdet's default)
    max_per_img: int = 100                  # test: boxes kept per slice
    num_workers: int = 0  # set by the job from its threads (cli: all but one), not a config key
    log_interval: int = 50                  # mmengine log line every N iterations (its log under work_dir)
    seed: int = 0

    def __post_init__(self):
        # from_config coerces already; this also covers options built directly (LocalizationOptions(...)).
        object.__setattr__(self, "anchor_scales", coerce(self.anchor_scales, tuple[float, ...],
                                                         "localization.anchor_scales"))
        self.validate()

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["anchor_scales"] = list(self.anchor_scales)
        return out

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def stage_channels(self) -> list:
        """Output channels of the backbone's four stages, the FPN's inputs (256 ... 2048 in the study)."""
        return [self.base_channels * 4 * 2 ** stage for stage in range(4)]

    @property
    def norm_groups(self) -> int:
        """GroupNorm's groups (norm gn): mmdet's 32, fewer for a network whose stem is narrower than 64."""
        return min(32, self.base_channels // 2)

    def validate(self):
        for key in ("epochs", "iters_per_epoch", "batch_size", "max_per_img", "log_interval", "test_proposals",
                    "train_proposals", "roi_samples", "rpn_samples", "groups", "base_channels", "neck_channels"):
            if getattr(self, key) < 1:
                raise InputError(f"localization.{key} must be positive, got {getattr(self, key)}")
        for key in ("warmup_iters", "num_workers", "weight_decay", "momentum"):
            if getattr(self, key) < 0:
                raise InputError(f"localization.{key} must be >= 0, got {getattr(self, key)}")
        if self.warmup_iters >= self.total_iters:
            raise InputError(f"localization.warmup_iters ({self.warmup_iters}) must be less than epochs x "
                             f"iters_per_epoch ({self.total_iters})")
        if self.sampler not in mmlab.SAMPLERS:
            raise InputError(f"localization.sampler must be one of {mmlab.SAMPLERS}, got {self.sampler!r}")
        if self.sampler == "balanced" and not self.include_negatives:
            raise InputError("localization.sampler = balanced draws slices without a nodule too: it needs "
                             "localization.include_negatives = true (or sampler = shuffle)")
        if self.train_crop is not None and self.train_crop < 32:
            raise InputError(f"localization.train_crop must be at least 32 px (FPN's coarsest stride) or null, got "
                             f"{self.train_crop}")
        if self.optimizer not in mmlab.OPTIMIZERS:
            raise InputError(f"localization.optimizer must be one of {tuple(mmlab.OPTIMIZERS)}, got "
                             f"{self.optimizer!r}")
        if self.norm not in ("bn", "gn"):
            raise InputError(f"localization.norm must be 'bn' or 'gn', got {self.norm!r}")
        if self.depth not in DEPTHS:
            raise InputError(f"localization.depth must be one of mmdet's ResNeXt depths {DEPTHS}, got {self.depth}")
        if self.norm == "gn":
            widths = [self.base_channels, self.neck_channels, 4 * self.groups] + self.stage_channels
            if self.base_channels < 2 or any(width % self.norm_groups for width in widths):
                raise InputError(f"localization.norm gn splits every layer into {self.norm_groups} groups: "
                                 f"base_channels ({self.base_channels}), neck_channels ({self.neck_channels}) and "
                                 f"4 x groups ({4 * self.groups}) must be multiples of it")
        if not self.lr > 0:
            raise InputError(f"localization.lr must be positive, got {self.lr}")
        if not 0 < self.lr_end_factor <= 1:
            raise InputError(f"localization.lr_end_factor must be in (0, 1], got {self.lr_end_factor}")
        if not self.anchor_scales or min(self.anchor_scales) <= 0:
            raise InputError(f"localization.anchor_scales must be positive numbers, got {list(self.anchor_scales)}")
        for key in ("rpn_pos_iou", "rpn_neg_iou", "rpn_min_pos_iou", "roi_pos_iou", "roi_positive_fraction",
                    "positive_fraction"):
            if not 0 < getattr(self, key) < 1:
                raise InputError(f"localization.{key} must be in (0, 1), got {getattr(self, key)}")
        if not self.rpn_neg_iou <= self.rpn_pos_iou or not self.rpn_min_pos_iou <= self.rpn_pos_iou:
            raise InputError(f"localization: rpn_neg_iou ({self.rpn_neg_iou}) and rpn_min_pos_iou "
                             f"({self.rpn_min_pos_iou}) must not exceed rpn_pos_iou ({self.rpn_pos_iou})")
        if not 0 <= self.score_threshold < 1:
            raise InputError(f"localization.score_threshold must be in [0, 1), got {self.score_threshold}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise InputError(f"localization.clip_grad must be positive or null, got {self.clip_grad}")


# ---------------------------------------------------------------- mmcv's CUDA ops

def probe_mmcv_ops(device: str):
    """The mmcv ops mmdet's Faster R-CNN runs (batched NMS, RoIAlign), once each on a tiny input on `device`."""
    import torch
    from mmcv.ops import nms, roi_align

    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 5.0, 5.0]], device=device)
    nms(boxes, torch.tensor([0.9, 0.8], device=device), 0.5)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]], device=device)
    roi_align(torch.ones(1, 1, 8, 8, device=device), rois, (2, 2), 1.0, 0, "avg", True)


def check_mmcv_ops(device: str, probe=probe_mmcv_ops):
    """On a CUDA device, mmcv's ops must run there before training starts (a CPU-only mmcv build fails only at the
    first RoIAlign, on "implementation for device cuda:0 not found"); a DeviceError in one line says how to get
    them. On the CPU: nothing to check."""
    if not mmlab.is_cuda(device):
        return
    try:
        probe(device)
    except RuntimeError as error:
        message = (str(error).strip().splitlines() or [""])[0]
        if "implementation for device" not in message and "not compiled with GPU support" not in message:
            raise
        import mmcv
        import torch

        raise DeviceError(
            f"localize on {device} needs mmcv's CUDA ops, but mmcv {mmcv.__version__} here was built without them "
            f"({message}): run in the mmlab image (containers/mmlab.def, snakemake --use-singularity), or install "
            f"the CUDA toolkit of torch's CUDA {torch.version.cuda} and rerun `make setup` (scripts/setup-env.sh "
            f"then builds mmcv with them)") from None


# ---------------------------------------------------------------- training crops

@TRANSFORMS.register_module(name=NODULE_CROP)
class NoduleCrop(RandomCrop):
    """mmdet's RandomCrop of `size` x `size` px, placed so that one of the slice's boxes (drawn at random) lies
    inside it at a random offset; a slice without a box is cropped anywhere, as RandomCrop does. Written here
    because mmdet's crops ignore where the boxes are: a 64-px crop of a 128-px slice misses a nodule of a few
    pixels most of the time. mmdet's own code does the cropping and moves and clips the boxes."""

    def __init__(self, size: int):
        super().__init__(crop_size=(int(size), int(size)), allow_negative_crop=True)
        self._boxes = np.zeros((0, 4))

    def transform(self, results: dict):
        boxes = results.get("gt_bboxes")
        self._boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes.numpy(), float).reshape(-1, 4)
        return super().transform(results)

    def _rand_offset(self, margin):
        margin_h, margin_w = margin
        if not len(self._boxes):
            return super()._rand_offset(margin)
        x0, y0, x1, y1 = self._boxes[np.random.randint(len(self._boxes))]
        height, width = self.crop_size

        def offset(start, stop, size, limit):
            low, high = max(0, int(np.ceil(stop)) - size), min(limit, int(np.floor(start)))
            if low > high:  # a box larger than the crop, or one at the edge: centre the crop on it
                return int(np.clip(round((start + stop - size) / 2), 0, limit))
            return np.random.randint(low, high + 1)

        return offset(y0, y1, height, margin_h), offset(x0, x1, width, margin_w)


# ---------------------------------------------------------------- config

def build_config(options: LocalizationOptions, image_size: int, data_root, work_dir, device: str = "cpu"):
    """mmdet's config adapted to one class, our COCO files at `data_root`, slices of `image_size` px."""
    cfg = mmlab.package_config(BASE_CONFIG)
    scratch = options.load_from is None
    model = cfg.model
    model.backbone.init_cfg = None  # mmdet's config would download ImageNet weights
    if scratch:
        # mmdet freezes the stem and first stage and keeps BatchNorm at its loaded statistics: right for a
        # pretrained backbone, but from scratch that would leave random frozen layers and BN at mean 0 / var 1.
        model.backbone.frozen_stages = -1
        model.backbone.norm_eval = False
    model.backbone.update(depth=options.depth, groups=options.groups, base_channels=options.base_channels)
    model.neck.update(in_channels=options.stage_channels, out_channels=options.neck_channels)
    model.rpn_head.update(in_channels=options.neck_channels, feat_channels=options.neck_channels)
    model.roi_head.bbox_roi_extractor.out_channels = options.neck_channels
    model.roi_head.bbox_head.in_channels = options.neck_channels
    # Its two shared fully connected layers: mmdet's 1024 for a 256-channel FPN, in proportion for a narrower one.
    model.roi_head.bbox_head.fc_out_channels = 4 * options.neck_channels
    if options.norm == "gn":
        gn = dict(type="GN", num_groups=options.norm_groups, requires_grad=True)
        model.backbone.norm_cfg = gn
        model.backbone.zero_init_residual = False
        model.neck.norm_cfg = gn
    model.rpn_head.anchor_generator.scales = list(options.anchor_scales)
    model.roi_head.bbox_head.num_classes = len(CLASSES)
    rpn = model.train_cfg.rpn
    rpn.assigner.update(pos_iou_thr=options.rpn_pos_iou, neg_iou_thr=options.rpn_neg_iou,
                        min_pos_iou=options.rpn_min_pos_iou)
    rpn.sampler.num = options.rpn_samples
    rcnn = model.train_cfg.rcnn
    rcnn.assigner.update(pos_iou_thr=options.roi_pos_iou, neg_iou_thr=options.roi_pos_iou,
                         min_pos_iou=options.roi_pos_iou)
    rcnn.sampler.update(num=options.roi_samples, pos_fraction=options.roi_positive_fraction)
    model.train_cfg.rpn_proposal.update(nms_pre=2 * options.train_proposals, max_per_img=options.train_proposals)
    model.test_cfg.rpn.nms_pre = options.test_proposals
    model.test_cfg.rpn.max_per_img = options.test_proposals
    model.test_cfg.rcnn.score_thr = options.score_threshold
    model.test_cfg.rcnn.max_per_img = options.max_per_img
    # The data preprocessor pads each batch to a multiple of 32 (FPN's coarsest stride): 64 and 256 need none.

    metainfo = dict(classes=CLASSES)
    for name in ("train", "test"):
        loader = cfg[f"{name}_dataloader"]
        dataset = loader.dataset
        dataset.data_root = str(data_root)
        dataset.ann_file = f"{name}.json"
        dataset.data_prefix = dict(img=f"{name}/")
        dataset.metainfo = metainfo
        dataset.backend_args = None
        for step in dataset.pipeline:
            if step["type"] == "Resize":
                step["scale"] = (image_size, image_size)  # the slice size, not COCO's 1333 x 800
            if "backend_args" in step:
                step["backend_args"] = None
        if name == "train" and options.train_crop is not None:
            after_resize = next(i for i, step in enumerate(dataset.pipeline) if step["type"] == "Resize") + 1
            dataset.pipeline.insert(after_resize, dict(type=NODULE_CROP, size=options.train_crop))
        loader.num_workers = options.num_workers
        loader.persistent_workers = options.num_workers > 0
    # Negative slices are kept in train.json only when they are to be trained on (see include_negatives).
    cfg.train_dataloader.dataset.filter_cfg = dict(filter_empty_gt=not options.include_negatives, min_size=0)
    cfg.train_dataloader.batch_size = options.batch_size
    cfg.train_dataloader.sampler = mmlab.train_sampler(options.sampler, options.seed)
    if options.sampler == "balanced":
        cfg.train_dataloader.sampler.positive_fraction = options.positive_fraction
    cfg.test_dataloader.batch_size = options.batch_size
    cfg.val_dataloader = cfg.val_evaluator = cfg.val_cfg = None
    cfg.test_evaluator = dict(type="CocoMetric", ann_file=str(Path(data_root) / "test.json"), metric="bbox",
                              format_only=False, backend_args=None)

    # An epoch is iters_per_epoch iterations whatever the slice count: an iteration-based loop.
    total = options.total_iters
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=total, val_interval=total + 1)
    cfg.optim_wrapper = mmlab.optim_wrapper(
        device, mmlab.optimizer_config(options.optimizer, options.lr, options.momentum, options.weight_decay),
        clip_grad=None if options.clip_grad is None else dict(max_norm=options.clip_grad, norm_type=2))
    if options.norm == "gn":
        cfg.optim_wrapper.paramwise_cfg = dict(norm_decay_mult=0.0)
    schedulers = []
    if options.warmup_iters:
        schedulers.append(dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0,
                               end=options.warmup_iters))
    schedulers.append(dict(type="LinearLR", start_factor=1.0, end_factor=options.lr_end_factor, by_epoch=False,
                           begin=options.warmup_iters, end=total))
    cfg.param_scheduler = schedulers
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=16)

    cfg.log_processor = dict(type="LogProcessor", window_size=options.log_interval, by_epoch=False)
    cfg.load_from = options.load_from
    # model.pth is written once, at the end; no visualisation hook; loss.tsv through mmlab's loss-curve hook
    mmlab.apply_settings(cfg, mmlab.runtime_settings(work_dir, options.seed, device, options.log_interval))
    return cfg


# ---------------------------------------------------------------- COCO files

def coco_dict(slices: SliceSet) -> dict:
    """COCO annotation dict of a slice set: image id = row + 1, bbox = [x0, y0, x1 - x0, y1 - y0].

    Ids start at 1: pycocotools' matching treats annotation id 0 as "unmatched". x1/y1 are exclusive, so
    the width is the plain difference and mmdet's x + w gives back x1.
    """
    size = slices.size
    images = [{"id": row + 1, "file_name": f"{row:06d}.png", "width": size, "height": size,
               "scan_id": str(slices.scan_id[row]), "patient_id": str(slices.patient_id[row]),
               "slice_index": int(slices.slice_index[row]), "source": str(slices.source[row])}
              for row in range(len(slices))]
    annotations = []
    for k, (row, x0, y0, x1, y1) in enumerate(np.asarray(slices.boxes, float)):
        if not 0 <= row < len(slices):
            raise InputError(f"box {k} refers to row {int(row)} of a set of {len(slices)} slices")
        w, h = x1 - x0, y1 - y0
        annotations.append({"id": k + 1, "image_id": int(row) + 1, "category_id": 1,
                            "bbox": [float(x0), float(y0), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": CLASSES[0]}]}


def write_coco(slices: SliceSet, data_root, name: str) -> Path:
    """`data_root/{name}/{row}.png` (grey uint8) and `data_root/{name}.json`; returns the json path."""
    data_root = Path(data_root)
    image_dir = data_root / name
    if image_dir.exists():
        shutil.rmtree(image_dir)  # slices of an earlier run would otherwise linger beside the new ones
    image_dir.mkdir(parents=True)
    for row, image in enumerate(slices.image):
        path = image_dir / f"{row:06d}.png"
        if not cv2.imwrite(str(path), np.ascontiguousarray(image, np.uint8)):
            raise OSError(f"could not write {path}")
    json_path = data_root / f"{name}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(coco_dict(slices)))
    return json_path


def positive_rows(slices: SliceSet) -> np.ndarray:
    """Rows with at least one box (a slice marked has_nodule but without a box has nothing to learn from)."""
    return np.unique(np.asarray(slices.boxes[:, 0], np.int64))


# ---------------------------------------------------------------- hooks

class PredictionCollector(Hook):
    """The boxes the model predicts on each test slice, as (image_id, x0, y0, x1, y1, score)."""

    def __init__(self):
        self.boxes = []

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        for sample in outputs:
            pred = sample.pred_instances
            coords = pred.bboxes.detach().float().cpu().numpy().reshape(-1, 4)
            scores = pred.scores.detach().float().cpu().numpy().reshape(-1)
            for box, score in zip(coords, scores):
                self.boxes.append((int(sample.img_id), *map(float, box), float(score)))


# ---------------------------------------------------------------- run

def predictions_frame(pred_boxes, slices: SliceSet) -> pd.DataFrame:
    """Predicted boxes (image_id = row + 1, ...) as a table naming each box's slice."""
    rows = []
    for image_id, x0, y0, x1, y1, score in pred_boxes:
        row = image_id - 1
        rows.append((str(slices.scan_id[row]), str(slices.patient_id[row]), int(slices.slice_index[row]),
                     x0, y0, x1, y1, score))
    frame = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    return frame.astype({"scan_id": str, "patient_id": str, "slice_index": np.int64, "x0": float, "y0": float,
                         "x1": float, "y1": float, "score": float})


def evaluate(slices: SliceSet, pred_boxes) -> dict:
    """coco_metrics (per slice box) and LUNA16's per-nodule froc (predictions merged into 3-D candidates, nodules
    grouped by their id, excluded findings ignored, FP per test scan) of the predictions on a test set (image id
    = row + 1)."""
    from nodulesynth.downstream.coco import coco_metrics
    from nodulesynth.downstream.metrics import froc

    image_ids = list(range(1, len(slices) + 1))
    gt = [(int(row) + 1, float(x0), float(y0), float(x1), float(y1)) for row, x0, y0, x1, y1 in slices.boxes]
    on_slice = [(str(slices.scan_id[i - 1]), int(slices.slice_index[i - 1]), x0, y0, x1, y1, score)
                for i, x0, y0, x1, y1, score in pred_boxes]
    return {**coco_metrics(image_ids, gt, pred_boxes),
            **froc(slices.nodule_rows(), on_slice, set(slices.scan_id.tolist()), slices.excluded_rows())}


def run_localization(dataset: ArmDataset, options: LocalizationOptions, work_dir, device="auto"):
    """Train on `dataset.train`, predict on `dataset.test`; returns (metrics dict, predictions DataFrame)."""
    mmlab.require_checkpoint("localization", options.load_from)
    mmlab.allow_full_checkpoint_loading()

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = mmlab.resolve_device(device)
    check_mmcv_ops(device)
    train, test = dataset.train, dataset.test
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"arm {dataset.arm} fold {dataset.fold}: {len(train)} training and {len(test)} test "
                         "slices; localization needs both")
    if train.size != test.size:
        raise InputError(f"arm {dataset.arm} fold {dataset.fold}: training slices are {train.size} px, test "
                         f"slices {test.size} px")
    positives = positive_rows(train)
    if not len(positives) or not len(test.boxes):
        split = "training" if not len(positives) else "test"
        raise InputError(f"arm {dataset.arm} fold {dataset.fold}: no {split} slice has a nodule box "
                         "(the folds are stratified so that every fold holds nodules)")
    trained = train if options.include_negatives else train.subset(positives)

    data_root = work_dir / "coco"
    write_coco(trained, data_root, "train")
    write_coco(test, data_root, "test")
    cfg = build_config(options, train.size, data_root, work_dir, device)
    runner = mmlab.StudyRunner.from_cfg(cfg)
    collector = PredictionCollector()
    runner.register_hook(collector)
    try:
        printed = io.StringIO()  # pycocotools prints as mmdet loads the COCO files: into the log, not the console
        with contextlib.redirect_stdout(printed):
            runner.train()
            mmdet_metrics = runner.test()
        runner.logger.info(f"printed during training and test:\n{printed.getvalue()}")
        mmlab.save_model(runner, work_dir)
    finally:
        mmlab.close_log_files(runner)
    # The PNG slices served mmdet's loaders only (one per slice: ~125k a job at LIDC scale); the COCO files stay.
    for split in ("train", "test"):
        shutil.rmtree(data_root / split, ignore_errors=True)
    with atomic_path(work_dir / "mmdet_metrics.json") as tmp:
        tmp.write_text(json.dumps({k: float(v) for k, v in mmdet_metrics.items()}, indent=1))

    # Boxes clipped to the image edge can come out with no width; they cannot be scored as boxes.
    pred_boxes = [b for b in collector.boxes if b[3] > b[1] and b[4] > b[2]]
    metrics = evaluate(test, pred_boxes)
    metrics.update(split_counts("train", np.isin(np.arange(len(trained)), positive_rows(trained))),
                   **split_counts("test", np.isin(np.arange(len(test)), positive_rows(test))),
                   n_test_boxes=len(test.boxes),
                   # the per-nodule FROC's denominators: nodules found of n_test_nodules, FPs per n_test_scans
                   n_test_nodules=len(set(zip(test.scan_id[test.boxes[:, 0].astype(int)].tolist(),
                                              test.box_nodule.tolist()))),
                   n_test_scans=len(set(test.scan_id.tolist())),
                   final_loss=mmlab.final_loss(work_dir / "loss.tsv", options.iters_per_epoch))
    return metrics, predictions_frame(pred_boxes, test)
