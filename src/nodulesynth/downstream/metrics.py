"""Metrics of the downstream study: slice detection, box localization (FROC/CPM; COCO AP/AR in `coco`) and
feature-space realism.

All rates are fractions in 0..1; the report turns them into percent.
"""

import numpy as np
from scipy import linalg
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

from nodulesynth.errors import InputError

FROC_FPS_PER_SCAN = (0.125, 0.25, 0.5, 1, 2, 4, 8)  # LUNA16's operating points


def _ratio(num, den) -> float:
    """num / den, or 0.0 when den is 0 (a metric with nothing to count is reported as 0, not NaN)."""
    return float(num) / float(den) if den else 0.0


def detection_metrics(labels, scores, threshold=0.5) -> dict:
    """Slice-level nodule detection metrics; positive class = nodule (label 1).

    labels: 0/1 per slice; scores: nodule probability per slice; a slice is called positive when score >= threshold.
    Beside the study's metrics at the cut, the threshold-free ones: AUC and average precision (the area under
    the precision-recall curve, which a rare positive class does not flatter as it does accuracy: "always no"
    scores 95 % accuracy on LIDC's slices) and balanced accuracy (the mean of recall and specificity).
    AUC and average precision are NaN when only one class is present (undefined).
    """
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=float).ravel()
    if labels.shape != scores.shape:
        raise InputError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if labels.size == 0:
        raise InputError("labels is empty: no slices to score")
    if not np.isin(labels, (0, 1)).all():
        raise InputError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
    if not np.isfinite(scores).all():
        raise InputError("scores contain NaN or infinite values")
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(labels, predicted, labels=[0, 1]).ravel())
    precision = _ratio(tp, tp + fp)
    both = np.unique(labels).size == 2
    auc = float(roc_auc_score(labels, scores)) if both else float("nan")
    recall, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": _ratio(tp + tn, labels.size),
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "auc": auc,
        "average_precision": float(average_precision_score(labels, scores)) if both else float("nan"),
        "balanced_accuracy": (recall + specificity) / 2,
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
    }


# ---------------------------------------------------------------- boxes

def _as_gt(gt_boxes) -> list:
    rows = []
    for i, row in enumerate(gt_boxes):
        if len(row) != 5:
            raise InputError(f"gt_boxes[{i}] must be (image_id, x0, y0, x1, y1), got {tuple(row)!r}")
        rows.append((row[0], *_checked_box(row[1:], f"gt_boxes[{i}]")))
    return rows


def _as_pred(pred_boxes) -> list:
    rows = []
    for i, row in enumerate(pred_boxes):
        if len(row) != 6:
            raise InputError(f"pred_boxes[{i}] must be (image_id, x0, y0, x1, y1, score), got {tuple(row)!r}")
        score = float(row[5])
        if not np.isfinite(score):
            raise InputError(f"pred_boxes[{i}] has a non-finite score {row[5]!r}")
        rows.append((row[0], *_checked_box(row[1:5], f"pred_boxes[{i}]"), score))
    return rows


def _checked_box(coords, where) -> tuple:
    x0, y0, x1, y1 = (float(v) for v in coords)
    if not np.isfinite([x0, y0, x1, y1]).all() or x1 <= x0 or y1 <= y0:
        raise InputError(f"{where}: box (x0, y0, x1, y1) = {(x0, y0, x1, y1)} must be finite with x1 > x0, y1 > y0")
    return x0, y0, x1, y1


def _check_known(rows, known, name):
    for i, row in enumerate(rows):
        if row[0] not in known:
            raise InputError(f"{name}[{i}] refers to image_id {row[0]!r}, which is not among the evaluated images")


# ---------------------------------------------------------------- FROC

# Written by hand: LUNA16's FROC ships only as a challenge script (noduleCADEvaluationLUNA16.py), not in a
# maintained library, and here it runs on 2-D boxes on slices instead of 3-D candidate points with diameters.

