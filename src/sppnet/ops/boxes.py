"""Box utilities: areas, IoU, NMS, detection selection and R-CNN box regression.

Every box is a row ``(x1, y1, x2, y2)`` of a ``Tensor[K, 4]``. Two conventions
coexist, chosen per call with ``inclusive``:

- ``inclusive=False`` (torchvision): continuous coordinates, width ``x2 - x1``.
- ``inclusive=True`` (PASCAL devkit, R-CNN and the SPP-net release): the
  coordinates are inclusive pixel indices, so a box covering pixels 0..9 has
  width ``x2 - x1 + 1 = 10``.

An inclusive box ``(x1, y1, x2, y2)`` has exactly the area and overlaps of the
continuous box ``(x1, y1, x2 + 1, y2 + 1)``; that identity is how the inclusive
variants reuse torchvision's kernels.

Functions that mirror torchvision (``box_area``, ``box_iou``, ``nms``,
``batched_nms``, ``clip_boxes``, ``remove_small_boxes``) default to the
continuous convention; the SPP-net pipeline functions (``select_detections``,
``encode_boxes``, ``decode_boxes``) default to the released code's ``+1``.
"""

import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import Tensor

__all__ = [
    "batched_nms",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
    "nms",
    "remove_small_boxes",
    "select_detections",
    "validate_boxes",
]

# Fast R-CNN's BBOX_XFORM_CLIP: exp(dw) never exceeds 1000 / 16, i.e. a box never
# grows beyond 1000 px from a 16 px window, so exp() cannot overflow.
_DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes_shape(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise ValueError(f"{name} must be a Tensor[K, 4], got {type(boxes).__name__}")
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must be a Tensor[K, 4], got shape {tuple(boxes.shape)}")


def _upcast(t: Tensor) -> Tensor:
    # Integer and half boxes would overflow or lose precision in products.
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t.float()


def validate_boxes(boxes: Tensor, name: str = "boxes") -> None:
    """Check that ``boxes`` is a well-formed ``Tensor[K, 4]`` in (x1, y1, x2, y2).

    Args:
        boxes (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels; ``K`` may be 0.
        name (str): how the error messages call the tensor.

    Raises:
        ValueError: if ``boxes`` is not a ``Tensor[K, 4]``, holds a non-finite
            value, or has a row with ``x2 < x1`` or ``y2 < y1``. The message
            names the first offending row and its values.
    """
    _check_boxes_shape(boxes, name)
    if boxes.numel() == 0:
        return
    if boxes.is_floating_point():
        bad = (~torch.isfinite(boxes)).any(dim=1)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name} must be finite, got row {i} = {boxes[i].tolist()}")
    bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must satisfy x1 <= x2 and y1 <= y2, got row {i} = {boxes[i].tolist()}")


def box_area(boxes: Tensor, inclusive: bool = False) -> Tensor:
    """Area of each box.

    Args:
        boxes (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels.
        inclusive (bool): if True the coordinates are inclusive pixel indices
            and the area is ``(x2 - x1 + 1) * (y2 - y1 + 1)`` (PASCAL devkit);
            otherwise ``(x2 - x1) * (y2 - y1)`` (torchvision).

    Returns:
        Tensor[K]: the areas (float; integer boxes are promoted).
    """
    _check_boxes_shape(boxes, "boxes")
    boxes = _upcast(boxes)
    off = 1.0 if inclusive else 0.0
    return (boxes[:, 2] - boxes[:, 0] + off) * (boxes[:, 3] - boxes[:, 1] + off)


def box_iou(boxes1: Tensor, boxes2: Tensor, inclusive: bool = False) -> Tensor:
    """Intersection over union of every pair of boxes.

    Args:
        boxes1 (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels.
        boxes2 (Tensor[L, 4]): boxes in (x1, y1, x2, y2) pixels.
        inclusive (bool): PASCAL devkit ``+1`` widths and heights (see
            :func:`box_area`); the intersection is ``+1`` too, so boxes that
            share a single pixel column overlap.

    Returns:
        Tensor[K, L]: ``IoU[i, j]`` between ``boxes1[i]`` and ``boxes2[j]``.
        A pair of zero-area boxes gives NaN (0 / 0), as in torchvision.
    """
    _check_boxes_shape(boxes1, "boxes1")
    _check_boxes_shape(boxes2, "boxes2")
    boxes1, boxes2 = _upcast(boxes1), _upcast(boxes2)
    off = 1.0 if inclusive else 0.0
    area1 = box_area(boxes1, inclusive)  # [K]
    area2 = box_area(boxes2, inclusive)  # [L]
    lt = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])  # [K, L, 2]
    rb = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])  # [K, L, 2]
    wh = (rb - lt + off).clamp(min=0)  # [K, L, 2]
    inter = wh[..., 0] * wh[..., 1]  # [K, L]
    union = area1[:, None] + area2[None, :] - inter
    return inter / union


