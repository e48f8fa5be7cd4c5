"""The downstream study's data: for one fold and arm, the training and test slices at one size.

`results/downstream/data/{arm}/fold{k}.npz` holds an `ArmDataset`: `train` (the fold's real
training slices, plus synthetic slices for arms B and C) and `test` (the fold's real test slices,
identical in every arm of the fold, so the arms are paired). Both are `SliceSet`s:

- `image` uint8 [N,S,S], `label` uint8 [N,S,S] (the lesion map), `has_nodule` bool [N]
- `boxes` float32 [M,5]: (row in this set, x0, y0, x1, y1) in pixels at size S, x1 and y1 exclusive
- `scan_id`, `patient_id` str [N], `slice_index` int [N] (in the series; for synthetic slices, the
  index of the map that produced them), `source` str [N]: "real", "spade", "sdm", or "relabelled" (the
  negative control's real nodule-free slices labelled nodule)
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from nodulesynth.data.slices import resize_slices
from nodulesynth.io import atomic_path
from nodulesynth.labels import NODULE

ARMS = {"A": None, "B": "spade", "C": "sdm"}  # the study's arms: arm -> generator whose slices it adds
# Controls (downstream.controls): arms whose effect on arm A is known, run by the same DAG to prove that the
# study can measure. P, positive: arm A with half its real nodule patients withheld (less real data: a known
# loss, so A - P > 0). N, negative: arm A plus as many "synthetic" nodule slices as B and C add, which are real
# nodule-free training slices labelled nodule, with the boxes of real nodules (no nodule information: a known
# harm or null, so N - A <= 0).
CONTROLS = {"P": "positive", "N": "negative"}
RELABELLED = "relabelled"  # the `source` of the negative control's added slices


def study_arms(controls: bool = False) -> list[str]:
    """The arms the DAG trains: A, B, C, and the control arms P and N where downstream.controls is on."""
    return list(ARMS) + (list(CONTROLS) if controls else [])


def study_image_size(image_size, generator_sizes: dict) -> int:
    """The downstream study's slice size: `image_size` (config downstream.image_size) where set, else (None) the
    generators' size, `generator_sizes` {section: size}, on which they must then agree. A set size differing
    from the generators' resamples their slices to it (as the real slices are), so the detectors can see nodules
    at a finer size than the generators are trained at."""
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"downstream.image_size = {image_size!r}: must be an integer >= 8, or null for the "
                             "generators' size")
        return image_size
    sizes = sorted(set(generator_sizes.values()))
    if len(sizes) != 1:
        named = ", ".join(f"{name}.image_size {size}" for name, size in generator_sizes.items())
        raise ValueError(f"{named} differ: the downstream arms need one size (or set downstream.image_size)")
    return sizes[0]


@dataclass
class SliceSet:
    image: np.ndarray
    label: np.ndarray
    has_nodule: np.ndarray
    boxes: np.ndarray
    scan_id: np.ndarray
    patient_id: np.ndarray
    slice_index: np.ndarray
    source: np.ndarray

    def __len__(self):
        return len(self.image)

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    def boxes_of(self, row: int) -> np.ndarray:
        """[k,4] boxes (x0, y0, x1, y1) of slice `row`."""
        return self.boxes[self.boxes[:, 0] == row, 1:]

    @classmethod
    def empty(cls, size: int):
        return cls(np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.uint8), np.zeros(0, bool),
                   np.zeros((0, 5), np.float32), np.zeros(0, str), np.zeros(0, str), np.zeros(0, np.int64),
                   np.zeros(0, str))

    @classmethod
    def concatenate(cls, parts):
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no slices to concatenate")
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        boxes = [p.boxes + np.array([off, 0, 0, 0, 0], np.float32) for p, off in zip(parts, offsets)]
        return cls(*(np.concatenate(boxes) if f.name == "boxes" else np.concatenate([getattr(p, f.name) for p in parts])
                     for f in fields(cls)))

    def subset(self, rows):
        """The slices at `rows` (in that order), boxes renumbered."""
        rows = np.asarray(rows, np.int64)
        new_row = {int(r): i for i, r in enumerate(rows)}
        keep = np.isin(self.boxes[:, 0].astype(np.int64), rows)
        boxes = self.boxes[keep].copy()
        boxes[:, 0] = [new_row[int(r)] for r in boxes[:, 0]]
        return SliceSet(*(boxes if f.name == "boxes" else getattr(self, f.name)[rows] for f in fields(SliceSet)))


@dataclass
class ArmDataset:
    arm: str
    fold: int
    train: SliceSet
    test: SliceSet
    info: dict  # counts and settings, written into metrics.json (positives/negatives per split, ...)


def save_dataset(path, dataset: ArmDataset):
    arrays = {}
    for split in ("train", "test"):
        for f in fields(SliceSet):
            value = getattr(getattr(dataset, split), f.name)
            arrays[f"{split}_{f.name}"] = value.astype(str) if value.dtype.kind in "OU" else value
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, arm=dataset.arm, fold=dataset.fold, info=json.dumps(dataset.info), **arrays)


def load_dataset(path) -> ArmDataset:
    with np.load(path, allow_pickle=False) as data:
        missing = [f"{s}_{f.name}" for s in ("train", "test") for f in fields(SliceSet)
                   if f"{s}_{f.name}" not in data.files] + [k for k in ("arm", "fold", "info") if k not in data.files]
        if missing:
            raise KeyError(f"{path}: missing arrays {missing}")
        sets = {s: SliceSet(**{f.name: data[f"{s}_{f.name}"] for f in fields(SliceSet)}) for s in ("train", "test")}
        return ArmDataset(str(data["arm"]), int(data["fold"]), sets["train"], sets["test"], json.loads(str(data["info"])))


def real_slices(stack, nodule_boxes, size: int) -> SliceSet:
    """Every slice of a usable real stack at `size`, with its nodule boxes (`{scan}.nodules.tsv` rows:
    slice_index, x0, y0, x1, y1 at the stack's resolution) scaled to `size`."""
    n, height, width = stack.image.shape
    row_of = {int(s): i for i, s in enumerate(stack.slice_index)}
    boxes = []
    for box in nodule_boxes.itertuples():
        if int(box.slice_index) not in row_of:
            raise KeyError(f"{stack.scan_id}: nodule box on slice {box.slice_index}, which the stack does not hold")
        boxes.append((row_of[int(box.slice_index)], box.x0 * size / width, box.y0 * size / height,
                      box.x1 * size / width, box.y1 * size / height))
    image, label = resize_slices(stack.image, stack.label, size)
    return SliceSet(
        image=image,
        label=label,
        has_nodule=np.asarray(stack.has_nodule, bool), boxes=np.array(boxes, np.float32).reshape(-1, 5),
        scan_id=np.full(n, stack.scan_id), patient_id=np.full(n, stack.patient_id),
        slice_index=np.asarray(stack.slice_index, np.int64), source=np.full(n, "real"))


def component_boxes(label: np.ndarray) -> np.ndarray:
    """[k,4] boxes (x0, y0, x1, y1; x1, y1 exclusive) of the 8-connected nodule components of one map."""
    from scipy import ndimage

    components, _ = ndimage.label(label == NODULE, structure=np.ones((3, 3), bool))
    return np.array([(sx.start, sy.start, sx.stop, sy.stop) for sy, sx in ndimage.find_objects(components)],
                    np.float32).reshape(-1, 4)


def synthetic_slices(stack, generator: str, size: int) -> SliceSet:
    """The slices of a synthetic stack (`results/synth/{generator}/{fold}/{scan}.npz`) at `size`, boxed
    from the maps that produced them; `slice_index` is that of the source map."""
    image, label = resize_slices(stack.image, stack.label, size)
    boxes = [(row, *box) for row, lb in enumerate(label) for box in component_boxes(lb)]
    n = len(image)
    return SliceSet(image=image, label=label, has_nodule=(label == NODULE).any((1, 2)),
                    boxes=np.array(boxes, np.float32).reshape(-1, 5), scan_id=np.full(n, stack.scan_id),
                    patient_id=np.full(n, stack.patient_id), slice_index=np.asarray(stack.slice_index, np.int64),
                    source=np.full(n, generator))


def withhold_nodule_patients(train: SliceSet, rng, fraction: float = 0.5) -> tuple[SliceSet, list]:
    """(train without the slices of `fraction` of its nodule patients, those patients): the positive control.
    At least one nodule patient is withheld and one kept; patients without a nodule all stay, so that only the
    real positive data shrinks."""
    positive = sorted(set(train.patient_id[np.asarray(train.has_nodule, bool)].tolist()))
    if len(positive) < 2:
        raise ValueError(f"the positive control withholds some of the nodule patients and keeps the others; the "
                         f"training set has {len(positive)} nodule patient(s)")
    n = min(max(1, int(round(fraction * len(positive)))), len(positive) - 1)
    withheld = sorted(rng.choice(positive, n, replace=False).tolist())
    return train.subset(np.flatnonzero(~np.isin(train.patient_id, withheld))), withheld


def relabelled_slices(train: SliceSet, count: int, rng) -> SliceSet:
    """`count` real nodule-free training slices (without replacement, as many as there are at most) labelled as
    nodule slices, each given the boxes of a randomly drawn real nodule slice: the negative control's added
    slices, which look like real data and carry no nodule information. Their lesion maps stay as they are
    (nodule-free): nothing downstream reads a training map's nodule class, only has_nodule and boxes."""
    negatives = np.flatnonzero(~np.asarray(train.has_nodule, bool))
    positives = np.flatnonzero(np.asarray(train.has_nodule, bool))
    if count and (not len(negatives) or not len(positives)):
        raise ValueError("the negative control needs real slices with and without a nodule to relabel")
    rows = np.sort(rng.choice(negatives, min(count, len(negatives)), replace=False))
    added = train.subset(rows)
    donors = rng.choice(positives, len(rows))
    boxes = [(i, *box) for i, donor in enumerate(donors) for box in train.boxes_of(int(donor))]
    added.boxes = np.array(boxes, np.float32).reshape(-1, 5)
    added.has_nodule = np.ones(len(rows), bool)
    added.source = np.full(len(rows), RELABELLED)
    return added


def _counts(prefix: str, slices: SliceSet) -> dict:
    positive = int(np.asarray(slices.has_nodule).sum())
    return {f"n_{prefix}": len(slices), f"n_{prefix}_positive": positive, f"n_{prefix}_negative": len(slices) - positive}


def build_arm_dataset(arm: str, fold: int, train_scans, test_scans, slices_dir, synth_dir=None, image_size=256,
                      synthetic_ratio=1.0, seed=0) -> ArmDataset:
    """One fold and arm of the study. `train_scans`/`test_scans` come from the fold plan
    (nodulesynth.data.folds); arm B/C add `synthetic_ratio` x (real training nodule slices) synthetic
    nodule slices of the fold's generator, drawn without replacement from `synth_dir`; a shortfall is
    recorded in `info`, never made up by repeating a slice. The control arms (CONTROLS): P withholds half
    the real nodule patients (withhold_nodule_patients), N adds relabelled nodule-free slices
    (relabelled_slices) as many as B and C add."""
    import logging

    import pandas as pd

    from nodulesynth.data.slices import load_slices

    if arm not in ARMS and arm not in CONTROLS:
        raise KeyError(f"unknown arm {arm!r}: expected one of {study_arms(controls=True)}")
    generator = ARMS.get(arm)
    if generator and synth_dir is None:
        raise ValueError(f"arm {arm} needs the synthetic slices of {generator}")
    slices_dir = Path(slices_dir)

    def real(scans):
        parts = []
        for scan in scans:
            stack = load_slices(slices_dir / f"{scan}.npz")
            if stack.status != "ok" or not len(stack):
                raise ValueError(f"{slices_dir / f'{scan}.npz'}: scan {scan} is not usable ({stack.reason})")
            boxes = pd.read_csv(slices_dir / f"{scan}.nodules.tsv", sep="\t")
            parts.append(real_slices(stack, boxes, image_size))
        return SliceSet.concatenate(parts) if parts else SliceSet.empty(image_size)

    train, test = real(train_scans), real(test_scans)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(fold)]))
    info = {"arm": arm, "fold": int(fold), "image_size": int(image_size)}
    if arm == "P":
        train, withheld = withhold_nodule_patients(train, rng)
        info.update(control=CONTROLS[arm], n_patients_withheld=len(withheld))
    info["n_train_real"] = len(train)
    info["n_train_real_positive"] = int(train.has_nodule.sum())
    if generator:
        pool = []
        for scan in train_scans:
            path = Path(synth_dir) / f"{scan}.npz"
            if not path.exists():
                raise FileNotFoundError(f"{path}: no synthetic stack of training scan {scan}")
            stack = load_slices(path)
            if stack.status == "ok" and len(stack):
                pool.append(synthetic_slices(stack, generator, image_size))
        pool = SliceSet.concatenate(pool) if pool else SliceSet.empty(image_size)
        candidates = np.flatnonzero(pool.has_nodule)
        wanted = int(round(synthetic_ratio * int(train.has_nodule.sum())))
        chosen = np.sort(rng.choice(candidates, min(wanted, len(candidates)), replace=False))
        if len(chosen) < wanted:
            logging.getLogger("nodulesynth").warning(
                "arm %s fold %s: %d synthetic nodule slices wanted, only %d in %s (raise synthesis.nodule_maps_per_scan)",
                arm, fold, wanted, len(chosen), synth_dir)
        train = SliceSet.concatenate([train, pool.subset(chosen)])
        info.update(generator=generator, synthetic_ratio=float(synthetic_ratio), n_synthetic_wanted=wanted,
                    n_synthetic_available=len(candidates), n_train_synthetic=len(chosen))
    elif arm == "N":
        wanted = int(round(synthetic_ratio * int(train.has_nodule.sum())))
        added = relabelled_slices(train, wanted, rng)
        train = SliceSet.concatenate([train, added])
        info.update(control=CONTROLS[arm], synthetic_ratio=float(synthetic_ratio), n_synthetic_wanted=wanted,
                    n_train_synthetic=len(added))
    else:
        info.update(n_train_synthetic=0)
    info.update(_counts("train", train), **_counts("test", test),
                n_train_patients=len(np.unique(train.patient_id)), n_test_patients=len(np.unique(test.patient_id)))
    return ArmDataset(arm, int(fold), train, test, info)
