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


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * (a & b).sum() / total
