"""Metrics of the downstream study: slice detection, box localization (FROC/CPM; COCO AP/AR in `coco`) and
feature-space realism.

All rates are fractions in 0..1; the report turns them into percent.
"""

import numpy as np
from scipy import linalg
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

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
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if labels.size == 0:
        raise ValueError("labels is empty: no slices to score")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()))}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
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
            raise ValueError(f"gt_boxes[{i}] must be (image_id, x0, y0, x1, y1), got {tuple(row)!r}")
        rows.append((row[0], *_checked_box(row[1:], f"gt_boxes[{i}]")))
    return rows


def _as_pred(pred_boxes) -> list:
    rows = []
    for i, row in enumerate(pred_boxes):
        if len(row) != 6:
            raise ValueError(f"pred_boxes[{i}] must be (image_id, x0, y0, x1, y1, score), got {tuple(row)!r}")
        score = float(row[5])
        if not np.isfinite(score):
            raise ValueError(f"pred_boxes[{i}] has a non-finite score {row[5]!r}")
        rows.append((row[0], *_checked_box(row[1:5], f"pred_boxes[{i}]"), score))
    return rows


def _checked_box(coords, where) -> tuple:
    x0, y0, x1, y1 = (float(v) for v in coords)
    if not np.isfinite([x0, y0, x1, y1]).all() or x1 <= x0 or y1 <= y0:
        raise ValueError(f"{where}: box (x0, y0, x1, y1) = {(x0, y0, x1, y1)} must be finite with x1 > x0, y1 > y0")
    return x0, y0, x1, y1


def _check_known(rows, known, name):
    for i, row in enumerate(rows):
        if row[0] not in known:
            raise ValueError(f"{name}[{i}] refers to image_id {row[0]!r}, which is not among the evaluated images")


# ---------------------------------------------------------------- FROC

# Written by hand: LUNA16's FROC ships only as a challenge script, not in a maintained library, and here it
# runs on 2-D slices with boxes instead of 3-D candidates with diameters.

def _froc_points(gt_boxes, pred_boxes, image_scan):
    """(sorted FP/scan, sensitivity) at every score threshold, starting from (0, 0) above the top score."""
    if not image_scan:
        raise ValueError("image_scan is empty: no images to evaluate")
    gt, pred = _as_gt(gt_boxes), _as_pred(pred_boxes)
    _check_known(gt, image_scan, "gt_boxes")
    _check_known(pred, image_scan, "pred_boxes")
    n_scans = len(set(image_scan.values()))

    # LUNA16 hit rule: the candidate's centre within the nodule's radius (half the larger box side) of its centre
    gt_by_image = {}
    for k, (image_id, x0, y0, x1, y1) in enumerate(gt):
        gt_by_image.setdefault(image_id, []).append((k, (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) / 2))
    best_hit = np.full(len(gt), -np.inf)  # each nodule counts once, at its best-scoring hit
    fp_scores = []
    for image_id, x0, y0, x1, y1, score in pred:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        hits = [k for k, gx, gy, radius in gt_by_image.get(image_id, ()) if np.hypot(cx - gx, cy - gy) < radius]
        for k in hits:  # extra hits on a nodule already hit are neither TP nor FP
            best_hit[k] = max(best_hit[k], score)
        if not hits:
            fp_scores.append(score)
    fp_scores = np.asarray(fp_scores, float)

    thresholds = np.unique(np.concatenate([best_hit[np.isfinite(best_hit)], fp_scores]))[::-1]
    fps = np.array([0.0] + [(fp_scores >= t).sum() / n_scans for t in thresholds])
    found = np.array([0] + [(best_hit >= t).sum() for t in thresholds], float)
    sens = found / len(gt) if len(gt) else np.full_like(found, np.nan)  # no nodules: sensitivity undefined
    return fps, sens


def froc_curve(gt_boxes, pred_boxes, image_scan):
    """The FROC operating points for plotting: (FP per scan, sensitivity), one per score threshold."""
    return _froc_points(gt_boxes, pred_boxes, image_scan)


def froc(gt_boxes, pred_boxes, image_scan, fps_per_scan=FROC_FPS_PER_SCAN) -> dict:
    """LUNA16-style FROC on slices: sensitivity at the given FP/scan rates, and CPM (their mean).

    gt_boxes: (image_id, x0, y0, x1, y1); pred_boxes: (image_id, x0, y0, x1, y1, score); image_scan maps
    every evaluated image_id to its scan (FP per scan divides by the number of distinct scans in it).
    Sensitivity at a rate is the highest reached at any threshold whose FP/scan does not exceed it.
    """
    fps, sens = _froc_points(gt_boxes, pred_boxes, image_scan)
    out = {}
    for rate in fps_per_scan:
        reachable = fps <= rate
        out[f"froc_{rate:g}"] = float(sens[reachable].max())  # (0, 0) is always reachable
    out["cpm"] = float(np.mean(list(out.values())))
    return out


# ---------------------------------------------------------------- feature-space realism

def frechet_distance(features_a, features_b, eps=1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D] (the FID formula)."""
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    for name, x in (("features_a", a), ("features_b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be [N, D] with N >= 2 to fit a Gaussian, got shape {x.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: features_a has {a.shape[1]}, features_b has {b.shape[1]}")
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
