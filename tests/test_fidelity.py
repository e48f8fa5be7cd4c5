"""Mask fidelity measures what it says: real slices score high against their own maps and noise scores low,
in either stored orientation, with the run's window and masks settings and each stack's own pixel size; the
fidelity command scores slices from training maps and from held-out maps apart."""

from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
from pydicom.uid import generate_uid

from conftest import process_scan
from nodulesynth.cli import main
from nodulesynth.data.demo import annotations_frame, write_phantom
from nodulesynth.data.phantom import Nodule, PhantomGeometry
from nodulesynth.data.slices import SliceStack, load_slices, save_slices
from nodulesynth import labels as L
from nodulesynth.masks.fidelity import field_of_view, mask_fidelity, pixel_mm
from nodulesynth.masks.lesion_map import slice_stack
from nodulesynth.masks.segment import MaskOptions

EVERY = 4  # every 4th slice: enough for the means, a quarter of the time


def own_pixel_mm(path, stack):
    return pixel_mm(field_of_view(path), stack.image.shape)


def test_real_slices_score_high_and_noise_scores_low(demo_slice_paths):
    stack = load_slices(demo_slice_paths[0])
    px = own_pixel_mm(demo_slice_paths[0], stack)
    real = mask_fidelity(stack.image, stack.label, px)
    for name in ("body", "left_lung", "right_lung"):
        assert real[name] > 0.95, (name, real[name])
    assert real["trachea"] > 0.6
    assert real["nodule"] > 0.6 and real["nodule_contrast_hu"] > 300

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, stack.image.shape, dtype=np.uint8)
    fake = mask_fidelity(noise[::EVERY], stack.label[::EVERY], px)
    for name in ("body", "left_lung", "right_lung"):
        assert fake[name] < 0.5, (name, fake[name])
    assert abs(fake["nodule_contrast_hu"]) < 100


def test_either_stored_orientation_scores_its_real_slices_high(demo_cohort, demo_processed, tmp_path):
    """A series stored with its columns toward the patient's right is brought to the canonical orientation at
    ingestion: its stack is the standard series' stack, and its real slices score high against their maps."""
    _, geometries = demo_cohort
    _, standard_path, standard, _ = demo_processed[0]
    flipped = replace(geometries[0], flip_columns=True)
    folder = write_phantom(flipped, tmp_path, seed=0)  # demo_cohort wrote the first phantom with seed 0 too
    annotations_frame([flipped]).to_csv(tmp_path / "annotations.csv", index=False)
    path, stack, _ = process_scan(folder, flipped.patient_id, tmp_path / "annotations.csv", tmp_path / "out")
    assert np.array_equal(stack.image, standard.image) and np.array_equal(stack.label, standard.label)
    for p, s in ((standard_path, standard), (path, stack)):
        scores = mask_fidelity(s.image[::EVERY], s.label[::EVERY], own_pixel_mm(p, s))
        assert scores["left_lung"] > 0.9 and scores["right_lung"] > 0.9, scores


def test_a_changed_window_moves_the_measure_with_the_maps(demo_processed):
    """Maps made with another window (and the body threshold that window needs): fidelity with the same
    settings scores the real slices as high and measures the same nodule contrast in HU; fidelity with the
    default settings, blind to the change, does not."""
    _, path, standard, _ = demo_processed[0]
    volume = path.parent.parent / "volumes" / path.name
    window, opts = (-1000.0, 3000.0), MaskOptions(body_threshold=44)  # -302 HU, as level 127 of the default window
    stack, _ = slice_stack(volume, opts, window)
    assert len(stack) and not np.array_equal(stack.image, standard.image[:len(stack.image)])
    px = own_pixel_mm(path, standard)
    baseline = mask_fidelity(standard.image[::EVERY], standard.label[::EVERY], px)
    matched = mask_fidelity(stack.image[::EVERY], stack.label[::EVERY], px, opts, window)
    blind = mask_fidelity(stack.image[::EVERY], stack.label[::EVERY], px)
    for name in ("body", "left_lung", "right_lung"):
        assert matched[name] > 0.95 and blind[name] < 0.5, (name, matched[name], blind[name])
    assert abs(matched["nodule_contrast_hu"] / baseline["nodule_contrast_hu"] - 1) < 0.1
    assert abs(blind["nodule_contrast_hu"] / baseline["nodule_contrast_hu"] - 1) > 0.5


