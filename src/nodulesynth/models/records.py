"""What training writes beside its model: the loss curve, the readable options file, and the progress bar."""

import csv
import sys
from pathlib import Path

import yaml
from tqdm import tqdm

from nodulesynth.io import atomic_path


class LossCurve:
    """Rows of (step, named values), written as a TSV for the report."""

    def __init__(self):
        self.rows = []

    def append(self, step: int, **values):
        self.rows.append({"step": int(step), **{k: float(v) for k, v in values.items()}})

    def truncate(self, step: int):
        """Drop rows after `step` (a resumed run replays them)."""
        self.rows = [row for row in self.rows if row["step"] <= step]

    def columns(self):
        names = []
        for row in self.rows:
            names.extend(k for k in row if k not in names)
        return names

    def write(self, path):
        columns = self.columns() or ["step"]
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="") as fh:
                writer = csv.DictWriter(fh, columns, delimiter="\t", restval="")
                writer.writeheader()
                writer.writerows(self.rows)

    @classmethod
    def load(cls, path):
        curve = cls()
        if Path(path).exists():
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    step = int(row.pop("step"))
                    curve.append(step, **{k: float(v) for k, v in row.items() if v not in ("", None)})
        return curve


def progress(total: int, initial: int = 0, desc: str = "", disable: bool = False):
    """A tqdm bar that also shows in Snakemake logs (not a tty): then refreshed every 5 s. `disable`: no bar (all
    processes but one of a run on several GPUs)."""
    tty = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, mininterval=0.5 if tty else 5.0,
                dynamic_ncols=tty, ascii=not tty, file=sys.stderr, disable=disable)


def write_options_file(path, content: dict):
    """A readable YAML record beside the model (as NVlabs/SPADE's opt.txt): options, data, notes."""

    def plain(value):  # safe_dump knows lists, not the tuples of the options dataclasses
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(plain(content), sort_keys=False))
