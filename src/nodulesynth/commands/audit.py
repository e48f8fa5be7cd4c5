"""`nodulesynth audit | leakage`: the commands of rules/audit.smk."""

import logging
from pathlib import Path

from nodulesynth.commands import json_section
from nodulesynth.errors import InputError

log = logging.getLogger("nodulesynth")


def _keyed_paths(paths, pattern):
    """{wildcard values: path} for paths matching `pattern` (a regex with groups)."""
    import re

    keyed = {}
    for path in paths:
        match = re.search(pattern, str(path))
        if not match:
            raise InputError(f"{path}: not a path of the form {pattern}")
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


def audit_parser(sub):
    p = sub.add_parser("audit", help="leakage audit of folds, generators, synthetic slices and arm datasets")
    p.add_argument("--manifest", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--generators", nargs="*", default=[],
                   help="results/generators/*/*/training_scans.tsv and model.pt (the synthetic stacks' provenance)")
    p.add_argument("--synth", nargs="*", default=[], help="results/synth/{generator}/{fold} folders")
    p.add_argument("--data", nargs="+", required=True, help="results/downstream/data/{arm}/fold{k}.npz")
    p.add_argument("--params", type=json_section, default={},
                   help="the downstream section's keys this step reads as JSON: "
                        "near_duplicate_size, near_duplicate_threshold (the whole section works too)")
    p.add_argument("--out", required=True)
    p.add_argument("--memorisation", help="TSV of each synthetic slice's nearest-neighbour score to its generator's "
                                          "training patients and to the fold's test patients (arms B, C; others: "
                                          "the header only)")
    p.set_defaults(func=cmd_audit)


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


def leakage_parser(sub):
    p = sub.add_parser("leakage", help="the audits of every arm and fold in one table")
    p.add_argument("--audits", nargs="+", required=True, help="results/audit/{arm}/fold{k}.tsv")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_leakage)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (audit_parser, leakage_parser)
