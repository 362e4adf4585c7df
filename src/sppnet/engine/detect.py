"""SPP-net detection: training in stages, evaluation (VOC07 mAP), prediction.

Public API::

    cfg = DetectConfig.from_preset("small")             # built-in shapes data
    run = train(cfg, out="runs/det")
    detector, classes, cfg = load_detector(run)
    val(run, split="test")   # {"mAP": .., "ap": {..}, "images": .., "seconds_per_image": ..}
    calibrate(run, split="val")  # per-class thresholds for predict (train does it when a val split exists)
    predict(run, ["a.jpg"], out="runs/det/predict")

Training stages (SPEC Sec. 3), each written atomically to the run directory and
skipped by a resumed run once finished:

1. ``proposals``: selective search, fast mode (``data/proposals.py``), cached
   per image under ``cache/proposals``; ground-truth boxes are added to the
   training windows (:func:`~sppnet.engine.det_features.build_windows`).
2. ``backbone``: the conv layers, fc6 and fc7, pretrained as a classifier of
   object and background windows with multi-size training
   (:mod:`~sppnet.engine.det_backbone`; the substitute for ImageNet
   pretraining), or taken from ``--backbone``. fc8 starts from that classifier.
3. ``features``: conv5 of every training image at every scale and flipped
   (``cache/features``; R-CNN: pool5 of every warped window), once.
4. ``finetune``: fc6, fc7 and the (K+1)-way fc8 on pooled windows
   (:mod:`~sppnet.engine.det_finetune`). With ``finetune="all"`` the conv layers
   train too; the feature stage then runs after it, on the new conv layers.
5. ``svm``: one linear SVM per class on fc7, hard-negative mining
   (:mod:`~sppnet.engine.svm`); skipped with ``scorer="softmax"``.
6. ``bbox``: ridge regression on pool5 (:mod:`~sppnet.engine.bbox_regression`).
7. ``calibrate``: per-class score thresholds at the best F1 on a held-out split
   (``calibrate_split``, default ``val`` when the data has one that does not
   overlap the training split), saved as ``thresholds.json``; ``predict`` keeps
   the detections above them. SVM scores have no natural cut-off: with SVMs
   trained from scratch most true detections score below 0. mAP does not
   depend on it (it ranks all detections).

Run directory::

    config.json              the resolved DetectConfig
    stages/<stage>.*         finished stages (detector weights after each)
    finetune_last.safetensors, svm_last.safetensors   mid-stage checkpoints
    finetune.csv, finetune.png                        fine-tuning loss / accuracy
    backbone/                the pretraining classification run
    cache/                   proposals and features (content-keyed, checksummed)
    detector.safetensors     the final detector (weights + meta)
    thresholds.json          calibrated per-class score thresholds (stage 7 or ``calibrate``)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sppnet.data.images import ImageError, load_image, pil_to_tensor
from sppnet.data.proposals import SelectiveSearchParams, compute_proposals
from sppnet.engine.bbox_regression import train_box_regressors
from sppnet.engine.common import (
    GracefulInterrupt,
    Timer,
    UserError,
    load_state,
    load_weights,
    progress,
    resolve_device,
    save_state,
    save_weights,
    seed_everything,
)
from sppnet.engine.det_backbone import init_fc8_from_classifier, load_backbone, pretrain_backbone, window_crops
from sppnet.engine.det_features import FeatureCache, WindowSet, build_windows, describe, load_record_image
from sppnet.engine.det_finetune import FinetuneConfig, FinetuneInterrupted, finetune
from sppnet.engine.svm import SVMConfig, feature_scale, train_svms
from sppnet.evaluation import best_f1_thresholds, evaluate_detections, precision_recall
from sppnet.models import get_model, list_models
from sppnet.models.detector import METHODS, SCORERS, SPPDetector
from sppnet.ops import encode_boxes
from sppnet.utils import load_json, save_json

__all__ = [
    "DetectConfig",
    "PRESETS",
    "TrainingInterrupted",
    "calibrate",
    "evaluate",
    "feature_cache",
    "load_detector",
    "open_detection_data",
    "predict",
    "run_thresholds",
    "split_proposals",
    "stage_detector",
    "train",
    "training_set",
    "val",
]

#: ``small``: 2 CPU cores, the built-in data (images of 200-400 px): ZF-5 at a
#: quarter width, fc 512, every size halved (scale 344, target window 112 px),
#: selective search on a 200 px copy. Pretraining from scratch at lr 0.01 sat on
#: the initial loss plateau for the whole budget; lr 0.003 with batches of 16
#: leaves it after ~3 epochs. Measured on the built-in set (300 training images):
#: VOC07 test mAP 0.47 (SVMs) / 0.43 (softmax). ``paper``: Table 1 width, fc
#: 4096, s = 688, 250k + 50k fine-tuning iterations at 1e-4 / 1e-5 (Sec. 4.1).
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        width=0.25, fc_dim=512, size_factor=0.5, scales=(688,), ss_resize_to=200, ss_base_k=100, ss_inc_k=100,
        pretrain_epochs=12, pretrain_batch=16, pretrain_lr=0.003, background_per_image=1, ft_iterations=1500,
        ft_lr=3e-3, ft_lr_steps=(1000,), workers=2,
    ),
    "paper": dict(
        width=1.0, fc_dim=4096, size_factor=1.0, scales=(688,), ss_resize_to=None, ss_base_k=None, ss_inc_k=150,
        pretrain_epochs=30, pretrain_batch=128, pretrain_lr=0.01, background_per_image=2, ft_iterations=300000,
        ft_lr=1e-4, ft_lr_steps=(250000,), workers=8,
    ),
}  # fmt: skip
_RESUME_MUTABLE = ("workers", "device")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C, once the current stage is checkpointed."""


