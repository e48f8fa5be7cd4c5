"""Training speed and peak memory of the downstream study's two models, against bare PyTorch baselines.

  detection     `run_detection` (mmpretrain SE-ResNet-101, batch 8)  vs  torchvision resnet101 (no SE blocks),
                1-channel stem, 2 classes, SGD, cross-entropy, in a bare PyTorch loop
  localization  `run_localization` (mmdet Faster R-CNN X101-32x4d FPN, batch 2)  vs  torchvision's FasterRCNN
                on the same backbone (torchvision ResNet with groups=32, width_per_group=4, trainable BN, FPN
                P2-P6) with the same anchors (study's scales 1, 2, 4 x stride, 3 ratios) and 1000 RPN
                proposals per image, no resizing, in a bare PyTorch loop

each at 64 and 256 px slices (the study's batch sizes), on the CPU unless --device says otherwise. The
difference between the two rows of a task is what OpenMMLab's Runner, hooks, data pipeline and model code
cost (plus, for detection, the SE blocks torchvision's resnet101 lacks). No weights are downloaded.

How:
- Input: a synthetic `ArmDataset` built here (noisy dark slices, a bright square "nodule" boxed on half of
  them; 32 training and 4 test slices): speed does not depend on the content. The study's options
  (`DetectionOptions` / `LocalizationOptions.from_config`) with a schedule of exactly --iters iterations;
  localization's lr warmup (from lr/1000) spans all but the last iteration, so that lr 0.1 from scratch
  cannot turn the loss non-finite (which `run_localization` stops on). The baselines use the same SGD
  (lr 0.1, momentum 0.9, weight decay 1e-4), warmup and gradient clipping (35, localization).
- Caveat: a Faster R-CNN's iteration time depends on the state of training (on 2 CPUs, 1 s/iter at 64 px
  during the warmup, 6-7 s once lr reaches 0.1 after a few steps from scratch), so the localization
  figures are those of the first iterations of the study's schedule, not of its steady state;
  `iter_seconds` in --json shows every iteration (the last one runs at the full lr).
- Each setting runs in its own subprocess, so its peak resident memory (getrusage ru_maxrss of that process:
  imports, model, data, training and the test pass) is its own.
- Rate: per-iteration wall times, warm-up iterations (--warmup) excluded. For the OpenMMLab runs these are
  mmengine's own IterTimerHook times (`train/time` in the Runner's MessageHub, time between the ends of
  consecutive iterations: data loading, forward, backward, step and every hook), read back after
  `run_detection` / `run_localization` return; for the baselines, perf_counter around each iteration
  (batch assembly included; CUDA synchronised). iters/s = timed iterations / their summed time.
  Set-up, the COCO/PNG writing and the test pass are not in the rate.
- On CUDA both sides use fp16 autocast with a grad scaler (mmlab's AmpOptimWrapper); the table then adds
  torch's peak allocated CUDA memory.

  nice -n 10 .venv/bin/python benchmarks/downstream.py                     # CPU, about 5 minutes on 2 cores
  .venv/bin/python benchmarks/downstream.py --device cuda --iters 30 --iters-256 30 --warmup 5 --json out.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MODELS = {
    ("detection", "openmmlab"): "mmpretrain SE-ResNet-101",
    ("detection", "baseline"): "torchvision resnet101",
    ("localization", "openmmlab"): "mmdet Faster R-CNN X101-32x4d FPN",
    ("localization", "baseline"): "torchvision FasterRCNN X101-32x4d FPN",
}
BATCH = {"detection": 8, "localization": 2}  # the study's batch sizes
N_TRAIN, N_TEST = 32, 4


def synthetic_dataset(size: int, seed: int = 0):
    """An ArmDataset of noisy dark slices; the even rows carry one bright square nodule (x1, y1 exclusive)."""
    import numpy as np

    from nodulesynth.downstream.datasets import ArmDataset, SliceSet
    from nodulesynth.labels import LEFT_LUNG, NODULE

    def slices(n, rng, scan):
        image = np.clip(rng.normal(40, 8, (n, size, size)), 0, 255).astype(np.uint8)
        label = np.zeros((n, size, size), np.uint8)
        label[:, size // 4:3 * size // 4, size // 8:size // 2] = LEFT_LUNG
        side = max(4, size // 12)
        boxes = []
        for row in range(0, n, 2):
            x0, y0 = (int(v) for v in rng.integers(4, size - side - 4, 2))
            image[row, y0:y0 + side, x0:x0 + side] = 220
            label[row, y0:y0 + side, x0:x0 + side] = NODULE
            boxes.append((row, x0, y0, x0 + side, y0 + side))
        # Each square its own nodule: the per-nodule FROC of the test pass needs every box's id.
        return SliceSet(image, label, np.arange(n) % 2 == 0, np.array(boxes, np.float32).reshape(-1, 5),
                        np.full(n, scan), np.full(n, f"P{scan}"), np.arange(n, dtype=np.int64), np.full(n, "real"),
                        box_nodule=np.arange(len(boxes)))

    rng = np.random.default_rng(seed)
    return ArmDataset("A", 0, slices(N_TRAIN, rng, "train"), slices(N_TEST, rng, "test"), {})


# ------------------------------------------------------------------------------------- OpenMMLab runs

def openmmlab_times(task: str, size: int, iters: int, device: str, seed: int) -> list:
    """Per-iteration seconds of one `run_detection` / `run_localization` of `iters` iterations."""
    from mmengine.logging import MessageHub

    dataset = synthetic_dataset(size, seed)
    with tempfile.TemporaryDirectory() as work_dir:
        if task == "detection":
            from nodulesynth.downstream.detection import DetectionOptions, run_detection

            options = DetectionOptions.from_config(dict(epochs=1, iters_per_epoch=iters, batch_size=BATCH[task],
                                                        seed=seed))
            run_detection(dataset, options, work_dir, device)
        else:
            from nodulesynth.downstream.localization import LocalizationOptions, run_localization

            options = LocalizationOptions.from_config(dict(epochs=1, iters_per_epoch=iters, batch_size=BATCH[task],
                                                           warmup_iters=iters - 1, log_interval=iters, seed=seed))
            run_localization(dataset, options, work_dir, device)
    # The Runner's message hub is the last one created; IterTimerHook logged every iteration's time there.
    buffer = MessageHub.get_current_instance().log_scalars.get("train/time")
    times = [float(t) for t in buffer.data[0]] if buffer is not None else []
    if len(times) != iters:
        raise RuntimeError(f"{task}: mmengine logged {len(times)} iteration times, expected {iters}")
    return times


# ------------------------------------------------------------------------------------- bare PyTorch baselines

def baseline_times(task: str, size: int, iters: int, device: str, seed: int) -> list:
    import numpy as np
    import torch
    import torchvision

    from nodulesynth.models.device import pick_device

    torch.manual_seed(seed)
    device = pick_device(device)
    cuda = device.type == "cuda"
    train = synthetic_dataset(size, seed).train
    rng = np.random.default_rng(seed)
    if task == "detection":
        model = torchvision.models.resnet101(weights=None, num_classes=2)
        model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # grey CT, as the mmpretrain model's stem
        mean, std = float(train.image.mean()), float(train.image.std())
    else:
        model = localization_baseline(size)
    model.to(device).train()
    # The study's optimiser and, for localization, the lr warmup its OpenMMLab run gets here (see the docstring):
    # the detector's iteration time depends on how far training has moved it, so both sides follow one lr path.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    warm = iters - 1 if task == "localization" else 0
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 1e-3 + (1 - 1e-3) * min(i, warm) / warm if warm else 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)

    def batch():
        rows = rng.choice(len(train), BATCH[task])
        images = torch.from_numpy(train.image[rows]).to(device).float()[:, None]
        if task == "detection":
            return ((images - mean) / std,), torch.from_numpy(train.has_nodule[rows].astype(np.int64)).to(device)
        targets = [dict(boxes=torch.from_numpy(train.boxes_of(r)).to(device),
                        labels=torch.ones(len(train.boxes_of(r)), dtype=torch.int64, device=device)) for r in rows]
        return (list((images / 255).expand(-1, 3, -1, -1)), targets), None  # grey -> RGB, as mmdet reads PNGs

    times = []
    for _ in range(iters):
        start = time.perf_counter()
        inputs, labels = batch()
        with torch.autocast(device.type, torch.float16, enabled=cuda):
            out = model(*inputs)
            loss = torch.nn.functional.cross_entropy(out, labels) if task == "detection" else sum(out.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if task == "localization":  # the study clips at 35 (LocalizationOptions.clip_grad)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 35.0)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        float(loss.detach())  # waits for the device, as the OpenMMLab loss hook's read-out does
        times.append(time.perf_counter() - start)
    return times


def localization_baseline(size: int):
    """torchvision's Faster R-CNN on ResNeXt-101 32x4d + FPN, the study's anchors, slices kept at their size."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.resnet import Bottleneck, ResNet
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    from nodulesynth.downstream.localization import LocalizationOptions

    body = ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4)
    backbone = BackboneWithFPN(body, {f"layer{i}": str(i - 1) for i in range(1, 5)}, [256, 512, 1024, 2048], 256,
                               extra_blocks=LastLevelMaxPool())
    scales = LocalizationOptions().anchor_scales
    anchors = AnchorGenerator(tuple(tuple(s * stride for s in scales) for stride in (4, 8, 16, 32, 64)),
                              ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, num_classes=2, rpn_anchor_generator=anchors, min_size=size, max_size=size,
                      rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000)


