"""Shared fixtures: small demo cohorts made with the real phantom writer and the real pipeline code."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
LIDC_ROOT = REPO.parent / "shared" / "data" / "LIDC-IDRI"
LIDC_0001 = LIDC_ROOT / "LIDC-IDRI-0001"


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are no package: set-up runs them before the package exists)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def path_without_chromium(bin_dir) -> str:
    """A PATH like this one with every Chromium hidden, as on a machine without one: `bin_dir` gets a link to each
    other executable on PATH (Chromium shares /usr/bin with everything else, so dropping folders would not do).
    This environment's bin folder stays itself, first: a linked venv python would not find its pyvenv.cfg."""
    from nodulesynth.report.pdf import CANDIDATES

    venv_bin, bin_dir = Path(sys.executable).parent, Path(bin_dir)
    assert not any((venv_bin / name).exists() for name in CANDIDATES), venv_bin
    bin_dir.mkdir(parents=True, exist_ok=True)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or not Path(folder).is_dir() or Path(folder) == venv_bin:
            continue
        for entry in Path(folder).iterdir():
            link = bin_dir / entry.name
            if entry.name in CANDIDATES or link.exists() or link.is_symlink() or not os.access(entry, os.X_OK):
                continue
            link.symlink_to(entry)
    return f"{venv_bin}{os.pathsep}{bin_dir}"


def run_snakemake(workdir, *args, check=True, without_chromium=False):
    """Run the real workflow with this environment's `nodulesynth` on PATH; returns the CompletedProcess.
    without_chromium: as on a machine without Chromium (path_without_chromium, $NODULESYNTH_CHROMIUM unset)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if without_chromium:
        env.pop("NODULESYNTH_CHROMIUM", None)
        env["PATH"] = path_without_chromium(Path(workdir) / ".bin-without-chromium")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", "--nocolor", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def process_scan(dicom_dir, scan_id, annotations, out_dir, opts=None):
    """Ingest + lesion maps of one DICOM series, as the ingest and masks rules do."""
    from nodulesynth.data.ingest import ScanRecord, ingest_scan
    from nodulesynth.data.slices import save_slices
    from nodulesynth.masks.lesion_map import slice_stack
    from nodulesynth.masks.segment import MaskOptions

    volume = Path(out_dir) / "volumes" / f"{scan_id}.npz"
    ingest_scan(ScanRecord(scan_id, scan_id, "", str(dicom_dir)), volume, annotations=annotations)
    stack, boxes = slice_stack(volume, opts or MaskOptions())
    path = Path(out_dir) / "slices" / f"{scan_id}.npz"
    save_slices(path, stack)
    return path, stack, boxes


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory):
    """Six demo phantoms (128 px), written as DICOM with their truth and annotations."""
    from nodulesynth.data.demo import write_demo_cohort

    out = tmp_path_factory.mktemp("demo")
    geometries = write_demo_cohort(out, n_scans=6, image_size=128)
    return out, geometries


@pytest.fixture(scope="session")
def demo_processed(demo_cohort, tmp_path_factory):
    """The demo cohort through ingest and masks: list of (geometry, slices path, stack, boxes)."""
    out, geometries = demo_cohort
    work = tmp_path_factory.mktemp("demo_processed")
    done = []
    for g in geometries:
        path, stack, boxes = process_scan(out / "dicom" / g.patient_id / g.series_uid, g.patient_id,
                                          out / "annotations.csv", work)
        done.append((g, path, stack, boxes))
    return done


@pytest.fixture(scope="session")
def demo_slice_paths(demo_processed):
    """Paths of demo slice stacks (`results/slices/*.npz` layout, 128 x 128), for the generators' tests."""
    return [path for _, path, _, _ in demo_processed]


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for the module's tests, restored after: tiny networks run fastest on one
    thread, and several times faster than on two when the machine's cores are shared."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- slice stacks (the masks step's `results/slices/{scan}.npz` layout) built in memory -------------------------


