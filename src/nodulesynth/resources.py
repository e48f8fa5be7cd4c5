"""What each job of the workflow asks its executor for (`mem_mb`, `runtime`, `disk_mb`), sized from its input files
and the config: the rules' resource callables call these and hold no arithmetic of their own.

- Sizes are read from the inputs' .npy headers inside each .npz (`npz_headers`: a few bytes a member, nothing is
  decompressed), so sizing a job costs milliseconds whatever the cohort. An input that does not exist yet (a dry
  run before its producer ran) counts as empty, and the job gets the floor.
- Host memory is the job's peak as the code holds it: the arm datasets are whole uint8 [N,S,S] images and labels
  (2 S^2 bytes a slice; 128 KiB at 256 px, 16 GB for LIDC-IDRI's ~125k lung slices) and building one concatenates
  (twice the data at the peak). Each estimate adds the interpreter's and libraries' own memory and HEADROOM.
- GPU runtimes are nodulesynth.cost's per-job FLOPs (the estimate benchmarks/cost.py sums for the study) at its
  assumed H100 throughput, or at a CPU core's where the config's device is `cpu`, times RUNTIME_HEADROOM, doubled
  for each retry (the trainings and sampling resume where a killed attempt stopped, so a retry finishes the job).
- `disk_mb`: the generators stage their training slices as uint8 memory maps under $TMPDIR (models/data.py), an
  image and a label a slice at the model's size.
Units are Snakemake's: mem_mb and disk_mb in MiB (SLURM's --mem and --tmp read them so), runtime in minutes.
"""

import math
import zipfile
from pathlib import Path

import numpy as np

from nodulesynth.errors import InputError

MIB = 2**20
HEADROOM = 1.25            # on every memory estimate: allocator slack, pandas tables, copies the estimate leaves out
RUNTIME_HEADROOM = 2.0     # on the first attempt's runtime (then x2 a retry)
PYTHON_MB = 1000           # a data job's interpreter with numpy, pandas, scikit-learn, OpenCV loaded
TORCH_MB = 4000            # a GPU job's interpreter with torch, mmengine/mmdet and the CUDA context's host side
MIN_MINUTES = 10           # no job asks for less, whatever its inputs
GPU_START_MINUTES = 10     # a GPU job's imports, model build, data staging or loading, checkpoints
# Decompressing an .npz (zlib, one core) runs at some 100-300 MB/s of output; 100 is the slow end, so that a job
# reading a 16 GB arm dataset is given its quarter of an hour.
READ_BYTES_PER_S = 100e6
# The audit's near-duplicate score (downstream/audit.py): float32 matrix products of the train images' features
# against the test images' views, about 1.2 s per million train x test pairs on one core (benchmarks/
# near_duplicates.py); BLAS threads divide it.
AUDIT_SECONDS_PER_PAIR = 1.2e-6
# mmengine's own time per training iteration beside the FLOPs (hooks, logging, the optimiser's kernel launches,
# a batch of 2-8 slices that keeps the GPU far below its throughput): 0.1 s is an assumption on the safe side.
ITERATION_SECONDS = 0.1


# ------------------------------------------------------------------------------------------------- the inputs

# numpy's public header readers by .npy format version (3.0 differs only in allowing utf-8 field names, which no
# array of the study has)
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def npz_headers(path) -> dict:
    """{array name: (shape, dtype)} of an .npz, from each member's .npy header alone (numpy's own header reader;
    a compressed member is inflated only as far as its header)."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    continue
                with archive.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version not in HEADER_READERS:
                        raise InputError(f"{member}: .npy format {version}")
                    shape, _, dtype = HEADER_READERS[version](fh)
                headers[member[:-4]] = (tuple(shape), np.dtype(dtype))
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise InputError(f"{path}: not an .npz whose arrays can be sized ({error})") from None
    return headers


def _path_list(paths) -> list:
    """A rule's input as a list: one path (str or Path) or several."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def _npz_files(paths) -> list:
    """The .npz files of `paths`: files as given, folders (a sampling job's output) by their *.npz; paths that do
    not exist yet are left out (a dry run sizes a job before its inputs are written)."""
    files = []
    for path in map(Path, _path_list(paths)):
        if path.is_dir():
            files.extend(sorted(path.glob("*.npz")))
        elif path.is_file() and path.suffix == ".npz":
            files.append(path)
    return files


