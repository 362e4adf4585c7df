"""The paper's explanatory figures, drawn from a real model and image.

* :func:`plot_feature_maps` -- Fig. 2: the conv5 filters that respond most
  strongly to an image, their maps overlaid on the image.
* :func:`plot_pyramid_bins` -- Fig. 3: the pyramid's bins over a whole image
  and over one window's cells on the feature map, with the pooled values, and
  the output length for inputs of different sizes.
* :func:`plot_time_bars` -- seconds per image, SPP-net vs R-CNN.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torch import Tensor  # noqa: E402

from sppnet.ops import map_boxes_to_features, roi_spatial_pyramid_pool  # noqa: E402
from sppnet.ops._bins import adaptive_bins  # noqa: E402
from sppnet.viz.plots import save_figure  # noqa: E402


def _save(fig, png: str | os.PathLike) -> Path:
    return save_figure(fig, png, dpi=100, bbox_inches="tight")


def _as_hwc(image: Tensor) -> np.ndarray:
    """Tensor[3, H, W] in [0, 1] -> uint8-like float array [H, W, 3] for imshow."""
    return image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def top_filters(maps: Tensor, k: int = 4) -> list[int]:
    """Indices of the ``k`` channels of ``maps`` (Tensor[C, h, w]) with the largest peak."""
    peaks = maps.detach().flatten(1).amax(1)  # [C]
    return peaks.topk(min(k, maps.shape[0])).indices.tolist()


def plot_feature_maps(image: Tensor, maps: Tensor, png: str | os.PathLike, k: int = 4, title: str = "") -> Path:
    """Fig. 2: the ``k`` most strongly activated conv5 filters overlaid on the image.

    Args:
        image (Tensor[3, H, W]): the input in [0, 1].
        maps (Tensor[C, h, w]): its conv5 feature maps.
    """
    chans = top_filters(maps, k)
    h, w = image.shape[-2:]
    fig, axes = plt.subplots(1, len(chans) + 1, figsize=(3.2 * (len(chans) + 1), 3.4))
    axes[0].imshow(_as_hwc(image))
    axes[0].set_title("input")
    for ax, c in zip(axes[1:], chans):
        m = maps[c].detach().float()[None, None]
        up = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)[0, 0].cpu().numpy()
        ax.imshow(_as_hwc(image))
        ax.imshow(up, cmap="jet", alpha=0.5)
        ax.set_title(f"filter #{c} (peak {float(m.max()):.2f})")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, png)


def plot_pyramid_bins(
    image: Tensor,
    maps: Tensor,
    stride: int,
    offset: float,
    window: Sequence[float],
    png: str | os.PathLike,
    levels: Sequence[int] = (1, 2, 3, 6),
    other_sizes: Mapping[str, int] | None = None,
    channel: int | None = None,
) -> Path:
    """Fig. 3: bins over the whole image and over one window on the feature map.

    Args:
        image (Tensor[3, H, W]): the input in [0, 1].
        maps (Tensor[C, h, w]): its conv5 maps.
        stride, offset: the backbone geometry (cell j centred at offset + stride*j).
        window: ``(x1, y1, x2, y2)`` continuous pixel box of the window to show.
        levels: the pyramid.
        other_sizes: ``{"label": vector length}`` for inputs of other sizes, to show
            that the length does not depend on the input size.
        channel: the channel whose pooled values are printed (default: strongest).
    """
    chans, fh, fw = maps.shape
    c = top_filters(maps, 1)[0] if channel is None else channel
    cells = map_boxes_to_features(torch.tensor([list(window)]), stride, offset, (fh, fw))[0].tolist()
    x1, y1, x2, y2 = cells
    pooled = roi_spatial_pyramid_pool(maps[None].float(), torch.tensor([[0, x1, y1, x2, y2]]), levels)[0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    # (a) the bins of each level drawn over the whole image
    img = _as_hwc(image)
    ih, iw = img.shape[:2]
    axes[0].imshow(img)
    colours = plt.cm.viridis(np.linspace(0.1, 0.9, len(levels)))
    for n, col in zip(levels, colours):
        for lo, hi in adaptive_bins(fh, n):
            for clo, chi in adaptive_bins(fw, n):
                # the cells of the bin, as pixels: centres offset + stride*cell, +-stride/2
                px0, px1 = offset + stride * (clo - 0.5), offset + stride * (chi - 0.5)
                py0, py1 = offset + stride * (lo - 0.5), offset + stride * (hi - 0.5)
                px0, py0 = max(px0, 0), max(py0, 0)
                px1, py1 = min(px1, iw), min(py1, ih)
                axes[0].add_patch(Rectangle((px0, py0), px1 - px0, py1 - py0, fill=False, ec=col, lw=1.0))
    wx1, wy1, wx2, wy2 = (float(v) for v in window)
    axes[0].add_patch(Rectangle((wx1, wy1), wx2 - wx1, wy2 - wy1, fill=False, ec="cyan", lw=2))
    axes[0].set_title(
        f"whole image {iw}x{ih} -> conv5 {fh}x{fw}\nbins of levels {list(levels)}; window in cyan", fontsize=9
    )
    axes[0].axis("off")
    # (b) the window on the feature map (one channel) with the finest level's bins
    fm = maps[c].detach().float().cpu().numpy()
    axes[1].imshow(fm, cmap="magma")
    axes[1].add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1 + 1, y2 - y1 + 1, fill=False, ec="cyan", lw=2))
    n = max(levels)
    for lo, hi in adaptive_bins(y2 - y1 + 1, n):
        for clo, chi in adaptive_bins(x2 - x1 + 1, n):
            axes[1].add_patch(
                Rectangle((x1 + clo - 0.5, y1 + lo - 0.5), chi - clo, hi - lo, fill=False, ec="white", lw=0.6)
            )
    axes[1].set_title(
        f"window {[round(v) for v in window]} -> cells {cells}\n{n}x{n} bins on conv5 filter #{c}", fontsize=9
    )
    # (c) pooled values of that channel, level by level, and the output length
    start, text = 0, []
    for lv in levels:
        block = pooled[start : start + chans * lv * lv].view(chans, lv, lv)[c]
        start += chans * lv * lv
        rows = ["  " + " ".join(f"{v:5.2f}" for v in r.tolist()) for r in block]
        text.append(f"level {lv}x{lv} (filter #{c}):\n" + "\n".join(rows))
    length = [f"output length: {pooled.numel()} = {chans} x {sum(v * v for v in levels)} bins"]
    for label, dim in (other_sizes or {}).items():
        length.append(f"  {label}: {dim}")
    axes[2].text(0.0, 1.0, "\n\n".join(text + ["\n".join(length)]), va="top", family="monospace", fontsize=8)
    axes[2].axis("off")
    return _save(fig, png)


def plot_time_bars(seconds: Mapping[str, float], png: str | os.PathLike, title: str = "seconds per image") -> Path:
    """Horizontal bars of seconds per image, with the speed-up over the slowest."""
    names = list(seconds)
    vals = [float(seconds[n]) for n in names]
    slowest = max(vals) if vals else 1.0
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(names) + 1.2))
    bars = ax.barh(names, vals, color=["tab:blue" if "rcnn" not in n.lower() else "tab:red" for n in names])
    for b, v in zip(bars, vals):
        ax.text(
            b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.3f}s ({slowest / max(v, 1e-12):.0f}x)", va="center"
        )
    ax.set_xlabel("seconds per image")
    ax.set_title(title)
    ax.set_xlim(0, slowest * 1.35)
    ax.invert_yaxis()
    return _save(fig, png)
