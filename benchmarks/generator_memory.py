"""Peak resident memory of a short SDM training on 2,000 and on 20,000 slices: it must not grow with the cohort.

Writes synthetic slice stacks (uint8 images and label maps at --stack-px, in the layout of
`nodulesynth.data.slices.save_slices`, --per-stack slices a stack), then trains the SDM for --steps steps
on each cohort, each run in its own subprocess, and prints each run's peak RSS (ru_maxrss) and their
ratio against the target: the larger under 1.3 times the smaller, both under 3 GB.

The data are at 256 px, as the real config's; the network is a narrow one at 256 px (the real one,
650 M parameters, keeps about 13 GB of weights, gradients and Adam state in host memory on a CPU and
takes minutes a step there; on a GPU those live on the device). Data memory, which is what this measures,
is the same for both networks.

--baseline-src DIR runs the same measurement with another checkout's package (e.g. the code before
this change) on the cohorts of at most --baseline-max-slices slices (that code holds 786 KB a slice:
20,000 slices need about 18 GB).

    python benchmarks/generator_memory.py [--slices 2000 20000] [--baseline-src /path/to/old/src]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TARGET_RATIO, TARGET_BYTES = 1.3, 3e9

NETWORK = dict(image_size=256, model_channels=16, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1,
               attention_resolutions=(8,), num_head_channels=16, spade_hidden=16, diffusion_steps=100,
               sample_steps=10, batch_size=2, finetune_steps=0, log_every=1, checkpoint_every=1000, bf16=False,
               channels_last=False, grad_checkpoint=False)


def write_cohort(folder: Path, slices: int, per_stack: int, size: int, seed: int = 0) -> list:
    """Stacks of chest-like maps (body, two lungs, a nodule in some) and noisy images, uint8."""
    import numpy as np

    from nodulesynth.data.slices import SliceStack, save_slices

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    base = np.zeros((size, size), np.uint8)
    # Classes as in nodulesynth.labels: 0 background, 1 left lung, 2 right lung, 3 trachea, 4 body, 5 nodule.
    base[((yy - 0.5) / 0.4) ** 2 + ((xx - 0.5) / 0.45) ** 2 <= 1] = 4
    base[((yy - 0.5) / 0.27) ** 2 + ((xx - 0.3) / 0.17) ** 2 <= 1] = 2
    base[((yy - 0.5) / 0.27) ** 2 + ((xx - 0.7) / 0.17) ** 2 <= 1] = 1
    values = np.array([0, 40, 40, 10, 160, 200], np.uint8)
    paths = []
    for k, start in enumerate(range(0, slices, per_stack)):
        n = min(per_stack, slices - start)
        labels = np.repeat(base[None], n, 0)
        for i in range(0, n, 3):  # a nodule of random place and size in every third slice
            cy, cx, r = rng.uniform(0.4, 0.6), rng.uniform(0.25, 0.35), rng.uniform(0.01, 0.03)
            labels[i][((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r] = 5
        images = values[labels] + rng.integers(0, 8, labels.shape, dtype=np.uint8)
        path = folder / f"S{k:05d}.npz"
        save_slices(path, SliceStack(images, labels, np.arange(n) * 1.25, np.arange(n),
                                     (labels == 5).any((1, 2)), f"S{k:05d}", f"P{k:05d}"))
        paths.append(path)
    return paths


def child(args):
    """One measurement: train, then report this process's peak RSS (ru_maxrss is in KiB on Linux)."""
    import torch

    from nodulesynth.models.sdm.options import SDMOptions
    from nodulesynth.models.sdm.train import train_sdm

    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.stacks).glob("*.npz"))
    options = SDMOptions(**{**NETWORK, "max_steps": args.steps})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train_sdm(paths, out, options, device="cpu")
    print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": time.perf_counter() - start}))


def measure(src: Path, stacks: Path, steps: int, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    done = subprocess.run([sys.executable, __file__, "--child", "--stacks", str(stacks), "--steps", str(steps),
                           "--threads", str(threads)], env=env, capture_output=True, text=True)
    if done.returncode:
        return {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, results: dict):
    print(f"\n{name}")
    for slices, r in results.items():
        print(f"  {slices:>7,} slices: " + (r["error"] if "error" in r else
                                           f"peak RSS {r['peak_rss'] / 1e9:6.2f} GB ({r['seconds']:.0f} s)"))
    ok = {s: r["peak_rss"] for s, r in results.items() if "error" not in r}
    if len(ok) >= 2:
        small, large = min(ok), max(ok)
        ratio = ok[large] / ok[small]
        passed = ratio < TARGET_RATIO and max(ok.values()) < TARGET_BYTES
        print(f"  ratio {large:,} / {small:,}: {ratio:.2f}x (target < {TARGET_RATIO}x, both < {TARGET_BYTES / 1e9:g} GB)"
              f" -> {'PASS' if passed else 'FAIL'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--per-stack", type=int, default=100)
    parser.add_argument("--stack-px", type=int, default=256, help="size of the stacks' slices (the model's: 256)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, help="folder for the stacks (default: a temporary one)")
    parser.add_argument("--baseline-src", type=Path, help="another checkout's src/ to measure the same way")
    parser.add_argument("--baseline-max-slices", type=int, default=2000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stacks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(SRC))
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        cohorts = {}
        for slices in args.slices:
            start = time.perf_counter()
            write_cohort(work / str(slices), slices, args.per_stack, args.stack_px)
            cohorts[slices] = work / str(slices)
            print(f"wrote {slices:,} slices at {args.stack_px} px in {time.perf_counter() - start:.0f} s", flush=True)
        print(f"network: {NETWORK}, {args.steps} steps on the CPU")
        report(f"this code ({SRC})", {s: measure(SRC, c, args.steps, args.threads) for s, c in cohorts.items()})
        if args.baseline_src:
            report(f"baseline ({args.baseline_src})",
                   {s: measure(args.baseline_src, c, args.steps, args.threads) for s, c in cohorts.items()
                    if s <= args.baseline_max_slices})


if __name__ == "__main__":
    main()
