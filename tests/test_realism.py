"""Feature-space realism, class-matched: a "synthetic" set that is in truth real nodule slices (of other patients)
must score about what real training slices score (the floor), while a class-blind comparison against all test
slices, mostly nodule-free, puts the very same set far above it. A tiny classifier trained through
`run_detection` (the rules' code path) gives the feature space."""

import numpy as np
import pytest

from nodulesynth.downstream.datasets import ArmDataset, SliceSet
from nodulesynth.downstream.detection import detection_features, run_detection
from nodulesynth.downstream.metrics import frechet_distance
from nodulesynth.downstream.realism import matched_draws, realism_distances
from nodulesynth.labels import NODULE
from test_detection import SIZE, synthetic_slices, tiny_options

FACTOR = 2.0  # a real set offered as synthetic must stay within this factor of the floor


def large_nodule_slices(n_positive, n_negative, seed) -> SliceSet:
    """synthetic_slices with a second, large nodule (radius 10 px) in the left lung of each nodule slice: large
    enough that a barely trained network's features tell nodule from nodule-free slices, as the study's trained
    classifier's do."""
    slices = synthetic_slices(n_positive, n_negative, seed)
    rng = np.random.default_rng([seed, 1])
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for row in range(n_positive):
        cx, cy = rng.integers(40, 46), rng.integers(24, 40)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 10 ** 2
        slices.image[row][disc], slices.label[row][disc] = 230, NODULE
    return slices


def as_source(slices: SliceSet, source: str, patient_prefix: str) -> SliceSet:
    slices.source = np.full(len(slices), source)
    slices.patient_id = np.array([f"{patient_prefix}{p}" for p in slices.patient_id])
    return slices


@pytest.fixture(scope="module")
def fold(tmp_path_factory, one_thread):
    """One fold's arms: test slices 20 % nodule slices (as the real fold's are mostly nodule-free); arm A's real
    training slices alike; arm C adds "SDM" slices that are real nodule slices of other patients (a perfect
    generator), arm B "SPADE" slices that are the same kind of slices with inverted grey values (a poor one)."""
    test = large_nodule_slices(12, 48, seed=2)
    real = large_nodule_slices(14, 50, seed=1)
    perfect = as_source(large_nodule_slices(24, 0, seed=3), "sdm", "c")
    poor = as_source(large_nodule_slices(24, 0, seed=4), "spade", "b")
    poor.image = 255 - poor.image
    arms = [ArmDataset("A", 0, real, test, {}), ArmDataset("B", 0, SliceSet.concatenate([real, poor]), test, {}),
            ArmDataset("C", 0, SliceSet.concatenate([real, perfect]), test, {})]
    work = tmp_path_factory.mktemp("realism")
    options = tiny_options(epochs=1, iters_per_epoch=3)
    run_detection(arms[0], options, work, device="cpu")
    return arms, work / "model.pth", options


def test_real_nodule_slices_offered_as_synthetic_score_near_the_floor(fold):
    arms, model, options = fold
    distances = realism_distances(model, options, arms, device="cpu")
    # every set drawn to the smallest nodule set's count: the 12 real test nodule slices
    assert distances["n_nodule"] == 12
    assert (distances["n_nodule_available_real_test"], distances["n_nodule_available_real_train"],
            distances["n_nodule_available_sdm"], distances["n_nodule_available_spade"]) == (12, 14, 24, 24)
    assert not any(key.startswith(("fd_nodule_free", "n_nodule_free")) for key in distances)  # no synthetic ones
    floor = distances["fd_nodule_real_train"]
    assert floor > 0
    assert distances["fd_nodule_sdm"] < FACTOR * floor, distances
    assert distances["fd_nodule_spade"] > 3 * distances["fd_nodule_sdm"], distances  # it still tells poor from good
    # The class-blind comparison this replaces (all test slices against each whole set) puts the perfect set far
    # above its floor: it measures the class mix, not realism.
    reference = detection_features(model, options, arms[0].test.image, device="cpu")
    blind_floor = frechet_distance(reference, detection_features(model, options, arms[0].train.image, device="cpu"))
    perfect = arms[2].train.image[arms[2].train.source == "sdm"]
    blind = frechet_distance(reference, detection_features(model, options, perfect, device="cpu"))
    assert blind > 3 * FACTOR * blind_floor, (blind, blind_floor)


def test_nodule_free_synthetic_slices_are_compared_with_nodule_free_ones(fold):
    arms, model, options = fold
    with_free = as_source(synthetic_slices(4, 6, seed=5), "sdm", "c")
    arm_c = ArmDataset("C", 0, SliceSet.concatenate([arms[0].train, with_free]), arms[0].test, {})
    distances = realism_distances(model, options, [arms[0], arm_c], device="cpu")
    assert (distances["n_nodule"], distances["n_nodule_free"]) == (4, 6)
    assert distances["n_nodule_free_available_real_test"] == 48
    assert {"fd_nodule_free_real_train", "fd_nodule_free_sdm"} <= set(distances)
    assert "fd_nodule_spade" not in distances
    assert all(np.isfinite(distances[k]) for k in distances if k.startswith("fd_"))


def test_too_few_slices_give_null_distances_and_no_generator_is_an_error(fold):
    arms, model, options = fold
    one = as_source(synthetic_slices(1, 0, seed=6), "sdm", "c")
    arm_c = ArmDataset("C", 0, SliceSet.concatenate([arms[0].train, one]), arms[0].test, {})
    distances = realism_distances(model, options, [arms[0], arm_c], device="cpu")
    assert distances["n_nodule"] == 1 and distances["fd_nodule_sdm"] is None
    assert distances["fd_nodule_real_train"] is None
    with pytest.raises(ValueError, match="no synthetic slices"):
        realism_distances(model, options, [arms[0]], device="cpu")
    with pytest.raises(ValueError, match="one fold"):
        realism_distances(model, options, [arms[0], ArmDataset("C", 1, arms[0].train, arms[0].test, {})],
                          device="cpu")


def test_matched_draws_take_the_smallest_count_from_every_set():
    n, draws = matched_draws({"real_test": 5, "real_train": 9, "sdm": 30}, seed=[0, 1, 0])
    assert n == 5 and {k: len(v) for k, v in draws.items()} == {"real_test": 5, "real_train": 5, "sdm": 5}
    assert draws["real_test"].tolist() == [0, 1, 2, 3, 4]  # the smallest set whole
    assert len(set(draws["sdm"].tolist())) == 5 and draws["sdm"].max() < 30  # without replacement
    again = matched_draws({"real_test": 5, "real_train": 9, "sdm": 30}, seed=[0, 1, 0])[1]
    assert all(np.array_equal(draws[k], again[k]) for k in draws)
    other = matched_draws({"real_test": 5, "real_train": 9, "sdm": 30}, seed=[0, 2, 0])[1]
    assert not np.array_equal(draws["sdm"], other["sdm"])
