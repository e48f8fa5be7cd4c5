"""The study's GPU paths, measured in one table (run through benchmarks/gpu_acceptance.sh).

On a machine with one GPU, in under 8 minutes on an H100 and without the network:
  1. mmcv's CUDA ops (nms, roi_align) run on the GPU, as `localize` checks before it trains
  2. an SDM training step at the paper's settings (schema defaults: 256 px, 652 M parameters, batch 32 in passes
     of 16, gradient checkpointing) with the speed features ON (bf16 autocast, channels-last, SDPA attention) and
     OFF (fp32, NCHW, explicit attention), and with the speed features on but without gradient checkpointing in
     passes of 8 (what the study would cost with the recomputation saved, if it fits): images/s and peak CUDA
     memory, beside the memory model's estimate
  3. sampling one batch of maps with the study's sampler (dpmpp_2m_sde, 25 steps) and with the paper's
     (DDPM, 1000 steps): seconds per image
  4. one detection (mmpretrain SE-ResNet-101, batch 8) and one localization (mmdet Faster R-CNN X101, batch 2)
     training iteration at 256 px on CUDA, through the study's own run_detection / run_localization

  benchmarks/gpu_acceptance.sh                 # the GPU machine: prints the table (markdown), exit 1 if a row failed
  benchmarks/gpu_acceptance.sh --throughput-dir sdm_rates   # ... and the measured SDM rates for cost.py --measured
  benchmarks/gpu_acceptance.sh --only sdm      # only some rows: mmcv, sdm, downstream (repeatable)
  benchmarks/gpu_acceptance.sh --smoke         # the same steps at toy sizes on the CPU (tests/test_gpu_acceptance.py)

--throughput-dir writes one file of benchmarks/sdm.py --write-throughput's format for each SDM training row with
the speed features on (sdm_checkpointing.json: the defaults; sdm_no_checkpointing.json: passes of 8 without
recomputation), each with the study sampler's measured seconds an image: `benchmarks/cost.py --measured FILE`
(with a config of `sdm: {grad_checkpoint: false, micro_batch_size: 8}` for the second) prints the study's cost
from them.

Every row runs even when one before it failed; a failed row says why in its last column.
"""

