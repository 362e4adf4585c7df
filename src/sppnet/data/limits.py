"""The size limits every image path shares (classify, detect, proposals), and their CLI flags.

One small file can describe a gigantic or absurdly shaped picture, and each
stage has its own way to run out of time or memory on it: decoding a
decompression bomb, resizing the short side of a 20000 x 10 strip to 256 px
(a 0.5-gigapixel image), or selective search, whose time grows faster than the
pixel count and worse still on thin strips. These limits refuse such a file
*before* any of that starts, with a message that names the file and the flag
that raises the limit:

================== ====================== =============================================
field              flag                   default
================== ====================== =============================================
max_pixels         ``--max-image-pixels``  89,478,485 (Pillow's decompression-bomb limit)
max_aspect_ratio   ``--max-aspect-ratio``  20 (long side / short side)
min_side           ``--min-image-side``    1 pixel
max_search_pixels  ``--max-search-pixels`` 2,000,000 pixels searched by selective search
================== ====================== =============================================

``max_search_pixels`` counts the image selective search actually runs on, i.e.
after the ``resize_to`` downscaling of
:class:`~sppnet.data.proposals.SelectiveSearchParams`. Measured with OpenCV's
"fast" mode on one core of a shared 2-core machine: 4.7 s for a 600 x 400
photograph (VOC images are about 500 x 375), 25 s at 1.0 MP, 232 s at 3.8 MP;
so 2 MP bounds one image at roughly two minutes. Thin strips are worse per
pixel (a 5000 x 10 strip, 50k pixels, took 26 s; a 20000 x 10 one ran for
minutes at 5 GB): the aspect-ratio limit refuses them. It also keeps
R-CNN's default minimum proposal side (20 px per 500 px of the long side,
:mod:`sppnet.data.proposals`) below the short side, which stops holding beyond
an aspect ratio of 25.

The defaults are this file's :class:`ImageLimits` field defaults and nowhere
else. The process-wide setting (:func:`get_image_limits`,
:func:`set_image_limits`) is what :func:`~sppnet.data.images.load_image` uses
when no ``limits`` are passed; worker processes started with ``spawn`` do not
inherit it, so :func:`~sppnet.data.proposals.compute_proposals` sends its
limits to its workers explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = [
    "FLAGS",
    "ImageLimits",
    "get_image_limits",
    "search_size",
    "set_image_limits",
]

#: The CLI flag that sets each field of :class:`ImageLimits` (named in refusals).
FLAGS: dict[str, str] = {
    "max_pixels": "--max-image-pixels",
    "max_aspect_ratio": "--max-aspect-ratio",
    "min_side": "--min-image-side",
    "max_search_pixels": "--max-search-pixels",
}


def _positive_or_none(name: str, value: Any, integer: bool) -> None:
    if value is None:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not (math.isfinite(value) and value > 0):
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} ({FLAGS[name]}) must be {kind} or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    """Which images are accepted (see the module docstring for the measurements behind the defaults).

    Attributes:
        max_pixels: largest ``width * height``; ``None`` disables the check.
        max_aspect_ratio: largest ``max(W, H) / min(W, H)``; ``None`` disables it.
        min_side: smallest accepted ``min(W, H)`` in pixels (>= 1).
        max_search_pixels: largest image selective search runs on (after its
            ``resize_to`` downscaling); ``None`` disables the check.
    """

    max_pixels: int | None = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS
    max_aspect_ratio: float | None = 20.0
    min_side: int = 1
    max_search_pixels: int | None = 2_000_000

    def __post_init__(self) -> None:
        _positive_or_none("max_pixels", self.max_pixels, integer=True)
        _positive_or_none("max_aspect_ratio", self.max_aspect_ratio, integer=False)
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio (--max-aspect-ratio) must be >= 1, got {self.max_aspect_ratio!r}")
        if self.min_side is None:
            raise ValueError("min_side (--min-image-side) must be a positive integer, got None")
        _positive_or_none("min_side", self.min_side, integer=True)
        _positive_or_none("max_search_pixels", self.max_search_pixels, integer=True)

    def problem(self, width: int, height: int) -> tuple[str, str] | None:
        """Why an image of ``width x height`` pixels is refused, or ``None`` if it is accepted.

        Returns:
            ``(reason, detail)``: ``reason`` a short category (``"too large"``,
            ``"too elongated"``, ``"too small"``), ``detail`` a sentence that
            names the flag raising the limit.
        """
        pixels = width * height
        if self.max_pixels is not None and pixels > self.max_pixels:
            return "too large", (
                f"decompression bomb refused: {width}x{height} = {pixels} pixels exceeds the limit of "
                f"{self.max_pixels}; raise it with {FLAGS['max_pixels']} if the file is trusted"
            )
        short, long = min(width, height), max(width, height)
        if short < self.min_side:
            return "too small", (
                f"image is {width}x{height} pixels, its short side is below the minimum of {self.min_side}; "
                f"lower it with {FLAGS['min_side']}"
            )
        if self.max_aspect_ratio is not None and long > self.max_aspect_ratio * short:
            return "too elongated", (
                f"image is {width}x{height} pixels, aspect ratio {long / short:.1f} exceeds the limit of "
                f"{self.max_aspect_ratio:g} (resizing its short side and selective search would take minutes "
                f"and gigabytes); raise it with {FLAGS['max_aspect_ratio']}"
            )
        return None

    def search_problem(self, width: int, height: int, resize_to: int | None) -> tuple[str, str] | None:
        """Why selective search refuses an image of ``width x height``, or ``None``.

        Args:
            width, height: the image's size in pixels.
            resize_to: :attr:`SelectiveSearchParams.resize_to` (short side
                searched; ``None`` searches at full resolution).

        Returns:
            ``(reason, detail)`` as in :meth:`problem` (``"too large to search"``),
            also for a size :meth:`problem` refuses.
        """
        problem = self.problem(width, height)
        if problem is not None or self.max_search_pixels is None:
            return problem
        w, h = search_size(width, height, resize_to)
        if w * h > self.max_search_pixels:
            where = f"{width}x{height} image" if (w, h) == (width, height) else f"{width}x{height} image at {w}x{h}"
            return "too large to search", (
                f"selective search on the {where} = {w * h} pixels exceeds the limit of "
                f"{self.max_search_pixels} (minutes per image); search a downscaled copy with --ss-resize-to "
                f"or raise {FLAGS['max_search_pixels']}"
            )
        return None

    def replace(self, **changes: Any) -> ImageLimits:
        """A copy with some fields changed (validated)."""
        unknown = sorted(set(changes) - set(FLAGS))
        if unknown:
            raise ValueError(f"unknown image limits {unknown}; known: {sorted(FLAGS)}")
        return dataclasses.replace(self, **changes)


def search_size(width: int, height: int, resize_to: int | None) -> tuple[int, int]:
    """``(w, h)`` of the copy selective search runs on: the short side downscaled to ``resize_to``.

    Images whose short side is already ``<= resize_to`` are searched as they are
    (never upscaled); the rounding matches :func:`~sppnet.data.proposals.selective_search`.
    """
    if resize_to is None or min(width, height) <= resize_to:
        return width, height
    scale = resize_to / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


_LIMITS = ImageLimits()


def get_image_limits() -> ImageLimits:
    """The process-wide limits (the defaults unless :func:`set_image_limits` changed them)."""
    return _LIMITS


def set_image_limits(limits: ImageLimits | None = None, **changes: Any) -> ImageLimits:
    """Sets the process-wide limits and returns the previous ones.

    Args:
        limits: the new limits; ``None`` starts from the current ones.
        **changes: fields to change on top, e.g. ``max_pixels=None`` (no limit)
            or ``max_aspect_ratio=40``.

    Example (the CLI, once its flags are parsed)::

        set_image_limits(max_pixels=args.max_image_pixels, max_aspect_ratio=args.max_aspect_ratio)
    """
    global _LIMITS
    if limits is not None and not isinstance(limits, ImageLimits):
        raise ValueError(f"limits must be an ImageLimits or None, got {type(limits).__name__}")
    previous = _LIMITS
    _LIMITS = (limits or previous).replace(**changes)
    return previous
