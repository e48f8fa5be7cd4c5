"""The downstream study's data: for one fold and arm, the training and test slices at one size.

`results/downstream/data/{arm}/fold{k}.npz` holds an `ArmDataset`: `train` (the fold's real
training slices, plus synthetic slices for arms B and C) and `test` (the fold's real test slices,
identical in every arm of the fold, so the arms are paired). Both are `SliceSet`s:

- `image` uint8 [N,S,S], `label` uint8 [N,S,S] (the lesion map), `has_nodule` bool [N]
- `boxes` float32 [M,5]: (row in this set, x0, y0, x1, y1) in pixels at size S, x1 and y1 exclusive, one per
  nodule component of the slice's full-resolution map (`map_boxes`, the one rule for real and synthetic slices)
- `box_nodule` int [M]: each box's nodule id in its scan's `{scan}.nodules.tsv` (column `nodule`), which groups
  a nodule's boxes across slices for the per-nodule FROC; -1 where unknown (synthetic and relabelled slices)
- `excluded` float32 [E,5]: boxes of annotated findings that do not count as nodules (fewer readers than
  nodules.min_readers, or under nodules.min_diameter_mm; `{scan}.excluded.tsv`), laid out as `boxes`: the FROC
  counts a detection on one neither as a hit nor as a false positive
- `scan_id`, `patient_id` str [N], `slice_index` int [N] (in the series; for synthetic slices, the
  index of the map that produced them), `source` str [N]: "real", "spade", "sdm", or "relabelled" (the
  negative control's real nodule-free slices labelled nodule)
"""

import json
import re
from dataclasses import dataclass, field, fields
from typing import Optional
from pathlib import Path

import numpy as np

from nodulesynth.data.slices import resize_slices
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path
from nodulesynth.labels import NODULE
from nodulesynth.options import SectionOptions

TASKS = ("detection", "localization")  # the downstream study's two tasks (mmpretrain, mmdet)
GENERATORS = ("sdm", "spade")  # the generators whose slices arms C and B add
ARMS = {"A": None, "B": "spade", "C": "sdm"}  # the study's arms: arm -> generator whose slices it adds
# Controls (downstream.controls): arms whose effect on arm A is known, run by the same DAG to prove that the
# study can measure. P, positive: arm A with a share (downstream.positive_control_withheld, half by default) of
# its real nodule patients withheld (less real data: a known loss, so A - P > 0). N, negative: arm A plus as
# many "synthetic" nodule slices as B and C add, which are real nodule-free training slices labelled nodule,
# with the boxes of real nodules (no nodule information: a known harm or null, so N - A <= 0).
CONTROLS = {"P": "positive", "N": "negative"}
RELABELLED = "relabelled"  # the `source` of the negative control's added slices


@dataclass(frozen=True)
class DownstreamOptions(SectionOptions):
    """The config's `downstream` section (schemas/config.schema.yaml): the arms' data and the leakage audit."""

    SECTION = "downstream"

    # synthetic nodule slices an arm (B, C) adds per real training nodule slice; a shortfall is recorded
    synthetic_ratio: float = 1.0
    seed: int = 0
    # the arms' slice size in pixels; None: the generators' (sdm.image_size), so synthetic and real slices match
    image_size: Optional[int] = None
    # the control arms P and N (CONTROLS) beside A, B and C
    controls: bool = True
    # the share of the real nodule patients the positive control P withholds (withhold_nodule_patients)
    positive_control_withheld: float = 0.5
    # the leakage audit's near-duplicate test: images reduced to this size, a pair above the threshold fails
    near_duplicate_size: int = 32
    near_duplicate_threshold: float = 0.96
    # where the GPU jobs (detect, localize, realism) run: auto, cpu, cuda or cuda:N (models/device.py)
    device: str = "auto"
    threads: int = 8  # CPUs of a GPU job (detect, localize, realism): all but one load data

    # The keys each command reads: its rule passes only these (rules/common.smk), so that a change of another
    # key reruns none of its jobs (threads, device: the model jobs' own; controls: which arms run, not how).
    AUDIT_KEYS = ("near_duplicate_size", "near_duplicate_threshold")

    @staticmethod
    def dataset_keys(arm: str) -> tuple:
        """The keys arm `arm`'s data depends on (build_arm_dataset): a changed synthetic_ratio rebuilds and
        retrains B, C and N, a changed withheld share P, and neither touches A, which draws nothing."""
        check_arm(arm)
        return {"A": (), "B": ("synthetic_ratio", "seed"), "C": ("synthetic_ratio", "seed"),
                "P": ("seed", "positive_control_withheld"), "N": ("synthetic_ratio", "seed")}[arm]


