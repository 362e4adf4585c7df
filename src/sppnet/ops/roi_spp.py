"""Spatial pyramid pooling of many windows of one feature map (SPP-net Sec. 4).

SPP-net's detector runs the conv layers once per image and scale, maps each of
~2,000 candidate windows onto conv5 (``ops/mapping.py``) and pools every window
with the pyramid. ``roi_spatial_pyramid_pool`` does that for all windows in one
call, without a Python loop over windows or bins.

Windows are in integer feature-map cells, both ends INCLUSIVE: a window with
``x1 = x2`` is one cell wide. Bin ``i`` of ``n`` along a window side of ``a``
cells starting at cell ``s`` covers cells ``[s + floor(i*a/n), s + ceil((i+1)*a/n))``
(Appendix bins, the same as the image-level ``bins="adaptive"``): pooling a
window that is the whole map equals ``spatial_pyramid_pool`` of the map.

Implementations, chosen automatically (all exact, tested against a loop):
* CPU, float32/float64, max: numba kernels (``ops/_kernels.py``) that read each
  window once for the finest level and derive coarser levels from it; a cost
  model picks scanning or a sparse table; argmax kept for backward.
* otherwise (CUDA, bfloat16/float16, or numba missing), max: a 2-D sparse table
  (range-max over power-of-two blocks) and four look-ups per bin, pure PyTorch.
* avg, everywhere: a summed-area table and four look-ups per bin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sppnet.ops import _kernels
from sppnet.ops._bins import check_levels, check_mode

__all__ = ["roi_spatial_pyramid_pool", "RoISpatialPyramidPool", "check_rois"]

_CHUNK_BYTES = 256 * 2**20  # bound on the gather intermediate of the PyTorch paths


def _rois_from_list(rois: list[Tensor] | tuple[Tensor, ...], n_img: int, device: torch.device) -> Tensor:
    if len(rois) != n_img:
        raise ValueError(f"rois as a list needs one Tensor[L_i, 4] per image: got {len(rois)} for {n_img} images")
    parts = []
    for i, r in enumerate(rois):
        r = torch.as_tensor(r)
        if r.dim() != 2 or r.shape[1] != 4:
            raise ValueError(f"rois[{i}] must be Tensor[L, 4] (x1, y1, x2, y2), got shape {tuple(r.shape)}")
        idx = torch.full((r.shape[0], 1), i, dtype=torch.float64, device=r.device)
        parts.append(torch.cat([idx, r.to(torch.float64)], dim=1))
    if not parts:
        return torch.zeros((0, 5), dtype=torch.float64, device=device)
    return torch.cat(parts, dim=0).to(device)


def check_rois(rois: Tensor | Sequence[Tensor], features_shape: Sequence[int]) -> Tensor:
    """Validates windows and returns them as ``LongTensor[K, 5]``.

    Args:
        rois: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of
            ``Tensor[L_i, 4]`` rows ``(x1, y1, x2, y2)``, one per image; integer
            feature-map cells, both ends inclusive, any numeric dtype holding
            whole numbers.
        features_shape: ``(N, C, H, W)`` of the feature maps.

    Raises:
        ValueError: naming the first offending row for a wrong shape, a
            non-finite or fractional value, ``x2 < x1`` / ``y2 < y1``, a window
            outside the ``H x W`` map, or a batch index outside ``[0, N)``.
    """
    n_img, _, height, width = (int(s) for s in features_shape)
    if isinstance(rois, (list, tuple)):
        r = _rois_from_list(rois, n_img, torch.device("cpu"))
    elif isinstance(rois, Tensor):
        if rois.dim() != 2 or rois.shape[1] != 5:
            raise ValueError(
                f"rois must be Tensor[K, 5] (batch_index, x1, y1, x2, y2) or a list of Tensor[L, 4], "
                f"got shape {tuple(rois.shape)}"
            )
        r = rois.detach()
    else:
        raise ValueError(f"rois must be a Tensor or a list of Tensors, got {type(rois).__name__}")
    if r.shape[0] == 0:
        return torch.zeros((0, 5), dtype=torch.long)
    rf = r.to(torch.float64).cpu()

    def first_bad(mask: Tensor) -> int:
        return int(mask.nonzero()[0, 0])

    bad = ~torch.isfinite(rf).all(dim=1)
    if bad.any():
        i = first_bad(bad)
        raise ValueError(f"rois must be finite, got row {i} = {rf[i].tolist()}")
    bad = (rf != rf.round()).any(dim=1)
    if bad.any():
        i = first_bad(bad)
        raise ValueError(
            f"rois must be whole feature-map cells (map image boxes with map_boxes_to_features), "
            f"got row {i} = {rf[i].tolist()}"
        )
    rl = rf.long()
    b, x1, y1, x2, y2 = rl.unbind(1)
    checks = [
        ((b < 0) | (b >= n_img), f"batch index must be in [0, {n_img})"),
        ((x2 < x1) | (y2 < y1), "windows must satisfy x1 <= x2 and y1 <= y2"),
        ((x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height), f"windows must lie in the {height}x{width} map"),
    ]
    for mask, what in checks:
        if mask.any():
            i = first_bad(mask)
            raise ValueError(f"{what}, got row {i} = {rl[i].tolist()} (batch_index, x1, y1, x2, y2)")
    return rl


# ---------------------------------------------------------------------------- numba


def _kernel_forward(
    feats: Tensor, rois: Tensor, levels: tuple[int, ...], with_arg: bool, planes: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Runs the numba kernels: ``(out [K, D], argmax [K, D] or None)``.

    Without ``with_arg`` (no gradient needed) the values-only kernels run; they
    vectorise over channels and read half the memory. The argmax is the cell
    index ``y*W + x`` (its channel is the column's): int16 while the map has at
    most 32,767 cells, else int32. ``planes`` (only when ``rois`` is the whole
    map of each image, in order) runs the per-plane kernel instead, which reads
    the ``[N, C, H, W]`` layout directly and is parallel over channels.
    """
    n_img, chans, height, width = feats.shape
    lv, src, out_off, buf_off, order = _kernels.make_plan(levels, chans)
    n_win = rois.shape[0]
    dim = chans * sum(n * n for n in levels)
    out = torch.empty((n_win, dim), dtype=feats.dtype)
    arg_dtype = torch.int16 if height * width <= 32767 else torch.int32
    arg = torch.empty((n_win, dim), dtype=arg_dtype) if with_arg else None
    if n_win == 0:
        return out, arg
    if planes:
        _kernels.set_threads(torch.get_num_threads())
        arg_np = arg.numpy() if with_arg else np.empty((n_win, 0), dtype=np.int16)
        _kernels.plane_pyramid_max(feats.numpy(), lv, src, out_off, order, out.numpy(), arg_np, with_arg)
        return out, arg
    direct = [levels[i] for i in range(len(levels)) if src[i] < 0]
    la, lb = _table_depth(rois, direct)
    _kernels.set_threads(torch.get_num_threads())
    # Cost model (cells x channels touched): scanning reads every bin row's map
    # rows (~1.5x the window: adaptive bins overlap); the sparse table pays
    # la*lb copies of the map once, then 4 reads a bin.
    hw = (rois[:, 4] - rois[:, 2] + 1) * (rois[:, 3] - rois[:, 1] + 1)
    scan_cost = 1.5 * float(hw.sum()) * len(direct)
    table_cost = 2.0 * la * lb * n_img * height * width + 4.0 * n_win * sum(n * n for n in direct)
    feats_cl = feats.permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C]
    r = rois.numpy()
    plan = (lv, src, out_off, buf_off, order, out.numpy())
    if scan_cost <= table_cost:
        if with_arg:
            _kernels.scan_pyramid_max_forward(feats_cl, r, *plan, arg.numpy())
        else:
            _kernels.scan_pyramid_max_values(feats_cl, r, *plan)
    else:
        shape = (la, lb, n_img, height, width, chans)
        tab_val = torch.empty(shape, dtype=feats.dtype).numpy()
        if with_arg:
            tab_arg = torch.empty(shape, dtype=arg_dtype).numpy()
            _kernels.build_max_tables(feats_cl, tab_val, tab_arg)
            _kernels.roi_pyramid_max_forward(tab_val, tab_arg, r, *plan, arg.numpy())
        else:
            _kernels.build_max_tables_values(feats_cl, tab_val)
            _kernels.roi_pyramid_max_values(tab_val, r, *plan)
    return out, arg


