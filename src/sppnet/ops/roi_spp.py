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
  model picks scanning or a sparse table; argmax kept for backward
  (``ops/_dispatch.py``).
* otherwise (CUDA, bfloat16/float16, or numba missing), max: a 2-D sparse table
  (range-max over power-of-two blocks) and four look-ups per bin, pure PyTorch
  (``ops/_roi_torch.py``).
* avg, everywhere: a summed-area table and four look-ups per bin (same file).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from sppnet.ops._bins import check_levels, check_mode
from sppnet.ops._dispatch import pyramid_max_kernel, use_kernel
from sppnet.ops._roi_checks import check_rois
from sppnet.ops._roi_torch import roi_avg_torch, roi_max_torch

__all__ = ["roi_spatial_pyramid_pool", "RoISpatialPyramidPool", "check_rois"]


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
    if use_kernel(features, mode):
        return pyramid_max_kernel(features, r, levels)
    if mode == "max":
        return roi_max_torch(features, r, levels)
    return roi_avg_torch(features, r, levels)


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
