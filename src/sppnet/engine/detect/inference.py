"""Using a trained detector: VOC07 evaluation, score calibration, prediction on image files.

* :func:`evaluate`: detections of records with proposals, VOC07 mAP and time per image.
* :func:`val`: :func:`evaluate` on a split of a run's (or other) data.
* :func:`calibrate`: per-class score thresholds at the best F1 on a held-out
  split, saved as ``thresholds.json``; ``predict`` keeps the detections
  above them. SVM scores have no natural cut-off (with SVMs trained from
  scratch most true detections score below 0); mAP does not depend on it.
* prediction on images, folders and videos: :mod:`.predict`.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sppnet.engine.amp import autocast_context
from sppnet.engine.common import Timer, UserError, progress, resolve_device
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.data import data_to_test, drop_unreadable, open_detection_data, proposals, split_proposals
from sppnet.engine.detect.features import load_record_image
from sppnet.engine.detect.model import heads_trained, load_detector
from sppnet.engine.distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    gather_shards,
    init_distributed,
    shard,
    shutdown_distributed,
)
from sppnet.evaluation import (
    best_f1_thresholds,
    coco_ground_truth,
    coco_image_ids,
    coco_results,
    evaluate_detections,
    precision_recall,
    save_coco_results,
)
from sppnet.models.detector import SPPDetector
from sppnet.utils import load_json, save_json

__all__ = [
    "calibrate",
    "calibration_overlap",
    "coco_files",
    "default_threshold",
    "evaluate",
    "json_safe",
    "run_calibration",
    "run_thresholds",
    "usable_scorer",
    "val",
]


def _ground_truth(records: Sequence[dict]) -> list[dict]:
    return [{"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]} for r in records]


def evaluate(
    detector: SPPDetector,
    records: Sequence[dict],
    class_names: Sequence[str],
    proposals: Sequence[np.ndarray],
    scorer: str = "svm",
    bbox_regression: bool = True,
    verbose: bool = True,
    detect_options: dict[str, Any] | None = None,
    metric: str = "voc07",
    amp: str | None = None,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Scores every window, NMS 0.3, <= 100 per class and image; the mAP and seconds per image.

    ``detect_options``: more arguments of :meth:`SPPDetector.detect` (a run's
    ``cfg.test.detect_options()``: NMS order and caps); default: its defaults.

    ``seconds_per_image`` times :meth:`SPPDetector.detect` (features, scoring,
    regression, NMS), not the proposals or the image decoding, as in Table 9.
    Under ``torchrun`` (``dist``) each process detects its contiguous share of
    the images (:func:`~sppnet.engine.distributed.shard`) and every process gets
    all the predictions back in image order, so the result is the one of a single
    process.

    Args:
        metric: ``voc07`` (SPP-net's tables), ``voc12`` or ``coco`` (AP@[.5:.95],
            pycocotools; also ``AP50`` and ``AP75``).
        amp: ``bf16`` / ``fp16`` autocast on CUDA (a no-op on the CPU).
        dist: this process under ``torchrun`` (``None``: one process).

    Returns:
        ``{"mAP", "ap": {class: AP}, "images", "seconds_per_image", "predictions"}``
        (``predictions``: one ``{"boxes", "labels", "scores"}`` per record, on the CPU).
    """
    dist = dist or DistContext(device=detector.pixel_mean.device)
    mine = shard(len(records), dist)
    local, seconds = [], 0.0
    for i in progress(mine, desc="detect", total=len(mine), enabled=verbose and dist.is_main):
        image = load_record_image(records[i]).to(detector.pixel_mean.device)
        with Timer() as t, torch.no_grad(), autocast_context(image.device, amp):
            det = detector.detect(
                [image],
                [torch.as_tensor(proposals[i])],
                scorer=scorer,
                bbox_regression=bbox_regression,
                **(detect_options or {}),
            )[0]
        seconds += t.seconds
        local.append({k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()})
    predictions = gather_shards(local, len(records), dist)
    seconds = all_reduce_sum([seconds], dist)[0]
    result = evaluate_detections(predictions, _ground_truth(records), class_names, 0.5, metric)
    extra = {k: result[k] for k in ("AP50", "AP75") if k in result}
    return {
        "mAP": result["mAP"],
        "ap": result["ap"],
        **extra,
        "metric": metric,
        "images": len(records),
        "seconds_per_image": seconds / max(len(records), 1),
        "predictions": predictions,
    }


