"""Brute-force references for the operator tests: readable loops over bins.

Deliberately naive and independent of ``sppnet.ops``: bins come straight from
the paper's formulas in exact rational arithmetic, every bin is pooled on its
own, and a window is pooled by cropping it out of the map. Everything is built
from differentiable torch ops, so the references also give reference gradients.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor


def appendix_bins(a: int, n: int) -> list[tuple[int, int]]:
    """Appendix: bin ``i`` of ``n`` on an axis of ``a`` cells is ``[floor(i*a/n), ceil((i+1)*a/n))``."""
    return [(math.floor(Fraction(i * a, n)), math.ceil(Fraction((i + 1) * a, n))) for i in range(n)]


def sliding_bins(a: int, n: int) -> list[tuple[int, int]]:
    """Sec. 2.3: a window of ``ceil(a/n)`` cells moved by ``floor(a/n)``; ``n`` positions."""
    win, stride = math.ceil(Fraction(a, n)), math.floor(Fraction(a, n))
    return [(i * stride, i * stride + win) for i in range(n)]


def pool_region(region: Tensor, mode: str) -> Tensor:
    """Max or mean over the last two dims of ``region`` (``[..., h, w]``)."""
    if mode == "max":
        return region.amax(dim=(-2, -1))
    return region.mean(dim=(-2, -1))


def pyramid_ref(x: Tensor, levels, mode: str = "max", bins: str = "adaptive") -> Tensor:
    """``Tensor[N, C * sum(n*n)]``: per level, channel-major ``c*n*n + y*n + x``."""
    _, chans, height, width = x.shape
    cut = appendix_bins if bins == "adaptive" else sliding_bins
    columns = []
    for n in levels:
        rows, cols = cut(height, n), cut(width, n)
        for c in range(chans):
            for y0, y1 in rows:
                for x0, x1 in cols:
                    columns.append(pool_region(x[:, c, y0:y1, x0:x1], mode))  # [N]
    return torch.stack(columns, dim=1)


def roi_pyramid_ref(features: Tensor, rois, levels, mode: str = "max") -> Tensor:
    """Pools each window ``(b, x1, y1, x2, y2)`` (inclusive cells) by cropping it."""
    chans = features.shape[1]
    rows = []
    for b, x1, y1, x2, y2 in (tuple(int(v) for v in r) for r in rois):
        crop = features[b : b + 1, :, y1 : y2 + 1, x1 : x2 + 1]
        rows.append(pyramid_ref(crop, levels, mode)[0])
    if not rows:
        return features.new_zeros((0, chans * sum(n * n for n in levels)))
    return torch.stack(rows, dim=0)


def usual_pyramid(x: Tensor, levels, mode: str = "max") -> Tensor:
    """What most SPP ports do: torch's adaptive pooling per level, flattened, concatenated."""
    pool = torch.nn.functional.adaptive_max_pool2d if mode == "max" else torch.nn.functional.adaptive_avg_pool2d
    return torch.cat([pool(x, n).flatten(1) for n in levels], dim=1)


def map_box_ref(box, stride, offset=0.0, feature_size=None) -> list[int]:
    """Maps one box by checking cell centres one by one, in exact arithmetic.

    Per axis: keep the cells whose centre ``offset + stride * j`` lies in
    ``[lo, hi]``; if none, take the cell whose centre is nearest the window's
    centre (ties: the larger ``j``). Then clamp to ``feature_size = (H, W)``.
    As documented in ``map_boxes_to_features``, a centre within ``1e-9`` cells
    of an edge counts as on the edge (float64 division is not exact), and
    distances within that tolerance count as ties.
    """
    s, o = Fraction(stride), Fraction(offset)
    tol = Fraction(1, 10**9) * s
    lo_x, lo_y, hi_x, hi_y = (Fraction(float(v)) for v in box)
    result = []
    for lo, hi in ((lo_x, hi_x), (lo_y, hi_y)):
        first = math.floor((lo - o) / s) - 2
        last = math.ceil((hi - o) / s) + 2
        inside = [j for j in range(first, last + 1) if lo - tol <= o + s * j <= hi + tol]
        if inside:
            result.append((inside[0], inside[-1]))
        else:
            mid = (lo + hi) / 2
            nearest = min(abs(o + s * j - mid) for j in range(first, last + 1))
            best = max(j for j in range(first, last + 1) if abs(o + s * j - mid) <= nearest + tol)
            result.append((best, best))
    (x1, x2), (y1, y2) = result
    if feature_size is not None:
        fh, fw = feature_size
        x1, x2 = (min(max(v, 0), fw - 1) for v in (x1, x2))
        y1, y2 = (min(max(v, 0), fh - 1) for v in (y1, y2))
    return [x1, y1, x2, y2]