@dataclass
class DetectConfig:
    """Everything that defines a detection run (saved as ``config.json``); defaults: ``small``.

    Sizes (``scales``, ``target_size``, ``warp`` and pretraining sizes) are in the
    paper's pixels and multiplied by ``size_factor``.
    """

    data: str | None = None  # VOC root or COCO image folder; None: built-in shapes
    format: str = "voc"  # voc | coco
    ann: str | None = None  # COCO annotation JSON
    split: str = "train"  # VOC split to train on
    preset: str = "small"
    method: str = "spp"  # spp | rcnn
    model: str = "zf5"
    width: float = 0.25
    fc_dim: int = 512
    dropout: float = 0.5
    levels: tuple[int, ...] = (1, 2, 3, 6)
    scales: tuple[int, ...] = (688,)
    size_factor: float = 0.5
    target_size: int = 224
    backbone: str | None = None
    # proposals (selective search)
    ss_mode: str = "fast"
    ss_resize_to: int | None = 200
    ss_base_k: int | None = 100
    ss_inc_k: int = 100
    max_proposals: int = 2000
    # backbone pretraining
    pretrain_size: int | None = None  # crop side; None: target_size * size_factor
    pretrain_epochs: int = 12
    pretrain_batch: int = 16
    pretrain_lr: float = 0.003
    background_per_image: int = 1
    # fine-tuning
    finetune: str = "fc"  # fc | all
    ft_iterations: int = 1500
    ft_lr: float = 3e-3
    ft_lr_steps: tuple[int, ...] = (1000,)
    ft_batch: int = 128
    ft_fg_fraction: float = 0.25
    ft_flip: bool = True
    ft_images_per_batch: int | None = None  # None: 8 with cached features (fc), 2 for finetune=all
    checkpoint_every: int = 250
    # SVMs and box regression
    scorer: str = "svm"  # svm | softmax
    svm_C: float = 1e-3
    svm_pos_weight: float = 2.0
    svm_epochs: int = 1
    svm_retrain_limit: int = 2000
    bbox_regression: bool = True
    bbox_iou: float = 0.5
    bbox_lambda: float | None = None
    # held-out split for per-class score thresholds (None: skip; predict then uses 0 / 0.5)
    calibrate_split: str | None = "val"
    # running
    chunk_size: int = 1024
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    strict: bool = False

    @classmethod
    def from_preset(cls, preset: str = "small", **overrides: Any) -> "DetectConfig":
        """The preset's values, then ``overrides`` (``None`` values are ignored)."""
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DetectConfig fields {unknown}")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}, "preset": preset}
        return cls(**values).resolved()

    @classmethod
    def from_dict(cls, d: dict) -> "DetectConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DetectConfig fields {unknown}")
        return cls(**d).resolved()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> "DetectConfig":
        """A validated copy (tuples restored after JSON)."""
        c = dataclasses.replace(
            self, levels=tuple(int(v) for v in self.levels), scales=tuple(int(v) for v in self.scales),
            ft_lr_steps=tuple(int(v) for v in self.ft_lr_steps),
        )  # fmt: skip
        choices = {"format": ("voc", "coco"), "method": METHODS, "finetune": ("fc", "all"), "scorer": SCORERS,
                   "ss_mode": ("fast", "quality", "single")}  # fmt: skip
        if c.ft_images_per_batch is None:
            c.ft_images_per_batch = 8 if c.finetune == "fc" else 2
        for name, allowed in choices.items():
            if getattr(c, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(c, name)!r}")
        if c.model not in list_models():
            raise UserError(f"unknown model {c.model!r}; registered: {', '.join(list_models())}")
        if c.format == "coco" and (c.data is None or c.ann is None):
            raise UserError("--format coco needs --data (image folder) and --ann (annotation JSON)")
        if not (c.size_factor > 0 and math.isfinite(c.size_factor)):
            raise UserError(f"size factor must be a positive number, got {c.size_factor}")
        if not c.scales or any(s < 1 for s in c.scales):
            raise UserError(f"scales must be positive short sides, got {c.scales}")
        for name in ("fc_dim", "ft_iterations", "ft_batch", "pretrain_epochs", "pretrain_batch", "svm_epochs",
                     "chunk_size", "checkpoint_every", "max_proposals", "ft_images_per_batch"):  # fmt: skip
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{name} must be a positive integer, got {v!r}")
        if not 0 < c.ft_fg_fraction <= 1:
            raise UserError(f"ft_fg_fraction must be in (0, 1], got {c.ft_fg_fraction}")
        if c.workers < 0 or c.seed < 0:
            raise UserError(f"workers and seed must be >= 0, got {c.workers} and {c.seed}")
        return c

    # derived sizes
    @property
    def image_scales(self) -> tuple[int, ...]:
        return tuple(max(1, int(round(s * self.size_factor))) for s in self.scales)

    @property
    def window_target(self) -> float:
        return self.target_size * self.size_factor

    @property
    def crop_size(self) -> int:
        return int(self.pretrain_size or round(self.target_size * self.size_factor))

    def selective_search(self) -> SelectiveSearchParams:
        return SelectiveSearchParams(mode=self.ss_mode, base_k=self.ss_base_k, inc_k=self.ss_inc_k,
                                     max_proposals=self.max_proposals, resize_to=self.ss_resize_to, seed=self.seed)


