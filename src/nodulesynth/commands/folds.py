"""`nodulesynth folds`: the command of rules/folds.smk."""

import logging

from nodulesynth.commands import json_section

log = logging.getLogger("nodulesynth")


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


def folds_parser(sub):
    p = sub.add_parser("folds", help="patient-level k-fold split, stratified by nodule patients")
    p.add_argument("--manifest", required=True)
    p.add_argument("--slices", nargs="+", required=True, help="the slice stacks (for each patient's nodule status)")
    p.add_argument("--params", type=json_section, default={})
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_folds)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (folds_parser,)