def test_the_stacks_own_pixel_size_is_used(tmp_path):
    """A 256 mm field of view, far from the 360 mm a slice alone is assumed to span: with trachea area limits
    around its true area (a disc of 8 mm radius, 201 mm²), the trachea is found at the stack's own pixel size
    and missed at the assumed one."""
    geometry = PhantomGeometry(patient_id="FOV256", series_uid=generate_uid(), study_uid=generate_uid(),
                               z=np.arange(64) * 5.0 - 320, pixel_spacing=2.0, image_size=128,
                               nodules=[Nodule((45.0, 0.0, -180.0), 12.0)])
    folder = write_phantom(geometry, tmp_path, seed=1)
    annotations_frame([geometry]).to_csv(tmp_path / "annotations.csv", index=False)
    opts = MaskOptions(trachea_min_area_mm2=100, trachea_max_area_mm2=300)
    path, stack, _ = process_scan(folder, "FOV256", tmp_path / "annotations.csv", tmp_path / "out", opts)
    assert field_of_view(path) == (256.0, 256.0)
    has_trachea = (stack.label == L.TRACHEA).any((1, 2))
    assert has_trachea.sum() >= 3
    images, labels = stack.image[has_trachea], stack.label[has_trachea]
    assert mask_fidelity(images, labels, own_pixel_mm(path, stack), opts)["trachea"] > 0.8
    assert mask_fidelity(images, labels, None, opts)["trachea"] < 0.2


def synthetic_layout(path, out_dir, size):
    """A real stack in the layout of the sample step (maps and images at the generator's size), as the
    fidelity command reads it: what a perfect generator would write."""
    stack = load_slices(path)
    pick = np.arange(0, len(stack), 8)
    resize = lambda a, how: np.stack([cv2.resize(x, (size, size), interpolation=how) for x in a[pick]])  # noqa: E731
    save_slices(out_dir / path.name, SliceStack(
        image=resize(stack.image, cv2.INTER_AREA), label=resize(stack.label, cv2.INTER_NEAREST),
        z=stack.z[pick], slice_index=stack.slice_index[pick], has_nodule=stack.has_nodule[pick],
        scan_id=stack.scan_id, patient_id=stack.patient_id, extra={"source_index": pick, "generator": "sdm"}))
    return len(pick)


def test_the_command_scores_training_and_heldout_maps_apart(demo_slice_paths, tmp_path):
    train, heldout = tmp_path / "synth", tmp_path / "synth_heldout"
    train.mkdir()
    heldout.mkdir()
    n_train = sum(synthetic_layout(p, train, 64) for p in demo_slice_paths[:2])
    n_heldout = synthetic_layout(demo_slice_paths[2], heldout, 64)
    sources = [str(p) for p in demo_slice_paths[:3]]
    out = tmp_path / "0.fidelity.tsv"
    masks, window = '{"min_lung_area_mm2": 100}', '{"min_hu": -1000, "max_hu": 400}'
    assert main(["fidelity", "--synth", str(train), "--heldout", str(heldout), "--slices", *sources,
                 "--params", masks, "--window", window, "--generator", "sdm", "--fold", "0", "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns[:5]) == ["generator", "fold", "split", "scan_id", "slice_index"]
    assert (table.split == "train").sum() == n_train and (table.split == "heldout").sum() == n_heldout
    assert set(table[table.split == "heldout"].scan_id) == {load_slices(demo_slice_paths[2]).scan_id}
    for _, part in table.groupby("split"):
        assert part.body.mean() > 0.9 and part.left_lung.mean() > 0.8 and part.right_lung.mean() > 0.8

    # The holdout generator has no test patients: `--heldout` without a folder, train rows only.
    assert main(["fidelity", "--synth", str(train), "--heldout", "--slices", *sources[:2],
                 "--generator", "sdm", "--fold", "holdout", "--out", str(out)]) == 0
    assert set(pd.read_csv(out, sep="\t").split) == {"train"}
    # A synthetic stack whose source stack is not given cannot be sized: an error naming it.
    assert main(["fidelity", "--synth", str(train), "--slices", sources[0], "--generator", "sdm",
                 "--fold", "0", "--out", str(out)]) == 1
