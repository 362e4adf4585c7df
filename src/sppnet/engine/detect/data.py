"""The images a detection run trains and tests on, and their selective-search proposals.

* :func:`open_detection_data`: a VOC split, a COCO annotation file or the built-in set.
* :func:`proposals`: selective search boxes per image, cached in the run.
* :func:`check_split`: a split checked before any proposal (:func:`~sppnet.data.checks.check_detection_data`).
* :func:`training_data` / :func:`training_set`: the training split, checked, then as labelled
  windows (proposals plus ground truth).
* :func:`resolve_auto_scale`: the image scales chosen from the training objects' sizes.
* :func:`split_proposals`: a test split's records and proposals.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sppnet.data.checks import DataReport, check_detection_data
from sppnet.data.images import ImageError, load_image
from sppnet.data.proposals import ProposalCache, compute_proposals
from sppnet.engine.common import UserError, progress
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.features import WindowSet, build_windows
from sppnet.engine.distributed import DistContext, fill_cache
from sppnet.utils import file_digest

__all__ = [
    "AUTO_SCALE_RANGE",
    "auto_scales",
    "check_split",
    "data_to_test",
    "drop_unreadable",
    "open_detection_data",
    "proposals",
    "resolve_auto_scale",
    "scale_from_objects",
    "split_proposals",
    "training_data",
    "training_set",
]


def open_detection_data(
    data: str | None, fmt: str, ann: str | None, split: str, classes: Sequence[str] | None, strict: bool
):
    """A data set with ``.records`` and ``.class_names``: VOC (``split``), COCO (``ann``) or the built-in set."""
    from sppnet.data import CLASSES, COCODetection, VOCDetection, make_detection_dataset

    if data is None:
        return VOCDetection(make_detection_dataset(), split, classes=classes or CLASSES, strict=strict)
    if not Path(data).is_dir():
        raise UserError(f"data folder {data} does not exist")
    if fmt == "coco":
        if ann is None:
            raise UserError("COCO data needs an annotation JSON (--ann)")
        ds = COCODetection(data, ann, strict=strict)
        if classes is not None and list(ds.class_names) != list(classes):
            raise UserError(f"{ann} has classes {ds.class_names}, the detector {list(classes)}")
        return ds
    return VOCDetection(data, split, classes=classes, strict=strict)


def proposals(
    records: Sequence[dict],
    cfg: DetectConfig,
    cache_dir: str | os.PathLike,
    verbose: bool = True,
    dist: DistContext | None = None,
) -> list[np.ndarray]:
    """Selective search boxes ``[P, 4]`` per record, cached in ``cache_dir``; unreadable images give empty arrays.

    Under ``torchrun`` (``dist``) the missing entries are first computed by the
    processes together, each entry by exactly one of them
    (:func:`~sppnet.engine.distributed.fill_cache`; the cache writes atomically),
    then every process reads them all from the cache.
    """
    paths = [r["image_path"] for r in records]
    params = cfg.selective_search()
    distributed = dist is not None and dist.distributed
    if distributed:
        _fill_proposals(paths, Path(cache_dir), params, dist, verbose)
    return compute_proposals(
        paths,
        Path(cache_dir),
        params,
        workers=0 if distributed else cfg.workers,
        progress=verbose and not distributed,
        skip_errors=not cfg.strict,
    )


def _fill_proposals(paths: list[str], cache_dir: Path, params, dist: DistContext, verbose: bool) -> None:
    cache = ProposalCache(cache_dir, params)
    keys = []
    for p in paths:
        try:
            keys.append(cache.key_from_digest(file_digest(p)))
        except ValueError:  # missing: reported by the compute_proposals that follows
            keys.append(f"unreadable:{p}")

    def exists(i: int) -> bool:
        return keys[i].startswith("unreadable:") or cache.load(keys[i]) is not None

    def build(i: int) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the final pass warns, once, on every rank
            compute_proposals([paths[i]], cache_dir, params, workers=0, progress=False, skip_errors=True)

    def bar(it):
        return progress(it, desc=f"selective search (rank {dist.rank})", enabled=verbose and dist.is_main)

    fill_cache(keys, exists, build, dist, progress=bar)


def drop_unreadable(records: list[dict], props: list[np.ndarray], verbose: bool) -> tuple[list[dict], list[np.ndarray]]:
    keep = []
    for r, p in zip(records, props):
        if len(p) == 0:
            try:
                load_image(r["image_path"])
            except ImageError as e:
                if verbose:
                    print(f"skipping {r['image_path']}: {e}", file=sys.stderr)
                continue
        keep.append((r, p))
    if not keep:
        raise UserError("no readable images")
    return [r for r, _ in keep], [p for _, p in keep]


def check_split(data, cfg: DetectConfig, split: str, verbose: bool = True) -> DataReport:
    """The :class:`~sppnet.data.checks.DataReport` of an opened split, before any proposal.

    Header sizes against the annotations, the image and selective-search limits
    (``cfg.limits``, ``--ss-resize-to``), objects and positives per class; the
    summary (with the data set's own skips) is printed when ``verbose``.

    Raises:
        DataError: degenerate data (no images, no objects, no positives; see
            :func:`~sppnet.data.checks.check_detection_data`).
    """
    report = check_detection_data(
        data.records,
        data.class_names,
        split=split,
        limits=cfg.limits.image_limits(),
        proposals=cfg.selective_search(),
        skipped=[data.skipped_images, data.skipped_objects],
        strict=cfg.strict,
    )
    if verbose:
        print(report.summary(), file=sys.stderr)
    return report


def training_data(cfg: DetectConfig, verbose: bool = True) -> tuple[list[dict], list[str]]:
    """``(records, classes)`` of a run's training split: the images that passed :func:`check_split`."""
    data = open_detection_data(cfg.data, cfg.format, cfg.ann, cfg.split, None, cfg.strict)
    # COCO data has no splits: name the annotation file the records came from
    what = Path(cfg.ann).name if cfg.format == "coco" and cfg.ann is not None else cfg.split
    return check_split(data, cfg, what, verbose).records, list(data.class_names)


def training_set(
    cfg: DetectConfig,
    out: str | os.PathLike,
    verbose: bool = True,
    dist: DistContext | None = None,
    data: tuple[list[dict], list[str]] | None = None,
) -> tuple[list[dict], list[WindowSet], list[str]]:
    """``(records, windows, classes)`` of a run's training split: the images that
    passed the checks and could be read, their proposals plus ground truth as labelled
    windows (:func:`~sppnet.engine.detect.features.build_windows`). Proposals come from
    the run's cache (``out/cache/proposals``) once computed, sharded over ``dist``.

    Args:
        data: ``(records, classes)`` of :func:`training_data`, if already checked.
    """
    records, classes = data if data is not None else training_data(cfg, verbose)
    props = proposals(records, cfg, Path(out) / "cache" / "proposals", verbose, dist)
    records, props = drop_unreadable(records, props, verbose)
    windows = [build_windows(p, r, len(classes)) for p, r in zip(props, records)]
    return records, windows, classes


#: ``features.auto_scale``'s bounds on the chosen short side, in resized pixels
#: (``scales x size_factor``): the network's 224 input, and the paper's single scale 688 (Sec. 4.2).
AUTO_SCALE_RANGE = (224, 688)


def scale_from_objects(records: Sequence[dict], target: float, lo: int = 224, hi: int = 688) -> int | None:
    """The image short side at which the training objects best fit the window target, or ``None`` without objects.

    SPP-net Sec. 4.2 gives each window the scale at which its area is closest
    to 224 x 224; applied to the data (beyond the paper), each object ``o`` of an
    image of ``W x H`` fits the target ``T`` at the short side
    ``s_o = min(W, H) * T / sqrt(w_o * h_o)`` (inclusive widths). The result is
    the median of the ``s_o`` over every object (difficult ones too), clamped to
    ``[lo, hi]`` and rounded to a multiple of 16 (halves up).

    Args:
        records: data set records (``boxes`` ``Tensor[G, 4]`` inclusive pixels, ``width``, ``height``).
        target: ``T``, the window side in resized pixels (``target_size x size_factor``).
        lo, hi: bounds of the short side, in resized pixels.
    """
    sides = []
    for r in records:
        b = r["boxes"].double().reshape(-1, 4)
        area = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # [G]
        sides += (min(int(r["width"]), int(r["height"])) * target / area.sqrt()).tolist()
    if not sides:
        return None
    return _round16(min(max(float(np.median(sides)), lo), hi))


def _round16(side: float) -> int:
    """``side`` to the nearest multiple of 16, halves up."""
    return int(np.floor(side / 16 + 0.5)) * 16


def auto_scales(base: int, factors: Sequence[float]) -> tuple[int, ...]:
    """The short sides ``base x f`` for every factor, rounded to multiples of 16 (halves
    up, at least 16), without repeats, ascending."""
    return tuple(sorted({max(16, _round16(base * f)) for f in factors}))


def resolve_auto_scale(cfg: DetectConfig, records: Sequence[dict]) -> DetectConfig:
    """``cfg`` with ``features.scales`` set from :func:`scale_from_objects` when ``features.auto_scale`` is on.

    The chosen short side ``s`` (clamped to :data:`AUTO_SCALE_RANGE`) times each of
    ``features.auto_scale_factors`` (:func:`auto_scales`; default ``s`` and ``2 s``:
    every window is then pooled at the scale where its area is closest to the
    target, Sec. 4.2, so objects smaller than the median are pooled from the larger
    map). ``scales`` is in the paper's pixels: the short sides divided by
    ``size_factor``. Without objects (or with ``auto_scale`` off) ``cfg`` as given.
    """
    if not cfg.features.auto_scale:
        return cfg
    s = scale_from_objects(records, cfg.window_target, *AUTO_SCALE_RANGE)
    if s is None:
        return cfg
    sides = auto_scales(s, cfg.features.auto_scale_factors)
    scales = tuple(round(side / cfg.features.size_factor) for side in sides)
    return cfg.with_overrides({"features": {"scales": scales}}).resolved()


def data_to_test(
    cfg: DetectConfig, data: str | None, fmt: str | None, ann: str | None
) -> tuple[str | None, str, str | None]:
    """``(data, format, ann)`` to test on: the run's data and format unless ``data`` or
    ``fmt`` is given; ``ann`` as given (a COCO run's held-out annotation file)."""
    if data is None and fmt is None:
        return cfg.data, cfg.format, ann
    return data, fmt or "voc", ann


def split_proposals(
    cfg: DetectConfig,
    run: str | os.PathLike,
    split: str,
    classes: Sequence[str],
    data: str | None = None,
    fmt: str = "voc",
    ann: str | None = None,
    verbose: bool = True,
    dist: DistContext | None = None,
) -> tuple[list[dict], list[np.ndarray]]:
    """``(records, proposals)`` of a split (default data: the run's) for testing,
    unreadable images dropped; proposals cached in ``run/cache/proposals``."""
    if data is None and ann is None:
        data, fmt, ann = cfg.data, cfg.format, cfg.ann
    ds = open_detection_data(data, fmt, ann, split, classes, cfg.strict)
    props = proposals(ds.records, cfg, Path(run) / "cache" / "proposals", verbose, dist)
    return drop_unreadable(list(ds.records), props, verbose)
