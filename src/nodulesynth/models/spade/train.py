"""SPADE training: the trainer (one G step then one D step, as NVlabs/SPADE) and `train_spade`.

Resume: `out_dir/checkpoint.pt` holds both networks, both Adam states, the EMA and the loss
curve; the batch of step t is drawn from `step_generator(seed, t)` and nothing else in a step is
random, so a run killed and resumed ends with the same weights as an unbroken one (on CPU). The
checkpoint also records the training data (`load_training_data`): a run on other data, or with
other options, trains afresh.
"""

import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

from nodulesynth.labels import NUM_CLASSES
from nodulesynth.models.checkpoints import check_network, load_checkpoint, resume_refusal, save_checkpoint
from nodulesynth.models.data import Prefetched, SlicePairs, data_summary, one_hot, training_data
from nodulesynth.models.device import pick_device
from nodulesynth.models.ema import EMA
from nodulesynth.models.records import LossCurve, progress, write_options_file
from nodulesynth.models.seeding import step_generator

from .losses import build_vgg_loss, d_hinge_loss, feature_matching_loss, g_hinge_loss, perceptual_loss_status
from .networks import MultiscaleDiscriminator, SPADEGenerator, count_parameters
from .options import SPADEOptions

FORMAT = "nodulesynth.spade/1"

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_NAME = "model.pt"
LOSS_NAME = "loss.tsv"
OPTIONS_NAME = "options.yaml"
LOSS_KEYS = ("g_gan", "g_feat", "g_vgg", "g_total", "d_real", "d_fake")


def build_generator(options: SPADEOptions) -> SPADEGenerator:
    # Built on the CPU from the seed alone, so the initial weights do not depend on the device
    # or on what else drew from the global RNG; fork_rng leaves the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        return SPADEGenerator(options)


def build_discriminator(options: SPADEOptions) -> MultiscaleDiscriminator:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed + 1)
        return MultiscaleDiscriminator(options)


