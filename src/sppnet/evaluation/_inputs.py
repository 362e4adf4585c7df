"""Input checks shared by the VOC and COCO metrics: per-image dicts -> flat numpy arrays."""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch


class Flat(NamedTuple):
    """Every image's rows concatenated, with the image index of each row."""

    boxes: np.ndarray  # float64[N, 4]
    scores: np.ndarray  # float64[N] (detections only)
    labels: np.ndarray  # int64[N]
    images: np.ndarray  # int64[N], image index of each row
    difficult: np.ndarray  # bool[N] (ground truth only)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.double()  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _get(entry: Any, key: str, where: str) -> np.ndarray:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")  # noqa: TRY004 (the project's boundary error)
    if key not in entry:
        raise ValueError(f"{where} has no {key!r} (keys: {sorted(entry)})")
    return _to_numpy(entry[key])


def flatten(
    entries: Sequence[Mapping[str, Any]],
    list_name: str,
    num_classes: int,
    is_prediction: bool,
) -> Flat:
    """Concatenate the per-image dicts into flat arrays, checking every field."""
    boxes, scores, labels, difficult, counts = [], [], [], [], []
    for i, entry in enumerate(entries):
        where = f"{list_name}[{i}]"
        b = _get(entry, "boxes", where)
        if b.size == 0:
            b = b.reshape(0, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{where}['boxes'] must have shape [N, 4], got {b.shape}")
        n = b.shape[0]
        lab = _get(entry, "labels", where)
        if lab.shape != (n,):
            raise ValueError(f"{where}['labels'] must have shape [{n}] (one per box), got {lab.shape}")
        if n and not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{where}['labels'] must be integers, got dtype {lab.dtype}")
        if is_prediction:
            s = _get(entry, "scores", where)
            if s.shape != (n,):
                raise ValueError(f"{where}['scores'] must have shape [{n}] (one per box), got {s.shape}")
            scores.append(s)
        elif "difficult" in entry and entry["difficult"] is not None:
            d = _get(entry, "difficult", where)
            if d.shape != (n,):
                raise ValueError(f"{where}['difficult'] must have shape [{n}] (one per box), got {d.shape}")
            difficult.append(d.astype(bool))
        else:
            difficult.append(np.zeros(n, dtype=bool))
        boxes.append(b)
        labels.append(lab)
        counts.append(n)

    counts_arr = np.asarray(counts, dtype=np.int64)
    images = np.repeat(np.arange(len(counts_arr), dtype=np.int64), counts_arr)
    flat = Flat(
        boxes=np.concatenate(boxes).astype(np.float64) if boxes else np.zeros((0, 4)),
        scores=np.concatenate(scores).astype(np.float64) if scores else np.zeros(0),
        labels=np.concatenate(labels).astype(np.int64) if labels else np.zeros(0, np.int64),
        images=images,
        difficult=np.concatenate(difficult) if difficult else np.zeros(0, bool),
    )
    first_row = np.cumsum(counts_arr) - counts_arr  # flat index of each image's row 0

    def name(j: int, field: str) -> str:
        img = int(flat.images[j])
        return f"{list_name}[{img}]['{field}'][{j - int(first_row[img])}]"

    bad = np.flatnonzero((flat.labels < 0) | (flat.labels >= num_classes))
    if bad.size:
        j = int(bad[0])
        raise ValueError(
            f"{name(j, 'labels')} = {int(flat.labels[j])} is out of range for "
            f"{num_classes} classes (labels index class_names)"
        )
    bad = np.flatnonzero(~np.isfinite(flat.boxes).all(axis=1))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name(j, 'boxes')} = {flat.boxes[j].tolist()} is not finite")
    bad = np.flatnonzero((flat.boxes[:, 2] < flat.boxes[:, 0]) | (flat.boxes[:, 3] < flat.boxes[:, 1]))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{name(j, 'boxes')} = {flat.boxes[j].tolist()} must satisfy x1 <= x2 and y1 <= y2")
    if is_prediction:
        bad = np.flatnonzero(np.isnan(flat.scores))
        if bad.size:
            j = int(bad[0])
            raise ValueError(f"{name(j, 'scores')} is NaN")
    return flat


def check_inputs(
    predictions: Sequence[Mapping[str, Any]],
    ground_truths: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    iou_threshold: float,
) -> tuple[Flat, Flat]:
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty sequence of names, got {class_names!r}")
    if len(set(class_names)) != len(class_names):
        dups = sorted({c for c in class_names if list(class_names).count(c) > 1})
        raise ValueError(f"class_names must be unique, got duplicates {dups}")
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions and ground_truths must have one entry per image, got "
            f"{len(predictions)} and {len(ground_truths)}"
        )
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    dets = flatten(predictions, "predictions", len(class_names), is_prediction=True)
    gts = flatten(ground_truths, "ground_truths", len(class_names), is_prediction=False)
    return dets, gts
