"""``--compile``: ``torch.compile`` of the conv layers, falling back to eager execution when it fails.

Only the conv layers (a network's ``features``, conv1-conv5) are compiled. The
spatial pyramid runs numba kernels on the CPU that Dynamo cannot trace, and
its bins depend on the map size, so a traced pyramid would be specialised to
every input size; the fc layers are a few matrix products with little to fuse.
The conv layers are compiled with dynamic shapes (``dynamic=True``): SPP-net
feeds them images of any size. Measured with torch 2.14 on the CPU
(``benchmarks/bench_compile.py``, ``tests/test_compile.py``): without
gradients (feature caching, detection, validation) one graph serves every
size, plus one for square inputs (Dynamo gives equal sizes one symbol) and one
for batches of one; a training graph (forward and backward) is specialised by
Inductor to its conv5 map size, so training builds one graph per input size
of its schedule (two for ``multi``).

Compilation is lazy: ``torch.compile`` returns at once and the graph is built
at the first call, which is where a missing C++ compiler or an operator
Inductor cannot lower shows up. :class:`CompiledModule` therefore tries the
compiled call and, when it raises, warns once (:class:`CompileWarning`, one
line naming the error) and runs the eager module from then on; an error of the
input itself (a wrong shape) is raised by the eager module as it would be
without ``--compile``. The backward graph is lowered during that same call
(AOTAutograd would otherwise defer it to the first ``backward()`` in some
cases), so a failure to compile it falls back the same way instead of
stopping training.

Saved weights never see the compiled module: :func:`compile_conv_layers`
keeps it in a plain attribute (``conv_runner``) that ``forward_features``
uses, so ``state_dict`` has the same keys (no ``_orig_mod.``) with and
without ``--compile``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "COMPILE_CHOICES",
    "CompileWarning",
    "CompiledModule",
    "check_compile",
    "compile_conv_layers",
    "maybe_compile",
]

#: Values of ``--compile``: off, or a ``torch.compile`` mode.
COMPILE_CHOICES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune")


class CompileWarning(RuntimeWarning):
    """``torch.compile`` failed; the module runs eagerly instead."""


def check_compile(mode: str) -> str:
    """``mode`` if it is one of :data:`COMPILE_CHOICES`, else ValueError naming it."""
    if mode not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {mode!r}")
    return mode


def _describe(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else "(no message)"
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(error).__name__}: {text}"


def _lower_backward_now() -> contextlib.AbstractContextManager[Any]:
    """Makes AOTAutograd compile a graph's backward with its forward (where this torch has the switch)."""
    try:
        from torch._functorch import config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


class CompiledModule:
    """``torch.compile(module, mode=mode, dynamic=True)``, or ``module`` itself once compiling has failed.

    A plain callable, not an ``nn.Module``: assigned to a module's attribute it
    is not registered as a submodule, so it never adds keys to a ``state_dict``.
    The compiled module shares ``module``'s parameters and buffers, so
    ``module.train()`` / ``.eval()`` / ``.to()`` and optimiser steps apply to both.

    Attributes:
        module: the eager module.
        mode: the ``torch.compile`` mode.
        what: what ``module`` is, for the warning (``"conv layers of zf5"``).
        error: why compiling failed (``"TypeName: message"``), or None.
    """

    def __init__(self, module: nn.Module, mode: str, what: str = "conv layers") -> None:
        check_compile(mode)
        if mode == "none":
            raise ValueError("CompiledModule needs a torch.compile mode, not 'none' (use maybe_compile)")
        self.module, self.mode, self.what = module, mode, what
        self.error: str | None = None
        self._compiled: Callable[..., Any] | None = None
        try:
            self._compiled = torch.compile(module, mode=mode, dynamic=True)
        except Exception as e:  # torch.compile unavailable on this Python / platform
            self._give_up(e)

    @property
    def active(self) -> bool:
        """True while calls go to the compiled module (False after a failure)."""
        return self._compiled is not None

    def _give_up(self, error: BaseException) -> None:
        self._compiled = None
        self.error = _describe(error)
        warnings.warn(
            f"torch.compile (mode {self.mode!r}) of the {self.what} failed, running them eagerly: {self.error}",
            CompileWarning,
            stacklevel=3,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        compiled = self._compiled
        if compiled is None:
            return self.module(*args, **kwargs)
        try:
            with _lower_backward_now():
                return compiled(*args, **kwargs)
        except Exception as e:
            # The eager module raises the input's own error (and compiling stays on);
            # when it succeeds the failure was the compiler's.
            out = self.module(*args, **kwargs)
            self._give_up(e)
            return out

    def __repr__(self) -> str:
        state = "compiled" if self.active else f"eager after {self.error}"
        return f"CompiledModule({type(self.module).__name__}, mode={self.mode!r}, {state})"


def maybe_compile(module: nn.Module, mode: str, what: str = "conv layers") -> nn.Module | CompiledModule:
    """``module`` for ``mode="none"``, else a :class:`CompiledModule` of it (eager again if compiling fails).

    Raises:
        ValueError: ``mode`` is not one of :data:`COMPILE_CHOICES`.
    """
    if check_compile(mode) == "none":
        return module
    return CompiledModule(module, mode, what)


def compile_conv_layers(model: nn.Module, mode: str) -> nn.Module:
    """Runs ``model``'s conv layers (``model.features``) compiled from now on; ``"none"`` undoes it.

    ``model`` is a network of :mod:`sppnet.models` (a Table 1 network or a
    torchvision backbone; a detector's ``backbone``): its ``forward_features``
    calls ``conv_runner`` in place of ``features``. Calling this again with the
    same mode keeps the compiled graph. Returns ``model``.

    Raises:
        ValueError: an unknown ``mode``; a model without ``features``.
    """
    check_compile(mode)
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Module):
        raise ValueError(f"{type(model).__name__} has no conv layers ('features') to compile")
    current = model.__dict__.get("conv_runner")
    if mode == "none":
        model.__dict__.pop("conv_runner", None)
        return model
    if isinstance(current, CompiledModule) and current.module is features and current.mode == mode:
        return model
    name = getattr(model, "name", type(model).__name__)
    model.__dict__["conv_runner"] = CompiledModule(features, mode, f"conv layers of {name}")
    return model
