"""SDM training on several processes (DistributedDataParallel; gloo on the CPU), launched as the rule launches it:
`torchrun --standalone --nproc-per-node 2 --no-python nodulesynth train-sdm ...`."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nodulesynth.models.checkpoints import load_checkpoint
from nodulesynth.models.distributed import Ranks, launcher
from nodulesynth.models.records import LossCurve
from nodulesynth.models.sdm import SDMOptions, load_sdm, train_sdm
from nodulesynth.models.sdm.train import build_model
from conftest import write_chest_stacks
from test_sdm import TINY

# A step of 4 samples: one process takes all four in passes of one; each of two takes two, also in passes of one
# (so DDP's no_sync runs on the first pass). Gradient checkpointing and the guidance drop on, as in a real run.
# Four channels per group norm group, as the real network has eight or more: with one (TINY's 16 channels in 32
# groups become 16 of one), a bias before a group norm is removed by it entirely, its gradient is rounding noise,
# and Adam, which divides each weight's gradient by its own size, moves it by up to lr either way: such a weight
# then differs by ~lr between any two orders of float additions (a one-process run cut into other micro-batches
# too), while changing no output.
OPTIONS = SDMOptions(**{**TINY, "micro_batch_size": 1, "lr": 1e-3, "drop_rate": 0.3, "norm_groups": 4})


def run_rule_command(paths, out_dir, options: SDMOptions, threads=2):
    """train-sdm as rules/generators.smk runs it: `{params.launch} nodulesynth train-sdm ...`."""
    command = (f"{launcher(options.gpus)} nodulesynth train-sdm --slices {' '.join(map(str, paths))} "
               f"--params {shlex.quote(json.dumps(options.to_dict()))} --out-dir {out_dir} --device cpu "
               f"--threads {threads}")
    # `nodulesynth` is the console script's entry point (nodulesynth.cli:main) run by this interpreter: the
    # installed script may name another environment's Python.
    bin_dir = Path(out_dir).parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "nodulesynth").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m nodulesynth.cli "$@"\n')
    (bin_dir / "nodulesynth").chmod(0o755)
    scratch = Path(out_dir).parent / "scratch"  # $TMPDIR: where rank 0 stages the slices for all processes
    scratch.mkdir(exist_ok=True)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch),
               "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, env=environ, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(scratch.glob("nodulesynth-training-*"))  # the staged copy is removed at the end
    return proc.stderr


def test_two_processes_train_as_one_and_resume(tmp_path):
    """Two processes at the same global batch and seed train the one-process run's network: the same loss curve
    and weights to float rounding, and a run stopped at step 3 and restarted continues it (here: a first run of
    3 steps, then the same command with max_steps 6, which resumes its checkpoint, as a rerun after a kill does).

    Why they are equal: every process draws the whole step's slices, timesteps, noise and guidance drops from the
    (seed, step) generator and trains its half of them; DDP averages the two halves' gradients, which is the
    gradient of the whole batch. Only the order of float additions differs (a batch of 4 in passes of 1 against
    two of 2 and an all-reduce): the losses agree to float32 rounding (measured: 7e-8 relative; asserted: 1e-6),
    the weights and their EMA to 2e-6 absolute (measured: 2e-7), where six AdamW steps at lr 1e-3 moved them by
    up to 2e-3 (asserted: more than 1e-4, so that the comparison could fail).
    """
    paths = write_chest_stacks(tmp_path / "slices", count=2, n=4)
    one = train_sdm(paths, tmp_path / "one", OPTIONS.replace(max_steps=6), device="cpu")

    two = OPTIONS.replace(gpus=2)
    log = run_rule_command(paths, tmp_path / "two", two.replace(max_steps=3))
    assert "shared by 2 processes (gloo), each 2" in log
    assert len(LossCurve.load(tmp_path / "two" / "loss.tsv").rows) == 3
    log = run_rule_command(paths, tmp_path / "two", two.replace(max_steps=6))
    assert "resumed from" in log and "at step 3" in log
    assert log.count("sdm: ") == 2  # rank 0 alone speaks

    a, b = load_checkpoint(one), load_checkpoint(tmp_path / "two" / "model.pt")
    assert a["step"] == b["step"] == 6 and a["data"] == b["data"]  # the data digest: the same record
    curve_a, curve_b = (LossCurve.load(folder / "loss.tsv").rows for folder in (tmp_path / "one", tmp_path / "two"))
    assert [r["step"] for r in curve_a] == [r["step"] for r in curve_b] == list(range(1, 7))
    for column in ("loss", "mse", "vb"):
        assert torch.allclose(torch.tensor([r[column] for r in curve_b]), torch.tensor([r[column] for r in curve_a]),
                              rtol=1e-6, atol=1e-9), column
    start = build_model(OPTIONS, torch.device("cpu")).state_dict()
    moved = max((a["model"][k] - start[k]).abs().max().item() for k in start)
    worst = 0.0
    for name in ("checkpoint.pt", "model.pt"):  # trained weights and their EMA
        wa = load_checkpoint(tmp_path / "one" / name)["model"]
        wb = load_checkpoint(tmp_path / "two" / name)["model"]
        assert wa.keys() == wb.keys()
        worst = max(worst, *((wa[k] - wb[k]).abs().max().item() for k in wa))
    print(f"largest weight difference {worst:.2e}, largest move from the initial weights {moved:.2e}")
    assert worst <= 2e-6 and moved > 1e-4

    # The model loads as a one-process model does, and samples the same network.
    (model_a, _, _), (model_b, _, options_b) = load_sdm(one, "cpu"), load_sdm(tmp_path / "two" / "model.pt", "cpu")
    assert options_b == two.replace(max_steps=6)
    x, t = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 30])
    cond = torch.nn.functional.one_hot(torch.randint(6, (2, 16, 16)), 6).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        assert torch.allclose(model_a(x, t, cond), model_b(x, t, cond), rtol=1e-5, atol=1e-6)


def test_a_batch_that_does_not_split_over_the_gpus_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"sdm.batch_size 6 is not divisible by sdm.gpus 4"):
        SDMOptions(batch_size=6, gpus=4)
    with pytest.raises(ValueError, match="sdm.gpus must be at least 1"):
        SDMOptions(gpus=0)
    assert SDMOptions(batch_size=32, gpus=4, micro_batch_size=16).micro_batches == [8]  # each GPU's share
    assert SDMOptions(batch_size=32, gpus=2, micro_batch_size=6).micro_batches == [6, 6, 4]


def test_one_gpu_is_the_plain_command_and_a_wrong_process_count_is_refused(tmp_path):
    assert launcher(1) == ""
    assert launcher(4) == "torchrun --standalone --nproc-per-node 4 --no-python"
    assert Ranks.from_environ({}) == Ranks(0, 0, 1)
    ranks = Ranks.from_environ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"})
    assert not ranks.main and ranks.shard(8) == slice(4, 8)
    # One process with sdm.gpus 2 (the launcher forgotten) would wait for ever for the second: it stops, saying how.
    paths = write_chest_stacks(tmp_path / "slices", count=1, n=2)
    with pytest.raises(ValueError, match="sdm.gpus is 2 but 1 process.*torchrun --standalone --nproc-per-node 2"):
        train_sdm(paths, tmp_path / "m", OPTIONS.replace(gpus=2, max_steps=1), device="cpu")