class _PyramidMaxKernel(torch.autograd.Function):
    """Max pyramid over windows with the numba kernel; backward scatters by argmax."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, levels: tuple[int, ...], planes: bool) -> Tensor:  # type: ignore[override]
        feats = features.detach().contiguous()
        out, arg = _kernel_forward(feats, rois, levels, with_arg=True, planes=planes)
        ctx.save_for_backward(arg, rois)
        ctx.shape = tuple(feats.shape)
        ctx.levels = levels
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        arg, rois = ctx.saved_tensors
        n_img, chans, height, width = ctx.shape
        if not rois.shape[0]:
            return grad_out.new_zeros((n_img, chans, height, width)), None, None, None
        grad_in = torch.empty((n_img, chans, height * width), dtype=grad_out.dtype)  # the kernel zeroes it
        lv, _, out_off, _, _ = _kernels.make_plan(ctx.levels, chans)
        _kernels.set_threads(torch.get_num_threads())
        _kernels.roi_pyramid_max_backward(
            grad_out.contiguous().numpy(),
            arg.numpy(),
            np.ascontiguousarray(rois[:, 0].numpy()),
            lv,
            out_off,
            grad_in.numpy(),
        )
        return grad_in.view(n_img, chans, height, width), None, None, None


def _table_depth(rois: Tensor, direct_levels: list[int]) -> tuple[int, int]:
    """Sparse-table depth needed for the longest bin side of the direct levels."""
    _, x1, y1, x2, y2 = rois.unbind(1)
    max_h = max(int((hi - lo).max()) for lo, hi in (_bin_edges(y1, y2 - y1 + 1, n) for n in direct_levels))
    max_w = max(int((hi - lo).max()) for lo, hi in (_bin_edges(x1, x2 - x1 + 1, n) for n in direct_levels))
    return max_h.bit_length(), max_w.bit_length()


def _use_kernel(features: Tensor, mode: str) -> bool:
    return (
        _kernels.HAVE_NUMBA
        and mode == "max"
        and features.device.type == "cpu"
        and features.dtype in (torch.float32, torch.float64)
        and not torch.jit.is_tracing()
    )


def pyramid_max_kernel(features: Tensor, rois: Tensor, levels: tuple[int, ...], planes: bool = False) -> Tensor:
    """``[K, C * sum(n*n)]`` via the numba kernel (validated LongTensor rois).

    ``planes=True`` only when ``rois`` is the whole map of each image in order
    (the image-level pyramid): see :func:`_kernel_forward`.
    """
    if torch.is_grad_enabled() and features.requires_grad:
        return _PyramidMaxKernel.apply(features, rois.contiguous(), levels, planes)
    return _kernel_forward(features.detach().contiguous(), rois.contiguous(), levels, with_arg=False, planes=planes)[0]


# -------------------------------------------------------------------------- PyTorch


def _bin_edges(start: Tensor, length: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Adaptive bins of windows: ``(lo, hi)`` each ``LongTensor[K, n]``, hi exclusive."""
    i = torch.arange(n, device=start.device)
    lo = start[:, None] + torch.div(i[None] * length[:, None], n, rounding_mode="floor")
    hi = start[:, None] + torch.div((i[None] + 1) * length[:, None] + n - 1, n, rounding_mode="floor")
    return lo, hi


