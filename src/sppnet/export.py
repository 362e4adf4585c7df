"""Exporting SPP models: ONNX with dynamic input size, TorchScript, ``torch.export``.

The point of SPP-net is that one network takes images of any size; an exported
model should too. PyTorch's ONNX export of adaptive pooling only works where the
output size divides the input size, so a pyramid written with
``F.adaptive_max_pool2d`` exports for one size at best. :func:`sppnet.ops.spatial_pyramid_pool` switches to a
mask-based formulation whenever it is traced or exported (``_is_exporting`` in
``ops/spp.py``), which exports with symbolic ``H`` and ``W``:

* ``torch.jit.trace`` and the TorchScript ONNX exporter set
  ``torch.jit.is_tracing()`` (the latter also ``torch.onnx.is_in_onnx_export()``);
* ``torch.export.export`` and the dynamo ONNX exporter (torch >= 2.5) set
  ``torch.compiler.is_exporting()``; in torch 2.14 the dynamo ONNX exporter
  sets ``torch.onnx.is_in_onnx_export()`` as well.

Every function here works for any ``nn.Module`` whose ``forward`` takes one
``Tensor[N, C, H, W]`` (a model from ``sppnet.models``, or a bare
:class:`~sppnet.ops.SpatialPyramidPool`) and returns a tensor or a tuple/list/
dict of tensors. Each export is checked against eager PyTorch at several input
sizes; a mismatch raises :class:`ExportMismatchError`.

Only the Appendix bins (``bins="adaptive"``, the default) are size-generic. The
Sec. 2.3 rule (``bins="sliding"``) fixes its window and stride per input size,
so such a layer exports with ``dynamic_hw=False`` only; with dynamic sizes
``torch.export`` refuses it ("specialized it to be a constant").
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["export_onnx", "export_torchscript", "export_program", "ExportMismatchError"]

Size = tuple[int, int]


class ExportMismatchError(RuntimeError):
    """The exported model disagrees with eager PyTorch (or fails) at some input size."""


# --------------------------------------------------------------------------- helpers


def _example_tensor(model: nn.Module, example: Tensor | Size, in_channels: int) -> Tensor:
    """The tracing input: ``example`` itself, or a seeded ``randn(2, in_channels, H, W)``."""
    if isinstance(example, Tensor):
        if example.dim() != 4:
            raise ValueError(f"example must be a Tensor[N, C, H, W], got shape {tuple(example.shape)}")
        return example.to(_device(model))
    try:
        h, w = (int(v) for v in example)
    except (TypeError, ValueError):
        raise ValueError(f"example must be a Tensor[N, C, H, W] or an (H, W) pair, got {example!r}") from None
    if h < 1 or w < 1 or in_channels < 1:
        raise ValueError(f"example size and in_channels must be positive, got {(h, w)} and {in_channels}")
    return _random_input(2, in_channels, (h, w), torch.float32, _device(model), seed=0)


def _random_input(n: int, c: int, size: Size, dtype: torch.dtype, device: torch.device, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, *size, generator=g, dtype=dtype).to(device)


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _prepare_example(x: Tensor, dynamic_batch: bool, dynamic_hw: bool) -> Tensor:
    """Exporters specialise dims of size 1 (0/1 specialisation): make dynamic dims >= 2."""
    if dynamic_batch and x.shape[0] == 1:
        x = torch.cat([x, x], dim=0)
    if dynamic_hw and min(x.shape[-2:]) < 2:
        raise ValueError(
            f"with dynamic_hw=True the example needs H, W >= 2 (size-1 dims get specialised), got {tuple(x.shape[-2:])}"
        )
    return x


def _default_sizes(x: Tensor, dynamic_hw: bool) -> list[Size]:
    """The example's size plus two others that divide nothing evenly (when H, W are dynamic)."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if not dynamic_hw:
        return [(h, w)]
    return [(h, w), (h + 19, w + 7), (h + 5, w + 29)]


