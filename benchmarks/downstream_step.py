"""What the downstream trainings' two speed settings buy, each against torch's default in the same run.

  optimizer step  torch's default AdamW/SGD (a loop over the parameter tensors, op by op, on the CPU) against the
                  fused kernel mmlab.optimizer_config asks for, on every parameter of the real model
  forward+backward  the classifier's weights in NCHW against channels-last (mmlab.StudyRunner's `channels_last`,
                  which detection's config sets; localization stays NCHW for mmcv's RoIAlign)

on the models the package builds from the config (DetectionOptions / LocalizationOptions -> the installed
mmpretrain/mmdet configs -> their registries): the demo's (config.yaml: SE-ResNet-50 with 16 base channels on
32-px patches, batch 16; Faster R-CNN X50-8x4d, 16 base channels, on 128-px slices) or, with --study, the
schema's (SE-ResNet-101 at 256 px, batch 8; X101-32x4d, batch 2). Milliseconds per step, the median of --repeats
after --warmup, one thread by default (the demo's jobs run one each).

  .venv/bin/python benchmarks/downstream_step.py                 # the demo's networks, about a minute
  .venv/bin/python benchmarks/downstream_step.py --study --repeats 3
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def median_ms(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def models(study: bool):
    """(task, name, model, input shape) for the demo's sections of config.yaml, or the schema's defaults; built
    by nodulesynth.cost, as the jobs build them."""
    from nodulesynth.cost import detection_model, localization_model
    from nodulesynth.downstream import detection, localization

    config = {} if study else yaml.safe_load((REPO / "config.yaml").read_text())
    size = 256 if study else config["downstream"]["image_size"]
    det = detection.DetectionOptions.from_config(config.get("detection", {}))
    loc = localization.LocalizationOptions.from_config(config.get("localization", {}))
    unit = det.patch_size if det.input == "patch" else size
    return [("detection", f"SE-ResNet-{det.depth}/{det.base_channels}, {unit} px x {det.batch_size}",
             detection_model(det), (det.batch_size, 1, unit, unit)),
            ("localization", f"Faster R-CNN X{loc.depth}-{loc.groups}x4d/{loc.base_channels}",
             localization_model(loc, size), None)]


def optimizer_ms(model, args) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    out = {}
    for name, extra in (("default", {}), ("fused", {"fused": True})):
        optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, **extra)
        out[name] = median_ms(optimizer.step, args.warmup, args.repeats)
    return out


def forward_backward_ms(model, shape, args) -> dict:
    out = {}
    for name, layout in (("NCHW", torch.contiguous_format), ("channels-last", torch.channels_last)):
        model = model.to(memory_format=layout).train()
        x = torch.randn(*shape)

        def step():
            model.zero_grad(set_to_none=True)
            model(x, mode="tensor").float().sum().backward()

        out[name] = median_ms(step, args.warmup, args.repeats)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", action="store_true", help="the schema's networks instead of the demo's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} steps\n")
    print("| task | network | measured | torch default (ms) | this study's (ms) | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for task, name, model, shape in models(args.study):
        rows = [("AdamW step", "default", "fused", optimizer_ms(model, args))]
        if shape is not None:
            rows.append(("forward+backward", "NCHW", "channels-last", forward_backward_ms(model, shape, args)))
        for what, base, ours, ms in rows:
            print(f"| {task} | {name} | {what} ({base} vs {ours}) | {ms[base]:.1f} | {ms[ours]:.1f} "
                  f"| {ms[base] / ms[ours]:.2f}x |")


if __name__ == "__main__":
    main()
