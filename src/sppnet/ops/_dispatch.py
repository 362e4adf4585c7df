"""The numba route of the max pyramid: when it applies, which kernel runs, autograd.

Both operators (``spatial_pyramid_pool`` and ``roi_spatial_pyramid_pool``) come
here for max pooling on CPU in float32 / float64 when numba is importable and
nothing is being traced. Three kernels (``ops/_kernels.py``) compute the same
exact values; this module picks one:

* ``planes=True`` (the image-level pyramid on large maps or small batches):
  the per-plane kernel, in the input's own ``[N, C, H, W]`` layout.
* otherwise a cost model (cells x channels touched) chooses between scanning
  each window's cells (few or small windows) and building a sparse table of
  the map once (many windows).

With a gradient needed the argmax of every output is kept and the backward
scatters by it (:class:`_PyramidMaxKernel`); without, values-only kernels run.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sppnet.ops import _kernels
from sppnet.ops._bins import bin_edges

__all__ = ["pyramid_max_kernel", "use_kernel"]


def use_kernel(features: Tensor, mode: str) -> bool:
    """True where the numba kernels apply (max, CPU, float32 / float64, not tracing)."""
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
    return _kernel_forward(features.detach(), rois.contiguous(), levels, with_arg=False, planes=planes)[0]


def _kernel_forward(
    feats: Tensor, rois: Tensor, levels: tuple[int, ...], with_arg: bool, planes: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Runs the numba kernels: ``(out [K, D], argmax [K, D] or None)``.

    Without ``with_arg`` (no gradient needed) the values-only kernels run; they
    vectorise over channels and read half the memory. ``feats`` may have any
    strides: the window kernels read a channels-last copy, made only when the
    map is not already in that layout (``torch.channels_last``: a feature cache
    that keeps its maps so pays no copy per call). The argmax is the cell
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
        _kernels.plane_pyramid_max(feats.contiguous().numpy(), lv, src, out_off, order, out.numpy(), arg_np, with_arg)
        return out, arg
    direct = [levels[i] for i in range(len(levels)) if src[i] < 0]
    _kernels.set_threads(torch.get_num_threads())
    # Cost model (cells x channels touched): scanning reads every bin row's map
    # rows (~1.5x the window: adaptive bins overlap); the sparse table pays
    # la*lb copies of the map once, then 4 reads a bin. la, lb >= 1, so with
    # la = lb = 1 the table's cost is a lower bound: few small windows scan
    # without the depth being computed.
    hw = (rois[:, 4] - rois[:, 2] + 1) * (rois[:, 3] - rois[:, 1] + 1)
    scan_cost = 1.5 * float(hw.sum()) * len(direct)
    lookups = 4.0 * n_win * sum(n * n for n in direct)
    la = lb = 1
    if scan_cost > 2.0 * n_img * height * width + lookups:
        la, lb = _table_depth(rois, direct)
    table_cost = 2.0 * la * lb * n_img * height * width + lookups
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
        feats = features.detach()
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
    max_h = max(int((hi - lo).max()) for lo, hi in (bin_edges(y1, y2 - y1 + 1, n) for n in direct_levels))
    max_w = max(int((hi - lo).max()) for lo, hi in (bin_edges(x1, x2 - x1 + 1, n) for n in direct_levels))
    return max_h.bit_length(), max_w.bit_length()
