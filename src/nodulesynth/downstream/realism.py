"""Realism in the detector's own feature space: no ImageNet weights can be downloaded, so no FID.
Instead the Fréchet distance between the arm-A classifier's penultimate features of a fold's real
test slices and of each generator's synthetic slices, with the real training slices as the floor
(what two sets of real slices of different patients score)."""

import numpy as np

from nodulesynth.downstream.detection import detection_features, load_classifier
from nodulesynth.downstream.metrics import frechet_distance


def realism_distances(model_path, options, datasets, device="auto") -> dict:
    """{fd_real_train, fd_spade, fd_sdm (those present), n_*}: distances to the real test slices of
    one fold; `datasets` are that fold's arm datasets (the test set is the same in every arm)."""
    folds = {d.fold for d in datasets}
    if len(folds) != 1:
        raise ValueError(f"realism takes the datasets of one fold, got folds {sorted(folds)}")
    test = datasets[0].test
    sets = {}
    for dataset in datasets:
        source = np.asarray(dataset.train.source)
        for name in np.unique(source):
            if name not in sets:
                sets[name] = dataset.train.image[source == name]
    model = load_classifier(model_path, device)
    reference = detection_features(model, options, test.image)
    result = {"n_real_test": len(test.image)}
    for name, images in sorted(sets.items()):
        key = "real_train" if name == "real" else str(name)
        result[f"fd_{key}"] = frechet_distance(reference, detection_features(model, options, images))
        result[f"n_{key}"] = len(images)
    return result
