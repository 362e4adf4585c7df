"""SPP-net classification: training with single-, multi- and random-size schedules,
evaluation with the paper's test views, prediction.

Public API::

    cfg = ClassifyConfig.from_preset("small", schedule="multi", epochs=8)
    run = train(cfg, out="runs/cls")                 # built-in shapes data (or cfg.data)
    model, classes, cfg = load_classifier(run)
    evaluate(model, ImageFolderDataset(root, "test", classes=classes), "full", cfg)
    # {"top1": 0.91, "top5": 1.0, "images": 800, "views": "full", "views_per_image": 1.0}
    predict(model, ["cat.jpg"], classes, views="full", cfg=cfg)

Training (Sec. 2.3, 3.1): crops as in :mod:`sppnet.data.transforms`; SGD with
momentum and weight decay; the learning rate divided by 10 at ``lr_steps``.
Schedules (one set of weights throughout):

* ``single``: every epoch at ``size``;
* ``multi``: one FULL epoch at ``size``, then one at ``small_size``, alternating;
  the small input is the ``size`` crop RESIZED (same content, lower resolution);
* ``random``: each epoch's size drawn uniformly from ``[small_size, size]``
  (integers) by a seeded generator whose state is in the checkpoint.

Determinism (CPU). Every training sample's augmentation is drawn from a
generator seeded by ``(seed, epoch, index)`` and each epoch's order from
``(seed, epoch)``, so the result does not depend on the number of DataLoader
workers; dropout draws from torch's global generator, whose state (per rank) is
checkpointed. Resuming therefore reproduces an uninterrupted run bit for bit on
CPU.

Run directory (``out``)::

    config.json          the resolved ClassifyConfig
    last.safetensors     resumable state: model, optimizer, RNG states, epoch, step,
                         size schedule (written atomically after every epoch, and
                         mid-epoch on Ctrl-C)
    model.safetensors    weights + meta for inference (model name and config,
                         classes, size, normalisation, the config)
    metrics.csv          per epoch: size, lr, train loss / accuracy, val top-1 /
                         top-5 (centre view), seconds
    curves.png           the metrics as curves (redrawn at most every 30 s, and at the end)

Accuracies are fractions in [0, 1]; with fewer than 5 classes "top-5" is top-K
with K the number of classes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sppnet.data.images import load_image, to_rgb
from sppnet.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainTransform,
    resize_short_side,
    resize_side,
    small_size_for,
)
from sppnet.engine.common import (
    GracefulInterrupt,
    MetricsLog,
    UserError,
    load_state,
    load_weights,
    progress,
    save_state,
    save_weights,
    seed_everything,
)
from sppnet.engine.distributed import (
    DistContext,
    ShardedEpochSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    derive_seed,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from sppnet.engine.views import check_size, check_views, prepare_views, score_views
from sppnet.models import get_model, list_models
from sppnet.utils import capture_rng_state, load_json, restore_rng_state, save_json

__all__ = [
    "ClassifyConfig",
    "PRESETS",
    "SCHEDULES",
    "SizeSchedule",
    "TrainingInterrupted",
    "train",
    "load_classifier",
    "evaluate",
    "predict",
    "build_model",
    "open_image_folder",
    "builtin_data_root",
]

SCHEDULES: tuple[str, ...] = ("single", "multi", "random")

#: Settings of the two presets.
#:
#: ``paper``: Table 1 ZF-5 at full width, 224/180, 70 epochs, batch 128,
#: dropout 0.5, lr 0.01 divided by 10 twice (the paper divides "when the error
#: plateaus"; we fix the epochs at 40 and 60), the models' N(0, 0.01) fc init.
#:
#: ``small`` (2 CPU cores: the built-in set in about 2 minutes). Measured on the
#: built-in shapes data, where a run of a few minutes has only ~1,000 SGD steps and
#: learning is limited by the number of samples seen, not by capacity:
#:
#: * Overfeat-5 at 1/8 of the paper's channels, fc6/fc7 of 256. Overfeat puts
#:   LRN after a stride-6 pool, so it trains 1.6x faster than ZF-5 at the same
#:   width (LRN costs as much as the convolutions in a narrow ZF-5), and width
#:   1/8 learned as fast per step as 1/4 at half the cost.
#: * crops of 112, multi-size partner 90: conv5 maps of 9x9 and 7x7, the ratio of
#:   the paper's 13x13 / 10x10 and both larger than the finest 6x6 level. (ZF-5
#:   at 112/90 gives 6x6/5x5, at 128/103 7x7/6x6.)
#: * ``init="he"``: fc6/fc7 re-drawn with He et al.'s (2015) fan-in normal init;
#:   with N(0, 0.01) the loss sits at ln(K) for ~100 steps even when memorising 64
#:   images, with He init ~20.
#: * ``dropout=0``: with dropout 0.5 the loss had not left ln(8) after 600 steps;
#:   runs this short are under-fitted, not over-fitted.
#: * 18 epochs of batch 32 at lr 0.02 (0.04 was slower to start), divided by 10
#:   for the last 2 epochs; decoded images cached in memory (``workers=0``).
#:   Validation top-1 is still rising steeply at the end (about 40% after 16
#:   epochs); the preset is sized for the 30-minute experiment, not for accuracy.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        model="overfeat5", width=0.125, fc_dim=256, dropout=0.0, size=112, small_size=None,
        epochs=18, batch_size=32, lr=0.02, lr_steps=(16,), workers=0, cache_images=True, init="he",
    ),
    "paper": dict(
        model="zf5", width=1.0, fc_dim=4096, dropout=0.5, size=224, small_size=180,
        epochs=70, batch_size=128, lr=0.01, lr_steps=(40, 60), workers=8, cache_images=False, init="paper",
    ),
}  # fmt: skip

# Fields a resumed run may change; everything else must match the saved config.
_RESUME_MUTABLE = ("epochs", "workers", "cache_images", "device", "views")


@dataclass
class ClassifyConfig:
    """Everything that defines a classification run (saved as ``config.json``).

    Defaults are the ``small`` preset. Build with :meth:`from_preset` to start
    from another preset and override single values.

    Attributes:
        model: registry name (``zf5``, ``convnet5``, ``overfeat5``, ``overfeat7``).
        spp: pyramid head (True) or the no-SPP baseline (fixed 6x6 pool5).
        levels: pyramid levels.
        width: channel multiplier of every conv layer (1.0 = Table 1).
        fc_dim: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout after fc6 and fc7.
        init: ``paper`` (N(0, 0.01) fc weights, as built) or ``he`` (fc6 / fc7
            re-drawn with He's fan-in normal init; see :data:`PRESETS`).
        size: crop side (224 in the paper); images are first resized to short
            side ``round(size * 256 / 224)``.
        small_size: the second size of multi-size training (180 in the paper);
            ``None``: ``round(size * 180 / 224)``.
        schedule: ``single``, ``multi`` or ``random``.
        epochs, batch_size (global, over all processes), lr, momentum,
        weight_decay: SGD.
        lr_steps: epochs (0-based, counted from the start) from which the
            learning rate is divided by another factor of 10.
        alphastd: AlexNet PCA colour-noise strength (0 disables).
        seed: seeds the weights, the data order, augmentation and dropout.
        workers: DataLoader worker processes per training process.
        cache_images: keep training images decoded and resized (and the
            validation views) in memory across epochs; small data sets only,
            needs ``workers=0`` (the cache lives in the training process).
        device: ``auto | cpu | cuda | cuda:N``.
        views: test views of the per-epoch validation and the default of ``val``.
        preset: the preset the values started from (informational).
        data: ImageFolder root; ``None``: the built-in shapes set.
    """

    model: str = "overfeat5"
    spp: bool = True
    levels: tuple[int, ...] = (6, 3, 2, 1)
    width: float = 0.125
    fc_dim: int = 256
    dropout: float = 0.0
    init: str = "he"
    size: int = 112
    small_size: int | None = None
    schedule: str = "single"
    epochs: int = 18
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = (16,)
    alphastd: float = 0.1
    seed: int = 0
    workers: int = 0
    cache_images: bool = True
    device: str = "auto"
    views: str = "center"
    preset: str = "small"
    data: str | None = None

    @classmethod
    def from_preset(cls, preset: str = "small", **overrides: Any) -> "ClassifyConfig":
        """The preset's values, then ``overrides`` (``None`` values are ignored)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values = dict(PRESETS[preset])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ClassifyConfig fields {unknown}")
        if "size" in overrides and overrides["size"] is not None and overrides.get("small_size") is None:
            values["small_size"] = None  # follow the new size (180/224 of it)
        if overrides.get("workers") and overrides.get("cache_images") is None:
            values["cache_images"] = False  # asking for workers means loading in them
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["preset"] = preset
        return cls(**values).resolved()

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifyConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (unknown keys refused)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ClassifyConfig fields {unknown}")
        d = dict(d)
        for key in ("levels", "lr_steps"):
            if key in d and d[key] is not None:
                d[key] = tuple(int(v) for v in d[key])
        return cls(**d).resolved()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def resolved(self) -> "ClassifyConfig":
        """A validated copy with ``small_size`` filled in."""
        c = dataclasses.replace(self, levels=tuple(self.levels), lr_steps=tuple(sorted(self.lr_steps)))
        if c.small_size is None:
            c.small_size = small_size_for(c.size)
        if c.model not in list_models():
            raise ValueError(f"unknown model {c.model!r}; registered: {', '.join(list_models())}")
        if c.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {c.schedule!r}")
        for name in ("size", "small_size", "epochs", "batch_size", "fc_dim"):
            v = getattr(c, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if c.small_size > c.size:
            raise ValueError(f"small_size ({c.small_size}) must not exceed size ({c.size})")
        if not c.spp and c.schedule != "single":
            raise ValueError(
                f"schedule {c.schedule!r} trains at several input sizes, which needs the SPP head; "
                f"the no-SPP baseline accepts only {c.size}x{c.size} (use --schedule single)"
            )
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ValueError(f"lr must be a positive number, got {c.lr}")
        if not 0 <= c.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {c.momentum}")
        if c.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {c.weight_decay}")
        if c.alphastd < 0:
            raise ValueError(f"alphastd must be >= 0, got {c.alphastd}")
        if c.workers < 0:
            raise ValueError(f"workers must be >= 0, got {c.workers}")
        if c.cache_images and c.workers:
            raise ValueError(
                f"cache_images keeps images in the training process, so it needs workers=0 (got {c.workers}); "
                f"turn the cache off to use DataLoader workers"
            )
        if c.seed < 0:
            raise ValueError(f"seed must be >= 0, got {c.seed}")
        if any(s < 0 for s in c.lr_steps):
            raise ValueError(f"lr_steps must be epochs >= 0, got {c.lr_steps}")
        if c.init not in ("paper", "he"):
            raise ValueError(f"init must be 'paper' or 'he', got {c.init!r}")
        if c.views not in ("center", "ten", "full", "multi"):
            raise ValueError(f"views must be center, ten, full or multi, got {c.views!r}")
        return c

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``: ``lr / 10**(number of lr_steps <= epoch)``."""
        return self.lr * 0.1 ** sum(1 for s in self.lr_steps if epoch >= s)

    def model_kwargs(self, num_classes: int) -> dict:
        kwargs = dict(
            num_classes=num_classes, spp=self.spp, levels=self.levels, width=self.width,
            fc_dim=self.fc_dim, dropout=self.dropout,
        )  # fmt: skip
        if not self.spp:
            kwargs["input_size"] = self.size
        return kwargs


class SizeSchedule:
    """Input size of every epoch (Sec. 2.3); checkpointable.

    ``single``: ``size``; ``multi``: ``size`` on even epochs, ``small_size`` on odd
    ones; ``random``: ``random.Random(seed).randint(small_size, size)`` per epoch,
    drawn in epoch order (so the sizes do not depend on the number of epochs).
    """

    def __init__(self, kind: str, size: int, small_size: int, seed: int = 0) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
        self.kind, self.size, self.small_size = kind, int(size), int(small_size)
        self.rng = random.Random(derive_seed(seed, 0x512E))
        self.sizes: list[int] = []

    def size_for(self, epoch: int) -> int:
        while len(self.sizes) <= epoch:
            e = len(self.sizes)
            if self.kind == "single":
                s = self.size
            elif self.kind == "multi":
                s = self.size if e % 2 == 0 else self.small_size
            else:
                s = self.rng.randint(self.small_size, self.size)
            self.sizes.append(s)
        return self.sizes[epoch]

    def state_dict(self) -> dict:
        return {"sizes": list(self.sizes), "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.sizes = [int(s) for s in state["sizes"]]
        rng = state["rng"]
        self.rng.setstate(tuple(tuple(p) if isinstance(p, list) else p for p in rng))


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C, once the checkpoint is written."""


# --------------------------------------------------------------------------- data


def builtin_data_root() -> Path:
    """The built-in shapes set (generated on first use, then cached)."""
    from sppnet.data.synthetic import make_classification_dataset

    return make_classification_dataset()


def open_image_folder(root: Path, split: str, classes: Sequence[str] | None, verbose: bool):
    """An ImageFolder split with unreadable files dropped (each warned, summary printed)."""
    from sppnet.data.imagefolder import ImageFolderDataset

    ds = ImageFolderDataset(root, split, classes=classes)
    total = len(ds)
    skipped = ds.scan()
    if skipped and verbose:
        print(f"{root / split}: {skipped.summary(total)}", file=sys.stderr)
    return ds


class _Augmented(Dataset):
    """``base[i] = (PIL image, label)`` -> ``(TrainTransform(image), label)``, seeded per sample.

    ``cache`` (a dict shared across epochs, main process only): keeps each image
    decoded and resized to the transform's short side, the deterministic part of
    the pipeline, so later epochs only crop, flip and colour it. The result is
    identical with and without the cache.
    """

    def __init__(self, base: Dataset, transform: TrainTransform, seed: int, epoch: int, cache: dict | None = None):
        self.base, self.transform, self.seed, self.epoch, self.cache = base, transform, seed, epoch, cache

    def __len__(self) -> int:
        return len(self.base)

    def _item(self, index: int) -> tuple[Image.Image, int]:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise ValueError(
                f"training data must yield (PIL.Image, int) pairs, item {index} holds {type(img).__name__}"
            )
        if self.cache is not None:
            img = resize_short_side(to_rgb(img) if img.mode != "RGB" else img, resize_side(self.transform.size))
            self.cache[index] = (img, label)
        return img, label

    def __getitem__(self, index: int):
        img, label = self._item(index)
        g = torch.Generator()
        g.manual_seed(derive_seed(self.seed, self.epoch, index))
        return self.transform(img, g), int(label)


class _Views(Dataset):
    """``base[i]`` -> ``(prepare_views(image), label)`` for evaluation (``cache``: keep the results)."""

    def __init__(self, base: Dataset, views: str, size: int, mean, std, indices: Sequence[int] | None = None,
                 cache: dict | None = None):  # fmt: skip
        self.base, self.views, self.size, self.mean, self.std = base, views, size, mean, std
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        img, label = self.base[index]
        if not isinstance(img, Image.Image):
            raise ValueError(f"evaluation data must yield (PIL.Image, int) pairs, got {type(img).__name__}")
        item = prepare_views(img, self.views, self.size, self.mean, self.std), int(label)
        if self.cache is not None:
            self.cache[index] = item
        return item


def _worker_init(worker_id: int) -> None:  # noqa: ARG001
    # Ctrl-C is for the main process (it checkpoints); workers must not die of it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32  # set by the DataLoader from its seeded generator
    random.seed(seed)
    np.random.seed(seed)


def _loader(dataset: Dataset, batch_size: int, workers: int, seed: int, sampler=None, collate=None, cuda=False):
    g = torch.Generator()
    g.manual_seed(seed)  # also keeps the DataLoader off torch's global generator
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
        collate_fn=collate, worker_init_fn=_worker_init, generator=g, pin_memory=cuda,
        persistent_workers=False,
    )  # fmt: skip


def _list_collate(batch):
    return batch


# ------------------------------------------------------------------------- models


def build_model(cfg: ClassifyConfig, num_classes: int) -> nn.Module:
    """The network of ``cfg`` (random init), checked against ``cfg.size`` / ``small_size``."""
    cfg = cfg.resolved()
    model = get_model(cfg.model, **cfg.model_kwargs(num_classes))
    if cfg.init == "he":
        for layer in model.fc:
            if isinstance(layer, nn.Linear):  # fc6, fc7; the classifier keeps N(0, 0.01)
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    check_size(model, cfg.size, "size")
    if cfg.schedule != "single":
        check_size(model, cfg.small_size, "small_size")
    return model


def _inference_meta(cfg: ClassifyConfig, model: nn.Module, classes: Sequence[str], epoch: int) -> dict:
    return {
        "task": "classify",
        "model": model.name,
        "model_config": model.config(),
        "classes": list(classes),
        "size": cfg.size,
        "resize": resize_side(cfg.size),
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "epoch": epoch,
        "config": cfg.to_dict(),
    }


def load_classifier(
    run: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[nn.Module, list[str], ClassifyConfig]:
    """Loads a trained classifier for inference (never executes code from the file).

    Args:
        run: the run directory (holding ``model.safetensors``) or the file itself.
        device: where to put the model.

    Returns:
        ``(model in eval mode, classes, cfg)``.
    """
    path = Path(run)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: is {run} a classification run directory (sppnet classify train --out)?"
        )
    state, meta = load_weights(path, device="cpu")
    if meta.get("task") != "classify":
        raise UserError(f"{path} is not a classification model (task={meta.get('task')!r})")
    cfg = ClassifyConfig.from_dict(meta["config"])
    model = get_model(meta["model"], **meta["model_config"])
    model.load_state_dict(state)
    model.to(device).eval()
    return model, list(meta["classes"]), cfg


# ------------------------------------------------------------------------- training


def _check_resume(saved: ClassifyConfig, given: ClassifyConfig | None) -> ClassifyConfig:
    if given is None:
        return saved
    given = given.resolved()
    diff = [
        f"{f.name}: run has {getattr(saved, f.name)!r}, given {getattr(given, f.name)!r}"
        for f in dataclasses.fields(ClassifyConfig)
        if f.name not in _RESUME_MUTABLE + ("preset",) and getattr(saved, f.name) != getattr(given, f.name)
    ]
    if diff:
        raise UserError("cannot change these settings when resuming: " + "; ".join(diff))
    return dataclasses.replace(saved, **{k: getattr(given, k) for k in _RESUME_MUTABLE})


def _stop_requested(interrupt: GracefulInterrupt, ctx: DistContext) -> bool:
    if not ctx.distributed:
        return interrupt.requested
    return all_reduce_sum([float(interrupt.requested)], ctx)[0] > 0


def train(
    cfg: ClassifyConfig | None = None,
    train_set: Dataset | None = None,
    val_set: Dataset | None = None,
    classes: Sequence[str] | None = None,
    out: str | os.PathLike = "runs/classify",
    resume: bool = False,
    verbose: bool = True,
) -> Path:
    """Trains an SPP-net classifier; the same call works under ``torchrun`` (DDP).

    Args:
        cfg: the run's settings (``None``: the saved config when resuming, else
            the ``small`` preset).
        train_set, val_set: data sets yielding ``(PIL.Image RGB, int label)``;
            ``None``: the ImageFolder splits ``train`` / ``val`` of ``cfg.data``
            (or of the built-in set). ``val_set`` may be absent (no validation).
        classes: class names in label order (default: ``train_set.classes``).
        out: run directory (see the module docstring).
        resume: continue the run in ``out`` from ``last.safetensors``.
        verbose: progress bar and one line per epoch (rank 0 only).

    Returns:
        ``out``, with ``model.safetensors`` holding the final weights.

    Raises:
        UserError / ValueError: bad settings or data (one-line messages).
        TrainingInterrupted: after Ctrl-C, once a checkpoint is written.
    """
    out = Path(out)
    ckpt_path = out / "last.safetensors"
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"nothing to resume: {out / 'config.json'} does not exist")
        cfg = _check_resume(ClassifyConfig.from_dict(load_json(out / "config.json")), cfg)
    else:
        cfg = (cfg or ClassifyConfig()).resolved()
        if ckpt_path.exists():
            raise UserError(
                f"{out} already holds a training run; pass --resume to continue it or choose another --out"
            )
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(cfg.device)
    try:
        return _train(cfg, ctx, train_set, val_set, classes, out, resume and ckpt_path.exists(), verbose)
    finally:
        if owns_group:
            shutdown_distributed(ctx)


