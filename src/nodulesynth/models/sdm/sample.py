"""Sampling a trained SDM: lesion maps in, synthetic CT slices (with the map that made each) out."""

import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import torch

from nodulesynth.data.slices import SliceStack, load_slices, save_slices
from nodulesynth.masks.labels import NODULE
from nodulesynth.models.common import load_checkpoint, one_hot, pick_device, progress
from nodulesynth.models.sdm.diffusion import GaussianDiffusion
from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.samplers import guided_model, randn, sample
from nodulesynth.models.sdm.unet import SDMUNet
from nodulesynth.models.transplant import choose_maps, nodule_shapes


def load_sdm(model_path, device="auto"):
    """-> (model in eval mode on `device`, the full diffusion, options) from a train_sdm model.pt."""
    device = pick_device(device)
    state = load_checkpoint(model_path, map_location="cpu")
    options = SDMOptions.from_config(state["options"])
    model = SDMUNet(options)
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    if device.type == "cuda" and options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, GaussianDiffusion.from_options(options), options


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> 0..255, the inverse of the training scaling (u / 127.5 - 1)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


@torch.no_grad()
def sample_images(model: SDMUNet, diffusion: GaussianDiffusion, labels: torch.Tensor, sampler: str = "ddpm",
                  steps: int = 1000, guidance_scale: float = 1.5, generator: torch.Generator = None,
                  eta: float = 0.0, bf16: bool | None = None) -> np.ndarray:
    """Label maps long [B,S,S] -> synthetic slices uint8 [B,S,S].

    Noise comes from `generator` (a CPU generator gives the same images on any device up to float
    rounding). bf16 autocast applies on CUDA only, by default when the model was trained with it.
    """
    options = model.options
    device = next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B,S,S], got {tuple(labels.shape)}")
    cond = one_hot(labels, options.num_classes)
    channels_last = device.type == "cuda" and options.channels_last
    if channels_last:
        cond = cond.contiguous(memory_format=torch.channels_last)
    use_bf16 = device.type == "cuda" and (options.bf16 if bf16 is None else bf16)

    def network(x, t, c):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(x, t, c)

    model_fn = guided_model(network, cond, guidance_scale, channels=options.in_channels)
    x = randn((len(labels), options.in_channels, *labels.shape[1:]), generator, device)
    x0 = sample(sampler, model_fn, diffusion, x, steps, generator, eta=eta)
    return to_uint8(x0[:, 0])


def resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Label maps [N,H,W] -> [N,size,size], nearest neighbour (as the training set)."""
    labels = np.asarray(labels)
    if labels.shape[1:] == (size, size):
        return labels.astype(np.uint8)
    if not len(labels):
        return np.zeros((0, size, size), np.uint8)
    return np.stack([cv2.resize(lb, (size, size), interpolation=cv2.INTER_NEAREST) for lb in labels]).astype(np.uint8)


def scan_seed(seed: int, scan_id: str, *more: int) -> np.random.SeedSequence:
    """A seed sequence for one scan (and batch): independent of the order scans are processed in."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(scan_id.encode()), *map(int, more)])


def batch_generator(seed: int, scan_id: str, start: int) -> torch.Generator:
    state = scan_seed(seed, scan_id, start).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFFFFFFFFFFFFFF)


def sample_sdm(model_path, slice_paths, out_dir, sampler=None, steps=None, guidance_scale=None, seed=0,
               mask_source="real", max_slices_per_scan=None, batch_size=None, device="auto", eta=None,
               shape_paths=None) -> list:
    """Synthesise one stack per input stack: out_dir/{scan_id}.npz in the slices layout.

    `image` is the synthetic slice and `label` the map that conditioned it, both at the model's
    resolution; z, slice_index and has_nodule follow the maps. mask_source "real" uses the stacks'
    own maps, "transplant" their nodule-free maps with a nodule shaped like one of the real nodules
    of `shape_paths` (default: the given stacks). sampler/steps/guidance_scale/eta/batch_size
    default to the options stored with the model. Deterministic for a seed.
    """
    model, diffusion, options = load_sdm(model_path, device)
    sampler = sampler or options.sampler
    steps = int(steps or options.sample_steps)
    guidance_scale = options.guidance_scale if guidance_scale is None else float(guidance_scale)
    eta = options.ddim_eta if eta is None else float(eta)
    batch_size = int(batch_size or options.sample_batch_size)
    size = options.image_size
    out_dir = Path(out_dir)
    slice_paths = [Path(p) for p in slice_paths]

    shapes = None
    if mask_source == "transplant":
        shapes = []
        for path in (shape_paths if shape_paths is not None else slice_paths):
            stack = load_slices(path)
            if stack.status == "ok" and len(stack):
                shapes.extend(nodule_shapes(resize_labels(stack.label, size)))
        if not shapes:
            raise ValueError("mask_source 'transplant': no nodules in the stacks to draw shapes from")

    plans = []
    for path in slice_paths:
        stack = load_slices(path)
        scan_id = path.stem
        if stack.status != "ok" or not len(stack):
            plans.append((path, stack, scan_id, None, None))
            continue
        rng = np.random.default_rng(scan_seed(seed, scan_id))
        indices, maps = choose_maps(resize_labels(stack.label, size), mask_source, rng, shapes, max_slices_per_scan)
        plans.append((path, stack, scan_id, indices, maps))

    total = sum(len(p[3]) for p in plans if p[3] is not None)
    print(f"sdm: sampling {total} slices from {len(plans)} stacks with {sampler} ({steps} steps, "
          f"guidance {guidance_scale}, masks {mask_source}) on {next(model.parameters()).device}", file=sys.stderr)
    bar = progress(total, 0, "sdm sample")
    written = []
    for path, stack, scan_id, indices, maps in plans:
        target = out_dir / f"{scan_id}.npz"
        if indices is None:
            save_slices(target, SliceStack.rejected(scan_id, stack.patient_id,
                                                    stack.reason or "no slices", (size, size)))
            written.append(target)
            continue
        images = np.zeros((len(indices), size, size), np.uint8)
        for start in range(0, len(indices), batch_size):
            labels = torch.from_numpy(maps[start:start + batch_size].astype(np.int64))
            images[start:start + len(labels)] = sample_images(
                model, diffusion, labels, sampler, steps, guidance_scale,
                batch_generator(seed, scan_id, start), eta=eta)
            bar.update(len(labels))
        save_slices(target, SliceStack(
            image=images, label=maps.astype(np.uint8), z=np.asarray(stack.z)[indices],
            slice_index=np.asarray(stack.slice_index)[indices], has_nodule=(maps == NODULE).any((1, 2)),
            scan_id=stack.scan_id or scan_id, patient_id=stack.patient_id,
            extra={"source_index": indices, "mask_source": mask_source, "generator": "sdm",
                   "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale, "seed": seed}))
        written.append(target)
    bar.close()
    return written
