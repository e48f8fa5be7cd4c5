"""SDM training loop: AdamW, optional gradient clipping, EMA, the two-stage recipe (train, then fine-tune
with classifier-free guidance drop at a lower learning rate), bf16 autocast and channels-last on CUDA,
periodic atomic checkpoints bound to their training data, and exact resume.

Exact resume: every random draw of step t (batch indices, timesteps, noise, guidance drop, and the
global RNG used by dropout) is seeded from (seed, t) alone, and the checkpoint holds the model,
optimiser and EMA states. A run killed after its checkpoint at step k and restarted therefore
replays steps k+1.. exactly as an unbroken run would (bitwise on CPU). The checkpoint also records
the training data (`load_training_data`): a run on other data, or with other options, trains afresh.

Several GPUs (`sdm.gpus`, processes started by torchrun, `nodulesynth.models.distributed`): every process draws
the whole step's random inputs from the same (seed, step) generator and takes its own contiguous share of the
batch (reading only those slices); DistributedDataParallel averages the gradients, so each step is the one-GPU
step, up to float rounding. Every process keeps the same weights and EMA; rank 0 alone writes the files.
"""

import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

from nodulesynth.models import distributed
from nodulesynth.models.checkpoints import check_network, load_checkpoint, resume_refusal, save_checkpoint
from nodulesynth.models.data import Prefetched, SlicePairs, data_summary, one_hot, training_data
from nodulesynth.models.device import pick_device
from nodulesynth.models.distributed import Ranks
from nodulesynth.models.ema import EMA
from nodulesynth.models.records import LossCurve, progress, write_options_file
from nodulesynth.models.sdm.diffusion import GaussianDiffusion
from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.unet import SDMUNet
from nodulesynth.models.seeding import seed_everything_for_step, step_generator

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
LOSS = "loss.tsv"
OPTIONS = "options.yaml"
FORMAT = "nodulesynth.sdm/1"


def draw_batch(data: SlicePairs, options: SDMOptions, step: int, ranks: Ranks = Ranks()):
    """All random inputs of one step, from the (seed, step) generator: x0, labels, t, noise, keep.

    They are drawn for the whole batch whatever the number of processes, so that sample i of a step has the
    same slice, timestep, noise and guidance drop on one GPU or on several; `ranks` then keeps this
    process's share (`Ranks.shard`), and only its slices are read.
    """
    g = step_generator(options.seed, step)
    n, b, size = len(data), options.batch_size, data.image_size
    indices = torch.randint(n, (b,), generator=g)
    t = torch.randint(options.diffusion_steps, (b,), generator=g)
    noise = torch.randn((b, 1, size, size), generator=g)  # the shape of SlicePairs.batch's images
    # Classifier-free guidance: the WHOLE map becomes the null (all-zeros) map for a dropped sample; in
    # stage 1 of the two-stage recipe no map is dropped (the draw is made anyway, so each step draws alike).
    keep = (torch.rand(b, generator=g) >= options.drop_rate_at(step)).float()
    share = ranks.shard(b)
    x0, label = data.batch(indices[share])
    return x0, label, t[share], noise[share], keep[share]


def build_model(options: SDMOptions, device: torch.device, channels_last: bool = False) -> SDMUNet:
    torch.manual_seed(options.seed)  # the same initial weights for the same seed
    model = SDMUNet(options).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


