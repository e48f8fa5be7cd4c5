"""The leakage audit on small real inputs built from the demo phantoms: an honest layout passes every
check, and each planted fault (a resized or noised copy of a test slice among the synthetic slices, a
patient on both sides, a generator trained on a test patient, a synthetic stack drawn from a test
patient's map) fails the right check, naming the file."""

import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO

from nodulesynth.commands.generators import record_training_scans
from nodulesynth.data.slices import load_slices, save_slices
from nodulesynth.downstream.audit import (LeakageError, assert_clean, audit, best_matches, image_features,
                                          view_features, write_audit)
from nodulesynth.downstream.datasets import ARMS, ArmDataset, SliceSet, save_dataset
from nodulesynth.io import read_tsv, write_tsv
from nodulesynth.labels import NODULE
from nodulesynth.models.synthesis import generator_provenance, plan_maps, scan_seed, write_synthetic

SIZE = 64          # the datasets' size (the demo generators' image_size)
K = 3              # folds: two of the six phantoms each
SYNTH_PER_SCAN = 6
# The demo config's threshold: the phantoms are one anatomy, too alike for the study's (calibrated on real CT,
# see test_near_duplicate_threshold_on_the_real_series).
DEMO_THRESHOLD = yaml.safe_load((REPO / "config.yaml").read_text())["downstream"]["near_duplicate_threshold"]
# Grey level per label (background, lungs, trachea, body, nodule): synthetic slices painted from their
# maps stand in for a generator's output; the audit checks where slices come from, not how they look.
PAINT = np.array([0, 30, 30, 10, 130, 150], np.float32)


def resize(images, size=SIZE, interpolation=cv2.INTER_AREA):
    return np.stack([cv2.resize(i, (size, size), interpolation=interpolation) for i in images])


def paint(labels, keys):
    noise = [np.random.default_rng(scan_seed(0, scan_id, index)).normal(0, 6, labels.shape[1:])
             for scan_id, index in keys]
    return np.clip(PAINT[labels.numpy()] + np.stack(noise), 0, 255).astype(np.uint8)


def slice_set(stacks, source):
    """A SliceSet of whole stacks at SIZE (labels by nearest neighbour)."""
    stacks = [s for s in stacks if len(s)]
    images = np.concatenate([resize(s.image) if s.image.shape[-1] != SIZE else s.image for s in stacks])
    labels = np.concatenate([resize(s.label, interpolation=cv2.INTER_NEAREST) for s in stacks])
    n = [len(s) for s in stacks]
    return SliceSet(images, labels, (labels == NODULE).any((1, 2)), np.zeros((0, 5), np.float32),
                    np.repeat([s.scan_id for s in stacks], n), np.repeat([s.patient_id for s in stacks], n),
                    np.concatenate([np.asarray(s.slice_index, np.int64) for s in stacks]), np.repeat(source, sum(n)))


def build_dataset(path, arm, fold, real, folds, synth_dir):
    train_ids = set(folds.patient_id[folds.fold != fold])
    parts = [slice_set([s for s in real if s.patient_id in train_ids], "real")]
    if ARMS[arm]:
        parts.append(slice_set([load_slices(p) for p in sorted(synth_dir.glob("*.npz"))], ARMS[arm]))
    test = slice_set([s for s in real if s.patient_id not in train_ids], "real")
    save_dataset(path, ArmDataset(arm, fold, SliceSet.concatenate(parts), test, {}))


