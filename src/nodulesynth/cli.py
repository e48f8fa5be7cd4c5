"""`nodulesynth <step>`: every workflow step as a command, so each runs by hand as under Snakemake.

Config values reach a step as `--params` JSON (one config section, as the rule's `params:` passes it),
so Snakemake reruns a step when a value it uses changes.
"""

import argparse
import logging
import sys

from nodulesynth.commands import audit, cohort, downstream, folds, generators, report, stats
from nodulesynth.errors import DeviceError, InputError

log = logging.getLogger("nodulesynth")

# one module per rule file, in the order the workflow runs them
COMMAND_MODULES = (cohort, folds, generators, downstream, audit, stats, report)


def build_parser():
    parser = argparse.ArgumentParser(prog="nodulesynth", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        for add_parser in module.PARSERS:
            add_parser(sub)
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
    except (InputError, DeviceError, FileNotFoundError) as err:
        # What a user can fix gets one clear line naming the file, key or device (nodulesynth.errors); any other
        # error is a surprise, and its traceback is what finds it.
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
