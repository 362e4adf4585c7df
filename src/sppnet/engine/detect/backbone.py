"""The detector's backbone: pretrained here as a classifier of windows.

The paper's conv layers and fc6/fc7 come pretrained on ImageNet; those weights
cannot be had here. The substitute (documented in the README): pretrain the same
network as a (K+1)-way classifier of WINDOWS of the detection training set --
the ground-truth objects of the K classes (non-difficult), by default with
up to 4 proposals of IoU >= 0.5 per object (R-CNN's positives, jittered views of
the object), plus background windows (selective-search proposals with IoU < 0.3
with every object) -- with
the classification engine (:mod:`sppnet.engine.classify`), i.e. the paper's
multi-size training (Sec. 2.3). Each window is cut with R-CNN's 16/224 context
margin and warped to a square, which is what the pyramid does to a window on
the feature map.

Or a backbone trained elsewhere: ``--backbone`` takes a classification run
(``sppnet classify train``) or its ``model.safetensors``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from sppnet.data.images import load_image
from sppnet.data.transforms import resize_side
from sppnet.engine.common import UserError
from sppnet.engine.detect.config import CROP_CHOICES, PRETRAIN_LR, DetectConfig
from sppnet.engine.detect.features import WindowSet

__all__ = [
    "BACKGROUND",
    "WindowCrops",
    "init_fc8_from_classifier",
    "load_backbone",
    "pretrain_backbone",
    "learned",
    "pretrain_config",
    "pretrain_runs",
    "prior_loss",
    "select_windows",
    "window_crops",
]

BACKGROUND = "__background__"
CONTEXT = 16 / 224  # R-CNN's context padding (16 px around a 224 warp), per side


class WindowCrops(Dataset):
    """``(PIL.Image RGB, label)`` pairs cut from the images on access.

    The decoded images are kept in a least-recently-used cache of at most
    ``max_image_bytes`` (per process: each loader worker has its own), so a
    pretraining epoch decodes each image once rather than once per crop (R-CNN
    crops: about 20 per image; a decode costs 4x the cut).

    Args:
        items: ``(image path, inclusive box, label)`` per crop.
        side: crops are warped to ``side x side``.
        classes: ``classes[label]`` names a label.
        max_image_bytes: RAM for decoded images (0: decode on every access).
    """

    def __init__(
        self,
        items: list[tuple[str, tuple[float, ...], int]],
        side: int,
        classes: Sequence[str],
        max_image_bytes: int = 256 << 20,
    ) -> None:
        self.items, self.side, self.classes = items, int(side), list(classes)
        self.max_image_bytes = int(max_image_bytes)
        self._images: OrderedDict[str, Image.Image] = OrderedDict()
        self._bytes = 0

    def __getstate__(self) -> dict:  # a loader worker starts with an empty cache
        state = dict(self.__dict__)
        state["_images"], state["_bytes"] = OrderedDict(), 0
        return state

    @property
    def labels(self) -> list[int]:
        return [label for _, _, label in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path, box, label = self.items[index]
        return _cut(self._image(path), box, self.side), label

    def _image(self, path: str) -> Image.Image:
        img = self._images.get(path)
        if img is not None:
            self._images.move_to_end(path)
            return img
        img = load_image(path)
        size = img.width * img.height * len(img.getbands())
        if size <= self.max_image_bytes:
            self._images[path] = img
            self._bytes += size
            while self._bytes > self.max_image_bytes:
                _, old = self._images.popitem(last=False)
                self._bytes -= old.width * old.height * len(old.getbands())
        return img


def _cut(img: Image.Image, box: Sequence[float], side: int) -> Image.Image:
    """The inclusive box with ``CONTEXT`` margin (clipped to the image), warped to ``side x side``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    w, h = x2 - x1 + 1, y2 - y1 + 1
    left, top = max(0.0, x1 - CONTEXT * w), max(0.0, y1 - CONTEXT * h)
    right, bottom = min(img.width, x2 + 1 + CONTEXT * w), min(img.height, y2 + 1 + CONTEXT * h)
    return img.resize((side, side), Image.Resampling.BILINEAR, box=(left, top, right, bottom))


