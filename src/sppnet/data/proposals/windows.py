"""Proposals without selective search: ground truth prepended, and dense sliding windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["add_ground_truth", "sliding_window_proposals"]


def _unique_rows_stable(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate rows, keeping the first occurrence and the order."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


def _check_box_array(boxes: Any, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float32)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must have shape [K, 4], got {tuple(array.shape)}")
    return array


def add_ground_truth(proposals: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Prepend ground-truth boxes to proposals, as R-CNN / SPP-net training does.

    Every ground-truth row is kept, in order, so row ``i < len(gt_boxes)`` of the
    result is ground-truth box ``i``; proposals identical to a ground-truth box
    or to an earlier proposal are dropped.

    Args:
        proposals: ``[K, 4]`` boxes ``(x1, y1, x2, y2)``.
        gt_boxes: ``[G, 4]`` boxes in the same convention.

    Returns:
        np.ndarray[G + K', 4]: ``float32``, ground truth first, ``K' <= K``.

    Raises:
        ValueError: If an input does not have shape ``[N, 4]``.
    """
    proposals = _check_box_array(proposals, "proposals")
    gt = _check_box_array(gt_boxes, "gt_boxes")
    combined = np.concatenate([gt, proposals], axis=0)  # [G + K, 4]
    if len(combined) == 0:
        return combined
    _, first = np.unique(combined, axis=0, return_index=True)
    keep = np.zeros(len(combined), dtype=bool)
    keep[first] = True
    keep[: len(gt)] = True  # duplicates among the ground truth stay
    return combined[keep]


def sliding_window_proposals(
    width: int,
    height: int,
    scales: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    stride_frac: float = 0.5,
) -> np.ndarray:
    """Dense, deterministic windows: a cheap stand-in for selective search.

    For each scale ``s`` and aspect ratio ``r = h / w`` a window of about
    ``s * s`` pixels (``w = round(s / sqrt(r))``, ``h = round(s * sqrt(r))``,
    clipped to the image) slides over the image with a stride of
    ``stride_frac`` times its size; a last position flush with the right /
    bottom edge is always included, so the windows cover the image.

    Args:
        width: Image width ``W`` in pixels.
        height: Image height ``H`` in pixels.
        scales: Window sides (square root of the area) in pixels.
        aspect_ratios: Height / width ratios.
        stride_frac: Stride as a fraction of the window size, in ``(0, 1]``.

    Returns:
        np.ndarray[K, 4]: ``float32`` unique boxes ``(x1, y1, x2, y2)``, 0-based
        inclusive, inside the image, ordered by scale, aspect ratio, row, column.

    Raises:
        ValueError: On non-positive sizes, scales or ratios, or a bad stride.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(scales) == 0 or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be non-empty and positive, got {tuple(scales)}")
    if len(aspect_ratios) == 0 or any(not r > 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be non-empty and positive, got {tuple(aspect_ratios)}")
    if not 0 < stride_frac <= 1:
        raise ValueError(f"stride_frac must be in (0, 1], got {stride_frac!r}")

    def starts(size: int, extent: int) -> np.ndarray:
        step = max(1, round(stride_frac * size))
        positions = np.arange(0, extent - size + 1, step)
        if positions[-1] != extent - size:
            positions = np.append(positions, extent - size)
        return positions

    all_boxes = []
    for s in scales:
        for r in aspect_ratios:
            w = int(min(width, max(1, round(s / math.sqrt(r)))))
            h = int(min(height, max(1, round(s * math.sqrt(r)))))
            ys, xs = np.meshgrid(starts(h, height), starts(w, width), indexing="ij")
            x1, y1 = xs.reshape(-1), ys.reshape(-1)  # row-major: rows, then columns
            all_boxes.append(np.stack([x1, y1, x1 + w - 1, y1 + h - 1], axis=1))
    boxes = _unique_rows_stable(np.concatenate(all_boxes, axis=0))
    return boxes.astype(np.float32)