@pytest.fixture(scope="module")
def honest(demo_processed, tmp_path_factory):
    """Folds, manifest, generators (with the real training_scans.tsv writer), synthetic stacks (through
    the real plan_maps/write_synthetic) and arm datasets (save_dataset) of 3 folds, leak-free."""
    root = tmp_path_factory.mktemp("audit")
    patients = [g.patient_id for g, _, _, _ in demo_processed]
    folds = pd.DataFrame({"patient_id": patients, "fold": [i % K for i in range(len(patients))]})
    write_tsv(folds, root / "folds.tsv")
    manifest = pd.DataFrame([dict(scan_id=stack.scan_id, patient_id=g.patient_id, series_uid=g.series_uid,
                                  slices=len(stack), spacing="2.5,0.7,0.7", status="ok") for g, _, stack, _ in demo_processed])
    write_tsv(manifest, root / "manifest.tsv")
    paths = {g.patient_id: path for g, path, _, _ in demo_processed}
    real = [stack for _, _, stack, _ in demo_processed]
    generators, synth, datasets = {}, {}, {}
    for model in ("sdm", "spade"):
        for fold in [str(k) for k in range(K)] + ["holdout"]:
            train = [paths[p] for p, f in zip(folds.patient_id, folds.fold) if str(f) != fold]
            generators[model, fold] = root / "generators" / model / fold
            record_training_scans(train, generators[model, fold])
            # the painter's stand-in for a model file: its bytes differ per generator, as trained models' do
            (generators[model, fold] / "model.pt").write_bytes(f"paint {model} {fold}".encode())
            synth[model, fold] = root / "synth" / model / fold
            write_synthetic(plan_maps(train, SIZE, seed=1, max_slices_per_scan=SYNTH_PER_SCAN), synth[model, fold],
                            SIZE, 16, paint, generator_provenance(model, fold, generators[model, fold] / "model.pt"),
                            f"paint {model} {fold}")
    for k in range(K):
        for arm, model in ARMS.items():
            datasets[arm, k] = root / "downstream" / "data" / arm / f"fold{k}.npz"
            build_dataset(datasets[arm, k], arm, k, real, folds, synth.get((model, str(k))))
    return dict(root=root, folds=folds, real=real, paths=paths, generators=generators, synth=synth,
                datasets=datasets)


def run_audit(inputs, **changes):
    kw = dict(generator_dirs=inputs["generators"], synth_dirs=inputs["synth"], dataset_paths=inputs["datasets"],
              threshold=DEMO_THRESHOLD)
    kw.update(changes)
    return audit(inputs["root"] / "folds.tsv", inputs["root"] / "manifest.tsv", **kw)


def failures(table):
    return table[table.status == "fail"].set_index("check").detail.to_dict()


def test_honest_layout_passes_every_check(honest, tmp_path):
    table = run_audit(honest)
    assert set(table.status) == {"pass"}, failures(table)
    names = {c.split(" (")[0] for c in table.check}
    assert names == {"generator_training", "synthetic_sources", "synthetic_generator", "patients_disjoint",
                     "series_disjoint", "split_follows_folds", "synthetic_provenance", "near_duplicates"}
    # one row per check and scope: 8 generators, 2 checks x 8 synthetic directories, 5 checks x 9 datasets
    assert len(table) == 8 + 2 * 8 + 5 * 9 and table.check.is_unique
    # The demo phantoms are one anatomy shifted per patient: the highest score between two patients' slices
    # (and a synthetic slice and a test patient's) stays below the calibrated threshold.
    highest = table[table.check.str.startswith("near_duplicates")].detail.str.extract(r"score ([0-9.]+)")[0]
    print(f"highest train-test score between demo patients: {highest.astype(float).max():.4f}")
    assert highest.notna().all() and highest.astype(float).max() < DEMO_THRESHOLD
    write_audit(table, tmp_path / "leakage.tsv")
    pd.testing.assert_frame_equal(read_tsv(tmp_path / "leakage.tsv"), table)
    assert_clean(table, tmp_path / "leakage.tsv")



def test_a_several_fold_audit_checks_each_fold_as_its_own_audit_does(honest):
    """One audit over every fold gives each fold's rows exactly as an audit of that fold alone: nothing (the
    near-duplicate bank's size, features) carries over from one fold to the next."""
    together = set(run_audit(honest).itertuples(index=False))
    for k in range(K):
        alone = run_audit(honest, dataset_paths={key: path for key, path in honest["datasets"].items() if key[1] == k})
        missing = set(alone.itertuples(index=False)) - together
        assert not missing, f"fold {k}: rows of its own audit that the several-fold audit reads otherwise: {missing}"

