"""Localization with mmdet's Faster R-CNN X101-32x4d FPN: the installed config adapted, the COCO files, and a
tiny CPU training through `run_localization` (the code path the localize rule runs)."""

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from nodulesynth.downstream.datasets import ArmDataset, SliceSet
from nodulesynth.downstream.localization import (PREDICTION_COLUMNS, LocalizationOptions, build_config, write_coco,
                                                 run_localization)

SIZE = 64
NODULE = 8  # side of the bright square "nodule", pixels


def square_slices(n_pos, n_neg, seed, scans):
    """Noisy dark slices; the first n_pos carry one bright square each, boxed (x1/y1 exclusive)."""
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    image = np.clip(rng.normal(40, 8, (n, SIZE, SIZE)), 0, 255).astype(np.uint8)
    label = np.zeros((n, SIZE, SIZE), np.uint8)
    boxes = []
    for row in range(n_pos):
        x0, y0 = (int(v) for v in rng.integers(6, SIZE - NODULE - 6, 2))
        image[row, y0:y0 + NODULE, x0:x0 + NODULE] = 220
        label[row, y0:y0 + NODULE, x0:x0 + NODULE] = 5
        boxes.append((row, x0, y0, x0 + NODULE, y0 + NODULE))
    scan_id = np.array([scans[row % len(scans)] for row in range(n)])
    return SliceSet(image, label, np.arange(n) < n_pos, np.array(boxes, np.float32).reshape(-1, 5), scan_id,
                    np.array([f"P{s}" for s in scan_id]), np.arange(n, dtype=np.int64), np.array(["real"] * n),
                    box_nodule=np.arange(len(boxes)))  # each square a nodule of its own


def test_config_is_mmdets_installed_one_adapted(tmp_path):
    import mmdet

    cfg = build_config(LocalizationOptions(), SIZE, tmp_path / "coco", tmp_path)
    mmdet_dir = Path(mmdet.__file__).resolve().parent
    assert Path(cfg.filename).resolve().is_relative_to(mmdet_dir)
    assert Path(cfg.filename).name == "faster-rcnn_x101-32x4d_fpn_1x_coco.py"
    backbone = cfg.model.backbone
    assert (backbone.type, backbone.depth, backbone.groups, backbone.base_width) == ("ResNeXt", 101, 32, 4)
    assert backbone.init_cfg is None  # mmdet's config names a download
    assert cfg.model.neck.type == "FPN"
    assert cfg.model.roi_head.bbox_head.num_classes == 1
    assert cfg.model.rpn_head.anchor_generator.scales == [1.0, 2.0, 4.0]
    assert cfg.model.test_cfg.rpn.max_per_img == cfg.model.test_cfg.rpn.nms_pre == 1000  # mmdet's own
    assert cfg.model.train_cfg.rcnn.sampler.num == 512
    small = build_config(LocalizationOptions(test_proposals=100, roi_samples=64), SIZE, tmp_path / "coco", tmp_path)
    assert small.model.test_cfg.rpn.max_per_img == small.model.test_cfg.rpn.nms_pre == 100
    assert small.model.train_cfg.rcnn.sampler.num == 64
    assert cfg.train_dataloader.dataset.metainfo == {"classes": ("nodule",)}
    assert cfg.train_dataloader.dataset.filter_cfg.filter_empty_gt is False
    resize = [s for s in cfg.train_dataloader.dataset.pipeline if s["type"] == "Resize"]
    assert resize and resize[0]["scale"] == (SIZE, SIZE)
    assert cfg.optim_wrapper.type == "OptimWrapper" and cfg.optim_wrapper.optimizer.lr == 0.1
    assert cfg.train_cfg.max_iters == 12 * 510 and cfg.train_dataloader.batch_size == 2
    assert cfg.param_scheduler[-1].end_factor == 0.1 and cfg.param_scheduler[-1].end == 12 * 510
    assert build_config(LocalizationOptions(), SIZE, tmp_path, tmp_path, device="cuda").optim_wrapper.type \
        == "AmpOptimWrapper"
    # NCHW: mmcv's RoIAlign reads its features as NCHW memory (detection's classifier trains channels-last)
    assert not cfg.get("channels_last") and cfg.optim_wrapper.optimizer.fused is True