def _train(
    cfg: ClassifyConfig,
    ctx: DistContext,
    train_set: Dataset | None,
    val_set: Dataset | None,
    classes: Sequence[str] | None,
    out: Path,
    resume: bool,
    verbose: bool,
) -> Path:
    say = verbose and ctx.is_main
    if cfg.batch_size % ctx.world_size:
        raise UserError(f"batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} processes")
    local_batch = cfg.batch_size // ctx.world_size

    # ---- data
    if train_set is None:
        if cfg.data is None:
            root = builtin_data_root() if ctx.is_main else None
            barrier(ctx)  # rank 0 generates the cached set, then everyone reads it
            root = root or builtin_data_root()
        else:
            root = Path(cfg.data)
            if not root.is_dir():
                raise UserError(f"data folder {root} does not exist")
        train_set = open_image_folder(root, "train", classes, say)
        classes = train_set.classes
        if val_set is None and (root / "val").is_dir():
            val_set = open_image_folder(root, "val", classes, say)
    if classes is None:
        classes = getattr(train_set, "classes", None)
        if classes is None:
            raise ValueError("pass classes=[...] (names in label order) with a train_set that has no .classes")
    classes = [str(c) for c in classes]
    if len(train_set) == 0:
        raise UserError("the training set is empty")

    # ---- model, optimiser, schedule
    seed_everything(cfg.seed)
    model = build_model(cfg, len(classes)).to(ctx.device)  # same initial weights on every rank
    if ctx.rank:
        torch.manual_seed(derive_seed(cfg.seed, ctx.rank))  # own dropout masks per rank
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    schedule = SizeSchedule(cfg.schedule, cfg.size, cfg.small_size, cfg.seed)
    metrics = MetricsLog(out / "metrics.csv")
    start_epoch, start_step, running, elapsed = 0, 0, [0.0, 0.0, 0.0], 0.0
    if resume:
        state = load_state(out / "last.safetensors")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        rngs = state["rng"]
        if len(rngs) == ctx.world_size:
            restore_rng_state(rngs[ctx.rank])
        else:  # resumed on another number of processes: exactness is lost, determinism kept
            seed_everything(derive_seed(cfg.seed, start_epoch, start_step, ctx.rank))
        if start_step and len(state["running"]) == ctx.world_size:
            running = [float(v) for v in state["running"][ctx.rank]]
            elapsed = float(state["elapsed"])
        else:
            start_step = 0
        metrics = MetricsLog.load(out / "metrics.csv")
        metrics.truncate(start_epoch)
        if say:
            where = f"epoch {start_epoch + 1}" + (f", batch {start_step + 1}" if start_step else "")
            print(f"resuming {out} at {where} of {cfg.epochs}", file=sys.stderr)
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "config.json", cfg.to_dict())
    ddp_model = wrap_model(model, ctx)

    if say:
        print(
            f"training {cfg.model} ({'SPP ' + str(list(cfg.levels)) if cfg.spp else 'no SPP'}, width {cfg.width}) "
            f"on {len(train_set)} images of {len(classes)} classes, schedule {cfg.schedule} "
            f"(sizes {cfg.size}/{cfg.small_size}), {cfg.epochs} epochs, {ctx.world_size} process(es) on {ctx.device}",
            file=sys.stderr,
        )
    if start_epoch >= cfg.epochs and say:
        print(f"{out} already finished {start_epoch} epochs; nothing to do", file=sys.stderr)

    train_cache = {} if cfg.cache_images else None
    val_cache = {} if cfg.cache_images else None
    interrupt = GracefulInterrupt()
    last_plot = time.monotonic()
    with interrupt:
        for epoch in range(start_epoch, cfg.epochs):
            epoch_size = schedule.size_for(epoch)
            lr = cfg.lr_at(epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            transform = TrainTransform(cfg.size, epoch_size, alphastd=cfg.alphastd)
            data = _Augmented(train_set, transform, cfg.seed, epoch, train_cache)
            sampler = ShardedEpochSampler(
                len(data), cfg.seed, epoch, ctx.rank, ctx.world_size, start=start_step * local_batch
            )
            loader = _loader(
                data, local_batch, cfg.workers, derive_seed(cfg.seed, epoch, 7), sampler=sampler,
                cuda=ctx.device.type == "cuda",
            )  # fmt: skip
            t0 = time.perf_counter() - elapsed
            model.train()
            steps = start_step + len(loader)
            bar = progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} @{epoch_size}", total=len(loader), enabled=say)
            step = start_step
            for x, y in bar:
                x = x.to(ctx.device, non_blocking=True)
                y = y.to(ctx.device, non_blocking=True)
                logits = ddp_model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running[0] += float(loss.detach()) * len(y)
                running[1] += float((logits.detach().argmax(1) == y).sum())
                running[2] += len(y)
                step += 1
                if step < steps and _stop_requested(interrupt, ctx):
                    _checkpoint(out, ctx, model, optimizer, schedule, epoch, step, running, time.perf_counter() - t0)
                    _interrupted(out, ctx, epoch, step)
            del bar, loader
            loss_sum, correct, seen = all_reduce_sum(running, ctx)
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "size": epoch_size,
                "lr": lr,
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
            }
            if val_set is not None and len(val_set):
                c1, c5, n, _ = _evaluate_counts(model, val_set, cfg.views, cfg, ctx, cache=val_cache)
                row["val_top1"], row["val_top5"] = c1 / n, c5 / n
            row["seconds"] = round(time.perf_counter() - t0, 3)
            start_step, running, elapsed = 0, [0.0, 0.0, 0.0], 0.0
            if ctx.is_main:
                save_weights(out / "model.safetensors", model, _inference_meta(cfg, model, classes, epoch + 1))
                metrics.append(row)
                if epoch + 1 == cfg.epochs or time.monotonic() - last_plot > 30:  # a plot costs ~0.5 s
                    metrics.plot(out / "curves.png", title=f"{cfg.model} {cfg.schedule}-size")
                    last_plot = time.monotonic()
            _checkpoint(out, ctx, model, optimizer, schedule, epoch + 1, 0, running, 0.0)
            if say:
                val = f" val top-1 {row['val_top1']:.3f} top-5 {row['val_top5']:.3f}" if "val_top1" in row else ""
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} size {epoch_size} lr {lr:.2g} loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.3f}{val} ({row['seconds']:.1f}s)",
                    file=sys.stderr,
                )
            if epoch + 1 < cfg.epochs and _stop_requested(interrupt, ctx):
                _interrupted(out, ctx, epoch + 1, 0)
    barrier(ctx)
    return out


