"""What both generators share at sampling time: which lesion maps to synthesise from, and writing
the synthetic stacks. SDM and SPADE go through the same code, so the study's arms B and C are
synthesised from exactly the same maps."""

import os
import shutil
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from nodulesynth.data.slices import PROVENANCE, SliceStack, load_slice_info, load_slices, resize_maps, save_slices
from nodulesynth.errors import InputError
from nodulesynth.io import file_sha256
from nodulesynth.labels import NODULE
from nodulesynth.models.records import progress
from nodulesynth.models.transplant import choose_maps, nodule_shapes
from nodulesynth.options import SectionOptions


@dataclass(frozen=True)
class SynthesisOptions(SectionOptions):
    """The config's `synthesis` section: which maps both generators synthesise (schemas/config.schema.yaml)."""

    SECTION = "synthesis"

    mask_source: str = "real"
    max_slices_per_scan: Optional[int] = 4
    nodule_maps_per_scan: Optional[int] = None
    seed: int = 0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] -> 0..255, the inverse of the training scaling (u / 127.5 - 1)."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def scan_seed(seed: int, scan_id: str, *more: int) -> np.random.SeedSequence:
    """A seed sequence for one scan (and batch): independent of the order scans are processed in."""
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(scan_id.encode()), *map(int, more)])


class MapPlans:
    """The maps to synthesise from each stack, made one stack at a time as they are iterated.

    Each item is (stack, scan_id, indices or None, maps or None): only one stack (decompressed, at full
    resolution) is held at a time, however many there are. len() is the number of stacks.
    """

    def __init__(self, slice_paths, size, seed, mask_source, max_slices_per_scan, shapes, nodule_maps_per_scan):
        self.slice_paths, self.size, self.seed, self.mask_source = list(slice_paths), size, seed, mask_source
        self.max_slices_per_scan, self.nodule_maps_per_scan = max_slices_per_scan, nodule_maps_per_scan
        self.shapes = shapes  # nodule crops for "transplant", gathered beforehand

    def __len__(self):
        return len(self.slice_paths)

    def __iter__(self):
        for path in self.slice_paths:
            stack = load_slices(path)
            scan_id = Path(path).stem
            if stack.status != "ok" or not len(stack):
                yield stack, scan_id, None, None
                continue
            rng = np.random.default_rng(scan_seed(self.seed, scan_id))
            indices, maps = choose_maps(resize_maps(stack.label, self.size), self.mask_source, rng, self.shapes,
                                        self.max_slices_per_scan, self.nodule_maps_per_scan)
            yield stack, scan_id, indices, maps


def plan_maps(slice_paths, size, seed, mask_source="real", max_slices_per_scan=None, shape_paths=None,
              nodule_maps_per_scan=0) -> MapPlans:
    """The maps to synthesise from each stack (a `MapPlans`, read lazily, one stack at a time).

    mask_source "real": the stacks' own maps; "transplant": their nodule-free maps, each given a
    nodule shaped like one of the real nodules of `shape_paths` (default: the given stacks).
    """
    if mask_source not in ("real", "transplant"):
        raise InputError(f"mask_source must be 'real' or 'transplant', got {mask_source!r}")
    slice_paths = list(slice_paths)
    shapes = None
    if mask_source == "transplant":
        shapes = []
        for path in slice_paths if shape_paths is None else shape_paths:
            stack = load_slices(path)  # one at a time: only the (small) nodule crops are kept
            if stack.status == "ok" and len(stack):
                shapes.extend(nodule_shapes(resize_maps(stack.label, size)))
            del stack
        if not shapes:
            raise InputError("mask_source 'transplant': no nodules in the stacks to draw shapes from")
    return MapPlans(slice_paths, size, seed, mask_source, max_slices_per_scan, shapes, nodule_maps_per_scan)


def generator_provenance(generator: str, fold, model_path) -> dict:
    """The `PROVENANCE` of a generator's stacks: its name, its fold ("0".."k-1" or "holdout") and the sha256 of
    its model file. The leakage audit checks them against results/generators/{generator}/{fold}/model.pt, so
    that a stack of another fold's or the holdout generator copied into a fold's folder is caught."""
    if fold is None or not str(fold):
        raise InputError(f"{model_path}: sampling needs the generator's fold (0..k-1 or holdout)")
    return {"generator": str(generator), "generator_fold": str(fold), "model_sha256": file_sha256(model_path)}