def coco_files(
    predictions: Sequence[dict],
    records: Sequence[dict],
    classes: Sequence[str],
    category_ids: Sequence[int] | None,
) -> tuple[list[dict], dict]:
    """``(results, ground truth)`` in the COCO formats pycocotools reads (``loadRes`` / ``COCO``).

    Image ids: the records' ``id`` through :func:`~sppnet.evaluation.coco_image_ids`
    (a COCO data set's own ids; VOC stems by their digits); categories: the
    data set's ``category_ids`` (COCO), else ``1..K`` in label order.
    """
    image_ids = coco_image_ids([r["id"] for r in records])
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(classes) + 1))
    results = coco_results(predictions, image_ids, category_ids)
    images = [
        {"file_name": Path(r["image_path"]).name, "width": int(r["width"]), "height": int(r["height"])} for r in records
    ]
    truth = coco_ground_truth(_ground_truth(records), image_ids, classes, category_ids, images=images)
    return results, truth


def default_threshold(scorer: str) -> float:
    """The uncalibrated cut-off: the SVMs' decision boundary, or softmax 0.5."""
    return 0.0 if scorer == "svm" else 0.5


def usable_scorer(asked: str, detector: SPPDetector) -> str:
    """``asked``, except softmax when SVM scores are asked of a detector without trained SVMs."""
    return "softmax" if asked == "svm" and not heads_trained(detector)["svm"] else asked


def calibration_overlap(train_split: str, split: str) -> bool:
    """Whether a VOC split shares images with the training split (by the standard names)."""
    if split == train_split:
        return True
    parts = {"trainval": {"train", "val"}}
    return bool(parts.get(train_split, {train_split}) & parts.get(split, {split}))


def _load_for_testing(
    run: str | os.PathLike, device: str, scorer: str | None, svd_rank: int | Sequence[int] | None
) -> tuple[SPPDetector, list[str], DetectConfig, str]:
    """The run's detector (fc6 / fc7 SVD-compressed at ``svd_rank`` if given) and
    the scorer to use: the asked one, else the run's; softmax when no SVMs were trained."""
    detector, classes, cfg = load_detector(run, resolve_device(device))
    if svd_rank is not None:
        detector.compress_fc(svd_rank)
    return detector, classes, cfg, usable_scorer(scorer or cfg.scorer, detector)


def run_calibration(
    detector: SPPDetector,
    run: str | os.PathLike,
    cfg: DetectConfig,
    records: Sequence[dict],
    proposals: Sequence[np.ndarray],
    classes: Sequence[str],
    scorer: str,
    split: str,
    verbose: bool = True,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Scores ``records``, writes the best-F1 thresholds to ``run/thresholds.json`` and returns them.

    Under ``torchrun`` (``dist``) the processes share the images and rank 0 writes the file.
    """
    dist = dist or DistContext(device=detector.pixel_mean.device)
    options = cfg.test.detect_options()
    result = evaluate(detector, records, classes, proposals, scorer, cfg.bbox.enabled, verbose, options, dist=dist)
    points = best_f1_thresholds(precision_recall(result["predictions"], _ground_truth(records), classes))
    default = default_threshold(scorer)
    payload = {
        "split": split,
        "scorer": scorer,
        "images": len(records),
        "default": default,
        "thresholds": {c: (p["threshold"] if p["threshold"] is not None else default) for c, p in points.items()},
        "operating_points": points,
        "mAP": result["mAP"],
    }
    if dist.is_main:
        save_json(Path(run) / "thresholds.json", json_safe(payload))
    if verbose and dist.is_main:
        f1 = [p["f1"] for p in points.values() if p["f1"] is not None]
        print(
            f"calibrated score thresholds on {len(records)} {split!r} images "
            f"(mean best F1 {np.mean(f1) if f1 else float('nan'):.3f}): {Path(run) / 'thresholds.json'}",
            file=sys.stderr,
        )
    return payload


def calibrate(
    run: str | os.PathLike,
    data: str | None = None,
    split: str = "val",
    fmt: str | None = None,
    ann: str | None = None,
    scorer: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Per-class score thresholds at the best F1 on a held-out split; writes ``run/thresholds.json``.

    :func:`~sppnet.engine.detect.predict.predict` keeps, per class, the detections scoring above these
    thresholds (unless given ``score_threshold``). Use images the detector was
    not trained on: on training images the SVM scores are optimistic.

    Returns:
        ``{"split", "scorer", "images", "default", "thresholds": {class: float},
        "operating_points": {class: {"threshold", "f1", "precision", "recall"}}, "mAP"}``;
        a class without objects or detections in the split keeps ``default``
        (0 for SVM scores, 0.5 for softmax).
    """
    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, None)
    data, fmt, ann = data_to_test(cfg, data, fmt, ann)
    if workers is not None:
        cfg = cfg.with_overrides(workers=workers)
    if data == cfg.data and fmt == "voc" and calibration_overlap(cfg.split, split):
        print(
            f"warning: split {split!r} overlaps the training split {cfg.split!r}: thresholds calibrated on "
            "training images are optimistic (too high); prefer held-out images",
            file=sys.stderr,
        )
    records, props = split_proposals(cfg, run, split, classes, data, fmt, ann, verbose)
    return run_calibration(detector, Path(run), cfg, records, props, classes, scorer, split, verbose)


