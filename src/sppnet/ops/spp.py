"""The spatial pyramid pooling layer (SPP-net Sec. 2.2, 2.3 and Appendix).

``spatial_pyramid_pool`` turns conv feature maps of ANY size ``H x W`` into a
fixed-length vector: for each pyramid level ``n`` every channel is pooled over an
``n x n`` grid of bins, and the levels are concatenated. With the paper's levels
``(6, 3, 2, 1)`` (50 bins) a 256-channel conv5 gives 12,800 numbers whatever
the input size: that is what lets one network take images of any size.

Output layout (released code): for each level in the order given, the flatten of
``(C, n, n)``, i.e. index ``c*n*n + y*n + x``; levels concatenated.

How it is fast (max mode, adaptive bins): only the finest level reads the map;
a coarser level that divides a finer one is made from the finer bins
(``level_sources`` in ``ops/_bins.py``). On CPU the numba kernels do this in one
pass (``ops/_dispatch.py``); traced or exported, a mask form keeps ``H, W``
symbolic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sppnet.ops._bins import (
    adaptive_masks,
    check_bins,
    check_levels,
    check_mode,
    level_sources,
    regular_adaptive,
    sliding_window,
)
from sppnet.ops._dispatch import pyramid_max_kernel, use_kernel

__all__ = ["spatial_pyramid_pool", "SpatialPyramidPool", "pyramid_output_dim"]

_SCAN_MAX_CELLS = 32 * 32  # larger image-level maps use the per-plane kernel


def pyramid_output_dim(channels: int, levels: Sequence[int] = (6, 3, 2, 1)) -> int:
    """Length of the pyramid vector: ``channels * sum(n * n)``."""
    return channels * sum(n * n for n in check_levels(levels))


def spatial_pyramid_pool(
    x: Tensor,
    levels: int | Sequence[int] = (6, 3, 2, 1),
    mode: str = "max",
    bins: str = "adaptive",
) -> Tensor:
    """Spatial pyramid pooling of feature maps of any size.

    Args:
        x (Tensor[N, C, H, W]): feature maps, any ``H, W >= 1``; float dtype.
        levels: bins per side of each pyramid level, in output order. The paper
            uses ``(6, 3, 2, 1)``; the released detection code ``(1, 2, 3, 6)``.
        mode: ``"max"`` (the paper throughout) or ``"avg"``.
        bins: ``"adaptive"`` -- Appendix bins ``[floor(i*a/n), ceil((i+1)*a/n))``,
            valid for every size (cells repeat when ``a < n``); or ``"sliding"``
            -- Sec. 2.3's window ``ceil(a/n)`` and stride ``floor(a/n)``, which
            raises ``ValueError`` where it does not give exactly ``n`` bins
            (e.g. ``a=10, n=6`` gives 9).

    Returns:
        Tensor[N, C * sum(n*n)]: per level the flatten of ``(C, n, n)``
        (index ``c*n*n + y*n + x``), levels concatenated in the order given.

    Non-finite inputs propagate as in torch's own pooling (a NaN in a bin makes
    that bin NaN in max mode).
    """
    _check_input(x)
    levels = check_levels(levels)
    check_mode(mode)
    check_bins(bins)
    if x.shape[-2] < 1 or x.shape[-1] < 1 or x.shape[1] < 1:
        raise ValueError(f"x must have C, H, W >= 1, got shape {tuple(x.shape)}")
    n_img = x.shape[0]
    # The numba kernels read each map once and keep argmax for a cheap backward.
    # Many small maps (conv5 of a batch of crops, e.g. 64 x 13x13): one window
    # per image, channels last, parallel over images. Otherwise (one big image,
    # or fewer images than threads): parallel over (image, channel) planes.
    if bins == "adaptive" and not _is_exporting() and use_kernel(x, mode):
        h, w = x.shape[-2:]
        whole = torch.tensor([[0, 0, 0, w - 1, h - 1]], dtype=torch.long).repeat(n_img, 1)
        whole[:, 0] = torch.arange(n_img)
        return pyramid_max_kernel(x, whole, levels, planes=_use_planes(n_img, h, w))
    if _is_exporting() and bins == "adaptive":
        outs = [_pyramid_level_export(x, n, mode).reshape(n_img, -1) for n in levels]
    else:
        pooled = _pyramid_levels_eager(x, levels, mode, bins)
        outs = [pooled[n].reshape(n_img, -1) for n in levels]
    return torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]


class SpatialPyramidPool(nn.Module):
    """Module form of :func:`spatial_pyramid_pool` (replaces pool5 in SPP-net).

    Args:
        levels: bins per side of each level, in output order (default: the
            paper's ``(6, 3, 2, 1)``).
        mode: ``"max"`` or ``"avg"``.
        bins: ``"adaptive"`` (Appendix) or ``"sliding"`` (Sec. 2.3).

    Example:
        >>> spp = SpatialPyramidPool((6, 3, 2, 1))
        >>> spp(torch.randn(2, 256, 13, 13)).shape  # any H, W gives the same width
        torch.Size([2, 12800])
        >>> spp.output_dim(256)
        12800
    """

    def __init__(
        self,
        levels: int | Sequence[int] = (6, 3, 2, 1),
        mode: str = "max",
        bins: str = "adaptive",
    ) -> None:
        super().__init__()
        self.levels = check_levels(levels)
        self.mode = check_mode(mode)
        self.bins = check_bins(bins)

    @property
    def num_bins(self) -> int:
        """``sum(n * n)`` over the levels (50 for the paper's pyramid)."""
        return sum(n * n for n in self.levels)

    def output_dim(self, channels: int) -> int:
        """Width of the output for ``channels`` input channels: ``channels * num_bins``."""
        return channels * self.num_bins

    def forward(self, x: Tensor) -> Tensor:
        return spatial_pyramid_pool(x, self.levels, self.mode, self.bins)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}, bins={self.bins!r}, num_bins={self.num_bins}"


def _is_exporting() -> bool:
    """True while tracing / exporting, where shapes must stay symbolic."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting is not None and is_exporting())


def _check_input(x: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a Tensor[N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a Tensor[N, C, H, W] (4 dims), got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")


def _pool_adaptive(x: Tensor, n: int, mode: str) -> Tensor:
    """One level with the Appendix bins: ``Tensor[N, C, n, n]``."""
    h, w = x.shape[-2:]
    rh, rw = regular_adaptive(h, n), regular_adaptive(w, n)
    if rh is not None and rw is not None:
        # The bins form a regular grid (e.g. 13 cells, n=6: kernel 3, stride 2).
        kernel, stride = (rh[0], rw[0]), (rh[1], rw[1])
        if mode == "max":
            return F.max_pool2d(x, kernel, stride)
        return F.avg_pool2d(x, kernel, stride)
    if mode == "max":
        return F.adaptive_max_pool2d(x, n)
    return F.adaptive_avg_pool2d(x, n)


def _pool_sliding(x: Tensor, n: int, mode: str) -> Tensor:
    """One level with the Sec. 2.3 rule: window ceil(a/n), stride floor(a/n)."""
    h, w = x.shape[-2:]
    win_h, stride_h = sliding_window(h, n)
    win_w, stride_w = sliding_window(w, n)
    if mode == "max":
        return F.max_pool2d(x, (win_h, win_w), (stride_h, stride_w))
    return F.avg_pool2d(x, (win_h, win_w), (stride_h, stride_w))


def _coarsen_max(fine: Tensor, m: int) -> Tensor:
    """Level ``m`` from a finer level ``n`` (``n % m == 0``) of adaptive max bins."""
    n = fine.shape[-1]
    k = n // m
    return fine.unflatten(-1, (m, k)).unflatten(-3, (m, k)).amax(dim=(-3, -1))  # [N, C, m, m]


def _pyramid_levels_eager(x: Tensor, levels: tuple[int, ...], mode: str, bins: str) -> dict[int, Tensor]:
    if mode == "max" and bins == "adaptive":
        sources = level_sources(levels)
    else:
        sources = dict.fromkeys(sorted(set(levels), reverse=True))  # every level reads the map
    pooled: dict[int, Tensor] = {}
    for n, src in sources.items():
        if src is not None:
            pooled[n] = _coarsen_max(pooled[src], n)
        elif bins == "adaptive":
            pooled[n] = _pool_adaptive(x, n, mode)
        else:
            pooled[n] = _pool_sliding(x, n, mode)
    return pooled


def _pyramid_level_export(x: Tensor, n: int, mode: str) -> Tensor:
    """One adaptive level from bin masks: traceable with symbolic ``H, W``.

    PyTorch's ONNX export of adaptive pooling only handles output sizes that
    divide the input; this form exports for any size. Both modes are separable:
    reduce over the columns of each bin, then over its rows. Cells outside a bin
    are masked with ``torch.where`` (not multiplied by 0), so a NaN or inf
    reaches only the bins that hold it, as in torch's own pooling.
    """
    h, w = x.shape[-2], x.shape[-1]
    mh = adaptive_masks(h, n, x.device)  # [n, H]
    mw = adaptive_masks(w, n, x.device)  # [n, W]
    if mode == "max":
        low = float("-inf")
        cols = torch.where(mw[None, None, None], x[:, :, :, None, :], low).amax(-1)  # [N, C, H, n]
        return torch.where(mh[None, None, :, :, None], cols[:, :, None], low).amax(3)  # [N, C, n, n]
    cols = torch.where(mw[None, None, None], x[:, :, :, None, :], 0.0).sum(-1)  # [N, C, H, n]
    sums = torch.where(mh[None, None, :, :, None], cols[:, :, None], 0.0).sum(3)  # [N, C, n, n]
    area = mh.sum(1)[:, None] * mw.sum(1)[None, :]  # [n, n] cells per bin
    return sums / area.to(x.dtype)


def _use_planes(n_img: int, height: int, width: int) -> bool:
    """True: the per-plane kernel (parallel over channels); False: the channels-last scan.

    The scan is parallel over images, so it needs a batch of at least two images
    per thread, and small maps (at most ``_SCAN_MAX_CELLS``). The threshold comes
    from ``benchmarks/bench_ops.py``; re-check it there when a kernel changes.
    """
    return height * width > _SCAN_MAX_CELLS or n_img < 2 * torch.get_num_threads()