def _flat_outputs(out) -> list[Tensor]:
    """Output tensors in the order exporters flatten them (tuple/list order, dict insertion order)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    raise TypeError(f"model outputs must be tensors or tuples/lists/dicts of tensors, got {type(out).__name__}")


def _compare(
    kind: str, size: Size, got: Sequence[Tensor], want: Sequence[Tensor], atol: float, rtol: float
) -> dict[str, float]:
    """``max_abs_err`` over all outputs and ``max_rel_err`` (the same over max ``|eager|``).

    Raises ExportMismatchError where a value differs by more than ``atol + rtol * |eager|``.
    """
    if len(got) != len(want):
        raise ExportMismatchError(f"{kind} at {size[0]}x{size[1]}: {len(got)} outputs, eager gives {len(want)}")
    worst, scale = 0.0, 0.0
    for i, (g, e) in enumerate(zip(got, want)):
        g = torch.as_tensor(g).detach().cpu().to(torch.float64)
        e = e.detach().cpu().to(torch.float64)
        if g.shape != e.shape:
            raise ExportMismatchError(
                f"{kind} at {size[0]}x{size[1]}: output {i} has shape {tuple(g.shape)}, eager {tuple(e.shape)}"
            )
        diff = (g - e).abs()
        bad = ~(diff <= atol + rtol * e.abs())
        if bad.any():
            raise ExportMismatchError(
                f"{kind} disagrees with eager PyTorch at input size {size[0]}x{size[1]}: output {i} differs "
                f"by up to {float(diff.nan_to_num(float('inf')).max()):.3g} (atol={atol}, rtol={rtol}, "
                f"{int(bad.sum())} of {bad.numel()} values)"
            )
        if diff.numel():
            worst = max(worst, float(diff.max()))
            scale = max(scale, float(e.abs().max()))
    return {"max_abs_err": worst, "max_rel_err": worst / scale if scale > 0 else worst}


@contextlib.contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """eval() for the duration, quiet exporter warnings and shape-solver logging."""
    was_training = model.training
    solver_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = solver_log.level
    model.eval()
    solver_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # TracerWarnings on shape checks that are constant per input and the
            # deprecation notices of torch.jit / the TorchScript ONNX exporter.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        solver_log.setLevel(level)
        model.train(was_training)


def _eager(model: nn.Module, x: Tensor) -> list[Tensor]:
    with torch.no_grad():
        return _flat_outputs(model(x))


def _check_sizes(sizes: Sequence[Size]) -> list[Size]:
    out = []
    for s in sizes:
        h, w = (int(v) for v in s)
        if h < 1 or w < 1:
            raise ValueError(f"verify_sizes must hold positive (H, W) pairs, got {tuple(s)}")
        out.append((h, w))
    return out


# ------------------------------------------------------------------------------ ONNX


def _onnx_dynamo(model, x, path, input_name, output_names, dynamic_batch, dynamic_hw, opset, external_data):
    from torch.export import Dim

    dims = {}
    if dynamic_batch:
        dims[0] = Dim.DYNAMIC
    if dynamic_hw:
        dims[2] = dims[3] = Dim.DYNAMIC
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=True,
        input_names=[input_name],
        output_names=output_names,
        dynamic_shapes=(dims,),
        opset_version=opset,
        external_data=external_data,
        verbose=False,
    )


def _onnx_torchscript(model, x, path, input_name, output_names, dynamic_batch, dynamic_hw, opset):
    axes = {}
    if dynamic_batch:
        axes[0] = "batch"
    if dynamic_hw:
        axes.update({2: "height", 3: "width"})
    dynamic_axes = {input_name: axes}
    if dynamic_batch:
        dynamic_axes.update({name: {0: "batch"} for name in output_names})
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        input_names=[input_name],
        output_names=output_names,
        dynamic_axes=dynamic_axes or None,
        opset_version=opset or 17,
    )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor | Size = (224, 224),
    *,
    in_channels: int = 3,
    dynamic_batch: bool = True,
    dynamic_hw: bool = True,
    opset: int | None = None,
    verify_sizes: Sequence[Size] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    exporter: str = "auto",
    input_name: str = "input",
    external_data: bool = False,
) -> dict:
    """Exports ``model`` to ONNX with dynamic height and width and checks it in onnxruntime.

    Args:
        model: any module with ``forward(x: Tensor[N, C, H, W])``; exported in
            eval mode (its training flag is restored afterwards).
        path: the ``.onnx`` file to write.
        example: the tracing input (``Tensor[N, C, H, W]``) or its ``(H, W)``;
            a size gives ``randn(2, in_channels, H, W)``.
        in_channels: channels of the generated example (3 for images).
        dynamic_batch: make the batch dimension dynamic.
        dynamic_hw: make height and width dynamic (the SPP property).
        opset: ONNX opset; None takes the exporter's default (18 or newer for
            the dynamo exporter, 17 for the TorchScript one).
        verify_sizes: ``(H, W)`` sizes at which onnxruntime is compared with
            eager PyTorch; default: the example's size and two others.
        atol, rtol: tolerance of that comparison.
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)`` with
            ``dynamic_shapes``), ``"torchscript"`` (``dynamo=False`` with
            ``dynamic_axes``) or ``"auto"``: dynamo, falling back to TorchScript
            if it fails.
        input_name: name of the graph input.
        external_data: store weights in a ``.data`` file beside the model
            (needed above ONNX's 2 GB limit; dynamo exporter only).

    Returns:
        A report: ``path``, ``exporter`` (the one used), ``fallback_reason``
        (why dynamo was abandoned, or None), ``opset``, ``input_name``,
        ``output_names``, ``dynamic`` (which of batch/height/width),
        ``verified`` (one ``{"size", "batch", "max_abs_err", "max_rel_err"}``
        per size; the relative error is over the largest eager value) and
        ``seconds``.

    Raises:
        ExportMismatchError: onnxruntime fails or disagrees with eager at a size.
        ImportError: onnx / onnxruntime are not installed (``pip install sppnet[export]``).
    """
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as e:  # pragma: no cover - both are in the export/dev extras
        raise ImportError("ONNX export needs onnx and onnxruntime: pip install 'sppnet[export]'") from e
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model):
        x = _prepare_example(_example_tensor(model, example, in_channels), dynamic_batch, dynamic_hw)
        reference = _eager(model, x)
        sizes = _check_sizes(verify_sizes) if verify_sizes is not None else _default_sizes(x, dynamic_hw)
        output_names = ["output"] if len(reference) == 1 else [f"output_{i}" for i in range(len(reference))]
        args = (model, x, path, input_name, output_names, dynamic_batch, dynamic_hw, opset)
        used, reason = exporter, None
        if exporter in ("auto", "dynamo"):
            try:
                _onnx_dynamo(*args, external_data)
                used = "dynamo"
            except Exception as e:  # noqa: BLE001 - any exporter failure means: try the other one
                if exporter == "dynamo":
                    raise
                used, reason = "torchscript", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:500]}"
        if used == "torchscript":
            _onnx_torchscript(*args)
        graph = onnx.load(str(path), load_external_data=False)
        opset_used = max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=None)

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed_name = session.get_inputs()[0].name
        batch = x.shape[0] if not dynamic_batch else 3  # a batch size the example did not have
        verified = []
        for i, size in enumerate(sizes):
            inp = _random_input(batch, x.shape[1], size, x.dtype, x.device, seed=1 + i)
            want = _eager(model, inp)
            try:
                got = session.run(None, {feed_name: inp.cpu().numpy()})
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
                raise ExportMismatchError(
                    f"onnxruntime failed at input size {size[0]}x{size[1]} ({used} exporter): {e}"
                ) from e
            err = _compare(f"ONNX ({used} exporter)", size, [torch.from_numpy(g) for g in got], want, atol, rtol)
            verified.append({"size": size, "batch": batch, **err})
    return {
        "path": str(path),
        "exporter": used,
        "fallback_reason": reason,
        "opset": opset_used,
        "input_name": feed_name,
        "output_names": [o.name for o in session.get_outputs()],
        "dynamic": {"batch": dynamic_batch, "height": dynamic_hw, "width": dynamic_hw},
        "verified": verified,
        "seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------- TorchScript


def export_torchscript(
    model: nn.Module,
    path: str | Path,
    example: Tensor | Size = (224, 224),
    *,
    in_channels: int = 3,
    verify_sizes: Sequence[Size] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> dict:
    """Traces ``model`` with ``torch.jit.trace``, saves it and checks the saved module.

    The pyramid traces with symbolic sizes (its bins are computed from traced
    ``x.shape``), so the traced module is checked at sizes other than the
    example's. Shape checks that Python code makes on the example (e.g. a
    model's minimum input size) are not part of a trace.

    Returns:
        A report: ``path``, ``verified`` (``{"size", "batch", "max_abs_err",
        "max_rel_err"}`` per size), ``seconds``.

    Raises:
        ExportMismatchError: the reloaded module fails or disagrees with eager at a size.
    """
    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _export_mode(model):
        x = _example_tensor(model, example, in_channels)
        sizes = _check_sizes(verify_sizes) if verify_sizes is not None else _default_sizes(x, True)
        with torch.no_grad():
            traced = torch.jit.trace(model, (x,), check_trace=False)
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path), map_location=x.device)
        verified = []
        for i, size in enumerate(sizes):
            inp = _random_input(3, x.shape[1], size, x.dtype, x.device, seed=1 + i)
            want = _eager(model, inp)
            try:
                with torch.no_grad():
                    got = _flat_outputs(loaded(inp))
            except Exception as e:  # noqa: BLE001 - TorchScript raises its own types
                raise ExportMismatchError(f"TorchScript module failed at input size {size[0]}x{size[1]}: {e}") from e
            err = _compare("TorchScript", size, got, want, atol, rtol)
            verified.append({"size": size, "batch": 3, **err})
    return {"path": str(path), "verified": verified, "seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------- torch.export


def export_program(
    model: nn.Module,
    example: Tensor | Size = (224, 224),
    *,
    in_channels: int = 3,
    dynamic_batch: bool = True,
    dynamic_hw: bool = True,
    verify_sizes: Sequence[Size] | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    path: str | Path | None = None,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with dynamic batch, height and width, checked at several sizes.

    Dims are ``Dim.DYNAMIC``: the exporter infers their valid range (e.g. a
    backbone's minimum input size) and refuses to specialise them silently.
    With ``path`` the program is also written with ``torch.export.save``.

    Returns:
        The ``ExportedProgram``; ``program.module()(x)`` runs it.

    Raises:
        ExportMismatchError: the program fails or disagrees with eager at a size.
    """
    from torch.export import Dim

    with _export_mode(model):
        x = _prepare_example(_example_tensor(model, example, in_channels), dynamic_batch, dynamic_hw)
        sizes = _check_sizes(verify_sizes) if verify_sizes is not None else _default_sizes(x, dynamic_hw)
        dims = {}
        if dynamic_batch:
            dims[0] = Dim.DYNAMIC
        if dynamic_hw:
            dims[2] = dims[3] = Dim.DYNAMIC
        program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
        runner = program.module()
        batch = 3 if dynamic_batch else x.shape[0]
        for i, size in enumerate(sizes):
            inp = _random_input(batch, x.shape[1], size, x.dtype, x.device, seed=1 + i)
            want = _eager(model, inp)
            try:
                with torch.no_grad():
                    got = _flat_outputs(runner(inp))
            except Exception as e:  # noqa: BLE001 - guards raise AssertionError / RuntimeError
                raise ExportMismatchError(f"exported program failed at input size {size[0]}x{size[1]}: {e}") from e
            _compare("torch.export program", size, got, want, atol, rtol)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            torch.export.save(program, str(path))
    return program
