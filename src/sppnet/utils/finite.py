"""Finite or stop: NaN / inf checks for losses, weights and anything written as JSON.

A training run whose loss turns NaN keeps "training" NaN weights, saves them,
and its predictions print ``nan`` (and bare ``NaN`` in JSON, which is not JSON).
These helpers turn that into one clear error at the first sign::

    finite_or_raise("training loss", loss, step=step, lr=lr, hint="lower --lr")
    check_finite_tensors(model, "model parameters", step=step, lr=lr)  # before each checkpoint
    check_json_finite(entry, "predictions of cat.jpg")                 # before writing JSON

Every error is a :class:`NonFiniteError` (a ``ValueError``, so the CLI prints
one line and exits non-zero) that says what is not finite, where (the step,
the tensor or the JSON path), at which learning rate, and what to try.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "NonFiniteError",
    "check_finite_tensors",
    "check_json_finite",
    "find_non_finite",
    "finite_or_raise",
    "non_finite_tensors",
]

#: What the messages suggest when the caller gives no ``hint``.
DEFAULT_HINT = "lower the learning rate (or raise the batch size) and train again from the last finite checkpoint"


class NonFiniteError(ValueError):
    """A value that must be finite is NaN or infinite.

    Attributes:
        name (str): what was checked ("training loss", "model parameters", a JSON path).
        step (int | None), lr (float | None): where training was, if known.
    """

    def __init__(self, message: str, name: str, step: int | None = None, lr: float | None = None) -> None:
        super().__init__(message)
        self.name = name
        self.step = step
        self.lr = lr


def _where(step: int | None, lr: float | None) -> str:
    parts = []
    if step is not None:
        parts.append(f"at step {step}")
    if lr is not None:
        parts.append(f"with lr {lr:g}")
    return (" " + " ".join(parts)) if parts else ""


def _describe_array(values: np.ndarray) -> str:
    """``nan``, ``inf``, ``-inf`` for one value; counts for several."""
    if values.size == 1:
        return str(float(values.reshape(-1)[0]))
    nan = int(np.isnan(values).sum())
    inf = int(np.isinf(values).sum())
    kinds = [f"{nan} NaN"] * bool(nan) + [f"{inf} infinite"] * bool(inf)
    return f"{' and '.join(kinds)} of {values.size} values"


def _as_numpy(value: Any) -> np.ndarray | None:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float64).numpy() if value.is_floating_point() else None
    if isinstance(value, np.ndarray):
        return value.astype(np.float64) if np.issubdtype(value.dtype, np.floating) else None
    if isinstance(value, (float, np.floating)):
        return np.asarray(value, dtype=np.float64)
    return None


def finite_or_raise(
    name: str, value: Any, *, step: int | None = None, lr: float | None = None, hint: str | None = None
) -> Any:
    """Returns ``value`` if it is finite, else raises a :class:`NonFiniteError` saying so.

    Args:
        name: what the value is ("training loss", "--ft-lr").
        value: a number, a Tensor (every element is checked; one device sync)
            or a numpy array; integers and non-float tensors are always finite.
        step: the training step (iteration or epoch), for the message.
        lr: the learning rate in use, for the message.
        hint: what to suggest; default :data:`DEFAULT_HINT` when ``step`` or
            ``lr`` is given (training diverged), nothing otherwise.

    Raises:
        NonFiniteError: e.g. ``training loss is nan at step 1200 with lr 0.01:
        training diverged; lower the learning rate ...``.
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or bool(torch.isfinite(value).all()):
            return value
    else:
        array = _as_numpy(value)
        if array is None or bool(np.isfinite(array).all()):
            return value
    diverged = step is not None or lr is not None
    tail = f": training diverged; {hint or DEFAULT_HINT}" if diverged else (f"; {hint}" if hint else "")
    raise NonFiniteError(f"{name} is {_describe_array(_as_numpy(value))}{_where(step, lr)}{tail}", name, step, lr)


def _named_tensors(tensors: nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterable[tuple[str, Any]]:
    if isinstance(tensors, nn.Module):
        yield from tensors.named_parameters()
        yield from tensors.named_buffers()
    elif isinstance(tensors, Mapping):
        yield from tensors.items()
    else:
        yield from tensors


def non_finite_tensors(
    tensors: nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> list[tuple[str, int, int]]:
    """The floating tensors that hold NaN or inf.

    Args:
        tensors: a module (its parameters and buffers), a state dict, or
            ``(name, tensor)`` pairs; non-tensor and integer entries are ignored.

    Returns:
        ``[(name, non-finite count, numel), ...]`` in the order given; empty if all are finite.
    """
    bad = []
    for name, t in _named_tensors(tensors):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            count = int((~torch.isfinite(t.detach())).sum())
            if count:
                bad.append((name, count, t.numel()))
    return bad


def check_finite_tensors(
    tensors: nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]],
    what: str = "model parameters",
    *,
    step: int | None = None,
    lr: float | None = None,
    hint: str | None = None,
) -> None:
    """Raises a :class:`NonFiniteError` naming every tensor that holds NaN or inf.

    Call it before writing a checkpoint (nothing non-finite is ever saved) and
    after loading one (a diverged checkpoint is refused, not used to predict).

    Args:
        tensors: as in :func:`non_finite_tensors`.
        what: how to call them ("model parameters", "weights in run/model.safetensors").
        step, lr, hint: as in :func:`finite_or_raise`.

    Raises:
        NonFiniteError: e.g. ``model parameters hold NaN or inf at step 800 with
        lr 0.01: fc6.weight (12 of 4096 values), fc6.bias (all 64 values):
        training diverged; ...``.
    """
    bad = non_finite_tensors(tensors)
    if not bad:
        return
    listed = ", ".join(
        f"{name} ({'all ' + str(n) if count == n else f'{count} of {n}'} values)" for name, count, n in bad[:5]
    )
    more = f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""
    diverged = step is not None or lr is not None
    tail = f": training diverged; {hint or DEFAULT_HINT}" if diverged else (f"; {hint}" if hint else "")
    raise NonFiniteError(f"{what} hold NaN or inf{_where(step, lr)}: {listed}{more}{tail}", what, step, lr)


def find_non_finite(obj: Any, path: str = "") -> str | None:
    """The path of the first NaN / inf in a JSON-like value, or ``None`` if there is none.

    Args:
        obj: nested dicts, lists and tuples of numbers, strings, ``None``,
            numpy arrays or Tensors.
        path: prefix of the returned path.

    Returns:
        e.g. ``"detections[2].score"`` (``"[3]"`` indexes a list or array).
    """
    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "value")
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            found = find_non_finite(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            found = find_non_finite(value, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    array = _as_numpy(obj)
    if array is not None and not np.isfinite(array).all():
        if array.ndim == 0:
            return path or "value"
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        return f"{path}[{', '.join(map(str, first))}]"
    return None


def check_json_finite(obj: Any, where: str, hint: str | None = None) -> Any:
    """Returns ``obj`` if it holds no NaN / inf (see :func:`find_non_finite`), else raises.

    Args:
        obj: what is about to be written as JSON (a prediction, metrics).
        where: what it is, for the message ("predictions of cat.jpg").
        hint: what to suggest; default: the model's weights are probably
            diverged, retrain with a lower learning rate.

    Raises:
        NonFiniteError: naming ``where`` and the path of the first bad value.
    """
    found = find_non_finite(obj)
    if found is None:
        return obj
    hint = hint or "the model's weights are probably diverged (NaN); train it again with a lower learning rate"
    raise NonFiniteError(f"{where}: {found} is not a finite number, refusing to write it as JSON; {hint}", where)
