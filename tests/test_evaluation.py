"""Detection evaluation against hand-computed values, a loop transcription of the
PASCAL VOC devkit (VOCevaldet.m / VOCap.m) and pycocotools."""

import contextlib
import io
import math
import sys

import numpy as np
import pytest
import torch

from sppnet.evaluation import (
    VOC07_RECALL_THRESHOLDS,
    PRCurve,
    average_precision,
    best_f1_thresholds,
    coco_ground_truth,
    coco_image_ids,
    coco_results,
    evaluate_detections,
    precision_recall,
    save_coco_results,
)

# ------------------------------------------------------------------ helpers


def pred(boxes, scores, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [0] * len(boxes) if labels is None else labels
    scores = torch.tensor(scores, dtype=torch.float32)
    return {
        "boxes": boxes,
        "scores": scores,
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def target(boxes, labels=None, difficult=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    labels = [0] * len(boxes) if labels is None else labels
    out = {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.long)}
    if difficult is not None:
        out["difficult"] = torch.tensor(difficult, dtype=torch.bool)
    return out


A = [0, 0, 9, 9]  # 10x10 pixels
B = [20, 20, 29, 29]
C = [40, 0, 49, 9]
NOWHERE = [100, 100, 109, 109]


def ap_of(preds, gts, metric="voc07", **kw):
    return evaluate_detections(preds, gts, ["thing"], metric=metric, **kw)["ap"]["thing"]


# ------------------------------------------------------- devkit reference


def nan_max(values):
    """MATLAB's max: NaNs are skipped; [] if nothing is left (here None)."""
    values = [v for v in values if not math.isnan(v)]
    return max(values) if values else None


def matlab_colon(a, d, b):
    """MATLAB's ``a:d:b`` (colon.m): n = round((b - a) / d) steps, the first half
    counted from ``a`` (``a + k*d``), the second from ``b`` (``b - (n-k)*d``), the
    middle of an even n at ``(a + b) / 2``."""
    n = round((b - a) / d)
    out = []
    for k in range(n + 1):
        if 2 * k < n:
            out.append(a + k * d)
        elif 2 * k > n:
            out.append(b - (n - k) * d)
        else:
            out.append((a + b) / 2)
    return out


def devkit_ap(preds, gts, cls, iou_threshold, metric, inclusive=True):
    """VOCevaldet.m + VOCap.m for one class, transcribed loop for loop.

    Differences, as documented in sppnet.evaluation: npos = 0 gives NaN; an
    all-NaN precision gives p = 0.
    """
    off = 1.0 if inclusive else 0.0
    # load ground truth objects
    gt = []
    npos = 0
    for t in gts:
        keep = [j for j, lab in enumerate(t["labels"].tolist()) if lab == cls]
        diff = t["difficult"].tolist() if "difficult" in t else [False] * len(t["labels"])
        gt.append(
            {
                "BB": [t["boxes"][j].double().tolist() for j in keep],
                "diff": [bool(diff[j]) for j in keep],
                "det": [False] * len(keep),
            }
        )
        npos += sum(not diff[j] for j in keep)
    # load results
    ids, confidence, BB = [], [], []
    for i, p in enumerate(preds):
        for d, lab in enumerate(p["labels"].tolist()):
            if lab == cls:
                ids.append(i)
                confidence.append(float(p["scores"][d]))
                BB.append(p["boxes"][d].double().tolist())
    # sort detections by decreasing confidence (Python's sort is stable, like MATLAB's)
    si = sorted(range(len(confidence)), key=lambda d: -confidence[d])
    ids = [ids[d] for d in si]
    BB = [BB[d] for d in si]
    # assign detections to ground truth objects
    nd = len(confidence)
    tp = [0] * nd
    fp = [0] * nd
    for d in range(nd):
        i = ids[d]
        bb = BB[d]
        ovmax = -math.inf
        jmax = None
        for j, bbgt in enumerate(gt[i]["BB"]):
            bi = [
                max(bb[0], bbgt[0]),
                max(bb[1], bbgt[1]),
                min(bb[2], bbgt[2]),
                min(bb[3], bbgt[3]),
            ]
            iw = bi[2] - bi[0] + off
            ih = bi[3] - bi[1] + off
            if iw > 0 and ih > 0:
                # compute overlap as area of intersection / area of union
                ua = (
                    (bb[2] - bb[0] + off) * (bb[3] - bb[1] + off)
                    + ((bbgt[2] - bbgt[0] + off) * (bbgt[3] - bbgt[1] + off))
                    - iw * ih
                )
                ov = iw * ih / ua
                if ov > ovmax:
                    ovmax = ov
                    jmax = j
        # assign detection as true positive/don't care/false positive
        if ovmax >= iou_threshold:
            if not gt[i]["diff"][jmax]:
                if not gt[i]["det"][jmax]:
                    tp[d] = 1  # true positive
                    gt[i]["det"][jmax] = True
                else:
                    fp[d] = 1  # false positive (multiple detection)
        else:
            fp[d] = 1  # false positive
    if npos == 0:
        return math.nan
    # compute precision/recall
    rec, prec = [], []
    ctp = cfp = 0
    for d in range(nd):
        ctp += tp[d]
        cfp += fp[d]
        rec.append(ctp / npos)
        prec.append(ctp / (ctp + cfp) if ctp + cfp else math.nan)
    # compute average precision
    if metric == "voc07":
        ap = 0.0
        for t in matlab_colon(0.0, 0.1, 1.0):
            p = nan_max([prec[d] for d in range(nd) if rec[d] >= t])
            ap += (0.0 if p is None else p) / 11
        return ap
    mrec = [0.0] + rec + [1.0]
    mpre = [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = nan_max([mpre[i], mpre[i + 1]])
    ap = 0.0
    for i in range(1, len(mrec)):
        if mrec[i] != mrec[i - 1]:
            ap += (mrec[i] - mrec[i - 1]) * mpre[i]
    return ap


def random_dataset(seed, num_images=120, num_classes=3, integer=True):
    """Images with a few objects and detections: jittered copies of objects
    (true positives, duplicates, near misses), random boxes, tied scores,
    difficult objects, images without objects or without detections."""
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(num_images):
        n_gt = int(rng.integers(0, 5))
        xy = rng.uniform(0, 60, (n_gt, 2))
        gt_boxes = np.concatenate([xy, xy + rng.uniform(2, 30, (n_gt, 2))], axis=1)
        gt_labels = rng.integers(0, num_classes, n_gt)
        if n_gt and rng.random() < 0.3:  # a repeated object: exact IoU ties between objects
            gt_boxes = np.concatenate([gt_boxes, gt_boxes[:1]])
            gt_labels = np.concatenate([gt_labels, gt_labels[:1]])
            n_gt += 1
        n_near = int(rng.integers(0, 2 * n_gt + 1))
        src = rng.integers(0, max(n_gt, 1), n_near)
        near = gt_boxes[src] + rng.normal(0, 3, (n_near, 4)) if n_gt else np.zeros((0, 4))
        near_labels = gt_labels[src] if n_gt else np.zeros(0, np.int64)
        n_rand = int(rng.integers(0, 6))
        xy = rng.uniform(0, 60, (n_rand, 2))
        rand = np.concatenate([xy, xy + rng.uniform(2, 30, (n_rand, 2))], axis=1)
        det_boxes = np.concatenate([near, rand])
        det_boxes[:, 2:] = np.maximum(det_boxes[:, 2:], det_boxes[:, :2])
        if integer:  # exact IoU ties and IoU == threshold cases
            det_boxes, gt_boxes = det_boxes.round(), gt_boxes.round()
        det_labels = np.concatenate([near_labels, rng.integers(0, num_classes, n_rand)])
        scores = rng.integers(0, 8, len(det_boxes)) / 8  # many ties
        preds.append(
            {
                "boxes": torch.tensor(det_boxes, dtype=torch.float32).reshape(-1, 4),
                "scores": torch.tensor(scores, dtype=torch.float32),
                "labels": torch.tensor(det_labels, dtype=torch.long),
            }
        )
        gts.append(
            {
                "boxes": torch.tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(gt_labels, dtype=torch.long),
                "difficult": torch.tensor(rng.random(n_gt) < 0.2),
            }
        )
    return preds, gts


# ------------------------------------------------------ hand-computed cases


def test_hand_computed_three_objects_five_detections():
    # One class, three objects (A, B in image 0; C in image 1), five detections.
    # In score order: TP(A), FP(nothing), TP(B), FP(duplicate on A), TP(C):
    #   cumTP = 1, 1, 2, 2, 3    cumFP = 0, 1, 1, 2, 2
    #   recall    = 1/3, 1/3, 2/3, 2/3, 1
    #   precision = 1,   1/2, 2/3, 1/2, 3/5
    # 11-point AP: t = 0, .1, .2, .3        -> max precision at recall >= t = 1
    #              t = .4, .5, .6           -> max(2/3, 1/2, 3/5) = 2/3
    #              t = .7, .8, .9, 1        -> 3/5
    #   AP = (4 * 1 + 3 * 2/3 + 4 * 3/5) / 11 = 8.4 / 11 = 42/55
    # VOC2010 AP: envelope 1, 1, 2/3, 2/3, 3/5; area = 1/3 * (1 + 2/3 + 3/5) = 34/45
    preds = [
        pred([B, [1, 1, 9, 9], NOWHERE, A], [0.7, 0.6, 0.8, 0.9]),  # input order shuffled
        pred([C], [0.5]),
    ]
    gts = [target([A, B]), target([C])]
    assert ap_of(preds, gts, "voc07") == pytest.approx(42 / 55, abs=1e-15)
    assert ap_of(preds, gts, "voc12") == pytest.approx(34 / 45, abs=1e-15)
    curve = precision_recall(preds, gts, ["thing"])["thing"]
    assert isinstance(curve, PRCurve) and curve.num_positives == 3
    np.testing.assert_allclose(curve.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5])
    np.testing.assert_allclose(curve.scores, [0.9, 0.8, 0.7, 0.6, 0.5], rtol=1e-6)


def test_voc07_and_voc12_differ():
    # Two objects; detections TP, FP, TP: recall .5, .5, 1; precision 1, .5, 2/3.
    # voc07: t <= .5 -> 1 (6 points), t >= .6 -> 2/3 (5 points): (6 + 10/3) / 11 = 28/33.
    # voc12: .5 * 1 + .5 * 2/3 = 5/6.
    preds = [pred([A, NOWHERE, B], [0.9, 0.8, 0.7])]
    gts = [target([A, B])]
    assert ap_of(preds, gts, "voc07") == pytest.approx(28 / 33, abs=1e-15)
    assert ap_of(preds, gts, "voc12") == pytest.approx(5 / 6, abs=1e-15)


def test_duplicate_detection_is_false_positive():
    preds = [pred([A, [0, 0, 9, 8], B], [0.9, 0.8, 0.7])]  # second box is a duplicate on A
    gts = [target([A, B])]
    curve = precision_recall(preds, gts, ["thing"])["thing"]
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3])
    np.testing.assert_allclose(curve.recall, [1 / 2, 1 / 2, 1])
    assert ap_of(preds, gts) == pytest.approx(28 / 33, abs=1e-15)


