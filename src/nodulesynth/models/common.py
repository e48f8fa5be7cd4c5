"""Training utilities shared by the generators (SDM and SPADE).

Device choice, EMA weights, atomic checkpoints bound to the data they were trained on, per-step
random generators (so a resumed run is bitwise equal to an unbroken one on CPU), the in-memory
slice/label training set, one-hot maps, the loss curve file, the readable options file and the
progress bar.
"""

import csv
import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from nodulesynth.data.slices import load_slices
from nodulesynth.io import atomic_path
from nodulesynth.labels import NUM_CLASSES


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" = the GPU when one is present, else the CPU; anything else is taken literally."""
    requested = str(requested or "auto")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        # An explicit request must not silently fall back: a GPU job on the CPU would run for days.
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available (use 'auto')")
    return device


class EMA:
    """Exponential moving average of a model's parameters; buffers are copied as they are.

    `warmup=True` uses min(decay, (1 + n) / (10 + n)) after n updates, so that short runs
    (the CPU demo) do not end with weights still close to the random initialisation.
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = False):
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in _state_tensors(model).items()}
        self._param_names = {k for k, _ in model.named_parameters()}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        decay = self.current_decay()
        self.num_updates += 1
        for name, value in _state_tensors(model).items():
            shadow = self.shadow[name]
            if name in self._param_names and value.is_floating_point():
                shadow.lerp_(value.detach().to(shadow.dtype), 1.0 - decay)
            else:
                shadow.copy_(value.detach())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict):
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", False))
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module):
        for name, value in _state_tensors(model).items():
            value.copy_(self.shadow[name])


def _state_tensors(model):
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    return tensors


def save_checkpoint(path, state: dict):
    """torch.save to a temporary sibling, then rename: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path, map_location="cpu") -> dict:
    # Our own files, holding options and optimiser state besides tensors.
    return torch.load(path, map_location=map_location, weights_only=False)


def changed_options(saved: dict, current: dict, ignore=()) -> list:
    """Option keys whose values differ between a checkpoint and this run, `ignore` aside.

    A checkpoint is resumed only when nothing else changed (a job restarted after a kill); a
    rerun after a config change trains from scratch, as Snakemake expects of a changed param.
    """
    return sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))


def step_generator(seed: int, step: int, device="cpu") -> torch.Generator:
    """A generator seeded from (seed, step) alone.

    Every random draw of training step `step` comes from it, so resuming at step k needs no
    saved RNG state and replays exactly the draws an unbroken run would make.
    """
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, np.uint32)
    generator = torch.Generator(device=device)
    generator.manual_seed((int(state[0]) << 31 | int(state[1]) >> 1) & 0x7FFFFFFFFFFFFFFF)
    return generator


def seed_everything_for_step(seed: int, step: int):
    """Seed the global RNGs from (seed, step) too, for dropout and any op drawing globally."""
    torch.manual_seed(int(step_generator(seed, step).initial_seed()) ^ 0x5DEECE66D)