import argparse
import gc
import importlib.util
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def load_benchmark(name):
    """benchmarks/ is not a package: load a sibling script as a module, to reuse its measurements."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


class Table:
    def __init__(self):
        self.rows, self.failed = [], False

    def add(self, check, setting, result, note=""):
        self.rows.append((check, setting, result, note))
        print(f"  {check} | {setting} | {result} | {note}", flush=True)

    def run(self, check, setting, measure):
        """measure() returns (result, note); an exception becomes a FAILED row and the next row still runs."""
        start = time.perf_counter()
        try:
            result, note = measure()
        except Exception as error:  # one failed check must not hide the others
            self.failed = True
            traceback.print_exc()
            result, note = "FAILED", f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"
        self.add(check, setting, result, f"{note} ({time.perf_counter() - start:.0f} s)".strip())

    def markdown(self):
        lines = ["| check | setting | result | note |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines)


def mmcv_ops(device):
    def measure():
        from nodulesynth.downstream.localization import check_mmcv_ops

        check_mmcv_ops(str(device))
        import mmcv.ops

        return "ok", f"mmcv built with CUDA {mmcv.ops.get_compiling_cuda_version()}"
    return measure


def sdm_training(sdm, options, device, steps, data, store, rate_key):
    """Stores the measured images/s under store["rates"][rate_key] (the throughput files)."""
    def measure():
        from nodulesynth.models.sdm.memory import training_memory

        gc.collect()  # a row before that failed (out of memory, say) leaves nothing behind on the GPU
        if device.type == "cuda":
            torch.cuda.empty_cache()
        estimate = training_memory(options, bf16=options.bf16) if device.type == "cuda" else None
        rate, peak, trainer = sdm.time_training(options, device, data, steps, warmup=1)
        store.setdefault("rates", {})[rate_key] = (options, rate)
        if "model" not in store:  # the speed-ON network samples below (eval copy, as the sample rule loads it)
            store["model"], store["diffusion"] = sdm.eval_model(trainer, options), trainer.diffusion
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
            return (f"{rate:.2f} images/s, peak {peak:.1f} GiB",
                    f"estimated {estimate.peak_bytes / 2**30:.1f} GiB; {steps} timed steps")
        return f"{rate:.2f} images/s", f"{steps} timed steps (no CUDA: peak memory not measured)"
    return measure


def sdm_sampling(sdm, options, data, store, sampler, steps, batch):
    """Stores seconds an image under store["sampling"][(sampler, steps)]."""
    def measure():
        labels = data.batch(range(batch))[1]
        seconds, _ = sdm.time_sampling(store["model"], store["diffusion"], labels, sampler, steps,
                                       options.guidance_scale, seed=0)
        store.setdefault("sampling", {})[(sampler, steps)] = seconds
        return f"{seconds:.3f} s/image", f"batch of {batch} maps, guidance {options.guidance_scale}"
    return measure


def downstream_iteration(task, px, iters, warmup, device):
    def measure():
        spec = dict(task=task, impl="openmmlab", px=px, iters=iters, warmup=warmup, device=str(device),
                    threads=None, seed=0)
        # Its own process: mmengine's registries and the CUDA peak are then this row's alone.
        proc = subprocess.run([sys.executable, str(HERE / "downstream.py"), "--measure", json.dumps(spec)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError((proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = f", peak {r['peak_cuda_mb'] / 1024:.1f} GiB" if r.get("peak_cuda_mb") else ""
        return f"{r['s_per_iter']:.3f} s/iteration{peak}", f"batch {r['batch']}, {iters - warmup} timed iterations"
    return measure


THROUGHPUT_FILES = {"checkpointing": "sdm_checkpointing.json", "no checkpointing": "sdm_no_checkpointing.json"}


def write_throughputs(sdm, directory, device, store, sampler, steps, batch):
    """One benchmarks/sdm.py --write-throughput file a measured speed-ON training row, with the study sampler's
    rate (which does not depend on how training spends its memory); none where either was not measured."""
    seconds = store.get("sampling", {}).get((sampler, steps))
    if seconds is None:
        print(f"no throughput files: the {sampler} {steps} sampling row did not run", flush=True)
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    for name, (options, rate) in store.get("rates", {}).items():
        if name in THROUGHPUT_FILES:
            sdm.write_throughput(Path(directory) / THROUGHPUT_FILES[name], device, options, rate, seconds, steps,
                                 batch, sampler=sampler)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: checks the script, measures nothing")
    p.add_argument("--markdown", help="also write the table to this file")
    p.add_argument("--only", action="append", choices=("mmcv", "sdm", "downstream"),
                   help="run only these rows (repeatable; default all)")
    p.add_argument("--throughput-dir", help="write the measured SDM rates here (benchmarks/cost.py --measured)")
    args = p.parse_args(argv)
    only = set(args.only or ("mmcv", "sdm", "downstream"))

    sdm = load_benchmark("sdm")
    from nodulesynth.models.device import DeviceError, pick_device

    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
        paper = sdm.SDMOptions.from_config(sdm.SMALL)
        px, train_steps, sample_batch, ddpm_steps, iters, warmup = 64, 2, 2, 20, 2, 1
    else:
        try:
            device = pick_device("cuda")
        except DeviceError as error:  # no GPU usable: one line with torch's reason, no table
            sys.exit(f"gpu_acceptance: {error}")
        paper = sdm.schema_defaults()
        px, train_steps, sample_batch, ddpm_steps, iters, warmup = 256, 3, 4, paper.diffusion_steps, 8, 3
    on = paper.replace(bf16=True, channels_last=True, attention="sdpa")
    off = paper.replace(bf16=False, channels_last=False, attention="plain")
    # No recomputation, in passes half as large: 3 forward-equivalents an image instead of ~3.8 (cost.py)
    no_ckpt = on.replace(grad_checkpoint=False, micro_batch_size=max(1, on.micro_batches[0] // 2))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"GPU acceptance on {name}, torch {torch.__version__} (CUDA {torch.version.cuda})"
          + (" -- SMOKE RUN: toy sizes, the figures mean nothing" if args.smoke else ""), flush=True)

    table = Table()
    if "mmcv" in only:
        if device.type == "cuda":
            table.run("mmcv CUDA ops", "nms, roi_align", mmcv_ops(device))
        else:
            table.add("mmcv CUDA ops", "nms, roi_align", "skipped", "no CUDA device")
    if "sdm" in only:
        data = sdm.random_data(on, count=max(64, on.batch_size))
        store = {}

        def network(options):
            return (f"{options.image_size} px, batch {options.batch_size} in passes of {options.micro_batches[0]}, "
                    f"ckpt {options.grad_checkpoint}")

        for check, options, rate_key in (("SDM training, speed ON", on, "checkpointing"),
                                         ("SDM training, speed ON, no checkpointing", no_ckpt, "no checkpointing"),
                                         ("SDM training, speed OFF", off, "speed off")):
            table.run(check, network(options), sdm_training(sdm, options, device, train_steps, data, store,
                                                            rate_key))
        # the study's sampler (the options': DPM-Solver++ SDE, 25 steps), then the paper's
        for sampler, steps in ((on.sampler, on.sample_steps), ("ddpm", ddpm_steps)):
            table.run(f"SDM sampling, {sampler} {steps}", f"{on.image_size} px, speed ON",
                      sdm_sampling(sdm, on, data, store, sampler, steps, sample_batch))
        if args.throughput_dir:
            write_throughputs(sdm, args.throughput_dir, device, store, on.sampler, on.sample_steps, sample_batch)
    if "downstream" in only:
        for task in ("detection", "localization"):
            table.run(f"{task} iteration", f"{px} px", downstream_iteration(task, px, iters, warmup, device))

    text = table.markdown()
    print(f"\n{name}, {time.strftime('%Y-%m-%d')}\n\n{text}")
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
