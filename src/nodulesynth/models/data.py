"""The generators' training data: slice stacks read one at a time into uint8 memory-mapped files, batches
gathered from them and converted per batch, the digests that bind a checkpoint to its data, one-hot maps.

Memory does not grow with the cohort: only one stack is decompressed at a time, the training set stays
uint8 on disk (memory-mapped), and each batch is converted to float32 / int64 when it is drawn.
"""

import contextlib
import hashlib
import json
import mmap
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nodulesynth.data.slices import load_slices, resize_slices
from nodulesynth.errors import InputError
from nodulesynth.labels import NUM_CLASSES
from nodulesynth.models import distributed

# Mapped pages a batch touched stay resident (as page cache they are reclaimable, but they count as
# the job's RSS): after this many bytes read they are dropped from the mapping, so RSS stays bounded.
RESIDENT_LIMIT = 256 * 2**20


class SlicePairs:
    """(image, label) training slices at `image_size`, held as uint8 [n,S,S] arrays in one or more parts.

    `SlicePairs(images, labels, size)` takes one part (resized here when it is not at `size`: INTER_AREA
    for images, INTER_NEAREST for maps); `load_training_data` makes one memory-mapped part per stack.
    Index i runs through the parts in order. `batch` returns float32 [B,1,S,S] images in [-1, 1] and
    int64 [B,S,S] labels, converted only then.
    """

    def __init__(self, images, labels, image_size: int):
        size = int(image_size)
        if np.shape(images) != np.shape(labels) or np.ndim(images) != 3:
            raise InputError(f"images {np.shape(images)} and labels {np.shape(labels)} must be equal [N,H,W]")
        parts = [resize_slices(images, labels, size)]
        self._set_parts(parts, size)

    @classmethod
    def from_parts(cls, parts, image_size: int) -> "SlicePairs":
        """Parts already at `image_size`, uint8 (e.g. memory-mapped files), used as they are."""
        size = int(image_size)
        for images, labels in parts:
            if images.shape != labels.shape or images.shape[1:] != (size, size) or \
                    images.dtype != np.uint8 or labels.dtype != np.uint8:
                raise InputError(f"part {images.dtype} {images.shape} / {labels.dtype} {labels.shape} is not a "
                                 f"pair of uint8 [n,{size},{size}] arrays")
        pairs = cls.__new__(cls)
        pairs._set_parts(list(parts), size)
        return pairs

    def _set_parts(self, parts, size):
        self.image_size = size
        self.parts = [(images, labels) for images, labels in parts if len(images)]
        self._ends = np.cumsum([len(images) for images, _ in self.parts], dtype=np.int64)
        self._bytes_read = 0

    def __len__(self):
        return int(self._ends[-1]) if len(self._ends) else 0

    def arrays(self):
        """Every array the set holds (the uint8 images and labels of each part)."""
        return [array for part in self.parts for array in part]

    def batch(self, indices):
        """-> (image float32 [B,1,S,S] in [-1, 1], label int64 [B,S,S]) of the slices at `indices`."""
        index = (indices.cpu().numpy() if torch.is_tensor(indices) else np.asarray(indices)).astype(np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"slice index out of range 0..{len(self) - 1}: {index.min()}..{index.max()}")
        size = self.image_size
        images = np.empty((len(index), size, size), np.uint8)
        labels = np.empty((len(index), size, size), np.uint8)
        part = np.searchsorted(self._ends, index, side="right")
        for k in np.unique(part):
            chosen = part == k
            rows = index[chosen] - (self._ends[k - 1] if k else 0)
            images[chosen], labels[chosen] = self.parts[k][0][rows], self.parts[k][1][rows]
        self._bytes_read += images.nbytes + labels.nbytes
        if self._bytes_read > RESIDENT_LIMIT:
            self._drop_mapped_pages()
        # Same arithmetic as the whole-set conversion of earlier versions: bitwise the same batches.
        image = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
        return image, torch.from_numpy(labels.astype(np.int64))

    def _drop_mapped_pages(self):
        self._bytes_read = 0
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for array in self.arrays():
            mapping = getattr(array, "_mmap", None)  # np.memmap's mapping; read-only, so nothing is lost
            if mapping is not None:
                mapping.madvise(mmap.MADV_DONTNEED)


