"""Training an SPP-net classifier (Sec. 2.3, 3.1): crops as in
:mod:`sppnet.data.transforms`, SGD with momentum (or AdamW) and weight decay,
the learning rate of :class:`~sppnet.engine.classify.schedules.LRSchedule`
(divided by 10 when validation top-1 plateaus, then stop; or at fixed
``lr_steps``), the input size of each epoch from
:class:`~sppnet.engine.classify.schedules.SizeSchedule`; training ends at
``epochs``, when the plateau rule stops it, or before an epoch that would end
past ``time_budget`` seconds. The same call runs under ``torchrun`` (DDP).

Determinism (CPU): the data are seeded per sample and epoch
(:mod:`sppnet.engine.classify.data`); dropout draws from torch's global
generator, whose state (per rank) is checkpointed. Resuming therefore
reproduces an uninterrupted run bit for bit on CPU.

Run directory (``out``)::

    config.json          the resolved ClassifyConfig
    last.safetensors     resumable state: model, optimizer, RNG states, epoch, step,
                         size schedule (written atomically after every epoch, and
                         mid-epoch on Ctrl-C)
    model.safetensors    the weights of the epoch with the best validation top-1
                         (without a validation set: of the last epoch)
                         + meta for inference (model name and config, classes,
                         size, normalisation, the config, the epoch)
    metrics.csv          per epoch: size, lr, train loss / accuracy, val top-1 /
                         top-5 (centre view), seconds
    curves.png           the metrics as curves (redrawn at most every 30 s, and at the end)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sppnet.data.checks import check_classification_data
from sppnet.data.transforms import TrainTransform
from sppnet.engine.amp import autocast_context, grad_scaler
from sppnet.engine.classify.config import ClassifyConfig
from sppnet.engine.classify.data import AugmentedDataset, builtin_data_root, make_loader, open_image_folder
from sppnet.engine.classify.inference import evaluate_counts, inference_meta
from sppnet.engine.classify.schedules import LRSchedule, SizeSchedule
from sppnet.engine.common import (
    GracefulInterrupt,
    MetricsLog,
    UserError,
    load_state,
    progress,
    save_state,
    save_weights,
    seed_everything,
)
from sppnet.engine.compile import compile_conv_layers
from sppnet.engine.distributed import (
    DistContext,
    ShardedBatchSampler,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_object,
    derive_seed,
    init_distributed,
    shutdown_distributed,
    wrap_model,
)
from sppnet.engine.limits import image_limits
from sppnet.engine.views import check_size
from sppnet.models import get_model
from sppnet.models.freeze import freeze
from sppnet.utils import (
    NonFiniteError,
    RunLock,
    RunLockError,
    capture_rng_state,
    check_finite_tensors,
    finite_or_raise,
    load_json,
    restore_rng_state,
    save_json,
)

__all__ = ["AuxiliaryHead", "TrainingInterrupted", "build_model", "build_optimizer", "build_lr_schedule", "train"]


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :func:`train` after Ctrl-C, once the checkpoint is written."""


