"""Mapping image windows onto the conv feature map (SPP-net Appendix).

Coordinates. Image boxes are CONTINUOUS pixel coordinates: pixel ``i`` covers
``[i, i + 1)`` and has its centre at ``i + 0.5``. A box given as inclusive pixel
indices (Pascal VOC style, last pixel ``x2``) covers ``[x1, x2 + 1)``; the
detector converts before calling :func:`map_boxes_to_features`.

Geometry of a backbone. Feature cell ``j`` has its receptive-field centre at
``offset + stride * j`` pixels. For a chain of conv / pool layers with kernel
``k_l``, stride ``s_l`` and padding ``p_l`` (input first):

    stride = prod(s_l)
    offset = 0.5 + sum_l ((k_l - 1) / 2 - p_l) * prod_{m < l} s_m

(the centre of input cell ``i`` of layer ``l`` is at output position
``i*s_l - p_l + (k_l - 1)/2``; 0.5 is the centre of pixel 0). Ceil-mode pooling
adds cells at the far end only and does not change the offset. With every layer
padded by ``floor(k/2)`` (odd k) the sum vanishes: ``offset = 0.5`` and cell
``x'`` is centred at ``S * x'`` up to the half pixel -- the paper's case, where
the left edge maps to ``floor(x/S) + 1`` and the right edge to ``ceil(x/S) - 1``.
:func:`backbone_geometry` computes both numbers; every model in
``sppnet.models`` reports its own ``stride`` and ``offset`` through it.

The released code shrinks each edge by 6.5 px and rounds to the nearest centre
(a cell is kept when its centre is within ~half a stride of the window). We
follow the paper: a cell is kept iff its centre lies inside the window.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["map_boxes_to_features", "backbone_geometry"]


def backbone_geometry(layers: Sequence[tuple[int, int, int]]) -> tuple[int, float]:
    """Total stride and cell-0 centre of a chain of conv / pool layers.

    Args:
        layers: ``(kernel, stride, padding)`` of every layer that changes
            geometry, input first.

    Returns:
        ``(stride, offset)`` in pixels: cell ``j`` is centred at ``offset + stride * j``.
    """
    stride, offset = 1, 0.5
    for k, s, p in layers:
        if k <= 0 or s <= 0 or p < 0:
            raise ValueError(f"layers need kernel > 0, stride > 0, padding >= 0, got {(k, s, p)}")
        offset += ((k - 1) / 2 - p) * stride
        stride *= s
    return stride, offset


def _is_real(v: object) -> bool:
    """A real number (Python or NumPy int/float), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def map_boxes_to_features(
    boxes: Tensor,
    stride: float,
    offset: float = 0.0,
    feature_size: tuple[int, int] | None = None,
) -> Tensor:
    """Maps image windows to inclusive feature-map cells (Appendix).

    Left/top edge: the first cell whose centre is ``>=`` the edge; right/bottom
    edge: the last cell whose centre is ``<=`` the edge (centres exactly on an
    edge are kept). With ``offset = 0`` that is the paper's ``floor(x/S) + 1`` /
    ``ceil(x/S) - 1`` except on exact multiples. A window that contains no
    centre collapses to the cell whose centre is nearest the window's centre
    (halves round up). Comparisons allow ``1e-9`` cells of float64 rounding:
    a centre that close to an edge counts as on it.

    Args:
        boxes (Tensor[K, 4]): ``(x1, y1, x2, y2)`` in continuous pixel coordinates.
        stride: total stride ``S`` of the backbone in pixels.
        offset: centre of cell 0 in pixels (see :func:`backbone_geometry`).
        feature_size: ``(H, W)`` of the map; results are clamped to it.

    Returns:
        LongTensor[K, 4]: ``(x1, y1, x2, y2)`` cells, both ends inclusive, with
        ``x1 <= x2`` and ``y1 <= y2``; ready for ``roi_spatial_pyramid_pool``.

    Raises:
        ValueError: for a wrong shape, non-finite coordinates, ``x2 < x1`` or
            ``y2 < y1`` (naming the row), a non-positive stride or a
            ``feature_size`` with a side < 1.
    """
    if not isinstance(boxes, Tensor):
        boxes = torch.as_tensor(boxes)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be Tensor[K, 4] (x1, y1, x2, y2), got shape {tuple(boxes.shape)}")
    if not (_is_real(stride) and math.isfinite(stride) and stride > 0):
        raise ValueError(f"stride must be a positive number, got {stride!r}")
    if not (_is_real(offset) and math.isfinite(offset)):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    if feature_size is not None:
        fh, fw = (int(v) for v in feature_size)
        if fh < 1 or fw < 1:
            raise ValueError(f"feature_size must be (H, W) with H, W >= 1, got {tuple(feature_size)}")
    b = boxes.detach().to(torch.float64)
    if b.shape[0]:
        bad = ~torch.isfinite(b).all(dim=1)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"boxes must be finite, got row {i} = {b[i].tolist()}")
        bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"boxes must satisfy x1 <= x2 and y1 <= y2, got row {i} = {b[i].tolist()}")
    u = (b - offset) / stride  # box edges in units of cells: cell j's centre sits at u = j
    # A tiny tolerance keeps centres that lie exactly on an edge despite rounding
    # in (x - offset) / stride; it is far below any real coordinate step.
    eps = 1e-9
    lo = torch.ceil(u[:, :2] - eps)  # first centre >= edge
    hi = torch.floor(u[:, 2:] + eps)  # last centre <= edge
    empty = lo > hi  # [K, 2]: no centre inside along x / y
    mid = torch.floor((u[:, :2] + u[:, 2:]) / 2 + 0.5 + eps)
    lo = torch.where(empty, mid, lo)
    hi = torch.where(empty, mid, hi)
    out = torch.cat([lo, hi], dim=1)
    if feature_size is not None:
        out[:, 0::2] = out[:, 0::2].clamp(0, fw - 1)
        out[:, 1::2] = out[:, 1::2].clamp(0, fh - 1)
    return out.long().to(boxes.device)
