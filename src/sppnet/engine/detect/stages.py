"""Training a detector in stages (SPP-net Sec. 4.1), each resumable from the run directory.

:func:`train` runs, in order (``finetune="all"`` swaps 3 and 4):

1. ``proposals``: selective search, cached per image (:mod:`.data`); ground-truth
   boxes join the training windows. With ``features.auto_scale`` the image scales
   are chosen here from the training objects' sizes and saved in ``config.json``.
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

The same command runs in one process or in N under ``torchrun`` (NCCL on GPUs,
gloo on the CPU; :mod:`sppnet.engine.distributed`): proposals, the conv5 cache
and the calibration split the images (each cache entry written by exactly one
process); backbone pretraining and fine-tuning are data parallel with the
global batch of one process; the SVMs and box regressors split the classes
(:func:`~sppnet.engine.distributed.split_classes`) and every process gets all
of them back. Rank 0 writes the run folder; a killed run resumes with
``--resume`` at any number of processes (an unfinished SVM stage restarts when
that number changed).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sppnet.engine.amp import autocast_context
from sppnet.engine.common import (
    GracefulInterrupt,
    Timer,
    UserError,
    load_state,
    progress,
    save_state,
    seed_everything,
)
from sppnet.engine.compile import compile_conv_layers
from sppnet.engine.config import check_resume
from sppnet.engine.detect.backbone import (
    init_fc8_from_classifier,
    learned,
    load_backbone,
    pretrain_backbone,
    pretrain_config,
    pretrain_runs,
    window_crops,
)
from sppnet.engine.detect.bbox_regression import regression_samples, train_box_regressors
from sppnet.engine.detect.config import DetectConfig
from sppnet.engine.detect.data import (
    check_split,
    open_detection_data,
    resolve_auto_scale,
    split_proposals,
    training_data,
    training_set,
)
from sppnet.engine.detect.features import FeatureCache, WindowSet, describe, format_bytes
from sppnet.engine.detect.finetune import FinetuneInterrupted, finetune
from sppnet.engine.detect.inference import calibration_overlap, default_threshold, run_calibration, usable_scorer
from sppnet.engine.detect.model import build_detector, load_detector_file, mark_trained, save_detector, stage_file
from sppnet.engine.detect.svm import feature_scale, svm_positives, train_svms
from sppnet.engine.distributed import (
    DistContext,
    barrier,
    gather_shards,
    init_distributed,
    shutdown_distributed,
    split_classes,
)
from sppnet.engine.limits import image_limits
from sppnet.models.detector import SPPDetector
from sppnet.models.freeze import freeze
from sppnet.utils import RunLock, check_finite_tensors, load_json, save_json

__all__ = ["TrainingInterrupted", "feature_cache", "stage_order", "train"]

#: Settings a resumed run may change.
#: (the image limits may be raised to take an image that was refused).
RESUME_MUTABLE = (
    "workers",
    "device",
    "amp",
    "compile",
    "features.cache",
    *(f"limits.{k}" for k in DetectConfig().limits.flat()),
)


#: What to try when a stage's weights are not finite (nothing non-finite is saved).
_HINTS = {
    "backbone": "the pretraining diverged: lower --pretrain-lr",
    "finetune": "lower --ft-lr",
    "svm": "the fc7 features or the SVMs are not finite: check the earlier stages, or change --svm-c",
    "bbox": "the pool5 features or the regressors are not finite: raise --bbox-lambda",
}


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
    dist: DistContext = field(default_factory=DistContext)
    cache: FeatureCache | None = None

    def progress(self, iterable, **kw):
        return progress(iterable, enabled=self.verbose and self.dist.is_main, **kw)

    def say(self, msg: str) -> None:
        if self.verbose and self.dist.is_main:
            print(msg, file=sys.stderr)

    def features(self, detector: SPPDetector) -> FeatureCache:
        """The run's feature cache, serving ``detector`` (one object for all stages: ``memory`` keeps its RAM)."""
        if self.cache is None:
            self.cache = feature_cache(self.cfg, self.out, detector, self.records, self.windows)
        return self.cache.use(detector)


