"""Sampling a trained SDM: lesion maps in, synthetic CT slices (with the map that made each) out."""

from pathlib import Path

import numpy as np
import torch

from nodulesynth.errors import InputError
from nodulesynth.models.checkpoints import load_checkpoint
from nodulesynth.models.data import one_hot
from nodulesynth.models.device import pick_device
from nodulesynth.models.sdm.diffusion import GaussianDiffusion
from nodulesynth.models.sdm.options import SDMOptions
from nodulesynth.models.sdm.samplers import guided_model, randn, sample
from nodulesynth.models.sdm.unet import SDMUNet
from nodulesynth.models.synthesis import generator_provenance, plan_maps, scan_seed, to_uint8, write_synthetic


def load_sdm(model_path, device="auto", channels_last: bool | None = None):
    """-> (model in eval mode on `device`, the full diffusion, options) from a train_sdm model.pt.

    channels_last: None follows the options on CUDA only; True forces it (as in `sample_images`)."""
    device = pick_device(device)
    state = load_checkpoint(model_path, map_location="cpu")
    options = SDMOptions.from_config(state["options"])
    model = SDMUNet(options)
    model.load_state_dict(state["model"])
    model = model.to(device).eval()
    if (device.type == "cuda" and options.channels_last) if channels_last is None else channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, GaussianDiffusion.from_options(options), options


@torch.no_grad()
def sample_images(model: SDMUNet, diffusion: GaussianDiffusion, labels: torch.Tensor, sampler: str = "ddpm",
                  steps: int = 1000, guidance_scale: float = 1.5, generator=None,
                  eta: float = 0.0, bf16: bool | None = None, channels_last: bool | None = None) -> np.ndarray:
    """Label maps long [B,S,S] -> synthetic slices uint8 [B,S,S].

    Noise comes from `generator`, one for the batch or one per map (samplers.randn; a CPU generator gives
    the same images on any device up to float rounding). bf16 autocast and channels-last inputs: None follows the model's options on CUDA and
    leaves them off elsewhere; True or False decides on any device.
    """
    options = model.options
    device = next(model.parameters()).device
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim != 3:
        raise InputError(f"labels must be [B,S,S], got {tuple(labels.shape)}")
    cond = one_hot(labels, options.num_classes)
    cuda = device.type == "cuda"
    channels_last = (cuda and options.channels_last) if channels_last is None else channels_last
    if channels_last:
        cond = cond.contiguous(memory_format=torch.channels_last)
    use_bf16 = (cuda and options.bf16) if bf16 is None else bf16

    def network(x, t, c):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return model(x, t, c)

    model_fn = guided_model(network, cond, guidance_scale, channels=options.in_channels)
    x = randn((len(labels), options.in_channels, *labels.shape[1:]), generator, device)
    x0 = sample(sampler, model_fn, diffusion, x, steps, generator, eta=eta)
    return to_uint8(x0[:, 0])


def sample_generator(seed: int, scan_id: str, index: int) -> torch.Generator:
    """The noise of one map (`index` into the scan's chosen maps), whatever batch it is sampled in."""
    state = scan_seed(seed, scan_id, index).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFFFFFFFFFFFFFF)


def sample_sdm(model_path, slice_paths, out_dir, sampler=None, steps=None, guidance_scale=None, seed=0,
               mask_source="real", max_slices_per_scan=None, batch_size=None, device="auto", eta=None,
               shape_paths=None, nodule_maps_per_scan=0, *, fold) -> list:
    """Synthesise one stack per input stack: out_dir/{scan_id}.npz in the slices layout.

    fold: the generator's fold ("0".."k-1" or "holdout"), recorded with the model file's sha256 in each
    stack (synthesis.generator_provenance) for the leakage audit.

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
    plans = plan_maps([Path(p) for p in slice_paths], options.image_size, seed, mask_source,
                      max_slices_per_scan, shape_paths, nodule_maps_per_scan)

    def synthesise(labels, keys):
        return sample_images(model, diffusion, labels, sampler, steps, guidance_scale,
                             [sample_generator(seed, scan_id, index) for scan_id, index in keys], eta=eta)

    extra = {**generator_provenance("sdm", fold, model_path), "mask_source": mask_source, "sampler": sampler,
             "steps": steps, "guidance_scale": guidance_scale, "eta": eta, "seed": seed}
    return write_synthetic(plans, out_dir, options.image_size, int(batch_size or options.sample_batch_size),
                           synthesise, extra, f"sdm sample on {next(model.parameters()).device}")
