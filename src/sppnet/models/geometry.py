"""Geometry of a conv backbone, read off its modules: stride, offset, map size, minimum input.

SPP-net maps image windows onto conv5 cells (Appendix) with two numbers per
backbone, the total ``stride`` and the ``offset`` (the receptive-field centre of
cell 0, in pixels; ``ops/mapping.py`` derives the formula). They, the conv5 map
size for an input size and the smallest input that still gives a 1x1 map are
computed here from the modules themselves, never typed in:

* ``Conv2d``, ``MaxPool2d``, ``AvgPool2d``: one window ``(kernel, stride,
  padding, dilation, ceil_mode)`` per layer; a dilated kernel spans
  ``dilation * (kernel - 1) + 1`` pixels.
* ``Sequential`` (and any container without a skip path): its children in order.
* A residual block (a module with a ``downsample`` attribute: torchvision's
  ``BasicBlock`` / ``Bottleneck``): the main path, i.e. every child but
  ``downsample``, in order. The shortcut must have the same stride, offset and
  output size (checked), so the sum is aligned cell for cell.
* Element-wise layers (ReLU, batch norm, LRN, dropout, identity) change nothing.

Anything else (adaptive pooling, a layer we do not know) is refused with a
``ValueError``: a guessed geometry would silently misplace every window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from sppnet.ops import backbone_geometry

__all__ = ["FeatureGeometry", "Window", "feature_geometry", "merge_cell_boxes"]

# Layers that keep every cell where it is.
_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
_MAX_INPUT = 1 << 14  # min_input_size search limit (a 16k-pixel side)


@dataclass(frozen=True)
class Window:
    """A sliding window along one axis: PyTorch's conv / pool output-size rule."""

    kernel: int
    stride: int
    padding: int
    dilation: int = 1
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        """Pixels (input cells) one output cell sees: ``dilation * (kernel - 1) + 1``."""
        return self.dilation * (self.kernel - 1) + 1

    def output_size(self, a: int) -> int:
        """Output length for an input of ``a`` cells (0 where the layer would fail).

        PyTorch's rule (``pooling_output_shape``): ``floor((a + 2p - span [+ s - 1 in
        ceil mode]) / s) + 1``; in ceil mode the last window must start inside the
        input or the left padding, and may hang over the end (a 3-wide pool on 2 cells
        gives 1).
        """
        room = a + 2 * self.padding - self.span + (self.stride - 1 if self.ceil_mode else 0)
        out = room // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= a + self.padding:
            out -= 1
        return max(out, 0)


