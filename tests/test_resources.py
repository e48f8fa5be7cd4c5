"""nodulesynth.resources: each job's mem_mb, runtime and disk_mb sized from its input files and the config.

Small stacks and datasets are written by the package's own writers; the LIDC-IDRI-scale files are .npz archives
whose members hold a real .npy header (numpy's writer) over no data: the sizing reads headers only, so a 16 GB
arm dataset is sized from a file of a few hundred bytes, as in a run.
"""

import zipfile

import numpy as np
import pytest
import yaml

from conftest import REPO
from nodulesynth import resources
from nodulesynth.data.slices import SliceStack, save_slices
from nodulesynth.downstream.datasets import ArmDataset, SliceSet, save_dataset
from nodulesynth.labels import NODULE

# Today's fixed values (rules/*.smk before sizing): what a LIDC-IDRI run must exceed.
FIXED_MB = {"downstream_dataset": 4000, "audit": 8000, "realism": 8000, "detect": 16000, "report": 4000}
LIDC_SLICES = 125_000          # lung slices of LIDC-IDRI's 1,018 scans
LIDC_SCANS = 1018


def write_stack(path, n, size=32, nodule_rows=()):
    label = np.zeros((n, size, size), np.uint8)
    for row in nodule_rows:
        label[row, 10:13, 10:13] = NODULE
    has_nodule = (label == NODULE).any((1, 2))
    save_slices(path, SliceStack(np.full((n, size, size), 100, np.uint8), label, np.arange(n, dtype=float),
                                 np.arange(n, dtype=np.int32), has_nodule, scan_id=path.stem, patient_id=path.stem))
    return path


def slice_set(n, size):
    return SliceSet(np.zeros((n, size, size), np.uint8), np.zeros((n, size, size), np.uint8), np.zeros(n, bool),
                    np.zeros((0, 5), np.float32), np.array(["s"] * n), np.array(["p"] * n),
                    np.arange(n, dtype=np.int64), np.array(["real"] * n))


def write_dataset(path, train, test, size):
    save_dataset(path, ArmDataset("A", 0, slice_set(train, size), slice_set(test, size), {}))
    return path


def header_only_npz(path, arrays):
    """An .npz whose members are .npy headers of `arrays` {name: (shape, dtype)} with no data after them."""
    with zipfile.ZipFile(path, "w") as archive:
        for name, (shape, dtype) in arrays.items():
            with archive.open(f"{name}.npy", "w") as fh:
                np.lib.format.write_array_header_1_0(
                    fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                         "shape": tuple(shape)})
    return path


def lidc_stacks(folder, count=LIDC_SCANS, slices=LIDC_SLICES):
    """`count` native 512-px stacks holding `slices` slices together (header only)."""
    folder.mkdir()
    per_scan = slices // count
    return [header_only_npz(folder / f"scan{k:04d}.npz", {"image": ((per_scan, 512, 512), np.uint8),
                                                          "label": ((per_scan, 512, 512), np.uint8)})
            for k in range(count)]


def lidc_dataset(path, size=256):
    """An arm dataset of LIDC-IDRI's fold: 4/5 of the slices train, 1/5 test (header only)."""
    train, test = LIDC_SLICES * 4 // 5, LIDC_SLICES // 5
    return header_only_npz(path, {f"{split}_{what}": ((n, size, size), np.uint8)
                                  for split, n in (("train", train), ("test", test)) for what in ("image", "label")})


def test_headers_give_the_written_shapes_and_name_a_bad_file(tmp_path):
    stack = write_stack(tmp_path / "s.npz", 7, size=24)
    headers = resources.npz_headers(stack)
    assert headers["image"] == ((7, 24, 24), np.dtype(np.uint8))
    assert headers["has_nodule"] == ((7,), np.dtype(bool))
    data = write_dataset(tmp_path / "d.npz", 5, 3, 16)
    assert resources.dataset_slices(data) == {"train": 5, "test": 3, "size": 16}
    assert resources.dataset_slices(tmp_path / "not_yet.npz") == {"train": 0, "test": 0, "size": 0}
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        resources.npz_headers(bad)
    with pytest.raises(ValueError, match="s.npz.*not an arm dataset"):
        resources.dataset_slices(stack)


