"""COCO: detections as COCO results, ground truth as a COCO data set, and COCO AP (pycocotools).

:func:`coco_results` writes detections in the results format of the COCO API
(``COCO.loadRes``): one dict per detection with ``image_id``, ``category_id``,
``bbox = [x, y, w, h]`` and ``score``. :func:`coco_ground_truth` writes the
matching ground truth for data that has no COCO annotation file (VOC), and
:func:`coco_average_precisions` is the metric behind
``evaluate_detections(metric="coco")``, built from the same two conversions.

Boxes. The project's boxes are ``(x1, y1, x2, y2)`` 0-based INCLUSIVE pixel
indices by default; COCO's ``[x, y, w, h]`` is continuous, so ``w = x2 - x1 + 1``
(``sppnet.data.coco`` reads ``x2 = x + w - 1``: the two are inverses, and the
overlaps pycocotools computes are the devkit's ``+1`` overlaps). With
``inclusive=False`` the boxes are continuous and ``w = x2 - x1``.

Ids. COCO wants integer image and category ids, and the results must use the
ids of the ground-truth file they are scored against:

- a COCO data set (:class:`sppnet.data.COCODetection`): the records' ``id`` is
  the JSON's image id, and ``category_ids[label]`` its category id; pass both
  and the results load against the original annotation file;
- VOC: the records' ``id`` is the file stem (``"000005"``, ``"2008_000123"``).
  :func:`coco_image_ids` maps stems made of digits and underscores to the
  integer of their digits (``5``, ``2008000123``) and anything else (or stems
  that would collide) to ``1..N`` by position; the categories are ``1..K`` in
  label order. There is no official COCO file for VOC: write one with
  :func:`coco_ground_truth` from the same records and ids (its images carry the
  original stem as ``file_name``, so the mapping is in the file).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sppnet.evaluation._inputs import Flat, flatten

__all__ = ["coco_ground_truth", "coco_image_ids", "coco_results", "save_coco_results"]


def coco_image_ids(ids: Sequence[Any]) -> list[int]:
    """Integer COCO image ids for the records' ``id`` fields (see the module docstring).

    Args:
        ids: one record ``id`` per image: ints (COCO data sets) or VOC file stems.

    Returns:
        list[int]: the ints unchanged when every id is an int; else the digits of
        each stem when every stem is digits and underscores and no two map to
        one id; else ``1..N`` by position. Always unique.

    Raises:
        ValueError: if integer ids repeat.
    """
    ids = list(ids)
    if all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        out = [int(i) for i in ids]
        if len(set(out)) != len(out):
            dups = sorted({i for i in out if out.count(i) > 1})
            raise ValueError(f"image ids must be unique, got duplicates {dups[:5]}")
        return out
    stems = [str(i) for i in ids]
    if all(s.replace("_", "").isdigit() and s.replace("_", "").isascii() for s in stems):
        out = [int(s.replace("_", "")) for s in stems]
        if len(set(out)) == len(out):
            return out
    return list(range(1, len(ids) + 1))


def _check_ids(image_ids: Sequence[int], category_ids: Sequence[int], num_images: int) -> tuple[list, list]:
    image_ids = [int(i) for i in image_ids]
    category_ids = [int(c) for c in category_ids]
    if len(image_ids) != num_images:
        raise ValueError(f"need one image id per image, got {len(image_ids)} ids for {num_images} images")
    if len(set(image_ids)) != len(image_ids):
        raise ValueError(f"image ids must be unique, got {len(image_ids) - len(set(image_ids))} repeats")
    if len(category_ids) == 0 or len(set(category_ids)) != len(category_ids):
        raise ValueError(f"category_ids must be a non-empty sequence of unique ints, got {category_ids}")
    return image_ids, category_ids


def _xywh(boxes: np.ndarray, inclusive: bool) -> np.ndarray:
    """``(x1, y1, x2, y2)`` -> COCO ``[x, y, w, h]``: ``ndarray[N, 4]`` float64."""
    off = 1.0 if inclusive else 0.0
    return np.stack(
        (
            boxes[:, 0],
            boxes[:, 1],
            boxes[:, 2] - boxes[:, 0] + off,
            boxes[:, 3] - boxes[:, 1] + off,
        ),
        axis=1,
    )


def _results(dets: Flat, image_ids: list[int], category_ids: list[int], inclusive: bool) -> list[dict[str, Any]]:
    return [
        {
            "image_id": image_ids[img],
            "category_id": category_ids[lab],
            "bbox": box.tolist(),
            "score": float(s),
        }
        for box, img, lab, s in zip(_xywh(dets.boxes, inclusive), dets.images, dets.labels, dets.scores)
    ]


def _ground_truth(
    gts: Flat,
    image_ids: list[int],
    class_names: Sequence[str],
    category_ids: list[int],
    inclusive: bool,
    images: Sequence[Mapping[str, Any]] | None,
) -> dict[str, Any]:
    extra = [dict(m) for m in images] if images is not None else [{} for _ in image_ids]
    annotations = [
        {
            "id": j + 1,  # annotation ids start at 1 (pycocotools uses 0 for "unmatched")
            "image_id": image_ids[img],
            "category_id": category_ids[lab],
            "bbox": box.tolist(),
            "area": float(box[2] * box[3]),
            "iscrowd": int(diff),
        }
        for j, (box, img, lab, diff) in enumerate(
            zip(_xywh(gts.boxes, inclusive), gts.images, gts.labels, gts.difficult)
        )
    ]
    return {
        "images": [{**e, "id": i} for i, e in zip(image_ids, extra)],
        "categories": [{"id": c, "name": str(n)} for c, n in zip(category_ids, class_names)],
        "annotations": annotations,
    }


def coco_results(
    predictions: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    category_ids: Sequence[int],
    inclusive: bool = True,
) -> list[dict[str, Any]]:
    """Detections in the COCO results format (what ``COCO.loadRes`` reads).

    Args:
        predictions (list[dict]): one dict per image: ``boxes`` (Tensor[D, 4]) in
            (x1, y1, x2, y2) pixels, ``scores`` (Tensor[D]), ``labels``
            (Tensor[D], int64 indices into ``category_ids``).
        image_ids (sequence of int): the COCO image id of each image (see
            :func:`coco_image_ids`).
        category_ids (sequence of int): the COCO category id of each label
            (``COCODetection.category_ids``; ``range(1, K + 1)`` for VOC).
        inclusive (bool): boxes are inclusive pixel indices (``w = x2 - x1 + 1``).

    Returns:
        list[dict]: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``
        per detection, image by image in input order. pycocotools' ``loadRes``
        cannot read an empty list (it indexes the first result).

    Raises:
        ValueError: on malformed predictions (naming image and row), a wrong
            number of image ids, or repeated ids.
    """
    image_ids, category_ids = _check_ids(image_ids, category_ids, len(predictions))
    dets = flatten(predictions, "predictions", len(category_ids), is_prediction=True)
    return _results(dets, image_ids, category_ids, inclusive)


def coco_ground_truth(
    ground_truths: Sequence[Mapping[str, Any]],
    image_ids: Sequence[int],
    class_names: Sequence[str],
    category_ids: Sequence[int],
    inclusive: bool = True,
    images: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Ground truth as a COCO data set (``images``, ``categories``, ``annotations``).

    Difficult objects become crowd regions (``iscrowd = 1``): COCOeval then
    neither counts nor penalises detections on them, like the VOC devkit.
    ``area`` is the box area (``w * h``).

    Args:
        ground_truths (list[dict]): one dict per image: ``boxes`` (Tensor[G, 4]),
            ``labels`` (Tensor[G]), optional ``difficult`` (Tensor[G], bool).
        image_ids, category_ids: as in :func:`coco_results`.
        class_names (sequence of str): the name of each label.
        inclusive (bool): boxes are inclusive pixel indices.
        images (list[dict] or None): extra fields of each image entry, e.g.
            ``file_name``, ``width``, ``height``.

    Returns:
        dict: a COCO annotation file's content (``json.dump``-able).
    """
    image_ids, category_ids = _check_ids(image_ids, category_ids, len(ground_truths))
    if len(class_names) != len(category_ids):
        raise ValueError(f"need one category id per class, got {len(category_ids)} for {len(class_names)} classes")
    if images is not None and len(images) != len(image_ids):
        raise ValueError(f"need one images entry per image, got {len(images)} for {len(image_ids)} images")
    gts = flatten(ground_truths, "ground_truths", len(category_ids), is_prediction=False)
    return _ground_truth(gts, image_ids, class_names, category_ids, inclusive, images)


