"""`make setup` on a machine without the optional system packages: it says what is missing and the one command."""

import subprocess

from conftest import REPO, path_without_chromium


def test_setup_names_the_missing_packages_and_the_one_command(tmp_path):
    path = path_without_chromium(tmp_path / "bin")
    proc = subprocess.run([str(REPO / "scripts/system-packages.sh")], env={"PATH": path}, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr  # optional: the study itself needs none of them
    missing = proc.stdout.split("missing: ")[1].split(" (")[0].split()
    assert "chromium" in missing
    assert f"sudo apt-get install -y {' '.join(missing)}" in proc.stdout
    assert "no report.pdf" in proc.stdout


def test_daemons_in_sbin_count_as_installed_for_a_user_whose_path_lacks_it(tmp_path):
    """slurm-wlm and munge install their daemons in /usr/sbin, which a non-root user's PATH often lacks: they are
    installed all the same, and `make setup` must not ask for them again."""
    import os
    import shutil

    import pytest

    sbin = [name for name in ("slurmctld", "munged") if os.access(f"/usr/sbin/{name}", os.X_OK)]
    if not sbin:
        pytest.skip("slurm-wlm and munge are not installed here (CI installs them)")
    path = [folder for folder in os.environ["PATH"].split(os.pathsep) if not folder.rstrip("/").endswith("sbin")]
    assert all(shutil.which(name, path=os.pathsep.join(path)) is None for name in sbin)
    proc = subprocess.run([str(REPO / "scripts/system-packages.sh")], env={"PATH": os.pathsep.join(path)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    missing = proc.stdout.split("missing: ")[1].split(" (")[0].split() if "missing: " in proc.stdout else []
    assert not {"slurm-wlm", "munge"} & set(missing), proc.stdout
