"""What the generators' loader threads hide: the time to draw an SDM batch at 256 px from the staged memory maps,
and a training loop's time per step with 0 (in the loop) to N loader threads (models/data.py Prefetched) while the
"GPU" is busy: the GPU's step is a sleep of --gpu-ms, which frees the CPU as a CUDA step does.

    python benchmarks/loader.py [--slices 2000] [--batch 32] [--gpu-ms 100] [--workers 0 1 3]

Prints the draw time of a batch, then per worker count the step time, against the ideal max(draw, gpu) (batches
fully hidden) and draw + gpu (nothing hidden, as with one thread). Each worker count's batches are checked equal
to the in-loop draws. Stacks are written at 256 px, so staging does no resizing.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nodulesynth.data.slices import SliceStack, save_slices
from nodulesynth.models.data import Prefetched, training_data
from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.train import draw_batch


def write_stacks(folder: Path, slices: int, per_stack: int = 250, size: int = 256) -> list:
    rng = np.random.default_rng(0)
    paths = []
    for k in range(0, slices, per_stack):
        n = min(per_stack, slices - k)
        label = rng.integers(0, 6, (n, size, size), dtype=np.uint8)
        image = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        path = folder / f"scan{k // per_stack:03d}.npz"
        save_slices(path, SliceStack(image, label, np.arange(n, dtype=float), np.arange(n, dtype=np.int32),
                                     np.zeros(n, bool), scan_id=path.stem, patient_id=path.stem))
        paths.append(path)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32, help="images a step (the study's SDM batch: 32)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--gpu-ms", type=float, default=100.0, help="the simulated GPU step")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 3])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    options = SDMOptions(batch_size=args.batch)
    with tempfile.TemporaryDirectory(prefix="nodulesynth-loader-bench-") as tmp:
        folder = Path(tmp) / "slices"
        folder.mkdir()
        paths = write_stacks(folder, args.slices)
        with training_data(paths, 256, Path(tmp)) as (data, _):
            start = time.perf_counter()
            for step in range(args.steps):
                draw_batch(data, options, step)
            draw_ms = 1000 * (time.perf_counter() - start) / args.steps
            print(f"{args.slices} slices staged at 256 px; a batch of {args.batch} drawn in {draw_ms:.1f} ms; "
                  f"GPU step {args.gpu_ms:.0f} ms (simulated)")
            print(f"ideal: {max(draw_ms, args.gpu_ms):.1f} ms a step (all hidden); in the loop: "
                  f"{draw_ms + args.gpu_ms:.1f} ms")
            print(f"{'workers':>8}{'ms/step':>10}{'hidden':>9}")
            for workers in args.workers:
                with Prefetched(lambda step: draw_batch(data, options, step), workers) as batches:
                    batches(0)  # the first batch is drawn in any case before the GPU can start
                    start = time.perf_counter()
                    for step in range(1, args.steps + 1):
                        batch = batches(step)
                        time.sleep(args.gpu_ms / 1000)
                    per_step = 1000 * (time.perf_counter() - start) / args.steps
                expected = draw_batch(data, options, args.steps)
                assert all(torch.equal(a, b) for a, b in zip(batch, expected)), "a prefetched batch differs"
                hidden = (draw_ms + args.gpu_ms - per_step) / draw_ms if draw_ms else 0.0
                print(f"{workers:>8}{per_step:>10.1f}{100 * hidden:>8.0f}%")


if __name__ == "__main__":
    main()