def test_max_iou_object_is_used_even_if_already_matched():
    # Devkit quirk: the detection goes to its highest-IoU object even when that one
    # is taken, and becomes a duplicate although another free object has IoU >= .5.
    g1 = [0, 0, 9, 9]
    g2 = [0, 0, 9, 11]  # IoU(g1, g2) = 100 / 120
    preds = [pred([g1, g1], [0.9, 0.8])]
    gts = [target([g1, g2])]
    curve = precision_recall(preds, gts, ["thing"])["thing"]
    np.testing.assert_array_equal(curve.precision, [1.0, 0.5])  # not [1, 1]
    np.testing.assert_array_equal(curve.recall, [0.5, 0.5])


def test_difficult_objects_neither_count_nor_penalise():
    preds = [pred([A, B], [0.9, 0.8])]
    # A difficult: the detection on it is ignored; npos = 1 -> AP 1.
    assert ap_of(preds, [target([A, B], difficult=[True, False])]) == 1.0
    curve = precision_recall(preds, [target([A, B], difficult=[True, False])], ["thing"])["thing"]
    np.testing.assert_array_equal(curve.precision, [1.0])
    assert curve.num_positives == 1
    # Without the flag both count.
    assert ap_of(preds, [target([A, B], difficult=[False, False])]) == 1.0
    # A difficult object that is missed is not a missed positive: AP 1 instead of 6/11.
    assert ap_of([pred([B], [0.9])], [target([A, B], difficult=[True, False])]) == 1.0
    assert ap_of([pred([B], [0.9])], [target([A, B])]) == pytest.approx(6 / 11, abs=1e-15)