def _centre_radius(x0, y0, x1, y1):
    """A box's centre and radius (half its larger side): the geometry of the LUNA16 hit rule on a slice."""
    return (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2


def _within(point, box) -> bool:
    """LUNA16's hit rule on one slice: the point lies within the box's radius of the box's centre."""
    cx, cy, radius = _centre_radius(*box)
    return float(np.hypot(point[0] - cx, point[1] - cy)) < radius


def _as_slice_boxes(rows, name, width, with_score=False) -> list:
    """Rows (scan, slice_index, [id,] x0, y0, x1, y1[, score]) checked: `width` fields before the box."""
    out = []
    for i, row in enumerate(rows):
        row = tuple(row)
        if len(row) != width + 4 + with_score:
            layout = ("scan, slice_index, " + ("nodule, " if width == 3 else "") + "x0, y0, x1, y1"
                      + (", score" if with_score else ""))
            raise InputError(f"{name}[{i}] must be ({layout}), got {row!r}")
        key = (str(row[0]), int(row[1]), *row[2:width])
        box = _checked_box(row[width:width + 4], f"{name}[{i}]")
        if with_score:
            score = float(row[-1])
            if not np.isfinite(score):
                raise InputError(f"{name}[{i}] has a non-finite score {row[-1]!r}")
            out.append((*key, *box, score))
        else:
            out.append((*key, *box))
    return out


def _at_least(scores, thresholds) -> np.ndarray:
    """How many `scores` are >= each threshold (a sort and a binary search: predictions run into the millions)."""
    ordered = np.sort(np.asarray(scores, float))
    return (len(ordered) - np.searchsorted(ordered, thresholds, side="left")).astype(float)


def merge_candidates(pred_boxes) -> list:
    """Predicted boxes merged into 3-D candidates, as LUNA16 scores candidates, not slices: boxes on consecutive
    slice indices of one scan are one candidate when the centre of each lies within the radius (half the larger
    side) of the smaller of the two, chains of such pairs included. pred_boxes: (scan, slice_index, x0, y0, x1,
    y1, score). Returns candidates as (scan, score = the highest of its boxes, [(slice_index, x0, y0, x1, y1)])."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    pred = _as_slice_boxes(pred_boxes, "pred_boxes", 2, with_score=True)
    n = len(pred)
    if not n:
        return []
    coords = np.array([p[2:6] for p in pred], float).reshape(-1, 4)
    cx, cy = (coords[:, 0] + coords[:, 2]) / 2, (coords[:, 1] + coords[:, 3]) / 2
    radius = np.maximum(coords[:, 2] - coords[:, 0], coords[:, 3] - coords[:, 1]) / 2
    by_slice = {}
    for k, (scan, slice_index, *_rest) in enumerate(pred):
        by_slice.setdefault((scan, slice_index), []).append(k)
    rows, cols = [], []
    for (scan, slice_index), here in by_slice.items():
        above = by_slice.get((scan, slice_index + 1))
        if above is None:
            continue
        here, above = np.array(here), np.array(above)  # every pair of boxes on the two slices at once
        distance = np.hypot(cx[here][:, None] - cx[above][None], cy[here][:, None] - cy[above][None])
        a, b = np.nonzero(distance < np.minimum(radius[here][:, None], radius[above][None]))
        rows += here[a].tolist()
        cols += above[b].tolist()
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    candidates = {}
    for k, c in enumerate(component):
        scan, slice_index, x0, y0, x1, y1, score = pred[k]
        entry = candidates.setdefault(int(c), [scan, -np.inf, []])
        entry[1] = max(entry[1], score)
        entry[2].append((slice_index, x0, y0, x1, y1))
    return [tuple(c) for c in candidates.values()]


def _candidate_hits(candidate_boxes, targets) -> set:
    """Keys of the `targets` ({(slice_index): [(key, box)]}) that one of the candidate's boxes hits: its centre
    within the target's radius on the same slice."""
    hits = set()
    for slice_index, x0, y0, x1, y1 in candidate_boxes:
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        for key, box in targets.get(slice_index, ()):
            if _within(centre, box):
                hits.add(key)
    return hits


def froc_curve(gt_boxes, pred_boxes, scans, excluded=()):
    """LUNA16's FROC per nodule: (FP per scan, sensitivity) at every score threshold, from (0, 0) above the top
    score, for plotting and for `froc`.

    gt_boxes: (scan, slice_index, nodule, x0, y0, x1, y1), a nodule's box on each slice it lies on; the ground
    truth is the nodule, (scan, nodule), found when a candidate hits it on any of its slices.
    pred_boxes: (scan, slice_index, x0, y0, x1, y1, score), merged into 3-D candidates (`merge_candidates`).
    scans: every evaluated scan (FP per scan divides by their number, scans without a nodule or a
    prediction included). excluded: (scan, slice_index, x0, y0, x1, y1) of annotated findings that do not count
    (too few readers, too small): a candidate hitting one and no nodule is neither a hit nor a false positive.
    A candidate hitting a nodule counts for it (each nodule once, at its best candidate's score); one hitting
    nothing is a false positive, as in LUNA16's evaluation script."""
    scans = {str(s) for s in scans}
    if not scans:
        raise InputError("scans is empty: no scans to evaluate")
    gt = _as_slice_boxes(gt_boxes, "gt_boxes", 3)
    ignored = _as_slice_boxes(excluded, "excluded", 2)
    candidates = merge_candidates(pred_boxes)
    for name, rows in (("gt_boxes", gt), ("excluded", ignored), ("pred_boxes", candidates)):
        for i, row in enumerate(rows):
            if row[0] not in scans:
                raise InputError(f"{name}[{i}] lies on scan {row[0]!r}, which is not among the evaluated scans")

    nodules = sorted({(scan, int(nodule)) for scan, _, nodule, *_ in gt})
    if any(n < 0 for _, n in nodules):
        raise InputError("gt_boxes: a nodule id is negative (unknown); the per-nodule FROC needs every nodule's id")
    targets, findings = {}, {}
    for scan, slice_index, nodule, *box in gt:
        targets.setdefault(scan, {}).setdefault(slice_index, []).append(((scan, int(nodule)), box))
    for k, (scan, slice_index, *box) in enumerate(ignored):
        findings.setdefault(scan, {}).setdefault(slice_index, []).append((k, box))

    best = {n: -np.inf for n in nodules}
    fp_scores = []
    for scan, score, boxes in candidates:
        hits = _candidate_hits(boxes, targets.get(scan, {}))
        for nodule in hits:  # further hits on a nodule already hit are neither TP nor FP
            best[nodule] = max(best[nodule], score)
        if not hits and not _candidate_hits(boxes, findings.get(scan, {})):
            fp_scores.append(score)
    hit_scores = np.array([v for v in best.values() if np.isfinite(v)], float)
    fp_scores = np.asarray(fp_scores, float)

    thresholds = np.unique(np.concatenate([hit_scores, fp_scores]))[::-1]
    fps = np.concatenate([[0.0], _at_least(fp_scores, thresholds) / len(scans)])
    found = np.concatenate([[0.0], _at_least(hit_scores, thresholds)])
    sens = found / len(nodules) if nodules else np.full_like(found, np.nan)  # no nodules: sensitivity undefined
    return fps, sens


def sensitivity_at(fps, sens, rates) -> np.ndarray:
    """The FROC curve's sensitivity at each FP/scan rate, linearly interpolated between its points as LUNA16's
    evaluation does (np.interp on the curve), and its last sensitivity beyond its last point. Written out
    because np.interp leaves tied x values (thresholds that add hits and no FP) unspecified: at a rate this
    takes the last point at or below it, the highest sensitivity reached there."""
    fps, sens = np.asarray(fps, float), np.asarray(sens, float)
    out = []
    for rate in np.asarray(rates, float).ravel():
        k = int(np.searchsorted(fps, rate, side="right")) - 1  # fps is non-decreasing and starts at 0
        if k >= len(fps) - 1:
            out.append(sens[-1])
        else:
            step = (rate - fps[k]) / (fps[k + 1] - fps[k])
            out.append(sens[k] + step * (sens[k + 1] - sens[k]))
    return np.array(out)


def froc(gt_boxes, pred_boxes, scans, excluded=(), fps_per_scan=FROC_FPS_PER_SCAN) -> dict:
    """LUNA16's FROC per nodule (`froc_curve`): sensitivity at 1/8 ... 8 FP per scan (`froc_<rate>`, linear
    interpolation of the curve) and the CPM, their mean."""
    fps, sens = froc_curve(gt_boxes, pred_boxes, scans, excluded)
    out = {f"froc_{rate:g}": float(v) for rate, v in zip(fps_per_scan, sensitivity_at(fps, sens, fps_per_scan))}
    out["cpm"] = float(np.mean(list(out.values())))
    return out


# The slice-level variant, kept for comparison under its own names: every (slice, nodule) box is a ground
# truth and every predicted box a candidate, so a nodule on 7 slices weighs 7 times one on a single slice.

def slice_froc_curve(gt_boxes, pred_boxes, image_scan):
    """The slice-level FROC: (sorted FP/scan, sensitivity over (slice, nodule) boxes) at every score threshold,
    from (0, 0) above the top score. gt_boxes: (image_id, x0, y0, x1, y1); pred_boxes: (image_id, x0, y0, x1,
    y1, score); image_scan maps every evaluated image_id to its scan."""
    if not image_scan:
        raise InputError("image_scan is empty: no images to evaluate")
    gt, pred = _as_gt(gt_boxes), _as_pred(pred_boxes)
    _check_known(gt, image_scan, "gt_boxes")
    _check_known(pred, image_scan, "pred_boxes")
    n_scans = len(set(image_scan.values()))

    gt_by_image = {}
    for k, (image_id, *box) in enumerate(gt):
        gt_by_image.setdefault(image_id, []).append((k, box))
    best_hit = np.full(len(gt), -np.inf)  # each box counts once, at its best-scoring hit
    fp_scores = []
    for image_id, x0, y0, x1, y1, score in pred:
        centre = ((x0 + x1) / 2, (y0 + y1) / 2)
        hits = [k for k, box in gt_by_image.get(image_id, ()) if _within(centre, box)]
        for k in hits:
            best_hit[k] = max(best_hit[k], score)
        if not hits:
            fp_scores.append(score)
    fp_scores = np.asarray(fp_scores, float)

    thresholds = np.unique(np.concatenate([best_hit[np.isfinite(best_hit)], fp_scores]))[::-1]
    fps = np.concatenate([[0.0], _at_least(fp_scores, thresholds) / n_scans])
    found = np.concatenate([[0.0], _at_least(best_hit[np.isfinite(best_hit)], thresholds)])
    sens = found / len(gt) if len(gt) else np.full_like(found, np.nan)
    return fps, sens


def slice_froc(gt_boxes, pred_boxes, image_scan, fps_per_scan=FROC_FPS_PER_SCAN) -> dict:
    """The slice-level FROC (`slice_froc_curve`): `slice_froc_<rate>`, the highest sensitivity at any threshold
    whose FP/scan does not exceed the rate, and `slice_cpm`, their mean."""
    fps, sens = slice_froc_curve(gt_boxes, pred_boxes, image_scan)
    out = {f"slice_froc_{rate:g}": float(sens[fps <= rate].max()) for rate in fps_per_scan}  # (0, 0) always reachable
    out["slice_cpm"] = float(np.mean(list(out.values())))
    return out


# ---------------------------------------------------------------- feature-space realism

def frechet_distance(features_a, features_b, eps=1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula)."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    for name, x in (("features_a", a), ("features_b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise InputError(f"{name} must be [N, D] with N >= 2 to fit a Gaussian, got shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feature widths differ: features_a has {a.shape[1]}, features_b has {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    diff = mu_a - mu_b
    if min(len(a), len(b)) <= a.shape[1]:
        # Fewer samples than features (a fold's slices against 2048 features): with A, B the centred sets
        # scaled by 1/sqrt(n - 1), the non-zero eigenvalues of cov_a cov_b = A'A B'B are the squared
        # singular values of A B', so tr sqrtm(cov_a cov_b) is the nuclear norm of that n_a x n_b matrix:
        # exact, and no D x D matrix root (tens of seconds at D = 2048).
        a_c = (a - mu_a) / np.sqrt(len(a) - 1)
        b_c = (b - mu_b) / np.sqrt(len(b) - 1)
        trace_covmean = np.linalg.svd(a_c @ b_c.T, compute_uv=False).sum()
        return float(diff @ diff + (a_c * a_c).sum() + (b_c * b_c).sum() - 2 * trace_covmean)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals, as the usual FID code does
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean))