def fold_number(path) -> int:
    """k of a downstream fold's file or folder, `fold<k>` before any suffix (fold3, fold3.npz, fold3.json,
    fold3.memorisation.tsv): the one reading of these names for every stage."""
    match = re.fullmatch(r"fold(\d+)", Path(path).name.split(".")[0])
    if not match:
        raise InputError(f"{path}: not named fold<k>")
    return int(match.group(1))


def study_arms(controls: bool = False) -> list[str]:
    """The arms the DAG trains: A, B, C, and the control arms P and N where downstream.controls is on."""
    return list(ARMS) + (list(CONTROLS) if controls else [])


def check_arm(arm: str) -> None:
    """Refuse a name that is none of the study's arms or controls."""
    if arm not in ARMS and arm not in CONTROLS:
        raise InputError(f"unknown arm {arm!r}: expected one of {study_arms(controls=True)}")


def study_image_size(image_size, generator_sizes: dict) -> int:
    """The downstream study's slice size: `image_size` (config downstream.image_size) where set, else (None) the
    generators' size, `generator_sizes` {section: size}, on which they must then agree. A set size differing
    from the generators' resamples their slices to it (as the real slices are), so the detectors can see nodules
    at a finer size than the generators are trained at."""
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise InputError(f"downstream.image_size = {image_size!r}: must be an integer >= 8, or null for the "
                             "generators' size")
        return image_size
    sizes = sorted(set(generator_sizes.values()))
    if len(sizes) != 1:
        named = ", ".join(f"{name}.image_size {size}" for name, size in generator_sizes.items())
        raise InputError(f"{named} differ: the downstream arms need one size (or set downstream.image_size)")
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
    # Defaults (no nodule ids, no excluded findings) for sets built without them: synthetic or made-up slices.
    box_nodule: np.ndarray = field(default=None)
    excluded: np.ndarray = field(default=None)

    def __post_init__(self):
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 5)
        if self.box_nodule is None:
            self.box_nodule = np.full(len(self.boxes), -1, np.int64)
        self.box_nodule = np.asarray(self.box_nodule, np.int64).reshape(-1)
        if len(self.box_nodule) != len(self.boxes):
            raise InputError(f"box_nodule holds {len(self.box_nodule)} ids for {len(self.boxes)} boxes")
        if self.excluded is None:
            self.excluded = np.zeros((0, 5), np.float32)
        self.excluded = np.asarray(self.excluded, np.float32).reshape(-1, 5)

    def __len__(self):
        return len(self.image)

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    def boxes_of(self, row: int) -> np.ndarray:
        """[k,4] boxes (x0, y0, x1, y1) of slice `row`."""
        return self.boxes[self.boxes[:, 0] == row, 1:]

    def nodule_rows(self) -> list:
        """The ground truth of the per-nodule FROC (`metrics.froc`): (scan_id, slice_index, nodule, x0, y0, x1, y1)
        per box."""
        return [(str(self.scan_id[int(row)]), int(self.slice_index[int(row)]), int(nodule), *map(float, box))
                for (row, *box), nodule in zip(self.boxes, self.box_nodule)]

    def excluded_rows(self) -> list:
        """The excluded findings as the FROC takes them: (scan_id, slice_index, x0, y0, x1, y1)."""
        return [(str(self.scan_id[int(row)]), int(self.slice_index[int(row)]), *map(float, box))
                for row, *box in self.excluded]

    @classmethod
    def empty(cls, size: int):
        return cls(np.zeros((0, size, size), np.uint8), np.zeros((0, size, size), np.uint8), np.zeros(0, bool),
                   np.zeros((0, 5), np.float32), np.zeros(0, str), np.zeros(0, str), np.zeros(0, np.int64),
                   np.zeros(0, str))

    @classmethod
    def concatenate(cls, parts):
        parts = [p for p in parts if len(p)]
        if not parts:
            raise InputError("no slices to concatenate")
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])

        def joined(name):
            if name in _ROW_BOXES:  # (row, x0, y0, x1, y1): rows move by the slices before them
                return np.concatenate([getattr(p, name) + np.array([off, 0, 0, 0, 0], np.float32)
                                       for p, off in zip(parts, offsets)])
            return np.concatenate([getattr(p, name) for p in parts])

        return cls(**{f.name: joined(f.name) for f in fields(cls)})

    def subset(self, rows):
        """The slices at `rows` (in that order), boxes (with their nodule ids) and excluded findings renumbered."""
        rows = np.asarray(rows, np.int64)
        new_row = {int(r): i for i, r in enumerate(rows)}
        kept = {}
        for name in _ROW_BOXES:
            table = getattr(self, name)
            keep = np.isin(table[:, 0].astype(np.int64), rows)
            moved = table[keep].copy()
            moved[:, 0] = [new_row[int(r)] for r in moved[:, 0]]
            kept[name] = moved
            if name == "boxes":
                kept["box_nodule"] = self.box_nodule[keep]
        return SliceSet(**{f.name: kept[f.name] if f.name in kept else getattr(self, f.name)[rows]
                           for f in fields(SliceSet)})