def test_small_object_options_reach_mmdets_config(tmp_path):
    """The defaults are mmdet's own training cuts and the study's SGD on whole slices; each option lands where
    mmdet's RPN, RoI head, sampler, optimiser and training pipeline read it."""
    from mmdet.registry import TRANSFORMS

    default = build_config(LocalizationOptions(), SIZE, tmp_path / "coco", tmp_path)
    rpn, rcnn = default.model.train_cfg.rpn, default.model.train_cfg.rcnn
    assert (rpn.assigner.pos_iou_thr, rpn.assigner.neg_iou_thr, rpn.assigner.min_pos_iou, rpn.sampler.num) \
        == (0.7, 0.3, 0.3, 256)
    assert (rcnn.assigner.pos_iou_thr, rcnn.assigner.neg_iou_thr, rcnn.assigner.min_pos_iou) == (0.5, 0.5, 0.5)
    assert rcnn.sampler.pos_fraction == 0.25 and default.train_dataloader.sampler.positive_fraction == 0.5
    assert default.optim_wrapper.optimizer.type == "SGD"
    assert (default.model.train_cfg.rpn_proposal.nms_pre, default.model.train_cfg.rpn_proposal.max_per_img) \
        == (2000, 1000)
    assert "NoduleSynthNoduleCrop" not in [step["type"] for step in default.train_dataloader.dataset.pipeline]

    options = LocalizationOptions(train_crop=32, optimizer="adamw", lr=3e-4, weight_decay=0.05, rpn_samples=32,
                                  rpn_pos_iou=0.4, rpn_neg_iou=0.2, rpn_min_pos_iou=0.1, roi_pos_iou=0.4,
                                  roi_positive_fraction=0.5, positive_fraction=0.75, train_proposals=100)
    cfg = build_config(options, SIZE, tmp_path / "coco", tmp_path)
    assert (cfg.model.train_cfg.rpn_proposal.nms_pre, cfg.model.train_cfg.rpn_proposal.max_per_img) == (200, 100)
    rpn, rcnn = cfg.model.train_cfg.rpn, cfg.model.train_cfg.rcnn
    assert (rpn.assigner.pos_iou_thr, rpn.assigner.neg_iou_thr, rpn.assigner.min_pos_iou, rpn.sampler.num) \
        == (0.4, 0.2, 0.1, 32)
    assert (rcnn.assigner.pos_iou_thr, rcnn.assigner.neg_iou_thr, rcnn.assigner.min_pos_iou) == (0.4, 0.4, 0.4)
    assert rcnn.sampler.pos_fraction == 0.5 and cfg.train_dataloader.sampler.positive_fraction == 0.75
    assert dict(cfg.optim_wrapper.optimizer) == dict(type="AdamW", lr=3e-4, weight_decay=0.05, fused=True)
    train_steps = [step["type"] for step in cfg.train_dataloader.dataset.pipeline]
    assert train_steps.index("NoduleSynthNoduleCrop") == train_steps.index("Resize") + 1
    assert "NoduleSynthNoduleCrop" not in [step["type"] for step in cfg.test_dataloader.dataset.pipeline]
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):  # as in a localize job (an earlier test may leave mmpretrain's)
        crop = TRANSFORMS.build(next(step for step in cfg.train_dataloader.dataset.pipeline
                                     if step["type"] == "NoduleSynthNoduleCrop"))
    assert crop.crop_size == (32, 32)
    with pytest.raises(ValueError, match="rpn_neg_iou .0.8. and rpn_min_pos_iou .0.3. must not exceed"):
        LocalizationOptions(rpn_neg_iou=0.8)
    with pytest.raises(ValueError, match="localization.optimizer"):
        LocalizationOptions(optimizer="adam")
    with pytest.raises(ValueError, match="localization.train_crop"):
        LocalizationOptions(train_crop=16)


def test_a_narrow_resnext_builds_from_mmdets_config_with_its_neck_and_heads_following(tmp_path):
    """depth, groups, base_channels and neck_channels reach mmdet's ResNeXt, FPN, RPN and RoI head, the
    model builds and runs on a slice, and GroupNorm takes fewer groups where the stem is narrower; the
    study's network stays X101-32x4d with a 256-channel FPN."""
    from mmdet.registry import MODELS
    from mmengine.registry import DefaultScope

    study = build_config(LocalizationOptions(norm="gn"), SIZE, tmp_path / "coco", tmp_path).model
    assert (study.backbone.depth, study.backbone.groups, study.backbone.base_width, study.backbone.base_channels) \
        == (101, 32, 4, 64)
    assert study.neck.in_channels == [256, 512, 1024, 2048] and study.neck.out_channels == 256
    assert study.backbone.norm_cfg.num_groups == 32
    narrow = LocalizationOptions(depth=50, groups=8, base_channels=16, neck_channels=64, norm="gn")
    cfg = build_config(narrow, SIZE, tmp_path / "coco", tmp_path).model
    assert (cfg.backbone.depth, cfg.backbone.groups, cfg.backbone.base_channels) == (50, 8, 16)
    assert cfg.neck.in_channels == [64, 128, 256, 512] and cfg.neck.out_channels == 64
    assert cfg.rpn_head.in_channels == cfg.rpn_head.feat_channels == 64
    assert cfg.roi_head.bbox_roi_extractor.out_channels == cfg.roi_head.bbox_head.in_channels == 64
    assert (study.roi_head.bbox_head.fc_out_channels, cfg.roi_head.bbox_head.fc_out_channels) == (1024, 256)
    assert cfg.backbone.norm_cfg.num_groups == cfg.neck.norm_cfg.num_groups == 8
    with DefaultScope.overwrite_default_scope("mmdet"):
        model = MODELS.build(cfg).eval()
        with torch.no_grad():
            features = model.extract_feat(torch.zeros(1, 1 if cfg.backbone.get("in_channels") == 1 else 3,
                                                      SIZE, SIZE))
    assert [f.shape[1] for f in features] == [64] * 5
    with pytest.raises(ValueError, match="localization.depth"):
        LocalizationOptions(depth=18)
    with pytest.raises(ValueError, match="splits every layer into 6 groups"):
        LocalizationOptions(base_channels=12, norm="gn")
    LocalizationOptions(base_channels=12)  # BatchNorm has no groups to divide


