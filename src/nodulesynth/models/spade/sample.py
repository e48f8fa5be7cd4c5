"""Sampling a trained SPADE generator: lesion maps in, synthetic CT slices (with their maps) out.

The maps are chosen by `nodulesynth.models.synthesis.plan_maps`, as for the SDM, so both arms of
the study synthesise from equal inputs.
"""

from pathlib import Path

import numpy as np
import torch

from nodulesynth.errors import InputError
from nodulesynth.labels import NUM_CLASSES
from nodulesynth.models.checkpoints import load_checkpoint
from nodulesynth.models.data import one_hot
from nodulesynth.models.device import pick_device
from nodulesynth.models.synthesis import generator_provenance, plan_maps, to_uint8, write_synthetic

from .networks import SPADEGenerator
from .options import SPADEOptions
from .train import FORMAT


def load_spade(model_path, device="auto"):
    """-> (generator in eval mode on `device`, options) from a train_spade model.pt."""
    device = pick_device(device)
    state = load_checkpoint(model_path, map_location="cpu")
    if state.get("format") != FORMAT:
        raise InputError(f"{model_path}: not a SPADE model (format {state.get('format')!r})")
    options = SPADEOptions.from_config(state["options"])
    generator = SPADEGenerator(options)
    generator.load_state_dict(state["generator"])
    return generator.to(device).eval(), options


@torch.no_grad()
def generate(generator: SPADEGenerator, labels) -> np.ndarray:
    """Label maps long [B,S,S] -> synthetic slices uint8 [B,S,S]. SPADE without its encoder has no
    noise input: the image is a deterministic function of the map."""
    device = next(generator.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    if labels.ndim != 3:
        raise InputError(f"labels must be [B,S,S], got {tuple(labels.shape)}")
    return to_uint8(generator(one_hot(labels, NUM_CLASSES))[:, 0])


def sample_spade(model_path, slice_paths, out_dir, seed=0, mask_source="real", max_slices_per_scan=None,
                 batch_size=None, device="auto", shape_paths=None, nodule_maps_per_scan=0, *, fold) -> list:
    """Synthesise one stack per input stack: out_dir/{scan_id}.npz in the slices layout.

    fold: the generator's fold ("0".."k-1" or "holdout"), recorded with the model file's sha256 in each
    stack (synthesis.generator_provenance) for the leakage audit.

    `image` is the synthetic slice and `label` the map that produced it, both at the model's
    resolution; z, slice_index and has_nodule follow the maps. mask_source "real" uses the
    stacks' own maps, "transplant" their nodule-free maps with a nodule shaped like a real one of
    `shape_paths` (default: the given stacks). Deterministic for a seed. Returns the written paths.
    """
    generator, options = load_spade(model_path, device)
    plans = plan_maps([Path(p) for p in slice_paths], options.image_size, seed, mask_source,
                      max_slices_per_scan, shape_paths, nodule_maps_per_scan)
    extra = {**generator_provenance("spade", fold, model_path), "mask_source": mask_source, "seed": seed}
    return write_synthetic(plans, out_dir, options.image_size, int(batch_size or options.sample_batch_size),
                           lambda labels, keys: generate(generator, labels), extra,
                           f"spade sample on {next(generator.parameters()).device}")