class Trainer:
    """One SDM, its optimiser and EMA; `step()` runs training step `self.step + 1`.

    bf16 / channels_last: None follows the options on CUDA and leaves them off elsewhere (on a CPU
    they cost more than they give); True forces them on any device, which lets the CPU tests run
    the same autocast and memory-format code a GPU runs.
    `ranks`: this process among `options.gpus` (their process group initialised): the network is then
    wrapped in DistributedDataParallel for the passes (`self.network`); `self.model` stays the plain network
    (checkpoints, EMA).
    """

    def __init__(self, data: SlicePairs, options: SDMOptions, device="auto", bf16: bool | None = None,
                 channels_last: bool | None = None, ranks: Ranks = Ranks(), batches=None):
        distributed.require_processes(options.gpus, ranks, "sdm.gpus")
        self.options = options
        self.ranks = ranks
        self.device = distributed.rank_device(pick_device(device), ranks)
        self.cuda = self.device.type == "cuda"
        self.bf16 = (self.cuda and options.bf16) if bf16 is None else bf16
        self.channels_last = (self.cuda and options.channels_last) if channels_last is None else channels_last
        self.data = data
        # each step's batch: draw_batch, or a Prefetched one that loader threads draw ahead (the same batches)
        self.batches = batches or Prefetched(lambda step: draw_batch(data, options, step, ranks))
        self.model = build_model(options, self.device, self.channels_last)
        self.network = self.model
        if ranks.size > 1:
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.cuda else None)
        self.diffusion = GaussianDiffusion.from_options(options)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        self.ema = EMA(self.model, options.ema_decay, warmup=options.ema_warmup)
        self.step = 0
        if self.cuda:
            torch.backends.cudnn.benchmark = True

    def train_step(self):
        """One optimiser step over the whole batch, in `options.micro_batches` passes whose gradients add
        up to the full batch's (each pass's summed loss over this process's share; DDP averages the shares);
        returns the detached (loss, mse, vb) summed over this process's share over batch_size, which summed
        over the processes (`distributed.all_reduce_sum`) are the batch means. The random inputs are drawn
        for the whole batch first, so the step does not depend on its cut into passes or processes (with
        dropout, its masks are drawn per pass and process)."""
        o = self.options
        seed_everything_for_step(o.seed, self.step, self.ranks.rank)  # dropout draws from the global RNG
        x0, label, t, noise, keep = self.batches(self.step)
        self.model.train()
        for group in self.optimizer.param_groups:  # the stage's rate, also right after a resume
            group["lr"] = o.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(3, device=self.device)
        start = 0
        for index, size in enumerate(o.micro_batches):
            part = slice(start, start + size)
            start += size
            # DDP averages the gradients over the processes in the last pass's backward; before it, each
            # process only adds up its own.
            last = index == len(o.micro_batches) - 1
            with contextlib.nullcontext() if last or self.network is self.model else self.network.no_sync():
                losses = self._losses(x0[part], label[part], t[part], noise[part], keep[part])
                (losses["loss"].sum() / o.gpu_batch_size).backward()
            sums += torch.stack([losses[k].detach().sum() for k in ("loss", "mse", "vb")])
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        self.optimizer.step()
        self.ema.update(self.model)
        self.step += 1
        return sums / o.batch_size

    def _losses(self, x0, label, t, noise, keep):
        """Per-sample losses of one forward pass on the training device."""
        dev = self.device
        x0, noise = x0.to(dev, non_blocking=True), noise.to(dev, non_blocking=True)
        t, keep, label = t.to(dev), keep.to(dev), label.to(dev, non_blocking=True)
        cond = one_hot(label, self.options.num_classes) * keep[:, None, None, None]
        xt = self.diffusion.q_sample(x0, t, noise)
        if self.channels_last:
            xt, cond = xt.contiguous(memory_format=torch.channels_last), cond.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.network(xt, t, cond)
        return self.diffusion.training_losses(output.float(), x0, xt, t, noise, self.options.vlb_weight)

    def state_dict(self):
        return {"format": FORMAT, "step": self.step, "options": self.options.to_dict(),
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict()}

    def load_state_dict(self, state):
        check_network(state, FORMAT, self.options, "an SDM")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])

    def ema_state_dict(self):
        """EMA weights as a plain model state dict on the CPU."""
        ema_model = copy.deepcopy(self.model)
        self.ema.copy_to(ema_model)
        return {k: v.detach().cpu().contiguous() for k, v in ema_model.state_dict().items()}