_ROW_BOXES = ("boxes", "excluded")  # SliceSet's box tables whose first column is a row of the set


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
            raise InputError(f"{path}: missing arrays {missing}")
        sets = {s: SliceSet(**{f.name: data[f"{s}_{f.name}"] for f in fields(SliceSet)}) for s in ("train", "test")}
        return ArmDataset(str(data["arm"]), int(data["fold"]), sets["train"], sets["test"], json.loads(str(data["info"])))


def _at_least_a_pixel(low: float, high: float, extent: int) -> tuple[float, float]:
    """One side of a box, widened to one pixel about its centre (within 0..extent) where it is narrower."""
    if high - low >= 1:
        return low, high
    low = min(max((low + high) / 2 - 0.5, 0.0), extent - 1.0)
    return low, low + 1.0


def _scaled(box, height: int, width: int, size: int) -> tuple:
    """A box (x0, y0, x1, y1) of a height x width map in pixels of the same map at size x size: the one scaling
    rule of every box the study draws (floats, so that a nodule of a pixel or two keeps its box). A side that
    scales to under a pixel (a nodule's edge slice, 1 px on a 512-px map, is half a pixel at 256) becomes one
    pixel about its centre: mmdet's CocoDataset drops a box under a pixel wide or tall from the localizer's
    training, which the evaluation would still count, so training and test would see different nodules."""
    x0, x1 = _at_least_a_pixel(box[0] * size / width, box[2] * size / width, size)
    y0, y1 = _at_least_a_pixel(box[1] * size / height, box[3] * size / height, size)
    return x0, y0, x1, y1


def _tsv_boxes(table, scan_id, what: str):
    """{slice_index: [(id, x0, y0, x1, y1)]} of a `{scan}.nodules.tsv`/`{scan}.excluded.tsv` table."""
    if table is None:
        return {}
    missing = [c for c in ("slice_index", what, "x0", "y0", "x1", "y1") if c not in table.columns]
    if missing:
        raise InputError(f"{scan_id}: the {what} box table lacks columns {missing}")
    out = {}
    for row in table.itertuples(index=False):
        out.setdefault(int(row.slice_index), []).append(
            (int(getattr(row, what)), float(row.x0), float(row.y0), float(row.x1), float(row.y1)))
    return out


def map_boxes(label: np.ndarray, size: int, nodules=()) -> tuple[np.ndarray, np.ndarray]:
    """([k,4] boxes at `size`, [k] nodule ids) of the nodule components of one map [H,W] at its own resolution:
    the one way the study boxes a nodule, for real and synthetic slices alike. Each 8-connected nodule component
    of the full-resolution map gives one box, scaled once to `size` (`_scaled`), so that a nodule too small to
    survive the nearest-neighbour resize of the map keeps its box. `nodules`: the slice's rows of
    `{scan}.nodules.tsv` as (nodule id, x0, y0, x1, y1) at the map's resolution. Each nodule pixel belongs to the
    smallest of those boxes that holds it; a component takes the id of its pixels' nodule (-1 where no box holds
    one, and for every component when none are given), and one whose pixels belong to several nodules (nodules
    that touch) gives each its own box. So two nodules are two boxes also when they touch or one lies within the
    other's box: the FROC counts each (a synthetic map, boxed without `nodules`, cannot tell touching ones apart)."""
    height, width = label.shape
    components, boxes = _components(label)
    ids = np.full(len(boxes), -1, np.int64)
    if len(nodules) and len(boxes):
        ys, xs = np.nonzero(components)
        which = components[ys, xs] - 1
        owner = np.full(len(ys), -1)
        areas = [(x1 - x0) * (y1 - y0) for _, x0, y0, x1, y1 in nodules]
        for j in sorted(range(len(nodules)), key=lambda j: -areas[j]):  # a smaller box takes over a pixel it holds
            _, x0, y0, x1, y1 = nodules[j]
            owner[(xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)] = j
        split_boxes, split_ids = [], []
        for k in range(len(boxes)):
            mine = which == k
            owners = sorted(set(owner[mine].tolist()) - {-1})
            if len(owners) <= 1:
                split_boxes.append(boxes[k])
                split_ids.append(nodules[owners[0]][0] if owners else -1)
                continue
            for j in owners:
                pick = mine & (owner == j)
                x, y = xs[pick], ys[pick]
                split_boxes.append((x.min(), y.min(), x.max() + 1, y.max() + 1))
                split_ids.append(nodules[j][0])
        boxes, ids = np.array(split_boxes, np.float32).reshape(-1, 4), np.array(split_ids, np.int64)
    scaled = np.array([_scaled(b, height, width, size) for b in boxes], np.float32).reshape(-1, 4)
    return scaled, ids


