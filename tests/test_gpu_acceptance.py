"""benchmarks/gpu_acceptance.sh: the one GPU script runs every row; on the CPU (--smoke) at toy sizes."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = ["mmcv CUDA ops", "SDM training, speed ON", "SDM training, speed OFF", "SDM sampling, dpmpp_2m_sde 25",
        "SDM sampling, ddpm 20", "detection iteration", "localization iteration"]


def test_smoke_run_prints_every_row_of_the_table(tmp_path):
    table = tmp_path / "table.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(ROOT / "benchmarks/gpu_acceptance.sh"), "--smoke", "--markdown", str(table)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert lines[0] == "| check | setting | result | note |"
    rows = [line.split(" | ") for line in lines[2:]]
    assert [row[0].lstrip("| ") for row in rows] == ROWS
    assert rows[0][2] == "skipped"  # no CUDA here
    for row in rows[1:]:
        assert "FAILED" not in row[2] and any(ch.isdigit() for ch in row[2]), row
    assert "SMOKE RUN" in proc.stdout


def test_a_failed_row_fails_the_script_and_names_the_reason(tmp_path):
    # Without a GPU the real run refuses at once, in one line that says why, and exits non-zero.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(ROOT / "benchmarks/gpu_acceptance.sh")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode != 0
    assert "gpu_acceptance: device 'cuda' requested but CUDA is not available" in proc.stderr
    assert "Traceback" not in proc.stderr
