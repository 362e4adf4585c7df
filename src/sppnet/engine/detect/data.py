"""The images a detection run trains and tests on, and their selective-search proposals.

* :func:`open_detection_data`: a VOC split, a COCO annotation file or the built-in set.
* :func:`proposals`: selective search boxes per image, cached in the run.
* :func:`training_set`: the training split as labelled windows (proposals plus ground truth).
* :func:`split_proposals`: a test split's records and proposals.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sppnet.data.images import ImageError, load_image
from sppnet.data.proposals import compute_proposals
from sppnet.engine.common import UserError
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.features import WindowSet, build_windows

__all__ = ["data_to_test", "open_detection_data", "proposals", "split_proposals", "training_set"]


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
    records: Sequence[dict], cfg: DetectConfig, cache_dir: str | os.PathLike, verbose: bool = True
) -> list[np.ndarray]:
    """Selective search boxes ``[P, 4]`` per record, cached in ``cache_dir``; unreadable images give empty arrays."""
    return compute_proposals(
        [r["image_path"] for r in records],
        Path(cache_dir),
        cfg.selective_search(),
        workers=cfg.workers,
        progress=verbose,
        skip_errors=not cfg.strict,
    )


def _drop_unreadable(
    records: list[dict], props: list[np.ndarray], verbose: bool
) -> tuple[list[dict], list[np.ndarray]]:
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


def training_set(
    cfg: DetectConfig, out: str | os.PathLike, verbose: bool = True
) -> tuple[list[dict], list[WindowSet], list[str]]:
    """``(records, windows, classes)`` of a run's training split: the images that
    could be read, their proposals plus ground truth as labelled windows
    (:func:`~sppnet.engine.detect.features.build_windows`). Proposals come from the
    run's cache (``out/cache/proposals``) once computed."""
    data = open_detection_data(cfg.data, cfg.format, cfg.ann, cfg.split, None, cfg.strict)
    classes = list(data.class_names)
    if verbose and (data.skipped_images or data.skipped_objects):
        print(data.summary(), file=sys.stderr)
    records = list(data.records)
    props = proposals(records, cfg, Path(out) / "cache" / "proposals", verbose)
    records, props = _drop_unreadable(records, props, verbose)
    windows = [build_windows(p, r, len(classes)) for p, r in zip(props, records)]
    return records, windows, classes


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
) -> tuple[list[dict], list[np.ndarray]]:
    """``(records, proposals)`` of a split (default data: the run's) for testing,
    unreadable images dropped; proposals cached in ``run/cache/proposals``."""
    if data is None and ann is None:
        data, fmt, ann = cfg.data, cfg.format, cfg.ann
    ds = open_detection_data(data, fmt, ann, split, classes, cfg.strict)
    props = proposals(ds.records, cfg, Path(run) / "cache" / "proposals", verbose)
    return _drop_unreadable(list(ds.records), props, verbose)
