"""The command line's errors: expected input errors (a missing file, a KeyError or ValueError raised by
nodulesynth to report bad input) give one clear log line and exit status 1; the same types raised
anywhere else are surprises and keep their traceback."""

import logging
import subprocess
import sys

import numpy as np
import pytest

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
