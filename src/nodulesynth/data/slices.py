"""The per-scan slice stack (`results/slices/{scan}.npz`), the contract between masks and every later stage.

Arrays: `image` uint8 [N,H,W] (the config's HU window mapped to 0..255: nodulesynth.data.window), `label` uint8 [N,H,W]
(see `nodulesynth.labels`), `z` float [N] (mm), `slice_index` int [N] (index in the series,
ordered by ImagePositionPatient), `has_nodule` bool [N]. Scalars: `scan_id`, `patient_id`,
`status` ("ok" or "rejected") and `reason`. A rejected scan has N = 0.
Synthetic stacks (`results/synth/...`) use the same layout, plus the `PROVENANCE` scalars of the generator that
made them (nodulesynth.models.synthesis.generator_provenance), which the leakage audit checks.
"""

from dataclasses import dataclass, field

import numpy as np

from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path

# A synthetic stack's record of its generator: name (sdm, spade), fold ("0".."k-1", "holdout"), model.pt's sha256.
PROVENANCE = ("generator", "generator_fold", "model_sha256")


@dataclass
class SliceStack:
    image: np.ndarray
    label: np.ndarray
    z: np.ndarray
    slice_index: np.ndarray
    has_nodule: np.ndarray
    scan_id: str = ""
    patient_id: str = ""
    status: str = "ok"
    reason: str = ""
    extra: dict = field(default_factory=dict)

    def __len__(self):
        return len(self.image)

    @classmethod
    def rejected(cls, scan_id, patient_id, reason, shape=(0, 0)):
        empty = np.zeros((0, *shape), np.uint8)
        return cls(empty, empty.copy(), np.zeros(0), np.zeros(0, np.int32), np.zeros(0, bool),
                   scan_id, patient_id, "rejected", reason)


def save_slices(path, stack: SliceStack):
    """Write a stack atomically (compressed npz)."""
    if stack.image.shape != stack.label.shape:
        raise InputError(f"{path}: image {stack.image.shape} and label {stack.label.shape} differ")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, image=stack.image.astype(np.uint8), label=stack.label.astype(np.uint8),
                z=np.asarray(stack.z, float), slice_index=np.asarray(stack.slice_index, np.int32),
                has_nodule=np.asarray(stack.has_nodule, bool), scan_id=stack.scan_id,
                patient_id=stack.patient_id, status=stack.status, reason=stack.reason,
                **{k: np.asarray(v) for k, v in stack.extra.items()},
            )


# Every key save_slices writes: a stack missing one is refused (naming the file and the key), not
# filled with a guess such as status "ok" or z zeros.
REQUIRED_KEYS = ("image", "label", "z", "slice_index", "has_nodule", "scan_id", "patient_id", "status", "reason")


def _check_keys(path, names):
    missing = [key for key in REQUIRED_KEYS if key not in names]
    if missing:
        raise InputError(f"{path}: not a slice stack, missing key{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(k) for k in missing)}")


def load_slices(path) -> SliceStack:
    """Read a stack written by `save_slices`; a missing key is a KeyError naming the file and the key."""
    with np.load(path, allow_pickle=False) as data:
        _check_keys(path, data.files)
        return SliceStack(
            image=data["image"], label=data["label"], z=data["z"], slice_index=data["slice_index"],
            has_nodule=data["has_nodule"], scan_id=str(data["scan_id"]), patient_id=str(data["patient_id"]),
            status=str(data["status"]), reason=str(data["reason"]),
            extra={k: data[k] for k in data.files if k not in REQUIRED_KEYS},
        )


def load_slice_info(path) -> dict:
    """A stack's scan_id, patient_id, status, reason, slice count (`slices`) and its other small
    arrays (`extra`, e.g. spacing), without decompressing images and labels (npz members are read
    only when asked for): for tables of many stacks. Strict about keys, as `load_slices`."""
    with np.load(path, allow_pickle=False) as data:
        _check_keys(path, data.files)
        small = {k: data[k] for k in data.files if k not in ("image", "label")}
    return dict(scan_id=str(small["scan_id"]), patient_id=str(small["patient_id"]), status=str(small["status"]),
                reason=str(small["reason"]), slices=len(small["z"]),
                extra={k: v for k, v in small.items() if k not in REQUIRED_KEYS})


def load_training_pairs(paths):
    """Concatenate (image, label) of the given stacks, skipping rejected ones: uint8 [N,H,W] each."""
    paths = list(paths)
    images, labels = [], []
    for path in paths:
        stack = load_slices(path)
        if stack.status == "ok" and len(stack):
            images.append(stack.image)
            labels.append(stack.label)
    if not images:
        raise InputError(f"no usable slices in {len(paths)} stacks")
    return np.concatenate(images), np.concatenate(labels)


def _resized(array, size: int, interpolation):
    """[N,H,W] -> uint8 [N,size,size]; an array already uint8 at `size` comes back as it is (a memory map stays one)."""
    import cv2

    if isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.shape[1:] == (size, size):
        return array
    array = np.asarray(array)
    if array.shape[1:] == (size, size):
        return array.astype(np.uint8)
    out = np.empty((len(array), size, size), np.uint8)
    for i, item in enumerate(array):
        out[i] = cv2.resize(item, (size, size), interpolation=interpolation)
    return out


def resize_maps(label, size: int):
    """Lesion maps [N,H,W] at `size` x `size`, uint8, by nearest neighbour (labels are no intensities)."""
    import cv2

    return _resized(label, size, cv2.INTER_NEAREST)


def resize_slices(image, label, size: int):
    """Slices and their lesion maps [N,H,W] at `size` x `size`, uint8: images by area averaging (INTER_AREA) when
    shrunk, bilinear when enlarged (INTER_AREA then repeats pixels: 64-px synthetic slices in a 128-px study would
    be blocky beside the real ones), maps by nearest neighbour (`resize_maps`); the one resizing of the generators'
    training sets, their sampling plans and the downstream arms. Arrays already uint8 at `size` come back as
    they are."""
    import cv2

    enlarged = np.shape(image)[-1] < size
    return _resized(image, size, cv2.INTER_LINEAR if enlarged else cv2.INTER_AREA), resize_maps(label, size)

