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

from torch import nn

from sppnet.ops import backbone_geometry

__all__ = ["FeatureGeometry", "Window", "feature_geometry"]

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