def disk(size, cy, cx, ry, rx):
    """The pixels of a size x size image inside the ellipse centred at (cy, cx) with radii (ry, rx)."""
    yy, xx = np.mgrid[:size, :size]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def chest_map(size=32, nodule=None):
    """A chest-like label map: body, two lungs, trachea, and optionally a nodule (cy, cx, r)."""
    from nodulesynth.labels import BODY, LEFT_LUNG, NODULE, RIGHT_LUNG, TRACHEA

    s = size
    label = np.zeros((s, s), np.uint8)
    label[disk(s, s * 0.5, s * 0.5, s * 0.4, s * 0.45)] = BODY
    label[disk(s, s * 0.5, s * 0.3, s * 0.27, s * 0.17)] = RIGHT_LUNG  # patient's right on image left
    label[disk(s, s * 0.5, s * 0.7, s * 0.27, s * 0.17)] = LEFT_LUNG
    label[disk(s, s * 0.3, s * 0.5, s * 0.05, s * 0.05)] = TRACHEA
    if nodule is not None:
        label[disk(s, *nodule[:2], nodule[2], nodule[2])] = NODULE
    return label


def chest_image(label, rng):
    """A grey image of a label map: one level per class (nodule brightest) with Gaussian noise."""
    values = np.array([0, 40, 40, 10, 160, 200], np.float32)  # background, lungs, trachea, body, nodule
    return np.clip(values[label] + rng.normal(0, 8, label.shape), 0, 255).astype(np.uint8)


def chest_stack(scan_id, patient_id, n=6, size=32, seed=0, nodule_every=3):
    """n chest-like slices 2.5 mm apart, a nodule in the right lung on every `nodule_every`-th: the generators'
    training data in small."""
    from nodulesynth.data.slices import SliceStack
    from nodulesynth.labels import NODULE

    rng = np.random.default_rng(seed)
    labels = np.stack([chest_map(size, (size * 0.5, size * 0.3, 2 + (i % 2)) if i % nodule_every == 0 else None)
                       for i in range(n)])
    images = np.stack([chest_image(label, rng) for label in labels])
    return SliceStack(images, labels, np.arange(n) * 2.5, np.arange(n, dtype=np.int32),
                      (labels == NODULE).any((1, 2)), scan_id, patient_id)


def write_chest_stacks(folder, count=2, n=6, size=32, seed=0):
    """`count` chest_stack files folder/scan{k}.npz (patients P{k}, seeds seed + k); returns their paths."""
    from nodulesynth.data.slices import save_slices

    paths = []
    for k in range(count):
        path = Path(folder) / f"scan{k}.npz"
        save_slices(path, chest_stack(f"scan{k}", f"P{k}", n, size, seed + k))
        paths.append(path)
    return paths


def write_boxed_stack(folder, scan, patient, n, size, nodule_rows=(), seed=0, first_index=0, boxes=True):
    """folder/{scan}.npz: n slices of noise (size x size) in a body with a lung square, a 4x6-pixel nodule square
    on `nodule_rows` (slice_index first_index + row); with `boxes`, its box table {scan}.nodules.tsv beside it:
    the downstream datasets' input in small."""
    import pandas as pd

    from nodulesynth.data.slices import SliceStack, save_slices
    from nodulesynth.labels import BODY, LEFT_LUNG, NODULE

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (n, size, size), dtype=np.uint8)
    label = np.full((n, size, size), BODY, np.uint8)
    label[:, size // 4: size // 2, size // 4: size // 2] = LEFT_LUNG
    rows = []
    for r in nodule_rows:
        label[r, 20:24, 30:36] = NODULE
        rows.append(dict(slice_index=first_index + r, nodule=1, x0=30, y0=20, x1=36, y1=24))
    path = Path(folder) / f"{scan}.npz"
    save_slices(path, SliceStack(image, label, np.arange(n, dtype=float), first_index + np.arange(n),
                                 (label == NODULE).any((1, 2)), scan, patient))
    if boxes:
        pd.DataFrame(rows, columns=["slice_index", "nodule", "x0", "y0", "x1", "y1"]).to_csv(
            Path(folder) / f"{scan}.nodules.tsv", sep="\t", index=False)
    return path


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total