def resume_refusal_sdm(state: dict, options: SDMOptions, data: dict) -> str | None:
    """Why a run with `options` on `data` must not resume the checkpoint `state`; None when it may.

    Besides the data and the options (`resume_refusal`): a longer or shorter run moves the start of
    the fine-tuning stage, so it resumes only a checkpoint that has not reached either start.
    """
    why = resume_refusal(state, options.to_dict(), data, SDMOptions.RESUMABLE_CHANGES, "sdm")
    if why:
        return why
    saved = SDMOptions.from_config(state["options"])
    if saved.finetune_start != options.finetune_start and state["step"] > min(saved.finetune_start,
                                                                              options.finetune_start):
        return (f"its step {state['step']} is past the start of fine-tuning, which moves from step "
                f"{saved.finetune_start} to {options.finetune_start} with sdm.max_steps {options.max_steps}")
    return None


def train_sdm(slice_paths, out_dir, options: SDMOptions, device="auto", max_steps_this_run=None, scratch=None,
              workers: int = 0) -> Path:
    """Train on the given slice stacks (and on nothing else); resume from out_dir/checkpoint.pt.

    The checkpoint is resumed only when it was trained on exactly these stacks (content digests)
    with these options; otherwise training starts afresh and the log says why. Writes
    out_dir/checkpoint.pt every `checkpoint_every` steps and when stopping, out_dir/loss.tsv (step,
    loss, mse, vb, images_per_s), out_dir/options.yaml and, once `max_steps` are done,
    out_dir/model.pt (EMA weights, options and the training-data record). `max_steps_this_run`
    stops early (as a kill would, but after a checkpoint). Returns model.pt when training is
    complete, else checkpoint.pt. The slices are staged as uint8 memory-mapped files in a temporary
    folder under `scratch` (default $TMPDIR), removed at the end; `workers` loader threads draw the batches ahead.

    Under torchrun (`sdm.gpus` processes, `distributed.launcher`) each process calls this: rank 0 stages the
    data for all and writes the files; every process trains its share of each batch on its own GPU
    (cuda:LOCAL_RANK where `device` is a bare "cuda"), or on the CPU (gloo).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = Ranks.from_environ()
    # Before the process group, which would wait for processes never started.
    distributed.require_processes(options.gpus, ranks, "sdm.gpus")
    rank_device = distributed.rank_device(pick_device(device), ranks)
    with distributed.process_group(rank_device, ranks), \
            training_data(slice_paths, options.image_size, scratch, ranks) as (data, data_record):
        # the loader threads end before the staged data they read is removed
        with Prefetched(lambda step: draw_batch(data, options, step, ranks), workers) as batches:
            return _train(data, data_record, out_dir, options, rank_device, max_steps_this_run, ranks, batches)


def _train(data: SlicePairs, data_record: dict, out_dir: Path, options: SDMOptions, device, max_steps_this_run,
           ranks: Ranks = Ranks(), batches=None):
    trainer = Trainer(data, options, device, ranks=ranks, batches=batches)
    main = ranks.main  # the one process that prints and writes

    def say(message):
        if main:
            print(message, file=sys.stderr)

    curve = LossCurve()
    checkpoint_path = out_dir / CHECKPOINT
    # Every process reads the checkpoint (its own copy of the weights); rank 0 writes the next one only after a
    # step that all of them took part in, so each has read it by then.
    state = load_checkpoint(checkpoint_path, map_location=trainer.device) if checkpoint_path.exists() else None
    why = state and resume_refusal_sdm(state, options, data_record)
    if why:
        say(f"sdm: not resuming {checkpoint_path}: {why}; training afresh")
        if main:
            (out_dir / MODEL).unlink(missing_ok=True)  # a model of that other run must not pass for this one's
    elif state:
        trainer.load_state_dict(state)
        # The curve travels in the checkpoint (as SPADE's): Snakemake deletes loss.tsv with a failed job's outputs.
        curve.rows = [dict(row) for row in state.get("curve", [])] or LossCurve.load(out_dir / LOSS).rows
        curve.truncate(trainer.step)
        say(f"sdm: resumed from {checkpoint_path} at step {trainer.step}")
    if main:
        _describe_run(trainer, data, data_record, out_dir)
    return _train_steps(trainer, curve, out_dir, options, max_steps_this_run, data_record)


def _describe_run(trainer: Trainer, data: SlicePairs, data_record: dict, out_dir: Path):
    """The options file, and the run in one line of the log."""
    options = trainer.options
    write_options_file(out_dir / OPTIONS, {
        "model": "sdm", "options": options.to_dict(),
        "recipe": (f"{options.finetune_start} steps without dropping maps at lr {options.lr:g}, then "
                   f"{options.finetune_steps} steps with drop_rate {options.drop_rate:g} at lr {options.finetune_lr:g}"
                   if options.finetune_steps else
                   f"{options.max_steps} steps with drop_rate {options.drop_rate:g} at lr {options.lr:g}"),
        "gradient_clipping": "off" if options.grad_clip is None else f"max norm {options.grad_clip:g}",
        "training_data": data_summary(data_record)})
    n_params = sum(p.numel() for p in trainer.model.parameters())
    shared = (f" shared by {options.gpus} processes ({distributed.backend(trainer.device)}), each "
              f"{options.gpu_batch_size}" if options.gpus > 1 else "")
    print(f"sdm: {len(data)} slices at {options.image_size} px, {n_params / 1e6:.2f} M parameters, "
          f"device {trainer.device}, bf16 {trainer.bf16}, channels_last {trainer.channels_last}, "
          f"batch {options.batch_size}{shared} in passes of {options.micro_batches[0]}, "
          f"gradient checkpointing {options.grad_checkpoint}", file=sys.stderr)


def _train_steps(trainer: Trainer, curve: LossCurve, out_dir: Path, options: SDMOptions, max_steps_this_run,
                 data_record: dict) -> Path:
    """The steps of a run, from the trainer's step on; rank 0 writes the checkpoints, the curve and the model."""
    main = trainer.ranks.main
    checkpoint_path = out_dir / CHECKPOINT
    end = options.max_steps
    if max_steps_this_run is not None:
        end = min(end, trainer.step + int(max_steps_this_run))
    bar = progress(options.max_steps, trainer.step, "sdm train", disable=not main)
    window, window_steps, window_start = None, 0, time.perf_counter()

    def save():
        if main:
            save_checkpoint(checkpoint_path, {**trainer.state_dict(), "data": data_record,
                                              "curve": [dict(row) for row in curve.rows]})
            curve.write(out_dir / LOSS)

    while trainer.step < end:
        values = trainer.train_step()
        window = values if window is None else window + values
        window_steps += 1
        bar.update(1)
        if trainer.step % options.log_every == 0 or trainer.step == end:
            # The window's sums of all processes: the batch means, as one process would log them; one device
            # sync (and one all-reduce) per window.
            loss, mse, vb = (distributed.all_reduce_sum(window) / window_steps).tolist()
            rate = window_steps * options.batch_size / (time.perf_counter() - window_start)
            curve.append(trainer.step, loss=loss, mse=mse, vb=vb, images_per_s=rate)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
            window, window_steps, window_start = None, 0, time.perf_counter()
        if trainer.step % options.checkpoint_every == 0 or trainer.step == end:
            save()
    bar.close()
    if trainer.step < options.max_steps:
        return checkpoint_path
    if main:
        save_checkpoint(out_dir / MODEL, {"format": FORMAT, "step": trainer.step, "options": options.to_dict(),
                                          "model": trainer.ema_state_dict(), "data": data_record})
        curve.write(out_dir / LOSS)
    return out_dir / MODEL