class SPADETrainer:
    """Generator, discriminator, their optimisers (TTUR Adam) and the optional generator EMA."""

    def __init__(self, options: SPADEOptions, device="cpu", bf16: bool | None = None):
        """bf16: None follows `options.bf16` on CUDA and leaves it off elsewhere (a CPU test may force it on)."""
        self.options = options
        self.device = torch.device(device)
        self.bf16 = (self.device.type == "cuda" and options.bf16) if bf16 is None else bf16
        self.generator = build_generator(options).to(self.device)
        self.discriminator = build_discriminator(options).to(self.device)
        betas = (options.beta1, options.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=options.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=options.lr_d, betas=betas)
        self.vgg = build_vgg_loss(options)
        if self.vgg is not None:
            self.vgg.to(self.device)
        self.ema = EMA(self.generator, options.ema_decay, warmup=options.ema_warmup) if options.ema else None
        self.step = 0

    def autocast(self):
        # bf16 needs no loss scaling (fp32's range); weights, optimiser states and the losses stay fp32. Off, no
        # autocast context at all (torch has none for the meta device, on which benchmarks/cost.py counts FLOPs).
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def training_step(self, image: torch.Tensor, label: torch.Tensor) -> dict:
        """One generator update then one discriminator update on a batch; returns the losses as 0-d tensors on
        the device (reading them is a host sync: the caller does it once per loss-curve row, not per step)."""
        opt = self.options
        self.generator.train()
        self.discriminator.train()
        seg = one_hot(label, NUM_CLASSES)

        # Generator: D is frozen so this backward does not compute (unused) D weight gradients.
        self.discriminator.requires_grad_(False)
        with self.autocast():
            fake = self.generator(seg)
            pred_fake, pred_real = self.discriminate(seg, fake, image)
            g_gan = g_hinge_loss(pred_fake)
            g_feat = feature_matching_loss(pred_fake, pred_real, opt.lambda_feat)
            g_vgg = (self.vgg(fake, image) * opt.lambda_vgg if self.vgg is not None
                     else torch.zeros((), device=fake.device))
            g_total = (g_gan + g_feat + g_vgg).float()
        self.opt_g.zero_grad(set_to_none=True)
        g_total.backward()
        self.opt_g.step()
        self.discriminator.requires_grad_(True)

        # Discriminator on the same fake, detached (NVlabs regenerates it with the updated G under
        # no_grad; reusing it, as pix2pixHD does, saves a generator forward pass per step).
        with self.autocast():
            pred_fake, pred_real = self.discriminate(seg, fake.detach(), image)
            d_real, d_fake = d_hinge_loss(pred_real, pred_fake)
        self.opt_d.zero_grad(set_to_none=True)
        (d_real + d_fake).backward()
        self.opt_d.step()

        if self.ema is not None:
            self.ema.update(self.generator)
        self.step += 1
        values = dict(g_gan=g_gan, g_feat=g_feat, g_vgg=g_vgg, g_total=g_total, d_real=d_real, d_fake=d_fake)
        return {k: v.detach().float() for k, v in values.items()}

    def discriminate(self, seg, fake, real):
        """D on fake and real in one batch (one pass, one power iteration); returns (fake, real)."""
        outputs = self.discriminator(torch.cat([seg, seg]), torch.cat([fake, real]))
        n = fake.shape[0]
        pred_fake = [[f[:n] for f in scale] for scale in outputs]
        pred_real = [[f[n:] for f in scale] for scale in outputs]
        return pred_fake, pred_real

    def sampling_generator(self) -> SPADEGenerator:
        """The generator to sample with, in eval mode: a copy holding the EMA weights when EMA is on."""
        generator = copy.deepcopy(self.generator)
        if self.ema is not None:
            self.ema.copy_to(generator)
        return generator.eval()

    def state_dict(self) -> dict:
        return {
            "format": FORMAT, "step": self.step, "options": self.options.to_dict(),
            "generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }

    def load_state_dict(self, state: dict):
        check_network(state, FORMAT, self.options, "a SPADE")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        # The checkpoint's learning rates win otherwise: the config's are the intended ones.
        for optimizer, lr in ((self.opt_g, self.options.lr_g), (self.opt_d, self.options.lr_d)):
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["betas"] = (self.options.beta1, self.options.beta2)
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                _say("checkpoint has no EMA; starting the EMA from the current weights")
                self.ema = EMA(self.generator, self.options.ema_decay, warmup=self.options.ema_warmup)
        self.step = int(state["step"])


def _say(message: str):
    print(f"spade: {message}", file=sys.stderr)


class _RunningMean:
    """Loss means over the steps since the last loss-curve row (kept in the checkpoint). The sums stay on the
    device (tensors) until read: one host sync per row instead of six per step."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, values: dict):
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def pop(self) -> dict:
        means = {k: float(v) / self.count for k, v in self.sums.items()} if self.count else {}
        self.sums, self.count = {}, 0
        return means

    def state(self) -> dict:
        return {"sums": {k: float(v) for k, v in self.sums.items()}, "count": self.count}


def model_state(trainer: SPADETrainer, data: dict | None = None) -> dict:
    """What `model.pt` holds: the sampling generator's weights, the options to rebuild it, whether the
    perceptual loss was on, and the record of the training data (`load_training_data`)."""
    return {"format": FORMAT, "step": trainer.step, "options": trainer.options.to_dict(),
            "generator": trainer.sampling_generator().state_dict(), "ema": trainer.ema is not None,
            "perceptual_loss": perceptual_loss_status(trainer.options), "data": data}


def train_spade(slice_paths, out_dir, options: SPADEOptions, device="auto", max_steps_this_run=None,
                scratch=None, workers: int = 0) -> Path:
    """Train on the slices of the given stacks; return `out_dir/model.pt`.

    Resumes from `out_dir/checkpoint.pt` when it was trained on exactly these stacks (content
    digests) with these options; otherwise trains afresh and the log says why. Writes loss.tsv and
    options.yaml (options, perceptual loss on or off, training-data digest) beside the model.
    `max_steps_this_run` stops after that many steps WITHOUT a final checkpoint, as a kill would (for
    tests); the return value is then the checkpoint path, since no model has been written. The slices
    are staged as uint8 memory-mapped files in a temporary folder under `scratch` (default $TMPDIR); `workers`
    loader threads draw the batches ahead.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slice_paths, device = [Path(p) for p in slice_paths], pick_device(device)
    with training_data(slice_paths, options.image_size, scratch) as (data, data_record), \
            Prefetched(lambda step: draw_batch(data, options, step), workers) as batches:
        return _train(data, data_record, len(slice_paths), out_dir, options, device, max_steps_this_run, batches)


def draw_batch(data: SlicePairs, options: SPADEOptions, step: int):
    """The only randomness of a step: its batch (with replacement), from (seed, step) alone."""
    indices = torch.randint(len(data), (options.batch_size,), generator=step_generator(options.seed, step))
    return data.batch(indices)


def _train(data: SlicePairs, data_record: dict, stacks: int, out_dir: Path, options: SPADEOptions, device,
           max_steps_this_run, batches=None) -> Path:
    batches = batches or Prefetched(lambda step: draw_batch(data, options, step))
    checkpoint_path, model_path, loss_path = out_dir / CHECKPOINT_NAME, out_dir / MODEL_NAME, out_dir / LOSS_NAME
    trainer = SPADETrainer(options, device)
    curve, running = LossCurve(), _RunningMean()
    state = load_checkpoint(checkpoint_path, map_location=device) if checkpoint_path.exists() else None
    why = state and resume_refusal(state, options.to_dict(), data_record, SPADEOptions.RESUMABLE_CHANGES, "spade")
    if why:
        _say(f"not resuming {checkpoint_path}: {why}; training afresh")
        model_path.unlink(missing_ok=True)  # a model of that other run must not pass for this one's
    elif state:
        trainer.load_state_dict(state)
        curve.rows = [dict(row) for row in state["curve"]]
        running.sums, running.count = dict(state["running"]["sums"]), int(state["running"]["count"])
        _say(f"resumed from {checkpoint_path} at step {trainer.step}")
    _say(f"{len(data)} training slices from {stacks} stacks at {options.image_size} px on {device}; "
         f"G {count_parameters(trainer.generator) / 1e6:.2f} M, "
         f"D {count_parameters(trainer.discriminator) / 1e6:.2f} M "
         f"parameters; {options.upsampling} upsamplings from {options.start_size} px")
    write_options_file(out_dir / OPTIONS_NAME, {
        "model": "spade", "options": options.to_dict(), "perceptual_loss": perceptual_loss_status(options),
        "training_data": data_summary(data_record)})

    def write_checkpoint():
        state = trainer.state_dict()
        state["data"] = data_record
        state["curve"] = [dict(row) for row in curve.rows]
        state["running"] = running.state()
        save_checkpoint(checkpoint_path, state)
        curve.write(loss_path)

    end = options.max_steps if max_steps_this_run is None else min(options.max_steps, trainer.step + int(max_steps_this_run))
    bar = progress(total=options.max_steps, initial=trainer.step, desc="spade")
    window_start, window_steps = time.perf_counter(), 0
    try:
        while trainer.step < end:
            image, label = batches(trainer.step)
            losses = trainer.training_step(image.to(device, non_blocking=True), label.to(device, non_blocking=True))
            running.add(losses)
            window_steps += 1
            rate = window_steps * options.batch_size / max(time.perf_counter() - window_start, 1e-9)
            if trainer.step % options.log_every == 0 or trainer.step == options.max_steps:
                means = running.pop()
                curve.append(trainer.step, **means, images_per_s=rate)
                window_start, window_steps = time.perf_counter(), 0
                bar.set_postfix(g=f"{means['g_total']:.3f}", d=f"{means['d_real'] + means['d_fake']:.3f}",
                                img_s=f"{rate:.1f}", refresh=False)
            bar.update(1)
            if trainer.step % options.checkpoint_every == 0 and trainer.step < options.max_steps:
                write_checkpoint()
    finally:
        bar.close()

    if trainer.step < options.max_steps:
        return checkpoint_path  # stopped early on purpose (simulated kill)
    write_checkpoint()  # so that a rerun, or a longer run, resumes instead of starting over
    save_checkpoint(model_path, model_state(trainer, data_record))
    _say(f"done at step {trainer.step}; model in {model_path}, loss curve in {loss_path}")
    return model_path
