"""benchmarks/gpu_acceptance.sh: the one GPU script runs every row; on the CPU (--smoke) at toy sizes."""

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

from nodulesynth.models.sdm.options import SDMOptions

ROOT = Path(__file__).resolve().parents[1]
SDM_ROWS = ["SDM training, speed ON", "SDM training, speed ON, no checkpointing", "SDM training, speed OFF",
            "SDM sampling, dpmpp_2m_sde 25", "SDM sampling, ddpm 20"]
ROWS = ["mmcv CUDA ops"] + SDM_ROWS + ["detection iteration", "localization iteration"]


def smoke(tmp_path, *args):
    table = tmp_path / "table.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(ROOT / "benchmarks/gpu_acceptance.sh"), "--smoke", "--markdown", str(table), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = table.read_text().splitlines()
    assert lines[0] == "| check | setting | result | note |"
    assert "SMOKE RUN" in proc.stdout
    assert re.search(r"^CPU \(1 threads\), \d{4}-\d\d-\d\d$", proc.stdout, re.M)  # the table's heading: device, date
    return [line.split(" | ") for line in lines[2:]]


def test_smoke_run_prints_every_row_of_the_table(tmp_path):
    rows = smoke(tmp_path)
    assert [row[0].lstrip("| ") for row in rows] == ROWS
    assert rows[0][2] == "skipped"  # no CUDA here
    for row in rows[1:]:
        assert "FAILED" not in row[2] and any(ch.isdigit() for ch in row[2]), row
    # the row without recomputation trains in passes half as large
    assert "passes of 4, ckpt False" in rows[2][1], rows[2]


def test_sdm_rows_alone_write_the_rates_that_cost_reads(tmp_path):
    """--only sdm --throughput-dir: the SDM rows only, and one throughput file per speed-ON training row, each
    accepted by benchmarks/cost.py --measured for its own options."""
    rows = smoke(tmp_path, "--only", "sdm", "--throughput-dir", str(tmp_path / "rates"))
    assert [row[0].lstrip("| ") for row in rows] == SDM_ROWS
    spec = importlib.util.spec_from_file_location("cost", ROOT / "benchmarks" / "cost.py")
    cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cost)
    files = sorted(p.name for p in (tmp_path / "rates").iterdir())
    assert files == ["sdm_checkpointing.json", "sdm_no_checkpointing.json"]
    records = {name: json.loads((tmp_path / "rates" / name).read_text()) for name in files}
    for name, record in records.items():
        options = SDMOptions.from_config(record["options"])
        assert cost.read_measured(tmp_path / "rates" / name, options)["train_images_per_s"] > 0
        assert record["sampling"]["sampler"] == "dpmpp_2m_sde" and record["sampling"]["steps"] == 25
    # the second row: no recomputation, in passes half as large (the smoke network checkpoints in neither);
    # sampling measured once, for both
    ckpt, no_ckpt = records["sdm_checkpointing.json"], records["sdm_no_checkpointing.json"]
    assert no_ckpt["options"]["grad_checkpoint"] is False and no_ckpt["options"]["micro_batch_size"] == 4
    assert ckpt["options"]["micro_batch_size"] == 16
    assert ckpt["sampling"]["seconds_per_image"] == no_ckpt["sampling"]["seconds_per_image"]