def test_memory_follows_the_inputs(tmp_path):
    small = [write_stack(tmp_path / f"a{k}.npz", 10, size=64) for k in range(2)]
    large = small + [write_stack(tmp_path / f"b{k}.npz", 400, size=64) for k in range(2)]
    synth = tmp_path / "synth"
    synth.mkdir()
    write_stack(synth / "a0.npz", 300, size=64)
    mb = resources.downstream_dataset_mem_mb
    # the parts and their concatenation (2x), plus the largest stack read and resized (2x its image and label)
    held = (20 + 800) * 2 * 128**2
    assert mb(large, [], 128) == int(np.ceil(resources.PYTHON_MB + resources.HEADROOM
                                             * (2 * held + 2 * 400 * 2 * 64**2) / 2**20))
    assert mb(small, [], 128) < mb(large, [], 128) < mb(large, [synth], 128) < mb(large, [synth], 256)
    assert mb(large, [], 128, attempt=2) > mb(large, [], 128)

    data = write_dataset(tmp_path / "d.npz", 600, 200, 128)
    bigger = write_dataset(tmp_path / "e.npz", 1200, 400, 128)
    assert resources.audit_mem_mb(data, [], 32) < resources.audit_mem_mb(data, [synth], 32) \
        < resources.audit_mem_mb(bigger, [synth], 32)
    assert resources.datasets_mem_mb([data]) < resources.datasets_mem_mb([data, bigger])
    # before the inputs exist (a dry run): the floor
    assert resources.datasets_mem_mb([tmp_path / "missing.npz"]) == int(np.ceil(resources.TORCH_MB))


def test_at_lidc_scale_every_estimate_exceeds_the_fixed_values(tmp_path):
    stacks = lidc_stacks(tmp_path / "slices")
    data = [lidc_dataset(tmp_path / f"{arm}.npz") for arm in "ABC"]
    one_arm = 16e9  # 125k slices x (image + label) at 256 px
    assert resources.datasets_bytes(data[0]) == pytest.approx(one_arm, rel=0.03)
    estimates = {"downstream_dataset": resources.downstream_dataset_mem_mb(stacks, [], 256),
                 "audit": resources.audit_mem_mb(data[0], [], 32),
                 "realism": resources.datasets_mem_mb(data),
                 "detect": resources.datasets_mem_mb(data[:1]),
                 "report": resources.report_mem_mb(data)}
    for rule, fixed in FIXED_MB.items():
        assert estimates[rule] > fixed, (rule, estimates[rule])
    # concatenation doubles the peak: 2 x 16 GB and more
    assert estimates["downstream_dataset"] * 2**20 > 2 * one_arm
    assert estimates["realism"] * 2**20 > 3 * one_arm


def test_audit_runtime_is_its_pairs_at_the_measured_rate(tmp_path):
    data = lidc_dataset(tmp_path / "A.npz")
    train, test = LIDC_SLICES * 4 // 5, LIDC_SLICES // 5
    read = (train + test) * 2 * 256**2 / resources.READ_BYTES_PER_S
    for threads in (1, 4):
        seconds = 1.2e-6 * train * test / threads + read
        assert resources.audit_runtime(data, [], threads) == int(np.ceil(resources.RUNTIME_HEADROOM * seconds / 60))
    # 2.5e9 pairs on one core: some 50 minutes, and 3 to read the dataset; twice that is asked for
    assert 100 < resources.audit_runtime(data, [], 1) < 200
    assert resources.audit_runtime(data, [], 1, attempt=2) == 2 * resources.audit_runtime(data, [], 1)
    assert resources.audit_runtime(tmp_path / "missing.npz", [], 4) == resources.MIN_MINUTES


