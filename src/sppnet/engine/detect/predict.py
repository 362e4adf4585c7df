"""``detect predict``: a trained detector on image files, folders, glob patterns and videos.

The SOURCE arguments are resolved first (:func:`~sppnet.data.sources.resolve_sources`:
a typo is reported before the model loads), then read as one stream of
pictures (:func:`~sppnet.data.sources.iter_sources`) and detected in batches:

1. proposals: selective search per picture (image files through the run's
   proposal cache; video frames computed, not cached);
2. :meth:`~sppnet.models.detector.SPPDetector.detect` on the batch (under
   ``--amp`` autocast on CUDA);
3. one result per image or frame: ``OUT/<stem>.json`` and ``OUT/<stem>.png``
   (boxes drawn) per image; per video ``OUT/<stem>.json`` with one entry per
   frame and ``OUT/<stem>.annotated.mp4``; optionally every result in one JSON
   file (``save_json``) and one text file per picture (``save_txt``:
   ``class_index score x1 y1 x2 y2`` lines, ``classes.txt`` beside them).

A bad source (a missing file, an empty folder, a glob that matches nothing, an
unreadable video, a corrupt image or frame) is skipped with a warning naming
it and counted in the :class:`~sppnet.data.sources.SourceReport`; the others
are still detected. :class:`~sppnet.data.sources.SourceError` is raised only
when nothing could be read, or at the first bad source with ``strict``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sppnet.data.images import pil_to_tensor
from sppnet.data.proposals import compute_proposals, selective_search
from sppnet.data.sources import SourceEntry, SourceItem, SourceReport, batched, iter_sources, resolve_sources
from sppnet.engine.amp import autocast_context, parse_amp
from sppnet.engine.common import UserError, progress
from sppnet.engine.detect.inference import _load_for_testing, default_threshold, run_thresholds
from sppnet.utils import save_json as write_json

__all__ = ["predict"]


def _threshold(
    run: str | os.PathLike, classes: Sequence[str], scorer: str, given: float | Sequence[float] | None
) -> tuple[float | torch.Tensor, float | dict[str, float]]:
    """``(threshold for detect, its JSON form)``: the given one, the calibrated ones, or the default."""
    if given is not None:
        threshold = given
    else:
        calibrated = run_thresholds(run, classes, scorer)
        threshold = calibrated if calibrated is not None else default_threshold(scorer)
    if isinstance(threshold, (int, float)):
        return float(threshold), float(threshold)
    values = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
    if len(values) != len(classes):
        raise UserError(
            f"score_threshold needs one value per class ({len(classes)}: {', '.join(classes)}), got {len(values)}"
        )
    return values, {c: float(v) for c, v in zip(classes, values.tolist())}


class _Outputs:
    """Writes each picture's result: JSON and PNG per image, JSON and annotated video per video, text lines."""

    def __init__(self, out: Path, classes: Sequence[str], save_images: bool, save_txt: Path | None) -> None:
        self.out, self.classes, self.save_images, self.save_txt = out, list(classes), save_images, save_txt
        self.video: tuple[SourceEntry, list[dict], Any] | None = None  # (entry, frame results, VideoWriter)
        if save_txt is not None:
            save_txt.mkdir(parents=True, exist_ok=True)
            (save_txt / "classes.txt").write_text("".join(f"{c}\n" for c in self.classes))

    def _file(self, stem: str, suffix: str) -> Path:
        path = self.out / f"{stem}{suffix}"  # a stem from a folder may hold sub-folders ("sub/b")
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, item: SourceItem, entry: SourceEntry, det: dict[str, torch.Tensor], result: dict) -> None:
        from sppnet.viz.detections import draw_detections
        from sppnet.viz.video import VideoWriter, annotate_frame

        if self.save_txt is not None:
            lines = [
                f"{d['label_index']} {d['score']:.6g} " + " ".join(f"{v:.2f}" for v in d["box"]) + "\n"
                for d in result["detections"]
            ]
            txt = self.save_txt / f"{item.stem}.txt"
            txt.parent.mkdir(parents=True, exist_ok=True)
            txt.write_text("".join(lines))
            result["txt"] = str(txt)
        if not item.is_frame:
            self.finish_video()
            result["json"] = str(self._file(item.stem, ".json"))
            if self.save_images:
                png = self._file(item.stem, ".png")
                draw_detections(item.image, det["boxes"], det["labels"], det["scores"], self.classes, png)
                result["png"] = str(png)
            write_json(Path(result["json"]), result)
            return
        if self.video is None or self.video[0] is not entry:
            self.finish_video()
            writer = None
            if self.save_images:
                writer = VideoWriter(self._file(entry.stem, ".annotated.mp4"), fps=item.fps or 25.0)
            self.video = (entry, [], writer)
        _, frames, writer = self.video
        result["json"] = str(self.out / f"{entry.stem}.json")
        if writer is not None:
            writer.write(annotate_frame(item.image, det["boxes"], det["labels"], det["scores"], self.classes))
            result["video"] = str(writer.path)
        frames.append(result)

    def finish_video(self) -> None:
        """Closes the current video: its annotated clip and its JSON (every frame's result)."""
        if self.video is None:
            return
        entry, frames, writer = self.video
        self.video = None
        if writer is not None:
            writer.close()
        payload = {"video": str(entry.path), "name": entry.name, "fps": entry.fps, "frames": frames}
        write_json(self._file(entry.stem, ".json"), payload)

    def abort(self) -> None:
        if self.video is not None and self.video[2] is not None:
            self.video[2].abort()
        self.video = None


