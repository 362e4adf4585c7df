"""Training a detector in stages (SPP-net Sec. 4.1), each resumable from the run directory.

:func:`train` runs, in order (``finetune="all"`` swaps 3 and 4):

1. ``proposals``: selective search, cached per image (:mod:`.data`); ground-truth
   boxes join the training windows.
2. ``backbone``: the network pretrained as a classifier of windows, or taken
   from ``--backbone`` (:mod:`.backbone`); fc8 starts from that classifier.
3. ``features``: conv5 of every training image at every scale and flipped
   (R-CNN: pool5 of every warped window), cached once (:mod:`.features`).
4. ``finetune``: fc6, fc7 and the (K+1)-way fc8 on pooled windows (:mod:`.finetune`).
5. ``svm``: one linear SVM per class on fc7, hard-negative mining (:mod:`.svm`);
   skipped with ``scorer="softmax"``.
6. ``bbox``: ridge regression on pool5 (:mod:`.bbox_regression`).
7. ``calibrate``: per-class score thresholds at the best F1 on a held-out split
   (:func:`~.inference.calibrate`).

Each stage function is ``stage(ctx, detector) -> detector``; the runner saves
its result under ``stages/`` and skips it in a resumed run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sppnet.engine.common import (
    GracefulInterrupt,
    Timer,
    UserError,
    load_state,
    progress,
    resolve_device,
    save_state,
    seed_everything,
)
from sppnet.engine.config import check_resume
from sppnet.engine.detect.backbone import (
    init_fc8_from_classifier,
    load_backbone,
    pretrain_backbone,
    pretrain_config,
    window_crops,
)
from sppnet.engine.detect.bbox_regression import regression_samples, train_box_regressors
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.data import split_proposals, training_set
from sppnet.engine.detect.features import FeatureCache, WindowSet, describe
from sppnet.engine.detect.finetune import FinetuneInterrupted, finetune
from sppnet.engine.detect.inference import calibration_overlap, default_threshold, run_calibration, usable_scorer
from sppnet.engine.detect.model import build_detector, load_detector_file, mark_trained, save_detector, stage_file
from sppnet.engine.detect.svm import feature_scale, train_window_svms
from sppnet.models.detector import SPPDetector
from sppnet.utils import load_json, save_json

__all__ = ["TrainingInterrupted", "feature_cache", "stage_order", "train"]

#: Settings a resumed run may change.
RESUME_MUTABLE = ("workers", "device")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C, once the current stage is checkpointed."""


@dataclass
class StageContext:
    """What every stage reads: the run's settings, folder, device and training windows."""

    cfg: DetectConfig
    out: Path
    device: torch.device
    records: list[dict]
    windows: list[WindowSet]
    classes: list[str]
    verbose: bool

    def progress(self, iterable, **kw):
        return progress(iterable, enabled=self.verbose, **kw)

    def say(self, msg: str) -> None:
        if self.verbose:
            print(msg, file=sys.stderr)


def stage_order(cfg: DetectConfig) -> list[str]:
    order = ["proposals", "backbone", "features", "finetune"]
    if cfg.finetune.mode == "all":
        order = ["proposals", "backbone", "finetune", "features"]
    return order + ["svm", "bbox", "calibrate"]


def feature_cache(cfg: DetectConfig, out: str | os.PathLike, detector: SPPDetector, records, windows) -> FeatureCache:
    """The run's cache of conv5 (SPP) or warped-window pool5 (R-CNN) features."""
    return FeatureCache(detector, records, windows, Path(out) / "cache" / "features", flips=cfg.finetune.flip)


# ------------------------------------------------------------------- stages


def stage_backbone(ctx: StageContext, detector: SPPDetector | None) -> SPPDetector:
    cfg = ctx.cfg
    if cfg.backbone.checkpoint is not None:
        model, model_classes, mean, std = load_backbone(cfg.backbone.checkpoint)
    else:
        crops = window_crops(
            ctx.records, ctx.windows, ctx.classes, cfg.crop_size, cfg.backbone.background_per_image, cfg.seed
        )
        background = sum(1 for label in crops.labels if label == len(ctx.classes))
        ctx.say(f"pretraining the backbone on {len(crops)} windows ({background} background)")
        try:
            pretrain_backbone(crops, pretrain_config(cfg), ctx.out / "backbone", ctx.verbose)
        except KeyboardInterrupt as e:
            raise TrainingInterrupted("backbone pretraining interrupted") from e
        model, model_classes, mean, std = load_backbone(ctx.out / "backbone")
    seed_everything(cfg.seed)
    det = build_detector(cfg, len(ctx.classes), model, mean, std).to(ctx.device)
    init_fc8_from_classifier(det, model, model_classes, ctx.classes)
    return det


