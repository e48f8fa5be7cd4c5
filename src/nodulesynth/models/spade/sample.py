"""Sampling a trained SPADE generator: lesion maps in, synthetic CT slices (with their maps) out.

The maps are chosen exactly as the SDM sampler chooses them (same per-scan seed, same
`choose_maps`, same nodule shapes), so both arms of the study synthesise from equal inputs.
"""

import sys
from pathlib import Path

import numpy as np
import torch

from nodulesynth.data.slices import SliceStack, load_slices, save_slices
from nodulesynth.masks.labels import NODULE, NUM_CLASSES
from nodulesynth.models.common import load_checkpoint, one_hot, pick_device, progress
from nodulesynth.models.sdm.sample import resize_labels, scan_seed, to_uint8
from nodulesynth.models.transplant import choose_maps, nodule_shapes

from .networks import SPADEGenerator
from .options import SPADEOptions
from .train import FORMAT


def load_spade(model_path, device="auto"):
    """-> (generator in eval mode on `device`, options) from a train_spade model.pt."""
    device = pick_device(device)
    state = load_checkpoint(model_path, map_location="cpu")
    if state.get("format") != FORMAT:
        raise ValueError(f"{model_path}: not a SPADE model (format {state.get('format')!r})")
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
        raise ValueError(f"labels must be [B,S,S], got {tuple(labels.shape)}")
    return to_uint8(generator(one_hot(labels, NUM_CLASSES))[:, 0])


def plan_maps(slice_paths, size, seed, mask_source="real", max_slices_per_scan=None, shape_paths=None):
    """[(path, stack, scan_id, indices or None, maps or None)] as `sample_sdm` plans them.

    Mirrors the planning in nodulesynth.models.sdm.sample.sample_sdm (same seeds and functions); a
    test checks that both samplers write the same maps.
    """
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
        scan_id = Path(path).stem
        if stack.status != "ok" or not len(stack):
            plans.append((path, stack, scan_id, None, None))
            continue
        rng = np.random.default_rng(scan_seed(seed, scan_id))
        indices, maps = choose_maps(resize_labels(stack.label, size), mask_source, rng, shapes, max_slices_per_scan)
        plans.append((path, stack, scan_id, indices, maps))
    return plans


def sample_spade(model_path, slice_paths, out_dir, seed=0, mask_source="real", max_slices_per_scan=None,
                 batch_size=None, device="auto", shape_paths=None) -> list:
    """Synthesise one stack per input stack: out_dir/{scan_id}.npz in the slices layout.

    `image` is the synthetic slice and `label` the map that produced it, both at the model's
    resolution; z, slice_index and has_nodule follow the maps. mask_source "real" uses the
    stacks' own maps, "transplant" their nodule-free maps with a nodule shaped like a real one of
    `shape_paths` (default: the given stacks). Deterministic for a seed. Returns the written paths.
    """
    generator, options = load_spade(model_path, device)
    size = options.image_size
    batch_size = int(batch_size or options.sample_batch_size)
    out_dir = Path(out_dir)
    slice_paths = [Path(p) for p in slice_paths]
    plans = plan_maps(slice_paths, size, seed, mask_source, max_slices_per_scan, shape_paths)

    total = sum(len(p[3]) for p in plans if p[3] is not None)
    print(f"spade: sampling {total} slices from {len(plans)} stacks (masks {mask_source}) on "
          f"{next(generator.parameters()).device}", file=sys.stderr)
    bar = progress(total, 0, "spade sample")
    written = []
    for path, stack, scan_id, indices, maps in plans:
        target = out_dir / f"{scan_id}.npz"
        if indices is None:
            save_slices(target, SliceStack.rejected(scan_id, stack.patient_id, stack.reason or "no slices",
                                                    (size, size)))
            written.append(target)
            continue
        images = np.zeros((len(indices), size, size), np.uint8)
        for start in range(0, len(indices), batch_size):
            labels = torch.from_numpy(maps[start:start + batch_size].astype(np.int64))
            images[start:start + len(labels)] = generate(generator, labels)
            bar.update(len(labels))
        save_slices(target, SliceStack(
            image=images, label=maps.astype(np.uint8), z=np.asarray(stack.z)[indices],
            slice_index=np.asarray(stack.slice_index)[indices], has_nodule=(maps == NODULE).any((1, 2)),
            scan_id=stack.scan_id or scan_id, patient_id=stack.patient_id,
            extra={"source_index": indices, "mask_source": mask_source, "generator": "spade", "seed": seed}))
        written.append(target)
    bar.close()
    return written
