"""The detector of a config, and the detectors saved in a run directory.

* :func:`build_detector`: an :class:`~sppnet.models.detector.SPPDetector` from a :class:`DetectConfig`.
* :func:`save_detector` / :func:`load_detector` / :func:`stage_detector`: safetensors
  files holding the weights and, as JSON meta, everything that rebuilds the
  detector (model name and config, detector config, classes, run config).
* :func:`heads_trained` / :func:`mark_trained`: which of the detector's heads (SVMs,
  box regressors) hold trained weights.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from sppnet.engine.common import UserError, load_weights, save_weights
from sppnet.engine.detect.config import DetectConfig
from sppnet.models import get_model
from sppnet.models.detector import IMAGENET_MEAN, IMAGENET_STD, SPPDetector

__all__ = [
    "HEADS",
    "build_detector",
    "heads_trained",
    "load_detector",
    "load_detector_file",
    "mark_trained",
    "save_detector",
    "stage_detector",
    "stage_file",
]

#: The heads trained after fine-tuning, in the order of ``SPPDetector.trained_heads``.
HEADS = ("svm", "bbox")


def heads_trained(detector: SPPDetector) -> dict[str, bool]:
    """``{"svm": bool, "bbox": bool}``: whether those heads were trained."""
    return {name: bool(detector.trained_heads[k]) for k, name in enumerate(HEADS)}


def mark_trained(detector: SPPDetector, head: str) -> None:
    """Records that ``head`` (``"svm"`` or ``"bbox"``) holds trained weights."""
    detector.trained_heads[HEADS.index(head)] = True


def build_detector(
    cfg: DetectConfig,
    num_classes: int,
    backbone=None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> SPPDetector:
    """The detector of ``cfg`` around ``backbone`` (default: a fresh ``cfg.backbone.model``)."""
    b, f = cfg.backbone, cfg.features
    if backbone is None:
        backbone = get_model(
            b.model,
            num_classes=num_classes + 1,
            spp=True,
            levels=f.levels,
            width=b.width,
            fc_dim=b.fc_dim,
            dropout=b.dropout,
        )
    return SPPDetector(
        backbone,
        num_classes,
        levels=f.levels,
        scales=cfg.image_scales,
        target_size=cfg.window_target,
        method=cfg.method,
        chunk_size=f.chunk_size,
        pixel_mean=mean or IMAGENET_MEAN,
        pixel_std=std or IMAGENET_STD,
    )


def save_detector(
    path: str | os.PathLike, detector: SPPDetector, classes: Sequence[str], cfg: DetectConfig, stage: str
) -> None:
    """The detector's weights plus what rebuilds it, atomically."""
    meta = {
        "task": "detect",
        "stage": stage,
        "model": detector.backbone.name,
        "model_config": detector.backbone.config(),
        "detector_config": detector.config(),
        "classes": list(classes),
        "config": cfg.to_dict(),
    }
    save_weights(path, detector, meta)


def load_detector_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[SPPDetector, dict]:
    """``(detector in eval mode, meta)`` from a file written by :func:`save_detector`."""
    state, meta = load_weights(path)
    if meta.get("task") != "detect":
        raise UserError(f"{path} is not a detector (task={meta.get('task')!r})")
    backbone = get_model(meta["model"], **meta["model_config"])
    detector = SPPDetector(backbone, **meta["detector_config"])
    detector.load_state_dict(state)
    return detector.to(torch.device(device)).eval(), meta


def load_detector(
    run: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[SPPDetector, list[str], DetectConfig]:
    """``(detector in eval mode, classes, cfg)`` from a run directory or its ``detector.safetensors``."""
    path = Path(run)
    if path.is_dir():
        path = path / "detector.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {run} a finished detection run (sppnet detect train --out)?")
    detector, meta = load_detector_file(path, device)
    return detector, list(meta["classes"]), DetectConfig.from_dict(meta["config"])


def stage_file(out: str | os.PathLike, stage: str) -> Path:
    """Where a run records a finished stage: the detector after it, or a JSON note."""
    suffix = ".json" if stage in ("proposals", "features", "calibrate") else ".safetensors"
    return Path(out) / "stages" / f"{stage}{suffix}"


def stage_detector(out: str | os.PathLike, stage: str, device: str | torch.device = "cpu") -> SPPDetector:
    """The detector as saved after ``stage`` (``backbone``, ``finetune``, ``svm`` or ``bbox``) of a run."""
    path = stage_file(out, stage)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} does not exist: stage {stage!r} of {out} has not finished")
    return load_detector_file(path, device)[0]