def _floor_log2(v: Tensor) -> Tensor:
    """floor(log2(v)) for positive integer tensors, exactly."""
    out = torch.zeros_like(v)
    for s in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << s)
        out = out + big.long() * s
        v = torch.where(big, v >> s, v)
    return out


def _chunks(n_win: int, per_window_bytes: int) -> list[tuple[int, int]]:
    step = max(1, _CHUNK_BYTES // max(1, per_window_bytes))
    return [(s, min(n_win, s + step)) for s in range(0, n_win, step)]


def _roi_max_torch(features: Tensor, rois: Tensor, levels: tuple[int, ...]) -> Tensor:
    """Max pyramid from a 2-D sparse table: ``table[a][b][y, x]`` = max over
    ``[y, y + 2^a) x [x, x + 2^b)``; any bin is the max of four overlapping blocks."""
    n_img, chans, height, width = features.shape
    n_win = rois.shape[0]
    dev = features.device
    rois = rois.to(dev)
    b, x1, y1, x2, y2 = rois.unbind(1)
    hgt, wid = y2 - y1 + 1, x2 - x1 + 1
    direct = [n for n in sorted(set(levels), reverse=True)]
    derive_from: dict[int, int] = {}
    read: list[int] = []
    for n in direct:
        srcs = [m for m in read if m % n == 0]
        if srcs:
            derive_from[n] = min(srcs)
        else:
            read.append(n)
    edges = {n: (_bin_edges(y1, hgt, n), _bin_edges(x1, wid, n)) for n in read}
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

        def at(r: Tensor, c: Tensor) -> Tensor:
            return (base + r[:, :, None]) * width + c[:, None, :]

        idx = torch.stack([at(r0, c0), at(r0, c1), at(r1, c0), at(r1, c1)], dim=-1)  # [K, n, n, 4]
        outs = []
        for s, e in _chunks(n_win, n * n * 4 * chans * features.element_size()):
            g = table.index_select(0, idx[s:e].reshape(-1)).view(e - s, n * n, 4, chans)
            outs.append(g.amax(dim=2))  # [k, n*n, C]
        pooled[n] = torch.cat(outs, 0).view(n_win, n, n, chans)
    for n in sorted(derive_from, reverse=True):
        fine = pooled[derive_from[n]]
        k = fine.shape[1] // n
        pooled[n] = fine.view(n_win, n, k, n, k, chans).amax(dim=(2, 4))  # [K, n, n, C]
    return torch.cat([pooled[n].permute(0, 3, 1, 2).reshape(n_win, -1) for n in levels], dim=1)


def _roi_avg_torch(features: Tensor, rois: Tensor, levels: tuple[int, ...]) -> Tensor:
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
        rs, re = _bin_edges(y1, hgt, n)
        cs, ce = _bin_edges(x1, wid, n)
        base = b[:, None, None] * (height + 1)

        def at(r: Tensor, c: Tensor) -> Tensor:
            return (base + r[:, :, None]) * (width + 1) + c[:, None, :]  # [K, n, n]

        area = ((re - rs)[:, :, None] * (ce - cs)[:, None, :]).to(acc)  # [K, n, n]
        idx = torch.stack([at(re, ce), at(rs, ce), at(re, cs), at(rs, cs)], dim=-1)  # [K, n, n, 4]
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


def roi_spatial_pyramid_pool(
    features: Tensor,
    rois: Tensor | Sequence[Tensor],
    levels: int | Sequence[int] = (6, 3, 2, 1),
    mode: str = "max",
) -> Tensor:
    """Pools K windows of a batch of feature maps with the spatial pyramid.

    Args:
        features (Tensor[N, C, H, W]): conv feature maps (float).
        rois (Tensor[K, 5] or list[Tensor[L_i, 4]]): windows as
            ``(batch_index, x1, y1, x2, y2)`` rows, or one ``(x1, y1, x2, y2)``
            tensor per image; integer feature-map cells (any numeric dtype,
            whole-number values), both ends inclusive; windows must lie in the
            map. Use :func:`map_boxes_to_features` to get them from image boxes.
        levels: bins per side of each level, in output order.
        mode: ``"max"`` or ``"avg"``.

    Returns:
        Tensor[K, C * sum(n*n)]: per level the flatten of ``(C, n, n)``, levels
        concatenated (the layout of :func:`spatial_pyramid_pool`). Rows follow
        the order of ``rois`` (list form: image 0's windows first). ``K = 0``
        gives an empty ``[0, C * sum(n*n)]`` tensor.

    Non-finite feature values propagate as in torch's own adaptive pooling of
    each window's crop: a NaN in a bin makes that bin NaN (max and avg); in avg
    mode +inf and -inf in one bin give NaN.
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be a Tensor[N, C, H, W] (4 dims), got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got dtype {features.dtype}")
    levels = check_levels(levels)
    check_mode(mode)
    r = check_rois(rois, features.shape)
    dim = features.shape[1] * sum(n * n for n in levels)
    if r.shape[0] == 0:
        # Empty, but still part of the graph (like torchvision's roi_pool), so that a
        # loss summed over zero windows backpropagates zeros instead of failing.
        return features.flatten(1)[:0, :1].expand(0, dim).clone()
    if _use_kernel(features, mode):
        return pyramid_max_kernel(features, r, levels)
    if mode == "max":
        return _roi_max_torch(features, r, levels)
    return _roi_avg_torch(features, r, levels)


class RoISpatialPyramidPool(nn.Module):
    """Module form of :func:`roi_spatial_pyramid_pool`.

    Args:
        levels: bins per side of each level, in output order (the released
            detection code uses ``(1, 2, 3, 6)``).
        mode: ``"max"`` or ``"avg"``.
    """

    def __init__(self, levels: int | Sequence[int] = (6, 3, 2, 1), mode: str = "max") -> None:
        super().__init__()
        self.levels = check_levels(levels)
        self.mode = check_mode(mode)

    @property
    def num_bins(self) -> int:
        return sum(n * n for n in self.levels)

    def output_dim(self, channels: int) -> int:
        """Width of the output for ``channels`` feature channels."""
        return channels * self.num_bins

    def forward(self, features: Tensor, rois: Tensor | Sequence[Tensor]) -> Tensor:
        return roi_spatial_pyramid_pool(features, rois, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}, num_bins={self.num_bins}"
