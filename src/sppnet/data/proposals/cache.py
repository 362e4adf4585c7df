"""Proposals for many image files: the on-disk cache and parallel computation.

:class:`ProposalCache` stores the boxes of one image and parameter set per
file, keyed by the SHA-256 of the image's bytes and the parameters;
:func:`compute_proposals` hashes every file, answers from the cache and
computes the rest (each distinct content once) in worker processes, storing
each result as it arrives.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from sppnet.data.images import ImageError, SkipCounter, load_image
from sppnet.data.limits import ImageLimits, get_image_limits
from sppnet.data.proposals.search import (
    PathLike,
    SelectiveSearchParams,
    _as_params,
    check_search_limits,
    selective_search,
)
from sppnet.utils import file_digest, load_cache, save_cache

__all__ = ["ProposalCache", "compute_proposals"]


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
