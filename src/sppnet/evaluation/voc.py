"""PASCAL VOC average precision, devkit-exact: the decision of every detection, the curves, the AP.

SPP-net reports PASCAL VOC 2007 mAP (SPP-net Sec. 4.2, Table 9). This module
reproduces the devkit's ``VOCevaldet.m`` decision for every detection and its
``VOCap`` / 11-point AP, but vectorised with numpy over each class: 5,000 images
x 100 detections (20 classes, 3 objects per image, tensors as input) evaluate in
under a second (measured on a shared 2-core CPU machine, best of 5 including the
input checks: 0.77 s for ``voc07``, 0.73 s for ``voc12``; median about 1 s).

Inputs, one entry per image (same order in both lists):

- ``predictions[i]``: ``boxes`` (Tensor[D, 4], (x1, y1, x2, y2)), ``scores``
  (Tensor[D]) and ``labels`` (Tensor[D], int, indices into ``class_names``);
- ``ground_truths[i]``: ``boxes`` (Tensor[G, 4]), ``labels`` (Tensor[G]) and
  optionally ``difficult`` (Tensor[G], bool; all False when absent).

numpy arrays are accepted in place of tensors. Boxes are inclusive pixel
indices by default (the devkit's ``+1`` widths); ``inclusive=False`` switches
every metric to continuous coordinates.

The devkit, step by step, per class:

1. detections are sorted by decreasing score, stably (MATLAB's ``sort``): ties
   keep the input order (image order, then the order inside an image);
2. each detection takes the ground truth of its image with the highest IoU
   (first one on ties; only boxes that intersect count) -- even if that ground
   truth is already matched;
3. if that IoU >= threshold: a difficult ground truth makes the detection
   ignored (neither TP nor FP); otherwise it is a TP if the ground truth was
   not matched yet (and now is), an FP if it was (duplicate). Below threshold,
   or with no ground truth of the class in the image, it is an FP;
4. ``recall = cumsum(TP) / npos`` with ``npos`` the non-difficult ground
   truths, ``precision = cumsum(TP) / (cumsum(TP) + cumsum(FP))``;
5. VOC2007 (``VOCevaldet.m``): ``for t = 0:0.1:1, ap = ap + max(prec(rec >= t)) / 11``.

Because the ground truth in step 2 does not depend on which are matched, the
loop vectorises: the first detection (in score order) assigned to a ground
truth is its TP, the later ones are duplicates.

The 11 thresholds are MATLAB's doubles (:data:`VOC07_RECALL_THRESHOLDS`). MATLAB
builds ``0:0.1:1`` from both ends: the first half as ``k * 0.1``, the second as
``1 - (10 - k) * 0.1``. So its 0.3 is ``3 * 0.1 = 0.30000000000000004`` and a
recall of exactly 3/10 (or 6/20, ...) does NOT reach it, while its 0.6 and 0.7
are the doubles nearest 0.6 and 0.7, which 6/10 and 7/10 do reach. The Python
ports that build the thresholds with ``np.arange(0, 1.1, 0.1)``
(py-faster-rcnn's ``voc_eval.py``, detectron2's ``pascal_voc_evaluation.py``)
get 0.30000000000000004, 0.6000000000000001 and 0.7000000000000001: they agree
with MATLAB at 0.3 but miss a recall of exactly 6/10 or 7/10. Exact tenths
(``k / 10``) would count 3/10 where the devkit does not. Each of these moves a
class's AP by up to 1/11 of a precision on small test sets.

Deliberate, documented differences from the MATLAB code:

- a class without non-difficult ground truth (``npos = 0``) has AP NaN (the
  devkit divides by zero); it is reported as NaN and left out of the mAP;
- ignored detections are dropped from the precision/recall curves: they only
  repeat the previous point (or give 0 / 0 before the first TP or FP, which
  MATLAB's ``max`` skips), so the AP is unchanged -- except when every
  detection of a class is ignored, where MATLAB returns NaN and we return 0;
- the 11 precisions are summed with one rounding (``math.fsum``): the devkit's
  running ``ap + p / 11`` gives 1.0000000000000002 for a perfect detector.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from sppnet.evaluation._inputs import Flat, check_inputs

__all__ = [
    "VOC07_RECALL_THRESHOLDS",
    "PRCurve",
    "average_precision",
    "best_f1_thresholds",
    "precision_recall",
]

#: The recall thresholds of ``VOCevaldet.m``'s ``for t = 0:0.1:1``, as MATLAB's
#: colon operator computes them: from the start for the first half, from the end
#: for the second (index 3 is 0.30000000000000004; 6 and 7 are 0.6 and 0.7).
VOC07_RECALL_THRESHOLDS: tuple[float, ...] = tuple(k * 0.1 if k <= 5 else 1.0 - (10 - k) * 0.1 for k in range(11))


class PRCurve(NamedTuple):
    """Precision/recall curve of one class, one point per counted detection.

    Detections are in decreasing score order; those ignored because they hit
    a difficult object are left out (they do not move the curve).
    """

    recall: np.ndarray  # float64[D]
    precision: np.ndarray  # float64[D]
    scores: np.ndarray  # float64[D], the score at each point
    num_positives: int  # non-difficult ground truths of the class


# --------------------------------------------------------------------------- AP


def average_precision(recall: np.ndarray, precision: np.ndarray, metric: str = "voc07") -> float:
    """Average precision of one precision/recall curve.

    Args:
        recall (ndarray[D]): recall after each detection, non-decreasing.
        precision (ndarray[D]): precision after each detection.
        metric (str): ``"voc07"``: 11-point interpolation, the mean over
            the 11 thresholds ``t`` of MATLAB's ``0:0.1:1``
            (:data:`VOC07_RECALL_THRESHOLDS`) of the highest precision at
            recall ``>= t`` (0 if none) -- the VOC2007 devkit and SPP-net's tables;
            ``"voc12"``: area under the monotone precision envelope (VOC2010+
            devkit ``VOCap``).

    Returns:
        float: the AP in [0, 1] (0 for an empty curve).
    """
    recall = np.asarray(recall, dtype=np.float64)
    precision = np.asarray(precision, dtype=np.float64)
    if recall.shape != precision.shape or recall.ndim != 1:
        raise ValueError(
            f"recall and precision must be 1-D arrays of one length, got shapes {recall.shape} and {precision.shape}"
        )
    if metric == "voc07":
        points = []
        for t in VOC07_RECALL_THRESHOLDS:
            above = precision[recall >= t]  # the devkit's doubles: 3/10 < t[3] (see the module docstring)
            points.append(float(above.max()) if above.size else 0.0)
        # One rounding (the devkit's running ap + p / 11 gives 1.0000000000000002
        # for a perfect detector).
        return math.fsum(points) / 11
    if metric == "voc12":
        mrec = np.concatenate(([0.0], recall, [1.0]))
        mpre = np.concatenate(([0.0], precision, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone envelope
        i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1  # where recall changes
        return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))
    raise ValueError(f"metric must be 'voc07' or 'voc12' here, got {metric!r}")


# ---------------------------------------------------------------- VOC matching


def _group(labels: np.ndarray, num_classes: int, order: np.ndarray) -> np.ndarray:
    """Bounds of each class in ``labels[order]`` (sorted by label): int64[C + 1]."""
    return np.searchsorted(labels[order], np.arange(num_classes + 1))


def _voc_outcomes(
    det_boxes: np.ndarray,
    det_images: np.ndarray,
    gt_boxes: np.ndarray,
    gt_images: np.ndarray,
    gt_difficult: np.ndarray,
    iou_threshold: float,
    inclusive: bool,
) -> np.ndarray:
    """Devkit decision for each detection of one class.

    Args:
        det_boxes (ndarray[D, 4]): detections sorted by decreasing score.
        det_images (ndarray[D]): image of each detection.
        gt_boxes (ndarray[G, 4]): ground truths of the class, sorted by image.
        gt_images (ndarray[G]): image of each ground truth (non-decreasing).
        gt_difficult (ndarray[G]): difficult flags.

    Returns:
        int8[D]: 1 true positive, 0 false positive, -1 ignored (difficult).
    """
    num_dets = det_images.shape[0]
    outcome = np.zeros(num_dets, dtype=np.int8)
    start = np.searchsorted(gt_images, det_images, side="left")  # [D]
    counts = np.searchsorted(gt_images, det_images, side="right") - start  # gts in the det's image
    num_pairs = int(counts.sum())
    if num_pairs == 0:
        return outcome  # no ground truth anywhere near: all false positives
    # One row per (detection, ground truth of its image) pair, grouped by detection
    # and, inside a group, by ascending ground-truth index.
    first_pair = np.cumsum(counts) - counts  # [D]
    pair_det = np.repeat(np.arange(num_dets), counts)  # [P]
    pair_gt = np.repeat(start - first_pair, counts) + np.arange(num_pairs)  # [P]

    # Devkit overlap, same operations in the same order (bit-identical doubles).
    off = 1.0 if inclusive else 0.0
    bb, gt = det_boxes[pair_det], gt_boxes[pair_gt]  # [P, 4] each
    iw = np.minimum(bb[:, 2], gt[:, 2]) - np.maximum(bb[:, 0], gt[:, 0]) + off
    ih = np.minimum(bb[:, 3], gt[:, 3]) - np.maximum(bb[:, 1], gt[:, 1]) + off
    intersects = (iw > 0) & (ih > 0)
    ua = (
        (bb[:, 2] - bb[:, 0] + off) * (bb[:, 3] - bb[:, 1] + off)
        + ((gt[:, 2] - gt[:, 0] + off) * (gt[:, 3] - gt[:, 1] + off))
        - iw * ih
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = np.where(intersects, iw * ih / ua, -np.inf)  # [P]; -inf: never a candidate

    has_gt = counts > 0
    ovmax = np.full(num_dets, -np.inf)
    ovmax[has_gt] = np.maximum.reduceat(ov, first_pair[has_gt])
    # jmax: first ground truth reaching the maximum (the devkit's strict '>').
    at_max = np.flatnonzero(ov == ovmax[pair_det])
    first = np.ones(at_max.size, dtype=bool)
    first[1:] = pair_det[at_max[1:]] != pair_det[at_max[:-1]]
    jmax = np.zeros(num_dets, dtype=np.int64)
    jmax[pair_det[at_max[first]]] = pair_gt[at_max[first]]

    hit = ovmax >= iou_threshold
    ignored = hit & gt_difficult[jmax]
    claims = np.flatnonzero(hit & ~gt_difficult[jmax])  # in score order
    _, first_claim = np.unique(jmax[claims], return_index=True)
    outcome[claims[first_claim]] = 1  # the first claim of a ground truth; the rest are duplicates
    outcome[ignored] = -1
    return outcome


def _voc_curves(
    dets: Flat,
    gts: Flat,
    class_names: Sequence[str],
    iou_threshold: float,
    inclusive: bool,
) -> dict[str, PRCurve]:
    num_classes = len(class_names)
    # Detections: by class, then decreasing score; both sorts stable so ties keep
    # the input order (image, then position in the image), like MATLAB's sort.
    det_order = np.argsort(-dets.scores, kind="stable")
    det_order = det_order[np.argsort(dets.labels[det_order], kind="stable")]
    det_bounds = _group(dets.labels, num_classes, det_order)
    # Ground truths: by class, then image.
    gt_order = np.argsort(gts.images, kind="stable")
    gt_order = gt_order[np.argsort(gts.labels[gt_order], kind="stable")]
    gt_bounds = _group(gts.labels, num_classes, gt_order)

    curves = {}
    for c, name in enumerate(class_names):
        d = det_order[det_bounds[c] : det_bounds[c + 1]]
        g = gt_order[gt_bounds[c] : gt_bounds[c + 1]]
        outcome = _voc_outcomes(
            dets.boxes[d],
            dets.images[d],
            gts.boxes[g],
            gts.images[g],
            gts.difficult[g],
            iou_threshold,
            inclusive,
        )
        counted = outcome >= 0
        tp = np.cumsum(outcome[counted] == 1).astype(np.float64)
        fp = np.cumsum(outcome[counted] == 0).astype(np.float64)
        npos = int(np.count_nonzero(~gts.difficult[g]))
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = tp / npos if npos else np.full_like(tp, np.nan)
        curves[name] = PRCurve(
            recall=recall,
            precision=tp / (tp + fp),
            scores=dets.scores[d][counted],
            num_positives=npos,
        )
    return curves


def precision_recall(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    inclusive: bool = True,
) -> dict[str, PRCurve]:
    """Per-class precision/recall curves under the PASCAL VOC matching rules.

    Args:
        predictions (list[dict]): per image ``boxes`` (Tensor[D, 4]),
            ``scores`` (Tensor[D]), ``labels`` (Tensor[D], int).
        ground_truths (list[dict]): per image ``boxes`` (Tensor[G, 4]),
            ``labels`` (Tensor[G]), optional ``difficult`` (Tensor[G], bool).
        class_names (sequence of str): names of the label indices.
        iou_threshold (float): minimum IoU of a true positive (0.5 in VOC).
        inclusive (bool): boxes are inclusive pixel indices (devkit ``+1``).

    Returns:
        dict mapping each class name to a :class:`PRCurve` (recall, precision
        and score per counted detection, plus the number of positives). A class
        without non-difficult ground truth has NaN recall.

    Raises:
        ValueError: on mismatched list lengths, missing keys, wrong shapes,
            out-of-range labels or malformed boxes (naming image and row).
    """
    dets, gts = check_inputs(predictions, ground_truths, class_names, iou_threshold)
    return _voc_curves(dets, gts, class_names, iou_threshold, inclusive)


def best_f1_thresholds(
    curves: Mapping[str, PRCurve],
) -> dict[str, dict[str, float | None]]:
    """The operating point of best F1 on each class's precision/recall curve.

    For each class: ``threshold`` -- a score such that keeping the detections
    scoring strictly above it keeps exactly the counted detections up to the
    best-F1 point (the midpoint between that detection's score and the next
    lower one, or the next representable value below it when it is the last;
    in float32 when the scores are float32 values, so the cut survives a
    float32 comparison); ``f1``, ``precision``,
    ``recall`` at that point. A class without detections or without
    non-difficult ground truth gets ``None`` for all four.

    Args:
        curves: :func:`precision_recall`'s output.

    Returns:
        ``{class: {"threshold", "f1", "precision", "recall"}}``.
    """
    out: dict[str, dict[str, float | None]] = {}
    for name, pr in curves.items():
        if len(pr.scores) == 0 or not pr.num_positives:
            out[name] = {
                "threshold": None,
                "f1": None,
                "precision": None,
                "recall": None,
            }
            continue
        p, r = pr.precision, pr.recall
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
        # Ties in score cannot be split by a threshold: only the last of a run of
        # equal scores is a reachable operating point.
        last_of_score = np.append(pr.scores[1:] != pr.scores[:-1], True)
        f1 = np.where(last_of_score, f1, -1.0)
        k = int(np.argmax(f1))
        # Work in float32 when the scores are float32 values (model outputs), so
        # that the cut still separates them once compared in float32.
        dtype = np.float32 if np.array_equal(pr.scores.astype(np.float32), pr.scores) else np.float64
        score = dtype(pr.scores[k])
        cut = dtype(np.nextafter(score, dtype(-np.inf)))
        if k + 1 < len(pr.scores):
            mid = dtype((np.float64(score) + np.float64(pr.scores[k + 1])) / 2)
            cut = mid if mid < score else cut  # adjacent values: the one below is the cut (strict >)
        threshold = float(cut)
        out[name] = {
            "threshold": threshold,
            "f1": float(f1[k]),
            "precision": float(p[k]),
            "recall": float(r[k]),
        }
    return out


def voc_average_precisions(
    dets: Flat,
    gts: Flat,
    class_names: Sequence[str],
    iou_threshold: float,
    metric: str,
    inclusive: bool,
) -> dict[str, float]:
    """AP of each class from checked inputs (NaN for a class without non-difficult ground truth)."""
    curves = _voc_curves(dets, gts, class_names, iou_threshold, inclusive)
    return {
        name: float("nan") if curve.num_positives == 0 else average_precision(curve.recall, curve.precision, metric)
        for name, curve in curves.items()
    }
