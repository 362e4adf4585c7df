"""Mixed precision on CUDA: ``torch.autocast`` for conv and fc layers, bf16 or fp16, or nothing.

``--amp bf16 | fp16`` runs the layers that autocast lists (convolutions, linear
layers) in 16 bits on a CUDA device; everything else, the spatial pyramid
pooling included, runs in the dtype of its input (max pooling is exact in any
dtype: it selects, it does not round). Training with fp16 needs loss scaling
(:func:`grad_scaler`); bf16 has float32's exponent range and needs none.

On the CPU, and with ``amp=None``, both helpers are no-ops, so one code path
serves every device::

    with autocast_context(device, cfg.amp):
        loss = criterion(model(x), y)
    scaler.scale(loss).backward()  # scaler = grad_scaler(device, cfg.amp)
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_CHOICES", "autocast_context", "grad_scaler", "parse_amp"]

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

#: Values of ``--amp``: a 16-bit dtype, or off.
AMP_CHOICES: tuple[str, ...] = ("bf16", "fp16", "none")


def parse_amp(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value.

    Args:
        amp: ``"bf16"`` / ``"bfloat16"``, ``"fp16"`` / ``"float16"`` (any case), or
            ``None`` / ``"none"`` / ``"off"`` for full precision.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or None.

    Raises:
        ValueError: any other value, naming it.
    """
    key = amp.strip().lower() if isinstance(amp, str) else amp
    if key is None or key in ("none", "off"):
        return None
    if key not in _DTYPES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return _DTYPES[key]


def autocast_context(
    device: torch.device | str, amp: str | None
) -> contextlib.AbstractContextManager[None] | torch.autocast:
    """``torch.autocast("cuda", dtype)`` for a CUDA device and a 16-bit ``amp``; a no-op otherwise.

    Args:
        device: where the model runs.
        amp: see :func:`parse_amp` (validated on every device).

    Raises:
        ValueError: an unknown ``amp``, or bf16 on a GPU without bfloat16 support.
    """
    dtype = parse_amp(amp)
    device = torch.device(device)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    if dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"amp 'bf16' needs a GPU with bfloat16 support, {name} has none: use 'fp16'")
    return torch.autocast("cuda", dtype=dtype)


def grad_scaler(device: torch.device | str, amp: str | None) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 on CUDA (disabled, it passes values through unchanged)."""
    enabled = parse_amp(amp) is torch.float16 and torch.device(device).type == "cuda"
    return torch.amp.GradScaler("cuda", enabled=enabled)