def stack_shapes(paths) -> list:
    """The `image` shape [N,H,W] of each slice stack (results/slices/*.npz, or a folder of synthetic stacks)."""
    shapes = []
    for path in _npz_files(paths):
        headers = npz_headers(path)
        if "image" not in headers:
            raise InputError(f"{path}: no `image` array (not a slice stack)")
        shapes.append(headers["image"][0])
    return shapes


def stack_slices(paths) -> int:
    return sum(shape[0] for shape in stack_shapes(paths))


def dataset_slices(path) -> dict:
    """{"train": N, "test": M, "size": S} of an arm dataset (downstream/datasets.py save_dataset), from its headers;
    zeros where it does not exist yet."""
    files = _npz_files([path])
    if not files:
        return {"train": 0, "test": 0, "size": 0}
    headers = npz_headers(files[0])
    try:
        train, test = headers["train_image"][0], headers["test_image"][0]
    except KeyError as error:
        raise InputError(f"{path}: no {error} array (not an arm dataset)") from None
    return {"train": train[0], "test": test[0], "size": train[-1]}


def slice_bytes(size: int) -> int:
    """A slice held as the study holds it: a uint8 image and a uint8 label map of size x size."""
    return 2 * int(size) ** 2


def _mb(nbytes: float, base_mb: float, attempt: int = 1) -> int:
    """MiB of `nbytes` with HEADROOM, over `base_mb`, and more for each retry (a killed attempt asked too little)."""
    return int(math.ceil((base_mb + HEADROOM * nbytes / MIB) * (1 + 0.5 * (max(int(attempt), 1) - 1))))


def _minutes(seconds: float, attempt: int = 1, start: float = 0.0) -> int:
    """Minutes of `seconds` with RUNTIME_HEADROOM (at least MIN_MINUTES), doubled for each retry."""
    first = max(math.ceil(start + RUNTIME_HEADROOM * seconds / 60), MIN_MINUTES)
    return int(first * 2 ** (max(int(attempt), 1) - 1))


# --------------------------------------------------------------------------------------------- data jobs

def downstream_dataset_mem_mb(stacks, synth, image_size: int, attempt: int = 1) -> int:
    """downstream_dataset (datasets.build_arm_dataset): the fold's real slices and the generator's synthetic pool
    at the study's size, twice (the parts and their concatenation), plus the largest stack as read (image and
    label at its own size, and its resized copy)."""
    real, pool = stack_shapes(stacks), stack_shapes(synth)
    held = sum(n for n, *_ in real + pool) * slice_bytes(image_size)
    largest = max((2 * n * h * w for n, h, w in real + pool), default=0)
    return _mb(2 * held + 2 * largest, PYTHON_MB, attempt)


def downstream_dataset_runtime(stacks, synth, attempt: int = 1) -> int:
    """Reading (inflating) every input stack and writing the compressed dataset."""
    shapes = stack_shapes(stacks) + stack_shapes(synth)
    return _minutes(sum(2 * n * h * w for n, h, w in shapes) / READ_BYTES_PER_S, attempt)


def _audit_counts(data, synth) -> tuple:
    counts = dataset_slices(data)
    return counts, stack_slices(synth)


def _audit_pairs(counts: dict, synthetic: int) -> int:
    """Image pairs an audit scores: training x test (near duplicates), synthetic x real (memorisation)."""
    return counts["train"] * counts["test"] + synthetic * (counts["train"] + counts["test"])


