"""Prototype training loop for the classification recipe search (issue 13).

A compact stand-in for :func:`sppnet.engine.classify.train` with every lever of
the search exposed in :class:`Recipe`: normalisation, fc batch norm, init,
optimiser, warm-up, the learning-rate rule (fixed steps, the paper's plateau
rule, one-cycle over a time budget), augmentation (the paper's five crops or
random-resized crops, colour jitter, PCA lighting), label smoothing and
single / multi-size training. It reuses the project's models, transforms and
test views, so a recipe found here is one the engine can implement as is.

Each epoch sees every training image once (multi-size: a full epoch at each
size in turn, Sec. 2.3); validation after every epoch drives the plateau rule
and picks the best checkpoint, which is the one tested.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sppnet.data.imagefolder import ImageFolderDataset
from sppnet.data.images import to_rgb
from sppnet.data.transforms import TrainTransform, resize_short_side, resize_side, small_size_for
from sppnet.engine.views import prepare_views, score_views
from sppnet.models import get_model


@dataclass
class Recipe:
    """Every setting of one training run (see the module docstring)."""

    model: str = "overfeat5"
    width: float = 0.125
    fc_dim: int = 256
    dropout: float = 0.0
    norm: str = "lrn"
    fc_norm: bool = False
    init: str = "he"  # "he": fc6/fc7 He fan-in normal; "paper": N(0, 0.01)
    size: int = 112
    schedule: str = "single"  # or "multi"
    optimizer: str = "sgd"  # or "adamw"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    epochs: int = 18  # upper bound
    lr_rule: str = "steps"  # "steps", "plateau", "onecycle" (over the time budget, else over epochs)
    lr_steps: tuple[int, ...] = (16,)
    warmup_epochs: float = 0.0
    patience: int = 3  # plateau: epochs without a better validation error before lr /= 10
    max_reductions: int = 2  # plateau: stop at the next plateau after this many reductions
    crop: str = "paper"
    scale: tuple[float, float] = (0.25, 1.0)
    jitter: float = 0.0
    alphastd: float = 0.1
    label_smoothing: float = 0.0
    val_views: str = "full"
    seed: int = 0


def _load_split(root: Path, split: str, side: int, classes=None):
    ds = ImageFolderDataset(root, split, classes=classes)
    items = []
    for i in range(len(ds)):
        img, label = ds[i]
        img = to_rgb(img) if img.mode != "RGB" else img
        items.append((img, int(label)))
    return ds.classes, items


def load_data(root: str | Path, size: int):
    """``(classes, train, val, test)``: lists of (PIL RGB, label); train images resized to the crop short side."""
    root = Path(root)
    classes, train = _load_split(root, "train", resize_side(size))
    side = resize_side(size)
    train = [(resize_short_side(img, side), y) for img, y in train]
    _, val = _load_split(root, "val", side, classes)
    _, test = _load_split(root, "test", side, classes) if (root / "test").is_dir() else (None, [])
    return classes, train, val, test


def build(r: Recipe, num_classes: int) -> nn.Module:
    torch.manual_seed(r.seed)
    model = get_model(
        r.model, num_classes=num_classes, width=r.width, fc_dim=r.fc_dim, dropout=r.dropout,
        norm=r.norm, fc_norm=r.fc_norm,
    )  # fmt: skip
    if r.init == "he":
        for layer in model.fc:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    return model


@torch.no_grad()
def evaluate(model: nn.Module, items: list[tuple[Image.Image, int]], views: str, size: int) -> tuple[float, float]:
    """``(top-1, mean cross-entropy)`` with the project's test views."""
    model.eval()
    correct, loss = 0, 0.0
    if views == "center":
        for s in range(0, len(items), 64):
            chunk = items[s : s + 64]
            x = torch.cat([prepare_views(img, "center", size) for img, _ in chunk])
            y = torch.tensor([label for _, label in chunk])
            logits = model(x)
            correct += int((logits.argmax(1) == y).sum())
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
    else:
        for img, label in items:
            p = score_views(model, prepare_views(img, views, size), size).mean(0)
            correct += int(p.argmax() == label)
            loss += -math.log(max(float(p[label]), 1e-12))
    model.train()
    return correct / len(items), loss / len(items)


