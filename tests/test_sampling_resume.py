"""Sampling that finishes: a killed sampling job's finished stacks are kept (outside the rule's output folder,
which Snakemake removes on failure) and a rerun samples only the rest, giving what an unbroken run gives."""

import numpy as np
import pytest

from nodulesynth.data.slices import SliceStack, load_slices, save_slices
from nodulesynth.labels import BODY, LEFT_LUNG, NODULE
from nodulesynth.models.synthesis import plan_maps, scan_seed, staging_dir, write_synthetic

SIZE = 32


class Killed(Exception):
    """Stands for the job's end (an out-of-memory kill, a node lost) in the middle of a stack."""


def write_scans(folder, n_scans=4):
    paths = []
    for k in range(n_scans):
        label = np.full((6, SIZE, SIZE), BODY, np.uint8)
        label[:, 4:20, 4:20] = LEFT_LUNG
        label[k % 6, 8:11, 8:11] = NODULE
        image = np.random.default_rng(k).integers(0, 255, label.shape, dtype=np.uint8)
        path = folder / f"S{k}.npz"
        save_slices(path, SliceStack(image, label, np.arange(6, dtype=float), np.arange(6), (label == NODULE).any((1, 2)),
                                     f"S{k}", f"P{k}"))
        paths.append(path)
    return paths


class Generator:
    """A stand-in network: noise seeded per scan and map (as the samplers are), recording the batches it is given."""

    def __init__(self, kill_at_scan=None):
        self.kill_at_scan, self.batches = kill_at_scan, []

    @property
    def calls(self):
        return [scan_id for batch in self.batches for scan_id, _ in batch]

    def __call__(self, labels, keys):
        if any(scan_id == self.kill_at_scan for scan_id, _ in keys):
            raise Killed(self.kill_at_scan)
        self.batches.append(list(keys))
        noise = [np.random.default_rng(scan_seed(7, scan_id, index)).integers(0, 30, labels.shape[1:])
                 for scan_id, index in keys]
        return (labels.numpy() * 40 + np.stack(noise)).astype(np.uint8)


EXTRA = {"generator": "sdm", "generator_fold": "0", "model_sha256": "ab" * 32, "sampler": "ddpm"}


def sample(paths, out_dir, generator, extra=EXTRA, batch_size=4):
    return write_synthetic(plan_maps(paths, SIZE, seed=0, max_slices_per_scan=3), out_dir, SIZE, batch_size,
                           generator, extra, "test sampling")


def test_a_killed_sampling_run_resumes_and_equals_an_unbroken_one(tmp_path):
    paths = write_scans(tmp_path)
    unbroken = sample(paths, tmp_path / "unbroken" / "0", Generator())

    out_dir = tmp_path / "synth" / "0"
    with pytest.raises(Killed):
        sample(paths, out_dir, Generator(kill_at_scan="S2"))
    # Nothing in the output folder (Snakemake would remove it anyway); the finished stack is kept beside it. Batches
    # of 4 run across scans of 3 maps: [S0 S0 S0 S1] [S1 S1 S2 S2] ... - the kill came in the second, so S1 is lost.
    assert not out_dir.exists()
    assert sorted(p.name for p in staging_dir(out_dir).glob("*.npz")) == ["S0.npz"]

    rerun = Generator()
    written = sample(paths, out_dir, rerun)
    assert rerun.calls and set(rerun.calls) == {"S1", "S2", "S3"}  # S0 was not sampled again
    assert not staging_dir(out_dir).exists()
    assert [p.name for p in written] == [p.name for p in unbroken]
    for mine, theirs in zip(written, unbroken):
        a, b = load_slices(mine), load_slices(theirs)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
        np.testing.assert_array_equal(a.slice_index, b.slice_index)


def test_stacks_of_another_model_or_setting_are_sampled_again(tmp_path):
    paths = write_scans(tmp_path, n_scans=2)
    out_dir = tmp_path / "synth" / "0"
    with pytest.raises(Killed):
        sample(paths, out_dir, Generator(kill_at_scan="S1"))
    other = Generator()
    sample(paths, out_dir, other, extra={**EXTRA, "model_sha256": "cd" * 32})  # the generator was retrained
    assert set(other.calls) == {"S0", "S1"}
    # A half-written or unreadable leftover is no finished stack either.
    with pytest.raises(Killed):
        sample(paths, out_dir, Generator(kill_at_scan="S1"))
    (staging_dir(out_dir) / "S0.npz").write_bytes(b"PK\x03\x04 truncated")
    again = Generator()
    sample(paths, out_dir, again)
    assert set(again.calls) == {"S0", "S1"}