# ------------------------------------------------------------------------------------- driver

def measure(spec: dict) -> dict:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    run = openmmlab_times if spec["impl"] == "openmmlab" else baseline_times
    start = time.perf_counter()
    times = run(spec["task"], spec["px"], spec["iters"], spec["device"], spec["seed"])
    timed = times[spec["warmup"]:]
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return dict(spec, model=MODELS[(spec["task"], spec["impl"])], batch=BATCH[spec["task"]],
                iter_seconds=times, iters_per_s=len(timed) / sum(timed), s_per_iter=sum(timed) / len(timed),
                wall_s=time.perf_counter() - start, threads=torch.get_num_threads(),
                peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
                peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="slice sizes in px")
    p.add_argument("--tasks", nargs="+", default=["detection", "localization"], choices=sorted(BATCH))
    p.add_argument("--iters", type=int, default=6, help="training iterations per setting below 256 px")
    p.add_argument("--iters-256", type=int, default=4, help="training iterations per setting at 256 px and above")
    p.add_argument("--warmup", type=int, default=2, help="first iterations left out of the rate")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures (and every iteration's time) to this file")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one setting, in its own process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.warmup < 0 or min(args.iters, args.iters_256) <= args.warmup:
        p.error(f"--iters ({args.iters}) and --iters-256 ({args.iters_256}) must exceed --warmup ({args.warmup})")

    print(f"device {args.device}, {os.cpu_count()} CPUs; iterations {args.iters} (< 256 px) / {args.iters_256} "
          f"(>= 256 px), the first {args.warmup} not timed; each row in its own process")
    header = f"{'setting':<24}{'model':<40}{'batch':>6}{'px':>5}{'iters/s':>9}{'s/iter':>9}{'peak RSS MB':>13}"
    cuda = args.device != "cpu"
    print(header + (f"{'peak CUDA MB':>14}" if cuda else ""), flush=True)
    results = []
    for px in args.sizes:
        for task in args.tasks:
            for impl in ("openmmlab", "baseline"):
                spec = dict(task=task, impl=impl, px=px, iters=args.iters if px < 256 else args.iters_256,
                            warmup=args.warmup, device=args.device, threads=args.threads, seed=args.seed)
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", json.dumps(spec)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"{task} {impl} {px} px failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(r)
                line = (f"{task + ' ' + impl:<24}{r['model']:<40}{r['batch']:>6}{px:>5}{r['iters_per_s']:>9.3f}"
                        f"{r['s_per_iter']:>9.3f}{r['peak_rss_mb']:>13.0f}")
                print(line + (f"{r['peak_cuda_mb'] or float('nan'):>14.0f}" if cuda else ""), flush=True)
    for px in args.sizes:
        for task in args.tasks:
            mm, base = (next(r for r in results if (r["task"], r["impl"], r["px"]) == (task, impl, px))
                        for impl in ("openmmlab", "baseline"))
            print(f"{task} {px} px: OpenMMLab takes {mm['s_per_iter'] / base['s_per_iter']:.2f}x the baseline's "
                  f"time per iteration, {mm['peak_rss_mb'] - base['peak_rss_mb']:+.0f} MB peak RSS")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(device=args.device, cpus=os.cpu_count(), results=results), fh, indent=1)
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