def staging_dir(out_dir) -> Path:
    """Where a sampling job writes its stacks until all are done: `<out_dir>.partial`, beside the output folder and
    no output of the rule, so that a killed job's stacks outlive Snakemake's removal of its incomplete output."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".partial")


def _written_before(path: Path, extra: dict, indices: np.ndarray, maps: np.ndarray) -> bool:
    """Whether `path` is a stack a killed run of the same sampling wrote: complete (written atomically, readable),
    recording the same `extra` (generator, fold, model digest and sampling settings), and sampled from the same
    maps as this run plans (the same slices of the input stack, with the same labels). The maps are compared
    themselves, not the settings that chose them: a rerun after editing synthesis.nodule_maps_per_scan, or after
    the input stack's maps were rewritten, leaves the model and its settings unchanged but plans other maps.
    Each stack's noise is seeded by its scan and map, so keeping it gives what an unbroken run would."""
    if not path.is_file():
        return False
    try:
        recorded = load_slice_info(path)["extra"]
        if not all(key in recorded and str(recorded[key]) == str(value) for key, value in extra.items()):
            return False
        with np.load(path, allow_pickle=False) as data:
            sampled_from = data["label"]
    except (KeyError, ValueError, OSError, zipfile.BadZipFile):
        return False
    return (np.array_equal(recorded.get("source_index"), np.asarray(indices))
            and np.array_equal(sampled_from, np.asarray(maps).astype(np.uint8)))


@dataclass
class _PendingStack:
    """A stack whose maps are queued for sampling: what its file needs, not the full-resolution stack."""

    target: Path
    scan_id: str
    patient_id: str
    z: np.ndarray
    slice_index: np.ndarray
    indices: np.ndarray
    maps: np.ndarray
    images: np.ndarray
    left: int


def write_synthetic(plans, out_dir, size, batch_size, synthesise, extra, desc):
    """Write out_dir/{scan_id}.npz for each plan in the slices layout; returns the paths.

    synthesise(labels long [B,S,S], keys) -> uint8 [B,S,S], with keys one (scan_id, map index) per row. Batches
    run across stacks, so that they are full however few maps each scan has (a LIDC fold: ten-odd maps a scan
    against a batch of 16); a sample's noise must therefore follow from its key alone, which also makes the
    images independent of the batch size. `extra` is stored with each stack: the `generator_provenance` keys
    (required) and the sampling settings (mask source, sampler, seed).
    Resumable: stacks go to `staging_dir(out_dir)` first and into out_dir once every stack is there; a rerun
    after a killed job keeps the stacks it finished (same `extra`, same maps) and samples only the rest.
    """
    missing = [key for key in PROVENANCE if key not in extra]
    if missing:
        raise InputError(f"{desc}: synthetic stacks must record {', '.join(missing)} (see generator_provenance)")
    out_dir, staging = Path(out_dir), staging_dir(out_dir)
    staging.mkdir(parents=True, exist_ok=True)
    stacks = len(plans) if hasattr(plans, "__len__") else None
    print(f"{desc}: {stacks if stacks is not None else 'the'} stacks ({extra})", file=sys.stderr)
    bar = progress(None, 0, desc)  # slices; how many is known only once each stack's maps are chosen
    staged, kept, pending, queue = [], 0, [], []

    def save(stack: _PendingStack):
        save_slices(stack.target, SliceStack(
            image=stack.images, label=stack.maps.astype(np.uint8), z=stack.z, slice_index=stack.slice_index,
            has_nodule=(stack.maps == NODULE).any((1, 2)), scan_id=stack.scan_id, patient_id=stack.patient_id,
            extra={"source_index": stack.indices, **extra}))

    def sample_queue():
        labels = torch.from_numpy(np.stack([stack.maps[row] for stack, row in queue]).astype(np.int64))
        images = synthesise(labels, [(stack.scan_id, row) for stack, row in queue])
        for (stack, row), image in zip(queue, images):
            stack.images[row] = image
            stack.left -= 1
        bar.update(len(queue))
        queue.clear()
        for stack in [stack for stack in pending if not stack.left]:
            save(stack)
            pending.remove(stack)

    for done, (stack, scan_id, indices, maps) in enumerate(plans):
        bar.set_postfix(stack=f"{done + 1}/{stacks or '?'}", refresh=False)
        target = staging / f"{scan_id}.npz"
        staged.append(target)
        if indices is None:
            save_slices(target, SliceStack.rejected(scan_id, stack.patient_id, stack.reason or "no slices",
                                                    (size, size)))
            continue
        if _written_before(target, extra, indices, maps):
            kept += 1
            continue
        current = _PendingStack(
            target, stack.scan_id or scan_id, stack.patient_id, np.asarray(stack.z)[indices],
            np.asarray(stack.slice_index)[indices], np.asarray(indices), maps,
            np.zeros((len(indices), size, size), np.uint8), len(indices))
        if not current.left:  # no map to sample: an empty stack
            save(current)
            continue
        pending.append(current)
        for row in range(len(indices)):
            queue.append((current, row))
            if len(queue) == batch_size:
                sample_queue()
    if queue:
        sample_queue()
    bar.close()
    if kept:
        print(f"{desc}: kept {kept} stacks an earlier, interrupted run wrote", file=sys.stderr)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in staged:
        os.replace(path, out_dir / path.name)
        written.append(out_dir / path.name)
    shutil.rmtree(staging)  # what is left there belongs to no plan of this run
    return written
