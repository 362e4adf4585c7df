"""Detection evaluation: PASCAL VOC average precision (devkit-exact) and COCO AP.

- :mod:`sppnet.evaluation.voc`: the devkit's decisions, precision/recall curves,
  11-point (VOC2007) and area (VOC2010+) AP, best-F1 operating points;
- :mod:`sppnet.evaluation.coco`: detections as COCO results and ground truth as
  a COCO data set (what pycocotools reads), and COCO AP@[.5:.95].

:func:`evaluate_detections` is the entry point for both.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sppnet.evaluation._inputs import check_inputs
from sppnet.evaluation.coco import (
    coco_average_precisions,
    coco_ground_truth,
    coco_image_ids,
    coco_results,
    save_coco_results,
)
from sppnet.evaluation.voc import (
    VOC07_RECALL_THRESHOLDS,
    PRCurve,
    average_precision,
    best_f1_thresholds,
    precision_recall,
    voc_average_precisions,
)

__all__ = [
    "METRICS",
    "VOC07_RECALL_THRESHOLDS",
    "PRCurve",
    "average_precision",
    "best_f1_thresholds",
    "coco_ground_truth",
    "coco_image_ids",
    "coco_results",
    "evaluate_detections",
    "precision_recall",
    "save_coco_results",
]

METRICS = ("voc07", "voc12", "coco")


def _mean_ap(ap: Mapping[str, float]) -> float:
    valid = [v for v in ap.values() if not math.isnan(v)]
    return float(np.mean(valid)) if valid else float("nan")


def evaluate_detections(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    metric: str = "voc07",
    inclusive: bool = True,
) -> dict[str, Any]:
    """Mean average precision of detections, PASCAL VOC or COCO style.

    Args:
        predictions (list[dict]): one dict per image: ``boxes`` (Tensor[D, 4])
            in (x1, y1, x2, y2) pixels, ``scores`` (Tensor[D]), ``labels``
            (Tensor[D], int64, indices into ``class_names``).
        ground_truths (list[dict]): one dict per image, same order: ``boxes``
            (Tensor[G, 4]), ``labels`` (Tensor[G]), optional ``difficult``
            (Tensor[G], bool; default all False).
        class_names (sequence of str): the class of each label index.
        iou_threshold (float): minimum IoU of a true positive for the VOC
            metrics (0.5); COCO always averages IoU 0.50:0.05:0.95.
        metric (str): ``"voc07"`` (11-point AP of ``VOCevaldet.m``, SPP-net's
            tables), ``"voc12"`` (area under the precision envelope, VOC2010+)
            or ``"coco"`` (pycocotools; difficult objects become crowd regions,
            so detections on them are ignored; at most 100 detections per image
            and class).
        inclusive (bool): boxes are inclusive pixel indices (widths ``x2 - x1
            + 1``, the devkit). For ``"coco"`` the boxes are then handed over as
            ``w = x2 - x1 + 1`` so that the overlaps match the VOC ones.

    Returns:
        dict with ``"mAP"`` (float) and ``"ap"`` (dict class name -> float). A
        class without non-difficult ground truth gets NaN and is left out of
        the mAP (NaN if no class has ground truth). ``"coco"`` also returns
        ``"AP50"`` and ``"AP75"`` (means over classes at IoU 0.5 / 0.75), and its
        ``"mAP"`` / ``"ap"`` are AP@[.5:.95].

    Raises:
        ValueError: on an unknown metric, mismatched list lengths, missing keys,
            wrong shapes, out-of-range labels or malformed boxes.
        ImportError: for ``"coco"`` without pycocotools.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    dets, gts = check_inputs(predictions, ground_truths, class_names, iou_threshold)
    if metric == "coco":
        coco = coco_average_precisions(dets, gts, len(predictions), class_names, inclusive)
        return {
            "mAP": _mean_ap(coco["ap"]),
            "ap": coco["ap"],
            "AP50": _mean_ap(coco["ap50"]),
            "AP75": _mean_ap(coco["ap75"]),
        }
    ap = voc_average_precisions(dets, gts, class_names, iou_threshold, metric, inclusive)
    return {"mAP": _mean_ap(ap), "ap": ap}