def _proposals(batch: list[SourceItem], cache_dir: Path, params, workers: int) -> list[np.ndarray]:
    """Selective search boxes per item: image files through the proposal cache, frames computed."""
    files = [i for i in batch if not i.is_frame]
    cached = compute_proposals(
        [i.path for i in files],
        cache_dir,
        params,
        workers=min(workers, len(files)),
        progress=False,
        skip_errors=True,
    )
    by_item = {id(i): p for i, p in zip(files, cached)}
    kwargs = dataclasses.asdict(params)
    return [by_item[id(i)] if id(i) in by_item else selective_search(i.array(), **kwargs) for i in batch]


def predict(
    run: str | os.PathLike,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    score_threshold: float | Sequence[float] | None = None,
    scorer: str | None = None,
    device: str = "auto",
    verbose: bool = True,
    svd_rank: int | Sequence[int] | None = None,
    *,
    batch_size: int = 4,
    recursive: bool = False,
    strict: bool = False,
    video_stride: int = 1,
    save_images: bool = True,
    save_json: str | os.PathLike | None = None,
    save_txt: str | os.PathLike | None = None,
    amp: str | None = None,
    report: SourceReport | None = None,
) -> list[dict[str, Any]]:
    """Detects objects in images, folders, glob patterns and videos (see the module docstring).

    Args:
        run: run directory written by ``detect train``.
        sources: SOURCE arguments (:mod:`sppnet.data.sources`).
        out: output folder (default ``run/predict``).
        score_threshold: one value for every class, or one per class; default:
            the run's calibrated per-class thresholds (``thresholds.json``) when
            they exist for the scorer, else 0 for SVM scores and 0.5 for softmax.
        scorer: ``svm`` or ``softmax`` (default: the run's).
        device: ``auto | cpu | cuda | cuda:N``.
        verbose: progress bar and the summary line on stderr.
        svd_rank: fc6 / fc7 by truncated SVD (see :func:`~sppnet.engine.detect.inference.val`).
        batch_size: pictures detected together.
        recursive: folders: their sub-folders too.
        strict: stop at the first bad source instead of skipping it.
        video_stride: every ``video_stride``-th frame of a video.
        save_images: the annotated PNGs and videos.
        save_json: also every result in this one JSON file (a list, in input order).
        save_txt: also one ``<stem>.txt`` per picture in this folder.
        amp: ``bf16`` / ``fp16`` autocast on CUDA (:mod:`sppnet.engine.amp`; a no-op on the CPU).
        report: filled in with what was read and skipped (``report.summary()``).

    Returns:
        One dict per picture read, in input order: ``image`` (the file), ``name``,
        ``frame`` and ``time`` (video frames; else None), ``width``, ``height``,
        ``scorer``, ``score_threshold``, ``detections`` (``box`` inclusive
        ``(x1, y1, x2, y2)``, ``label``, ``label_index``, ``score``) and the
        files written (``json``, ``png`` or ``video``, ``txt``).

    Raises:
        SourceError: nothing could be read, or a bad source with ``strict``.
        ValueError: a bad ``batch_size``, ``video_stride`` or ``amp``.
    """
    parse_amp(amp)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    report = report if report is not None else SourceReport()
    entries = resolve_sources(sources, recursive=recursive, strict=strict, report=report)  # before the model
    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, svd_rank)
    threshold, described = _threshold(run, classes, scorer, score_threshold)
    out = Path(out) if out is not None else Path(run) / "predict"
    out.mkdir(parents=True, exist_ok=True)
    entry_of = {e.path: e for e in entries}
    outputs = _Outputs(out, classes, save_images, Path(save_txt) if save_txt is not None else None)
    params, cache_dir = cfg.selective_search(), Path(run) / "cache" / "proposals"
    dev = detector.pixel_mean.device
    items = iter_sources(entries, strict=strict, video_stride=video_stride, report=report)
    results: list[dict[str, Any]] = []
    try:
        for batch in batched(progress(items, desc="predict", total=report.expected, enabled=verbose), batch_size):
            props = _proposals(batch, cache_dir, params, cfg.workers)
            with torch.no_grad(), autocast_context(dev, amp):
                dets = detector.detect(
                    [pil_to_tensor(i.image).to(dev) for i in batch],
                    [torch.as_tensor(p) for p in props],
                    scorer=scorer,
                    score_threshold=threshold,
                    bbox_regression=cfg.bbox.enabled,
                    **cfg.test.detect_options(),
                )
            for item, det in zip(batch, dets):
                det = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}
                result = {
                    "image": str(item.path),
                    "name": item.name,
                    "frame": item.frame_index,
                    "time": item.timestamp,
                    "width": item.image.width,
                    "height": item.image.height,
                    "scorer": scorer,
                    "score_threshold": described,
                    "detections": [
                        {
                            "box": [float(v) for v in b],
                            "label": classes[int(c)],
                            "label_index": int(c),
                            "score": float(s),
                        }
                        for b, c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist())
                    ],
                }
                outputs.write(item, entry_of[item.path], det, result)
                results.append(result)
        outputs.finish_video()
    except BaseException:
        outputs.abort()
        raise
    if save_json is not None:
        Path(save_json).parent.mkdir(parents=True, exist_ok=True)
        write_json(save_json, results)
    if verbose:
        print(f"{report.summary()}; results in {out}", file=sys.stderr)
    return results
