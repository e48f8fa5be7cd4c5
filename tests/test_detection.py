"""Nodule detection with mmpretrain's SE-ResNet-101: the config read from the installed package, the input
units, and a tiny real training and evaluation on CPU through `run_detection` (the rules' code path)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from nodulesynth.downstream import mmlab
from nodulesynth.downstream.datasets import ArmDataset, SliceSet
from nodulesynth.downstream.detection import (BASE_CONFIG, DetectionOptions, build_config, crop_patches,
                                              detection_features, fold_rgb_stem, inference_batch_size,
                                              load_classifier, predict_scores, run_detection, slice_units,
                                              tile_origins, unit_centres, unit_images, zoomed)
from nodulesynth.labels import BODY, LEFT_LUNG, NODULE, RIGHT_LUNG

REPO = Path(__file__).resolve().parents[1]
SIZE = 64
CORE_METRICS = ("accuracy", "precision", "recall", "specificity", "f1", "auc")


def synthetic_slices(n_positive, n_negative, seed, size=SIZE) -> SliceSet:
    """Body with two dark lungs; nodule slices carry a bright disc (label 5) inside a lung, with its box."""
    rng = np.random.default_rng(seed)
    n = n_positive + n_negative
    yy, xx = np.mgrid[:size, :size]
    label = np.zeros((n, size, size), np.uint8)
    label[:, 4:size - 4, 4:size - 4] = BODY
    label[:, 10:size - 10, 8:size // 2 - 2] = RIGHT_LUNG  # patient's right on the image's left
    label[:, 10:size - 10, size // 2 + 2:size - 8] = LEFT_LUNG
    image = np.where(label == BODY, 150, 10).astype(np.float64)
    image[np.isin(label, (LEFT_LUNG, RIGHT_LUNG))] = 40
    image += rng.normal(0, 8, image.shape)
    boxes = []
    for row in range(n_positive):
        cx, cy, r = rng.integers(14, size // 2 - 6), rng.integers(16, size - 16), 4
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        image[row][disc] = 230
        label[row][disc] = NODULE
        boxes.append((row, cx - r, cy - r, cx + r + 1, cy + r + 1))
    return SliceSet(
        image=np.clip(image, 0, 255).astype(np.uint8), label=label,
        has_nodule=np.arange(n) < n_positive, boxes=np.array(boxes, np.float32).reshape(-1, 5),
        scan_id=np.array([f"s{seed}-{i % 3}" for i in range(n)]),
        patient_id=np.array([f"p{seed}-{i % 3}" for i in range(n)]),
        slice_index=np.arange(n, dtype=np.int64), source=np.array(["real"] * n))


def tiny_options(**changes) -> DetectionOptions:
    # The learnable toy problem needs a gentler lr than the study's 0.1 to fall within a few iterations (drawn
    # class-balanced, 0.001 did not move the loss in 20 iterations; 0.01 halves it).
    values = dict(epochs=4, iters_per_epoch=5, batch_size=8, lr=0.01, lr_steps=[3], flip_prob=0.5, seed=0)
    values.update(changes)
    return DetectionOptions.from_config(values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    dataset = ArmDataset("A", 0, synthetic_slices(8, 8, seed=1), synthetic_slices(3, 3, seed=2), info={})
    work = tmp_path_factory.mktemp("detection")
    metrics, predictions = run_detection(dataset, tiny_options(), work, device="cpu")
    return dataset, work, metrics, predictions


def test_config_is_mmpretrain_seresnet101_adapted(tmp_path):
    import mmpretrain

    base = mmlab.package_config(BASE_CONFIG)
    assert Path(base.filename).resolve().is_relative_to(Path(mmpretrain.__file__).resolve().parent)
    assert base.model.head.num_classes == 1000  # ImageNet, as shipped

    options = DetectionOptions()
    cfg = build_config(options, tmp_path, "cpu", mean=100.0, std=50.0, memory_key="k")
    assert cfg.model.backbone.type == "SEResNet" and cfg.model.backbone.depth == 101
    assert cfg.model.backbone.in_channels == 1
    assert cfg.model.head.num_classes == 2
    assert cfg.data_preprocessor.mean == [100.0] and cfg.data_preprocessor.std == [50.0]
    assert cfg.train_cfg.max_iters == 50 * 128
    assert cfg.param_scheduler[0].type == "MultiStepLR" and cfg.param_scheduler[0].milestones == [30 * 128, 40 * 128]
    assert cfg.optim_wrapper.type == "OptimWrapper"
    assert (cfg.optim_wrapper.optimizer.lr, cfg.optim_wrapper.optimizer.momentum) == (0.1, 0.9)
    assert cfg.train_dataloader.batch_size == 8 and cfg.val_dataloader is None
    assert build_config(options, tmp_path, "cuda", 100.0, 50.0, "k").optim_wrapper.type == "AmpOptimWrapper"


def test_a_narrow_seresnet_builds_from_the_same_config_and_its_features_follow_its_width(tmp_path):
    """depth and base_channels reach mmpretrain's SEResNet (the head reads the narrower last stage), the model
    builds and runs, and detection_features' width is the options' feature_dim; the study's stays 101 at 64."""
    from mmpretrain.registry import MODELS

    assert DetectionOptions().feature_dim == 2048
    narrow = DetectionOptions(depth=50, base_channels=16)
    cfg = build_config(narrow, tmp_path, "cpu", mean=100.0, std=50.0, memory_key="k")
    assert (cfg.model.backbone.depth, cfg.model.backbone.base_channels, cfg.model.backbone.stem_channels) \
        == (50, 16, 16)
    assert cfg.model.head.in_channels == narrow.feature_dim == 512
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        features = model.extract_feat(torch.zeros(2, 1, 32, 32), stage="neck")[-1]
        logits = model(torch.zeros(2, 1, 32, 32), mode="tensor")
    assert features.shape == (2, 512) and logits.shape == (2, 2)
    full = MODELS.build(build_config(DetectionOptions(), tmp_path, "cpu", 100.0, 50.0, "k").model)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters()) / 25
    assert detection_features(model, narrow, np.zeros((0, 32, 32), np.uint8)).shape == (0, 512)
    with pytest.raises(ValueError, match="detection.depth"):
        DetectionOptions(depth=34)
    with pytest.raises(ValueError, match="detection.base_channels"):
        DetectionOptions(base_channels=2)