def stack_slices(stack, size: int, source: str, nodule_boxes=None, excluded=None) -> SliceSet:
    """Every slice of a stack at `size`, each boxed by `map_boxes` from its full-resolution map. `nodule_boxes`
    (`{scan}.nodules.tsv`) names the boxes' nodules and must agree with the maps: a nodule row whose box holds no
    nodule pixel of its slice is an error, as is one on a slice the stack does not hold. `excluded`
    (`{scan}.excluded.tsv`: slice_index, finding, x0, y0, x1, y1 at the stack's resolution): findings that do not
    count, scaled by the same rule."""
    n, height, width = stack.label.shape
    row_of = {int(s): i for i, s in enumerate(stack.slice_index)}
    nodules = _tsv_boxes(nodule_boxes, stack.scan_id, "nodule")
    findings = _tsv_boxes(excluded, stack.scan_id, "finding")
    for where, table in (("nodule", nodules), ("excluded finding", findings)):
        for slice_index in table:
            if slice_index not in row_of:
                raise InputError(f"{stack.scan_id}: {where} box on slice {slice_index}, which the stack does not hold")
    boxes, ids = [], []
    for row in range(n):
        on_slice = nodules.get(int(stack.slice_index[row]), [])
        found, found_ids = map_boxes(stack.label[row], size, on_slice)
        # A nodule whose box holds no nodule pixel of its slice contradicts the map.
        for nodule, x0, y0, x1, y1 in on_slice:
            if nodule not in found_ids and not (stack.label[row, int(y0):int(y1), int(x0):int(x1)] == NODULE).any():
                raise InputError(f"{stack.scan_id}: nodule {nodule} has a box on slice {int(stack.slice_index[row])} "
                                 "(nodules.tsv) that holds no nodule pixel of the slice's map")
        boxes += [(row, *box) for box in found]
        ids += found_ids.tolist()
    excluded_boxes = [(row_of[s], *_scaled(box[1:], height, width, size)) for s, rows in findings.items()
                      for box in rows]
    image, label = resize_slices(stack.image, stack.label, size)
    return SliceSet(
        image=image, label=label, has_nodule=(np.asarray(stack.label) == NODULE).any((1, 2)),
        boxes=np.array(boxes, np.float32).reshape(-1, 5), scan_id=np.full(n, stack.scan_id),
        patient_id=np.full(n, stack.patient_id), slice_index=np.asarray(stack.slice_index, np.int64),
        source=np.full(n, source), box_nodule=np.array(ids, np.int64),
        excluded=np.array(excluded_boxes, np.float32).reshape(-1, 5))


def real_slices(stack, nodule_boxes, size: int, excluded=None) -> SliceSet:
    """Every slice of a usable real stack at `size` (`stack_slices`), its boxes named by `{scan}.nodules.tsv`."""
    return stack_slices(stack, size, "real", nodule_boxes, excluded)


def _components(label: np.ndarray):
    """(component image, [k,4] boxes x0, y0, x1, y1 with x1, y1 exclusive) of the 8-connected nodule components."""
    from scipy import ndimage

    components, _ = ndimage.label(label == NODULE, structure=np.ones((3, 3), bool))
    boxes = np.array([(sx.start, sy.start, sx.stop, sy.stop) for sy, sx in ndimage.find_objects(components)],
                     np.float32).reshape(-1, 4)
    return components, boxes


def component_boxes(label: np.ndarray) -> np.ndarray:
    """[k,4] boxes (x0, y0, x1, y1; x1, y1 exclusive) of the 8-connected nodule components of one map."""
    return _components(label)[1]


