"""Ingestion + lesion maps of the real LIDC-IDRI-0001 series on one core: slices/s and peak memory.

Target (issue): under 20 s and under 2 GB for its 133 slices. The baseline in the same run is the
floor any ingestion pays: reading every DICOM file with pydicom and windowing the pixels.
Each measurement runs in its own process so that its peak resident memory is its own.

    .venv/bin/python benchmarks/ingest_masks.py [--lidc-root ../shared/data/LIDC-IDRI] [--repeat 3]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # one core
    os.environ[var] = "1"

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "LIDC-IDRI"


def measure(stage, lidc_root):
    import tempfile

    import numpy as np
    import pydicom

    from nodulesynth.data.cohort import discover_lidc
    from nodulesynth.data.window import apply_window

    row = discover_lidc(lidc_root).scans.iloc[0]
    start = time.perf_counter()
    if stage == "baseline":
        files = [p for p in Path(row.dicom_dir).iterdir() if p.suffix == ".dcm"]
        for path in files:
            ds = pydicom.dcmread(path)
            apply_window(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        slices = len(files)
    else:
        from nodulesynth.data.ingest import ScanRecord, ingest_scan
        from nodulesynth.masks.lesion_map import slice_stack
        from nodulesynth.masks.segment import MaskOptions

        with tempfile.TemporaryDirectory() as tmp:
            volume = Path(tmp) / "volume.npz"
            ingest_scan(ScanRecord(row.scan_id, row.patient_id, row.series_uid, row.dicom_dir), volume,
                        source="lidc", lidc_root=lidc_root)
            stack, _ = slice_stack(volume, MaskOptions())
            with np.load(volume) as data:
                slices = len(data["z"])
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(dict(stage=stage, slices=slices, seconds=seconds, peak_mb=peak_mb)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lidc-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return measure(args.stage, args.lidc_root)
    if not (args.lidc_root / "LIDC-IDRI-0001").is_dir():
        sys.exit(f"needs the LIDC-IDRI-0001 series under {args.lidc_root}")
    print(f"{'stage':<28}{'slices':>7}{'seconds':>10}{'slices/s':>10}{'peak MB':>10}")
    for stage, name in (("baseline", "baseline: pydicom + window"), ("full", "ingest + lesion maps")):
        runs = []
        for _ in range(args.repeat):
            out = subprocess.run([sys.executable, __file__, "--stage", stage, "--lidc-root", str(args.lidc_root)],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        print(f"{name:<28}{best['slices']:>7}{best['seconds']:>10.2f}{best['slices'] / best['seconds']:>10.1f}"
              f"{max(r['peak_mb'] for r in runs):>10.0f}")
    print("target: ingest + lesion maps under 20 s and under 2048 MB for 133 slices on one core")


if __name__ == "__main__":
    main()