def stage_order(cfg: DetectConfig) -> list[str]:
    order = ["proposals", "backbone", "features", "finetune"]
    if cfg.finetune.mode == "all":
        order = ["proposals", "backbone", "finetune", "features"]
    return order + ["svm", "bbox", "calibrate"]


def feature_cache(cfg: DetectConfig, out: str | os.PathLike, detector: SPPDetector, records, windows) -> FeatureCache:
    """The run's cache of conv5 (SPP) or warped-window pool5 (R-CNN) features.

    Where and how it is stored: ``--feature-cache``, ``--cache-dtype``.
    """
    f = cfg.features
    return FeatureCache(
        detector,
        records,
        windows,
        Path(out) / "cache" / "features",
        flips=cfg.finetune.flip,
        mode=f.cache,
        dtype=f.cache_dtype,
    )


# ------------------------------------------------------------------- stages


def stage_backbone(ctx: StageContext, detector: SPPDetector | None) -> SPPDetector:
    cfg = ctx.cfg
    if cfg.backbone.checkpoint is not None:
        model, model_classes, mean, std = load_backbone(cfg.backbone.checkpoint)
    else:
        b = cfg.backbone
        crops = window_crops(
            ctx.records,
            ctx.windows,
            ctx.classes,
            cfg.crop_size,
            b.background_per_image,
            cfg.seed,
            crops=b.crops,
            per_object=b.per_object,
            bg_ratio=b.bg_ratio,
        )
        background = sum(1 for label in crops.labels if label == len(ctx.classes))
        runs = pretrain_runs(cfg, ctx.out)
        for k, (recipe, run) in enumerate(runs):
            ctx.say(f"pretraining the backbone on {len(crops)} windows ({background} background), {recipe} recipe")
            try:
                pretrain_backbone(crops, pretrain_config(cfg, recipe), run, ctx.verbose)
            except KeyboardInterrupt as e:
                raise TrainingInterrupted("backbone pretraining interrupted") from e
            barrier(ctx.dist)  # rank 0 has written the backbone's weights
            ok, loss, prior = learned(run, crops.labels)
            if ok or k + 1 == len(runs):
                break
            ctx.say(
                f"the {recipe} recipe did not leave the initial loss plateau (training loss {loss:.3f}, "
                f"{prior:.3f} for predicting the class frequencies); pretraining again with the {runs[k + 1][0]} recipe"
            )
        model, model_classes, mean, std = load_backbone(run)
    seed_everything(cfg.seed)
    det = build_detector(cfg, len(ctx.classes), model, mean, std).to(ctx.device)
    init_fc8_from_classifier(det, model, model_classes, ctx.classes)
    return det