def synthetic_slices(stack, generator: str, size: int) -> SliceSet:
    """The slices of a synthetic stack (`results/synth/{generator}/{fold}/{scan}.npz`) at `size`, boxed
    from the maps that produced them (`stack_slices`, as real slices); `slice_index` is that of the source map."""
    return stack_slices(stack, size, generator)


def withhold_nodule_patients(train: SliceSet, rng, fraction: float = DownstreamOptions.positive_control_withheld
                             ) -> tuple[SliceSet, list]:
    """(train without the slices of `fraction` of its nodule patients, those patients): the positive control.
    At least one nodule patient is withheld and one kept; patients without a nodule all stay. A withheld patient
    goes whole (its nodule-free slices too), as a cohort with fewer nodule patients would have it."""
    positive = sorted(set(train.patient_id[np.asarray(train.has_nodule, bool)].tolist()))
    if len(positive) < 2:
        raise InputError(f"the positive control withholds some of the nodule patients and keeps the others; the "
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
        raise InputError("the negative control needs real slices with and without a nodule to relabel")
    rows = np.sort(rng.choice(negatives, min(count, len(negatives)), replace=False))
    added = train.subset(rows)
    donors = rng.choice(positives, len(rows))
    boxes = [(i, *box) for i, donor in enumerate(donors) for box in train.boxes_of(int(donor))]
    added.boxes = np.array(boxes, np.float32).reshape(-1, 5)
    added.box_nodule = np.full(len(added.boxes), -1, np.int64)  # a donor's nodule is not on this scan
    added.has_nodule = np.ones(len(rows), bool)
    added.source = np.full(len(rows), RELABELLED)
    return added


def split_counts(split: str, positive) -> dict:
    """n_{split}, n_{split}_positive, n_{split}_negative of a split's units (slices, patches) from their positive
    flags: the counts every metrics.json and the arm datasets' info hold."""
    positive = np.asarray(positive, bool)
    return {f"n_{split}": int(len(positive)), f"n_{split}_positive": int(positive.sum()),
            f"n_{split}_negative": int(len(positive) - positive.sum())}


def build_arm_dataset(arm: str, fold: int, train_scans, test_scans, slices_dir, synth_dir=None, image_size=256,
                      synthetic_ratio=1.0, seed=0,
                      withheld_fraction=DownstreamOptions.positive_control_withheld) -> ArmDataset:
    """One fold and arm of the study. `train_scans`/`test_scans` come from the fold plan
    (nodulesynth.data.folds); arm B/C add `synthetic_ratio` x (real training nodule slices) synthetic
    nodule slices of the fold's generator, drawn without replacement from `synth_dir`; a shortfall is
    recorded in `info`, never made up by repeating a slice. The control arms (CONTROLS): P withholds
    `withheld_fraction` of the real nodule patients (withhold_nodule_patients), N adds relabelled nodule-free
    slices (relabelled_slices) as many as B and C add."""
    import logging

    import pandas as pd

    from nodulesynth.data.slices import load_slices

    check_arm(arm)
    generator = ARMS.get(arm)
    if generator and synth_dir is None:
        raise InputError(f"arm {arm} needs the synthetic slices of {generator}")
    slices_dir = Path(slices_dir)

    def real(scans):
        parts = []
        for scan in scans:
            stack = load_slices(slices_dir / f"{scan}.npz")
            if stack.status != "ok" or not len(stack):
                raise InputError(f"{slices_dir / f'{scan}.npz'}: scan {scan} is not usable ({stack.reason})")
            boxes = pd.read_csv(slices_dir / f"{scan}.nodules.tsv", sep="\t")
            # Excluded findings (masks writes them beside the nodules; stacks made before they were kept have none)
            excluded_tsv = slices_dir / f"{scan}.excluded.tsv"
            excluded = pd.read_csv(excluded_tsv, sep="\t") if excluded_tsv.is_file() else None
            parts.append(real_slices(stack, boxes, image_size, excluded))
        return SliceSet.concatenate(parts) if parts else SliceSet.empty(image_size)

    train, test = real(train_scans), real(test_scans)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(fold)]))
    info = {"arm": arm, "fold": int(fold), "image_size": int(image_size)}
    if arm == "P":
        train, withheld = withhold_nodule_patients(train, rng, withheld_fraction)
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
    info.update(split_counts("train", train.has_nodule), **split_counts("test", test.has_nodule),
                n_train_patients=len(np.unique(train.patient_id)), n_test_patients=len(np.unique(test.patient_id)))
    return ArmDataset(arm, int(fold), train, test, info)