def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resized_and_noised_copies_of_test_slices_among_synthetic_slices_fail(honest, tmp_path):
    # Fold 0's SDM stacks get two of their images replaced by copies of test slices: one resized from the
    # scan's 128 px to 64 and back before it was brought to the datasets' size, one lightly noised (sd 4 grey
    # levels). Stacks and dataset agree (as in a pipeline that wrote such copies as synthetic output), so only
    # the image comparison can catch them.
    folds, real = honest["folds"], honest["real"]
    victim = next(s for s in real if s.patient_id in set(folds.patient_id[folds.fold == 0]))
    a, b = len(victim) // 2, len(victim) // 3
    full = victim.image.shape[-1]
    halved = cv2.resize(cv2.resize(victim.image[a], (full // 2, full // 2), interpolation=cv2.INTER_LINEAR),
                        (full, full), interpolation=cv2.INTER_LINEAR)
    halved = resize(halved[None])[0]
    noised = resize(victim.image[b][None])[0] + np.random.default_rng(0).normal(0, 4, (SIZE, SIZE))
    noised = np.clip(noised, 0, 255).astype(np.uint8)

    synth_dir = copy_dir(honest["synth"]["sdm", "0"], tmp_path / "synth_sdm_0")
    stack_path = sorted(synth_dir.glob("*.npz"))[0]
    stack = load_slices(stack_path)
    stack.image = stack.image.copy()
    stack.image[0], stack.image[1] = halved, noised
    save_slices(stack_path, stack)
    dataset = tmp_path / "C_fold0.npz"
    build_dataset(dataset, "C", 0, real, folds, synth_dir)

    table = run_audit(honest, synth_dirs={**honest["synth"], ("sdm", "0"): synth_dir},
                      dataset_paths={**honest["datasets"], ("C", 0): dataset})
    failed = failures(table)
    assert list(failed) == ["near_duplicates (arm C, fold 0)"]
    detail = failed["near_duplicates (arm C, fold 0)"]
    assert str(dataset) in detail
    for k in (a, b):
        assert f"(scan {victim.scan_id}, slice {int(victim.slice_index[k])}, as is)" in detail
    assert f"scan {stack.scan_id}, slice {int(stack.slice_index[0])}, source sdm" in detail
    assert f"scan {stack.scan_id}, slice {int(stack.slice_index[1])}, source sdm" in detail
    with pytest.raises(LeakageError, match=r"leakage\.tsv.*\n- near_duplicates \(arm C, fold 0\): .*C_fold0\.npz"):
        assert_clean(table, tmp_path / "leakage.tsv")


def test_patient_on_both_sides_of_a_fold_fails(honest, tmp_path):
    folds, real = honest["folds"], honest["real"]
    leaked = folds.patient_id[folds.fold == 1].iloc[0]
    stack = next(s for s in real if s.patient_id == leaked)
    dataset_path = tmp_path / "A_fold1.npz"
    train_ids = set(folds.patient_id[folds.fold != 1])
    # the patient's even slices go to training, its odd ones stay in the test set
    leaked_rows = slice_set([stack], "real")
    train = SliceSet.concatenate([slice_set([s for s in real if s.patient_id in train_ids], "real"),
                                  leaked_rows.subset(np.flatnonzero(leaked_rows.slice_index % 2 == 0))])
    test = slice_set([s for s in real if s.patient_id not in train_ids], "real")
    test = test.subset(np.flatnonzero((test.patient_id != leaked) | (test.slice_index % 2 == 1)))
    save_dataset(dataset_path, ArmDataset("A", 1, train, test, {}))

    failed = failures(run_audit(honest, dataset_paths={**honest["datasets"], ("A", 1): dataset_path}))
    for check in ("patients_disjoint", "series_disjoint", "split_follows_folds"):
        detail = failed[f"{check} (arm A, fold 1)"]
        assert str(dataset_path) in detail
    assert f"patient {leaked}:" in failed["patients_disjoint (arm A, fold 1)"]
    even, odd = (sorted(stack.slice_index[stack.slice_index % 2 == parity]) for parity in (0, 1))
    assert f"train slices ({stack.scan_id}:{even[0]}," in failed["patients_disjoint (arm A, fold 1)"]
    assert f"test slices ({stack.scan_id}:{odd[0]}," in failed["patients_disjoint (arm A, fold 1)"]
    assert f"train patient {leaked} is in fold 1" in failed["split_follows_folds (arm A, fold 1)"]
    assert not any("arm B" in c or "arm C" in c or "generator" in c for c in failed)


def test_generator_trained_on_a_test_patient_fails(honest, tmp_path):
    folds = honest["folds"]
    leaked = folds.patient_id[folds.fold == 2].iloc[-1]
    generator = copy_dir(honest["generators"]["spade", "2"], tmp_path / "spade_2")
    record_training_scans(list(honest["paths"].values()), generator)  # every patient, test ones included

    failed = failures(run_audit(honest, generator_dirs={**honest["generators"], ("spade", "2"): generator}))
    assert list(failed) == ["generator_training (spade, fold 2)"]
    detail = failed["generator_training (spade, fold 2)"]
    assert str(generator / "training_scans.tsv") in detail and f"test patient {leaked}" in detail


def test_synthetic_stack_from_a_test_patient_fails(honest, tmp_path):
    folds = honest["folds"]
    leaked = folds.patient_id[folds.fold == 2].iloc[0]
    synth_dir = copy_dir(honest["synth"]["sdm", "2"], tmp_path / "sdm_2")
    write_synthetic(plan_maps([honest["paths"][leaked]], SIZE, seed=1, max_slices_per_scan=3), synth_dir, SIZE, 16,
                    paint, generator_provenance("sdm", "2", honest["generators"]["sdm", "2"] / "model.pt"),
                    "paint from a test patient")

    failed = failures(run_audit(honest, synth_dirs={**honest["synth"], ("sdm", "2"): synth_dir}))
    assert list(failed) == ["synthetic_sources (sdm, fold 2)"]
    detail = failed["synthetic_sources (sdm, fold 2)"]
    assert str(synth_dir / f"{leaked}.npz") in detail and f"patient {leaked} (test patient)" in detail


def test_synthetic_slices_not_from_the_folds_generator_fail(honest):
    # Arm C of fold 1 pointed at fold 0's SDM stacks: those are not the slices fold 1's generator made.
    failed = failures(run_audit(honest, synth_dirs={**honest["synth"], ("sdm", "1"): honest["synth"]["sdm", "0"]}))
    assert "synthetic_provenance (arm C, fold 1)" in failed
    assert str(honest["datasets"]["C", 1]) in failed["synthetic_provenance (arm C, fold 1)"]
    assert "made by sdm fold 0, not sdm fold 1" in failed["synthetic_generator (sdm, fold 1)"]


def test_samples_enlarged_to_a_larger_study_are_matched_exactly_and_a_swapped_one_fails(honest, tmp_path):
    """A study larger than its generators (the demo: 64-px samples in a 128-px study) holds the samples as
    build_arm_dataset enlarges them (synthetic_slices); the provenance check enlarges the generator's stacks
    alike and finds each slice's very image (here at threshold 1.0, where no near match can stand in), and
    still fails a slice that carries another slice's image."""
    from nodulesynth.data.slices import resize_slices
    from nodulesynth.downstream.datasets import load_dataset, synthetic_slices

    big, fold = 2 * SIZE, 1
    dataset = load_dataset(honest["datasets"]["C", fold])

    def enlarged(part):
        image, label = resize_slices(part.image, part.label, big)
        return SliceSet(image, label, part.has_nodule, part.boxes * [1, 2, 2, 2, 2], part.scan_id, part.patient_id,
                        part.slice_index, part.source)

    real = dataset.train.subset(np.flatnonzero(dataset.train.source.astype(str) == "real"))
    samples = SliceSet.concatenate([synthetic_slices(load_slices(p), "sdm", big)
                                    for p in sorted(honest["synth"]["sdm", str(fold)].glob("*.npz"))])
    path = tmp_path / "C" / f"fold{fold}.npz"
    save_dataset(path, ArmDataset("C", fold, SliceSet.concatenate([enlarged(real), samples]),
                                  enlarged(dataset.test), {}))
    memorisation = []
    table = run_audit(honest, dataset_paths={("C", fold): path}, threshold=1.0, memorisation_out=memorisation)
    assert set(table.status) == {"pass"}, failures(table)
    assert len(memorisation[0]) == len(samples) and memorisation[0].to_train.between(-1, 1).all()

    swapped = samples.image.copy()
    swapped[0] = samples.image[1]
    samples.image = swapped
    save_dataset(path, ArmDataset("C", fold, SliceSet.concatenate([enlarged(real), samples]),
                                  enlarged(dataset.test), {}))
    failed = failures(run_audit(honest, dataset_paths={("C", fold): path}, threshold=1.0))
    assert "1 sdm slices differ from the image" in failed["synthetic_provenance (arm C, fold 1)"]


def test_holdout_samples_copied_into_a_fold_fail(honest, tmp_path, one_thread):
    # A real (untrained, tiny) SPADE as the holdout generator, sampled by nodulesynth.models.spade.sample_spade on the maps of fold 0's
    # training patients, its stacks put in fold 0's SPADE folder in place of that fold's own and arm B's
    # dataset rebuilt from them: patients, sources and the dataset's images all agree, only the record of
    # the generator that made the stacks tells that the holdout generator (trained on fold 0's test
    # patients too) made them.
    from nodulesynth.io import file_sha256
    from nodulesynth.models.checkpoints import save_checkpoint
    from nodulesynth.models.spade import SPADEOptions, sample_spade
    from nodulesynth.models.spade.train import FORMAT, build_generator

    folds, real = honest["folds"], honest["real"]
    holdout = copy_dir(honest["generators"]["spade", "holdout"], tmp_path / "spade_holdout")
    options = SPADEOptions(image_size=SIZE, ngf=8, ndf=8, spade_hidden=8)
    save_checkpoint(holdout / "model.pt", {"format": FORMAT, "step": 0, "options": options.to_dict(),
                                           "generator": build_generator(options).state_dict()})
    train = [honest["paths"][p] for p in folds.patient_id[folds.fold != 0]]
    holdout_synth = tmp_path / "synth_spade_holdout"
    sampled = sample_spade(holdout / "model.pt", train, holdout_synth, fold="holdout", seed=1,
                           max_slices_per_scan=SYNTH_PER_SCAN, device="cpu")
    synth_dir = copy_dir(honest["synth"]["spade", "0"], tmp_path / "spade_0")
    written = [shutil.copy(path, synth_dir / path.name) for path in sampled]
    stack = load_slices(written[0])
    assert str(stack.extra["generator_fold"]) == "holdout"
    assert str(stack.extra["model_sha256"]) == file_sha256(holdout / "model.pt")
    dataset = tmp_path / "B_fold0.npz"
    build_dataset(dataset, "B", 0, real, folds, synth_dir)

    table = run_audit(honest, generator_dirs={**honest["generators"], ("spade", "holdout"): holdout},
                      synth_dirs={**honest["synth"], ("spade", "0"): synth_dir, ("spade", "holdout"): holdout_synth},
                      dataset_paths={**honest["datasets"], ("B", 0): dataset})
    failed = failures(table)
    assert list(failed) == ["synthetic_generator (spade, fold 0)"]
    detail = failed["synthetic_generator (spade, fold 0)"]
    assert all(f"{path}: made by spade fold holdout, not spade fold 0" in detail for path in written)
    # the holdout generator's own folder is what it should be
    assert table.set_index("check").status["synthetic_generator (spade, fold holdout)"] == "pass"

    # The same stacks claiming fold 0 but made by another model file: the digest tells.
    for path in written:
        stack = load_slices(path)
        stack.extra["generator_fold"] = np.asarray("0")
        save_slices(path, stack)
    failed = failures(run_audit(honest, synth_dirs={**honest["synth"], ("spade", "0"): synth_dir},
                                dataset_paths={**honest["datasets"], ("B", 0): dataset}))
    detail = failed["synthetic_generator (spade, fold 0)"]
    assert f"made by a model with sha256 {file_sha256(holdout / 'model.pt')[:12]}" in detail
    assert str(honest["generators"]["spade", "0"] / "model.pt") in detail


def test_sampling_without_provenance_is_refused(honest, tmp_path):
    paths = list(honest["paths"].values())[:1]
    with pytest.raises(ValueError, match="must record generator_fold, model_sha256"):
        write_synthetic(plan_maps(paths, SIZE, seed=1, max_slices_per_scan=2), tmp_path, SIZE, 16, paint,
                        {"generator": "sdm"}, "paint without provenance")
    with pytest.raises(FileNotFoundError, match=r"nowhere/model\.pt: no such file"):
        generator_provenance("sdm", "0", tmp_path / "nowhere" / "model.pt")


def test_bad_folds_file_is_a_clear_error(honest, tmp_path):
    write_tsv(pd.DataFrame({"patient_id": ["a"], "split": [0]}), tmp_path / "folds.tsv")
    with pytest.raises(ValueError, match=r"folds\.tsv: missing column 'fold'"):
        audit(tmp_path / "folds.tsv", honest["root"] / "manifest.tsv", {}, {}, {})



def test_chunked_comparison_equals_the_whole_matrix():
    rng = np.random.default_rng(0)
    train = image_features(rng.integers(0, 255, (23, 40, 40), dtype=np.uint8))
    images = rng.integers(0, 255, (10, 40, 40), dtype=np.uint8)
    images[-1] = 0
    test = view_features(images)
    train[5] = test[2, 7]  # one exact copy of a view
    corr = np.einsum("id,jvd->ijv", train, test)
    scores = corr.max(2)
    best, arg, view, above = best_matches(train, test, threshold=0.5, chunk=40)  # blocks of 23 x 2 images
    np.testing.assert_allclose(best, scores.max(1), rtol=1e-6)
    assert (arg == scores.argmax(1)).all() and (above == (scores > 0.5).sum(1)).all()
    assert (view == corr[np.arange(len(train)), arg].argmax(1)).all()
    assert arg[5] == 2 and view[5] == 7 and above[5] == 1 and not test[-1].any()  # a blank image matches nothing


# ----------------------------------------------------------------------------- the real series

@pytest.fixture(scope="module")
def near_duplicates_benchmark():
    """benchmarks/near_duplicates.py (the calibration) and the real LIDC-IDRI-0001 series it reads."""
    import importlib.util

    from conftest import LIDC_0001, LIDC_ROOT

    if not LIDC_0001.is_dir():
        pytest.skip(f"needs the real LIDC-IDRI-0001 series at {LIDC_0001} (not shipped with the repo)")
    spec = importlib.util.spec_from_file_location("near_duplicates", REPO / "benchmarks" / "near_duplicates.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench, *bench.lidc_series(LIDC_ROOT)


def study_defaults():
    schema = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())
    keys = schema["properties"]["downstream"]["properties"]
    return keys["near_duplicate_size"]["default"], keys["near_duplicate_threshold"]["default"]


@pytest.mark.lidc
@pytest.mark.parametrize("pixels", [64, 256])
def test_near_duplicate_threshold_on_the_real_series(near_duplicates_benchmark, pixels):
    # The study's defaults separate every copy of a slice (mirrored, shifted 1 %, turned 3 degrees, a central
    # 90 % crop resized back, at three other HU windows) from every pair of its slices >= 20 mm apart.
    bench, hu, z = near_duplicates_benchmark
    size, threshold = study_defaults()
    distinct, lowest = bench.separation(hu, z, pixels, size)
    print(f"\n{pixels} px: distinct max {distinct:.4f}, threshold {threshold}, copies: "
          + ", ".join(f"{k} {v:.4f}" for k, v in lowest.items()))
    required = {name: score for name, score in lowest.items() if name not in bench.NOT_REQUIRED}
    assert len(required) == 7 and distinct < threshold
    assert all(score > threshold for score in required.values()), required


@pytest.mark.lidc
def test_near_duplicates_check_catches_each_copy_of_real_slices(near_duplicates_benchmark, tmp_path):
    # The audit's check on a dataset of real slices at the study's 256 px: five test slices; in training, every
    # required copy of each (their scan named after the copy) and every slice >= 20 mm from all test slices.
    from nodulesynth.downstream.audit import LISTED, FeatureBank, check_near_duplicates

    bench, hu, z = near_duplicates_benchmark
    size, threshold = study_defaults()
    stack = bench.windowed(hu, bench.STUDY_WINDOW, 256)
    tests = np.arange(50, 80, 6)
    images, scans, index = [], [], []
    for t in tests:
        for name, image in bench.copies(hu, stack, t).items():
            if name not in bench.NOT_REQUIRED:
                images.append(image), scans.append(name), index.append(t)
    n_copies = len(images)
    far = np.flatnonzero(np.abs(z[:, None] - z[tests][None]).min(1) >= bench.DISTINCT_MM)
    images.extend(stack[far]), scans.extend(["LIDC-IDRI-0001"] * len(far)), index.extend(far)

    def slice_set(images, scans, index):
        n = len(images)
        return SliceSet(np.stack(images), np.zeros((n, 256, 256), np.uint8), np.zeros(n, bool),
                        np.zeros((0, 5), np.float32), np.array(scans), np.full(n, "LIDC-IDRI-0001"),
                        np.array(index, np.int64), np.full(n, "real"))

    dataset = ArmDataset("A", 0, slice_set(images, scans, index), slice_set(list(stack[tests]), ["LIDC-IDRI-0001"] * 5,
                                                                             tests), {})
    bank = FeatureBank(size)
    train_ids, test_ids = bank.add(dataset.train.image), bank.add(dataset.test.image, views=True)
    row = check_near_duplicates(tmp_path / "A_fold0.npz", "A", "0", dataset, train_ids, test_ids, bank, threshold)
    assert row["status"] == "fail" and f"... and {n_copies - LISTED} more train slices" in row["detail"]
    best, arg, view, _ = best_matches(bank.matrix()[train_ids], bank.views(test_ids), threshold)
    assert (best[:n_copies] > threshold).all() and (tests[arg[:n_copies]] == index[:n_copies]).all()
    assert (best[n_copies:] < threshold).all(), best[n_copies:].max()
    assert ("(scan mirrored, slice 50, source real) ~ test row 0 (scan LIDC-IDRI-0001, slice 50, mirrored)"
            in row["detail"])


def test_memorisation_scores_through_the_cli_and_the_report_figure(honest, tmp_path):
    # Fold 0's SDM "memorised" one slice: its first synthetic image is a training patient's real slice. The audit
    # (the CLI, as the rule runs it) passes, and its memorisation table puts that slice at the top of the
    # training axis, above the diagonal; the report reads the table and draws it.
    import json

    from nodulesynth.cli import main
    from nodulesynth.report.figures import memorisation_figure
    from nodulesynth.report.inputs import read_memorisation

    folds, real, root = honest["folds"], honest["real"], honest["root"]
    trained_on = next(s for s in real if s.patient_id in set(folds.patient_id[folds.fold != 0]))
    synth_dir = copy_dir(honest["synth"]["sdm", "0"], tmp_path / "synth" / "sdm" / "0")
    stack_path = sorted(synth_dir.glob("*.npz"))[0]
    stack = load_slices(stack_path)
    stack.image = stack.image.copy()
    stack.image[0] = resize(trained_on.image[len(trained_on) // 2][None])[0]
    save_slices(stack_path, stack)
    dataset = tmp_path / "data" / "C" / "fold0.npz"
    build_dataset(dataset, "C", 0, real, folds, synth_dir)
    results = tmp_path / "results"
    generator = honest["generators"]["sdm", "0"]
    common = ["--manifest", str(root / "manifest.tsv"), "--folds", str(root / "folds.tsv"),
              "--params", json.dumps({"near_duplicate_threshold": DEMO_THRESHOLD})]
    assert main(["audit", *common, "--generators", str(generator / "training_scans.tsv"), str(generator / "model.pt"),
                 "--synth", str(synth_dir), "--data", str(dataset), "--out", str(results / "audit/C/fold0.tsv"),
                 "--memorisation", str(results / "audit/C/fold0.memorisation.tsv")]) == 0
    assert main(["audit", *common, "--data", str(honest["datasets"]["A", 0]),
                 "--out", str(results / "audit/A/fold0.tsv"),
                 "--memorisation", str(results / "audit/A/fold0.memorisation.tsv")]) == 0
    assert read_tsv(results / "audit/A/fold0.memorisation.tsv").empty  # arm A adds no synthetic slices

    table = read_memorisation(results)
    assert list(table.columns) == ["generator", "fold", "scan_id", "slice_index", "to_train", "to_test"]
    assert len(table) == sum(len(load_slices(p)) for p in synth_dir.glob("*.npz")) and set(table.generator) == {"sdm"}
    memorised = (table.scan_id == stack.scan_id) & (table.slice_index == int(stack.slice_index[0]))
    assert memorised.sum() == 1
    row = table[memorised].iloc[0]
    assert row.to_train > 0.999 and row.to_train - row.to_test > 0.01
    others = table[~memorised]
    assert others[["to_train", "to_test"]].abs().le(1.0001).all().all() and (others.to_train < 0.999).all()
    png = memorisation_figure(table, DEMO_THRESHOLD)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