def test_options_refuse_unknown_and_bad_keys():
    with pytest.raises(KeyError, match="detection.epoch"):
        DetectionOptions.from_config({"epoch": 3})
    with pytest.raises(ValueError, match="detection.input"):
        DetectionOptions.from_config({"input": "volume"})
    with pytest.raises(ValueError, match="detection.patch_stride"):
        DetectionOptions.from_config({"input": "patch", "patch_size": 32, "patch_stride": 40})  # gaps between tiles
    options = DetectionOptions.from_config({"input": "patch", "patch_size": 32})
    assert DetectionOptions.from_config(options.to_dict()) == options
    assert DetectionOptions().to_dict()["lr_steps"] == [30, 40]


def test_patches_centred_on_box_and_in_lung():
    slices = synthetic_slices(3, 4, seed=5)
    slices.boxes = np.array([[0, 20, 30, 29, 37], [1, 0, 0, 5, 3], [2, 50, 40, 60, 50]], np.float32)
    for row, x, y in ((0, 24, 33), (1, 2, 1), (2, 54, 44)):  # centre of [x0, x1) x [y0, y1)
        slices.image[row, y, x] = 255
        slices.image[row, y, x + 1] = 0
    options = DetectionOptions(input="patch", patch_size=16)
    patches, labels = unit_images(slices, options, seed=[0, 0])
    assert patches.shape == (7, 16, 16) and labels.tolist() == [1, 1, 1, 0, 0, 0, 0]
    for row in range(3):
        assert patches[row, 8, 8] == 255 and patches[row, 8, 9] == 0
    assert patches[1, :7].max() == 0  # the border box: outside the slice is zero-padded, the patch stays centred
    centres = unit_centres(slices, seed=[0, 0])
    negatives = [slices.label[row, y, x] for row, (x, y) in enumerate(centres) if row >= 3]
    assert all(v in (LEFT_LUNG, RIGHT_LUNG) for v in negatives)
    assert np.array_equal(centres, unit_centres(slices, seed=[0, 0]))  # deterministic
    assert not np.array_equal(centres[3:], unit_centres(slices, seed=[1, 0])[3:])
    grid = np.arange(100, dtype=np.uint8).reshape(1, 10, 10)
    assert np.array_equal(crop_patches(grid, np.array([[5, 5]]), 4)[0], grid[0, 3:7, 3:7])


