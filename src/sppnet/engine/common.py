"""What every training / evaluation loop shares: devices, seeds, metrics,
checkpoints of a run directory, clean interruption."""

from __future__ import annotations

import csv
import io
import os
import random
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np
import torch
from torch import nn

from sppnet.utils import atomic_write_text, flatten_state, load_checkpoint, save_checkpoint

__all__ = [
    "GracefulInterrupt",
    "MetricsLog",
    "UserError",
    "load_state",
    "load_weights",
    "progress",
    "resolve_device",
    "save_state",
    "save_weights",
    "seed_everything",
]


class UserError(ValueError):
    """A mistake on the user's side (bad path, bad flag): the CLI prints it without a traceback."""


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available else CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {spec} requested but CUDA is not available on this machine")
        return torch.device(spec)
    raise UserError(f"unknown device {spec!r}; use auto, cpu or cuda")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seeds python, numpy and torch; on request makes CPU kernels deterministic."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True


class MetricsLog:
    """Per-epoch metrics as CSV (rewritten atomically) plus a PNG of the curves."""

    def __init__(self, path: str | os.PathLike, rows: list[dict] | None = None) -> None:
        self.path = Path(path)
        self.rows: list[dict] = list(rows or [])

    @classmethod
    def load(cls, path: str | os.PathLike) -> MetricsLog:
        path = Path(path)
        if not path.exists():
            return cls(path)
        with open(path, newline="") as f:
            rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
        return cls(path, rows)

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        self.write()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` rows (resuming from a checkpoint written after row n)."""
        self.rows = self.rows[:n]
        self.write()

    def write(self) -> None:
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        for r in self.rows:
            w.writerow(r)
        atomic_write_text(self.path, buf.getvalue())

    def plot(self, png: str | os.PathLike, x: str = "epoch", title: str = "") -> Path | None:
        if not self.rows:
            return None
        from sppnet.viz.plots import plot_curves

        return plot_curves(self.rows, png, x=x, title=title)


def _num(v: str) -> Any:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


class GracefulInterrupt:
    """Turns the first Ctrl-C (SIGINT) into a flag the loop checks between steps.

    The loop then writes its checkpoint and stops; a second Ctrl-C interrupts
    immediately. Use as a context manager around the training loop.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt received: finishing the current step and writing a checkpoint...", file=sys.stderr)

    def __enter__(self) -> Self:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not in the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def save_weights(path: str | os.PathLike, model: nn.Module, meta: dict) -> None:
    """Model weights + JSON meta (e.g. model name, config, classes), atomically, safetensors."""
    save_checkpoint(path, *flatten_state({"model": _unwrap(model).state_dict(), "meta": meta}))


def load_weights(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """``(state_dict, meta)`` from :func:`save_weights`; never executes code from the file."""
    state = load_checkpoint(path, device=str(device))
    if not isinstance(state, dict) or "model" not in state:
        raise UserError(f"{path} holds no model weights (not written by sppnet's save_weights)")
    return state["model"], state.get("meta", {})


def save_state(path: str | os.PathLike, state: dict) -> None:
    """A resumable training state (nested dicts of tensors and JSON values), atomically."""
    save_checkpoint(path, *flatten_state(state))


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    return load_checkpoint(path, device=str(device))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def progress(iterable: Iterable, desc: str = "", total: int | None = None, enabled: bool = True) -> Iterator:
    """A tqdm bar on stderr (plain periodic lines when stderr is not a terminal)."""
    from tqdm import tqdm

    interval = 0.5 if sys.stderr.isatty() else 10.0
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            disable=not enabled,
            mininterval=interval,
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )
    )


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Self:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
