"""The command line's errors: expected input errors (a missing file, nodulesynth.errors.InputError raised by
nodulesynth to report bad input) give one clear log line and exit status 1; any other error is a surprise and
keeps its traceback."""

import logging
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from nodulesynth.cli import main


def partial_stack(path):
    """A slice-stack file without its `z` array: load_slices refuses it with a KeyError."""
    np.savez(path, image=np.zeros((1, 4, 4), np.uint8), label=np.zeros((1, 4, 4), np.uint8))
    return path


def errors(caplog):
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_our_key_error_is_one_line(tmp_path, caplog):
    path = partial_stack(tmp_path / "S1.npz")
    assert main(["qc", "--slices", str(path), "--out", str(tmp_path / "qc.png")]) == 1
    [record] = errors(caplog)
    assert str(path) in record.getMessage() and "'z'" in record.getMessage()
    assert record.exc_info is None and "\n" not in record.getMessage()


def test_a_bad_config_value_is_one_line_naming_the_key(tmp_path, caplog):
    assert main(["cohort", "--params", '{"source": "pacs"}', "--scans", str(tmp_path / "scans.tsv"),
                 "--annotations", str(tmp_path / "a.csv"), "--cohort-rejected", str(tmp_path / "r.tsv")]) == 1
    [record] = errors(caplog)
    assert record.getMessage() == "cohort.source must be demo, lidc or dicom, not 'pacs'" and record.exc_info is None
    assert not (tmp_path / "scans.tsv").exists()


def test_nodulesynth_raises_input_error_for_bad_input():
    """A KeyError or ValueError that nodulesynth raised itself would reach the user as a traceback: bad input is
    an InputError (a KeyError and a ValueError too, for callers that catch those)."""
    package = REPO / "src" / "nodulesynth"
    plain = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if re.search(r"\braise (KeyError|ValueError)\(", line)]
    assert not plain, f"raise InputError (nodulesynth.errors) instead at {', '.join(plain)}"


def test_a_missing_file_is_one_line(tmp_path, caplog):
    missing = tmp_path / "nowhere.npz"
    assert main(["qc", "--slices", str(missing), "--out", str(tmp_path / "qc.png")]) == 1
    [record] = errors(caplog)
    assert str(missing) in record.getMessage() and record.exc_info is None


def test_a_library_error_keeps_its_traceback(tmp_path, caplog):
    """numpy's ValueError on a file that is no npz did not come from a raise of ours: not hidden."""
    path = tmp_path / "S1.npz"
    path.write_text("not an archive\n")
    with pytest.raises(ValueError, match="pickled"):
        main(["qc", "--slices", str(path), "--out", str(tmp_path / "qc.png")])
    assert not errors(caplog)


def test_on_the_console(tmp_path):
    """As a user sees it: one line without a traceback for bad input, the traceback for a surprise."""
    def run(path):
        return subprocess.run([sys.executable, "-m", "nodulesynth.cli", "qc", "--slices", str(path), "--out",
                               str(tmp_path / "qc.png")], capture_output=True, text=True, timeout=120)

    expected = run(partial_stack(tmp_path / "S1.npz"))
    assert expected.returncode == 1 and "Traceback" not in expected.stderr
    [line] = [line for line in expected.stderr.splitlines() if "ERROR" in line]
    assert str(tmp_path / "S1.npz") in line and "'z'" in line
    (tmp_path / "S2.npz").write_text("not an archive\n")
    surprise = run(tmp_path / "S2.npz")
    assert surprise.returncode == 1 and "Traceback" in surprise.stderr and "ValueError" in surprise.stderr
