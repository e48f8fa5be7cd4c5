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
