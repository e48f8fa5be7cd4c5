"""Realism in the detector's own feature space: no ImageNet weights can be downloaded, so no FID.
Instead the Fréchet distance between the arm-A classifier's penultimate features of a fold's real
test slices and of each generator's synthetic slices, with the real training slices as the floor
(what two sets of real slices of different patients score).

Class-matched and size-matched: the arms add nodule slices only, while a fold's real slices are mostly
nodule-free, so a distance between "all real test slices" and "synthetic nodule slices" measures the class
mix more than realism (real nodule slices offered as "synthetic" scored 32.0 against a floor of 0.72). Each class
is therefore compared on its own (synthetic nodule slices against real test nodule slices; nodule-free against
nodule-free where a generator's set holds some), and, as the Fréchet distance of small sets grows as they shrink,
every set of a class is drawn (seeded, without replacement) to one count: the smallest of the real test, real
training and synthetic sets of that class. The floor is the real training slices of that class and count against
the same draw of real test slices.
"""

import logging

import numpy as np

from nodulesynth.downstream.detection import detection_features, load_classifier
from nodulesynth.downstream.metrics import frechet_distance
from nodulesynth.errors import InputError

log = logging.getLogger("nodulesynth")

# class name in the keys -> has_nodule value
CLASSES = {"nodule": True, "nodule_free": False}
REAL_TRAIN = "real_train"  # the floor's key


def _sets_by_source(datasets) -> tuple:
    """(real test SliceSet, real training SliceSet, {source: that source's training slices}) of one fold."""
    folds = {d.fold for d in datasets}
    if len(folds) != 1:
        raise InputError(f"realism takes the datasets of one fold, got folds {sorted(folds)}")
    # Arm A's real training slices (every arm but the positive control holds the same ones).
    reference = next((d for d in datasets if d.arm == "A"), datasets[0])
    real = reference.train.subset(np.flatnonzero(np.asarray(reference.train.source) == "real"))
    added = {}
    for dataset in datasets:
        source = np.asarray(dataset.train.source)
        for name in np.unique(source[source != "real"]):
            added.setdefault(str(name), dataset.train.subset(np.flatnonzero(source == name)))
    return reference.test, real, added


def matched_draws(counts: dict, seed) -> tuple[int, dict]:
    """(n, {set name: sorted row indices}): `n` = the smallest of `counts` ({set name: size}), and for each set
    `n` of its rows drawn without replacement (all of them for the smallest), reproducible for `seed`."""
    n = min(counts.values())
    rng = np.random.default_rng(seed)
    return n, {name: np.sort(rng.choice(size, n, replace=False)) for name, size in sorted(counts.items())}


def realism_distances(model_path, options, datasets, device="auto", seed=None) -> dict:
    """Class-matched distances to the real test slices of one fold; `datasets` are that fold's arm datasets (the
    test set is the same in every arm). Keys, for each class (`nodule`, and `nodule_free` where a synthetic set
    holds nodule-free slices): `fd_{class}_real_train` (the floor), `fd_{class}_{source}` per synthetic source,
    `n_{class}` the count every set was drawn to, and `n_{class}_available_{set}` each set's size before the
    draw. A class with fewer than two slices in some set gets null distances (no Gaussian fits one slice).
    `seed` (default: the detection options' seed) and the fold seed the draws."""
    test, real, added = _sets_by_source(datasets)
    fold = int(datasets[0].fold)
    seed = options.seed if seed is None else seed
    model = load_classifier(model_path, device)

    def features_of(slices, rows):
        return detection_features(model, options, slices.image[rows])

    result = {}
    for position, (name, has_nodule) in enumerate(CLASSES.items()):
        def rows_of(slices):
            return np.flatnonzero(np.asarray(slices.has_nodule, bool) == has_nodule)

        synthetic = {source: rows_of(slices) for source, slices in added.items()}
        synthetic = {source: rows for source, rows in synthetic.items() if len(rows)}
        if not synthetic:
            continue  # no generator's set holds this class: nothing to compare (the arms add nodule slices only)
        pools = {"real_test": (test, rows_of(test)), REAL_TRAIN: (real, rows_of(real)),
                 **{source: (added[source], rows) for source, rows in synthetic.items()}}
        n, draws = matched_draws({key: len(rows) for key, (_, rows) in pools.items()},
                                 np.random.SeedSequence([int(seed), fold, position]))
        result[f"n_{name}"] = int(n)
        result.update({f"n_{name}_available_{key}": len(rows) for key, (_, rows) in pools.items()})
        compared = [REAL_TRAIN, *sorted(synthetic)]
        if n < 2:
            log.warning("realism fold %s, %s slices: a set holds only %d (%s); no distance", fold, name, n,
                        {key: len(rows) for key, (_, rows) in pools.items()})
            result.update({f"fd_{name}_{key}": None for key in compared})
            continue
        reference = features_of(test, pools["real_test"][1][draws["real_test"]])
        for key in compared:
            slices, rows = pools[key]
            result[f"fd_{name}_{key}"] = frechet_distance(reference, features_of(slices, rows[draws[key]]))
    if not result:
        raise InputError(f"fold {fold}: no synthetic slices in the datasets of arms {[d.arm for d in datasets]}")
    return result