def window_crops(
    records: Sequence[dict],
    windows: Sequence[WindowSet],
    classes: Sequence[str],
    size: int,
    background_per_image: int = 2,
    seed: int = 0,
    crops: str = "gt",
    per_object: int = 4,
    bg_ratio: float = 1.0,
) -> WindowCrops:
    """Objects and background windows of the training images as a classification set.

    Labels: ``0..K-1`` the classes, ``K`` background; difficult objects are
    left out. ``crops="gt"``: each object's box, and ``background_per_image``
    windows per image drawn (seeded per image) among those whose IoU with every
    object is below 0.3. ``crops="proposals"`` (R-CNN's fine-tuning windows, Sec.
    3.3 of the R-CNN paper, as a classification set): :func:`select_windows`.
    Crops are ``resize_side(size)`` squares, so the classification transform's
    ``size`` crops cut off only part of the context margin.
    """
    if crops not in CROP_CHOICES:
        raise ValueError(f"crops must be one of {CROP_CHOICES}, got {crops!r}")
    items: list[tuple[str, tuple[float, ...], int]] = []
    k = len(classes)
    for i, (record, w) in enumerate(zip(records, windows)):
        path = str(record["image_path"])
        if crops == "proposals":
            rows, labels = select_windows(w, per_object, bg_ratio, np.random.default_rng([seed, 0xC0, i]))
            items += [(path, tuple(w.boxes[r].tolist()), k if c < 0 else c) for r, c in zip(rows, labels)]
            continue
        for box, label, difficult in zip(w.gt_boxes.tolist(), record["labels"].tolist(), record["difficult"].tolist()):
            if not difficult:
                items.append((path, tuple(box), int(label)))
        bg = (w.max_overlap < 0.3).nonzero().squeeze(1)
        if len(bg) and background_per_image > 0:
            rng = np.random.default_rng([seed, 0xB6, i])
            pick = rng.choice(len(bg), size=min(background_per_image, len(bg)), replace=False)
            items += [(path, tuple(w.boxes[bg[j]].tolist()), k) for j in sorted(pick.tolist())]
    if not items:
        raise UserError("no objects or background windows to pretrain the backbone on")
    return WindowCrops(items, resize_side(size), [*classes, BACKGROUND])


