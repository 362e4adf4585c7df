"""Pure-PyTorch window pyramids: CUDA, bfloat16 / float16, avg mode, or no numba.

* max: a 2-D sparse table (range-max over power-of-two blocks) and four
  look-ups per bin; coarser levels from finer ones (``level_sources``).
* avg: a summed-area table and four look-ups per bin, exact also for NaN / inf.

Both take validated ``LongTensor[K, 5]`` windows (:func:`check_rois`) and gather
in chunks of at most ``_CHUNK_BYTES``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sppnet.ops._bins import bin_edges, level_sources

__all__ = ["roi_avg_torch", "roi_max_torch"]

_CHUNK_BYTES = 256 * 2**20  # bound on the gather intermediate


def _floor_log2(v: Tensor) -> Tensor:
    """floor(log2(v)) for positive integer tensors, exactly."""
    out = torch.zeros_like(v)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        out = out + big.long() * s
        v = torch.where(big, v >> s, v)
    return out


def _flat_index(base: Tensor, rows: Tensor, cols: Tensor, width: int) -> Tensor:
    """Flat table index of the cells ``(rows[k, i], cols[k, j])``: ``LongTensor[K, n, n]``.

    ``base[k, i, j]`` is the index of row 0 of the table plane that bin (i, j)
    of window k reads, in units of rows; ``rows``, ``cols`` are ``[K, n]``.
    """
    return (base + rows[:, :, None]) * width + cols[:, None, :]


def _chunks(n_win: int, per_window_bytes: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_BYTES // max(1, per_window_bytes))
    return [(s, min(n_win, s + step)) for s in range(0, n_win, step)]


def roi_max_torch(features: Tensor, rois: Tensor, levels: tuple[int, ...]) -> Tensor:
    """Max pyramid from a 2-D sparse table: ``table[a][b][y, x]`` = max over
    ``[y, y + 2^a) x [x, x + 2^b)``; any bin is the max of four overlapping blocks."""
    n_img, chans, height, width = features.shape
    n_win = rois.shape[0]
    dev = features.device
    rois = rois.to(dev)
    b, x1, y1, x2, y2 = rois.unbind(1)
    hgt, wid = y2 - y1 + 1, x2 - x1 + 1
    sources = level_sources(levels)
    read = [n for n, src in sources.items() if src is None]
    edges = {n: (bin_edges(y1, hgt, n), bin_edges(x1, wid, n)) for n in read}
    max_h = max(int((hi - lo).max()) for (lo, hi), _ in edges.values())
    max_w = max(int((hi - lo).max()) for _, (lo, hi) in edges.values())
    la, lb = max_h.bit_length(), max_w.bit_length()

    xl = features.permute(0, 2, 3, 1)  # [N, H, W, C]
    rows = [xl]
    for a in range(1, la):
        p, s = rows[-1], 1 << (a - 1)
        rows.append(torch.cat([torch.maximum(p[:, : height - s], p[:, s:]), p[:, height - s :]], dim=1))
    tables = []
    for r in rows:
        cols = [r]
        for bb in range(1, lb):
            p, s = cols[-1], 1 << (bb - 1)
            cols.append(torch.cat([torch.maximum(p[:, :, : width - s], p[:, :, s:]), p[:, :, width - s :]], dim=2))
        tables.append(torch.stack(cols, 0))
    table = torch.stack(tables, 0).reshape(-1, chans)  # [la*lb*N*H*W, C]

    pooled: dict[int, Tensor] = {}
    for n in read:
        (rs, re), (cs, ce) = edges[n]
        ka, kb = _floor_log2(re - rs), _floor_log2(ce - cs)  # [K, n]
        r0, r1 = rs, re - (1 << ka)
        c0, c1 = cs, ce - (1 << kb)
        base = ((ka[:, :, None] * lb + kb[:, None, :]) * n_img + b[:, None, None]) * height  # [K, n, n]
        corners = [(r0, c0), (r0, c1), (r1, c0), (r1, c1)]
        idx = torch.stack([_flat_index(base, r, c, width) for r, c in corners], dim=-1)  # [K, n, n, 4]
        outs = []
        for s, e in _chunks(n_win, n * n * 4 * chans * features.element_size()):
            g = table.index_select(0, idx[s:e].reshape(-1)).view(e - s, n * n, 4, chans)
            outs.append(g.amax(dim=2))  # [k, n*n, C]
        pooled[n] = torch.cat(outs, 0).view(n_win, n, n, chans)
    for n, src in sources.items():
        if src is None:
            continue
        fine = pooled[src]
        k = fine.shape[1] // n
        pooled[n] = fine.view(n_win, n, k, n, k, chans).amax(dim=(2, 4))  # [K, n, n, C]
    return torch.cat([pooled[n].permute(0, 3, 1, 2).reshape(n_win, -1) for n in levels], dim=1)


def roi_avg_torch(features: Tensor, rois: Tensor, levels: tuple[int, ...]) -> Tensor:
    """Avg pyramid from a summed-area table: four look-ups per bin, exact.

    Non-finite values: a summed-area table would smear one NaN or inf over every
    later bin (``inf - inf = NaN``). When the map holds any, the finite values are
    summed and NaN / +inf / -inf are counted per bin instead, and each bin follows
    torch's own pooling: NaN if it holds a NaN or both infinities, else +-inf if
    it holds one, else the mean.
    """
    n_img, chans, height, width = features.shape
    n_win = rois.shape[0]
    dev = features.device
    rois = rois.to(dev)
    acc = torch.float64 if features.dtype == torch.float64 or dev.type == "cpu" else torch.float32
    finite = torch.isfinite(features)
    special = not bool(finite.all())
    vals = features.to(acc)
    if special:
        inf = float("inf")
        counts = [features.isnan(), features == inf, features == -inf]
        vals = torch.cat([torch.where(finite, vals, 0.0)] + [m.to(acc) for m in counts], dim=1)  # [N, 4C, H, W]
    cols = vals.shape[1]
    sat = vals.permute(0, 2, 3, 1).cumsum(1).cumsum(2)  # [N, H, W, cols]
    sat = torch.nn.functional.pad(sat, (0, 0, 1, 0, 1, 0))  # [N, H+1, W+1, cols], zero row/col first
    flat = sat.reshape(-1, cols)
    b, x1, y1, x2, y2 = rois.unbind(1)
    hgt, wid = y2 - y1 + 1, x2 - x1 + 1
    outs = []
    for n in levels:
        rs, re = bin_edges(y1, hgt, n)
        cs, ce = bin_edges(x1, wid, n)
        base = b[:, None, None] * (height + 1)
        area = ((re - rs)[:, :, None] * (ce - cs)[:, None, :]).to(acc)  # [K, n, n]
        corners = [(re, ce), (rs, ce), (re, cs), (rs, cs)]
        idx = torch.stack([_flat_index(base, r, c, width + 1) for r, c in corners], dim=-1)  # [K, n, n, 4]
        sign = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=acc, device=dev)
        parts = []
        for s, e in _chunks(n_win, n * n * 4 * cols * 8):
            g = flat.index_select(0, idx[s:e].reshape(-1)).view(e - s, n * n, 4, cols)
            sums = (g * sign[None, None, :, None]).sum(2)  # [k, n*n, cols]
            mean = sums[..., :chans] / area[s:e].reshape(e - s, n * n, 1)  # [k, n*n, C]
            if special:
                n_nan, n_pos, n_neg = (sums[..., i * chans : (i + 1) * chans] > 0.5 for i in (1, 2, 3))
                mean = torch.where(n_neg, -inf, mean)
                mean = torch.where(n_pos, inf, mean)
                mean = torch.where(n_nan | (n_pos & n_neg), float("nan"), mean)
            parts.append(mean)
        lvl = torch.cat(parts, 0)
        outs.append(lvl.permute(0, 2, 1).reshape(n_win, -1).to(features.dtype))
    return torch.cat(outs, dim=1)