def _checkpoint(out, ctx, model, optimizer, schedule, epoch, step, running, elapsed) -> None:
    """``last.safetensors``: the resumable state (all ranks' RNG states and counters)."""
    rngs = all_gather_objects(capture_rng_state(), ctx)
    runs = all_gather_objects(list(running), ctx)
    if ctx.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "rng": rngs,
            "epoch": int(epoch),  # epochs completed
            "step": int(step),  # batches done in the next epoch (0 at an epoch boundary)
            "running": runs,  # per rank: [loss sum, correct, seen] of the partial epoch
            "elapsed": float(elapsed),
        }
        save_state(out / "last.safetensors", state)
    barrier(ctx)


def _interrupted(out: Path, ctx: DistContext, epoch: int, step: int):
    if ctx.is_main:
        where = f"after epoch {epoch}" if step == 0 else f"in epoch {epoch + 1} after batch {step}"
        print(
            f"\ninterrupted {where}: checkpoint written to {out / 'last.safetensors'}\n"
            f"resume with: sppnet classify train --out {out} --resume",
            file=sys.stderr,
        )
    raise TrainingInterrupted()


# ----------------------------------------------------------------------- evaluation


def _evaluate_counts(
    model: nn.Module, dataset: Dataset, views: str, cfg: ClassifyConfig, ctx: DistContext | None = None,
    verbose: bool = False, cache: dict | None = None,
) -> tuple[float, float, float, float]:
    """``(top-1 correct, top-5 correct, images, views)`` summed over all ranks."""
    ctx = ctx or DistContext(device=next(model.parameters()).device)
    check_views(views, model)
    check_size(model, cfg.size)
    was_training = model.training
    model.eval()
    indices = range(ctx.rank, len(dataset), ctx.world_size)
    data = _Views(dataset, views, cfg.size, IMAGENET_MEAN, IMAGENET_STD, indices, cache)
    per_batch = {"center": cfg.batch_size, "ten": max(1, cfg.batch_size // 10)}.get(views, 4)
    workers = 0 if cache is not None else cfg.workers
    loader = _loader(data, per_batch, workers, 0, collate=_list_collate, cuda=ctx.device.type == "cuda")
    k = min(5, model.num_classes)
    c1 = c5 = n = nviews = 0.0
    with torch.no_grad():
        for batch in progress(loader, desc=f"eval {views}", total=len(loader), enabled=verbose):
            labels = torch.tensor([label for _, label in batch], device=ctx.device)
            if views in ("center", "ten"):
                x = torch.stack([p for p, _ in batch])  # [B, V, 3, s, s]
                b, v = x.shape[:2]
                logits = model(x.flatten(0, 1).to(ctx.device))  # [B * V, K]
                probs = F.softmax(logits.float(), 1).view(b, v, -1).mean(1)  # [B, K]
                nviews += b * v
            else:
                scored = [score_views(model, p, cfg.size) for p, _ in batch]
                probs = torch.stack([s.mean(0) for s in scored])
                nviews += sum(s.shape[0] for s in scored)
            top = probs.topk(k, dim=1).indices  # [B, k]
            c1 += float((top[:, 0] == labels).sum())
            c5 += float((top == labels[:, None]).any(1).sum())
            n += len(batch)
    model.train(was_training)
    return tuple(all_reduce_sum([c1, c5, n, nviews], ctx))  # type: ignore[return-value]


def evaluate(model: nn.Module, dataset: Dataset, views: str = "center", cfg: ClassifyConfig | None = None,
             verbose: bool = False) -> dict:
    """Top-1 / top-5 accuracy of ``model`` on ``dataset`` with the given test views.

    Args:
        model: a trained ``SPPNet`` (see :func:`load_classifier`).
        dataset: yields ``(PIL.Image RGB, int label)``.
        views: ``center``, ``ten``, ``full`` or ``multi`` (:mod:`sppnet.engine.views`).
        cfg: provides ``size``, ``batch_size`` and ``workers`` (default: the
            ``small`` preset's, with ``size = model.input_size`` for a no-SPP model).
        verbose: progress bar.

    Returns:
        ``{"top1", "top5"`` (fractions), ``"images", "views"`` (the view set's
        name), ``"views_per_image"}``.
    """
    cfg = cfg or _default_cfg(model)
    if len(dataset) == 0:
        raise UserError("the evaluation set is empty")
    c1, c5, n, nv = _evaluate_counts(model, dataset, views, cfg, verbose=verbose)
    return {"top1": c1 / n, "top5": c5 / n, "images": int(n), "views": views, "views_per_image": nv / n}


def _default_cfg(model: nn.Module) -> ClassifyConfig:
    if getattr(model, "spp", True):
        return ClassifyConfig()
    return ClassifyConfig(size=model.input_size, small_size=model.input_size)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Iterable[str | os.PathLike | Image.Image],
    classes: Sequence[str],
    views: str = "center",
    topk: int = 5,
    cfg: ClassifyConfig | None = None,
) -> list[dict]:
    """Top-k classes of images of any size.

    Args:
        model: a trained ``SPPNet`` in eval mode.
        images: file paths (read with ``load_image``: EXIF-rotated, grey / RGBA
            converted) or PIL images.
        classes: class names in label order.
        views: ``center``, ``ten``, ``full`` or ``multi``.
        topk: classes per image (at most ``len(classes)``).
        cfg: provides ``size`` (see :func:`evaluate`).

    Returns:
        One ``{"image": path or index, "top": [{"class", "index", "prob"}, ...]}``
        per image, most probable first.
    """
    cfg = cfg or _default_cfg(model)
    check_views(views, model)
    check_size(model, cfg.size)
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a model with {model.num_classes} outputs")
    k = max(1, min(int(topk), len(classes)))
    model.eval()
    results = []
    for i, item in enumerate(images):
        if isinstance(item, Image.Image):
            img, name = item, i
        else:
            img, name = load_image(item), str(item)
        probs = score_views(model, prepare_views(img, views, cfg.size, IMAGENET_MEAN, IMAGENET_STD), cfg.size).mean(0)
        p, idx = probs.topk(k)
        top = [{"class": classes[j], "index": int(j), "prob": float(q)} for q, j in zip(p.tolist(), idx.tolist())]
        results.append({"image": name, "top": top})
    return results

