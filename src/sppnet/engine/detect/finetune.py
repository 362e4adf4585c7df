"""Fine-tuning fc6, fc7 and a new (K+1)-way fc8 on pooled windows (SPP-net Sec. 4.1).

Mini-batches of 128 windows, 25% foreground (IoU >= 0.5 with a ground truth,
labelled with its class) and 75% background (max IoU in [0.1, 0.5), label 0).
A batch draws ``images_per_batch`` images (uniformly among those with
foreground windows) and ``128 / images_per_batch`` windows from each (Fast
R-CNN's hierarchical sampling). The foreground quota is the batch's: an image
with fewer foreground windows than its share gives what it has and the others
make up the difference from their spare foreground windows (an image without
background windows gives only foreground). With cached features 8 images x 16 windows keeps the batch
varied while pooling from 8 maps instead of ~110 -- the per-map overhead, not
the arithmetic, dominates a batch on a CPU.

* ``mode="fc"`` (the paper): the conv layers are frozen, so every window is
  pooled from the CACHED conv5 maps (:class:`~sppnet.engine.detect.features.FeatureCache`),
  each at a random scale (one of the cached scales; released code) and each
  taken from the flipped image with probability 1/2 (its mirrored box on the
  cached conv5 of the flipped image).
* ``mode="all"`` (beyond the paper, what Fast R-CNN showed SPP-net missed): the
  loss also backpropagates through the pyramid into the conv layers, so
  nothing can be cached: each image of the batch (2 x 64 windows by default) is
  flipped with probability 1/2, resized to one random scale and run through
  the conv layers.

Under ``torchrun`` every process draws the same global batch (one generator,
the same seed) and pools and scores only its share of it (windows
``rank, rank + N, ...`` in mode ``fc``, images ``rank, rank + N, ...`` in mode
``all``); DistributedDataParallel averages the gradients, so an update is the
one of a single process on the whole batch (exactly so with ``--dropout 0``:
the dropout masks are drawn per process). Rank 0 writes the checkpoints and
metrics (of its share).

Resumable: ``finetune_last.safetensors`` (model, optimiser, both random
generators, iteration) is written atomically every ``checkpoint_every``
iterations and on Ctrl-C; metrics go to ``finetune.csv`` / ``finetune.png``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sppnet.engine.amp import autocast_context, grad_scaler
from sppnet.engine.common import GracefulInterrupt, MetricsLog, load_state, progress, save_state
from sppnet.engine.config import Config, ConfigError, option
from sppnet.engine.detect.features import FeatureCache, WindowSet, flip_boxes, load_record_image
from sppnet.engine.distributed import DistContext, all_reduce_sum, wrap_model
from sppnet.models.detector import SPPDetector
from sppnet.utils import capture_rng_state, check_finite_tensors, finite_or_raise, restore_rng_state

__all__ = ["FinetuneConfig", "FinetuneInterrupted", "finetune"]


_DIVERGED = "lower --ft-lr and resume; finetune_last.safetensors holds the last finite checkpoint"

#: The fine-tuning learning rate when ``--ft-lr`` is not given: ``--finetune fc`` / ``all``
#: (:meth:`FinetuneConfig.complete`), and either with ``--weights`` (ImageNet fc layers;
#: ``DetectConfig.complete``).
FC_LR, ALL_LR, PRETRAINED_LR = 0.02, 0.003, 0.003


class FinetuneInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C once the fine-tuning checkpoint is written."""