def audit_mem_mb(data, synth, near_duplicate_size: int, attempt: int = 1) -> int:
    """audit (downstream/audit.py): the arm dataset loaded whole (its images are freed once reduced), and the
    feature bank: float32 size^2 features of every training image, and of every view of each test image and of
    each synthetic slice of the generator's folder (the memorisation table), gathered once more when scored."""
    from nodulesynth.downstream.audit import VIEWS

    counts, synthetic = _audit_counts(data, synth)
    dataset = (counts["train"] + counts["test"]) * slice_bytes(counts["size"])
    features = (counts["train"] + (counts["test"] + synthetic) * (1 + len(VIEWS))) * 4 * int(near_duplicate_size) ** 2
    return _mb(dataset + 2 * features, PYTHON_MB, attempt)


# An audit whose scores take less than this on one core runs on one thread: asking for more would hold it back until
# that many cores are free at once, while the cores it waits for sit idle (on the demo's 2 cores each 3-s audit
# waited for a downstream job to end, 94 core-s in a run).
AUDIT_ONE_THREAD_SECONDS = 60.0


def audit_threads(data, synth, most: int) -> int:
    """Threads for an audit (its BLAS pool): 1 where its pairs take under AUDIT_ONE_THREAD_SECONDS on one core,
    else `most` (the rule's). Before the dataset exists (a dry run) the count is unknown: `most`."""
    counts, synthetic = _audit_counts(data, synth)
    known = counts["train"] + counts["test"] > 0
    if known and AUDIT_SECONDS_PER_PAIR * _audit_pairs(counts, synthetic) < AUDIT_ONE_THREAD_SECONDS:
        return 1
    return max(int(most), 1)


def audit_runtime(data, synth, threads: int, attempt: int = 1) -> int:
    """The near-duplicate scores (train x test) and the memorisation table (synthetic x (real train + test)), at
    AUDIT_SECONDS_PER_PAIR a pair on one core, divided among the job's threads; plus reading the inputs."""
    counts, synthetic = _audit_counts(data, synth)
    read = (counts["train"] + counts["test"]) * slice_bytes(counts["size"]) / READ_BYTES_PER_S
    return _minutes(AUDIT_SECONDS_PER_PAIR * _audit_pairs(counts, synthetic) / max(int(threads), 1) + read, attempt)


def datasets_bytes(paths) -> int:
    """Bytes the arm datasets `paths` hold once loaded (images and labels of both splits)."""
    total = 0
    for path in _path_list(paths):
        counts = dataset_slices(path)
        total += (counts["train"] + counts["test"]) * slice_bytes(counts["size"])
    return total


def datasets_mem_mb(paths, attempt: int = 1) -> int:
    """detect, localize (one arm's dataset) and realism (three arms', loaded together), on top of torch and mmlab:
    the datasets as loaded; the networks' host-side memory is in TORCH_MB (their statistics are computed a chunk at
    a time: downstream/mmlab.py)."""
    return _mb(datasets_bytes(paths), TORCH_MB, attempt)


def report_mem_mb(datasets, attempt: int = 1) -> int:
    """report (report/inputs.py read_test_set): one fold's test split at a time, and the figures drawn from it."""
    largest = 0
    for path in _path_list(datasets):
        counts = dataset_slices(path)
        largest = max(largest, counts["test"] * slice_bytes(counts["size"]))
    return _mb(2 * largest, 2 * PYTHON_MB, attempt)


# ---------------------------------------------------------------------------------------------- generators

GENERATOR_MB = 16000  # a generator job: torch, the networks and their EMA copy, loader workers (slices memory-mapped)


def generator_mem_mb(attempt: int = 1) -> int:
    """A generator job's host memory, more for each retry as every rule's (a killed attempt asked too little)."""
    return _mb(0, GENERATOR_MB, attempt)


def staging_disk_mb(stacks, image_size: int) -> int:
    """train_generator (SDM and SPADE): the training slices staged under $TMPDIR (models/data.py load_training_data), a
    uint8 image and label at the model's size each (128 KiB at 256 px), with HEADROOM; at least 1 GiB."""
    return max(int(math.ceil(HEADROOM * stack_slices(stacks) * slice_bytes(image_size) / MIB)), 1024)


