"""Cohort discovery over a large export: files/s and peak memory of `discover_dicom` (issue 13).

Target: at least 2,000 files/s on 2 cores from a warm page cache, memory under 1 GB, for 100,000 files.
The files are written on the fly from the real LIDC-IDRI-0001 series' headers (every attribute kept), each
series with new Study, Series, FrameOfReference and SOP Instance UIDs and a patient of its own, and 8x8
pixel data so that 100,000 files fit on disk (about 1 GB), laid out patient/study/series. They are read once
before the measurement (a warm page cache), then discovery runs in its own process, whose memory and its
workers' is sampled together.

    .venv/bin/python benchmarks/discover.py [--files 100000] [--workers 2] [--out DIR] [--keep]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LIDC-IDRI"
PIXELS = 8


def templates(lidc_root):
    """The real series' headers (no pixel data), ordered by slice position."""
    import pydicom

    files = sorted(Path(lidc_root).glob("LIDC-IDRI-0001/*/*/*.dcm"))
    if not files:
        raise FileNotFoundError(f"no LIDC-IDRI-0001 series under {lidc_root}")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    return sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))


def write_series(args):
    """Write series number `index` (`count` files) under `out`; returns the number of files written."""
    import numpy as np
    from pydicom.uid import generate_uid

    index, count, out, lidc_root = args
    heads = _TEMPLATES.get(lidc_root) or _TEMPLATES.setdefault(lidc_root, templates(lidc_root))
    patient = f"BENCH{index:06d}"
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    folder = Path(out) / patient / study / series
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((PIXELS, PIXELS), np.int16).tobytes()
    for k, ds in enumerate(heads[:count]):
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = patient, study, series, frame
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Rows = ds.Columns = PIXELS
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        ds.save_as(folder / f"{k + 1:06d}.dcm", enforce_file_format=True)
    return count


_TEMPLATES = {}


def write_cohort(out, n_files, lidc_root, workers):
    per_series = len(templates(lidc_root))
    n_series = math.ceil(n_files / per_series)
    jobs = [(i, min(per_series, n_files - i * per_series), str(out), str(lidc_root)) for i in range(n_series)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(write_series, jobs, chunksize=8)), n_series


def warm(out):
    """Read every file once, so the measurement finds them in the page cache."""
    total = 0
    for folder, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                total += len(fh.read())
    return total


def measure(out, workers):
    """Runs in its own process: discover_dicom over `out`, with the peak resident memory of this process and
    its workers together, sampled every 20 ms, and the CPU time per file (which other load on the machine
    changes less than the wall-clock rate)."""
    import psutil

    from nodulesynth.data.cohort import discover_dicom

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            peak[0] = max(peak[0], rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    found = discover_dicom(out, workers=workers)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    cpu = me.cpu_times()  # the workers have been reaped: their time is in children_*
    cpu_seconds = cpu.user + cpu.system + cpu.children_user + cpu.children_system
    return dict(files=found.counts["files"], seconds=round(seconds, 2),
                header_seconds=round(found.counts["seconds"], 2), files_per_s=round(found.counts["files"] / seconds),
                cpu_ms_per_file=round(1000 * cpu_seconds / found.counts["files"], 3), scans=len(found.scans),
                rejected=len(found.rejected), peak_memory_mb=round(peak[0] / 2**20))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2, help="processes reading headers (and writing the files)")
    parser.add_argument("--lidc-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--out", help="folder for the generated files (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the measuring subprocess
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.workers)))
        return

    out = Path(args.out or tempfile.mkdtemp(prefix="nodulesynth-discover-"))
    try:
        if not out.exists() or not any(out.iterdir()):
            start = time.perf_counter()
            written, n_series = write_cohort(out, args.files, args.lidc_root, args.workers)
            print(f"wrote {written} files ({n_series} series) in {time.perf_counter() - start:.0f} s", flush=True)
        warm(out)
        proc = subprocess.run([sys.executable, __file__, "--measure", str(out), "--workers", str(args.workers)],
                              capture_output=True, text=True, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result.update(workers=args.workers, cores=len(os.sched_getaffinity(0)),
                      target="files_per_s >= 2000 on 2 cores (warm cache), peak_memory_mb < 1024")
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep and not args.out:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
