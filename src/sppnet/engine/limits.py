"""The image size limits of a run as a config: flags, ``config.json``, and the process-wide setting.

:class:`~sppnet.data.limits.ImageLimits` says which images every path accepts
(pixels, aspect ratio, short side, pixels searched by selective search).
:class:`LimitsConfig` declares the same four settings with their flags
(``--max-image-pixels``, ``--max-aspect-ratio``, ``--min-image-side``,
``--max-search-pixels``), so they are nested in ``ClassifyConfig`` and
``DetectConfig``, saved in ``config.json`` (``--resume`` keeps them, and may
raise them) and applied for the length of a run::

    with image_limits(cfg.limits):      # load_image, proposals, transforms use them
        ...

The defaults are those of :class:`~sppnet.data.limits.ImageLimits`, read from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from sppnet.data.limits import FLAGS, ImageLimits, set_image_limits
from sppnet.engine.config import Config, option

__all__ = ["LimitsConfig", "image_limits"]

_DEFAULT = ImageLimits()


@dataclass
class LimitsConfig(Config):
    """Image limits (a refused file is named, with the flag that raises the limit)."""

    max_pixels: int | None = option(
        _DEFAULT.max_pixels,
        flag=FLAGS["max_pixels"],
        min=1,
        metavar="PIXELS",
        help="largest width*height decoded (decompression bombs); none: no limit",
    )
    max_aspect_ratio: float | None = option(
        _DEFAULT.max_aspect_ratio,
        flag=FLAGS["max_aspect_ratio"],
        min=1,
        metavar="RATIO",
        help="largest long side / short side of an image; none: no limit",
    )
    min_side: int = option(
        _DEFAULT.min_side, flag=FLAGS["min_side"], min=1, metavar="PIXELS", help="smallest short side in pixels"
    )
    max_search_pixels: int | None = option(
        _DEFAULT.max_search_pixels,
        flag=FLAGS["max_search_pixels"],
        min=1,
        metavar="PIXELS",
        help="largest image selective search runs on (after --ss-resize-to); none: no limit",
    )

    def image_limits(self) -> ImageLimits:
        """These settings as :class:`~sppnet.data.limits.ImageLimits`."""
        return ImageLimits(**dataclasses.asdict(self))


@contextlib.contextmanager
def image_limits(cfg: LimitsConfig) -> Iterator[ImageLimits]:
    """Sets the process-wide limits to ``cfg`` inside the ``with`` block, then restores the previous ones."""
    limits = cfg.image_limits()
    previous = set_image_limits(limits)
    try:
        yield limits
    finally:
        set_image_limits(previous)
