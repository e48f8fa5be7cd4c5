"""`nodulesynth stats`: the command of rules/stats.smk."""

import logging

from nodulesynth.commands import json_section

log = logging.getLogger("nodulesynth")


def cmd_stats(args):
    from nodulesynth.stats.tables import StatsOptions, run_stats

    # the detection section for its threshold only (the cut that made metrics.json's accuracy); 0.5 is
    # DetectionOptions' default, not imported: nodulesynth.downstream.detection needs torch, which the report
    # step group that runs `stats` does not install
    threshold = float(args.detection.get("threshold", 0.5))
    written = run_stats(args.metrics, args.out_dir, StatsOptions.from_config(args.params), threshold=threshold)
    log.info("stats: wrote %s", ", ".join(str(p) for p in written))


def stats_parser(sub):
    p = sub.add_parser("stats", help="mean ± sd per arm, paired tests (B, C vs A; C vs B), controls, per task")
    p.add_argument("--metrics", nargs="+", required=True, help="results/downstream/{task}/{arm}/fold{k}/metrics.json")
    p.add_argument("--params", type=json_section, default={}, help="the config's stats section as JSON")
    p.add_argument("--detection", type=json_section, default={},
                   help="the config's detection section as JSON (its threshold cuts the bootstrap's accuracy)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_stats)


# in the order the rules run; nodulesynth.cli registers them
PARSERS = (stats_parser,)