def stage_features(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cache = ctx.features(detector)
    size, n = cache.estimate_bytes(), max(len(ctx.records), 1)
    where = {"disk": f"on disk in {cache.cache_dir}", "memory": "in RAM (every process)", "none": "nowhere"}
    if cache.mode == "none":
        ctx.say(
            f"conv features: not cached (--feature-cache none); recomputed when read, "
            f"{format_bytes(size / n)} per image in {cache.dtype}"
        )
    else:
        ctx.say(
            f"conv features: {len(ctx.records)} images, about {format_bytes(size)} {where[cache.mode]} "
            f"({format_bytes(size / n)} per image, {str(cache.dtype).removeprefix('torch.')})"
        )
    interrupt = GracefulInterrupt()
    with interrupt:
        cache.ensure(ctx.progress, lambda: interrupt.requested, dist=ctx.dist)
    if not cache.complete():
        raise TrainingInterrupted("feature caching interrupted")
    return detector


def stage_finetune(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    freeze(detector.backbone, ctx.cfg.backbone.freeze)  # --finetune all: these stages stay fixed
    cache = ctx.features(detector)
    finetune(
        detector,
        cache,
        ctx.records,
        ctx.windows,
        ctx.cfg.finetune,
        ctx.out,
        ctx.verbose,
        seed=ctx.cfg.seed,
        dist=ctx.dist,
        amp=ctx.cfg.amp,
    )
    return detector


@torch.no_grad()
def stage_svm(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    """The per-class SVMs; under ``torchrun`` each process trains the classes of
    :func:`~sppnet.engine.distributed.split_classes` (the others see no positives
    and no negatives, so they are never fitted) and the processes swap their rows."""
    cfg, dist = ctx.cfg, ctx.dist
    if cfg.scorer != "svm":
        return detector
    detector.eval()
    cache = ctx.features(detector)
    k = len(ctx.classes)

    def fc7(i: int) -> torch.Tensor:
        return detector.fc7(cache.pool5(i, torch.arange(len(ctx.windows[i])))).float().cpu()

    mine = split_classes(k, dist)
    overlaps, positives = [w.overlaps for w in ctx.windows], svm_positives(ctx.windows)
    if dist.distributed:
        others = torch.tensor([c not in mine for c in range(k)])
        overlaps = [o.masked_fill(others, 1.0) for o in overlaps]  # never a negative (IoU < 0.3)
        positives = [p.masked_fill(others[p.clamp(min=0)] & (p >= 0), -1) for p in positives]
    name = "svm_last.safetensors" if not dist.distributed else f"svm_last-{dist.rank}of{dist.world_size}.safetensors"
    ckpt = ctx.out / name
    state = load_state(ckpt) if ckpt.is_file() else None
    interrupt = GracefulInterrupt()

    def on_epoch(s: dict) -> None:
        save_state(ckpt, s)
        if interrupt.requested and s["epoch"] < cfg.svm.epochs:
            raise TrainingInterrupted(f"SVM training interrupted after epoch {s['epoch']}")

    with interrupt:
        result = train_svms(
            len(ctx.windows), fc7, overlaps, positives, k, cfg.svm, ctx.progress, state=state, on_epoch=on_epoch
        )
    rows = gather_shards(
        [(result.weight[c], result.bias[c], result.positives[c], result.negatives[c]) for c in mine],
        k,
        dist,
        strided=True,
    )
    detector.svm_weight.copy_(torch.stack([r[0] for r in rows]))
    detector.svm_bias.copy_(torch.stack([r[1] for r in rows]))
    detector.svm_feature_scale.fill_(result.feature_scale)
    mark_trained(detector, "svm")
    negatives = [len(r[3]) for r in rows]
    ctx.say(f"SVMs: {result.retrains} retrains, positives {[r[2] for r in rows]}, hard negatives {negatives}")
    return detector


@torch.no_grad()
def stage_bbox(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    b = ctx.cfg.bbox
    if not b.enabled:
        return detector
    detector.eval()
    cache = ctx.features(detector)
    k = len(ctx.classes)
    x, y = regression_samples(ctx.windows, cache.pool5, k, detector.pooled_dim, b.iou, ctx.progress)
    scale = feature_scale(torch.cat(x), b.target_norm)
    mine = split_classes(k, ctx.dist)  # each process solves its classes' ridge regressions
    weight, bias = train_box_regressors([x[c] for c in mine], [y[c] for c in mine], scale, b.lam)
    if len(mine) == 0:
        weight = torch.zeros((0, detector.pooled_dim, 4))
    rows = gather_shards([(weight[j], bias[j]) for j in range(len(mine))], k, ctx.dist, strided=True)
    detector.bbox_weight.copy_(torch.stack([r[0] for r in rows]))
    detector.bbox_bias.copy_(torch.stack([r[1] for r in rows]))
    detector.bbox_feature_scale.fill_(scale)
    mark_trained(detector, "bbox")
    return detector


def _calibration_skipped(cfg: DetectConfig, out: Path) -> str | None:
    """Why the run has no held-out split to calibrate on (from the settings alone), or None."""
    split = cfg.test.calibrate_split
    if split is None:
        return "calibrate_split is None"
    if cfg.format != "voc":
        return f"{cfg.format} data has no splits; run 'sppnet detect calibrate --run {out} --ann VAL.json'"
    if calibration_overlap(cfg.split, split):
        return f"split {split!r} overlaps the training split {cfg.split!r}"
    return None


def stage_calibrate(ctx: StageContext, detector: SPPDetector) -> SPPDetector:
    cfg, out = ctx.cfg, ctx.out
    split = cfg.test.calibrate_split
    reason = _calibration_skipped(cfg, out)
    if reason is None:
        try:
            held_out, props = split_proposals(
                cfg, out, split, ctx.classes, verbose=ctx.verbose and ctx.dist.is_main, dist=ctx.dist
            )
        except (UserError, OSError, ValueError) as e:
            reason = f"no usable {split!r} split ({e})"
    scorer = usable_scorer(cfg.scorer, detector)
    if reason is not None:
        ctx.say(f"calibration skipped: {reason}; predict keeps scores above {default_threshold(scorer)}")
        return detector
    run_calibration(detector, out, cfg, held_out, props, ctx.classes, scorer, split, ctx.verbose, dist=ctx.dist)
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
    import contextlib

    import torch.distributed as torch_dist

    owns_group = not (torch_dist.is_available() and torch_dist.is_initialized())
    if not resume:
        cfg = (cfg or DetectConfig()).resolved()
        device_spec = cfg.device
    elif cfg is not None:
        device_spec = cfg.device
    else:
        saved_file = out / "config.json"
        device_spec = DetectConfig.from_dict(load_json(saved_file)).device if saved_file.is_file() else "auto"
    dist = init_distributed(device_spec)
    # One writer per run folder (rank 0 under torchrun), taken before anything is written.
    lock = RunLock(out) if dist.is_main else contextlib.nullcontext()
    try:
        with lock:
            if resume:
                if not (out / "config.json").is_file():
                    raise UserError(f"nothing to resume: {out / 'config.json'} does not exist")
                saved = DetectConfig.from_dict(load_json(out / "config.json"))
                # an auto scale was chosen by the run (saved in its config.json), not by the caller
                ignore = ("preset", "features.scales") if saved.features.auto_scale else ("preset",)
                cfg = check_resume(saved, cfg, mutable=RESUME_MUTABLE, ignore=ignore)
            elif (out / "config.json").exists():
                raise UserError(
                    f"{out} already holds a detection run; pass --resume to continue it or choose another --out"
                )
            if stop_after is not None and stop_after not in stage_order(cfg):
                raise ValueError(f"stop_after must be one of {stage_order(cfg)}, got {stop_after!r}")
            with image_limits(cfg.limits):
                # before config.json: a refused run leaves no run behind
                data = _check_before_work(cfg, out, verbose and dist.is_main)
                barrier(dist)  # every process has looked before rank 0 writes
                if not resume and dist.is_main:
                    save_json(out / "config.json", cfg.to_dict())
                seed_everything(cfg.seed)
                try:
                    _run_stages(cfg, out, dist, verbose, stop_after, data)
                except (FinetuneInterrupted, TrainingInterrupted, KeyboardInterrupt) as e:
                    if dist.is_main:
                        launcher = "torchrun --nproc_per_node N -m sppnet" if dist.distributed else "sppnet"
                        print(
                            f"\ninterrupted ({e or 'Ctrl-C'}): progress is saved in {out}\n"
                            f"resume with: {launcher} detect train --out {out} --resume",
                            file=sys.stderr,
                        )
                    raise TrainingInterrupted(str(e)) from None
    finally:
        if owns_group:
            shutdown_distributed(dist)
    return out


def _check_before_work(cfg: DetectConfig, out: Path, verbose: bool) -> tuple[list[dict], list[str]]:
    """Everything checkable from the data and the settings, before the first proposal.

    The training split (:func:`~sppnet.engine.detect.data.check_split`), the
    detector these settings build (scales and warp size against the network's
    smallest input; a ``--backbone`` that loads), and the calibration split.

    Returns:
        ``(records, classes)`` of the training split.
    """
    records, classes = training_data(cfg, verbose)
    model = load_backbone(cfg.backbone.checkpoint)[0] if cfg.backbone.checkpoint is not None else None
    try:
        build_detector(cfg, len(classes), model)
    except ValueError as e:
        raise UserError(
            f"these settings cannot build the detector: {e} (image scales are --scales x --size = "
            f"{list(cfg.image_scales)} pixels)"
        ) from None
    split = cfg.test.calibrate_split
    if _calibration_skipped(cfg, out) is None:
        try:
            check_split(
                open_detection_data(cfg.data, cfg.format, cfg.ann, split, classes, cfg.strict), cfg, split, False
            )
        except (UserError, OSError, ValueError) as e:
            if verbose:
                print(f"calibration will be skipped: no usable {split!r} split ({e})", file=sys.stderr)
    return records, classes


def _record_time(out: Path, stage: str, seconds: float, dist: DistContext) -> None:
    if not dist.is_main:
        return
    path = out / "stages" / "times.json"
    times = load_json(path) if path.is_file() else {}
    save_json(path, {**times, stage: round(seconds, 2)})


def _run_stages(
    cfg: DetectConfig,
    out: Path,
    dist: DistContext,
    verbose: bool,
    stop_after: str | None,
    data: tuple[list[dict], list[str]] | None = None,
) -> None:
    device = dist.device
    with Timer() as t:
        records, windows, classes = training_set(cfg, out, verbose and dist.is_main, dist, data)
    stages = stage_order(cfg)
    finished = {s: stage_file(out, s).is_file() for s in stages}  # the same answer on every process
    barrier(dist)  # every process has seen which stages are finished before rank 0 writes more
    if not finished["proposals"] and cfg.features.auto_scale:
        # chosen once, from the training records; saved before the stage is, so a resumed run reads it back
        cfg = resolve_auto_scale(cfg, records)
        if dist.is_main:
            save_json(out / "config.json", cfg.to_dict())
    ctx = StageContext(cfg, out, device, records, windows, classes, verbose, dist)
    if cfg.features.auto_scale:
        ctx.say(f"image scale from the objects' sizes: short side {list(cfg.image_scales)} px")
    if dist.is_main and not finished["proposals"]:
        save_json(stage_file(out, "proposals"), {**describe(windows), "seconds": round(t.seconds, 2)})
        save_json(out / "stages" / "times.json", {"proposals": round(t.seconds, 2)})
    ctx.say(f"proposals: {describe(windows)}")
    done = [s for s in stages if finished[s]]
    if stop_after == "proposals":
        return

    detector = None
    for stage in stages[1:]:
        path = stage_file(out, stage)
        if finished[stage]:
            if path.suffix == ".safetensors":
                detector = None  # load lazily: a later weight file supersedes it
            if stage == stop_after:
                return
            continue
        if detector is None and "backbone" in done:
            detector = _latest_detector(out, stages, stage, device)
        if detector is not None:  # --compile: its conv layers (kept while the stages pass it on)
            compile_conv_layers(detector.backbone, cfg.compile)
        with Timer() as t, autocast_context(device, cfg.amp):
            detector = STAGES[stage](ctx, detector)
        if dist.is_main and path.suffix == ".safetensors":
            check_finite_tensors(detector, f"the detector's weights after stage {stage}", hint=_HINTS.get(stage))
            save_detector(path, detector, classes, cfg, stage)
        elif dist.is_main:
            save_json(path, {"seconds": round(t.seconds, 2)})
        barrier(dist)  # the stage is recorded before any process goes on (a kill then resumes after it)
        done.append(stage)
        _record_time(out, stage, t.seconds, dist)
        ctx.say(f"stage {stage} finished in {t.seconds:.1f} s")
        if stage == stop_after:
            return
    if detector is None:
        detector = _latest_detector(out, stages, None, device)
    if dist.is_main:
        save_detector(out / "detector.safetensors", detector, classes, cfg, "final")
    barrier(dist)
    ctx.say(f"detector written to {out / 'detector.safetensors'}")


def _latest_detector(out: Path, stages: list[str], before: str | None, device: torch.device) -> SPPDetector:
    """The detector saved by the last finished weight stage before ``before``."""
    upto = stages if before is None else stages[: stages.index(before)]
    for stage in reversed(upto):
        path = stage_file(out, stage)
        if path.suffix == ".safetensors" and path.is_file():
            return load_detector_file(path, device)[0]
    raise UserError(f"{out}: no finished backbone stage to continue from")