@dataclass(frozen=True)
class FeatureGeometry:
    """The windows of a backbone, input first, with what follows from them.

    Attributes:
        windows: one :class:`Window` per conv / pool layer (the same along H and W).
        stride: total stride ``S`` in pixels.
        offset: centre of cell 0 in pixels; cell ``j`` is centred at ``offset + S * j``.
        min_input_size: the smallest side that gives a feature map of at least 1x1.
    """

    windows: tuple[Window, ...]

    @property
    def stride(self) -> int:
        return backbone_geometry([(w.span, w.stride, w.padding) for w in self.windows])[0]

    @property
    def offset(self) -> float:
        # A dilated kernel is centred like a dense one of its span; ceil mode adds cells
        # at the far end only (ops/mapping.py), so neither changes the formula.
        return backbone_geometry([(w.span, w.stride, w.padding) for w in self.windows])[1]

    def output_length(self, a: int) -> int:
        """Feature-map length along one axis for an input of ``a`` pixels (0 if too small)."""
        a = int(a)
        for w in self.windows:
            a = w.output_size(a)
            if a < 1:
                return 0
        return a

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Feature-map size ``(h, w)`` for an input of ``height x width`` pixels (``(0, 0)`` if too small)."""
        h, w = self.output_length(height), self.output_length(width)
        return (h, w) if h and w else (0, 0)

    def input_span(self, first: int, last: int) -> tuple[int, int]:
        """The input pixels ``(lo, hi)`` (inclusive) that output cells ``first..last`` see.

        Their joint receptive field, followed back layer by layer (``lo * stride -
        padding`` to ``hi * stride - padding + span - 1``); it reaches past the
        input's edges where the layers pad there. Computing the cells from a crop
        of the input that holds this span gives the same values as computing them
        from the whole input, when the crop starts at a multiple of :attr:`stride`
        (so that every layer's grid lines up) or at the input's edge (see
        ``SPPDetector.feature_maps``).
        """
        lo, hi = int(first), int(last)
        for w in reversed(self.windows):
            lo = lo * w.stride - w.padding
            hi = hi * w.stride - w.padding + w.span - 1
        return lo, hi

    @property
    def min_input_size(self) -> int:
        a = 1
        while self.output_length(a) < 1:
            a += 1
            if a > _MAX_INPUT:
                raise ValueError(f"no input up to {_MAX_INPUT} pixels gives a feature map: {self.windows}")
        return a


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _layer_windows(m: nn.Module) -> list[Window]:
    """The window of one conv / pool layer (ValueError if it differs between H and W)."""
    if isinstance(m, nn.Conv2d) and isinstance(m.padding, str):
        raise ValueError(f"padding={m.padding!r} is not supported for geometry; use integers: {m}")
    dilation = (1, 1) if isinstance(m, nn.AvgPool2d) else _pair(m.dilation)
    ceil = bool(getattr(m, "ceil_mode", False))
    k, s, p = _pair(m.kernel_size), _pair(m.stride if m.stride is not None else m.kernel_size), _pair(m.padding)
    per_axis = [Window(k[i], s[i], p[i], dilation[i], ceil) for i in (0, 1)]
    if per_axis[0] != per_axis[1]:
        raise ValueError(f"layers must have the same geometry along H and W, got {m}")
    return [per_axis[0]]


def _windows(m: nn.Module) -> list[Window]:
    if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        return _layer_windows(m)
    if isinstance(m, _ELEMENTWISE):
        return []
    if hasattr(m, "downsample"):  # a residual block: main path, then check the shortcut
        main = [w for name, child in m.named_children() if name != "downsample" for w in _windows(child)]
        if m.downsample is not None:
            _check_shortcut(m, FeatureGeometry(tuple(main)), FeatureGeometry(tuple(_windows(m.downsample))))
        return main
    children = list(m.children())
    if not children:
        raise ValueError(f"cannot derive the geometry of a {type(m).__name__} layer: {m}")
    return [w for child in children for w in _windows(child)]


def _check_shortcut(block: nn.Module, main: FeatureGeometry, short: FeatureGeometry) -> None:
    sizes = range(1, 4 * max(main.stride, 1) + 8)
    if (main.stride, main.offset) != (short.stride, short.offset) or any(
        main.output_length(a) != short.output_length(a) for a in sizes
    ):
        raise ValueError(
            f"the shortcut of {type(block).__name__} is not aligned with its main path "
            f"(stride/offset {main.stride}/{main.offset} vs {short.stride}/{short.offset})"
        )


def feature_geometry(module: nn.Module) -> FeatureGeometry:
    """Walks a backbone's modules (see the module docstring) and returns its :class:`FeatureGeometry`.

    Args:
        module: the conv part of a network, ``Tensor[N, 3, H, W] -> Tensor[N, C, h, w]``,
            e.g. ``SPPNet.features``.

    Raises:
        ValueError: for a layer whose geometry is unknown, differs between H and W,
            or a residual shortcut that is not aligned with its main path.
    """
    return FeatureGeometry(tuple(_windows(module)))


def merge_cell_boxes(boxes: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Groups inclusive cell boxes into disjoint rectangles, each covering whole boxes.

    Recursive XY cuts of the covered cells: the map is cut along every row or
    column that no box covers, each part trimmed to the cells it covers, until no
    part has such a line. The parts are disjoint, no box crosses a cut, and
    groups of boxes with empty space between them end up in separate parts. A
    detector convolves one image region per part instead of the whole image
    (``SPPDetector.feature_maps``).

    Args:
        boxes (LongTensor[K, 4]): ``(x1, y1, x2, y2)`` inclusive cells inside a
            ``height x width`` map, ``K >= 1``.

    Returns:
        ``(rects LongTensor[R, 4], member LongTensor[K])``: pairwise disjoint
        inclusive rectangles, and the one that holds each box.
    """
    b = boxes.detach().to("cpu", torch.long)
    if b.dim() != 2 or b.shape[1] != 4 or len(b) == 0:
        raise ValueError(f"boxes must be a non-empty LongTensor[K, 4], got shape {tuple(b.shape)}")
    if (b[:, 0] < 0).any() or (b[:, 1] < 0).any() or (b[:, 2] >= width).any() or (b[:, 3] >= height).any():
        raise ValueError(f"cell boxes must lie inside the {height}x{width} map")
    if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
        raise ValueError("cell boxes must have x2 >= x1 and y2 >= y1")
    # The covered cells: a 2-D difference array, summed up.
    x1, y1, x2, y2 = (b[:, k].numpy() for k in range(4))
    diff = np.zeros((height + 1, width + 1), dtype=np.int64)
    np.add.at(diff, (y1, x1), 1)
    np.add.at(diff, (y1, x2 + 1), -1)
    np.add.at(diff, (y2 + 1, x1), -1)
    np.add.at(diff, (y2 + 1, x2 + 1), 1)
    covered = diff.cumsum(0).cumsum(1)[:height, :width] > 0
    rects, todo = [], [(0, 0, width - 1, height - 1)]
    while todo:
        left, top, right, bottom = todo.pop()
        part = covered[top : bottom + 1, left : right + 1]
        cols, rows = np.flatnonzero(part.any(0)), np.flatnonzero(part.any(1))
        if len(cols) == 0:
            continue
        cut = False
        for axis, used in ((0, cols), (1, rows)):
            breaks = np.flatnonzero(np.diff(used) > 1)  # an empty line after used[i] for i in breaks
            if len(breaks) == 0:
                continue
            starts = np.concatenate([used[:1], used[breaks + 1]])
            ends = np.concatenate([used[breaks], used[-1:]])
            for a, z in zip(starts.tolist(), ends.tolist()):
                if axis == 0:
                    todo.append((left + a, top, left + z, bottom))
                else:
                    todo.append((left, top + a, right, top + z))
            cut = True
            break
        if not cut:
            rects.append((left + int(cols[0]), top + int(rows[0]), left + int(cols[-1]), top + int(rows[-1])))
    out = torch.tensor(rects, dtype=torch.long)
    inside = (
        (b[:, None, 0] >= out[None, :, 0])
        & (b[:, None, 1] >= out[None, :, 1])
        & (b[:, None, 0] <= out[None, :, 2])
        & (b[:, None, 1] <= out[None, :, 3])
    )
    return out, inside.to(torch.uint8).argmax(dim=1)