@dataclass
class FinetuneConfig(Config):
    """Fine-tuning: fc6, fc7 and fc8 on pooled windows (SPP-net Sec. 4.1)."""

    flag_prefix: ClassVar[str] = "ft-"

    mode: str = option(
        "fc",
        flag="--finetune",
        choices=("fc", "all"),
        help="fc: fc6/fc7/fc8 on cached conv5 (paper); all: also the conv layers (Fast R-CNN)",
    )
    iterations: int = option(3000, min=1, help="fine-tuning iterations (batches of --ft-batch windows)")
    # Small: 0.02 for the fc layers. At 0.003 (the earlier default) the foreground accuracy of the
    # fine-tuning batches was still climbing when the rate fell (benchmarks/README.md, issue 14).
    lr: float | None = option(
        None,
        min=0,
        min_open=True,
        help="fine-tuning learning rate; none: 0.02 for --finetune fc, 0.003 for all or with --weights",
    )
    lr_steps: tuple[int, ...] = option(
        (2400,), min=0, nonempty=False, metavar="IT", help="iterations from which lr is divided by another 10"
    )
    momentum: float = option(0.9, min=0, max=1, max_open=True, help="SGD momentum")
    weight_decay: float = option(5e-4, min=0, help="SGD weight decay")
    batch_size: int = option(128, flag="--ft-batch", min=1, help="windows per batch (Sec. 4.1: 128)")
    fg_fraction: float = option(0.25, min=0, min_open=True, max=1, help="foreground share of a batch (Sec. 4.1: 25%)")
    fg_iou: float = option(0.5, min=0, max=1, help="foreground: IoU >= this with a ground truth")
    bg_iou: tuple[float, ...] = option(
        (0.1, 0.5), length=2, min=0, max=1, metavar="IOU", help="background: max IoU in [low, high)"
    )
    flip: bool = option(True, help="windows of the horizontally flipped image, half of the time (cached too)")
    images_per_batch: int | None = option(
        None, min=1, help="images a batch draws its windows from; none: 8 for --finetune fc, 2 for all"
    )
    checkpoint_every: int = option(250, flag="--checkpoint-every", min=1, help="iterations between checkpoints")
    log_every: int = option(50, min=1, help="iterations between rows of finetune.csv")

    def complete(self) -> FinetuneConfig:
        changes: dict[str, float | int] = {}
        if self.images_per_batch is None:
            # 8 images x 16 windows keeps a batch varied; the conv layers of mode "all"
            # run on every image of the batch, so it takes 2 (Fast R-CNN's 2 x 64).
            changes["images_per_batch"] = 8 if self.mode == "fc" else 2
        if self.lr is None:
            # mode "all" also moves the conv layers, which their pretraining trained at 0.003
            changes["lr"] = FC_LR if self.mode == "fc" else ALL_LR
        return dataclasses.replace(self, **changes) if changes else self

    def check(self) -> None:
        if self.images_per_batch is not None and not self.images_per_batch <= self.batch_size:
            raise ConfigError(
                f"--ft-images-per-batch must be in [1, --ft-batch = {self.batch_size}], got {self.images_per_batch}"
            )

    def lr_at(self, iteration: int) -> float:
        return self.lr * 0.1 ** sum(1 for s in self.lr_steps if iteration >= s)


