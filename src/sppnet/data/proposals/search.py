"""Selective search on one image (SPP-net Sec. 4, step 1), seeded and bounded in time.

:func:`selective_search` runs OpenCV's implementation
(``cv2.ximgproc.segmentation``) in the requested mode, returns boxes in the
project's convention and is reproducible: OpenCV ranks its regions with the C
library's ``rand()``, which is seeded (``seed``) right before each run.
:class:`SelectiveSearchParams` holds its settings (also the key of the proposal
cache, :mod:`sppnet.data.proposals.cache`), :func:`check_search_limits` refuses
from its header alone an image the search could not finish in bounded time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
from PIL import Image

from sppnet.data.images import ImageError, read_image_size
from sppnet.data.limits import ImageLimits, get_image_limits, search_size
from sppnet.data.proposals.windows import _unique_rows_stable

__all__ = ["SelectiveSearchParams", "check_search_limits", "selective_search"]

PathLike = str | os.PathLike

_MODES = ("fast", "quality", "single")

# OpenCV's defaults (ximgproc/segmentation.hpp): base_k = inc_k = 150, sigma = 0.8
# for the fast and quality modes; k = 200, sigma = 0.8 for the single strategy.
_DEFAULT_BASE_K = {"fast": 150, "quality": 150, "single": 200}

# R-CNN's selective_search_boxes.m drops boxes narrower or shorter than 20 px on
# PASCAL VOC images, whose long side is 500 px. We keep that ratio by default.
_RCNN_MIN_BOX = 20
_RCNN_IMAGE_SIDE = 500


@dataclasses.dataclass(frozen=True)
class SelectiveSearchParams:
    """Settings of :func:`selective_search`; also the cache key of :class:`ProposalCache`.

    Attributes:
        mode: ``"fast"`` (SPP-net and R-CNN), ``"quality"`` or ``"single"``.
        base_k: k of the first graph segmentation (the only one in ``"single"``
            mode). ``None`` means OpenCV's default: 150, or 200 for ``"single"``.
        inc_k: increment of k between segmentations (ignored by ``"single"``).
        sigma: Gaussian smoothing of the graph segmentations.
        max_proposals: keep at most this many boxes, best ranked first (the
            paper's "about 2,000 windows"); ``None`` keeps all.
        min_size: drop boxes whose width or height (inclusive pixels) is below
            this, in original-image pixels. ``None`` scales R-CNN's 20 px at
            500 px: ``ceil(20 * max(H, W) / 500)``, e.g. 16 px for 400x300.
        resize_to: if set and the image's short side is longer, run on a copy
            downscaled to this short side (area interpolation) and map the boxes
            back; selective search time grows with the pixel count. ``None``
            runs at full resolution.
        seed: seed of the C ``rand()`` that OpenCV uses to rank regions.
    """

    mode: str = "fast"
    base_k: int | None = None
    inc_k: int = 150
    sigma: float = 0.8
    max_proposals: int | None = 2000
    min_size: int | None = None
    resize_to: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_params(**dataclasses.asdict(self))

    def to_json(self) -> str:
        """Canonical JSON of the parameters (sorted keys), used in cache keys."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def _check_params(
    mode: str,
    base_k: int | None,
    inc_k: int,
    sigma: float,
    max_proposals: int | None,
    min_size: int | None,
    resize_to: int | None,
    seed: int,
) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    for name, value, allow_none in (
        ("base_k", base_k, True),
        ("inc_k", inc_k, False),
        ("max_proposals", max_proposals, True),
        ("min_size", min_size, True),
        ("resize_to", resize_to, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            kind = "a positive int or None" if allow_none else "a positive int"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def _as_params(params: SelectiveSearchParams | Mapping[str, Any] | None) -> SelectiveSearchParams:
    if params is None:
        return SelectiveSearchParams()
    if isinstance(params, SelectiveSearchParams):
        return params
    if isinstance(params, Mapping):
        unknown = sorted(set(params) - {f.name for f in dataclasses.fields(SelectiveSearchParams)})
        if unknown:
            raise ValueError(f"unknown selective search parameters {unknown}")
        return SelectiveSearchParams(**params)
    raise ValueError(f"params must be a SelectiveSearchParams, a mapping or None, got {type(params).__name__}")


def _find_c_srand():
    """The C library's ``srand`` (the one OpenCV's ``std::rand`` draws from), or None."""
    candidates = []
    if sys.platform == "win32":
        candidates = ["ucrtbase", "msvcrt"]
    else:
        candidates = [None, ctypes.util.find_library("c")]
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
            srand = lib.srand
        except (OSError, AttributeError, TypeError):
            continue
        srand.argtypes = [ctypes.c_uint]
        srand.restype = None
        return srand
    return None


_C_SRAND = _find_c_srand()
# rand() is process-global: serialise seeding + ranking across Python threads.
_C_RAND_LOCK = threading.Lock()
_warned_unseeded = False


def _to_bgr(image: np.ndarray | Image.Image) -> np.ndarray:
    """RGB ``uint8 [H, W, 3]`` array or PIL image -> contiguous BGR array for OpenCV."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array or PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be an RGB uint8 array of shape [H, W, 3], got dtype {image.dtype} "
            f"and shape {tuple(image.shape)}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must not be empty, got shape {tuple(image.shape)}")
    return np.ascontiguousarray(image[:, :, ::-1])


def selective_search(
    image: np.ndarray | Image.Image,
    mode: str = "fast",
    base_k: int | None = None,
    inc_k: int = 150,
    sigma: float = 0.8,
    max_proposals: int | None = 2000,
    min_size: int | None = None,
    resize_to: int | None = None,
    seed: int = 0,
    limits: ImageLimits | None = None,
) -> np.ndarray:
    """Selective search proposals for one image (SPP-net Sec. 4: "fast" mode, ~2k windows).

    Runs ``cv2.ximgproc.segmentation.createSelectiveSearchSegmentation`` in the
    requested mode, converts its ``(x, y, w, h)`` rectangles to inclusive
    corners, drops boxes with a side shorter than ``min_size``, removes exact
    duplicates and keeps the first ``max_proposals`` in OpenCV's ranking order.
    The ranking is made reproducible by seeding the C ``rand()`` with ``seed``
    (see the module docstring). See :class:`SelectiveSearchParams` for the
    meaning and defaults of every parameter.

    Args:
        image: ``uint8`` array ``[H, W, 3]`` in RGB order, or a PIL image
            (converted to RGB).
        mode: ``"fast"``, ``"quality"`` or ``"single"``.
        base_k: k of the first graph segmentation; ``None`` = OpenCV's default.
        inc_k: k increment between segmentations.
        sigma: Gaussian smoothing of the segmentations.
        max_proposals: cap on the number of boxes; ``None`` for no cap.
        min_size: smallest accepted box side in pixels; ``None`` =
            ``ceil(20 * max(H, W) / 500)``.
        resize_to: short side to downscale to before searching; ``None`` = no
            resizing (images whose short side is already <= ``resize_to`` are
            never upscaled).
        seed: seed of the ranking.
        limits: size limits checked before searching (see
            :mod:`sppnet.data.limits`); ``None``: the process-wide ones.

    Returns:
        np.ndarray[K, 4]: ``float32`` boxes ``(x1, y1, x2, y2)``, 0-based
        inclusive pixel coordinates with ``0 <= x1 <= x2 <= W - 1`` and
        ``0 <= y1 <= y2 <= H - 1``, integer-valued, unique, best ranked first.

    Raises:
        ValueError: On a malformed image, an image outside ``limits`` (refused
            before searching; the message names the flag that raises the limit),
            or an invalid parameter (naming it).
    """
    global _warned_unseeded
    _check_params(mode, base_k, inc_k, sigma, max_proposals, min_size, resize_to, seed)
    bgr = _to_bgr(image)
    height, width = bgr.shape[:2]
    problem = (get_image_limits() if limits is None else limits).search_problem(width, height, resize_to)
    if problem is not None:
        raise ValueError(f"selective search refused: {problem[1]}")
    if min_size is None:
        min_size = max(1, math.ceil(_RCNN_MIN_BOX * max(height, width) / _RCNN_IMAGE_SIDE))

    work = bgr
    size = search_size(width, height, resize_to)  # (w, h)
    if size != (width, height):
        work = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)

    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(work)
    k = _DEFAULT_BASE_K[mode] if base_k is None else int(base_k)
    if mode == "fast":
        ss.switchToSelectiveSearchFast(k, int(inc_k), float(sigma))
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality(k, int(inc_k), float(sigma))
    else:
        ss.switchToSingleStrategy(k, float(sigma))
    with _C_RAND_LOCK:
        if _C_SRAND is not None:
            _C_SRAND(int(seed))
        elif not _warned_unseeded:
            _warned_unseeded = True
            warnings.warn(
                "cannot seed the C library rand() on this platform: the order of "
                "selective search proposals (and which survive max_proposals) is not "
                "reproducible",
                RuntimeWarning,
                stacklevel=2,
            )
        rects = ss.process()  # [K, 4] int32 (x, y, w, h), best ranked first
    rects = np.asarray(rects, dtype=np.int64).reshape(-1, 4)

    x1, y1 = rects[:, 0], rects[:, 1]
    x2, y2 = x1 + rects[:, 2] - 1, y1 + rects[:, 3] - 1
    if work is not bgr:
        # Map pixel *edges* back: inclusive [x1, x2] covers [x1, x2 + 1) continuously.
        sx, sy = width / work.shape[1], height / work.shape[0]
        x1, x2 = np.round(x1 * sx), np.round((x2 + 1) * sx) - 1
        y1, y2 = np.round(y1 * sy), np.round((y2 + 1) * sy) - 1
    boxes = np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)  # [K, 4]
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)

    widths = boxes[:, 2] - boxes[:, 0] + 1
    heights = boxes[:, 3] - boxes[:, 1] + 1
    boxes = boxes[(widths >= min_size) & (heights >= min_size)]
    boxes = _unique_rows_stable(boxes)
    if max_proposals is not None:
        boxes = boxes[:max_proposals]
    return boxes.astype(np.float32)


def check_search_limits(
    image_path: PathLike,
    params: SelectiveSearchParams | Mapping[str, Any] | None = None,
    limits: ImageLimits | None = None,
) -> tuple[int, int]:
    """Refuses, from its header alone, an image that selective search could not finish in bounded time.

    Args:
        image_path: the image file.
        params: the search settings (their ``resize_to`` decides the searched size).
        limits: ``None``: the process-wide limits.

    Returns:
        The image's upright ``(width, height)``.

    Raises:
        ImageError: unreadable header, or the image breaks ``limits`` (pixels,
            aspect ratio, short side, searched pixels); the message names the
            file and the flag that raises the limit.
    """
    params = _as_params(params)
    limits = get_image_limits() if limits is None else limits
    width, height = read_image_size(image_path, limits)
    problem = limits.search_problem(width, height, params.resize_to)
    if problem is not None:
        raise ImageError(image_path, *problem)
    return width, height