def test_detection_on_difficult_object_with_best_iou_is_ignored_not_matched():
    # The detection overlaps the difficult object most, so it is ignored even though it
    # would also match the normal object (IoU >= .5); the normal object stays missed.
    easy = [0, 0, 9, 11]
    hard = [0, 0, 9, 9]
    preds = [pred([hard], [0.9])]
    gts = [target([easy, hard], difficult=[False, True])]
    curve = precision_recall(preds, gts, ["thing"])["thing"]
    assert curve.recall.size == 0
    assert ap_of(preds, gts) == 0.0


def test_iou_tie_between_objects_goes_to_the_first():
    # Two identical objects (IoU tie): the devkit's strict '>' keeps the first one.
    preds = [pred([A], [0.9])]
    assert ap_of(preds, [target([A, A], difficult=[True, False])]) == 0.0  # ignored; npos = 1
    assert ap_of(preds, [target([A, A], difficult=[False, True])]) == 1.0  # matched


def test_plus_one_convention_decides_a_match_at_exactly_half():
    # Inclusive pixels: gt 10x10 = 100, det 10x5 = 50 inside it -> IoU 50/100 = 0.5 exactly.
    # Continuous: 9x9 = 81 vs 9x4 = 36 -> IoU 36/81 < 0.5.
    preds = [pred([[0, 0, 9, 4]], [1.0])]
    gts = [target([[0, 0, 9, 9]])]
    assert ap_of(preds, gts, inclusive=True) == 1.0
    assert ap_of(preds, gts, inclusive=False) == 0.0


def test_touching_boxes_overlap_only_with_plus_one():
    # Sharing the pixel column x = 9: inclusive IoU = 10 / 190, continuous IoU = 0.
    preds = [pred([[9, 0, 18, 9]], [1.0])]
    gts = [target([A])]
    assert ap_of(preds, gts, iou_threshold=0.05, inclusive=True) == 1.0
    assert ap_of(preds, gts, iou_threshold=0.05, inclusive=False) == 0.0


def test_score_ties_keep_input_order():
    # Same score: the false positive listed first is ranked first.
    # FP then TP: precision 0, 1/2 at recall 0, 1/2 -> (6 * 1/2) / 11 = 3/11.
    gts = [target([A, B])]
    assert ap_of([pred([NOWHERE, A], [0.5, 0.5])], gts) == pytest.approx(3 / 11, abs=1e-15)
    assert ap_of([pred([A, NOWHERE], [0.5, 0.5])], gts) == pytest.approx(6 / 11, abs=1e-15)
    # Across images: image order.
    gts2 = [target([A]), target([B])]
    assert ap_of([pred([NOWHERE], [0.5]), pred([B], [0.5])], gts2) == pytest.approx(3 / 11, abs=1e-15)
    assert ap_of([pred([A], [0.5]), pred([NOWHERE], [0.5])], gts2) == pytest.approx(6 / 11, abs=1e-15)