def test_patch_jitter_moves_nodule_patches_only_and_within_its_bound():
    slices = synthetic_slices(12, 4, seed=5)
    slices.image[:12] = 0
    for row, x0, y0, x1, y1 in slices.boxes:  # one marked pixel at each box's centre
        slices.image[int(row), int((y0 + y1 - 1) // 2), int((x0 + x1 - 1) // 2)] = 255
    centred, labels = unit_images(slices, DetectionOptions(input="patch", patch_size=16), seed=[0, 0])
    jittered, again = unit_images(slices, DetectionOptions(input="patch", patch_size=16, patch_jitter=3), seed=[0, 0])
    assert labels.tolist() == again.tolist()
    offsets = []
    for row in range(12):
        assert centred[row, 8, 8] == 255
        y, x = np.argwhere(jittered[row] == 255)[0]
        offsets.append((int(x) - 8, int(y) - 8))
    assert max(max(abs(dx), abs(dy)) for dx, dy in offsets) <= 3
    assert len(set(offsets)) > 3  # the offsets vary from patch to patch
    assert np.array_equal(jittered[12:], centred[12:])  # nodule-free patches are not moved
    repeat, _ = unit_images(slices, DetectionOptions(input="patch", patch_size=16, patch_jitter=3), seed=[0, 0])
    assert np.array_equal(repeat, jittered)  # seeded
    with pytest.raises(ValueError, match="detection.patch_jitter"):
        DetectionOptions.from_config({"input": "patch", "patch_size": 16, "patch_jitter": 8})


def test_negatives_anywhere_places_nodule_free_patches_over_the_whole_slice():
    slices = synthetic_slices(2, 60, seed=6)
    slices.image[2:] = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)  # where a patch was cut
    windows = np.lib.stride_tricks.sliding_window_view(slices.image[2], (16, 16))
    options = DetectionOptions(input="patch", patch_size=16, negatives_anywhere=1.0)
    patches, labels = unit_images(slices, options, seed=[0, 0])
    lung = np.isin(slices.label[2], (LEFT_LUNG, RIGHT_LUNG))
    centres_in_lung = []
    for patch in patches[2:]:
        found = np.argwhere((windows == patch).all(axis=(2, 3)))
        assert len(found) == 1  # a whole patch of the slice (test tiles lie within it too), not zero-padded
        top, left = found[0]
        centres_in_lung.append(lung[top + 8, left + 8])
    assert 0 < sum(centres_in_lung) < len(centres_in_lung)  # body wall and air too, not only lung
    lung_only, _ = unit_images(slices, DetectionOptions(input="patch", patch_size=16), seed=[0, 0])
    assert np.array_equal(patches[:2], lung_only[:2])  # nodule patches stay where they were
    with pytest.raises(ValueError, match="detection.negatives_anywhere"):
        DetectionOptions.from_config({"input": "patch", "negatives_anywhere": 1.5})


def test_the_real_slices_every_arm_shares_give_every_arm_the_same_patches():
    """An arm's training set is the fold's real slices, then the slices it adds: the real slices' patches (jitter,
    where a nodule-free one lies) must not depend on how many slices follow, or the arms differ in more than
    the added slices."""
    real = synthetic_slices(6, 14, seed=9)
    added = SliceSet.concatenate([real, synthetic_slices(5, 0, seed=10)])
    options = DetectionOptions(input="patch", patch_size=16, patch_jitter=4, negatives_anywhere=0.5)
    alone, _ = unit_images(real, options, seed=[0, 0])
    followed, _ = unit_images(added, options, seed=[0, 0])
    assert np.array_equal(alone, followed[:len(real)])


def test_zoom_enlarges_training_and_test_units_alike():
    slices = synthetic_slices(2, 2, seed=8)
    options = DetectionOptions(input="patch", patch_size=16, zoom=2)
    patches, _ = unit_images(slices, options, seed=[0, 0])
    plain, _ = unit_images(slices, DetectionOptions(input="patch", patch_size=16), seed=[0, 0])
    assert patches.shape == (4, 32, 32)
    assert np.array_equal(patches[:, ::2, ::2], plain) and np.array_equal(patches[:, 1::2, 1::2], plain)
    tiles = zoomed(slice_units(slices.image, options), options.zoom)
    assert tiles.shape == (4, 49, 32, 32) and np.array_equal(tiles[:, :, ::2, ::2], slice_units(slices.image, options))
    with pytest.raises(ValueError, match="detection.zoom"):
        DetectionOptions.from_config({"zoom": 0})


def test_the_classifier_trains_channels_last_with_a_fused_optimizer_and_scores_as_in_nchw(tmp_path):
    """Speed only: the runner's model holds channels-last weights and its optimizer is fused, and the same weights
    give the same scores in either layout (what model.pth reloads into)."""
    narrow = DetectionOptions(depth=50, base_channels=16, optimizer="adamw", lr=1e-3)
    cfg = build_config(narrow, tmp_path, "cpu", mean=100.0, std=50.0, memory_key="k")
    runner = mmlab.StudyRunner.from_cfg(cfg)
    try:
        conv = runner.model.backbone.layer1[0].conv2.weight  # (the 1-channel stem reads the same in both layouts)
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        optimizer = runner.build_optim_wrapper(cfg.optim_wrapper).optimizer
        assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
        images = np.random.default_rng(0).integers(0, 255, (6, 32, 32), dtype=np.uint8)
        scores = predict_scores(runner.model, images, batch_size=4)
        runner.model.to(memory_format=torch.contiguous_format)
        assert runner.model.backbone.layer1[0].conv2.weight.is_contiguous()
        np.testing.assert_allclose(predict_scores(runner.model, images, batch_size=4), scores, atol=1e-5)
    finally:
        mmlab.close_log_files(runner)
    assert mmlab.optimizer_config("sgd", 0.1, 0.9, 1e-4)["fused"] is True


def test_adamw_optimizer_reaches_the_config(tmp_path):
    cfg = build_config(DetectionOptions(optimizer="adamw", lr=1e-3), tmp_path, "cpu", 100.0, 50.0, "k")
    assert cfg.optim_wrapper.optimizer.type == "AdamW" and cfg.optim_wrapper.optimizer.lr == 1e-3
    assert "momentum" not in cfg.optim_wrapper.optimizer  # AdamW takes none
    with pytest.raises(ValueError, match="detection.optimizer"):
        DetectionOptions.from_config({"optimizer": "lbfgs"})


def test_schema_defaults_are_the_options_defaults_and_the_demo_reaches_mmpretrain(tmp_path):
    """The schema's detection defaults are DetectionOptions' (the study's), and the demo config.yaml, validated
    by the workflow's schema, builds through DetectionOptions into mmpretrain's config."""
    import yaml
    from snakemake.utils import validate

    schema_path = REPO / "schemas" / "config.schema.yaml"
    keys = yaml.safe_load(schema_path.read_text())["properties"]["detection"]["properties"]
    defaults = DetectionOptions().to_dict()
    defaults.pop("num_workers")  # set by the job from its threads, not a config key
    assert {key: value["default"] for key, value in keys.items()} == defaults
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    validate(config, str(schema_path))  # fills the schema's defaults in, as the Snakefile does
    demo = DetectionOptions.from_config(config["detection"])
    cfg = build_config(demo, tmp_path, "cpu", mean=100.0, std=50.0, memory_key="k")
    assert cfg.train_cfg.max_iters == demo.epochs * demo.iters_per_epoch
    assert cfg.train_dataloader.batch_size == demo.batch_size
    assert cfg.optim_wrapper.optimizer.lr == demo.lr
    assert cfg.param_scheduler[0].milestones == [s * demo.iters_per_epoch for s in demo.lr_steps]
    with pytest.raises(Exception, match="patch_jitter"):
        validate({**config, "detection": {**config["detection"], "patch_jitter": -1}}, str(schema_path))
    # the detection keys stay detection's: the localization section, defaults filled in, still builds its options
    from nodulesynth.downstream.localization import LocalizationOptions

    LocalizationOptions.from_config(config["localization"])


def test_test_tiles_cover_the_slice_from_its_image_alone():
    slices = synthetic_slices(3, 2, seed=7)
    options = DetectionOptions(input="patch", patch_size=16)  # stride: half a patch
    assert tile_origins(64, 16, 8).tolist() == [0, 8, 16, 24, 32, 40, 48]
    assert tile_origins(60, 16, 16).tolist() == [0, 16, 32, 44]  # the last tile flush with the edge
    assert tile_origins(10, 16, 8).tolist() == [0]
    units = slice_units(slices.image, options)
    assert units.shape == (5, 49, 16, 16)
    covered = np.zeros((5, SIZE, SIZE), int)
    for k, (y, x) in enumerate((y, x) for y in tile_origins(SIZE, 16, 8) for x in tile_origins(SIZE, 16, 8)):
        assert np.array_equal(units[:, k], slices.image[:, y:y + 16, x:x + 16])
        covered[:, y:y + 16, x:x + 16] += 1
    assert covered.min() >= 1
    # a slice smaller than a patch: one tile, the slice zero-padded around it (as training patches are)
    small = slice_units(slices.image[:, :10, :12], DetectionOptions(input="patch", patch_size=16))
    assert small.shape == (5, 1, 16, 16) and np.array_equal(small[:, 0, 3:13, 2:14], slices.image[:, :10, :12])
    whole = slice_units(slices.image, DetectionOptions(input="slice"))
    assert whole.shape == (5, 1, SIZE, SIZE) and np.array_equal(whole[:, 0], slices.image)


def test_rgb_checkpoint_folds_to_one_channel():
    torch.manual_seed(0)
    state = {"backbone.conv1.weight": torch.randn(8, 3, 7, 7),
             "backbone.layer1.0.conv1.weight": torch.randn(4, 8, 1, 1),
             "head.fc.weight": torch.randn(1000, 16), "head.fc.bias": torch.randn(1000)}
    folded = fold_rgb_stem(state)
    assert folded["backbone.conv1.weight"].shape == (8, 1, 7, 7) and "head.fc.weight" not in folded
    assert torch.equal(folded["backbone.layer1.0.conv1.weight"], state["backbone.layer1.0.conv1.weight"])
    grey = torch.rand(1, 1, 20, 20)
    assert torch.allclose(F.conv2d(grey.repeat(1, 3, 1, 1), state["backbone.conv1.weight"]),
                          F.conv2d(grey, folded["backbone.conv1.weight"]), atol=1e-5)


def test_training_learns_and_scores_every_test_slice(trained):
    dataset, work, metrics, predictions = trained
    curve = pd.read_csv(work / "loss.tsv", sep="\t")
    assert list(curve.columns[:3]) == ["iter", "loss", "lr"] and curve["iter"].tolist() == list(range(1, 21))
    assert curve["loss"].iloc[-5:].mean() < curve["loss"].iloc[:5].mean()
    assert curve["lr"].iloc[0] == pytest.approx(1e-2) and curve["lr"].iloc[-1] == pytest.approx(1e-3)  # step at epoch 3
    assert (work / "model.pth").is_file()

    for key in CORE_METRICS:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert all(isinstance(v, (int, float)) for v in metrics.values())  # a flat metrics.json
    assert metrics["tp"] + metrics["fn"] == 3 and metrics["tn"] + metrics["fp"] == 3
    assert (metrics["n_train"], metrics["n_train_positive"], metrics["n_train_negative"]) == (16, 8, 8)
    assert (metrics["n_test"], metrics["n_test_positive"], metrics["n_test_negative"]) == (6, 3, 3)
    assert metrics["final_loss"] == pytest.approx(curve["loss"].iloc[-5:].mean())

    assert list(predictions.columns) == ["scan_id", "patient_id", "slice_index", "source", "label", "score"]
    assert len(predictions) == len(dataset.test)
    assert predictions["label"].tolist() == dataset.test.has_nodule.astype(int).tolist()
    assert predictions["score"].between(0, 1).all()


def test_detection_features_shape(trained):
    dataset, work, _, _ = trained
    options = tiny_options()
    features = detection_features(work, options, dataset.test.image, device="cpu")
    assert features.shape == (len(dataset.test), 2048) and np.isfinite(features).all()
    again = detection_features(work / "model.pth", options, dataset.test.image[:2], device="cpu")
    np.testing.assert_allclose(again, features[:2], rtol=1e-4, atol=1e-5)
    assert not np.allclose(features[0], features[-1])  # a nodule slice and a clean slice differ


def without_labels(slices: SliceSet) -> SliceSet:
    """The same slices with no nodule label, box or lesion map."""
    return SliceSet(slices.image, np.zeros_like(slices.label), np.zeros(len(slices), bool),
                    np.zeros((0, 5), np.float32), slices.scan_id, slices.patient_id, slices.slice_index, slices.source)


def test_patch_mode_from_local_checkpoint(trained, tmp_path, one_thread):
    """Patch input end to end, starting from the trained model (`load_from`); lr 0 keeps its weights. A test
    slice's score is the highest of its tiles', and the same with its labels removed: test patches are placed
    without them."""
    _, work, _, _ = trained
    dataset = ArmDataset("B", 1, synthetic_slices(3, 3, seed=3), synthetic_slices(2, 2, seed=4), info={})
    options = tiny_options(input="patch", patch_size=32, epochs=1, iters_per_epoch=2, batch_size=4, lr=0.0,
                           load_from=str(work / "model.pth"))
    metrics, predictions = run_detection(dataset, options, tmp_path / "labelled", device="cpu")
    assert len(predictions) == 4 and metrics["n_train"] == 6
    assert len(pd.read_csv(tmp_path / "labelled" / "loss.tsv", sep="\t")) == 2
    start, end = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
                  for p in (work / "model.pth", tmp_path / "labelled" / "model.pth"))
    for key in ("backbone.conv1.weight", "backbone.layer4.2.conv3.weight", "head.fc.weight"):
        assert torch.equal(start[key], end[key]), key

    tiles = slice_units(dataset.test.image, options)
    assert tiles.shape == (4, 9, 32, 32)  # 64 px in tiles of 32 every 16: 3 x 3
    model = load_classifier(tmp_path / "labelled" / "model.pth", "cpu")
    # run_detection scored the 36 tiles in one batch of 64 (inference_batch_size); one at a time scores the same
    assert inference_batch_size((32, 32), options) == 64 and inference_batch_size((256, 256), options) == 4
    tile_scores = predict_scores(model, tiles.reshape(-1, 32, 32), batch_size=1).reshape(4, 9)
    np.testing.assert_allclose(predictions["score"], tile_scores.max(axis=1), rtol=1e-5, atol=1e-6)
    assert (tile_scores.max(axis=1) > tile_scores.min(axis=1)).all()  # the max is a choice among differing tiles

    unlabelled = ArmDataset("B", 1, dataset.train, without_labels(dataset.test), info={})
    _, again = run_detection(unlabelled, options, tmp_path / "unlabelled", device="cpu")
    assert again["label"].tolist() == [0, 0, 0, 0] != predictions["label"].tolist()
    np.testing.assert_allclose(again["score"], predictions["score"], rtol=1e-5, atol=1e-6)


