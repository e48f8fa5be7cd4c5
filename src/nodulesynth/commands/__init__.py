"""The `nodulesynth <step>` commands, one module per rule file (rules/cohort.smk: commands/cohort.py, ...).

Each module defines its commands' handlers (`cmd_<name>(args)`) with each one's parser (`<name>_parser(sub)`)
beside it, and lists the parsers in `PARSERS`, in the order its rules run; `nodulesynth.cli` registers them.
Handlers import what they use inside, so `nodulesynth --help` and the light commands need no torch.
"""

import argparse
import json


def json_section(text):
    """argparse type of `--params` and the like: a config section as a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object (a config section)")
    return value


def torch_threads(args):
    """The `--threads` of a torch command, set before its work starts."""
    import torch

    torch.set_num_threads(args.threads)


def loader_workers(args) -> int:
    """The job's data-loader workers: its `--threads` but one (nodulesynth.models.data.loader_workers)."""
    from nodulesynth.models.data import loader_workers as workers

    return workers(args.threads)


THREADS_HELP = "the job's CPUs: torch's threads, and all but one of them data-loader threads"