def _nms_sorted(boxes: Tensor, iou_threshold: float, inclusive: bool) -> Tensor:
    """Greedy NMS of boxes already sorted by decreasing score (ties resolved).

    torchvision re-sorts by score with an unstable sort, so the boxes are handed
    to it with strictly decreasing rank scores: the result is deterministic and
    the earlier box wins a tie.
    """
    n = boxes.shape[0]
    boxes = _upcast(boxes)
    if inclusive:
        # An inclusive box has the overlaps of the continuous box one pixel larger.
        boxes = boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    ranks = torch.arange(n, 0, -1, dtype=boxes.dtype, device=boxes.device)
    return torchvision.ops.nms(boxes, ranks, float(iou_threshold))


def _check_nms_inputs(boxes: Tensor, scores: Tensor, iou_threshold: float) -> None:
    _check_boxes_shape(boxes, "boxes")
    if scores.dim() != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must be a Tensor[K] with K = {boxes.shape[0]} (one per box), got shape {tuple(scores.shape)}"
        )
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, inclusive: bool = False) -> Tensor:
    """Greedy non-maximum suppression.

    Boxes are visited by decreasing score; a box is dropped when its IoU with an
    already kept box is ``> iou_threshold`` (R-CNN's ``nms.m`` keeps
    ``o <= overlap``; torchvision agrees). Ties in score are broken by index
    (stable): the earlier box is visited first.

    Args:
        boxes (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels.
        scores (Tensor[K]): one score per box.
        iou_threshold (float): suppression threshold in [0, 1].
        inclusive (bool): use the PASCAL ``+1`` widths for the IoU (R-CNN's
            ``nms.m`` does).

    Returns:
        Tensor[N] (int64): indices of the kept boxes, by decreasing score.
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    order = torch.argsort(scores, descending=True, stable=True)  # [K]
    keep = _nms_sorted(boxes[order], iou_threshold, inclusive)
    return order[keep]


def batched_nms(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    iou_threshold: float,
    inclusive: bool = False,
) -> Tensor:
    """Non-maximum suppression run independently for each label.

    Boxes with different labels never suppress each other. One NMS per label
    (no coordinate-offset trick), so the overlaps are exactly those of
    :func:`nms`.

    Args:
        boxes (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels.
        scores (Tensor[K]): one score per box.
        labels (Tensor[K]): integer label of each box.
        iou_threshold (float): suppression threshold in [0, 1].
        inclusive (bool): use the PASCAL ``+1`` widths for the IoU.

    Returns:
        Tensor[N] (int64): indices of the kept boxes, by decreasing score
        (ties: lower index first).
    """
    _check_nms_inputs(boxes, scores, iou_threshold)
    if labels.dim() != 1 or labels.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"labels must be a Tensor[K] with K = {boxes.shape[0]} (one per box), got shape {tuple(labels.shape)}"
        )
    order = torch.argsort(scores, descending=True, stable=True)  # [K], rank -> index
    sorted_boxes, sorted_labels = boxes[order], labels[order]
    kept = []
    for label in torch.unique(sorted_labels):
        ranks = (sorted_labels == label).nonzero().squeeze(1)  # ascending ranks
        kept.append(ranks[_nms_sorted(sorted_boxes[ranks], iou_threshold, inclusive)])
    if not kept:
        return order.new_empty(0)
    kept_ranks = torch.sort(torch.cat(kept)).values
    return order[kept_ranks]


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    score_threshold: float | Sequence[float] | Tensor = float("-inf"),
    nms_threshold: float = 0.3,
    max_per_image: int | None = None,
    inclusive: bool = True,
    max_per_class: int | None = 100,
) -> dict[str, Tensor]:
    """Turn per-class window scores of one image into final detections.

    SPP-net Sec. 4.2 and the released ``spp_test.m`` (as R-CNN's ``rcnn_test.m``):
    keep the windows scoring ``> score_threshold`` for a class, run NMS at IoU
    0.3 for each class separately, keep the ``max_per_class`` best of each class
    (100); optionally then the ``max_per_image`` best over all classes.

    Ordering is deterministic: by decreasing score; ties are broken by window
    index, then class index (the row-major order of ``scores``). The NMS uses
    the ``+1`` widths of R-CNN's ``nms.m`` by default.

    Args:
        boxes (Tensor[K, C, 4] or Tensor[K, 4]): per-class boxes (after box
            regression) or one box per window shared by all classes, in
            (x1, y1, x2, y2) pixels.
        scores (Tensor[K, C]): score of window ``k`` for class ``c``. Pass
            foreground columns only (drop a softmax background column first);
            the returned labels are column indices of ``scores``.
        score_threshold (float or Tensor[C]): a candidate needs ``score > score_threshold``;
            one value for every class, or one per class (column of ``scores``,
            e.g. calibrated operating points; ``-inf`` keeps all, ``inf`` none).
        nms_threshold (float): per-class NMS IoU threshold (0.3 in SPP-net).
        max_per_image (int or None): at most this many detections over all
            classes (after the per-class cap); None (default) keeps all.
        inclusive (bool): PASCAL ``+1`` convention for the NMS overlaps.
        max_per_class (int or None): at most this many detections of each class
            (100 in ``spp_test.m``); None keeps all.

    Returns:
        dict with ``boxes`` (Tensor[D, 4]), ``scores`` (Tensor[D]), ``labels``
        (Tensor[D], int64 class column) and ``windows`` (Tensor[D], int64 row
        of ``scores`` each detection comes from), sorted by decreasing score.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be a Tensor[K, C], got shape {tuple(scores.shape)}")
    num_windows, num_classes = scores.shape
    if boxes.dim() == 2 and boxes.shape[1] == 4 and boxes.shape[0] == num_windows:
        boxes = boxes[:, None, :].expand(num_windows, num_classes, 4)
    elif tuple(boxes.shape) != (num_windows, num_classes, 4):
        raise ValueError(
            f"boxes must be a Tensor[K, C, 4] or Tensor[K, 4] with K = {num_windows}, "
            f"C = {num_classes} (from scores), got shape {tuple(boxes.shape)}"
        )
    if not 0.0 <= nms_threshold <= 1.0:
        raise ValueError(f"nms_threshold must be in [0, 1], got {nms_threshold}")
    for name, cap in (("max_per_image", max_per_image), ("max_per_class", max_per_class)):
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"{name} must be a positive int or None, got {cap!r}")
    if bool(torch.isnan(scores).any()):
        row = int(torch.isnan(scores).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"scores must not contain NaN, got row {row} = {scores[row].tolist()}")

    flat_boxes = boxes.reshape(-1, 4)  # [K * C, 4], row-major: index k * C + c
    flat_scores = scores.reshape(-1)  # [K * C]
    flat_labels = torch.arange(num_classes, device=scores.device).repeat(num_windows)  # [K * C]

    threshold = _score_thresholds(score_threshold, num_classes, scores)
    if threshold.dim():  # per class: the threshold of each candidate's column
        threshold = threshold.repeat(num_windows)
    candidates = (flat_scores > threshold).nonzero().squeeze(1)
    # Rank candidates once (stable: row-major order breaks ties); every later step
    # keeps rank order, so the result is deterministic on any device.
    candidates = candidates[torch.argsort(flat_scores[candidates], descending=True, stable=True)]
    keep = batched_nms(
        flat_boxes[candidates],
        flat_scores[candidates],
        flat_labels[candidates],
        nms_threshold,
        inclusive=inclusive,
    )
    if max_per_class is not None:
        labels = flat_labels[candidates[keep]]  # in score order
        by_class = torch.argsort(labels, stable=True)  # grouped by class, score order inside
        grouped = labels[by_class]
        rank = torch.empty_like(by_class)
        rank[by_class] = torch.arange(len(grouped), device=grouped.device) - torch.searchsorted(grouped, grouped)
        keep = keep[rank < max_per_class]
    if max_per_image is not None:
        keep = keep[:max_per_image]
    idx = candidates[keep]
    return {
        "boxes": flat_boxes[idx],
        "scores": flat_scores[idx],
        "labels": flat_labels[idx],
        "windows": torch.div(idx, num_classes, rounding_mode="floor"),
    }


def _score_thresholds(value: Any, num_classes: int, scores: Tensor) -> Tensor:
    """``score_threshold`` as a 0-d tensor, or a Tensor[C] of per-class values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.tensor(float(value), dtype=scores.dtype, device=scores.device)
    else:
        try:
            t = torch.as_tensor(value, dtype=scores.dtype).to(scores.device)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"score_threshold must be a number or one number per class, got {value!r}") from None
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != num_classes):
            raise ValueError(
                f"score_threshold must be a number or a sequence of {num_classes} per-class values "
                f"(one per column of scores), got shape {tuple(t.shape)}"
            )
    if bool(torch.isnan(t).any()):
        raise ValueError(f"score_threshold must not be NaN, got {value!r}")
    return t


def _centres_and_sizes(boxes: Tensor, inclusive: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    off = 1.0 if inclusive else 0.0
    widths = boxes[..., 2] - boxes[..., 0] + off
    heights = boxes[..., 3] - boxes[..., 1] + off
    return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def _check_positive_sizes(widths: Tensor, heights: Tensor, boxes: Tensor, name: str) -> None:
    bad = (widths <= 0) | (heights <= 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} must have positive widths and heights, got row {i} = {boxes[i].tolist()}")


def encode_boxes(
    proposals: Tensor,
    gt: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    inclusive: bool = True,
) -> Tensor:
    """Regression targets that move ``proposals`` onto ``gt`` (R-CNN, Appendix C).

    With centre ``(px, py)`` and size ``(pw, ph)`` of a proposal and ``(gx, gy,
    gw, gh)`` of its ground truth::

        dx = wx * (gx - px) / pw        dw = ww * log(gw / pw)
        dy = wy * (gy - py) / ph        dh = wh * log(gh / ph)

    SPP-net Sec. 4 trains this regression on the pooled
    conv5 features. With ``inclusive=True`` (the R-CNN / SPP-net code),
    ``pw = x2 - x1 + 1`` and ``px = x1 + 0.5 * pw``.

    Args:
        proposals (Tensor[K, 4]): source boxes in (x1, y1, x2, y2) pixels.
        gt (Tensor[K, 4]): target box of each proposal.
        weights (sequence of 4 floats): ``(wx, wy, ww, wh)`` multipliers
            (targets are often normalised this way).
        inclusive (bool): ``+1`` pixel widths and heights.

    Returns:
        Tensor[K, 4]: deltas ``(dx, dy, dw, dh)``.

    Raises:
        ValueError: on mismatched shapes or a box with non-positive width or
            height (its log would be undefined); the message names the row.
    """
    _check_boxes_shape(proposals, "proposals")
    _check_boxes_shape(gt, "gt")
    if proposals.shape != gt.shape:
        raise ValueError(
            f"proposals and gt must have the same shape, got {tuple(proposals.shape)} and {tuple(gt.shape)}"
        )
    wx, wy, ww, wh = _check_weights(weights)
    proposals, gt = _upcast(proposals), _upcast(gt)
    px, py, pw, ph = _centres_and_sizes(proposals, inclusive)
    gx, gy, gw, gh = _centres_and_sizes(gt, inclusive)
    _check_positive_sizes(pw, ph, proposals, "proposals")
    _check_positive_sizes(gw, gh, gt, "gt")
    dx = wx * (gx - px) / pw
    dy = wy * (gy - py) / ph
    dw = ww * torch.log(gw / pw)
    dh = wh * torch.log(gh / ph)
    return torch.stack((dx, dy, dw, dh), dim=1)


def decode_boxes(
    proposals: Tensor,
    deltas: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    inclusive: bool = True,
    scale_clamp: float = _DEFAULT_SCALE_CLAMP,
) -> Tensor:
    """Apply regression deltas to proposals; the inverse of :func:`encode_boxes`.

    ``gx = px + pw * dx / wx``, ``gw = pw * exp(min(dw / ww, scale_clamp))`` and
    likewise for y / h. The new box is ``x1 = gx - 0.5 * gw`` and, when
    inclusive, ``x2 = gx + 0.5 * gw - 1``: this is the exact inverse, so
    ``decode_boxes(p, encode_boxes(p, g)) == g``. (Fast R-CNN's
    ``bbox_transform_inv`` omits that ``- 1`` and grows every box by a pixel;
    Detectron later fixed it. We follow the exact inverse.)

    Args:
        proposals (Tensor[K, 4]): source boxes in (x1, y1, x2, y2) pixels.
        deltas (Tensor[K, 4] or Tensor[K, C, 4]): ``(dx, dy, dw, dh)``, one set
            per proposal or one per proposal and class.
        weights (sequence of 4 floats): the ``(wx, wy, ww, wh)`` used to encode.
        inclusive (bool): ``+1`` pixel widths and heights.
        scale_clamp (float): upper clamp of ``dw`` and ``dh`` before ``exp``
            (default ``log(1000 / 16)``, as in Fast R-CNN).

    Returns:
        Tensor of the shape of ``deltas``: the decoded boxes (x1, y1, x2, y2).
        Boxes are not clipped to the image (see :func:`clip_boxes`).
    """
    _check_boxes_shape(proposals, "proposals")
    k = proposals.shape[0]
    if not (
        (deltas.dim() == 2 and tuple(deltas.shape) == (k, 4))
        or (deltas.dim() == 3 and deltas.shape[0] == k and deltas.shape[2] == 4)
    ):
        raise ValueError(
            f"deltas must be a Tensor[K, 4] or Tensor[K, C, 4] with K = {k} (from proposals), "
            f"got shape {tuple(deltas.shape)}"
        )
    wx, wy, ww, wh = _check_weights(weights)
    proposals = _upcast(proposals)
    deltas = deltas.to(proposals.dtype) if deltas.is_floating_point() else deltas.float()
    px, py, pw, ph = _centres_and_sizes(proposals, inclusive)  # each [K]
    if deltas.dim() == 3:
        px, py, pw, ph = px[:, None], py[:, None], pw[:, None], ph[:, None]  # [K, 1]
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=scale_clamp)
    dh = (deltas[..., 3] / wh).clamp(max=scale_clamp)
    gx = px + pw * dx
    gy = py + ph * dy
    gw = pw * torch.exp(dw)
    gh = ph * torch.exp(dh)
    off = 1.0 if inclusive else 0.0
    x1 = gx - 0.5 * gw
    y1 = gy - 0.5 * gh
    x2 = gx + 0.5 * gw - off
    y2 = gy + 0.5 * gh - off
    return torch.stack((x1, y1, x2, y2), dim=-1)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    values = tuple(float(w) for w in weights)
    if len(values) != 4 or not all(w > 0 and math.isfinite(w) for w in values):
        raise ValueError(f"weights must be 4 positive finite numbers, got {tuple(weights)}")
    return values  # type: ignore[return-value]


def clip_boxes(boxes: Tensor, size: tuple[int, int], inclusive: bool = False) -> Tensor:
    """Clip boxes to an image.

    Args:
        boxes (Tensor[..., 4]): boxes in (x1, y1, x2, y2) pixels.
        size (tuple[int, int]): image ``(H, W)``.
        inclusive (bool): if True coordinates are pixel indices and are clipped
            to ``[0, W - 1] x [0, H - 1]`` (R-CNN); otherwise to ``[0, W] x [0, H]``
            (torchvision's ``clip_boxes_to_image``).

    Returns:
        Tensor of the shape of ``boxes``.
    """
    if boxes.dim() < 1 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be a Tensor[..., 4], got shape {tuple(boxes.shape)}")
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"size must be (H, W) with positive entries, got {tuple(size)}")
    height, width = int(size[0]), int(size[1])
    off = 1 if inclusive else 0
    x = boxes[..., 0::2].clamp(min=0, max=width - off)
    y = boxes[..., 1::2].clamp(min=0, max=height - off)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float, inclusive: bool = False) -> Tensor:
    """Indices of the boxes whose width and height are both ``>= min_size``.

    Args:
        boxes (Tensor[K, 4]): boxes in (x1, y1, x2, y2) pixels.
        min_size (float): minimum width and height.
        inclusive (bool): ``+1`` pixel widths and heights.

    Returns:
        Tensor[N] (int64): indices of the boxes kept, ascending.
    """
    _check_boxes_shape(boxes, "boxes")
    off = 1.0 if inclusive else 0.0
    widths = boxes[:, 2] - boxes[:, 0] + off
    heights = boxes[:, 3] - boxes[:, 1] + off
    return ((widths >= min_size) & (heights >= min_size)).nonzero().squeeze(1)
