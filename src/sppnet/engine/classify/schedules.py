"""Schedules of classification training: the input size of each epoch (Sec. 2.3)
and the learning rate of each step with the stopping rule (Sec. 3.1).

``single``: every epoch at ``size``; ``multi``: one FULL epoch at ``size``, then
one at ``small_size``, alternating (the small input is the ``size`` crop RESIZED:
same content, lower resolution); ``random``: each epoch's size drawn uniformly
from ``[small_size, size]`` (integers) by a seeded generator whose state is in
the checkpoint. One set of weights serves every size.

:class:`LRSchedule`: ``steps`` divides the learning rate by 10 at fixed epochs;
``plateau`` is the paper's rule, "the learning rate is divided by 10 when the
error plateaus" (Sec. 3.1): after ``patience`` epochs without a better
validation score it divides by 10, at most ``max_reductions`` times, and the
plateau after that ends training. Both start with an optional linear warm-up.

An epoch whose validation top-1 is no record but whose validation loss is a
record low (by more than :data:`LOSS_MARGIN`) is not counted as a plateau epoch:
on a few hundred validation images top-1 moves by several points from epoch to
epoch, and with top-1 alone the rule divided the rate of networks whose
validation loss was still falling (the objects set of benchmarks/README.md: at
epoch 9, best validation top-1 0.924; with the guard 0.952). The loss, summed
over every image's probability of its class, is the steadier sign that the
error is still falling.

Under a time budget (``--time-budget``) a run may end before its error has
plateaued twice, still at its first rate; so ``plateau`` also makes its
reductions due by fractions of the budget, :func:`budget_marks` (70 % and 85 %
for two), the way a fixed schedule would place them, if the rule has not made
them sooner (a network still at chance is left alone). The ``--epochs`` bound
does not (measured, benchmarks/README.md "The demo's recipe": on the built-in
shapes it gained 1 and 2.5 points of top-1 on two seeds, on two real-image sets it lost 1 and 5.5).

``cosine`` (beyond the paper): after the warm-up the rate falls along a half
cosine to 0 at the end of the run, :attr:`LRSchedule.horizon` epochs. Without a
budget that is ``epochs``; with one, :meth:`LRSchedule.plan` sets it before every
epoch to the last epoch that fits in the budget at the pace of the latest
epochs, so the whole budget is spent and its last epoch ends at a rate near 0.
There is no early stop: the best validation epoch is kept. It is an option,
not the default: on the built-in shapes it lost to the plateau rule both at a
120 s budget (0.563 vs 0.708 test top-1 at its peak rate 2e-3) and at 360 s
(0.824 vs 0.840 test top-1 at 1e-3), where both over-fit (benchmarks/README.md).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from sppnet.engine.distributed import derive_seed

__all__ = ["LOSS_MARGIN", "LR_SCHEDULES", "SCHEDULES", "LRSchedule", "SizeSchedule", "budget_marks"]

SCHEDULES: tuple[str, ...] = ("single", "multi", "random")
LR_SCHEDULES: tuple[str, ...] = ("plateau", "steps", "cosine")
#: A validation loss below ``(1 - LOSS_MARGIN)`` x the lowest so far is still progress.
LOSS_MARGIN: float = 0.01


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


def budget_marks(max_reductions: int) -> tuple[float, ...]:
    """Fractions of a time budget by which the plateau rule's reductions are due:
    evenly spaced over the last 30 % of the budget, ending at 85 % (``(0.7, 0.85)`` for 2)."""
    if max_reductions < 1:
        return ()
    if max_reductions == 1:
        return (0.7,)
    return tuple(0.7 + 0.15 * k / (max_reductions - 1) for k in range(max_reductions))


class LRSchedule:
    """Learning rate of every step, best epoch and stopping rule (Sec. 3.1); checkpointable.

    Args:
        kind: ``plateau``, ``steps`` or ``cosine`` (see the module docstring).
        lr: the initial learning rate.
        lr_steps: ``steps``: 0-based epochs from which lr is divided by another 10.
        warmup_epochs: the rate rises linearly from 0 over this many epochs.
        patience: ``plateau``: epochs without a better score before lr / 10; cycles
            of ``check_every`` epochs when that is above 1.
        max_reductions: ``plateau``: reductions before the next plateau stops training.
        check_every: ``plateau`` decides only after every ``check_every``-th epoch
            (2 in multi-size training: a full epoch at each size, Sec. 2.3; 2 in
            random-size training too, whose small-size epochs dip the same way), and
            counts ``patience`` in such cycles: validation after an epoch at the
            small size is regularly lower (the network, its batch-norm statistics
            included, was just trained at the other size), so counted in epochs the
            rule divided the rate of runs still learning fast (the demo, seed 1:
            at epoch 15 of 30, training accuracy 0.58 and rising 0.08 an epoch).

    :meth:`end_epoch` takes each epoch's score (higher is better: validation
    top-1) and, optionally, its validation loss, and says whether the score is
    the best so far; :attr:`stopped` turns true when the plateau rule ends training.
    """

    def __init__(
        self,
        kind: str,
        lr: float,
        lr_steps: Sequence[int] = (),
        warmup_epochs: float = 0.0,
        patience: int = 3,
        max_reductions: int = 2,
        check_every: int = 1,
        floor: float = -math.inf,
    ) -> None:
        if kind not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {kind!r}")
        if patience < 1 or max_reductions < 0 or check_every < 1 or warmup_epochs < 0:
            raise ValueError(
                f"need patience >= 1, max_reductions >= 0, check_every >= 1, warmup_epochs >= 0; got "
                f"{patience}, {max_reductions}, {check_every}, {warmup_epochs}"
            )
        self.kind, self.base_lr, self.lr_steps = kind, float(lr), tuple(int(s) for s in lr_steps)
        self.warmup_epochs, self.patience = float(warmup_epochs), int(patience)
        self.max_reductions, self.check_every = int(max_reductions), int(check_every)
        self.reductions = 0  # plateau: divisions by 10 so far
        self.best = -math.inf  # best score so far
        self.best_epoch = 0  # 1-based epoch of the best score (0: none yet)
        self.since_best = 0  # plateau epochs since the best score
        self.best_loss = math.inf  # lowest validation loss so far
        # plateau: epochs are counted only once the best score is above ``floor`` (chance
        # accuracy): a network still on its initial plateau has no error that "plateaus"
        # (Sec. 3.1), and dividing its rate there only keeps it at chance
        self.floor = float(floor)
        self.stopped = False
        self.horizon = math.inf  # cosine: epochs of the whole run (see plan())
        self.epoch_seconds: list[float] = []  # seconds of every completed epoch (cosine's pace)

    def plan(self, epoch: int, epochs: int, budget: float | None = None, trained: float = 0.0) -> float:
        """Sets and returns :attr:`horizon` before 0-based ``epoch``: ``epochs``, or under a
        time ``budget`` (seconds, ``trained`` of them spent) the last epoch that fits at the
        mean pace of the latest two epochs after the first, at least this one. The first
        epoch fills the image cache (7x a later one on the built-in shapes): until a second
        has been timed the horizon stays ``epochs``, so the rate does not fall to 0 at once."""
        horizon = float(epochs)
        pace = self.pace() if len(self.epoch_seconds) > 1 else None
        if budget is not None and pace is not None:
            horizon = min(horizon, epoch + max(1, math.floor((budget - trained) / pace)))
        self.horizon = horizon
        return horizon

    def pace(self) -> float | None:
        """Expected seconds of the next epoch: the mean of the latest two completed ones
        (the first, which fills the caches, only while it is the only one); ``None``: none yet."""
        times = self.epoch_seconds[1:][-2:] or self.epoch_seconds[-1:]
        return max(sum(times) / len(times), 1e-6) if times else None

    def lr(self, epoch: int, fraction: float = 1.0) -> float:
        """The rate of the step that completes ``fraction`` (in (0, 1]) of 0-based ``epoch``."""
        progress = epoch + fraction
        if self.kind == "cosine":
            span = self.horizon - self.warmup_epochs
            t = min(max((progress - self.warmup_epochs) / span, 0.0), 1.0) if span > 0 else 0.0
            lr = self.base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
        elif self.kind == "steps":
            lr = self.base_lr * 0.1 ** sum(1 for s in self.lr_steps if epoch >= s)
        else:
            lr = self.base_lr * 0.1**self.reductions
        if progress < self.warmup_epochs:
            lr *= progress / self.warmup_epochs
        return lr

    def end_epoch(self, epoch: int, score: float, budget_used: float | None = None, loss: float | None = None) -> bool:
        """Records 0-based ``epoch``'s score; returns whether it is the best so far.

        ``budget_used``: the fraction of the time budget spent after this epoch
        (``None``: no budget); see :func:`budget_marks`. ``loss``: the epoch's
        validation loss (``None``: not known); a record low keeps the epoch from
        counting towards a plateau (see the module docstring).
        """
        improved = score > self.best
        loss_fell = loss is not None and math.isfinite(loss) and loss < self.best_loss * (1.0 - LOSS_MARGIN)
        if loss is not None and math.isfinite(loss):
            self.best_loss = min(self.best_loss, float(loss))
        if improved:
            self.best, self.best_epoch, self.since_best = float(score), epoch + 1, 0
        elif self.best > self.floor and not loss_fell:
            self.since_best += 1
        due = self.since_best >= self.patience * self.check_every  # patience: whole cycles of sizes
        if self.kind == "plateau" and (epoch + 1) % self.check_every == 0 and due:
            if self.reductions >= self.max_reductions:
                self.stopped = True
            else:
                self.reductions += 1
                self.since_best = 0
        elif self.kind == "plateau" and budget_used is not None and self.best > self.floor:
            marks = budget_marks(self.max_reductions)
            due = sum(1 for m in marks if budget_used >= m)
            if due > self.reductions:
                self.reductions = due
                self.since_best = 0
        return improved

    def state_dict(self) -> dict:
        return {
            "reductions": self.reductions,
            "best": self.best if math.isfinite(self.best) else None,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "best_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "stopped": self.stopped,
            "epoch_seconds": list(self.epoch_seconds),
        }

    def load_state_dict(self, state: dict) -> None:
        self.reductions = int(state["reductions"])
        self.best = -math.inf if state["best"] is None else float(state["best"])
        self.best_epoch, self.since_best = int(state["best_epoch"]), int(state["since_best"])
        loss = state.get("best_loss")  # absent from checkpoints written before the loss guard
        self.best_loss = math.inf if loss is None else float(loss)
        self.stopped = bool(state["stopped"])
        self.epoch_seconds = [float(t) for t in state.get("epoch_seconds", [])]  # absent before cosine