def one_hot(label: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Label map long [B,H,W] -> float [B,C,H,W]."""
    return F.one_hot(label.long(), num_classes).permute(0, 3, 1, 2).float()


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


def load_training_data(paths, image_size: int, scratch) -> tuple:
    """-> (SlicePairs at `image_size`, record) of the given stacks, rejected ones skipped.

    Each stack is decompressed once, alone, resized and written as uint8 .npy files into the folder
    `scratch`, then memory-mapped read-only: resident memory holds one stack at a time, however many
    there are. The stacks are concatenated in (scan_id, digest) order, so the order the paths come in
    changes nothing. `record` says exactly what was read: `stacks`, one entry per stack (scan_id,
    patient_id, status, slices, sha256), and `sha256` of that list. A checkpoint keeps it and is
    resumed only by a run on the same data (`checkpoints.resume_refusal`).
    """
    files, record = stage_training_data(paths, image_size, scratch)
    return map_training_data(files, image_size), record


def stage_training_data(paths, image_size: int, scratch) -> tuple:
    """The staging half of `load_training_data`: -> (the (image, label) .npy files in order, record)."""
    paths, size, scratch = list(paths), int(image_size), Path(scratch)
    staged = []
    for k, path in enumerate(paths):
        stack = load_slices(path)
        entry = dict(scan_id=stack.scan_id, patient_id=stack.patient_id, status=stack.status, slices=len(stack),
                     sha256=stack_digest(stack))
        files = None
        if stack.status == "ok" and len(stack):
            files = (scratch / f"{k}.image.npy", scratch / f"{k}.label.npy")
            image, label = resize_slices(stack.image, stack.label, size)
            np.save(files[0], image)
            np.save(files[1], label)
        del stack  # before the next one is read
        staged.append((entry, files))
    staged.sort(key=lambda pair: (pair[0]["scan_id"], pair[0]["sha256"]))
    files = [files for _, files in staged if files]
    if not files:
        raise InputError(f"no usable slices in {len(paths)} stacks")
    entries = [entry for entry, _ in staged]
    record = {"sha256": hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest(), "stacks": entries}
    return files, record


def map_training_data(files, image_size: int) -> SlicePairs:
    """The staged files memory-mapped read-only, as one SlicePairs."""
    return SlicePairs.from_parts([tuple(np.load(f, mmap_mode="r") for f in pair) for pair in files], image_size)


@contextlib.contextmanager
def training_data(paths, image_size: int, scratch=None, ranks=None):
    """`load_training_data` into a temporary folder under `scratch` (default $TMPDIR), removed afterwards.

    With `ranks` (nodulesynth.models.distributed.Ranks) of several processes on one node, rank 0 stages the data
    once and every process maps the same files: one copy on the node's disk, not one per GPU.
    """
    if ranks is None or ranks.size == 1:
        with tempfile.TemporaryDirectory(prefix="nodulesynth-training-", dir=scratch) as folder:
            yield load_training_data(paths, image_size, folder)
        return
    folder = tempfile.mkdtemp(prefix="nodulesynth-training-", dir=scratch) if ranks.main else None
    try:
        # A failure in rank 0 stops the others too: torchrun ends all processes when one fails.
        staged = stage_training_data(paths, image_size, folder) if ranks.main else None
        files, record = distributed.broadcast(staged)
        yield map_training_data(files, image_size), record
        distributed.barrier()  # every process is done with the files before they are removed
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def data_summary(record: dict) -> dict:
    """A training-data record in brief (digest, stacks, slices), for the options file."""
    stacks = record["stacks"]
    return {"sha256": record["sha256"], "stacks": len(stacks),
            "slices": sum(s["slices"] for s in stacks if s["status"] == "ok")}


def loader_workers(threads: int) -> int:
    """Data-loader workers of a job given `threads` CPUs (the rule's `threads:`): all but the one that drives the
    GPU. One thread (the demo's) loads in the training loop itself, as before."""
    return max(int(threads) - 1, 0)


class Prefetched:
    """`draw(step)` for steps in order, the next `workers` steps drawn ahead on worker threads while the GPU runs
    the current one (gathering a batch from the memory maps and drawing its noise release the GIL).

    The generators' batches are functions of (seed, step) alone, so a batch drawn ahead is the batch drawn in
    place: the run is the same with any number of workers. A step other than the next (a resume) drops what was
    drawn ahead. Threads rather than torch's DataLoader processes: the batches index one memory-mapped set that
    every thread shares, and the steps need no sampler or collation. `workers` 0 draws in the caller's thread.
    """

    def __init__(self, draw, workers: int = 0):
        self.draw, self.workers = draw, max(int(workers), 0)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nodulesynth-loader") if self.workers else None
        self._ahead = {}  # step -> future

    def __call__(self, step: int):
        if self._pool is None:
            return self.draw(step)
        future = self._ahead.pop(step, None)
        if future is None:  # not the next step: what was drawn ahead is of no use
            self._drop()
            future = self._pool.submit(self.draw, step)
        for ahead in range(step + 1, step + 1 + self.workers):
            if ahead not in self._ahead:
                self._ahead[ahead] = self._pool.submit(self.draw, ahead)
        return future.result()

    def _drop(self):
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()

    def close(self):
        if self._pool is not None:
            self._drop()
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