def test_nodule_crop_holds_the_nodule_at_varying_offsets_and_crops_negatives_anywhere():
    from mmdet.structures.bbox import HorizontalBoxes

    from nodulesynth.downstream.localization import NoduleCrop

    slices = square_slices(1, 1, seed=4, scans=["S1"])
    x0, y0, x1, y1 = slices.boxes[0, 1:]
    crop = NoduleCrop(24)
    np.random.seed(0)
    offsets = set()
    for _ in range(20):
        results = crop(dict(img=slices.image[0].copy(), img_shape=(SIZE, SIZE),
                            gt_bboxes=HorizontalBoxes(torch.tensor([[x0, y0, x1, y1]])),
                            gt_bboxes_labels=np.zeros(1, np.int64), gt_ignore_flags=np.zeros(1, bool)))
        assert results["img"].shape == (24, 24) and results["img_shape"] == (24, 24)
        (cx0, cy0, cx1, cy1), = results["gt_bboxes"].numpy()
        assert (cx1 - cx0, cy1 - cy0) == (NODULE, NODULE)  # the whole square, not clipped
        dx, dy = int(x0 - cx0), int(y0 - cy0)
        offsets.add((dx, dy))
        # mmdet cropped the image where it moved the box: the bright square is the box
        assert (results["img"][int(cy0):int(cy1), int(cx0):int(cx1)] == 220).all()
        assert np.array_equal(results["img"], slices.image[0][dy:dy + 24, dx:dx + 24])
    assert len(offsets) > 5
    empty = crop(dict(img=slices.image[1].copy(), img_shape=(SIZE, SIZE), gt_bboxes=HorizontalBoxes(torch.zeros(0, 4)),
                      gt_bboxes_labels=np.zeros(0, np.int64), gt_ignore_flags=np.zeros(0, bool)))
    assert empty["img"].shape == (24, 24) and len(empty["gt_bboxes"]) == 0


def test_coco_json_has_the_slices_boxes_as_mmdet_reads_them(tmp_path):
    from mmdet.datasets import CocoDataset

    slices = square_slices(3, 1, seed=1, scans=["S1"])
    write_coco(slices, tmp_path, "train")
    coco = json.loads((tmp_path / "train.json").read_text())
    row, x0, y0, x1, y1 = slices.boxes[1]
    ann = [a for a in coco["annotations"] if a["image_id"] == int(row) + 1]
    assert len(ann) == 1 and ann[0]["bbox"] == [x0, y0, x1 - x0, y1 - y0] == [x0, y0, NODULE, NODULE]
    image = next(i for i in coco["images"] if i["id"] == int(row) + 1)
    assert np.array_equal(cv2.imread(str(tmp_path / "train" / image["file_name"]), cv2.IMREAD_UNCHANGED),
                          slices.image[int(row)])
    assert len(coco["images"]) == 4 and len(coco["annotations"]) == 3

    # mmdet's CocoDataset reads the same box back as (x0, y0, x1, y1), and keeps the negative slice
    dataset = CocoDataset(data_root=str(tmp_path), ann_file="train.json", data_prefix=dict(img="train/"),
                          metainfo=dict(classes=("nodule",)), filter_cfg=dict(filter_empty_gt=False), pipeline=[])
    assert len(dataset) == 4
    info = next(d for d in map(dataset.get_data_info, range(len(dataset))) if d["img_id"] == int(row) + 1)
    assert [inst["bbox"] for inst in info["instances"]] == [[x0, y0, x1, y1]]


