"""Region proposals: selective search (SPP-net Sec. 4, step 1), cached on disk.

SPP-net, like R-CNN, scores about 2,000 candidate windows per image produced by
selective search in its "fast" mode (Uijlings et al., IJCV 2013). We use
OpenCV's implementation (``cv2.ximgproc.segmentation``) and add what a training
pipeline needs around it:

* boxes in the project's convention: ``float32 [K, 4]`` rows ``(x1, y1, x2, y2)``
  in 0-based *inclusive* pixel coordinates (``x2 = x + w - 1``), integer-valued;
* R-CNN's post-processing: boxes with a side shorter than ``min_size`` are
  dropped and exact duplicates removed;
* reproducibility: OpenCV ranks its regions with the C library's ``rand()``
  (Uijlings' pseudo-random ranking), so the *order* of the boxes, and hence
  which 2,000 survive the cap, differs between calls. We seed the C ``rand()``
  (``seed`` parameter) right before each run, which makes the output identical
  across calls, processes and worker counts;
* a per-image cache keyed by the SHA-256 of the image file and the parameters
  (:class:`ProposalCache`), and parallel computation (:func:`compute_proposals`).

Images are read with :func:`sppnet.data.images.load_image`, the loader every data
set uses (EXIF orientation applied), so proposals live in the same pixel frame
as the images the detector sees.

Bounded time. Selective search takes minutes on a large image and longer on a
thin strip (a 20000 x 10 PNG ran for over three minutes at 5 GB). Every image
is checked against :class:`~sppnet.data.limits.ImageLimits` from its header,
before it is decoded or searched: pixels, aspect ratio, short side, and the
pixels of the copy actually searched (``max_search_pixels``, after
``resize_to``). A refusal names the file and the flag that raises the limit.

:func:`sliding_window_proposals` is a cheap, deterministic stand-in (dense boxes
at a few scales and aspect ratios) for tests and benchmarks.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sppnet.data.images import ImageError, SkipCounter, load_image, read_image_size
from sppnet.data.limits import ImageLimits, get_image_limits, search_size
from sppnet.utils import file_digest, load_cache, save_cache

__all__ = [
    "ProposalCache",
    "SelectiveSearchParams",
    "add_ground_truth",
    "check_search_limits",
    "compute_proposals",
    "selective_search",
    "sliding_window_proposals",
]

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


# --------------------------------------------------------------------------- #
# Selective search on one image
# --------------------------------------------------------------------------- #


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


def _unique_rows_stable(boxes: np.ndarray) -> np.ndarray:
    """Drop exact duplicate rows, keeping the first occurrence and the order."""
    if len(boxes) == 0:
        return boxes
    _, first = np.unique(boxes, axis=0, return_index=True)
    return boxes[np.sort(first)]


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


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


class ProposalCache:
    """On-disk cache of proposals, one safetensors file per image and parameter set.

    The key of an image is ``SHA-256(SHA-256(file bytes) || params)``, where the
    parameters include :attr:`VERSION` and the OpenCV version, so renaming or
    moving images keeps their entries while changing a parameter, the image
    content, or OpenCV misses. Entries carry a checksum (see
    :func:`sppnet.utils.save_cache`); corrupt or stale ones are deleted and
    recomputed, never trusted.

    Args:
        cache_dir: Directory of the entries (created on first write).
        params: Selective search settings; ``None`` for the defaults.
    """

    #: Bump when the post-processing in :func:`selective_search` changes.
    VERSION = 1

    def __init__(
        self,
        cache_dir: PathLike,
        params: SelectiveSearchParams | Mapping[str, Any] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.params = _as_params(params)
        self._salt = json.dumps(
            {
                "params": dataclasses.asdict(self.params),
                "version": self.VERSION,
                "opencv": cv2.__version__,
            },
            sort_keys=True,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(cache_dir={str(self.cache_dir)!r}, params={self.params})"

    def key(self, image_path: PathLike) -> str:
        """Cache key of an image file (hex SHA-256; reads the whole file).

        Raises:
            ValueError: If the file does not exist.
        """
        return self.key_from_digest(file_digest(image_path))

    def key_from_digest(self, image_digest: str) -> str:
        """Cache key from the plain SHA-256 hex digest of the image file's bytes."""
        return file_digest(bytes.fromhex(image_digest), extra=self._salt)

    def path(self, key: str) -> Path:
        """File that holds (or will hold) the entry for ``key``."""
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> np.ndarray | None:
        """The cached ``float32 [K, 4]`` boxes for ``key``, or ``None`` if absent or invalid."""
        entry = load_cache(self.path(key), key=key, version=self.VERSION)
        if entry is None:
            return None
        boxes = entry.get("boxes")
        if not isinstance(boxes, np.ndarray) or boxes.ndim != 2 or boxes.shape[1] != 4:
            self.path(key).unlink(missing_ok=True)
            return None
        return boxes.astype(np.float32, copy=False)

    def save(self, key: str, boxes: np.ndarray) -> None:
        """Store ``float32 [K, 4]`` boxes under ``key`` (atomic write)."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        save_cache(self.path(key), {"boxes": boxes}, key=key, version=self.VERSION)

    def get(self, image_path: PathLike, limits: ImageLimits | None = None) -> np.ndarray:
        """Proposals for one image file, from the cache or computed (and stored) now.

        Args:
            image_path: the image file.
            limits: size limits (checked from the header, also for cached
                entries); ``None``: the process-wide ones.

        Raises:
            ImageError: If the image cannot be read or is outside ``limits``
                (the message names the file).
        """
        limits = get_image_limits() if limits is None else limits
        check_search_limits(image_path, self.params, limits)
        key = self.key(image_path)
        boxes = self.load(key)
        if boxes is None:
            boxes = selective_search(
                load_image(image_path, limits=limits), **dataclasses.asdict(self.params), limits=limits
            )
            self.save(key, boxes)
        return boxes


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


# --------------------------------------------------------------------------- #
# Many images, in parallel
# --------------------------------------------------------------------------- #


# Not "fork": OpenCV's pthread pool, once started in the parent, is copied
# mid-use; the child then hangs in cv2.setNumThreads() or in any parallel call.
_START_METHODS = ("spawn", "forkserver")


def _init_worker() -> None:
    # One process per core already; OpenCV's own thread pool would oversubscribe.
    cv2.setNumThreads(1)


def _compute_one(
    path: str, params: dict[str, Any], limits: ImageLimits
) -> tuple[str | None, np.ndarray | None, tuple[str, str] | None]:
    """Worker task: ``(sha256 of the file bytes, boxes, None)`` or ``(None, None, (reason, detail))``.

    Every failure is returned as text so that the parent can attribute it to
    the file (and skip it when asked) instead of losing the pool.
    """
    try:
        digest = file_digest(path)
        boxes = selective_search(load_image(path, limits=limits), **params, limits=limits)
        return digest, boxes, None
    except ImageError as e:
        return None, None, (e.reason, e.detail)
    except Exception as e:  # any failure belongs to this file
        return None, None, ("selective search failed", f"{type(e).__name__}: {e}")


def compute_proposals(
    image_paths: Sequence[PathLike],
    cache_dir: PathLike | None = None,
    params: SelectiveSearchParams | Mapping[str, Any] | None = None,
    workers: int = 0,
    progress: bool = True,
    skip_errors: bool = False,
    start_method: str = "spawn",
    limits: ImageLimits | None = None,
    skipped: SkipCounter | None = None,
) -> list[np.ndarray]:
    """Selective search proposals for many image files, cached and in parallel.

    Every file is hashed first; entries found in the cache are used as they
    are, the others are computed (each distinct file content once) in
    ``workers`` processes and stored as they finish, so an interrupted run
    resumes where it stopped.

    Args:
        image_paths: Image files, read with :func:`sppnet.data.images.load_image`.
        cache_dir: Cache directory (see :class:`ProposalCache`); ``None``
            disables caching.
        params: Selective search settings; ``None`` for the defaults.
        workers: Worker processes; ``0`` computes in this process.
        progress: Show a tqdm progress bar over the images to compute.
        skip_errors: On an unreadable image or one outside ``limits``, warn
            (:class:`~sppnet.data.images.DataWarning` naming the file) and
            return an empty ``[0, 4]`` array for it instead of raising.
        start_method: ``multiprocessing`` start method of the workers:
            ``"spawn"`` (default) or ``"forkserver"`` (POSIX; its server
            process imports this module once, so later pools start in
            milliseconds). ``"fork"`` is refused: a child forked after OpenCV
            started its thread pool deadlocks in its first OpenCV call. As
            always with these start methods, a script that calls this with
            ``workers > 0`` needs the ``if __name__ == "__main__":`` guard.
        limits: size limits, checked from each header before anything is
            decoded or searched (cached entries included) and sent to the
            workers; ``None``: this process's limits
            (:func:`~sppnet.data.limits.get_image_limits`).
        skipped: with ``skip_errors``, records every skipped file (path,
            reason, detail) so that the caller knows which empty results are
            failures; ``None``: a private counter (the warnings still come).

    Returns:
        list[np.ndarray[K_i, 4]]: ``float32`` boxes per image, in the order of
        ``image_paths`` (see :func:`selective_search`). The result does not
        depend on ``workers`` or on whether the cache was used.

    Raises:
        ImageError: If an image is missing, unreadable or outside ``limits``
            (naming the file) and ``skip_errors`` is False.
        ValueError: On invalid arguments.
    """
    params = _as_params(params)
    limits = get_image_limits() if limits is None else limits
    if not isinstance(limits, ImageLimits):
        raise ValueError(f"limits must be an ImageLimits or None, got {type(limits).__name__}")
    skipped = SkipCounter("images") if skipped is None else skipped
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    allowed = [m for m in _START_METHODS if m in multiprocessing.get_all_start_methods()]
    if start_method not in allowed:
        why = " (OpenCV's thread pool deadlocks in forked children)" * (start_method == "fork")
        raise ValueError(f"start_method must be one of {allowed}, got {start_method!r}{why}")
    cache = ProposalCache(cache_dir, params) if cache_dir is not None else None
    params_dict = dataclasses.asdict(params)
    paths = [str(p) for p in image_paths]
    results: list[np.ndarray | None] = [None] * len(paths)

    def fail(path: str, reason: str, detail: str) -> None:
        if not skip_errors:
            raise ImageError(path, reason, f"no proposals: {detail}")
        skipped.skip(path, reason, f"no proposals: {detail}")

    # 1. Check every header, then hash the file; identical contents are computed once.
    groups: dict[str, list[int]] = {}  # sha256 of the file bytes -> indices in `paths`
    for i, path in enumerate(paths):
        try:
            check_search_limits(path, params, limits)
            groups.setdefault(file_digest(path), []).append(i)
        except ImageError as e:
            fail(path, e.reason, e.detail)
            results[i] = np.zeros((0, 4), dtype=np.float32)
        except ValueError as e:
            fail(path, "missing", str(e))
            results[i] = np.zeros((0, 4), dtype=np.float32)

    def assign(digest: str, boxes: np.ndarray) -> None:
        for n, i in enumerate(groups[digest]):
            results[i] = boxes if n == 0 else boxes.copy()

    # 2. Answer from the cache.
    jobs: list[str] = []
    for digest in groups:
        cached = cache.load(cache.key_from_digest(digest)) if cache is not None else None
        if cached is not None:
            assign(digest, cached)
        else:
            jobs.append(digest)

    # 3. Compute the rest; store each result as soon as it arrives.
    def store(digest: str, found_digest: str | None, boxes: np.ndarray | None, error: tuple[str, str] | None) -> None:
        if error is None and found_digest != digest:
            error = ("changed", "the file changed while its proposals were computed")
        if error is not None:
            for i in groups[digest]:  # the same bytes under other names fail alike
                fail(paths[i], *error)
            boxes = np.zeros((0, 4), dtype=np.float32)
        elif cache is not None:
            cache.save(cache.key_from_digest(digest), boxes)
        assign(digest, boxes)

    with tqdm(total=len(jobs), desc="selective search", unit="img", disable=not progress) as bar:
        if workers == 0 or not jobs:
            for digest in jobs:
                store(digest, *_compute_one(paths[groups[digest][0]], params_dict, limits))
                bar.update()
        else:
            context = multiprocessing.get_context(start_method)
            if start_method == "forkserver":
                # Only takes effect when the server starts (once per process).
                context.set_forkserver_preload([__name__])
            with concurrent.futures.ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=context, initializer=_init_worker
            ) as pool:
                futures = {pool.submit(_compute_one, paths[groups[d][0]], params_dict, limits): d for d in jobs}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        store(futures[future], *future.result())
                        bar.update()
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return results  # type: ignore[return-value]  # every slot is filled above


# --------------------------------------------------------------------------- #
# Ground truth and dense windows
# --------------------------------------------------------------------------- #


def _check_box_array(boxes: Any, name: str) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float32)
    if array.ndim == 1 and array.size == 0:
        array = array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must have shape [K, 4], got {tuple(array.shape)}")
    return array


def add_ground_truth(proposals: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """Prepend ground-truth boxes to proposals, as R-CNN / SPP-net training does.

    Every ground-truth row is kept, in order, so row ``i < len(gt_boxes)`` of the
    result is ground-truth box ``i``; proposals identical to a ground-truth box
    or to an earlier proposal are dropped.

    Args:
        proposals: ``[K, 4]`` boxes ``(x1, y1, x2, y2)``.
        gt_boxes: ``[G, 4]`` boxes in the same convention.

    Returns:
        np.ndarray[G + K', 4]: ``float32``, ground truth first, ``K' <= K``.

    Raises:
        ValueError: If an input does not have shape ``[N, 4]``.
    """
    proposals = _check_box_array(proposals, "proposals")
    gt = _check_box_array(gt_boxes, "gt_boxes")
    combined = np.concatenate([gt, proposals], axis=0)  # [G + K, 4]
    if len(combined) == 0:
        return combined
    _, first = np.unique(combined, axis=0, return_index=True)
    keep = np.zeros(len(combined), dtype=bool)
    keep[first] = True
    keep[: len(gt)] = True  # duplicates among the ground truth stay
    return combined[keep]


def sliding_window_proposals(
    width: int,
    height: int,
    scales: Sequence[float] = (32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    stride_frac: float = 0.5,
) -> np.ndarray:
    """Dense, deterministic windows: a cheap stand-in for selective search.

    For each scale ``s`` and aspect ratio ``r = h / w`` a window of about
    ``s * s`` pixels (``w = round(s / sqrt(r))``, ``h = round(s * sqrt(r))``,
    clipped to the image) slides over the image with a stride of
    ``stride_frac`` times its size; a last position flush with the right /
    bottom edge is always included, so the windows cover the image.

    Args:
        width: Image width ``W`` in pixels.
        height: Image height ``H`` in pixels.
        scales: Window sides (square root of the area) in pixels.
        aspect_ratios: Height / width ratios.
        stride_frac: Stride as a fraction of the window size, in ``(0, 1]``.

    Returns:
        np.ndarray[K, 4]: ``float32`` unique boxes ``(x1, y1, x2, y2)``, 0-based
        inclusive, inside the image, ordered by scale, aspect ratio, row, column.

    Raises:
        ValueError: On non-positive sizes, scales or ratios, or a bad stride.
    """
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(scales) == 0 or any(not s > 0 for s in scales):
        raise ValueError(f"scales must be non-empty and positive, got {tuple(scales)}")
    if len(aspect_ratios) == 0 or any(not r > 0 for r in aspect_ratios):
        raise ValueError(f"aspect_ratios must be non-empty and positive, got {tuple(aspect_ratios)}")
    if not 0 < stride_frac <= 1:
        raise ValueError(f"stride_frac must be in (0, 1], got {stride_frac!r}")

    def starts(size: int, extent: int) -> np.ndarray:
        step = max(1, round(stride_frac * size))
        positions = np.arange(0, extent - size + 1, step)
        if positions[-1] != extent - size:
            positions = np.append(positions, extent - size)
        return positions

    all_boxes = []
    for s in scales:
        for r in aspect_ratios:
            w = int(min(width, max(1, round(s / math.sqrt(r)))))
            h = int(min(height, max(1, round(s * math.sqrt(r)))))
            ys, xs = np.meshgrid(starts(h, height), starts(w, width), indexing="ij")
            x1, y1 = xs.reshape(-1), ys.reshape(-1)  # row-major: rows, then columns
            all_boxes.append(np.stack([x1, y1, x1 + w - 1, y1 + h - 1], axis=1))
    boxes = _unique_rows_stable(np.concatenate(all_boxes, axis=0))
    return boxes.astype(np.float32)