def test_audit_threads_one_for_a_short_audit_the_rules_for_a_cohort(tmp_path):
    # the demo's fold: ~1,100 training x ~330 test slices and ~170 synthetic, a few seconds on one core
    demo = write_dataset(tmp_path / "demo.npz", 1100, 330, 32)
    synth = tmp_path / "synth"
    synth.mkdir()
    write_stack(synth / "s.npz", 170)
    assert resources.audit_threads(demo, [synth], 4) == 1
    # LIDC: 2.5e9 pairs, some 50 minutes on one core
    assert resources.audit_threads(lidc_dataset(tmp_path / "A.npz"), [], 4) == 4
    # before the dataset exists (a dry run): the rule's
    assert resources.audit_threads(tmp_path / "missing.npz", [], 4) == 4


def test_staging_disk_is_the_staged_slices(tmp_path):
    stacks = [write_stack(tmp_path / f"s{k}.npz", 50, size=64) for k in range(3)]
    assert resources.staging_disk_mb(stacks, 64) == 1024  # the floor
    lidc = lidc_stacks(tmp_path / "lidc", slices=LIDC_SLICES * 4 // 5)  # a fold generator's training scans
    disk = resources.staging_disk_mb(lidc, 256)
    # ~128 KiB a slice at 256 px: 12-13 GB a fold (issue 19: 13-16 GB a fold), with HEADROOM
    assert disk == int(np.ceil(resources.HEADROOM * resources.stack_slices(lidc) * 2 * 256**2 / 2**20))
    assert 12e9 < disk * 2**20 < 17e9


def test_sampled_maps_bound_the_sampling_plan(tmp_path):
    from nodulesynth.models.synthesis import plan_maps

    stacks = [write_stack(tmp_path / "a.npz", 20, nodule_rows=(3, 4, 5)),
              write_stack(tmp_path / "b.npz", 9, nodule_rows=()),
              write_stack(tmp_path / "c.npz", 30, nodule_rows=range(10, 20))]
    for spaced, wanted in ((4, None), (4, 2), (None, None), (2, 0)):
        plans = plan_maps(stacks, 32, 0, "real", spaced, nodule_maps_per_scan=wanted)
        actual = sum(len(indices) for *_, indices, _ in plans)
        estimate = resources.sampled_maps(stacks, {"max_slices_per_scan": spaced, "nodule_maps_per_scan": wanted})
        overlap = 0 if spaced is None else len(stacks) * spaced  # at most every spaced map holds a nodule
        assert actual <= estimate <= actual + overlap, (spaced, wanted)
    assert resources.sampled_maps(stacks, {"max_slices_per_scan": None, "nodule_maps_per_scan": None}) == 59


def study_sections(path=None):
    """The config sections a run validates to (the Snakefile's validate fills in the schema's defaults)."""
    from snakemake.utils import validate

    config = yaml.safe_load(path.read_text()) if path else {}
    validate(config, str(REPO / "schemas" / "config.schema.yaml"))
    return config


def test_gpu_runtimes_grow_with_attempts_and_stay_sane_for_the_demo(tmp_path):
    demo = study_sections(REPO / "config.yaml")
    stacks = [write_stack(tmp_path / f"s{k}.npz", 40, size=128, nodule_rows=(5, 6)) for k in range(12)]
    data = [write_dataset(tmp_path / f"{arm}.npz", 300, 80, 64) for arm in "ABC"]
    for device in ("auto", "cpu"):
        runtimes = {
            "train_sdm": resources.train_sdm_runtime(demo["sdm"], device, 1),
            "sample_sdm": resources.sample_sdm_runtime(demo["sdm"], demo["synthesis"], stacks, device, 1),
            "train_spade": resources.train_spade_runtime(demo["spade"], device, 1),
            "sample_spade": resources.sample_spade_runtime(demo["spade"], demo["synthesis"], stacks, device, 1),
            "detect": resources.detect_runtime(demo["detection"], data[0], device, 1),
            "localize": resources.localize_runtime(demo["localization"], data[0], device, 1),
            "realism": resources.realism_runtime(demo["detection"], data, device, 1),
        }
        # the demo's jobs take seconds to minutes on a CPU: each is asked for the floor up to an hour or two
        for rule, minutes in runtimes.items():
            assert resources.MIN_MINUTES <= minutes <= 120, (device, rule, minutes)
    assert resources.train_sdm_runtime(demo["sdm"], "cpu", 1, attempt=3) \
        == 4 * resources.train_sdm_runtime(demo["sdm"], "cpu", 1)


def test_gpu_runtimes_of_the_study_follow_the_cost_estimate(tmp_path):
    from nodulesynth import cost
    from nodulesynth.models.spade.options import SPADEOptions

    study = study_sections()
    spade = SPADEOptions.from_config(study["spade"])
    seconds = cost.train_spade_flops(spade) / cost.achieved_rates()[cost.precision(spade)]
    minutes = resources.train_spade_runtime(study["spade"], "auto", 8)
    assert minutes == int(np.ceil(resources.GPU_START_MINUTES + resources.RUNTIME_HEADROOM * seconds / 60))
    # the SDM on sdm.gpus GPUs: the steps are shared (start-up is not)
    one, four = (resources.train_sdm_runtime({**study["sdm"], "gpus": n}, "auto", 8) for n in (1, 4))
    assert four - resources.GPU_START_MINUTES == pytest.approx((one - resources.GPU_START_MINUTES) / 4, abs=1)
    # the same job on CPU cores is given its (much longer) CPU time
    assert resources.train_spade_runtime(study["spade"], "cpu", 8) > 20 * minutes
    # sampling grows with the maps the stacks give
    stacks = lidc_stacks(tmp_path / "lidc")
    for path in stacks:  # has_nodule is read as data: 5 % of each scan's slices hold a nodule
        n = resources.npz_headers(path)["image"][0][0]
        with zipfile.ZipFile(path, "a") as archive, archive.open("has_nodule.npy", "w") as fh:
            np.lib.format.write_array(fh, np.arange(n) % 20 == 0)
    few = resources.sample_sdm_runtime(study["sdm"], study["synthesis"], stacks[:10], "auto", 8)
    many = resources.sample_sdm_runtime(study["sdm"], study["synthesis"], stacks, "auto", 8)
    assert few < many and isinstance(many, int)
    # the paper's sampler on every lung slice (issue 17: 51-633 h a fold) is far beyond the fixed 12 h
    paper = {**study["sdm"], "sampler": "ddpm", "sample_steps": 1000}
    every = {**study["synthesis"], "max_slices_per_scan": None}
    assert resources.sample_sdm_runtime(paper, every, stacks, "auto", 8) > 50 * 60


# Each rule that retries, read from the workflow as Snakemake parses it: its mem_mb and runtime for attempts 1 and 2,
# the callables given inputs not written yet (which sizing counts as empty, as in a dry run).
RULE_RESOURCES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.iocontainers import Namedlist, Wildcards
from snakemake.settings.types import OutputSettings, ResourceSettings

def value(resource, rule, attempt):
    inputs = Namedlist(fromdict={name: "not-written-yet" for name in rule.input._names})
    wildcards = Wildcards(fromdict={"generator": "sdm", "fold": "0", "task": "detection", "arm": "A"})
    return resource.evaluate(wildcards=wildcards, input=inputs, attempt=attempt, threads=1).value

with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(cores=2), snakefile=Path(sys.argv[1]) / "Snakefile",
                            workdir=Path.cwd())._workflow
    print(json.dumps({rule.name: {key: [value(rule.resources[key], rule, a) for a in (1, 2)]
                                  for key in ("mem_mb", "runtime")}
                      for rule in workflow.rules if rule._restart_times}))
"""


def test_every_retry_asks_for_more_memory_and_time(tmp_path):
    """A retried job was most likely killed for memory or time: asking the same again fails the same way."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", RULE_RESOURCES, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rules = json.loads(done.stdout.splitlines()[-1])
    assert {"train_generator", "sample_generator", "downstream_model", "audit"} <= set(rules)
    for name, asked in rules.items():
        for key, (first, retry) in asked.items():
            assert retry > first, (name, key, first, retry)