def sampled_maps(stacks, synthesis: dict) -> int:
    """Maps a sampling job synthesises from `stacks` (models/transplant.py choose_maps): per stack the evenly spaced
    `max_slices_per_scan` (null: all) and `nodule_maps_per_scan` nodule maps (null: all), counted without their
    overlap's removal (an upper bound); `transplant` takes nodule-free maps only."""
    spaced, wanted = synthesis.get("max_slices_per_scan"), synthesis.get("nodule_maps_per_scan")
    transplant = synthesis.get("mask_source", "real") == "transplant"
    maps = 0
    for path in _npz_files(stacks):
        with np.load(path, allow_pickle=False) as stack:  # has_nodule alone is read: a bool a slice
            if "has_nodule" not in stack.files:
                raise InputError(f"{path}: no `has_nodule` array (not a slice stack)")
            has_nodule = stack["has_nodule"]
        n, nodules = len(has_nodule), int(np.count_nonzero(has_nodule))
        if transplant:
            maps += (n - nodules) if spaced is None else min(spaced, n - nodules)
        elif spaced is None:
            maps += n
        else:
            maps += min(spaced, n) + (nodules if wanted is None else min(wanted, nodules))
    return maps


# ------------------------------------------------------------------------------------------- GPU runtimes

def gpu_runtime(flops: float, precision: str, device: str, threads: int, attempt: int = 1,
                read_bytes: float = 0.0, iterations: int = 0) -> int:
    """Minutes for a GPU job of `flops` (nodulesynth.cost): at the assumed H100 throughput, or where `device` is
    `cpu` at CPU_TFLOPS_PER_THREAD x threads; plus GPU_START_MINUTES, reading `read_bytes` of input and
    ITERATION_SECONDS for each of mmengine's `iterations`."""
    from nodulesynth.cost import achieved_rates, cpu_rates, job_seconds

    rates = cpu_rates(threads) if str(device) == "cpu" else achieved_rates()
    seconds = job_seconds(flops, precision, rates) + read_bytes / READ_BYTES_PER_S + iterations * ITERATION_SECONDS
    return _minutes(seconds, attempt, start=GPU_START_MINUTES)


def train_sdm_runtime(sdm: dict, device: str, threads: int, attempt: int = 1) -> int:
    from nodulesynth.cost import precision, train_sdm_flops
    from nodulesynth.models.sdm.options import SDMOptions

    options = SDMOptions.from_config(sdm)
    # sdm.gpus processes share each step (DistributedDataParallel): taken as linear scaling, which the
    # retries' doubling covers where the all-reduce costs more. On the CPU the job's threads are shared too.
    gpus = 1 if str(device) == "cpu" else options.gpus
    return gpu_runtime(train_sdm_flops(options) / gpus, precision(options), device, threads, attempt)


def sample_sdm_runtime(sdm: dict, synthesis: dict, stacks, device: str, threads: int, attempt: int = 1) -> int:
    from nodulesynth.cost import precision, sample_sdm_flops
    from nodulesynth.models.sdm.options import SDMOptions

    options = SDMOptions.from_config(sdm)
    return gpu_runtime(sample_sdm_flops(options, sampled_maps(stacks, synthesis)), precision(options), device,
                       threads, attempt)


def train_spade_runtime(spade: dict, device: str, threads: int, attempt: int = 1) -> int:
    from nodulesynth.cost import precision, train_spade_flops
    from nodulesynth.models.spade.options import SPADEOptions

    options = SPADEOptions.from_config(spade)
    return gpu_runtime(train_spade_flops(options), precision(options), device, threads, attempt)


def sample_spade_runtime(spade: dict, synthesis: dict, stacks, device: str, threads: int, attempt: int = 1) -> int:
    from nodulesynth.cost import sample_spade_flops
    from nodulesynth.models.spade.options import SPADEOptions

    flops = sample_spade_flops(SPADEOptions.from_config(spade), sampled_maps(stacks, synthesis))
    return gpu_runtime(flops, "tf32", device, threads, attempt)