def build_model(cfg: ClassifyConfig, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The network of ``cfg``, checked against ``cfg.size`` / ``small_size``, its ``cfg.freeze`` stages frozen.

    ``pretrained``: load ``cfg.weights`` (a new run); ``False`` when the weights
    come from a checkpoint next (a resumed run), so nothing is read twice.
    """
    cfg = cfg.resolved()
    weights = {"weights": cfg.weights} if pretrained and cfg.weights is not None else {}
    model = get_model(cfg.model, **cfg.model_kwargs(num_classes), **weights)
    fc_loaded = bool((getattr(model, "weights_report", None) or {}).get("fc_loaded"))
    if cfg.init == "he" and not fc_loaded:
        for layer in model.fc:
            if isinstance(layer, nn.Linear):  # fc6, fc7; the classifier keeps N(0, 0.01)
                nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
    if hasattr(model, "mean"):
        model.mean, model.std = cfg.mean, cfg.std  # saved in model.config()
    freeze(model, cfg.freeze)
    check_size(model, cfg.size, "size")
    if cfg.schedule != "single":
        check_size(model, cfg.small_size, "small_size")
    return model


class AuxiliaryHead(nn.Module):
    """The network and, for training only, a linear classifier on conv5's global max pool.

    ``forward(x)`` returns ``(logits, aux_logits)``: the network's own, and the
    auxiliary classifier's on the per-channel maximum of the conv5 maps (the
    value the pyramid's 1x1 bin holds). Its loss (``aux_weight`` times its
    cross-entropy) gives the conv layers a direct class signal from the first
    step, which the pyramid's wide fc6 input does not (benchmarks/README.md,
    "An auxiliary classifier on the 1x1 bin"); it is beyond the paper. The
    network is ``self.model``; the auxiliary layer (``self.aux``) is saved in
    the resumable checkpoint only, never with the model.
    """

    def __init__(self, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.aux = nn.Linear(model.feature_channels, num_classes)
        nn.init.normal_(self.aux.weight, 0.0, 0.01)
        nn.init.zeros_(self.aux.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.forward_features(x)
        return self.model.forward_head(maps), self.aux(maps.amax(dim=(-2, -1)))


def build_optimizer(cfg: ClassifyConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum, weight decay on every parameter (Sec. 3.1); or AdamW
    with decoupled weight decay on the conv / fc weights only (not on biases
    and batch-norm parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]  # --freeze: frozen layers stay out
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_lr_schedule(cfg: ClassifyConfig, num_classes: int | None = None) -> LRSchedule:
    """The learning-rate schedule of ``cfg``; multi- and random-size runs judge plateaus after pairs of epochs.

    With ``num_classes``, plateaus are counted only once validation top-1 has beaten
    chance by half (``1.5 / num_classes``): the rate is not divided on the initial plateau.
    """
    return LRSchedule(
        cfg.lr_schedule,
        cfg.lr,
        cfg.lr_steps,
        cfg.warmup_epochs,
        cfg.patience,
        cfg.max_reductions,
        check_every=1 if cfg.schedule == "single" else 2,
        floor=1.5 / num_classes if num_classes else -math.inf,
    )


@dataclass
class EpochTotals:
    """Running sums of one rank's partial epoch (checkpointed mid-epoch as a list)."""

    loss_sum: float = 0.0  # cross-entropy summed over samples
    correct: float = 0.0  # top-1 hits on the augmented training crops
    seen: float = 0.0  # samples

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss_sum += float(loss.detach()) * len(y)
        self.correct += float((logits.detach().argmax(1) == y).sum())
        self.seen += len(y)

    def as_list(self) -> list[float]:
        return [self.loss_sum, self.correct, self.seen]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> EpochTotals:
        return cls(*(float(v) for v in values))


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
    resume_hint: bool = True,
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
        resume_hint: after Ctrl-C, print the ``sppnet classify train --resume``
            command (off when another command drives the run, e.g. the
            detector's backbone pretraining).

    Returns:
        ``out``, with ``model.safetensors`` holding the final weights.

    Raises:
        UserError / ValueError: bad settings or data (one-line messages).
        RunLockError: another process writes to ``out`` (naming its PID), or ``out`` is a file.
        NonFiniteError: the loss or the weights turned NaN / inf (training
            diverged); the last finite checkpoint is kept.
        TrainingInterrupted: after Ctrl-C, once a checkpoint is written.
    """
    out = Path(out)
    ckpt_path = out / "last.safetensors"
    if resume:
        if not (out / "config.json").is_file():
            raise UserError(f"nothing to resume: {out / 'config.json'} does not exist")
        cfg = ClassifyConfig.from_dict(load_json(out / "config.json")).check_resume(cfg)
    else:
        cfg = (cfg or ClassifyConfig()).resolved()
    import torch.distributed as dist

    owns_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_distributed(cfg.device)
    try:
        with _run_lock(out, ctx), image_limits(cfg.limits):
            if not resume and ckpt_path.exists():  # checked under the lock: a run started at once is refused above
                raise UserError(
                    f"{out} already holds a training run; pass --resume to continue it or choose another --out"
                )
            resumed = resume and ckpt_path.exists()
            return _train(cfg, ctx, train_set, val_set, classes, out, resumed, verbose, resume_hint)
    finally:
        if owns_group:
            shutdown_distributed(ctx)


@contextlib.contextmanager
def _run_lock(out: Path, ctx: DistContext) -> Iterator[None]:
    """One writer per run folder (:class:`~sppnet.utils.RunLock`), taken by rank 0, which writes ``out``.

    Under ``torchrun`` the other ranks learn whether rank 0 got it and stop with it if not.
    """
    lock, refused = None, None
    if ctx.is_main:
        try:
            lock = RunLock(out).acquire()
        except RunLockError as e:
            refused = e
    message = broadcast_object(None if refused is None else str(refused), ctx)
    if refused is not None:
        raise refused
    if message is not None:
        raise RunLockError(message, out)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _check_loss(loss: float, ctx: DistContext, out: Path, epoch: int, step: int, steps: int, lr: float) -> None:
    """Stops training at the first non-finite loss, on every rank at the same step.

    ``loss`` is this rank's loss of batch ``step`` (1-based) of 0-based ``epoch``;
    ``steps`` is the number of batches per epoch. The weights are then not finite
    either (or about to be), so nothing more is saved: ``last.safetensors`` keeps
    the last finite state.
    """
    diverged = not math.isfinite(loss)
    if ctx.distributed:  # under DDP a NaN on one rank reaches every rank's weights through the gradients
        diverged = all_reduce_sum([float(diverged)], ctx)[0] > 0
    if not diverged:
        return
    ckpt = out / "last.safetensors"
    kept = f"{ckpt} holds the last finite state" if ckpt.is_file() else "no checkpoint was written yet"
    hint = f"lower --lr (--pretrain-lr for a detector's backbone) or raise --batch-size and train again; {kept}"
    name = f"training loss in epoch {epoch + 1}, batch {step}"
    if math.isfinite(loss):  # another rank diverged
        raise NonFiniteError(f"{name} is not finite on another process with lr {lr:g}: training diverged; {hint}", name)
    finite_or_raise(name, loss, step=epoch * steps + step, lr=lr, hint=hint)


def _open_data(
    cfg: ClassifyConfig,
    ctx: DistContext,
    train_set: Dataset | None,
    val_set: Dataset | None,
    classes: Sequence[str] | None,
    verbose: bool,
) -> tuple[Dataset, Dataset | None, list[str]]:
    """``(train_set, val_set, classes)``: the given sets, or the ImageFolder splits of ``cfg.data``."""
    if train_set is None:
        if cfg.data is None:
            root = builtin_data_root() if ctx.is_main else None
            barrier(ctx)  # rank 0 generates the cached set, then everyone reads it
            root = root or builtin_data_root()
        else:
            root = Path(cfg.data)
            if not root.is_dir():
                raise UserError(f"data folder {root} does not exist")
        train_set = open_image_folder(root, "train", classes, verbose)
        classes = train_set.classes
        if val_set is None and (root / "val").is_dir():
            val_set = open_image_folder(root, "val", classes, verbose)
    if classes is None:
        classes = getattr(train_set, "classes", None)
        if classes is None:
            raise ValueError("pass classes=[...] (names in label order) with a train_set that has no .classes")
    if len(train_set) == 0:
        raise UserError("the training set is empty")
    report = check_classification_data(train_set, classes, val=val_set)  # one class, empty splits: errors
    if verbose and report.warnings:  # (skipped files were reported by open_image_folder)
        print(report.summary(), file=sys.stderr)
    return train_set, val_set, [str(c) for c in classes]


def _train(
    cfg: ClassifyConfig,
    ctx: DistContext,
    train_set: Dataset | None,
    val_set: Dataset | None,
    classes: Sequence[str] | None,
    out: Path,
    resume: bool,
    verbose: bool,
    resume_hint: bool = True,
) -> Path:
    say = verbose and ctx.is_main
    if cfg.batch_size % ctx.world_size:
        raise UserError(f"batch_size {cfg.batch_size} must be divisible by the {ctx.world_size} processes")
    local_batch = cfg.batch_size // ctx.world_size
    if local_batch < 2 and (cfg.norm == "bn" or cfg.fc_norm):
        raise UserError(
            f"batch_size {cfg.batch_size} over {ctx.world_size} process(es) gives batches of {local_batch}: batch "
            f"norm needs at least 2 per process; raise --batch-size (or use --norm lrn --no-fc-norm)"
        )
    train_set, val_set, classes = _open_data(cfg, ctx, train_set, val_set, classes, say)
    if len(train_set) < 2 * ctx.world_size:
        raise UserError(
            f"{len(train_set)} training image(s) for {ctx.world_size} process(es): every process needs at least 2 "
            f"per batch (batch norm cannot normalise one sample)"
        )

    # ---- model, optimiser, schedule
    seed_everything(cfg.seed)
    model = build_model(cfg, len(classes), pretrained=not resume).to(ctx.device)  # same initial weights on every rank
    if ctx.rank:
        torch.manual_seed(derive_seed(cfg.seed, ctx.rank))  # own dropout masks per rank
    # --aux-weight: the auxiliary classifier trains with the network (and under DDP with it);
    # with every conv layer frozen (--freeze conv) its loss would reach nothing that is trained
    aux = cfg.aux_weight > 0 and cfg.freeze != "conv"
    trainee: nn.Module = AuxiliaryHead(model, len(classes)).to(ctx.device) if aux else model
    optimizer = build_optimizer(cfg, trainee)
    schedule = SizeSchedule(cfg.schedule, cfg.size, cfg.small_size, cfg.seed)
    lr_schedule = build_lr_schedule(cfg, len(classes) if val_set is not None else None)
    metrics = MetricsLog(out / "metrics.csv")
    start_epoch, start_step, totals, elapsed = 0, 0, EpochTotals(), 0.0
    trained = 0.0  # seconds of training (epochs with their validation) before this one
    if resume:
        state = load_state(out / "last.safetensors")
        model.load_state_dict(state["model"])
        if isinstance(trainee, AuxiliaryHead):
            trainee.aux.load_state_dict(state["aux"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if "lr_schedule" in state:  # absent in runs written before the plateau rule (fixed steps only)
            lr_schedule.load_state_dict(state["lr_schedule"])
            trained = float(state["trained"])
        start_epoch, start_step = int(state["epoch"]), int(state["step"])
        rngs = state["rng"]
        if len(rngs) == ctx.world_size:
            restore_rng_state(rngs[ctx.rank])
        else:  # resumed on another number of processes: exactness is lost, determinism kept
            seed_everything(derive_seed(cfg.seed, start_epoch, start_step, ctx.rank))
        if start_step and len(state["running"]) == ctx.world_size:
            totals = EpochTotals.from_list(state["running"][ctx.rank])
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
    # --compile: conv layers compiled for every forward of this run; the weights saved are
    # model's own (the compiled module is no part of its state_dict)
    compile_conv_layers(model, cfg.compile)
    ddp_model = wrap_model(trainee, ctx)

    if say:
        print(
            f"training {cfg.model} ({'SPP ' + str(list(cfg.levels)) if cfg.spp else 'no SPP'}, width {cfg.width}) "
            f"on {len(train_set)} images of {len(classes)} classes, schedule {cfg.schedule} "
            f"(sizes {cfg.size}/{cfg.small_size}), {cfg.epochs} epochs, {ctx.world_size} process(es) on {ctx.device}",
            file=sys.stderr,
        )
    if (start_epoch >= cfg.epochs or lr_schedule.stopped) and say:
        print(f"{out} already finished ({start_epoch} epochs); nothing to do", file=sys.stderr)

    train_cache = {} if cfg.cache_images else None
    val_cache = {} if cfg.cache_images else None
    interrupt = GracefulInterrupt()
    last_plot = time.monotonic()
    with interrupt:
        for epoch in range(start_epoch, cfg.epochs):
            if lr_schedule.stopped:
                break
            epoch_size = schedule.size_for(epoch)
            lr_schedule.plan(epoch, cfg.epochs, cfg.time_budget, trained)  # cosine's length
            transform = TrainTransform(
                cfg.size,
                epoch_size,
                alphastd=cfg.alphastd,
                crop=cfg.crop,
                scale=(cfg.crop_scale, 1.0),
                jitter=cfg.jitter,
                mean=cfg.mean,
                std=cfg.std,
            )
            data = AugmentedDataset(train_set, transform, cfg.seed, epoch, train_cache)
            sampler = ShardedBatchSampler(
                len(data), cfg.batch_size, cfg.seed, epoch, ctx.rank, ctx.world_size, start=start_step
            )
            loader = make_loader(
                data,
                local_batch,
                cfg.workers,
                derive_seed(cfg.seed, epoch, 7),
                batch_sampler=sampler,
                cuda=ctx.device.type == "cuda",
            )
            # each rank's share of a global batch, so that DDP's average is the global mean
            weights = [ctx.world_size / size for size in sampler.global_sizes()]
            t0 = time.perf_counter() - elapsed
            scaler = grad_scaler(ctx.device, cfg.amp)  # fp16 on CUDA only; else it passes values through
            trainee.train()
            steps = start_step + len(loader)
            bar = progress(loader, desc=f"epoch {epoch + 1}/{cfg.epochs} @{epoch_size}", total=len(loader), enabled=say)
            step = start_step
            for (pixels, colour, y), weight in zip(bar, weights):
                lr = lr_schedule.lr(epoch, (step + 1) / steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                x = transform.photometric(pixels.to(ctx.device, non_blocking=True), colour)
                y = y.to(ctx.device, non_blocking=True)
                with autocast_context(ctx.device, cfg.amp):
                    if aux:
                        logits, aux_logits = ddp_model(x)
                        aux_losses = F.cross_entropy(
                            aux_logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="none"
                        )
                    else:
                        logits, aux_losses = ddp_model(x), None
                    losses = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing, reduction="none")
                    loss = losses.mean()  # this rank's mean of the network's own loss (reported)
                    if aux_losses is not None:
                        losses = losses + cfg.aux_weight * aux_losses
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(losses.sum() * weight).backward()
                scaler.step(optimizer)
                scaler.update()
                totals.add(loss, logits, y)
                step += 1
                _check_loss(float(losses.detach().mean()), ctx, out, epoch, step, steps, lr)
                if step < steps and _stop_requested(interrupt, ctx):
                    seconds = time.perf_counter() - t0
                    _checkpoint(
                        out, ctx, trainee, optimizer, schedule, lr_schedule, epoch, step, totals, seconds, trained
                    )
                    _interrupted(out, ctx, epoch, step, resume_hint)
            del bar, loader
            loss_sum, correct, seen = all_reduce_sum(totals.as_list(), ctx)
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "size": epoch_size,
                "lr": lr_schedule.lr(epoch),
                "train_loss": loss_sum / max(seen, 1),
                "train_acc": correct / max(seen, 1),
            }
            if val_set is not None and len(val_set):
                top1, top5, n, _, nll = evaluate_counts(model, val_set, cfg.views, cfg, ctx, cache=val_cache)
                row["val_top1"], row["val_top5"], row["val_loss"] = top1 / n, top5 / n, nll / n
            # rank 0's clock on every rank: the time budget decides the same on all of them
            row["seconds"] = broadcast_object(round(time.perf_counter() - t0, 3), ctx)
            trained += row["seconds"]
            lr_schedule.epoch_seconds.append(row["seconds"])
            start_step, totals, elapsed = 0, EpochTotals(), 0.0
            check_finite_tensors(model, "model parameters", step=(epoch + 1) * steps, lr=lr)  # on every rank
            # the plateau rule and the kept weights follow validation top-1; without a validation
            # set the rule follows the training loss and the last epoch's weights are kept
            used = trained / cfg.time_budget if cfg.time_budget is not None else None
            best = lr_schedule.end_epoch(
                epoch, row.get("val_top1", -row["train_loss"]), budget_used=used, loss=row.get("val_loss")
            )
            if ctx.is_main:
                if best or "val_top1" not in row:
                    save_weights(out / "model.safetensors", model, inference_meta(cfg, model, classes, epoch + 1))
                metrics.append(row)
                if (
                    epoch + 1 == cfg.epochs or lr_schedule.stopped or time.monotonic() - last_plot > 30
                ):  # a plot costs ~0.5 s
                    metrics.plot(out / "curves.png", title=f"{cfg.model} {cfg.schedule}-size")
                    last_plot = time.monotonic()
            if cfg.time_budget is not None and trained + (lr_schedule.pace() or 0.0) > cfg.time_budget:
                lr_schedule.stopped = True  # the next epoch would end past the budget
            _checkpoint(out, ctx, trainee, optimizer, schedule, lr_schedule, epoch + 1, 0, totals, 0.0, trained)
            if say:
                val = f" val top-1 {row['val_top1']:.3f} top-5 {row['val_top5']:.3f}" if "val_top1" in row else ""
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} size {epoch_size} lr {row['lr']:.2g} loss {row['train_loss']:.4f} "
                    f"acc {row['train_acc']:.3f}{val} ({row['seconds']:.1f}s){' *' if best else ''}",
                    file=sys.stderr,
                )
                if lr_schedule.stopped:
                    print(f"stopped after epoch {epoch + 1}; kept epoch {lr_schedule.best_epoch}", file=sys.stderr)
            if epoch + 1 < cfg.epochs and _stop_requested(interrupt, ctx):
                _interrupted(out, ctx, epoch + 1, 0, resume_hint)
    barrier(ctx)
    return out


def _checkpoint(
    out: Path,
    ctx: DistContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: SizeSchedule,
    lr_schedule: LRSchedule,
    epoch: int,
    step: int,
    totals: EpochTotals,
    elapsed: float,
    trained: float,
) -> None:
    """``last.safetensors``: the resumable state (all ranks' RNG states and counters).

    ``model`` is the network, or the :class:`AuxiliaryHead` that trains it (whose
    auxiliary layer is saved as ``aux``).
    """
    check_finite_tensors(model, "model parameters", hint="lower --lr and train again")  # nothing non-finite is saved
    aux = model.aux.state_dict() if isinstance(model, AuxiliaryHead) else None
    model = model.model if isinstance(model, AuxiliaryHead) else model
    rngs = all_gather_objects(capture_rng_state(), ctx)
    runs = all_gather_objects(totals.as_list(), ctx)
    if ctx.is_main:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "lr_schedule": lr_schedule.state_dict(),
            "rng": rngs,
            "epoch": int(epoch),  # epochs completed
            "step": int(step),  # batches done in the next epoch (0 at an epoch boundary)
            "running": runs,  # per rank: EpochTotals.as_list() of the partial epoch
            "elapsed": float(elapsed),
            "trained": float(trained),  # seconds of the completed epochs (for time_budget)
        }
        if aux is not None:
            state["aux"] = aux
        save_state(out / "last.safetensors", state)
    barrier(ctx)


def _interrupted(out: Path, ctx: DistContext, epoch: int, step: int, resume_hint: bool = True):
    if ctx.is_main:
        where = f"after epoch {epoch}" if step == 0 else f"in epoch {epoch + 1} after batch {step}"
        print(
            f"\ninterrupted {where}: checkpoint written to {out / 'last.safetensors'}"
            + (f"\nresume with: sppnet classify train --out {out} --resume" if resume_hint else ""),
            file=sys.stderr,
        )
    raise TrainingInterrupted()
