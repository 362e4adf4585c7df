"""Bin arithmetic shared by the pyramid operators.

Two rules for cutting an axis of length ``a`` into ``n`` bins (SPP-net Sec. 2.3
and Appendix):

* adaptive (paper Appendix, released code): bin ``i`` covers
  ``[floor(i*a/n), ceil((i+1)*a/n))``. Always ``n`` non-empty bins, also when
  ``a < n`` (cells repeat). Identical to PyTorch's adaptive pooling.
* sliding (paper Sec. 2.3): a pooling window ``win = ceil(a/n)`` moved with
  ``stride = floor(a/n)``. Gives exactly ``n`` bins only for some ``a``.

Adaptive bins nest, which every max-pooling path uses (:func:`level_sources`):
a coarser level ``m`` that divides a finer level ``n`` is the max over
``n/m x n/m`` blocks of the finer bins. Bin ``i`` of ``m`` is the union of bins
``k*i .. k*i+k-1`` of ``n`` (``k = n/m``): ``floor(k*i*a/n) = floor(i*a/m)``, and
consecutive adaptive bins touch or overlap. For the paper's levels
``(6, 3, 2, 1)`` the map is read once instead of four times.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MODES = ("max", "avg")
_BINS = ("adaptive", "sliding")


def check_levels(levels: int | Sequence[int]) -> tuple[int, ...]:
    """Validates pyramid levels and returns them as a tuple of ints.

    Args:
        levels: one positive int or a non-empty sequence of positive ints, each
            the number of bins per side of one pyramid level, e.g. ``(6, 3, 2, 1)``.

    Raises:
        ValueError: if ``levels`` is empty or holds a non-positive or non-int value.
    """
    if isinstance(levels, bool):
        raise ValueError(f"levels must be positive ints, got {levels!r}")
    if isinstance(levels, int):
        levels = (levels,)
    try:
        levels = tuple(levels)
    except TypeError:
        raise ValueError(f"levels must be an int or a sequence of ints, got {levels!r}") from None
    if len(levels) == 0:
        raise ValueError("levels must not be empty, got ()")
    for n in levels:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"levels must be positive ints, got {levels!r}")
    return levels


def check_mode(mode: str) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return mode


def check_bins(bins: str) -> str:
    if bins not in _BINS:
        raise ValueError(f"bins must be one of {_BINS}, got {bins!r}")
    return bins


def level_sources(levels: Sequence[int]) -> dict[int, int | None]:
    """The coarse-from-fine plan of a max pyramid with adaptive bins.

    Args:
        levels: bins per side of each level (any order, repeats allowed).

    Returns:
        ``{n: source}`` for each distinct level, finest first (an order in which
        every source comes before the levels made from it). ``source`` is the
        smallest finer level of the pyramid that ``n`` divides -- level ``n`` is
        then the max over ``source/n x source/n`` blocks of its bins -- or None
        where ``n`` must read the map. ``(6, 3, 2, 1)`` gives
        ``{6: None, 3: 6, 2: 6, 1: 2}``.
    """
    sources: dict[int, int | None] = {}
    for n in sorted(set(levels), reverse=True):
        finer = [m for m in sources if m % n == 0]
        sources[n] = min(finer) if finer else None
    return sources


def adaptive_bins(a: int, n: int) -> list[tuple[int, int]]:
    """The Appendix bins of an axis: ``[(start, end), ...]``, end exclusive."""
    return [((i * a) // n, -((-(i + 1) * a) // n)) for i in range(n)]


def sliding_window(a: int, n: int) -> tuple[int, int]:
    """The Sec. 2.3 window and stride for ``n`` bins on an axis of length ``a``.

    Raises:
        ValueError: where the rule does not give exactly ``n`` bins (it gives
            ``floor((a - win) / stride) + 1``, or is undefined when ``a < n``).
    """
    win = -(-a // n)  # ceil(a / n)
    stride = a // n  # floor(a / n)
    if stride == 0:
        raise ValueError(
            f"bins='sliding' needs an axis at least as long as the level: a={a} < n={n} "
            f"gives stride floor(a/n)=0 (use bins='adaptive')"
        )
    count = (a - win) // stride + 1
    if count != n:
        raise ValueError(
            f"bins='sliding' (win=ceil(a/n)={win}, stride=floor(a/n)={stride}) gives "
            f"{count} bins, not n={n}, on an axis of length a={a} (use bins='adaptive')"
        )
    return win, stride


def regular_adaptive(a: int, n: int) -> tuple[int, int] | None:
    """``(kernel, stride)`` when the adaptive bins of ``(a, n)`` are a regular grid.

    Returns None otherwise. For example ``a=13, n=6`` gives ``(3, 2)``: the adaptive
    bins are then exactly a ``max_pool2d`` with that kernel and stride, which is
    faster than adaptive pooling on CPU.
    """
    edges = adaptive_bins(a, n)
    k = edges[0][1] - edges[0][0]
    s = edges[1][0] - edges[0][0] if n > 1 else k
    if s <= 0:
        return None
    for i, (lo, hi) in enumerate(edges):
        if lo != i * s or hi - lo != k:
            return None
    return k, s


def bin_edges(start: torch.Tensor, length: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive bins of many windows: ``(lo, hi)``, each ``LongTensor[K, n]``, hi exclusive.

    Args:
        start (LongTensor[K]): first cell of each window along the axis.
        length (LongTensor[K]): cells of each window along the axis.
        n: bins per side.
    """
    i = torch.arange(n, device=start.device)
    lo = start[:, None] + torch.div(i[None] * length[:, None], n, rounding_mode="floor")
    hi = start[:, None] + torch.div((i[None] + 1) * length[:, None] + n - 1, n, rounding_mode="floor")
    return lo, hi


def adaptive_masks(a: torch.Tensor | int, n: int, device: torch.device) -> torch.Tensor:
    """Bool ``Tensor[n, a]``: ``mask[i, p]`` is True when cell ``p`` lies in bin ``i``.

    Written with tensor arithmetic only, so that it traces and exports with a
    symbolic axis length ``a`` (ONNX / ``torch.export`` with dynamic shapes).
    """
    pos = torch.arange(a, device=device)  # [a]
    i = torch.arange(n, device=device)  # [n]
    start = torch.div(i * a, n, rounding_mode="floor")  # [n]
    end = torch.div((i + 1) * a + (n - 1), n, rounding_mode="floor")  # ceil((i+1)a/n)
    return (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
