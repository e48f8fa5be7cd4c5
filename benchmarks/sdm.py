"""SDM speed benchmark: our speed features ON vs OFF, side by side, on one device in one run.

  ON  ("fast"):  bf16 autocast + channels-last (CUDA only) + F.scaled_dot_product_attention
  OFF ("plain"): fp32, contiguous NCHW, explicit softmax(QK^T)V attention

Reports training images/s and sampling seconds/image (same weights, same maps, same seed) for both,
then DPM-Solver++ (default 25 steps) against ancestral DDPM (default: the schedule length) with the
fast settings. With --model and --slices it also compares the mask fidelity of the --compare
samplers on those stacks' lesion maps (paired per map, against the last one).

  python benchmarks/sdm.py                                   # small CPU defaults, a minute or two
  python benchmarks/sdm.py --config config.yaml --device cuda --image-size 256 --batch-size 16
  python benchmarks/sdm.py --memory                          # estimated peak: the demo and the paper's defaults
  python benchmarks/sdm.py --memory --paper --device cuda    # ... and the measured peak of the paper's defaults
  echo "{}" > paper.yaml                                     # no sdm keys: the paper's network, batch 32 in 16s
  python benchmarks/sdm.py --config paper.yaml --device cuda --skip-ddpm --write-throughput sdm_h100.json
                                                             # measured rates for benchmarks/cost.py --measured

--memory prints the training memory model (nodulesynth.models.sdm.memory: a fake-tensor count of what
autograd keeps, plus weights, gradients, Adam and EMA) for the demo config and the schema defaults (the
paper's), with and without gradient checkpointing and micro-batches; on a CUDA device it also trains a few
steps of each config (--config, or with --paper the schema defaults) and prints the measured peak beside.

The network, diffusion and loss are the ones `train_sdm` uses (Trainer.train_step), on random
images/maps of the configured size: throughput does not depend on the content.
"""

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from nodulesynth.data.slices import resize_maps
from nodulesynth.models.data import SlicePairs
from nodulesynth.models.device import pick_device
from nodulesynth.models.sdm.options import SAMPLERS, SDMOptions
from nodulesynth.models.sdm.sample import load_sdm, sample_images
from nodulesynth.models.sdm.train import Trainer
from nodulesynth.models.sdm.unet import set_attention

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(image_size=32, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
             num_head_channels=16, spade_hidden=16, batch_size=8, grad_checkpoint=False)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config; its `sdm:` section (or the whole file) gives the options")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int)
    p.add_argument("--model-channels", type=int)
    p.add_argument("--channel-mult", help="comma separated, e.g. 1,1,2,2,4,4")
    p.add_argument("--attention-resolutions", help="comma separated feature sizes, e.g. 32,16,8")
    p.add_argument("--batch-size", type=int, help="training batch")
    p.add_argument("--train-steps", type=int, default=None, help="timed training steps (default 5 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (kernel selection, allocator)")
    p.add_argument("--sample-batch", type=int, default=4, help="maps per sampling batch")
    p.add_argument("--steps", type=int, default=10, help="sampler steps for the ON/OFF sampling comparison")
    p.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS)
    p.add_argument("--dpm-steps", type=int, default=25)
    p.add_argument("--ddpm-steps", type=int, default=None,
                   help="default: the schedule length (1000) on CUDA, 100 on the CPU")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--skip-ddpm", action="store_true", help="skip the (slow) DDPM timing")
    p.add_argument("--model", help="trained model.pt: also compare the mask fidelity of samplers (--compare)")
    p.add_argument("--compare", nargs="+", default=["dpmpp_2m:25", "dpmpp_2m_sde:25", "ddpm"],
                   help="SAMPLER[:STEPS] for the fidelity comparison, the reference last (no STEPS: the "
                        "schedule length)")
    p.add_argument("--slices", nargs="*", default=[], help="slice stacks whose maps --model samples")
    p.add_argument("--fidelity-maps", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch (1 is best on a shared machine)")
    p.add_argument("--memory", action="store_true", help="print the estimated (and on CUDA measured) training "
                                                         "peak memory instead of the speed comparison")
    p.add_argument("--paper", action="store_true", help="with --memory on CUDA: measure the schema defaults too")
    p.add_argument("--write-throughput", metavar="FILE",
                   help="also write the speed-ON training images/s and DPM-Solver++ sampling s/image, with the "
                        "options they were measured with, to this JSON file (benchmarks/cost.py --measured)")
    args = p.parse_args(argv)
    if args.model and not args.slices:
        p.error("--model needs --slices")  # before the timings, not after them
    return args


def options_from(args) -> SDMOptions:
    if args.config:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
        config = config.get("sdm", config)
        options = SDMOptions.from_config(config)
    else:
        options = SDMOptions(**SMALL)
    changes = {}
    if args.image_size:
        changes["image_size"] = args.image_size
    if args.model_channels:
        changes["model_channels"] = args.model_channels
    if args.channel_mult:
        changes["channel_mult"] = tuple(int(v) for v in args.channel_mult.split(","))
    if args.attention_resolutions:
        changes["attention_resolutions"] = tuple(int(v) for v in args.attention_resolutions.split(","))
    if args.batch_size:
        changes["batch_size"] = args.batch_size
    if args.guidance_scale is not None:
        changes["guidance_scale"] = args.guidance_scale
    return options.replace(**changes)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_data(options, count=64, seed=0):
    rng = np.random.default_rng(seed)
    size = options.image_size
    images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    labels = rng.integers(0, options.num_classes, (count, size, size), dtype=np.uint8)
    return SlicePairs(images, labels, size)


def time_training(options, device, data, steps, warmup, state=None):
    trainer = Trainer(data, options, device)
    if state is not None:
        trainer.model.load_state_dict(state)
    set_attention(trainer.model, options.attention)
    for _ in range(warmup):
        trainer.train_step()
    sync(trainer.device)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync(trainer.device)
    elapsed = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated(trainer.device) / 2**30 if trainer.device.type == "cuda" else float("nan")
    return steps * options.batch_size / elapsed, memory, trainer


def eval_model(trainer, options):
    model = copy.deepcopy(trainer.model).eval()
    model.options = options
    set_attention(model, options.attention)
    return model


def time_sampling(model, diffusion, labels, sampler, steps, guidance, seed):
    """bf16 and channels-last follow model.options (on CUDA), as in the sample rule."""
    device = next(model.parameters()).device
    sample_images(model, diffusion, labels, sampler, min(steps, 2), guidance, torch.Generator().manual_seed(seed))
    sync(device)
    start = time.perf_counter()
    images = sample_images(model, diffusion, labels, sampler, steps, guidance, torch.Generator().manual_seed(seed))
    sync(device)
    return (time.perf_counter() - start) / len(labels), images


def fidelity_comparison(args, device):
    """Mask fidelity of each --compare sampler on the same maps and seeds; the last one (default: DDPM
    at the schedule length) is the reference. Differences are paired per map, with their standard
    error: at 32 maps a sampler's mean Dice moves by a few hundredths from noise alone."""
    from nodulesynth.data.slices import load_training_pairs
    from nodulesynth.masks.fidelity import fidelity_table
    from nodulesynth.models.records import progress

    model, diffusion, options = load_sdm(args.model, device)
    _, labels = load_training_pairs(args.slices)
    labels = resize_maps(labels, options.image_size)
    pick = np.round(np.linspace(0, len(labels) - 1, min(args.fidelity_maps, len(labels)))).astype(int)
    maps = torch.from_numpy(labels[pick].astype(np.int64))
    runs = [(spec.split(":")[0], int(spec.split(":")[1]) if ":" in spec else options.diffusion_steps)
            for spec in args.compare]
    tables, seconds = {}, {}
    for sampler, steps in runs:
        images, start_time, bar = [], time.perf_counter(), progress(len(maps), 0, f"{sampler} {steps}")
        for start in range(0, len(maps), args.sample_batch):
            images.append(sample_images(model, diffusion, maps[start:start + args.sample_batch], sampler, steps,
                                        options.guidance_scale, torch.Generator().manual_seed(args.seed + start)))
            bar.update(len(images[-1]))
        bar.close()
        seconds[(sampler, steps)] = (time.perf_counter() - start_time) / len(maps)
        tables[(sampler, steps)] = fidelity_table(np.concatenate(images), labels[pick])
    dice = ["body", "left_lung", "right_lung", "trachea", "nodule"]
    reference = runs[-1]
    print(f"\nmask fidelity (mean Dice) on {len(maps)} maps of the given stacks, guidance {options.guidance_scale}; "
          f"delta = paired difference to {reference[0]} {reference[1]} +- its standard error")
    print(f"{'sampler':<20}{'s/image':>9}" + "".join(f"{k:>15}" for k in dice) + f"{'contrast HU':>13}")
    for run, table in tables.items():
        print(f"{f'{run[0]} {run[1]}':<20}{seconds[run]:>9.3f}" + "".join(f"{table[k].mean():>15.3f}" for k in dice)
              + f"{table['nodule_contrast_hu'].mean():>13.0f}")
        if run != reference:
            delta = table[dice] - tables[reference][dice]
            cells = [f"{d.mean():+.3f}+-{d.std(ddof=1) / np.sqrt(d.count()):.3f}" for _, d in delta.items()]
            print(f"{'  delta':<29}" + "".join(f"{c:>15}" for c in cells))


def schema_defaults() -> SDMOptions:
    """The `sdm:` defaults of schemas/config.schema.yaml: the paper's study."""
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    return SDMOptions.from_config({k: v["default"] for k, v in schema["properties"]["sdm"]["properties"].items()})


def measured_peak(options, device, steps=2) -> float:
    """GiB: the CUDA allocator's peak over `steps` training steps (after one untimed step)."""
    data = random_data(options, count=max(64, options.batch_size))
    trainer = Trainer(data, options, device)
    trainer.train_step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        trainer.train_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    del trainer
    torch.cuda.empty_cache()
    return peak


def memory_report(args, device):
    from nodulesynth.models.sdm.memory import training_memory

    demo = SDMOptions.from_config((yaml.safe_load((ROOT / "config.yaml").read_text()) or {}).get("sdm", {}))
    paper = schema_defaults()
    rows = [("demo (config.yaml)", demo), ("paper (schema defaults)", paper),
            ("paper, no checkpointing", paper.replace(grad_checkpoint=False)),
            ("paper, one pass of 32, no checkpointing", paper.replace(grad_checkpoint=False, micro_batch_size=None))]
    if args.config:
        rows.insert(0, (f"--config {args.config}", options_from(args)))
    cuda = device.type == "cuda"
    measure = {rows[0][0]} | ({"paper (schema defaults)"} if args.paper else set())
    print(f"{'config':<42}{'batch':>6}{'pass':>6}{'ckpt':>6}{'params M':>10}{'state GiB':>11}{'activ. GiB':>12}"
          f"{'est. peak GiB':>15}" + (f"{'measured GiB':>14}" if cuda else ""))
    for name, options in rows:
        estimate = training_memory(options)
        line = (f"{name:<42}{options.batch_size:>6}{estimate.micro_batch:>6}{str(options.grad_checkpoint):>6}"
                f"{estimate.parameters / 1e6:>10.1f}{estimate.state_bytes / 2**30:>11.1f}"
                f"{estimate.activation_bytes / 2**30:>12.1f}{estimate.peak_bytes / 2**30:>15.1f}")
        if cuda:
            line += f"{measured_peak(options, device):>14.1f}" if name in measure else f"{'-':>14}"
        print(line, flush=True)
    print("estimates: bf16 autocast as on a GPU (sdm.bf16); state = fp32 weights, gradients, Adam, EMA "
          "(20 bytes a parameter); activations = what autograd keeps for one pass")


def write_throughput(path, device, options, train_rate, seconds_per_image, steps, sample_batch, sampler="dpmpp_2m"):
    """The measured speed-ON rates with the options they hold for (benchmarks/cost.py --measured checks that its
    config's network is this one). Sampling: `sampler`, one network evaluation a step, both guidance branches in
    one pass at options.guidance_scale; any sampler at the same step count costs the same."""
    import json

    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
              "options": options.to_dict(), "train_images_per_s": train_rate,
              "sampling": {"sampler": sampler, "steps": steps, "guidance_scale": options.guidance_scale,
                           "seconds_per_image": seconds_per_image, "batch": sample_batch}}
    Path(path).write_text(json.dumps(record, indent=2) + "\n")
    print(f"throughput written to {path}")


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.memory:
        return memory_report(args, device)
    cuda = device.type == "cuda"
    fast = options_from(args)
    plain = fast.replace(bf16=False, channels_last=False, attention="plain")
    fast = fast.replace(bf16=True, channels_last=True, attention="sdpa")
    steps = args.train_steps or (20 if cuda else 5)
    data = random_data(fast, count=max(64, fast.batch_size), seed=args.seed)
    n_params = None

    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if cuda else
                                f" ({torch.get_num_threads()} threads)"))
    print(f"model: {fast.image_size} px, channels {fast.model_channels} x {list(fast.channel_mult)}, "
          f"{fast.num_res_blocks} res blocks, attention at {list(fast.attention_resolutions)} px, "
          f"spade_hidden {fast.spade_hidden}; training batch {fast.batch_size}, {steps} timed steps")
    if not cuda:
        print("note: bf16 and channels-last apply on CUDA only; on the CPU only the attention differs")

    results = {}
    state = None
    for name, options in (("on", fast), ("off", plain)):
        rate, memory, trainer = time_training(options, device, data, steps, args.warmup, state)
        state = state or copy.deepcopy(trainer.model.state_dict())
        n_params = sum(p.numel() for p in trainer.model.parameters())
        model = eval_model(trainer, options)
        model.load_state_dict(state)  # same weights for both sampling timings
        labels = data.batch(range(min(args.sample_batch, len(data))))[1]
        s_per_image, images = time_sampling(model, trainer.diffusion, labels, args.sampler, args.steps,
                                            options.guidance_scale, args.seed)
        results[name] = dict(rate=rate, memory=memory, sample=s_per_image, images=images, model=model,
                             diffusion=trainer.diffusion)
        del trainer

    on, off = results["on"], results["off"]
    print(f"parameters: {n_params / 1e6:.2f} M")
    print(f"\n{'':<34}{'speed ON':>12}{'speed OFF':>12}{'ON/OFF':>9}")
    print(f"{'training images/s':<34}{on['rate']:>12.2f}{off['rate']:>12.2f}{on['rate'] / off['rate']:>8.2f}x")
    label = f"sampling s/image ({args.sampler} {args.steps})"
    print(f"{label:<34}{on['sample']:>12.4f}{off['sample']:>12.4f}{off['sample'] / on['sample']:>8.2f}x")
    if cuda:
        print(f"{'training peak memory GiB':<34}{on['memory']:>12.2f}{off['memory']:>12.2f}")
    diff = np.abs(on["images"].astype(int) - off["images"].astype(int))
    print(f"ON vs OFF sample difference: mean {diff.mean():.2f}, max {diff.max()} gray levels"
          + (" (bf16 rounding)" if cuda else ""))

    model, diffusion = on["model"], on["diffusion"]
    labels = data.batch(range(min(args.sample_batch, len(data))))[1]
    dpm, _ = time_sampling(model, diffusion, labels, "dpmpp_2m", args.dpm_steps, fast.guidance_scale, args.seed)
    print(f"\n{'sampler (speed ON)':<34}{'s/image':>12}")
    print(f"{f'dpmpp_2m {args.dpm_steps} steps':<34}{dpm:>12.4f}")
    if not args.skip_ddpm:
        ddpm_steps = args.ddpm_steps or (fast.diffusion_steps if cuda else min(100, fast.diffusion_steps))
        ddpm, _ = time_sampling(model, diffusion, labels, "ddpm", ddpm_steps, fast.guidance_scale, args.seed)
        print(f"{f'ddpm {ddpm_steps} steps':<34}{ddpm:>12.4f}   ({ddpm / dpm:.1f}x slower than DPM-Solver++)")
    if args.write_throughput:
        write_throughput(args.write_throughput, device, fast, on["rate"], dpm, args.dpm_steps, len(labels))

    if args.model:
        fidelity_comparison(args, device)


if __name__ == "__main__":
    main()