def train_generator_runtime(generator: str, config: dict, device: str, threads: int, attempt: int = 1) -> int:
    """The rule train_generator's runtime: train_sdm_runtime or train_spade_runtime from the generator's section."""
    runtimes = {"sdm": train_sdm_runtime, "spade": train_spade_runtime}
    if generator not in runtimes:
        raise InputError(f"generator {generator!r}: expected one of {', '.join(runtimes)}")
    return runtimes[generator](config.get(generator, {}), device, threads, attempt)


def sample_generator_runtime(generator: str, config: dict, stacks, device: str, threads: int, attempt: int = 1) -> int:
    """The rule sample_generator's runtime: sample_sdm_runtime or sample_spade_runtime."""
    runtimes = {"sdm": sample_sdm_runtime, "spade": sample_spade_runtime}
    if generator not in runtimes:
        raise InputError(f"generator {generator!r}: expected one of {', '.join(runtimes)}")
    return runtimes[generator](config.get(generator, {}), config.get("synthesis", {}), stacks, device, threads,
                               attempt)


def detect_runtime(detection: dict, data, device: str, threads: int, attempt: int = 1) -> int:
    """detect: the schedule (AMP: the bf16 rate) and the dataset's test slices; reading the dataset."""
    from nodulesynth.cost import detection_job_flops
    from nodulesynth.downstream.detection import DetectionOptions

    counts = dataset_slices(data)
    if not counts["size"]:
        return gpu_runtime(0, "bf16", device, threads, attempt)  # not written yet (a dry run): the floor
    options = DetectionOptions.from_config(detection)
    flops = detection_job_flops(options, counts["size"], counts["test"])
    return gpu_runtime(flops, "bf16", device, threads, attempt, read_bytes=datasets_bytes(data),
                       iterations=options.epochs * options.iters_per_epoch)


def localize_runtime(localization: dict, data, device: str, threads: int, attempt: int = 1) -> int:
    """localize: the schedule (AMP) and the test slices; reading the dataset and writing its slices as PNGs."""
    from nodulesynth.cost import localization_job_flops
    from nodulesynth.downstream.localization import LocalizationOptions

    counts = dataset_slices(data)
    if not counts["size"]:
        return gpu_runtime(0, "bf16", device, threads, attempt)
    options = LocalizationOptions.from_config(localization)
    flops = localization_job_flops(options, counts["size"], counts["test"])
    return gpu_runtime(flops, "bf16", device, threads, attempt, read_bytes=2 * datasets_bytes(data),
                       iterations=options.total_iters)


def task_runtime(task: str, section: dict, data, device: str, threads: int, attempt: int = 1) -> int:
    """The rule downstream_model's runtime for `task` (detection or localization) from its config section."""
    runtimes = {"detection": detect_runtime, "localization": localize_runtime}
    if task not in runtimes:
        raise InputError(f"downstream task {task!r}: expected one of {', '.join(runtimes)}")
    return runtimes[task](section, data, device, threads, attempt)


def realism_runtime(detection: dict, datasets, device: str, threads: int, attempt: int = 1) -> int:
    """realism: the classifier's features over every slice of the arms' datasets (an upper bound: it draws
    subsets), fp32; reading the datasets."""
    from nodulesynth.cost import realism_job_flops
    from nodulesynth.downstream.detection import DetectionOptions

    counts = [dataset_slices(path) for path in _path_list(datasets)]
    size = max((c["size"] for c in counts), default=0)
    if not size:
        return gpu_runtime(0, "tf32", device, threads, attempt)
    slices = sum(c["train"] + c["test"] for c in counts)
    flops = realism_job_flops(DetectionOptions.from_config(detection), size, slices)
    return gpu_runtime(flops, "tf32", device, threads, attempt, read_bytes=datasets_bytes(datasets))