def test_image_stats_in_chunks_equal_numpys_and_cudnn_autotuning_only_on_cuda():
    images = np.random.default_rng(0).integers(0, 256, (37, 16, 16), dtype=np.uint8)
    mean, std = mmlab.image_stats(images, chunk=5)
    assert mean == pytest.approx(images.mean()) and std == pytest.approx(images.std())
    assert mmlab.runtime_settings("w", 0, "cuda:1")["env_cfg"]["cudnn_benchmark"] is True
    assert mmlab.runtime_settings("w", 0, "cpu")["env_cfg"]["cudnn_benchmark"] is False


def test_a_missing_local_checkpoint_stops_either_task_before_training(tmp_path):
    """load_from names a LOCAL file (nothing is downloaded): both tasks refuse a missing one first, naming the key."""
    from nodulesynth.downstream.localization import LocalizationOptions, run_localization

    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match=f"detection.load_from: no checkpoint file {missing}"):
        run_detection(None, DetectionOptions(load_from=str(missing)), tmp_path / "det")
    with pytest.raises(FileNotFoundError, match=f"localization.load_from: no checkpoint file {missing}"):
        run_localization(None, LocalizationOptions(load_from=str(missing)), tmp_path / "loc")
    assert not (tmp_path / "det").exists() and not (tmp_path / "loc").exists()
