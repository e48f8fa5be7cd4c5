#!/usr/bin/env python3
"""The step groups' package lists, pinned from requirements.lock: the one place every pin comes from.

Each container image (containers/*.def) and conda environment (envs/*.yaml) of a step group installs the
packages named here at the versions the lock gives, and every package they pull in through the lock used
as a pip constraints file. This file names packages only, never versions.

    lock_requirements.py requirements GROUP   the group's packages, pinned (pip requirements lines)
    lock_requirements.py pin NAME...          the named packages, pinned
    lock_requirements.py conda-env GROUP      the text of envs/GROUP.yaml
    lock_requirements.py check                every installed distribution equals the lock (run in an image)

Standard library only: it runs in a bare image before anything is installed.
"""

import argparse
import hashlib
import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"

# What the package itself needs (pyproject.toml's dependencies), in every group; setuptools because the
# lock pins it and a base image's own copy would otherwise stay, unpinned.
BASE = ["numpy", "scipy", "pandas", "pydicom", "opencv-python", "scikit-learn", "tqdm", "PyYAML", "jsonschema",
        "setuptools"]

GROUPS = {
    # DICOM and LIDC-IDRI reading (pylidc and the codecs of compressed series), lesion maps, folds, audit.
    "data": BASE + ["pylidc", "SQLAlchemy", "scikit-image", "matplotlib", "pylibjpeg", "pylibjpeg-libjpeg",
                    "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "SimpleITK"],
    # SDM and SPADE training and sampling.
    "generators": BASE + ["torch", "torchvision"],
    # Detection (mmpretrain) and localization (mmdet); mmcv has no wheel and is built against the torch above.
    "mmlab": BASE + ["torch", "torchvision", "mmengine", "mmcv", "mmdet", "mmpretrain", "pycocotools"],
    # Statistics, figures, the HTML report (its PDF needs Debian's chromium, not a Python package).
    "report": BASE + ["matplotlib", "Jinja2"],
}

# Built from source after torch is installed (pip's build isolation would not see torch): not in a
# conda environment's pip list, but in its post-deploy script.
BUILT_AGAINST_TORCH = ["mmcv"]

# Present in base images or installed by hand, never imported by the workflow.
NOT_LOCKED = {"pip", "wheel", "nodulesynth"}

LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<op>===|==)\s*(?P<version>[^\s;#]+)\s*$")


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path=LOCK) -> dict:
    """normalized name -> (name as written, operator, version) of every pin in the lock."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the lock file does not exist")
    pins = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = LINE.match(line)
        if not match:
            raise ValueError(f"{path}:{number}: not an exact pin (name==version): {raw!r}")
        key = normalize(match["name"])
        if key in pins:
            raise ValueError(f"{path}:{number}: {match['name']} is pinned twice")
        pins[key] = (match["name"], match["op"], match["version"])
    return pins


def pinned(names, lock: dict) -> list:
    """`name==version` lines (`===` where the lock says so) for `names`, in their order."""
    missing = [name for name in names if normalize(name) not in lock]
    if missing:
        raise KeyError(f"not pinned in requirements.lock: {', '.join(missing)}")
    return [f"{name}{lock[normalize(name)][1]}{lock[normalize(name)][2]}" for name in names]


def group_packages(group: str) -> list:
    if group not in GROUPS:
        raise KeyError(f"unknown step group {group!r}: one of {', '.join(GROUPS)}")
    return GROUPS[group]


def group_requirements(group: str, lock: dict) -> list:
    return pinned(group_packages(group), lock)


def lock_digest(lock: dict) -> str:
    """A short sha256 of every pin of the lock (comments and order aside)."""
    pins = "\n".join(f"{key}{op}{version}" for key, (_, op, version) in sorted(lock.items()))
    return hashlib.sha256(pins.encode()).hexdigest()[:16]


def conda_env(group: str, lock: dict) -> str:
    """envs/GROUP.yaml: python and pip from conda-forge, the group's pins through pip.

    Snakemake copies an env file into .snakemake/conda before creating it, so a path relative to the file
    would not reach the clone: $NODULESYNTH_ROOT (pip expands it) names it instead.
    """
    built = [name for name in group_packages(group) if name in BUILT_AGAINST_TORCH]
    lines = [
        f"# Step group '{group}': the conda environment of its rules (`conda:`; snakemake --sdm conda).",
        "# Generated from requirements.lock:",
        f"#   python scripts/lock_requirements.py conda-env {group} > envs/{group}.yaml",
        "# (tests/test_containers.py keeps it equal). The lock, as constraints, pins every dependency pulled in;",
        "# $NODULESYNTH_ROOT is the clone (the workflow sets it to its own folder).",
    ]
    if built:
        lines.append(f"# {', '.join(built)}: built against torch by {group}.post-deploy.sh, once torch is installed.")
    # Snakemake names a conda environment from this file's text: a lock that moves only a dependency pulled in
    # (or mmcv) must still give a new environment.
    lines.append(f"# the lock's pins: {lock_digest(lock)}")
    lines += [f"name: nodulesynth-{group}", "channels:", "  - conda-forge", "  - nodefaults", "dependencies:",
              "  - python=3.11", "  - pip", "  - pip:", "      - -c ${NODULESYNTH_ROOT}/requirements.lock"]
    lines += [f"      - {req}" for req, name in zip(group_requirements(group, lock), group_packages(group))
              if name not in built]
    lines.append("      - -e ${NODULESYNTH_ROOT}")
    return "\n".join(lines) + "\n"


def installed_distributions() -> dict:
    """normalized name -> version of every distribution this interpreter sees."""
    from importlib.metadata import distributions

    return {normalize(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}


def lock_mismatches(installed: dict, lock: dict, ignore=NOT_LOCKED) -> list:
    """Installed distributions that the lock does not pin, or pins at another version."""
    ignored = {normalize(name) for name in ignore}
    problems = []
    for name, version in sorted(installed.items()):
        if name in ignored:
            continue
        if name not in lock:
            problems.append(f"{name} {version} is installed but not pinned in requirements.lock")
        elif lock[name][2] != version:
            problems.append(f"{name} {version} is installed, requirements.lock pins {lock[name][2]}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lock", default=str(LOCK), help="the lock file (default: the clone's requirements.lock)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("requirements", help="the group's packages, pinned").add_argument("group", choices=GROUPS)
    sub.add_parser("pin", help="the named packages, pinned").add_argument("names", nargs="+")
    sub.add_parser("conda-env", help="the text of envs/GROUP.yaml").add_argument("group", choices=GROUPS)
    sub.add_parser("check", help="every installed distribution equals the lock")
    args = parser.parse_args(argv)
    try:
        lock = read_lock(args.lock)
        if args.command == "requirements":
            print("\n".join(group_requirements(args.group, lock)))
        elif args.command == "pin":
            print("\n".join(pinned(args.names, lock)))
        elif args.command == "conda-env":
            sys.stdout.write(conda_env(args.group, lock))
        else:
            problems = lock_mismatches(installed_distributions(), lock)
            if problems:
                print(f"{len(problems)} installed distributions differ from {args.lock}:", *problems,
                      sep="\n  ", file=sys.stderr)
                return 1
            print(f"every installed distribution equals {args.lock}")
    except (OSError, KeyError, ValueError) as err:
        print(f"lock_requirements: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