def save_coco_results(path: str | os.PathLike, results: Sequence[Mapping[str, Any]]) -> None:
    """Writes :func:`coco_results` (or :func:`coco_ground_truth`) output as JSON, atomically."""
    from sppnet.utils import save_json

    save_json(path, results if isinstance(results, Mapping) else list(results))


def _import_pycocotools():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as e:
        raise ImportError("metric='coco' needs pycocotools: pip install pycocotools (or sppnet[coco])") from e
    return COCO, COCOeval


def _mean(values: np.ndarray) -> float:
    values = values[values > -1]  # -1: no ground truth of the class
    return float(values.mean()) if values.size else float("nan")


def coco_average_precisions(
    dets: Flat, gts: Flat, num_images: int, class_names: Sequence[str], inclusive: bool
) -> dict[str, dict[str, float]]:
    """Per-class COCO AP@[.5:.95], AP50 and AP75 of checked inputs (pycocotools' COCOeval).

    Images get ids ``1..N`` and categories ``1..K``; the ground truth and the
    results are :func:`coco_ground_truth` and :func:`coco_results` of the inputs.
    Area range "all" only; at most 100 detections per image and class (COCOeval's
    ``maxDets``). Equal scores are ranked in image order (COCOeval sorts by image
    id, stably): scored against a file with other ids, ties may rank otherwise.

    Returns:
        ``{"ap": {class: AP}, "ap50": {...}, "ap75": {...}}``; NaN for a class
        without non-crowd ground truth.
    """
    COCO, COCOeval = _import_pycocotools()
    image_ids = list(range(1, num_images + 1))  # COCO ids start at 1 (0 means "unmatched")
    category_ids = list(range(1, len(class_names) + 1))
    dataset = _ground_truth(gts, image_ids, class_names, category_ids, inclusive, None)
    results = _results(dets, image_ids, category_ids, inclusive)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_dt = COCO()  # loadRes without its empty-list crash and per-box bookkeeping
        coco_dt.dataset = {
            "images": dataset["images"],
            "categories": dataset["categories"],
            "annotations": [
                {**r, "id": j + 1, "area": r["bbox"][2] * r["bbox"][3], "iscrowd": 0} for j, r in enumerate(results)
            ],
        }
        coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.areaRng = [[0.0, 1e10]]  # "all" only: the summary's first row
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    # precision: [T IoU thresholds, R recall points, K classes, A areas, M maxDets]; -1 = no gt
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # [T, R, K], maxDets = 100
    iou_thrs = evaluator.params.iouThrs
    t50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    t75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    return {
        "ap": {name: _mean(precision[:, :, c]) for c, name in enumerate(class_names)},
        "ap50": {name: _mean(precision[t50, :, c]) for c, name in enumerate(class_names)},
        "ap75": {name: _mean(precision[t75, :, c]) for c, name in enumerate(class_names)},
    }