# --------------------------------------------------------------------------- data


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


def _proposals(records: Sequence[dict], cfg: DetectConfig, cache_dir: Path, verbose: bool) -> list[np.ndarray]:
    """Selective search boxes per record (cached); unreadable images give empty arrays."""
    return compute_proposals([r["image_path"] for r in records], cache_dir, cfg.selective_search(),
                             workers=cfg.workers, progress=verbose, skip_errors=not cfg.strict)


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


# ------------------------------------------------------------------------- models


def build_detector(cfg: DetectConfig, num_classes: int, backbone=None, mean=None, std=None) -> SPPDetector:
    """The detector of ``cfg`` around ``backbone`` (default: a fresh ``cfg.model``)."""
    from sppnet.models.detector import IMAGENET_MEAN, IMAGENET_STD

    if backbone is None:
        backbone = get_model(cfg.model, num_classes=num_classes + 1, spp=True, levels=cfg.levels,
                             width=cfg.width, fc_dim=cfg.fc_dim, dropout=cfg.dropout)  # fmt: skip
    return SPPDetector(
        backbone, num_classes, levels=cfg.levels, scales=cfg.image_scales, target_size=cfg.window_target,
        method=cfg.method, chunk_size=cfg.chunk_size, pixel_mean=mean or IMAGENET_MEAN, pixel_std=std or IMAGENET_STD,
    )  # fmt: skip


def _meta(detector: SPPDetector, classes: Sequence[str], cfg: DetectConfig, stage: str) -> dict:
    return {
        "task": "detect", "stage": stage, "model": detector.backbone.name, "model_config": detector.backbone.config(),
        "detector_config": detector.config(), "classes": list(classes), "config": cfg.to_dict(),
    }  # fmt: skip


def _load_into(path: Path, device: torch.device) -> tuple[SPPDetector, dict]:
    state, meta = load_weights(path)
    if meta.get("task") != "detect":
        raise UserError(f"{path} is not a detector (task={meta.get('task')!r})")
    backbone = get_model(meta["model"], **meta["model_config"])
    detector = SPPDetector(backbone, **meta["detector_config"])
    detector.load_state_dict(state)
    return detector.to(device).eval(), meta


def load_detector(
    run: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SPPDetector, list[str], DetectConfig]:
    """``(detector in eval mode, classes, cfg)`` from a run directory or its ``detector.safetensors``."""
    path = Path(run)
    if path.is_dir():
        path = path / "detector.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run} a finished detection run (sppnet detect train --out)?")
    detector, meta = _load_into(path, torch.device(device))
    return detector, list(meta["classes"]), DetectConfig.from_dict(meta["config"])


# ------------------------------------------------------------------------ training


def _stage_order(cfg: DetectConfig) -> list[str]:
    order = ["proposals", "backbone", "features", "finetune"]
    if cfg.finetune == "all":
        order = ["proposals", "backbone", "finetune", "features"]
    return order + ["svm", "bbox", "calibrate"]