def test_stacks_sampled_from_other_maps_are_sampled_again(tmp_path):
    """Settings that choose the maps (synthesis.nodule_maps_per_scan) and the input maps themselves change what a
    stack holds without changing the model or its sampling settings: a leftover of the killed run must not stay."""
    paths = write_scans(tmp_path, n_scans=3)
    out_dir = tmp_path / "synth" / "0"
    with pytest.raises(Killed):
        sample(paths, out_dir, Generator(kill_at_scan="S2"), batch_size=3)
    assert sorted(p.name for p in staging_dir(out_dir).glob("*.npz")) == ["S0.npz", "S1.npz"]

    # The rerun plans every nodule map beside the 3 evenly spaced ones (slices 0, 2, 5): S1's nodule (slice 1)
    # adds a map, so its leftover is not what the rerun plans; S0's nodule (slice 0) was planned already.
    rerun = Generator()
    written = write_synthetic(plan_maps(paths, SIZE, seed=0, max_slices_per_scan=3, nodule_maps_per_scan=None),
                              out_dir, SIZE, 3, rerun, EXTRA, "test sampling")
    assert set(rerun.calls) == {"S1", "S2"}
    planned = plan_maps(paths, SIZE, seed=0, max_slices_per_scan=3, nodule_maps_per_scan=None)
    for path, (_, _, indices, maps) in zip(written, planned):
        np.testing.assert_array_equal(load_slices(path).label, maps)
        np.testing.assert_array_equal(load_slices(path).extra["source_index"], indices)

    # The input stack's maps rewritten (same slices, its nodule gone) between the kill and the rerun.
    out_dir = tmp_path / "synth" / "1"
    with pytest.raises(Killed):
        sample(paths, out_dir, Generator(kill_at_scan="S2"), batch_size=3)
    stack = load_slices(paths[0])
    stack.label[stack.label == NODULE] = LEFT_LUNG
    stack.has_nodule[:] = False
    save_slices(paths[0], stack)
    again = Generator()
    written = sample(paths, out_dir, again, batch_size=3)
    assert set(again.calls) == {"S0", "S2"}  # S1's leftover is still what the rerun plans
    assert not (load_slices(written[0]).label == NODULE).any()

def test_the_studys_defaults_sample_only_the_maps_it_uses_with_a_few_step_sampler(tmp_path):
    """Schema defaults (what a user's config gets): every nodule map plus 4 evenly spaced maps per scan, not every
    lung slice; SDE-DPM-Solver++(2M) at 25 steps, the paper's DDPM-1000 one key away."""
    import yaml

    from conftest import REPO
    from nodulesynth.models.sdm.options import SDMOptions

    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())["properties"]
    synthesis = {k: v["default"] for k, v in schema["synthesis"]["properties"].items()}
    sdm = schema["sdm"]["properties"]
    assert (sdm["sampler"]["default"], sdm["sample_steps"]["default"]) == ("dpmpp_2m_sde", 25)
    assert (SDMOptions().sampler, SDMOptions().sample_steps) == ("dpmpp_2m_sde", 25)
    assert SDMOptions.from_config({"sampler": "ddpm", "sample_steps": 1000}).sample_steps == 1000

    label = np.full((40, SIZE, SIZE), BODY, np.uint8)
    label[:, 4:20, 4:20] = LEFT_LUNG
    label[[5, 6, 7, 30], 8:11, 8:11] = NODULE
    save_slices(tmp_path / "S.npz", SliceStack(np.zeros_like(label), label, np.arange(40, dtype=float), np.arange(40),
                                               (label == NODULE).any((1, 2)), "S", "P"))
    plans = plan_maps([tmp_path / "S.npz"], SIZE, seed=0, max_slices_per_scan=synthesis["max_slices_per_scan"],
                      nodule_maps_per_scan=synthesis["nodule_maps_per_scan"])
    (_, _, indices, maps), = list(plans)
    assert {5, 6, 7, 30} <= set(indices.tolist()) and len(indices) <= 4 + 4  # every nodule map, a few others


def test_batches_run_across_scans_and_the_images_do_not_depend_on_the_batch_size(tmp_path):
    paths = write_scans(tmp_path, n_scans=4)  # 3 maps each: 12 maps
    by_four, one_by_one = Generator(), Generator()
    written = sample(paths, tmp_path / "four" / "0", by_four)
    single = sample(paths, tmp_path / "one" / "0", one_by_one, batch_size=1)
    assert [len(batch) for batch in by_four.batches] == [4, 4, 4]  # full batches, not [3, 3, 3, 3] per scan
    assert by_four.batches[0] == [("S0", 0), ("S0", 1), ("S0", 2), ("S1", 0)]
    assert len(one_by_one.batches) == 12
    for mine, theirs in zip(written, single):
        np.testing.assert_array_equal(load_slices(mine).image, load_slices(theirs).image)