def run_thresholds(run: str | os.PathLike, classes: Sequence[str], scorer: str) -> torch.Tensor | None:
    """The run's calibrated per-class thresholds (``thresholds.json``) for ``scorer``, or None."""
    path = Path(run) / "thresholds.json"
    if not path.is_file():
        return None
    saved = load_json(path)
    if saved.get("scorer") != scorer:
        return None
    values = saved.get("thresholds") or {}
    missing = [c for c in classes if not isinstance(values.get(c), (int, float))]
    if missing:
        raise UserError(f"{path} has no threshold for classes {missing}; rerun 'sppnet detect calibrate --run {run}'")
    return torch.tensor([float(values[c]) for c in classes])


def val(
    run: str | os.PathLike,
    data: str | None = None,
    split: str = "test",
    fmt: str | None = None,
    ann: str | None = None,
    scorer: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    verbose: bool = True,
    svd_rank: int | Sequence[int] | None = None,
    metric: str = "voc07",
    save_json: str | os.PathLike | None = None,
    save_coco_gt: str | os.PathLike | None = None,
    amp: str | None = None,
) -> dict[str, Any]:
    """Evaluates a trained run on a split (default: the training data's ``test`` split).

    Args:
        svd_rank: test with fc6 / fc7 replaced by their truncated SVD
            (:meth:`SPPDetector.compress_fc`; an int for both or ``(r6, r7)``).
        metric: ``voc07``, ``voc12`` or ``coco`` (see :func:`evaluate`).
        save_json: write the detections here as COCO results (``image_id``,
            ``category_id``, ``bbox = [x, y, w, h]``, ``score``; see :func:`coco_files`).
        save_coco_gt: write the split's ground truth here as a COCO annotation file
            with the same ids (VOC data has none of its own).
        amp: ``bf16`` / ``fp16`` autocast on CUDA.

    Under ``torchrun`` the images are shared among the processes; rank 0 writes the files.
    """
    import torch.distributed as torch_dist

    owns_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    dist = init_distributed(device)
    try:
        result, predictions, records, ds, classes = _val(
            dist, run, data, split, fmt, ann, scorer, workers, verbose, svd_rank, metric, amp
        )
        if dist.is_main and (save_json is not None or save_coco_gt is not None):
            results, truth = coco_files(predictions, records, classes, getattr(ds, "category_ids", None))
            if save_json is not None:
                if not results:
                    print(
                        f"warning: no detections: {save_json} holds [] (pycocotools' loadRes cannot read it)",
                        file=sys.stderr,
                    )
                save_coco_results(save_json, results)
                result["results_json"] = str(save_json)
            if save_coco_gt is not None:
                save_coco_results(save_coco_gt, truth)
                result["coco_gt_json"] = str(save_coco_gt)
        barrier(dist)  # rank 0 has written its files before any process leaves
        return result
    finally:
        if owns_group:
            shutdown_distributed(dist)  # leaving with the group still open can abort a gloo worker at exit


def _val(
    dist: DistContext,
    run: str | os.PathLike,
    data: str | None,
    split: str,
    fmt: str | None,
    ann: str | None,
    scorer: str | None,
    workers: int | None,
    verbose: bool,
    svd_rank: int | Sequence[int] | None,
    metric: str,
    amp: str | None,
) -> tuple[dict[str, Any], list, list[dict], Any, list[str]]:
    """:func:`val`'s work: ``(result, predictions, records, data set, classes)``."""
    detector, classes, cfg, scorer = _load_for_testing(run, str(dist.device), scorer, svd_rank)
    data, fmt, ann = data_to_test(cfg, data, fmt, ann)
    if workers is not None:
        cfg = cfg.with_overrides(workers=workers)
    if data is None and ann is None:
        data, fmt, ann = cfg.data, cfg.format, cfg.ann
    ds = open_detection_data(data, fmt, ann, split, classes, cfg.strict)
    props = proposals(ds.records, cfg, Path(run) / "cache" / "proposals", verbose and dist.is_main, dist=dist)
    records, props = drop_unreadable(list(ds.records), props, verbose and dist.is_main)
    result = evaluate(
        detector,
        records,
        classes,
        props,
        scorer,
        cfg.bbox.enabled,
        verbose,
        cfg.test.detect_options(),
        metric=metric,
        amp=amp,
        dist=dist,
    )
    predictions = result.pop("predictions")
    result["scorer"] = scorer
    return result, predictions, records, ds, list(classes)


def json_safe(result: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class without test objects) -> None, so that ``json.dumps`` writes valid JSON."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return json.loads(json.dumps(fix(result)))
