"""Per-epoch schedules of classification training: the input size (Sec. 2.3).

``single``: every epoch at ``size``; ``multi``: one FULL epoch at ``size``, then
one at ``small_size``, alternating (the small input is the ``size`` crop RESIZED:
same content, lower resolution); ``random``: each epoch's size drawn uniformly
from ``[small_size, size]`` (integers) by a seeded generator whose state is in
the checkpoint. One set of weights serves every size.
"""

from __future__ import annotations

import random

from sppnet.engine.distributed import derive_seed

__all__ = ["SCHEDULES", "SizeSchedule"]

SCHEDULES: tuple[str, ...] = ("single", "multi", "random")


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