def select_windows(
    w: WindowSet, per_object: int, bg_ratio: float, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """R-CNN-style pretraining windows of one image: rows of ``w`` and their labels.

    For each non-difficult object: its ground-truth row and up to ``per_object``
    proposals (not ground-truth rows) whose best-overlapping object it is, at
    IoU >= 0.5, drawn with ``rng``, labelled with its class. Then
    ``round(bg_ratio * F)`` background windows (label ``-1``; ``F`` the image's
    object crops), drawn among the windows of IoU < 0.3 with every object.

    Returns:
        ``(rows, labels)``: the foreground rows in object order, then the
        background rows in ascending order.
    """
    rows: list[int] = []
    labels: list[int] = []
    for g in range(len(w.gt_boxes)):  # row g is object g (build_windows)
        if bool(w.difficult[g]):
            continue
        near = ((w.gt_index == g) & (w.max_overlap >= 0.5) & ~w.is_gt).nonzero().squeeze(1)
        if len(near) > per_object:
            near = near[torch.from_numpy(np.sort(rng.choice(len(near), per_object, replace=False)))]
        picked = [g, *near.tolist()]
        rows += picked
        labels += [int(w.label[g])] * len(picked)
    bg = (w.max_overlap < 0.3).nonzero().squeeze(1)
    n_bg = min(len(bg), round(bg_ratio * len(rows)))
    if n_bg:
        rows += bg[torch.from_numpy(np.sort(rng.choice(len(bg), n_bg, replace=False)))].tolist()
        labels += [-1] * n_bg
    return rows, labels


def pretrain_config(cfg: DetectConfig, recipe: str | None = None):
    """The :class:`~sppnet.engine.classify.ClassifyConfig` of the backbone pretraining:
    the detector's architecture (from ``--weights``, ``--freeze`` stages fixed), multi-size
    training of window crops, lr / 10 at 5/6 and 11/12 of the epochs.

    ``recipe`` (default ``--pretrain-recipe``; ``auto`` means its first try, ``paper``):
    ``paper`` trains with :data:`~sppnet.engine.classify.config.PAPER_RECIPE` (LRN, SGD,
    the paper's crops); ``modern`` with the classification defaults (batch norm after
    every conv and fc layer, AdamW with a one-epoch warm-up, random-resized crops of
    the window, colour jitter). Either way the epochs are fixed (the windows have no
    validation split).
    """
    from sppnet.engine.classify import ClassifyConfig
    from sppnet.engine.classify.config import PAPER_RECIPE

    b = cfg.backbone
    recipe = recipe or b.recipe
    if recipe == "auto":
        recipe = AUTO_RECIPES[0]
    if recipe not in ("paper", "modern"):
        raise ValueError(f"recipe must be paper or modern, got {recipe!r}")
    # modern: without the auxiliary classifier of the classification defaults, which was
    # measured on classification only (seventeenth session); the detector's pretraining is as before
    settings = dict(PAPER_RECIPE) if recipe == "paper" else {"aux_weight": 0.0}
    settings["lr_schedule"] = "steps"
    return ClassifyConfig(
        **settings,
        model=b.model,
        spp=True,
        levels=cfg.features.levels,
        width=b.width,
        fc_dim=b.fc_dim,
        dropout=b.dropout,
        weights=b.weights,
        freeze=b.freeze,
        mean=b.mean,
        std=b.std,
        size=cfg.crop_size,
        small_size=None,
        schedule="multi",
        epochs=b.epochs,
        batch_size=b.batch_size,
        lr=b.lr if b.lr is not None else PRETRAIN_LR[recipe],
        lr_steps=(max(1, int(b.epochs * 5 / 6)), max(1, int(b.epochs * 11 / 12))),  # never before epoch 1
        seed=cfg.seed,
        workers=min(cfg.workers, 1),
        device=cfg.device,
        preset=cfg.preset,
        cache_images=False,  # WindowCrops keeps the decoded images; a loader worker cuts the crops
        limits=cfg.limits,
    ).resolved()


#: ``--pretrain-recipe auto`` tries these in order: the next one when a pretraining did not learn.
AUTO_RECIPES = ("paper", "modern")
#: A pretraining "did not learn" when its last epoch's training loss is above this
#: fraction of the loss of predicting the crops' class frequencies (their entropy).
PLATEAU_FRACTION = 0.8


def prior_loss(labels: Sequence[int]) -> float:
    """The cross-entropy of always predicting the label frequencies: the entropy of ``labels`` (nats)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def final_train_loss(run: str | os.PathLike) -> float | None:
    """The training loss of the last epoch in a classification run's ``metrics.csv`` (None: no epoch)."""
    import csv

    path = Path(run) / "metrics.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["train_loss"]) if rows else None


def pretrain_runs(cfg: DetectConfig, out: str | os.PathLike) -> list[tuple[str, Path]]:
    """``(recipe, run directory)`` of each pretraining ``--pretrain-recipe`` may try, in order."""
    recipes = AUTO_RECIPES if cfg.backbone.recipe == "auto" else (cfg.backbone.recipe,)
    out = Path(out)
    return [(r, out / "backbone" if k == 0 else out / f"backbone-{r}") for k, r in enumerate(recipes)]


def learned(run: str | os.PathLike, labels: Sequence[int]) -> tuple[bool, float | None, float]:
    """``(learned, final loss, prior loss)``: whether the run's loss left the initial plateau."""
    loss, prior = final_train_loss(run), prior_loss(labels)
    return loss is not None and loss < PLATEAU_FRACTION * prior, loss, prior


def pretrain_backbone(crops: WindowCrops, classify_cfg, out: str | os.PathLike, verbose: bool = True) -> Path:
    """Trains the classifier with :func:`sppnet.engine.classify.train` (resumes a run in ``out``)."""
    from sppnet.engine.classify import train

    out = Path(out)
    resume = (out / "last.safetensors").is_file()
    return train(
        classify_cfg,
        train_set=crops,
        val_set=None,
        classes=crops.classes,
        out=out,
        resume=resume,
        verbose=verbose,
        resume_hint=False,  # the detector's run resumes with 'sppnet detect train --resume', which stages.py prints
    )


def load_backbone(path: str | os.PathLike) -> tuple[nn.Module, list[str], tuple[float, ...], tuple[float, ...]]:
    """A classifier from ``sppnet classify train``: ``(model, classes, mean, std)``.

    Any SPP classifier of the registry (a Table 1 network or a torchvision
    backbone); ``mean`` / ``std`` are the normalisation it was trained with.

    Args:
        path: the run directory or its ``model.safetensors``.
    """
    from sppnet.engine.classify import load_classifier

    model, classes, cfg = load_classifier(Path(path), "cpu")
    if not getattr(model, "spp", False):
        raise UserError(f"{path}: the detector needs an SPP classifier (spp=True), got the no-SPP {model.name}")
    return model.train(), classes, tuple(cfg.mean), tuple(cfg.std)


def init_fc8_from_classifier(detector, model: nn.Module, model_classes: Sequence[str], classes: Sequence[str]) -> bool:
    """Copies the pretraining classifier into fc8 when it classified the same classes + background.

    fc8's row 0 is the background, rows ``1..K`` the classes. Returns whether it copied.
    """
    if sorted(model_classes) != sorted([*classes, BACKGROUND]) or model.classifier.out_features != len(model_classes):
        return False
    order = [list(model_classes).index(BACKGROUND)] + [list(model_classes).index(c) for c in classes]
    with torch.no_grad():
        detector.cls_score.weight.copy_(model.classifier.weight[order])
        detector.cls_score.bias.copy_(model.classifier.bias[order])
    return True