def test_voc07_thresholds_are_matlabs_doubles():
    # The doubles of MATLAB's 0:0.1:1, written out: 0.3 is 3 * 0.1; 0.6, 0.7 the nearest doubles.
    expected = [0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert list(VOC07_RECALL_THRESHOLDS) == expected == matlab_colon(0.0, 0.1, 1.0)
    assert 3 / 10 < VOC07_RECALL_THRESHOLDS[3] and 6 / 10 >= VOC07_RECALL_THRESHOLDS[6]
    assert 7 / 10 >= VOC07_RECALL_THRESHOLDS[7]


def eleven_point(recall, precision, thresholds):
    return sum(max((p for r, p in zip(recall, precision) if r >= t), default=0.0) for t in thresholds) / 11


def test_voc07_recalls_of_exactly_three_six_and_seven_tenths():
    # 10 objects; T = true positive, F = false positive, in score order:
    #   TTT F TTT FFF T FFFFF T  ->  recall exactly 3/10 (precision 1), 6/10 (6/7), 7/10 (7/11).
    # t = 0.3: k/10 counts recall 3/10 (p = 1), MATLAB's 0.30000000000000004 does not (p = 6/7);
    # t = 0.6, 0.7: MATLAB counts 6/10 and 7/10, np.arange's 0.6000000000000001 and
    # 0.7000000000000001 do not (p = 7/11 and 8/17 instead of 6/7 and 7/11).
    objects = [[20 * k, 0, 20 * k + 9, 9] for k in range(10)]
    pattern = "TTTFTTTFFFTFFFFFT"
    boxes, found = [], 0
    for j, c in enumerate(pattern):
        if c == "T":
            boxes.append(objects[found])
            found += 1
        else:
            boxes.append([300 + 20 * j, 300, 309 + 20 * j, 309])
    scores = [1.0 - j / 100 for j in range(len(pattern))]
    preds, gts = [pred(boxes, scores)], [target(objects)]

    curve = precision_recall(preds, gts, ["thing"])["thing"]
    assert {3 / 10, 6 / 10, 7 / 10} <= set(curve.recall.tolist())
    matlab = eleven_point(curve.recall, curve.precision, matlab_colon(0.0, 0.1, 1.0))
    tenths = eleven_point(curve.recall, curve.precision, [k / 10 for k in range(11)])
    arange = eleven_point(curve.recall, curve.precision, np.arange(0.0, 1.1, 0.1).tolist())
    assert len({matlab, tenths, arange}) == 3  # the case tells the three apart
    assert ap_of(preds, gts) == pytest.approx(matlab, abs=1e-15)
    assert ap_of(preds, gts) == pytest.approx(devkit_ap(preds, gts, 0, 0.5, "voc07"), abs=1e-15)
    assert average_precision(curve.recall, curve.precision) == pytest.approx(matlab, abs=1e-15)


def test_average_precision_direct():
    assert average_precision(np.array([]), np.array([]), "voc07") == 0.0
    assert average_precision(np.array([]), np.array([]), "voc12") == 0.0
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert average_precision(rec, prec, "voc07") == pytest.approx(28 / 33, abs=1e-15)
    assert average_precision(rec, prec, "voc12") == pytest.approx(5 / 6, abs=1e-15)
    with pytest.raises(ValueError, match="metric must be 'voc07' or 'voc12' here, got 'coco'"):
        average_precision(rec, prec, "coco")
    with pytest.raises(ValueError, match=r"got shapes \(3,\) and \(2,\)"):
        average_precision(rec, prec[:2])


def test_classes_without_ground_truth_are_nan_and_left_out():
    preds = [pred([A, B, C], [0.9, 0.8, 0.7], labels=[0, 1, 2])]
    gts = [target([A, B], labels=[0, 1], difficult=[False, True])]
    out = evaluate_detections(preds, gts, ["a", "b", "c"])
    assert out["ap"]["a"] == 1.0
    assert math.isnan(out["ap"]["b"])  # only a difficult object
    assert math.isnan(out["ap"]["c"])  # no object at all
    assert out["mAP"] == 1.0
    empty = evaluate_detections([pred([], [])], [target([])], ["a"])
    assert math.isnan(empty["mAP"]) and math.isnan(empty["ap"]["a"])


def test_no_detections_gives_zero():
    out = evaluate_detections([pred([], []), pred([], [])], [target([A]), target([])], ["a"], metric="voc12")
    assert out == {"mAP": 0.0, "ap": {"a": 0.0}}


def test_numpy_inputs_accepted():
    preds = [
        {
            "boxes": np.array([A], dtype=np.float64),
            "scores": np.array([0.3]),
            "labels": np.array([0]),
        }
    ]
    gts = [
        {
            "boxes": np.array([A]),
            "labels": np.array([0]),
            "difficult": np.array([False]),
        }
    ]
    assert evaluate_detections(preds, gts, ["a"])["mAP"] == 1.0


# --------------------------------------------------- devkit reference, random


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("metric", ["voc07", "voc12"])
def test_matches_devkit_loop_on_random_data(seed, metric):
    preds, gts = random_dataset(seed, integer=seed % 2 == 0)
    names = ["a", "b", "c"]
    for iou_threshold, inclusive in [(0.5, True), (0.7, True), (0.5, False)]:
        out = evaluate_detections(preds, gts, names, iou_threshold, metric, inclusive=inclusive)
        for c, name in enumerate(names):
            expected = devkit_ap(preds, gts, c, iou_threshold, metric, inclusive)
            if math.isnan(expected):
                assert math.isnan(out["ap"][name])
            else:
                assert out["ap"][name] == pytest.approx(expected, abs=1e-12), (
                    name,
                    iou_threshold,
                    inclusive,
                )


def test_five_thousand_images_complete():
    # 5,000 images x 100 detections, 20 classes: the VOC07 test-set scale. Only
    # checks that it finishes with sane numbers (under a second; see the module doc).
    rng = np.random.default_rng(0)
    num_images, num_dets, num_gts, num_classes = 5000, 100, 3, 20
    xy = rng.uniform(0, 400, (num_images, num_gts, 2))
    gt_boxes = np.concatenate([xy, xy + rng.uniform(10, 100, xy.shape)], axis=2)
    gt_labels = rng.integers(0, num_classes, (num_images, num_gts))
    xy = rng.uniform(0, 400, (num_images, num_dets, 2))
    det_boxes = np.concatenate([xy, xy + rng.uniform(10, 100, xy.shape)], axis=2)
    det_boxes[:, :num_gts] = gt_boxes + rng.normal(0, 4, gt_boxes.shape)
    det_boxes[..., 2:] = np.maximum(det_boxes[..., 2:], det_boxes[..., :2])
    det_labels = rng.integers(0, num_classes, (num_images, num_dets))
    det_labels[:, :num_gts] = gt_labels
    scores = rng.random((num_images, num_dets))
    difficult = rng.random((num_images, num_gts)) < 0.1
    preds = [
        {
            "boxes": torch.from_numpy(det_boxes[i]),
            "scores": torch.from_numpy(scores[i]),
            "labels": torch.from_numpy(det_labels[i]),
        }
        for i in range(num_images)
    ]
    gts = [
        {
            "boxes": torch.from_numpy(gt_boxes[i]),
            "labels": torch.from_numpy(gt_labels[i]),
            "difficult": torch.from_numpy(difficult[i]),
        }
        for i in range(num_images)
    ]
    out = evaluate_detections(preds, gts, [f"class{c}" for c in range(num_classes)])
    assert len(out["ap"]) == num_classes
    assert 0.0 < out["mAP"] < 1.0
    assert all(0.0 <= v <= 1.0 for v in out["ap"].values())


# ------------------------------------------------------------------- COCO


def coco_reference_stats(preds, gts, num_classes):
    """pycocotools used the documented way (loadRes, summarize): AP, AP50, AP75."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    anns, results = [], []
    for i, (p, t) in enumerate(zip(preds, gts)):
        for box, lab, diff in zip(t["boxes"].tolist(), t["labels"].tolist(), t["difficult"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": lab,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": int(diff),
                }
            )
        for box, lab, s in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            results.append(
                {
                    "image_id": i,
                    "category_id": lab,
                    "bbox": [box[0], box[1], w, h],
                    "score": s,
                }
            )
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {
            "images": [{"id": i} for i in range(len(gts))],
            "categories": [{"id": c} for c in range(num_classes)],
            "annotations": anns,
        }
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


@pytest.mark.parametrize("seed", range(2))
def test_coco_metric_matches_pycocotools_summary(seed):
    pytest.importorskip("pycocotools")
    preds, gts = random_dataset(seed, num_images=60, integer=False)
    g = torch.Generator().manual_seed(seed)
    for p in preds:  # distinct scores: no tie-breaking questions
        p["scores"] = torch.rand(len(p["scores"]), generator=g, dtype=torch.float64)
    out = evaluate_detections(preds, gts, ["a", "b", "c"], metric="coco", inclusive=False)
    ap, ap50, ap75 = coco_reference_stats(preds, gts, 3)
    assert out["mAP"] == pytest.approx(ap, abs=1e-12)
    assert out["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert out["AP75"] == pytest.approx(ap75, abs=1e-12)


def test_coco_known_values_and_agreement_with_voc():
    pytest.importorskip("pycocotools")
    # Perfect detections: every metric gives 1.
    preds, gts = [pred([A, B], [0.9, 0.8])], [target([A, B])]
    for metric in ("voc07", "voc12", "coco"):
        assert evaluate_detections(preds, gts, ["thing"], metric=metric)["mAP"] == pytest.approx(1.0)
    # One of two objects found (IoU 1), then a miss: precision 1 up to recall 1/2.
    # COCO: 101 recall points 0, .01, ..., .5 have precision 1 -> 51/101 at every IoU.
    # voc12: area 1/2; voc07: 6 of 11 points.
    preds = [pred([A, NOWHERE], [0.9, 0.8])]
    out = evaluate_detections(preds, gts, ["thing"], metric="coco")
    assert out["mAP"] == pytest.approx(51 / 101) and out["AP50"] == pytest.approx(51 / 101)
    assert ap_of(preds, gts, "voc12") == pytest.approx(0.5)
    assert ap_of(preds, gts, "voc07") == pytest.approx(6 / 11)
    # A class without objects: NaN, like the VOC metrics.
    out = evaluate_detections(preds, gts, ["thing", "other"], metric="coco")
    assert math.isnan(out["ap"]["other"]) and out["mAP"] == pytest.approx(51 / 101)


def test_coco_ap50_close_to_voc12_when_matching_rules_coincide():
    # With one object per image, COCO's "best unmatched object" and the devkit's
    # "best object" are the same rule, and with inclusive boxes the IoUs are equal;
    # the APs then differ only by COCO's 101-point sampling of the same envelope.
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(3)
    preds, gts = [], []
    for _ in range(80):
        xy = rng.uniform(0, 50, 2)
        obj = np.concatenate([xy, xy + rng.uniform(5, 30, 2)])
        dets = obj + rng.normal(0, 4, (3, 4))
        dets[:, 2:] = np.maximum(dets[:, 2:], dets[:, :2])
        preds.append(pred(dets.tolist(), rng.random(3).tolist()))
        gts.append(target([obj.tolist()]))
    coco = evaluate_detections(preds, gts, ["thing"], metric="coco")["AP50"]
    voc12 = ap_of(preds, gts, "voc12")
    assert 0.2 < voc12 < 0.95
    assert coco == pytest.approx(voc12, abs=0.02)


def test_coco_without_pycocotools_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.coco", None)
    with pytest.raises(ImportError, match="metric='coco' needs pycocotools"):
        evaluate_detections([pred([A], [1.0])], [target([A])], ["thing"], metric="coco")
    # The VOC metrics never need it.
    assert evaluate_detections([pred([A], [1.0])], [target([A])], ["thing"])["mAP"] == 1.0


# ------------------------------------------------------------- validation


def test_validation_errors_name_the_values():
    good_p, good_t = [pred([A], [1.0])], [target([A])]

    def raw(boxes, scores=None, labels=None):
        scores = torch.ones(1) if scores is None else scores
        labels = torch.zeros(1, dtype=torch.long) if labels is None else labels
        return [{"boxes": boxes, "scores": scores, "labels": labels}]

    with pytest.raises(ValueError, match="one entry per image, got 2 and 1"):
        evaluate_detections(good_p * 2, good_t, ["a"])
    with pytest.raises(
        ValueError,
        match=r"predictions\[1\]\['labels'\]\[2\] = 5 is out of range for 2 classes",
    ):
        preds = [pred([], []), pred([A, B, C], [1, 1, 1], [0, 1, 5])]
        evaluate_detections(preds, good_t * 2, ["a", "b"])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\['labels'\]\[0\] = -1 is out of range"):
        evaluate_detections(good_p, [target([A], labels=[-1])], ["a"])
    with pytest.raises(
        ValueError,
        match=r"predictions\[0\]\['boxes'\] must have shape \[N, 4\], got \(1, 5\)",
    ):
        evaluate_detections(raw(torch.zeros(1, 5)), good_t, ["a"])
    with pytest.raises(
        ValueError,
        match=r"\['scores'\] must have shape \[1\] \(one per box\), got \(2,\)",
    ):
        evaluate_detections(raw(torch.zeros(1, 4), scores=torch.ones(2)), good_t, ["a"])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\['difficult'\] must have shape \[1\]"):
        evaluate_detections(good_p, [target([A], difficult=[True, False])], ["a"])
    with pytest.raises(ValueError, match=r"predictions\[0\] has no 'scores'"):
        evaluate_detections(
            [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1, dtype=torch.long)}],
            good_t,
            ["a"],
        )
    with pytest.raises(
        ValueError,
        match=r"predictions\[0\]\['labels'\] must be integers, got dtype float32",
    ):
        evaluate_detections(raw(torch.zeros(1, 4), labels=torch.zeros(1)), good_t, ["a"])
    with pytest.raises(
        ValueError,
        match=r"ground_truths\[0\]\['boxes'\]\[1\] = \[5.0, 0.0, 4.0, 9.0\] must",
    ):
        evaluate_detections(good_p, [target([A, [5, 0, 4, 9]])], ["a"])
    with pytest.raises(
        ValueError,
        match=r"predictions\[0\]\['boxes'\]\[0\] = \[0.0, nan, 9.0, 9.0\] is not finite",
    ):
        evaluate_detections([pred([[0, math.nan, 9, 9]], [1.0])], good_t, ["a"])
    with pytest.raises(ValueError, match=r"predictions\[0\]\['scores'\]\[0\] is NaN"):
        evaluate_detections([pred([A], [math.nan])], good_t, ["a"])
    with pytest.raises(
        ValueError,
        match="metric must be one of \\('voc07', 'voc12', 'coco'\\), got 'voc10'",
    ):
        evaluate_detections(good_p, good_t, ["a"], metric="voc10")
    with pytest.raises(ValueError, match=r"iou_threshold must be in \(0, 1\], got 0"):
        evaluate_detections(good_p, good_t, ["a"], iou_threshold=0)
    with pytest.raises(ValueError, match=r"class_names must be unique, got duplicates \['a'\]"):
        evaluate_detections(good_p, good_t, ["a", "b", "a"])
    with pytest.raises(ValueError, match="class_names must be a non-empty sequence"):
        evaluate_detections(good_p, good_t, [])


# ------------------------------------------------------ best-F1 operating points


def f1_above(preds, gts, cls, threshold):
    """Brute force: keep class ``cls`` detections scoring > threshold, match them
    in score order (VOC rules: best-IoU object, difficult ignored, duplicates
    are false), and return (F1, precision, recall) over counted detections."""
    dets = [
        (float(p["scores"][d]), i, p["boxes"][d].double().tolist())
        for i, p in enumerate(preds)
        for d in range(len(p["scores"]))
        if int(p["labels"][d]) == cls and float(p["scores"][d]) > threshold
    ]
    dets.sort(key=lambda t: -t[0])
    taken = set()
    tp = fp = 0
    npos = sum(int(((g["labels"] == cls) & ~g["difficult"]).sum()) for g in gts)
    for _, i, bb in dets:
        best, jbest = -1.0, None
        for j in range(len(gts[i]["labels"])):
            if int(gts[i]["labels"][j]) != cls:
                continue
            g = gts[i]["boxes"][j].double().tolist()
            iw = min(bb[2], g[2]) - max(bb[0], g[0]) + 1
            ih = min(bb[3], g[3]) - max(bb[1], g[1]) + 1
            if iw > 0 and ih > 0:
                inter = iw * ih
                ov = inter / ((bb[2] - bb[0] + 1) * (bb[3] - bb[1] + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter)
                if ov > best:
                    best, jbest = ov, j
        if best >= 0.5:
            if bool(gts[i]["difficult"][jbest]):
                continue
            if (i, jbest) in taken:
                fp += 1
            else:
                taken.add((i, jbest))
                tp += 1
        else:
            fp += 1
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / npos
    return (2 * tp / (npos + tp + fp)), precision, recall


@pytest.mark.parametrize("seed", range(3))
def test_best_f1_thresholds_match_a_sweep_over_every_threshold(seed):
    preds, gts = random_dataset(seed, num_images=60)
    points = best_f1_thresholds(precision_recall(preds, gts, ["a", "b", "c"]))
    for cls, name in enumerate(["a", "b", "c"]):
        scores = sorted({float(v) for p in preds for v, lab in zip(p["scores"], p["labels"]) if int(lab) == cls})
        # every reachable cut: just below each distinct score
        sweep = [f1_above(preds, gts, cls, float(np.nextafter(s, -np.inf)))[0] for s in scores]
        point = points[name]
        assert point["f1"] == pytest.approx(max(sweep), abs=1e-12)
        f1, precision, recall = f1_above(preds, gts, cls, point["threshold"])
        assert (f1, precision, recall) == pytest.approx((point["f1"], point["precision"], point["recall"]), abs=1e-12)


def test_best_f1_thresholds_hand_computed_and_empty_classes():
    # Class 0: scores 0.9 (TP), 0.8 (FP), 0.7 (TP), 0.2 (FP); two objects.
    # F1 after each: 2/3, 1/2, 4/5, 2/3 -> best at 0.7, the cut halfway to 0.2.
    gt = target([[0, 0, 9, 9], [20, 20, 29, 29]], [0, 0])
    p = pred(
        [[0, 0, 9, 9], [40, 40, 49, 49], [20, 20, 29, 29], [60, 60, 69, 69]],
        [0.9, 0.8, 0.7, 0.2],
        [0, 0, 0, 0],
    )
    points = best_f1_thresholds(precision_recall([p], [gt], ["x", "y"]))
    assert points["x"]["threshold"] == pytest.approx(0.45)
    assert points["x"]["f1"] == pytest.approx(0.8)
    assert points["x"]["precision"] == pytest.approx(2 / 3) and points["x"]["recall"] == pytest.approx(1.0)
    assert points["y"] == {
        "threshold": None,
        "f1": None,
        "precision": None,
        "recall": None,
    }
    # the best point is the last detection: the cut sits just below its score
    p = pred([[0, 0, 9, 9], [20, 20, 29, 29]], [0.9, 0.3], [0, 0])
    point = best_f1_thresholds(precision_recall([p], [gt], ["x"]))["x"]
    below = torch.tensor(point["threshold"], dtype=torch.float32)
    assert point["f1"] == 1.0 and bool(below < torch.tensor(0.3)) and point["threshold"] == pytest.approx(0.3)
    # tied scores cannot be split: the cut keeps both or neither
    p = pred([[0, 0, 9, 9], [40, 40, 49, 49]], [0.5, 0.5], [0, 0])
    point = best_f1_thresholds(precision_recall([p], [gt], ["x"]))["x"]
    assert point["precision"] == 0.5 and point["threshold"] < 0.5
    # adjacent float32 scores: the cut is the lower one itself (kept only if > it)
    hi = float(torch.tensor(0.5))
    lo = float(np.nextafter(np.float32(0.5), np.float32(0)))
    p = pred([[0, 0, 9, 9], [40, 40, 49, 49]], [hi, lo], [0, 0])
    point = best_f1_thresholds(precision_recall([p], [gt], ["x"]))["x"]
    assert point["threshold"] == lo and point["precision"] == 1.0


# ------------------------------------------------------------- COCO results


def _cocoeval_stats(annotation_file, results_file):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation_file))
        ev = COCOeval(coco, coco.loadRes(str(results_file)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def test_coco_results_of_a_coco_data_set_load_against_its_own_annotation_file(tmp_path):
    # The user's workflow: a COCO data set (non-contiguous image and category ids, a
    # crowd region), detections written with coco_results, scored by pycocotools
    # against the ORIGINAL annotation file: the same AP as metric="coco".
    pytest.importorskip("pycocotools")
    import json

    from PIL import Image

    from sppnet.data import COCODetection

    rng = np.random.default_rng(0)
    images, annotations = [], []
    for n, image_id in enumerate([17, 4, 230, 9, 55, 101]):
        Image.new("RGB", (64, 48)).save(tmp_path / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 48})
        for k in range(int(rng.integers(1, 4))):
            x, y = (int(v) for v in rng.integers(0, 30, 2))
            w, h = (int(v) for v in rng.integers(4, 18, 2))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(rng.choice([3, 8, 12])),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": int(n == 2 and k == 0),
                }
            )
    categories = [
        {"id": 12, "name": "cat"},
        {"id": 3, "name": "dog"},
        {"id": 8, "name": "emu"},
    ]
    annotation_file = tmp_path / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    ds = COCODetection(tmp_path, annotation_file)
    assert sum(bool(r["difficult"].any()) for r in ds.records) == 1  # the crowd region

    preds = []
    for r in ds.records:  # jittered objects (hits and near misses) and random boxes, distinct scores
        boxes = r["boxes"].double() + torch.from_numpy(rng.normal(0, 2, (len(r["boxes"]), 4)))
        boxes = torch.cat(
            [
                boxes,
                torch.from_numpy(rng.uniform(0, 30, (2, 2))).repeat(1, 2) + torch.tensor([0, 0, 9, 9]),
            ]
        )
        boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2])
        labels = torch.cat([r["labels"], torch.from_numpy(rng.integers(0, 3, 2))])
        preds.append(
            {
                "boxes": boxes,
                "scores": torch.from_numpy(rng.random(len(boxes))),
                "labels": labels,
            }
        )
    results_file = tmp_path / "results.json"
    results = coco_results(preds, [r["id"] for r in ds.records], ds.category_ids)
    save_coco_results(results_file, results)
    assert {"image_id", "category_id", "bbox", "score"} == set(results[0])
    assert {r["image_id"] for r in results} <= {17, 4, 230, 9, 55, 101}
    assert {r["category_id"] for r in results} <= {3, 8, 12}

    ours = evaluate_detections(preds, ds.records, ds.class_names, metric="coco")
    ap, ap50, ap75 = _cocoeval_stats(annotation_file, results_file)
    assert 0.05 < ap < 0.95
    assert ours["mAP"] == pytest.approx(ap, abs=1e-12)
    assert ours["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert ours["AP75"] == pytest.approx(ap75, abs=1e-12)


@pytest.mark.parametrize("seed", range(2))
def test_coco_results_of_voc_data_with_a_written_ground_truth(tmp_path, seed):
    # VOC: ids are file stems; ground truth written with coco_ground_truth from the
    # same records and ids; difficult objects are crowd regions in both.
    pytest.importorskip("pycocotools")
    preds, gts = random_dataset(seed, num_images=40)
    g = torch.Generator().manual_seed(seed)
    for p in preds:  # distinct scores: pycocotools breaks ties in image-id order, ours in input order
        p["scores"] = torch.rand(len(p["scores"]), generator=g, dtype=torch.float64)
    stems = [f"2008_{k:06d}" if k % 2 else f"{k:06d}" for k in range(len(gts))]
    image_ids = coco_image_ids(stems)
    classes = ["a", "b", "c"]
    truth = coco_ground_truth(gts, image_ids, classes, [1, 2, 3], images=[{"file_name": s} for s in stems])
    save_coco_results(tmp_path / "gt.json", truth)
    save_coco_results(tmp_path / "res.json", coco_results(preds, image_ids, [1, 2, 3]))
    ours = evaluate_detections(preds, gts, classes, metric="coco")
    ap, ap50, ap75 = _cocoeval_stats(tmp_path / "gt.json", tmp_path / "res.json")
    assert ours["mAP"] == pytest.approx(ap, abs=1e-12)
    assert ours["AP50"] == pytest.approx(ap50, abs=1e-12)
    assert ours["AP75"] == pytest.approx(ap75, abs=1e-12)
    # Inclusive boxes: w = x2 - x1 + 1, the inverse of sppnet.data.coco's x2 = x + w - 1.
    p = preds[0]
    first = coco_results([p], [7], [1, 2, 3])[0]
    x1, y1, x2, y2 = p["boxes"][0].double().tolist()
    assert first["bbox"] == [x1, y1, x2 - x1 + 1, y2 - y1 + 1] and first["image_id"] == 7
    assert first["category_id"] == [1, 2, 3][int(p["labels"][0])]


def test_coco_image_ids_for_coco_and_voc_records():
    assert coco_image_ids([17, 4, 230]) == [17, 4, 230]
    assert coco_image_ids(["000005", "2008_000123", "000010"]) == [5, 2008000123, 10]
    assert coco_image_ids(["0005", "5"]) == [1, 2]  # both would be 5: by position
    assert coco_image_ids(["cat_01", "dog_02"]) == [1, 2]
    with pytest.raises(ValueError, match=r"image ids must be unique, got duplicates \[4\]"):
        coco_image_ids([4, 4])
    with pytest.raises(ValueError, match="need one image id per image, got 1 ids for 2 images"):
        coco_results([pred([A], [1.0]), pred([A], [1.0])], [1], [1])
    with pytest.raises(ValueError, match="out of range for 1 classes"):
        coco_results([pred([A], [1.0], labels=[1])], [1], [1])