def train(r: Recipe, data, budget: float | None = None, log=print) -> dict:
    """Trains ``r`` on ``data = (classes, train, val, test)``; returns metrics of the best-validation weights."""
    classes, train_items, val_items, test_items = data
    model = build(r, len(classes))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": r.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if r.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=r.lr)
    steps_per_epoch = math.ceil(len(train_items) / r.batch_size)
    small = small_size_for(r.size)
    g = torch.Generator().manual_seed(r.seed)
    lr_scale, reductions, since_best = 1.0, 0, 0
    best = (-1.0, None, 0)
    history = []
    t_start = time.perf_counter()
    step = 0
    epoch = 0
    for epoch in range(r.epochs):
        t_epoch = time.perf_counter()
        out_size = r.size if (r.schedule == "single" or epoch % 2 == 0) else small
        tf = TrainTransform(r.size, out_size, alphastd=r.alphastd, crop=r.crop, scale=r.scale, jitter=r.jitter)
        order = torch.randperm(len(train_items), generator=g).tolist()
        loss_sum, correct = 0.0, 0
        model.train()
        for b in range(steps_per_epoch):
            idx = order[b * r.batch_size : (b + 1) * r.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            x = torch.stack([tf(train_items[i][0], g) for i in idx])
            y = torch.tensor([train_items[i][1] for i in idx])
            if r.lr_rule == "onecycle":
                if budget is not None:  # over the time budget
                    frac = min(1.0, (time.perf_counter() - t_start) / budget)
                else:  # over r.epochs
                    frac = min(1.0, step / (r.epochs * steps_per_epoch))
                pct = 0.25
                if frac < pct:
                    lr = r.lr * (0.04 + 0.96 * frac / pct)
                else:
                    lr = r.lr * (0.5 * (1 + math.cos(math.pi * (frac - pct) / (1 - pct)))) + 1e-6
            else:
                lr = r.lr * lr_scale
                if r.lr_rule == "steps":
                    lr = r.lr * 0.1 ** sum(1 for s in r.lr_steps if epoch >= s)
                if r.warmup_epochs and step < r.warmup_epochs * steps_per_epoch:
                    lr *= (step + 1) / (r.warmup_epochs * steps_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
        val_top1, val_loss = evaluate(model, val_items, r.val_views, r.size)
        seconds = time.perf_counter() - t_start
        row = dict(epoch=epoch + 1, size=out_size, lr=lr, train_loss=loss_sum / len(train_items),
                   train_acc=correct / len(train_items), val_top1=val_top1, val_loss=val_loss, seconds=seconds)  # fmt: skip
        history.append(row)
        log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if val_top1 > best[0]:
            best = (val_top1, copy.deepcopy(model.state_dict()), epoch + 1)
            since_best = 0
        else:
            since_best += 1
        if r.lr_rule == "plateau" and since_best >= r.patience and (r.schedule == "single" or epoch % 2 == 1):
            if reductions >= r.max_reductions:
                break
            lr_scale *= 0.1
            reductions += 1
            since_best = 0
        epoch_time = time.perf_counter() - t_epoch
        if budget is not None and seconds + epoch_time > budget:
            break
    train_seconds = time.perf_counter() - t_start
    model.load_state_dict(best[1])
    res = dict(epochs=len(history), best_epoch=best[2], val_top1=best[0], train_seconds=train_seconds,
               history=history, recipe=dataclasses.asdict(r))  # fmt: skip
    if test_items:
        res["test_full"] = evaluate(model, test_items, "full", r.size)[0]
        res["test_center"] = evaluate(model, test_items, "center", r.size)[0]
    res["model"] = model
    return res
