"""`nodulesynth downstream-dataset | detect | localize | realism`: the commands of rules/downstream.smk."""

import json
import logging
from dataclasses import replace
from pathlib import Path

from nodulesynth.commands import THREADS_HELP, json_section, loader_workers, torch_threads
from nodulesynth.errors import InputError

log = logging.getLogger("nodulesynth")

# The command that trains and tests each downstream task (downstream.datasets.TASKS; the rule downstream_model).
TASK_COMMANDS = {"detection": "detect", "localization": "localize"}


def cmd_downstream_dataset(args):
    from nodulesynth.data.folds import evaluation_scans, read_folds, training_scans
    from nodulesynth.downstream.datasets import DownstreamOptions, build_arm_dataset, save_dataset
    from nodulesynth.io import read_table

    p = DownstreamOptions.from_config(args.params)
    manifest, folds = read_table(args.manifest, "manifest"), read_folds(args.folds)
    slice_dirs = {str(Path(path).parent) for path in args.slices}
    if len(slice_dirs) > 1:
        raise InputError(f"slice stacks from several folders: {sorted(slice_dirs)}")
    dataset = build_arm_dataset(
        args.arm, args.fold, training_scans(manifest, folds, args.fold), evaluation_scans(manifest, folds, args.fold),
        slice_dirs.pop(), synth_dir=args.synth[0] if args.synth else None, image_size=args.image_size,
        synthetic_ratio=p.synthetic_ratio, seed=p.seed,
        withheld_fraction=p.positive_control_withheld)
    save_dataset(args.out, dataset)
    log.info("dataset arm %s fold %s: %s", args.arm, args.fold, dataset.info)


def downstream_dataset_parser(sub):
    from nodulesynth.downstream.datasets import study_arms

    p = sub.add_parser("downstream-dataset", help="one fold and arm of the study: slices at one size, with boxes")
    p.add_argument("--arm", required=True, choices=study_arms(controls=True))
    p.add_argument("--fold", required=True, type=int)
    p.add_argument("--manifest", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--slices", nargs="+", required=True, help="the fold's slice stacks (and their nodule tables)")
    p.add_argument("--synth", nargs="*", default=[], help="arm B/C: the fold's synthetic stacks folder")
    p.add_argument("--image-size", type=int, required=True, help="the generators' image size")
    p.add_argument("--params", type=json_section, default={},
                   help="the downstream section's keys this step reads as JSON: "
                        "synthetic_ratio, seed, positive_control_withheld (the whole section works too)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_downstream_dataset)


def _write_downstream(work_dir, metrics, predictions, dataset):
    from nodulesynth.io import atomic_path, write_tsv

    metrics = {**{k: v for k, v in dataset.info.items() if isinstance(v, (int, float))}, **metrics}
    with atomic_path(Path(work_dir) / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
    write_tsv(predictions, Path(work_dir) / "predictions.tsv")
    log.info("%s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, float)))


def cmd_detect(args):
    from nodulesynth.downstream.detection import DetectionOptions, run_detection

    _train_and_test(args, DetectionOptions, run_detection)


def cmd_localize(args):
    from nodulesynth.downstream.localization import LocalizationOptions, run_localization

    _train_and_test(args, LocalizationOptions, run_localization)


def _train_and_test(args, options_class, run):
    """A task's model trained and tested on an arm's dataset: metrics.json, predictions.tsv and the model."""
    torch_threads(args)
    from nodulesynth.downstream.datasets import load_dataset

    dataset = load_dataset(args.data)
    options = replace(options_class.from_config(args.params), num_workers=loader_workers(args))
    metrics, predictions = run(dataset, options, args.work_dir, device=args.device)
    _write_downstream(args.work_dir, metrics, predictions, dataset)


def task_parsers(sub):
    for name, func, helptext in ((TASK_COMMANDS["detection"], cmd_detect,
                                  "train and test the nodule classifier (mmpretrain)"),
                                 (TASK_COMMANDS["localization"], cmd_localize,
                                  "train and test the nodule localizer (mmdet)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--data", required=True, help="results/downstream/data/{arm}/fold{k}.npz")
        p.add_argument("--params", type=json_section, default={}, help="the config's detection/localization section")
        p.add_argument("--work-dir", required=True, help="metrics.json, predictions.tsv, model.pth, loss.tsv")
        p.add_argument("--device", default="auto")
        p.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
        p.set_defaults(func=func)


def cmd_realism(args):
    torch_threads(args)
    from nodulesynth.downstream.datasets import load_dataset
    from nodulesynth.downstream.detection import DetectionOptions
    from nodulesynth.downstream.realism import realism_distances
    from nodulesynth.io import atomic_path

    distances = realism_distances(args.model, DetectionOptions.from_config(args.params),
                                  [load_dataset(path) for path in args.data], device=args.device)
    with atomic_path(args.out) as tmp:
        tmp.write_text(json.dumps(distances, indent=1, sort_keys=True))
    log.info("realism: %s", distances)


def realism_parser(sub):
    p = sub.add_parser("realism", help="class-matched Frechet distances in the arm-A classifier's feature space")
    p.add_argument("--model", required=True, help="the fold's arm-A detection model.pth")
    p.add_argument("--data", nargs="+", required=True, help="the fold's arm datasets")
    p.add_argument("--params", type=json_section, default={}, help="the config's detection section")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_realism)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (downstream_dataset_parser, task_parsers, realism_parser)