@dataclass
class _Running:
    """Training statistics since the last row of ``finetune.csv``."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    fg_correct: float = 0.0
    fg_seen: float = 0.0

    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        pred = logits.detach().argmax(1)
        is_fg = y > 0
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += float((pred == y).sum())
        self.seen += len(y)
        self.fg_correct += float((pred[is_fg] == y[is_fg]).sum())
        self.fg_seen += float(is_fg.sum())

    def row(self) -> dict[str, float]:
        return {
            "train_loss": self.loss_sum / max(self.seen, 1),
            "train_acc": self.correct / max(self.seen, 1),
            "fg_acc": self.fg_correct / max(self.fg_seen, 1),
        }


def _window_pools(windows: Sequence[WindowSet], cfg: FinetuneConfig) -> tuple[Tensor, Tensor]:
    """``fg [F, 3]`` (image, window, label 1..K) and ``bg [B, 2]`` (image, window)."""
    fg, bg = [], []
    for i, w in enumerate(windows):
        f = (w.max_overlap >= cfg.fg_iou).nonzero().squeeze(1)
        b = ((w.max_overlap >= cfg.bg_iou[0]) & (w.max_overlap < cfg.bg_iou[1])).nonzero().squeeze(1)
        fg.append(torch.stack([torch.full_like(f, i), f, w.label[f] + 1], dim=1))
        bg.append(torch.stack([torch.full_like(b, i), b], dim=1))
    fg_t = torch.cat(fg) if fg else torch.zeros((0, 3), dtype=torch.long)
    bg_t = torch.cat(bg) if bg else torch.zeros((0, 2), dtype=torch.long)
    if len(bg_t) == 0:  # no window in [0.1, 0.5): fall back to every window below 0.5
        bg_t = torch.cat(
            [
                torch.stack([torch.full_like(b, i), b], dim=1)
                for i, w in enumerate(windows)
                for b in [(w.max_overlap < cfg.bg_iou[1]).nonzero().squeeze(1)]
            ]
        )
    if len(fg_t) == 0 or len(bg_t) == 0:
        raise ValueError(f"fine-tuning needs foreground and background windows, got {len(fg_t)} and {len(bg_t)}")
    return fg_t, bg_t


def _image_rows(rng: np.random.Generator, f: Tensor, b: Tensor, n: int, n_fg: int) -> Tensor:
    """``[n, 3]`` (image, window, label) rows of one image: ``n_fg`` foreground, the rest background."""
    pick_f = f[torch.from_numpy(rng.integers(0, len(f), n_fg))]
    pick_b = b[torch.from_numpy(rng.integers(0, max(len(b), 1), n - n_fg))]
    return torch.cat([pick_f, torch.cat([pick_b, torch.zeros((len(pick_b), 1), dtype=torch.long)], 1)])


def _foreground_counts(sizes: Sequence[int], fg_available: Sequence[int], bg_available: Sequence[int], quota: int):
    """Foreground windows per image of a batch: ``quota`` over the whole batch.

    Each image first gives its share of the quota (in proportion to its rows,
    rounded down) or all the foreground windows it has; the shortfall is then taken, one
    window at a time in turn, from the images with foreground to spare. An
    image without background windows gives only foreground.
    """
    forced = [m == 0 for m in bg_available]
    cap = [n if no_bg else min(n, a) for n, a, no_bg in zip(sizes, fg_available, forced)]
    total = max(sum(sizes), 1)
    counts = [n if no_bg else min(c, quota * n // total) for n, c, no_bg in zip(sizes, cap, forced)]
    short = quota - sum(counts)
    while short > 0:
        spare = [k for k in range(len(sizes)) if counts[k] < cap[k]]
        if not spare:
            break
        for k in spare[:short]:
            counts[k] += 1
        short -= min(short, len(spare))
    return counts


def _sample_rows(rng: np.random.Generator, fg: Tensor, bg: Tensor, cfg: FinetuneConfig) -> list[Tensor]:
    """Per sampled image its ``[n, 3]`` rows; ``images_per_batch`` images, ``batch_size`` rows in all.

    ``round(batch_size * fg_fraction)`` of the rows are foreground whenever the
    chosen images hold that many foreground windows between them
    (:func:`_foreground_counts`): an image with one foreground window does not
    pull the batch below the quota.
    """
    images = torch.unique(fg[:, 0])
    chosen = images[torch.from_numpy(rng.integers(0, len(images), cfg.images_per_batch))].tolist()
    sizes = [
        cfg.batch_size // cfg.images_per_batch + (k < cfg.batch_size % cfg.images_per_batch)
        for k in range(cfg.images_per_batch)
    ]
    f = [fg[fg[:, 0] == i] for i in chosen]
    b = [bg[bg[:, 0] == i][:, :2] for i in chosen]
    quota = round(cfg.batch_size * cfg.fg_fraction)
    counts = _foreground_counts(sizes, [len(x) for x in f], [len(x) for x in b], quota)
    return [_image_rows(rng, fk, bk, n, c) for fk, bk, n, c in zip(f, b, sizes, counts)]


def _cached_batch(
    cache: FeatureCache,
    rng: np.random.Generator,
    fg: Tensor,
    bg: Tensor,
    cfg: FinetuneConfig,
    dist: DistContext | None = None,
) -> tuple[Tensor, Tensor]:
    """pool5 of a sampled batch from the cache: random flip and random scale per window
    (under ``torchrun``: this process's windows ``rank::world_size`` of the global batch)."""
    rows = torch.cat(_sample_rows(rng, fg, bg, cfg))  # [B, 3]
    n = len(rows)
    flips = torch.from_numpy(rng.random(n) < 0.5) if cfg.flip else torch.zeros(n, dtype=torch.bool)
    n_scales = len(cache.detector.scales)
    scales = torch.from_numpy(rng.integers(0, n_scales, n)) if n_scales > 1 else torch.zeros(n, dtype=torch.long)
    if dist is not None and dist.distributed:  # every draw made above: the generators stay in step
        rows, flips, scales = (
            rows[dist.rank :: dist.world_size],
            flips[dist.rank :: dist.world_size],
            scales[dist.rank :: dist.world_size],
        )
        n = len(rows)
    groups = rows[:, 0] * 2 + flips.long()
    order = torch.argsort(groups, stable=True)  # windows of one (image, flip) together
    requests = []
    for g in torch.unique(groups).tolist():
        sel = (groups == g).nonzero().squeeze(1)
        scale_index = None if cache.detector.method == "rcnn" else scales[sel]
        requests.append((g // 2, rows[sel, 1], bool(g % 2), scale_index))
    x = torch.empty((n, cache.detector.pooled_dim), device=cache.detector.pixel_mean.device)
    x[order] = cache.pool5_many(requests)
    return x, rows[:, 2].to(x.device)


def _image_batch(
    detector: SPPDetector,
    records: Sequence[dict],
    windows: Sequence[WindowSet],
    rng: np.random.Generator,
    fg: Tensor,
    bg: Tensor,
    cfg: FinetuneConfig,
    dist: DistContext | None = None,
) -> tuple[Tensor, Tensor]:
    """Mode ``all``: conv layers run (with gradients) on each sampled image, flipped or not, at one scale
    (under ``torchrun``: this process's images ``rank::world_size`` of the batch)."""
    xs, ys = [], []
    for k, rows in enumerate(_sample_rows(rng, fg, bg, cfg)):
        i = int(rows[0, 0])
        flip = bool(rng.random() < 0.5) if cfg.flip else False
        s = int(rng.integers(0, len(detector.scales)))
        if dist is not None and dist.distributed and k % dist.world_size != dist.rank:
            continue  # another process's image (its draws are made all the same)
        image = detector.normalize(load_record_image(records[i]).to(detector.pixel_mean.device))
        boxes = windows[i].boxes[rows[:, 1]]
        if flip:
            image, boxes = image.flip(-1), flip_boxes(boxes, windows[i].width)
        if detector.method == "rcnn":
            xs.append(detector.warped_pool5(image, boxes.to(image.device)))
        else:
            scale = detector.image_scales(image.shape[-2], image.shape[-1])[s]
            maps, scales = detector.feature_maps(image, [scale])
            rois = detector.map_windows(boxes, scales, [maps[0].shape[-2:]], torch.zeros(len(boxes), dtype=torch.long))
            xs.append(detector.pool_windows(maps, rois))
        ys.append(rows[:, 2])
    return torch.cat(xs), torch.cat(ys).to(xs[0].device)


class _Head(torch.nn.Module):
    """fc6 -> fc7 -> fc8 of the detector as one module (what DistributedDataParallel wraps)."""

    def __init__(self, detector: SPPDetector, conv: bool) -> None:
        super().__init__()
        self.fc, self.cls_score = detector.backbone.fc, detector.cls_score
        if conv:  # mode "all": the conv layers run outside forward(), their gradients are averaged too
            self.features = detector.backbone.features

    def forward(self, pool5: Tensor) -> Tensor:
        return self.cls_score(self.fc(pool5))


def finetune(
    detector: SPPDetector,
    cache: FeatureCache,
    records: Sequence[dict],
    windows: Sequence[WindowSet],
    cfg: FinetuneConfig,
    out: str | Path,
    verbose: bool = True,
    seed: int = 0,
    dist: DistContext | None = None,
    amp: str | None = None,
) -> None:
    """Fine-tunes ``detector`` in place (see the module docstring).

    ``seed`` seeds the batch sampling (numpy) and dropout (torch). ``dist``: this
    process under ``torchrun``; ``amp``: ``bf16`` / ``fp16`` autocast on CUDA
    (fp16 with loss scaling).

    Raises:
        FinetuneInterrupted: after Ctrl-C, once a checkpoint is written.
    """
    out = Path(out)
    ckpt = out / "finetune_last.safetensors"
    cfg = cfg.resolved()
    dist = dist or DistContext(device=detector.pixel_mean.device)
    if dist.distributed and cfg.images_per_batch % dist.world_size and cfg.mode == "all":
        raise ValueError(
            f"--ft-images-per-batch {cfg.images_per_batch} must be a multiple of the {dist.world_size} processes"
        )
    if dist.distributed and cfg.batch_size % dist.world_size:
        raise ValueError(f"--ft-batch {cfg.batch_size} must be a multiple of the {dist.world_size} processes")
    fg, bg = _window_pools(windows, cfg)
    params = list(detector.backbone.fc.parameters()) + list(detector.cls_score.parameters())
    if cfg.mode == "all":
        params = list(detector.backbone.features.parameters()) + params
    params = [p for p in params if p.requires_grad]  # --freeze: fixed stages stay out
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    rng = np.random.Generator(np.random.PCG64(seed))
    torch.manual_seed(seed)
    head = wrap_model(_Head(detector, cfg.mode == "all"), dist)  # DDP averages the gradients of the processes
    scaler = grad_scaler(dist.device, amp)
    metrics = MetricsLog(out / "finetune.csv")
    start, running = 0, _Running()
    if ckpt.is_file():
        state = load_state(ckpt)
        detector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        restore_rng_state(state["rng"])
        start = int(state["iteration"])
        saved = state["running"]  # a list of the five counters before they had names
        running = _Running(**saved) if isinstance(saved, dict) else _Running(*map(float, saved))
        metrics = MetricsLog.load(out / "finetune.csv")
        metrics = MetricsLog(metrics.path, [r for r in metrics.rows if int(r["iteration"]) <= start])
        if verbose and dist.is_main:
            print(f"resuming fine-tuning at iteration {start + 1} of {cfg.iterations}", file=sys.stderr)
    verbose = verbose and dist.is_main

    def checkpoint(iteration: int) -> None:
        check_finite_tensors(
            detector, "the fine-tuned weights", step=iteration, lr=cfg.lr_at(iteration - 1), hint=_DIVERGED
        )
        if not dist.is_main:
            return
        save_state(
            ckpt,
            {
                "model": detector.state_dict(),
                "optimizer": optimizer.state_dict(),
                "numpy_rng": rng.bit_generator.state,
                "rng": capture_rng_state(),
                "iteration": iteration,
                "running": dataclasses.asdict(running),
            },
        )

    if verbose:
        print(
            f"fine-tuning {'fc6, fc7, fc8' if cfg.mode == 'fc' else 'all layers'} for {cfg.iterations} iterations: "
            f"{len(fg)} foreground / {len(bg)} background windows, batches of {cfg.batch_size}",
            file=sys.stderr,
        )
    detector.train()
    t0 = time.perf_counter()
    interrupt = GracefulInterrupt()
    with interrupt:
        bar = progress(range(start, cfg.iterations), desc="fine-tune", total=cfg.iterations - start, enabled=verbose)
        for it in bar:
            lr = cfg.lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast_context(dist.device, amp):
                if cfg.mode == "fc":
                    with torch.no_grad():
                        x, y = _cached_batch(cache, rng, fg, bg, cfg, dist)
                else:
                    x, y = _image_batch(detector, records, windows, rng, fg, bg, cfg, dist)
                logits = head(x)
                loss = F.cross_entropy(logits.float(), y)
            finite_or_raise("fine-tuning loss", loss, step=it + 1, lr=lr, hint=_DIVERGED)  # the last checkpoint is kept
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            running.add(loss, logits, y)
            done = it + 1
            if dist.is_main and (done % cfg.log_every == 0 or done == cfg.iterations):
                metrics.append(
                    {"iteration": done, "lr": lr, **running.row(), "seconds": round(time.perf_counter() - t0, 2)}
                )
                running = _Running()
            if done % cfg.checkpoint_every == 0 or done == cfg.iterations:
                checkpoint(done)
                if dist.is_main:  # drawn with the checkpoint: a figure per row of the log cost 5 % of the stage
                    metrics.plot(out / "finetune.png", x="iteration", title="fine-tuning fc6, fc7, fc8")
            stop = interrupt.requested
            if dist.distributed:  # every process stops at the same iteration
                stop = all_reduce_sum([float(stop)], dist)[0] > 0
            if stop and done < cfg.iterations:
                checkpoint(done)
                raise FinetuneInterrupted(f"fine-tuning interrupted after iteration {done}")
    detector.eval()