def _stage_file(out: Path, stage: str) -> Path:
    suffix = ".json" if stage in ("proposals", "features", "calibrate") else ".safetensors"
    return out / "stages" / f"{stage}{suffix}"


def _check_resume(saved: DetectConfig, given: DetectConfig | None) -> DetectConfig:
    if given is None:
        return saved
    diff = [f"{f.name}: run has {getattr(saved, f.name)!r}, given {getattr(given, f.name)!r}"
            for f in dataclasses.fields(DetectConfig)
            if f.name not in _RESUME_MUTABLE + ("preset",) and getattr(saved, f.name) != getattr(given, f.name)]
    if diff:
        raise UserError("cannot change these settings when resuming: " + "; ".join(diff))
    return dataclasses.replace(saved, **{k: getattr(given, k) for k in _RESUME_MUTABLE})


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
        cfg = _check_resume(DetectConfig.from_dict(load_json(out / "config.json")), cfg)
    else:
        cfg = (cfg or DetectConfig()).resolved()
        if (out / "config.json").exists():
            raise UserError(
                f"{out} already holds a detection run; pass --resume to continue it or choose another --out"
            )
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", cfg.to_dict())
    if stop_after is not None and stop_after not in _stage_order(cfg):
        raise ValueError(f"stop_after must be one of {_stage_order(cfg)}, got {stop_after!r}")
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    try:
        _run_stages(cfg, out, device, verbose, stop_after)
    except (FinetuneInterrupted, TrainingInterrupted, KeyboardInterrupt) as e:
        print(f"\ninterrupted ({e or 'Ctrl-C'}): progress is saved in {out}\n"
              f"resume with: sppnet detect train --out {out} --resume", file=sys.stderr)
        raise TrainingInterrupted(str(e)) from None
    return out


def training_set(
    cfg: DetectConfig, out: str | os.PathLike, verbose: bool = True
) -> tuple[list[dict], list[WindowSet], list[str]]:
    """``(records, windows, classes)`` of a run's training split: the images that
    could be read, their proposals plus ground truth as labelled windows
    (:func:`~sppnet.engine.det_features.build_windows`). Proposals come from the
    run's cache (``out/cache/proposals``) once computed."""
    data = open_detection_data(cfg.data, cfg.format, cfg.ann, cfg.split, None, cfg.strict)
    classes = list(data.class_names)
    if verbose and (data.skipped_images or data.skipped_objects):
        print(data.summary(), file=sys.stderr)
    records = list(data.records)
    props = _proposals(records, cfg, Path(out) / "cache" / "proposals", verbose)
    records, props = _drop_unreadable(records, props, verbose)
    windows = [build_windows(p, r, len(classes)) for p, r in zip(props, records)]
    return records, windows, classes


def feature_cache(cfg: DetectConfig, out: str | os.PathLike, detector: SPPDetector, records, windows) -> FeatureCache:
    """The run's cache of conv5 (SPP) or warped-window pool5 (R-CNN) features."""
    return FeatureCache(detector, records, windows, Path(out) / "cache" / "features", flips=cfg.ft_flip)


def stage_detector(out: str | os.PathLike, stage: str, device: str | torch.device = "cpu") -> SPPDetector:
    """The detector as saved after ``stage`` (``backbone``, ``finetune``, ``svm`` or ``bbox``) of a run."""
    path = _stage_file(Path(out), stage)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} does not exist: stage {stage!r} of {out} has not finished")
    return _load_into(path, torch.device(device))[0]


def _run_stages(cfg: DetectConfig, out: Path, device: torch.device, verbose: bool, stop_after: str | None) -> None:
    def say(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr)

    # 1. proposals
    with Timer() as t:
        records, windows, classes = training_set(cfg, out, verbose)
    if not _stage_file(out, "proposals").is_file():
        save_json(_stage_file(out, "proposals"), {**describe(windows), "seconds": round(t.seconds, 2)})
        save_json(out / "stages" / "times.json", {"proposals": round(t.seconds, 2)})
    say(f"proposals: {describe(windows)}")
    stages = _stage_order(cfg)
    done = [s for s in stages if _stage_file(out, s).is_file()]
    if stop_after == "proposals":
        return

    detector = None
    for stage in stages[1:]:
        path = _stage_file(out, stage)
        if path.is_file():
            if path.suffix == ".safetensors":
                detector = None  # load lazily: a later weight file supersedes it
            if stage == stop_after:
                return
            continue
        if detector is None:
            detector = _latest_detector(out, stages, stage, device) if "backbone" in done else None
        with Timer() as t:
            detector = _STAGES[stage](cfg, out, device, records, windows, classes, detector, verbose)
        if path.suffix == ".safetensors":
            save_weights(path, detector, _meta(detector, classes, cfg, stage))
        else:
            save_json(path, {"seconds": round(t.seconds, 2)})
        done.append(stage)
        times_path = out / "stages" / "times.json"
        times = load_json(times_path) if times_path.is_file() else {}
        save_json(times_path, {**times, stage: round(t.seconds, 2)})
        say(f"stage {stage} finished in {t.seconds:.1f} s")
        if stage == stop_after:
            return
    if detector is None:
        detector = _latest_detector(out, stages, None, device)
    save_weights(out / "detector.safetensors", detector, _meta(detector, classes, cfg, "final"))
    say(f"detector written to {out / 'detector.safetensors'}")