def test_tiny_training_loss_falls_and_metrics_are_complete(tmp_path, one_thread):
    train = SliceSet.concatenate([square_slices(6, 2, seed=2, scans=["T1", "T2"])])
    test = square_slices(3, 1, seed=3, scans=["E1", "E2"])
    dataset = ArmDataset("A", 0, train, test, {})
    # the study's lr and optimiser, a short schedule; every box kept so that the few-iteration model predicts some
    options = LocalizationOptions.from_config(dict(epochs=2, iters_per_epoch=4, warmup_iters=2, log_interval=4,
                                                   score_threshold=0.0))
    metrics, predictions = run_localization(dataset, options, tmp_path, device="cpu")

    loss = pd.read_csv(tmp_path / "loss.tsv", sep="\t")[["iter", "loss", "lr"]].to_numpy()
    assert loss.shape == (8, 3) and np.isfinite(loss).all()
    assert loss[-3:, 1].mean() < 0.5 * loss[:3, 1].mean()
    assert loss[0, 2] == pytest.approx(1e-4) and loss[2, 2] == pytest.approx(0.1)  # warmup, then the study's lr
    assert loss[-1, 2] == pytest.approx(0.01) and (np.diff(loss[2:, 2]) < 0).all()  # linear decay to 0.1 x
    for name in ("model.pth", "coco/train.json", "coco/test.json"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "coco" / "train").exists() and not (tmp_path / "coco" / "test").exists()  # PNGs gone
    assert list(tmp_path.glob("*/*.log")), "mmengine's log of the run"
    assert len(json.loads((tmp_path / "coco/test.json").read_text())["annotations"]) == 3

    rates = ["ap50", "ap60", "ar50", "ar60", "ar70", "cpm"] + [f"froc_{r:g}" for r in (0.125, 0.25, 0.5, 1, 2, 4, 8)]
    for key in rates:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert {k: metrics[k] for k in ("n_train", "n_train_positive", "n_train_negative", "n_test", "n_test_positive",
                                    "n_test_boxes")} == dict(n_train=8, n_train_positive=6, n_train_negative=2,
                                                             n_test=4, n_test_positive=3, n_test_boxes=3)
    assert metrics["n_test_nodules"] == 3 and metrics["n_test_scans"] == 2
    assert math.isfinite(metrics["final_loss"])
    assert any(k.startswith("coco_") for k in metrics)
    # mmdet's own CocoMetric on the same predictions agrees with coco_metrics
    mmdet_metrics = json.loads((tmp_path / "mmdet_metrics.json").read_text())
    assert mmdet_metrics["coco/bbox_mAP_50"] == pytest.approx(metrics["ap50"], abs=1e-3)

    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert len(predictions) > 0 and set(predictions["scan_id"]) <= {"E1", "E2"}
    assert (predictions["x1"] > predictions["x0"]).all() and predictions["score"].between(0, 1).all()
    assert predictions[["x0", "y0", "x1", "y1"]].to_numpy().min() >= 0
    assert predictions[["x0", "y0", "x1", "y1"]].to_numpy().max() <= SIZE


def test_options_refuse_unknown_keys_and_read_yaml_strings():
    with pytest.raises(KeyError, match="localization.epoch"):
        LocalizationOptions.from_config({"epoch": 3})
    opts = LocalizationOptions.from_config({"weight_decay": "1e-4", "anchor_scales": [2, 4], "load_from": None})
    assert opts.weight_decay == 1e-4 and opts.anchor_scales == (2.0, 4.0)
    assert LocalizationOptions().to_dict()["iters_per_epoch"] == 510
    with pytest.raises(ValueError, match="localization.lr_end_factor"):
        LocalizationOptions(lr_end_factor=0)


def test_a_loss_that_is_no_longer_finite_stops_training_and_is_kept(tmp_path):
    """mmlab's loss-curve hook (detection and localization): a NaN loss ends the run at once, naming the
    iteration and lr, and the curve up to it is written for the post-mortem."""
    from types import SimpleNamespace

    from nodulesynth.downstream.mmlab import LossCurveHook

    hook = LossCurveHook(tmp_path / "loss.tsv", interval=50)
    runner = SimpleNamespace(iter=0, optim_wrapper=SimpleNamespace(get_lr=lambda: {"lr": [0.1]}))
    for step, loss in enumerate((2.0, 1.5, float("nan"))):
        runner.iter = step
        hook.before_train_iter(runner, step)
        if np.isfinite(loss):
            hook.after_train_iter(runner, step, outputs={"loss": torch.tensor(loss)})
    with pytest.raises(FloatingPointError, match=r"loss is nan at iteration 3 \(lr 0.1\)"):
        hook.after_train_iter(runner, 2, outputs={"loss": torch.tensor(loss)})
    curve = pd.read_csv(tmp_path / "loss.tsv", sep="\t")
    assert curve["iter"].tolist() == [1, 2, 3] and curve["loss"].isna().tolist() == [False, False, True]