class SlicePairs:
    """(image, label) training slices, resized once to `image_size` and kept as tensors.

    `image` float32 [N,1,S,S] in [-1, 1]; `label` int64 [N,S,S].
    """

    def __init__(self, images_u8: np.ndarray, labels_u8: np.ndarray, image_size: int):
        images_u8, labels_u8 = np.asarray(images_u8), np.asarray(labels_u8)
        if images_u8.shape != labels_u8.shape or images_u8.ndim != 3:
            raise ValueError(f"images {images_u8.shape} and labels {labels_u8.shape} must be equal [N,H,W]")
        size = int(image_size)
        images = np.stack([_resize(im, size, cv2.INTER_AREA) for im in images_u8]) if len(images_u8) else \
            np.zeros((0, size, size), np.uint8)
        labels = np.stack([_resize(lb, size, cv2.INTER_NEAREST) for lb in labels_u8]) if len(labels_u8) else \
            np.zeros((0, size, size), np.uint8)
        self.image_size = size
        self.image = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1).contiguous()
        self.label = torch.from_numpy(labels.astype(np.int64)).contiguous()

    def __len__(self):
        return len(self.image)

    def batch(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.image[indices], self.label[indices]


def _resize(array, size, interpolation):
    if array.shape == (size, size):
        return array
    return cv2.resize(array, (size, size), interpolation=interpolation)


def one_hot(label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Label map long [B,H,W] -> float [B,C,H,W]."""
    return F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float()


class LossCurve:
    """Rows of (step, named values), written as a TSV for the report."""

    def __init__(self):
        self.rows = []

    def append(self, step: int, **values):
        self.rows.append({"step": int(step), **{k: float(v) for k, v in values.items()}})

    def truncate(self, step: int):
        """Drop rows after `step` (a resumed run replays them)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def columns(self):
        names = []
        for row in self.rows:
            names.extend(k for k in row if k not in names)
        return names

    def write(self, path):
        columns = self.columns() or ["step"]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns, delimiter="\t", restval="")
                writer.writeheader()
                writer.writerows(self.rows)

    @classmethod
    def load(cls, path):
        curve = cls()
        if Path(path).exists():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    step = int(row.pop("step"))
                    curve.append(step, **{k: float(v) for k, v in row.items() if v not in ("", None)})
        return curve


def progress(total: int, initial: int = 0, desc: str = ""):
    """A tqdm bar that also shows in Snakemake logs (not a tty): then refreshed every 5 s."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if tty else 5.0,
                dynamic_ncols=tty, ascii=not tty, file=sys.stderr)


def stack_digest(stack) -> str:
    """sha256 of what training reads from a slice stack: its status and its image and label arrays.

    The arrays' content, not the file's bytes: np.savez stamps the write time into the zip, so a
    stack rewritten with equal content keeps its digest.
    """
    digest = hashlib.sha256(f"status={stack.status}".encode())
    for name in ("image", "label"):
        array = np.ascontiguousarray(getattr(stack, name))
        digest.update(f";{name}:{array.dtype.str}:{array.shape}:".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_training_data(paths):
    """-> (images uint8 [N,H,W], labels uint8 [N,H,W], record) of the given stacks, rejected ones skipped.

    The stacks are concatenated in (scan_id, digest) order, so the order the paths come in changes
    nothing. `record` says exactly what was read: `stacks`, one entry per stack (scan_id, patient_id,
    status, slices, sha256), and `sha256` of that list. A checkpoint keeps it and is resumed only by
    a run on the same data (`resume_refusal`).
    """
    paths = list(paths)
    stacks = sorted(((stack, stack_digest(stack)) for stack in map(load_slices, paths)),
                    key=lambda pair: (pair[0].scan_id, pair[1]))
    entries = [dict(scan_id=stack.scan_id, patient_id=stack.patient_id, status=stack.status, slices=len(stack),
                    sha256=digest) for stack, digest in stacks]
    used = [stack for stack, _ in stacks if stack.status == "ok" and len(stack)]
    if not used:
        raise ValueError(f"no usable slices in {len(paths)} stacks")
    record = {"sha256": hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest(), "stacks": entries}
    return np.concatenate([s.image for s in used]), np.concatenate([s.label for s in used]), record


def data_summary(record: dict) -> dict:
    """A training-data record in brief (digest, stacks, slices), for the options file."""
    stacks = record["stacks"]
    return {"sha256": record["sha256"], "stacks": len(stacks),
            "slices": sum(s["slices"] for s in stacks if s["status"] == "ok")}


def data_change(saved: dict | None, current: dict) -> str | None:
    """Why a checkpoint's training-data record differs from this run's, in words; None when equal."""
    if not saved:
        return "it records no training data (written by an older version)"
    if saved["sha256"] == current["sha256"]:
        return None
    old = {s["scan_id"]: s["sha256"] for s in saved["stacks"]}
    new = {s["scan_id"]: s["sha256"] for s in current["stacks"]}
    differences = {"added": sorted(set(new) - set(old)), "removed": sorted(set(old) - set(new)),
                   "changed": sorted(k for k in set(old) & set(new) if old[k] != new[k])}
    words = [f"{len(ids)} scans {what} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
             for what, ids in differences.items() if ids]
    return "it was trained on other data: " + ("; ".join(words) or "other stacks of the same scans")


def resume_refusal(state: dict, options: dict, data: dict, resumable=(), section: str = "") -> str | None:
    """Why this run must not resume the checkpoint `state`, in words; None when it may.

    It may only when the checkpoint was trained on exactly this data (`load_training_data`'s record)
    with these options, the keys in `resumable` aside. Otherwise a rerun after a change of the
    training data (another fold, cohort or mask setting) would continue, and write out as its model,
    a generator trained on other patients.
    """
    changed = changed_options(state["options"], options, resumable)
    if changed:
        return "it was trained with other " + ", ".join(f"{section}.{key}" for key in changed)
    return data_change(state.get("data"), data)


def write_options_file(path, content: dict):
    """A readable YAML record beside the model (as NVlabs/SPADE's opt.txt): options, data, notes."""

    def plain(value):  # safe_dump knows lists, not the tuples of the options dataclasses
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(plain(content), sort_keys=False))


__all__ = ["pick_device", "EMA", "save_checkpoint", "load_checkpoint", "changed_options", "step_generator",
           "seed_everything_for_step", "SlicePairs", "one_hot", "LossCurve", "progress", "stack_digest",
           "load_training_data", "data_summary", "data_change", "resume_refusal", "write_options_file"]