def _latest_detector(out: Path, stages: list[str], before: str | None, device: torch.device) -> SPPDetector:
    """The detector saved by the last finished weight stage before ``before``."""
    upto = stages if before is None else stages[: stages.index(before)]
    for stage in reversed(upto):
        path = _stage_file(out, stage)
        if path.suffix == ".safetensors" and path.is_file():
            return _load_into(path, device)[0]
    raise UserError(f"{out}: no finished backbone stage to continue from")


def pretrain_config(cfg: DetectConfig):
    """The :class:`~sppnet.engine.classify.ClassifyConfig` of the backbone
    pretraining: the detector's architecture, multi-size training of window crops."""
    from sppnet.engine.classify import ClassifyConfig

    return ClassifyConfig(
        model=cfg.model, spp=True, levels=cfg.levels, width=cfg.width, fc_dim=cfg.fc_dim, dropout=cfg.dropout,
        size=cfg.crop_size, small_size=None, schedule="multi", epochs=cfg.pretrain_epochs,
        batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
        lr_steps=(int(cfg.pretrain_epochs * 5 / 6), int(cfg.pretrain_epochs * 11 / 12)),
        seed=cfg.seed, workers=min(cfg.workers, 1), device=cfg.device, preset=cfg.preset,
        cache_images=False,  # the crops are already in memory; a loader worker prepares the batches
    ).resolved()  # fmt: skip


