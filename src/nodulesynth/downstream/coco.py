"""COCO box AP/AR of the localization study, with pycocotools through mmdet's wrappers.

Apart from `metrics` because it needs mmdet: the statistics and report steps, which read FROC curves from
`metrics`, run in an image without the OpenMMLab stack.
"""

import contextlib
import io

import numpy as np

from nodulesynth.downstream.metrics import _as_gt, _as_pred, _check_known
from nodulesynth.errors import InputError

COCO_STAT_KEYS = ("coco_ap", "coco_ap50", "coco_ap75", "coco_ap_s", "coco_ap_m", "coco_ap_l",
                  "coco_ar1", "coco_ar10", "coco_ar100", "coco_ar_s", "coco_ar_m", "coco_ar_l")


def _undefined_to_nan(value) -> float:
    """pycocotools writes -1 where a value is undefined (e.g. no ground truth in an area range)."""
    return float("nan") if value <= -1 else float(value)


def coco_metrics(image_ids, gt_boxes, pred_boxes) -> dict:
    """COCO box AP/AR of one category "nodule" with pycocotools (through mmdet's wrappers).

    image_ids: every evaluated image (also those without boxes); gt_boxes: (image_id, x0, y0, x1, y1);
    pred_boxes: (image_id, x0, y0, x1, y1, score); pixels, x1/y1 exclusive. Values pycocotools leaves
    undefined (-1, e.g. no ground truth box in an area range) are returned as NaN.
    """
    from mmdet.datasets.api_wrappers import COCO, COCOeval

    image_ids = list(image_ids)
    if len(set(image_ids)) != len(image_ids):
        raise InputError("image_ids contains duplicates")
    gt, pred = _as_gt(gt_boxes), _as_pred(pred_boxes)
    index = {image_id: k + 1 for k, image_id in enumerate(image_ids)}  # pycocotools wants plain int ids
    _check_known(gt, index, "gt_boxes")
    _check_known(pred, index, "pred_boxes")

    def dataset(anns):
        return {"images": [{"id": i} for i in index.values()], "categories": [{"id": 1, "name": "nodule"}],
                "annotations": anns}

    def ann(k, row, **extra):
        x0, y0, x1, y1 = row[1:5]
        w, h = x1 - x0, y1 - y0  # exclusive x1/y1: width is the plain difference
        return {"id": k + 1, "image_id": index[row[0]], "category_id": 1, "bbox": [x0, y0, w, h], "area": w * h,
                "iscrowd": 0, **extra}

    log = io.StringIO()  # pycocotools prints progress and the summary table; keep the step's log clean
    with contextlib.redirect_stdout(log):
        coco_gt = _coco_from(COCO, dataset([ann(k, row) for k, row in enumerate(gt)]))
        # loadRes([]) fails on an empty list, so detections are indexed the same way as the ground truth
        coco_dt = _coco_from(COCO, dataset([ann(k, row, score=row[5]) for k, row in enumerate(pred)]))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()

    params = evaluator.params
    all_area = params.areaRngLbl.index("all")
    max100 = params.maxDets.index(100)
    precision = evaluator.eval["precision"][:, :, 0, all_area, max100]  # [T, R]
    recall = evaluator.eval["recall"][:, 0, all_area, max100]  # [T]

    def iou_index(iou):
        return int(np.flatnonzero(np.isclose(params.iouThrs, iou))[0])

    def ap_at(iou):
        p = precision[iou_index(iou)]
        return float(p[p > -1].mean()) if (p > -1).any() else float("nan")

    out = {"ap50": ap_at(0.5), "ap60": ap_at(0.6)}
    out.update({f"ar{round(iou * 100)}": _undefined_to_nan(recall[iou_index(iou)]) for iou in (0.5, 0.6, 0.7)})
    out.update({key: _undefined_to_nan(v) for key, v in zip(COCO_STAT_KEYS, evaluator.stats)})
    return out


def _coco_from(coco_cls, dataset):
    coco = coco_cls()
    coco.dataset = dataset
    coco.createIndex()
    if hasattr(coco, "img_ann_map"):  # mmdet's snake-case aliases were bound to the empty index in __init__
        coco.img_ann_map, coco.cat_img_map = coco.imgToAnns, coco.catToImgs
    return coco
