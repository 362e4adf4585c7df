"""Using a trained detector: VOC07 evaluation, score calibration, prediction on image files.

* :func:`evaluate`: detections of records with proposals, VOC07 mAP and time per image.
* :func:`val`: :func:`evaluate` on a split of a run's (or other) data.
* :func:`calibrate`: per-class score thresholds at the best F1 on a held-out
  split, saved as ``thresholds.json``; :func:`predict` keeps the detections
  above them. SVM scores have no natural cut-off (with SVMs trained from
  scratch most true detections score below 0); mAP does not depend on it.
* :func:`predict`: image files -> detections, a PNG and a JSON per image.
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

from sppnet.data.images import load_image, pil_to_tensor
from sppnet.data.proposals import compute_proposals
from sppnet.engine.common import Timer, UserError, progress, resolve_device
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.data import data_to_test, split_proposals
from sppnet.engine.detect.features import load_record_image
from sppnet.engine.detect.model import heads_trained, load_detector
from sppnet.evaluation import best_f1_thresholds, evaluate_detections, precision_recall
from sppnet.models.detector import SPPDetector
from sppnet.utils import load_json, save_json

__all__ = [
    "calibrate",
    "calibration_overlap",
    "default_threshold",
    "evaluate",
    "json_safe",
    "predict",
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
) -> dict[str, Any]:
    """Scores every window, NMS 0.3, <= 100 per image; VOC07 mAP and seconds per image.

    ``seconds_per_image`` times :meth:`SPPDetector.detect` (features, scoring,
    regression, NMS), not the proposals or the image decoding, as in Table 9.

    Returns:
        ``{"mAP", "ap": {class: AP}, "images", "seconds_per_image", "predictions"}``.
    """
    predictions, seconds = [], 0.0
    for r, p in progress(list(zip(records, proposals)), desc="detect", total=len(records), enabled=verbose):
        image = load_record_image(r)
        with Timer() as t:
            det = detector.detect([image], [torch.as_tensor(p)], scorer=scorer, bbox_regression=bbox_regression)[0]
        seconds += t.seconds
        predictions.append(det)
    result = evaluate_detections(predictions, _ground_truth(records), class_names, 0.5, "voc07")
    return {
        "mAP": result["mAP"],
        "ap": result["ap"],
        "images": len(records),
        "seconds_per_image": seconds / max(len(records), 1),
        "predictions": predictions,
    }


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
) -> dict[str, Any]:
    """Scores ``records``, writes the best-F1 thresholds to ``run/thresholds.json`` and returns them."""
    result = evaluate(detector, records, classes, proposals, scorer, cfg.bbox.enabled, verbose)
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
    save_json(Path(run) / "thresholds.json", json_safe(payload))
    if verbose:
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

    :func:`predict` keeps, per class, the detections scoring above these
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
) -> dict[str, Any]:
    """Evaluates a trained run on a split (default: the training data's ``test`` split).

    ``svd_rank``: test with fc6 / fc7 replaced by their truncated SVD
    (:meth:`SPPDetector.compress_fc`; an int for both or ``(r6, r7)``).
    """
    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, svd_rank)
    data, fmt, ann = data_to_test(cfg, data, fmt, ann)
    if workers is not None:
        cfg = cfg.with_overrides(workers=workers)
    records, props = split_proposals(cfg, run, split, classes, data, fmt, ann, verbose)
    result = evaluate(detector, records, classes, props, scorer, cfg.bbox.enabled, verbose)
    result.pop("predictions")
    result["scorer"] = scorer
    return result


def predict(
    run: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    score_threshold: float | Sequence[float] | None = None,
    scorer: str | None = None,
    device: str = "auto",
    verbose: bool = True,
    svd_rank: int | Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Detects objects in image files; writes ``<name>.png`` (boxes drawn) and ``<name>.json`` per image.

    ``score_threshold``: one value for every class, or one per class; default:
    the run's calibrated per-class thresholds (``thresholds.json``, see
    :func:`calibrate`) when they exist for the scorer, else 0 for SVM scores (the
    SVM's decision boundary) and 0.5 for softmax probabilities. ``svd_rank``:
    as in :func:`val`.
    """
    from sppnet.viz.detections import draw_detections

    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, svd_rank)
    if score_threshold is not None:
        threshold = score_threshold
    else:
        calibrated = run_thresholds(run, classes, scorer)
        threshold = calibrated if calibrated is not None else default_threshold(scorer)
    if isinstance(threshold, (int, float)):
        described: float | dict[str, float] = float(threshold)
    else:
        values = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
        if len(values) != len(classes):
            raise UserError(
                f"score_threshold needs one value per class ({len(classes)}: {', '.join(classes)}), got {len(values)}"
            )
        described = {c: float(v) for c, v in zip(classes, values.tolist())}
    out = Path(out) if out is not None else Path(run) / "predict"
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise UserError(f"image {p} does not exist")
    props = compute_proposals(
        paths,
        Path(run) / "cache" / "proposals",
        cfg.selective_search(),
        workers=min(cfg.workers, len(paths)),
        progress=verbose,
    )
    results = []
    for path, boxes in zip(paths, props):
        img = load_image(path)
        det = detector.detect([pil_to_tensor(img)], [torch.as_tensor(boxes)], scorer=scorer, score_threshold=threshold)[
            0
        ]
        entry = {
            "image": str(path),
            "width": img.width,
            "height": img.height,
            "scorer": scorer,
            "score_threshold": described,
            "detections": [
                {"box": [float(v) for v in b], "label": classes[int(c)], "label_index": int(c), "score": float(s)}
                for b, c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist())
            ],
        }
        draw_detections(img, det["boxes"], det["labels"], det["scores"], classes, out / f"{path.stem}.png")
        save_json(out / f"{path.stem}.json", entry)
        entry["png"], entry["json"] = str(out / f"{path.stem}.png"), str(out / f"{path.stem}.json")
        results.append(entry)
    return results


def json_safe(result: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class without test objects) -> None, so that ``json.dumps`` writes valid JSON."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return json.loads(json.dumps(fix(result)))