def stage_features(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cache = feature_cache(ctx.cfg, ctx.out, detector, ctx.records, ctx.windows)
    interrupt = GracefulInterrupt()
    with interrupt:
        cache.ensure(ctx.progress, lambda: interrupt.requested)
    if not cache.complete():
        raise TrainingInterrupted("feature caching interrupted")
    return detector


def stage_finetune(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cache = feature_cache(ctx.cfg, ctx.out, detector, ctx.records, ctx.windows)
    finetune(detector, cache, ctx.records, ctx.windows, ctx.cfg.finetune, ctx.out, ctx.verbose, seed=ctx.cfg.seed)
    return detector


@torch.no_grad()
def stage_svm(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cfg = ctx.cfg
    if cfg.scorer != "svm":
        return detector
    detector.eval()
    cache = feature_cache(cfg, ctx.out, detector, ctx.records, ctx.windows)

    def fc7(i: int) -> torch.Tensor:
        return detector.fc7(cache.pool5(i, torch.arange(len(ctx.windows[i])))).cpu()

    ckpt = ctx.out / "svm_last.safetensors"
    state = load_state(ckpt) if ckpt.is_file() else None
    interrupt = GracefulInterrupt()

    def on_epoch(s: dict) -> None:
        save_state(ckpt, s)
        if interrupt.requested and s["epoch"] < cfg.svm.epochs:
            raise TrainingInterrupted(f"SVM training interrupted after epoch {s['epoch']}")

    with interrupt:
        result = train_window_svms(
            fc7, ctx.windows, len(ctx.classes), cfg.svm, ctx.progress, state=state, on_epoch=on_epoch
        )
    detector.svm_weight.copy_(result.weight)
    detector.svm_bias.copy_(result.bias)
    detector.svm_feature_scale.fill_(result.feature_scale)
    mark_trained(detector, "svm")
    ctx.say(
        f"SVMs: {result.retrains} retrains, positives {result.positives}, "
        f"hard negatives {[len(n) for n in result.negatives]}"
    )
    return detector


@torch.no_grad()
def stage_bbox(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    b = ctx.cfg.bbox
    if not b.enabled:
        return detector
    detector.eval()
    cache = feature_cache(ctx.cfg, ctx.out, detector, ctx.records, ctx.windows)
    x, y = regression_samples(ctx.windows, cache.pool5, len(ctx.classes), detector.pooled_dim, b.iou, ctx.progress)
    scale = feature_scale(torch.cat(x), b.target_norm)
    weight, bias = train_box_regressors(x, y, scale, b.lam)
    detector.bbox_weight.copy_(weight)
    detector.bbox_bias.copy_(bias)
    detector.bbox_feature_scale.fill_(scale)
    mark_trained(detector, "bbox")
    return detector


def stage_calibrate(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cfg, out = ctx.cfg, ctx.out
    split = cfg.test.calibrate_split
    reason = None
    if split is None:
        reason = "calibrate_split is None"
    elif cfg.format != "voc":
        reason = f"{cfg.format} data has no splits; run 'sppnet detect calibrate --run {out} --ann VAL.json'"
    elif calibration_overlap(cfg.split, split):
        reason = f"split {split!r} overlaps the training split {cfg.split!r}"
    if reason is None:
        try:
            held_out, props = split_proposals(cfg, out, split, ctx.classes, verbose=ctx.verbose)
        except (UserError, OSError, ValueError) as e:
            reason = f"no usable {split!r} split ({e})"
    scorer = usable_scorer(cfg.scorer, detector)
    if reason is not None:
        ctx.say(f"calibration skipped: {reason}; predict keeps scores above {default_threshold(scorer)}")
        return detector
    run_calibration(detector, out, cfg, held_out, props, ctx.classes, scorer, split, ctx.verbose)
    return detector


STAGES: dict[str, Callable[[StageContext, SPPDetector | None], SPPDetector]] = {
    "backbone": stage_backbone,
    "features": stage_features,
    "finetune": stage_finetune,
    "svm": stage_svm,
    "bbox": stage_bbox,
    "calibrate": stage_calibrate,
}


# ------------------------------------------------------------------- runner


def train(
    cfg: DetectConfig | None = None,
    out: str | os.PathLike = "runs/detect",
    resume: bool = False,
    verbose: bool = True,
    stop_after: str | None = None,
) -> Path:
    """Trains an SPP-net (or R-CNN) detector through the stages of the module docstring.

    Args:
        cfg: the run's settings (``None``: the saved config when resuming, else ``small``).
        out: run directory.
        resume: continue the run in ``out``: finished stages are skipped, an
            unfinished one continues from its checkpoint.
        verbose: progress bars and a line per stage.
        stop_after: stop once this stage is finished (tests, staged runs).

    Returns:
        ``out``; ``out / "detector.safetensors"`` once every stage has finished.

    Raises:
        TrainingInterrupted: after Ctrl-C, once the current stage is checkpointed.
    """
    out = Path(out)
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"nothing to resume: {out / 'config.json'} does not exist")
        saved = DetectConfig.from_dict(load_json(out / "config.json"))
        cfg = check_resume(saved, cfg, mutable=RESUME_MUTABLE, ignore=("preset",))
    else:
        cfg = (cfg or DetectConfig()).resolved()
        if (out / "config.json").exists():
            raise UserError(
                f"{out} already holds a detection run; pass --resume to continue it or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", cfg.to_dict())
    if stop_after is not None and stop_after not in stage_order(cfg):
        raise ValueError(f"stop_after must be one of {stage_order(cfg)}, got {stop_after!r}")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    try:
        _run_stages(cfg, out, device, verbose, stop_after)
    except (FinetuneInterrupted, TrainingInterrupted, KeyboardInterrupt) as e:
        print(
            f"\ninterrupted ({e or 'Ctrl-C'}): progress is saved in {out}\n"
            f"resume with: sppnet detect train --out {out} --resume",
            file=sys.stderr,
        )
        raise TrainingInterrupted(str(e)) from None
    return out


def _record_time(out: Path, stage: str, seconds: float) -> None:
    path = out / "stages" / "times.json"
    times = load_json(path) if path.is_file() else {}
    save_json(path, {**times, stage: round(seconds, 2)})


def _run_stages(cfg: DetectConfig, out: Path, device: torch.device, verbose: bool, stop_after: str | None) -> None:
    with Timer() as t:
        records, windows, classes = training_set(cfg, out, verbose)
    ctx = StageContext(cfg, out, device, records, windows, classes, verbose)
    if not stage_file(out, "proposals").is_file():
        save_json(stage_file(out, "proposals"), {**describe(windows), "seconds": round(t.seconds, 2)})
        save_json(out / "stages" / "times.json", {"proposals": round(t.seconds, 2)})
    ctx.say(f"proposals: {describe(windows)}")
    stages = stage_order(cfg)
    done = [s for s in stages if stage_file(out, s).is_file()]
    if stop_after == "proposals":
        return

    detector = None
    for stage in stages[1:]:
        path = stage_file(out, stage)
        if path.is_file():
            if path.suffix == ".safetensors":
                detector = None  # load lazily: a later weight file supersedes it
            if stage == stop_after:
                return
            continue
        if detector is None and "backbone" in done:
            detector = _latest_detector(out, stages, stage, device)
        with Timer() as t:
            detector = STAGES[stage](ctx, detector)
        if path.suffix == ".safetensors":
            save_detector(path, detector, classes, cfg, stage)
        else:
            save_json(path, {"seconds": round(t.seconds, 2)})
        done.append(stage)
        _record_time(out, stage, t.seconds)
        ctx.say(f"stage {stage} finished in {t.seconds:.1f} s")
        if stage == stop_after:
            return
    if detector is None:
        detector = _latest_detector(out, stages, None, device)
    save_detector(out / "detector.safetensors", detector, classes, cfg, "final")
    ctx.say(f"detector written to {out / 'detector.safetensors'}")


def _latest_detector(out: Path, stages: list[str], before: str | None, device: torch.device) -> SPPDetector:
    """The detector saved by the last finished weight stage before ``before``."""
    upto = stages if before is None else stages[: stages.index(before)]
    for stage in reversed(upto):
        path = stage_file(out, stage)
        if path.suffix == ".safetensors" and path.is_file():
            return load_detector_file(path, device)[0]
    raise UserError(f"{out}: no finished backbone stage to continue from")