def _stage_backbone(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    if cfg.backbone is not None:
        model, model_classes, mean, std = load_backbone(cfg.backbone)
    else:
        crops = window_crops(records, windows, classes, cfg.crop_size, cfg.background_per_image, cfg.seed)
        ccfg = pretrain_config(cfg)
        if verbose:
            print(f"pretraining the backbone on {len(crops)} windows "
                  f"({sum(1 for lab in crops.labels if lab == len(classes))} background)", file=sys.stderr)
        try:
            pretrain_backbone(crops, ccfg, out / "backbone", verbose)
        except KeyboardInterrupt as e:
            raise TrainingInterrupted("backbone pretraining interrupted") from e
        model, model_classes, mean, std = load_backbone(out / "backbone")
    seed_everything(cfg.seed)
    det = build_detector(cfg, len(classes), model, mean, std).to(device)
    init_fc8_from_classifier(det, model, model_classes, classes)
    return det


def _stage_features(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    cache = feature_cache(cfg, out, detector, records, windows)
    interrupt = GracefulInterrupt()
    with interrupt:
        cache.ensure(lambda it, **kw: progress(it, enabled=verbose, **kw), lambda: interrupt.requested)
    if not cache.complete():
        raise TrainingInterrupted("feature caching interrupted")
    return detector


def _stage_finetune(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    fcfg = FinetuneConfig(
        mode=cfg.finetune, iterations=cfg.ft_iterations, lr=cfg.ft_lr, lr_steps=cfg.ft_lr_steps,
        batch_size=cfg.ft_batch, fg_fraction=cfg.ft_fg_fraction, flip=cfg.ft_flip,
        images_per_batch=cfg.ft_images_per_batch, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed,
    )  # fmt: skip
    cache = feature_cache(cfg, out, detector, records, windows)
    finetune(detector, cache, records, windows, fcfg, out, verbose)
    return detector


@torch.no_grad()
def _stage_svm(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    if cfg.scorer != "svm":
        return detector
    detector.eval()
    cache = feature_cache(cfg, out, detector, records, windows)

    def features(i: int) -> torch.Tensor:
        return detector.fc7(cache.pool5(i, torch.arange(len(windows[i])))).cpu()

    positives = [torch.where(w.is_gt & ~w.difficult, w.label, torch.full_like(w.label, -1)) for w in windows]
    ckpt = out / "svm_last.safetensors"
    state = load_state(ckpt) if ckpt.is_file() else None
    scfg = SVMConfig(
        C=cfg.svm_C, pos_weight=cfg.svm_pos_weight, epochs=cfg.svm_epochs, retrain_limit=cfg.svm_retrain_limit
    )
    interrupt = GracefulInterrupt()

    def on_epoch(s: dict) -> None:
        save_state(ckpt, s)
        if interrupt.requested and s["epoch"] < scfg.epochs:
            raise TrainingInterrupted(f"SVM training interrupted after epoch {s['epoch']}")

    with interrupt:
        result = train_svms(
            len(windows), features, [w.overlaps for w in windows], positives, len(classes), scfg,
            progress=lambda it, **kw: progress(it, enabled=verbose, **kw), state=state, on_epoch=on_epoch,
        )  # fmt: skip
    detector.svm_weight.copy_(result.weight)
    detector.svm_bias.copy_(result.bias)
    detector.svm_feature_scale.fill_(result.feature_scale)
    detector.trained_heads[0] = True
    if verbose:
        print(f"SVMs: {result.retrains} retrains, positives {result.positives}, "
              f"hard negatives {[len(n) for n in result.negatives]}", file=sys.stderr)
    return detector


@torch.no_grad()
def _stage_bbox(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    if not cfg.bbox_regression:
        return detector
    detector.eval()
    cache = feature_cache(cfg, out, detector, records, windows)
    feats: list[list[torch.Tensor]] = [[] for _ in classes]
    targets: list[list[torch.Tensor]] = [[] for _ in classes]
    for i in progress(range(len(windows)), desc="box regression", total=len(windows), enabled=verbose):
        w = windows[i]
        idx = (w.max_overlap >= cfg.bbox_iou).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        pool5 = cache.pool5(i, idx).cpu()
        deltas = encode_boxes(w.boxes[idx], w.gt_boxes[w.gt_index[idx]])
        for c in w.label[idx].unique().tolist():
            sel = w.label[idx] == c
            feats[c].append(pool5[sel])
            targets[c].append(deltas[sel])
    dim = detector.pooled_dim
    x = [torch.cat(f) if f else torch.zeros((0, dim)) for f in feats]
    y = [torch.cat(t) if t else torch.zeros((0, 4)) for t in targets]
    scale = feature_scale(torch.cat(x), 20.0)
    weight, bias = train_box_regressors(x, y, scale, cfg.bbox_lambda)
    detector.bbox_weight.copy_(weight)
    detector.bbox_bias.copy_(bias)
    detector.bbox_feature_scale.fill_(scale)
    detector.trained_heads[1] = True
    return detector


def _calibration_overlap(train_split: str, split: str) -> bool:
    """Whether a VOC split shares images with the training split (by the standard names)."""
    if split == train_split:
        return True
    parts = {"trainval": {"train", "val"}}
    return bool(parts.get(train_split, {train_split}) & parts.get(split, {split}))


def _stage_calibrate(cfg, out, device, records, windows, classes, detector, verbose) -> SPPDetector:
    split = cfg.calibrate_split
    reason = None
    if split is None:
        reason = "calibrate_split is None"
    elif cfg.format != "voc":
        reason = f"{cfg.format} data has no splits; run 'sppnet detect calibrate --run {out} --ann VAL.json'"
    elif _calibration_overlap(cfg.split, split):
        reason = f"split {split!r} overlaps the training split {cfg.split!r}"
    if reason is None:
        try:
            held_out, props = split_proposals(cfg, out, split, classes, verbose=verbose)
        except (UserError, OSError, ValueError) as e:
            reason = f"no usable {split!r} split ({e})"
    if reason is not None:
        if verbose:
            print(f"calibration skipped: {reason}; predict keeps scores above "
                  f"{_default_threshold(_usable_scorer(cfg.scorer, detector))}", file=sys.stderr)
        return detector
    _calibrate(detector, out, cfg, held_out, props, classes, _usable_scorer(cfg.scorer, detector), split, verbose)
    return detector


_STAGES = {"backbone": _stage_backbone, "features": _stage_features, "finetune": _stage_finetune,
           "svm": _stage_svm, "bbox": _stage_bbox, "calibrate": _stage_calibrate}  # fmt: skip


# ----------------------------------------------------------------------- testing


def evaluate(
    detector: SPPDetector,
    records: Sequence[dict],
    class_names: Sequence[str],
    proposals: Sequence[np.ndarray],
    scorer: str = "svm",
    bbox_regression: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Scores every window, NMS 0.3, <= 100 per image; VOC07 mAP and seconds per image.

    ``seconds_per_image`` times :meth:`SPPDetector.detect` (features, scoring,
    regression, NMS), not the proposals or the image decoding, as in Table 9.

    Returns:
        ``{"mAP", "ap": {class: AP}, "images", "seconds_per_image", "predictions"}``.
    """
    predictions, ground_truths, seconds = [], [], 0.0
    for r, p in progress(list(zip(records, proposals)), desc="detect", total=len(records), enabled=verbose):
        image = load_record_image(r)
        with Timer() as t:
            det = detector.detect([image], [torch.as_tensor(p)], scorer=scorer, bbox_regression=bbox_regression)[0]
        seconds += t.seconds
        predictions.append(det)
        ground_truths.append({"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]})
    result = evaluate_detections(predictions, ground_truths, class_names, 0.5, "voc07")
    return {"mAP": result["mAP"], "ap": result["ap"], "images": len(records),
            "seconds_per_image": seconds / max(len(records), 1), "predictions": predictions}  # fmt: skip


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
    props = _proposals(ds.records, cfg, Path(run) / "cache" / "proposals", verbose)
    return _drop_unreadable(list(ds.records), props, verbose)


def _default_threshold(scorer: str) -> float:
    """The uncalibrated cut-off: the SVMs' decision boundary, or softmax 0.5."""
    return 0.0 if scorer == "svm" else 0.5


def _usable_scorer(asked: str, detector: SPPDetector) -> str:
    """``asked``, except softmax when SVM scores are asked of a detector without trained SVMs."""
    return "softmax" if asked == "svm" and not bool(detector.trained_heads[0]) else asked


def _test_data(
    cfg: DetectConfig, data: str | None, fmt: str | None, ann: str | None
) -> tuple[str | None, str, str | None]:
    """``(data, format, ann)`` to test on: the run's data and format unless ``data`` or
    ``fmt`` is given; ``ann`` as given (a COCO run's held-out annotation file)."""
    if data is None and fmt is None:
        return cfg.data, cfg.format, ann
    return data, fmt or "voc", ann


def _calibrate(
    detector: SPPDetector, run: Path, cfg: DetectConfig, records: Sequence[dict], proposals: Sequence[np.ndarray],
    classes: Sequence[str], scorer: str, split: str, verbose: bool,
) -> dict[str, Any]:  # fmt: skip
    result = evaluate(detector, records, classes, proposals, scorer, cfg.bbox_regression, verbose)
    gts = [{"boxes": r["boxes"], "labels": r["labels"], "difficult": r["difficult"]} for r in records]
    points = best_f1_thresholds(precision_recall(result["predictions"], gts, classes))
    default = _default_threshold(scorer)
    payload = {
        "split": split, "scorer": scorer, "images": len(records), "default": default,
        "thresholds": {c: (p["threshold"] if p["threshold"] is not None else default) for c, p in points.items()},
        "operating_points": points, "mAP": result["mAP"],
    }  # fmt: skip
    save_json(Path(run) / "thresholds.json", json_safe(payload))
    if verbose:
        mean_f1 = [p["f1"] for p in points.values() if p["f1"] is not None]
        print(f"calibrated score thresholds on {len(records)} {split!r} images "
              f"(mean best F1 {np.mean(mean_f1) if mean_f1 else float('nan'):.3f}): {Path(run) / 'thresholds.json'}",
              file=sys.stderr)  # fmt: skip
    return payload


def calibrate(
    run: str | os.PathLike,
    data: str | None = None,
    split: str = "val",
    fmt: str | None = None,
    ann: str | None = None,
    scorer: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Per-class score thresholds at the best F1 on a held-out split; writes ``run/thresholds.json``.

    :func:`predict` keeps, per class, the detections scoring above these
    thresholds (unless given ``score_threshold``). Use images the detector was
    not trained on: on training images the SVM scores are optimistic.

    Returns:
        ``{"split", "scorer", "images", "default", "thresholds": {class: float},
        "operating_points": {class: {"threshold", "f1", "precision", "recall"}}, "mAP"}``;
        a class without objects or detections in the split keeps ``default``
        (0 for SVM scores, 0.5 for softmax).
    """
    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, None)
    data, fmt, ann = _test_data(cfg, data, fmt, ann)
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    if data == cfg.data and fmt == "voc" and _calibration_overlap(cfg.split, split):
        print(f"warning: split {split!r} overlaps the training split {cfg.split!r}: thresholds calibrated on "
              "training images are optimistic (too high); prefer held-out images", file=sys.stderr)
    records, props = split_proposals(cfg, run, split, classes, data, fmt, ann, verbose)
    return _calibrate(detector, Path(run), cfg, records, props, classes, scorer, split, verbose)


def run_thresholds(run: str | os.PathLike, classes: Sequence[str], scorer: str) -> torch.Tensor | None:
    """The run's calibrated per-class thresholds (``thresholds.json``) for ``scorer``, or None."""
    path = Path(run) / "thresholds.json"
    if not path.is_file():
        return None
    saved = load_json(path)
    if saved.get("scorer") != scorer:
        return None
    values = saved.get("thresholds") or {}
    missing = [c for c in classes if not isinstance(values.get(c), (int, float))]
    if missing:
        raise UserError(f"{path} has no threshold for classes {missing}; rerun 'sppnet detect calibrate --run {run}'")
    return torch.tensor([float(values[c]) for c in classes])


def _load_for_testing(
    run: str | os.PathLike, device: str, scorer: str | None, svd_rank: int | Sequence[int] | None
) -> tuple[SPPDetector, list[str], DetectConfig, str]:
    """The run's detector (fc6 / fc7 SVD-compressed at ``svd_rank`` if given) and
    the scorer to use: the asked one, else the run's; softmax when no SVMs were trained."""
    detector, classes, cfg = load_detector(run, resolve_device(device))
    if svd_rank is not None:
        detector.compress_fc(svd_rank)
    return detector, classes, cfg, _usable_scorer(scorer or cfg.scorer, detector)


def val(
    run: str | os.PathLike,
    data: str | None = None,
    split: str = "test",
    fmt: str | None = None,
    ann: str | None = None,
    scorer: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    verbose: bool = True,
    svd_rank: int | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Evaluates a trained run on a split (default: the training data's ``test`` split).

    ``svd_rank``: test with fc6 / fc7 replaced by their truncated SVD
    (:meth:`SPPDetector.compress_fc`; an int for both or ``(r6, r7)``).
    """
    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, svd_rank)
    data, fmt, ann = _test_data(cfg, data, fmt, ann)
    if workers is not None:
        cfg = dataclasses.replace(cfg, workers=workers)
    records, props = split_proposals(cfg, run, split, classes, data, fmt, ann, verbose)
    result = evaluate(detector, records, classes, props, scorer, cfg.bbox_regression, verbose)
    result.pop("predictions")
    result["scorer"] = scorer
    return result


def predict(
    run: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    score_threshold: float | None = None,
    scorer: str | None = None,
    device: str = "auto",
    verbose: bool = True,
    svd_rank: int | Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Detects objects in image files; writes ``<name>.png`` (boxes drawn) and ``<name>.json`` per image.

    ``score_threshold``: one value for every class, or one per class; default:
    the run's calibrated per-class thresholds (``thresholds.json``, see
    :func:`calibrate`) when they exist for the scorer, else 0 for SVM scores (the
    SVM's decision boundary) and 0.5 for softmax probabilities. ``svd_rank``:
    as in :func:`val`.
    """
    from sppnet.viz.detections import draw_detections

    detector, classes, cfg, scorer = _load_for_testing(run, device, scorer, svd_rank)
    if score_threshold is not None:
        threshold = score_threshold
    else:
        calibrated = run_thresholds(run, classes, scorer)
        threshold = calibrated if calibrated is not None else _default_threshold(scorer)
    if isinstance(threshold, (int, float)):
        described: float | dict[str, float] = float(threshold)
    else:
        values = torch.as_tensor(threshold, dtype=torch.float32).reshape(-1)
        if len(values) != len(classes):
            raise UserError(f"score_threshold needs one value per class ({len(classes)}: {', '.join(classes)}), "
                            f"got {len(values)}")
        described = {c: float(v) for c, v in zip(classes, values.tolist())}
    out = Path(out) if out is not None else Path(run) / "predict"
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in images]
    for p in paths:
        if not p.is_file():
            raise UserError(f"image {p} does not exist")
    props = compute_proposals(paths, Path(run) / "cache" / "proposals", cfg.selective_search(),
                              workers=min(cfg.workers, len(paths)), progress=verbose)
    results = []
    for path, boxes in zip(paths, props):
        img = load_image(path)
        det = detector.detect([pil_to_tensor(img)], [torch.as_tensor(boxes)], scorer=scorer,
                              score_threshold=threshold)[0]  # fmt: skip
        entry = {
            "image": str(path), "width": img.width, "height": img.height, "scorer": scorer,
            "score_threshold": described,
            "detections": [
                {"box": [float(v) for v in b], "label": classes[int(c)], "label_index": int(c), "score": float(s)}
                for b, c, s in zip(det["boxes"].tolist(), det["labels"].tolist(), det["scores"].tolist())
            ],
        }  # fmt: skip
        stem = path.stem
        draw_detections(img, det["boxes"], det["labels"], det["scores"], classes, out / f"{stem}.png")
        save_json(out / f"{stem}.json", entry)
        entry["png"], entry["json"] = str(out / f"{stem}.png"), str(out / f"{stem}.json")
        results.append(entry)
    return results


def json_safe(result: dict[str, Any]) -> dict[str, Any]:
    """NaN (a class without test objects) -> None, so that ``json.dumps`` writes valid JSON."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and math.isnan(v):
            return None
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return json.loads(json.dumps(fix(result)))
