"""Validation of the windows given to :func:`roi_spatial_pyramid_pool`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["check_rois"]


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

    def first_bad(mask: Tensor) -> int:
        return int(mask.nonzero()[0, 0])

    if r.is_floating_point() or r.is_complex():  # integer dtypes hold whole, finite numbers already
        rf = r.to(torch.float64).cpu()
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
    else:
        rl = r.to("cpu", torch.long)
    b, x1, y1, x2, y2 = rl.unbind(1)
    checks = [
        ((b < 0) | (b >= n_img), f"batch index must be in [0, {n_img})"),
        ((x2 < x1) | (y2 < y1), "windows must satisfy x1 <= x2 and y1 <= y2"),
        ((x1 < 0) | (y1 < 0) | (x2 >= width) | (y2 >= height), f"windows must lie in the {height}x{width} map"),
    ]
    if not (checks[0][0] | checks[1][0] | checks[2][0]).any():  # one test in the usual case
        return rl
    for mask, what in checks:
        if mask.any():
            i = first_bad(mask)
            raise ValueError(f"{what}, got row {i} = {rl[i].tolist()} (batch_index, x1, y1, x2, y2)")
    return rl


def _rois_from_list(rois: list[Tensor] | tuple[Tensor, ...], n_img: int, device: torch.device) -> Tensor:
    if len(rois) != n_img:
        raise ValueError(f"rois as a list needs one Tensor[L_i, 4] per image: got {len(rois)} for {n_img} images")
    parts = []
    for i, r in enumerate(rois):
        r = torch.as_tensor(r)
        if r.dim() != 2 or r.shape[1] != 4:
            raise ValueError(f"rois[{i}] must be Tensor[L, 4] (x1, y1, x2, y2), got shape {tuple(r.shape)}")
        exact = not (r.is_floating_point() or r.is_complex())  # integers stay integers: no float64 round trip
        kind = torch.long if exact else torch.float64
        idx = torch.full((r.shape[0], 1), i, dtype=kind, device=r.device)
        parts.append(torch.cat([idx, r.to(kind)], dim=1))
    if not parts:
        return torch.zeros((0, 5), dtype=torch.float64, device=device)
    if len({p.dtype for p in parts}) > 1:  # integer and float images mixed: check them all as floats
        parts = [p.to(torch.float64) for p in parts]
    return torch.cat(parts, dim=0).to(device)
