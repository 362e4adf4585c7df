"""Checkpoints: nested training state in one safetensors file, loaded without running code.

Checkpoints are `safetensors <https://github.com/huggingface/safetensors>`_
files and nothing else. Loading one never executes code: the header is JSON,
the payload is raw tensor bytes, and a SHA-256 of the payload (stored in the
header) is verified on load. Pickle files, including everything written by
``torch.save``, are refused by :func:`load_checkpoint`; external ``.pt`` /
``.pth`` state dicts (e.g. torchvision weights) are imported with
:func:`load_torch_weights_only`, which only accepts plain tensors and containers.

Nested training state (model and optimizer ``state_dict()``, RNG states,
counters) is split by :func:`flatten_state` into a flat ``{name: Tensor}`` dict
and a JSON-serialisable description of the structure, and rebuilt by
:func:`unflatten_state`. A typical round trip::

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng_state(),
        "epoch": epoch,
    }
    save_checkpoint("runs/x/last.safetensors", *flatten_state(state))
    state = load_checkpoint("runs/x/last.safetensors")
    restore_rng_state(state["rng"])
"""

from __future__ import annotations

import json
import math
import pickle
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sppnet.utils._safetensors import (
    KEY_FORMAT,
    KEY_VERSION,
    load_verified,
    prepare_tensors,
    read_header,
    write_safetensors,
)
from sppnet.utils.atomic import PathLike

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "capture_rng_state",
    "flatten_state",
    "load_checkpoint",
    "load_torch_weights_only",
    "read_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "unflatten_state",
]

#: Version of the checkpoint layout written by :func:`save_checkpoint`. Files
#: with a higher version are refused; lower versions are read as they were.
CHECKPOINT_FORMAT_VERSION = 1

_KEY_META = "sppnet.meta"
_FORMAT_CHECKPOINT = "sppnet-checkpoint"

# Tags used by flatten_state to describe values JSON cannot hold directly.
_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_TUPLE = "__tuple__"
_TAG_DICT = "__dict__"
_TAG_FLOAT = "__float__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_NDARRAY, _TAG_TUPLE, _TAG_DICT, _TAG_FLOAT})


def _format_path(path: tuple) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def flatten_state(nested: Any) -> tuple[dict[str, Tensor], Any]:
    """Split a nested training state into flat tensors and a JSON-safe description.

    Supported values, nested to any depth: ``Tensor``, ``numpy.ndarray`` (any
    numeric or bool dtype), ``dict`` (keys ``str``, ``int``, ``float``,
    ``bool`` or ``None``; int keys such as those of ``optimizer.state_dict()``
    come back as ints), ``list``, ``tuple``, ``int``, ``float`` (including
    ``nan`` / ``inf``), ``str``, ``bool`` and ``None``. NumPy scalars are
    stored as the equivalent Python scalar. This covers ``Module.state_dict()``,
    ``Optimizer.state_dict()``, LR scheduler states, ``torch.get_rng_state()``,
    ``numpy.random.get_state()``, ``Generator.bit_generator.state`` and
    ``random.getstate()``.

    Tensors are detached and moved to the CPU (not copied; tensors sharing
    memory are unshared by :func:`save_checkpoint`). Tensor names follow the
    path in ``nested`` (``"model.conv1.weight"``), but only ``meta`` says where
    each one belongs.

    Args:
        nested: The state to split.

    Returns:
        tuple: ``(tensors, meta)`` where ``tensors`` is ``{name: Tensor}`` and
        ``meta`` is JSON-serialisable. :func:`unflatten_state` inverts it.

    Raises:
        ValueError: For an unsupported value type or dict key type, naming its
            location in ``nested``.
    """
    tensors: dict[str, Tensor] = {}

    def add_tensor(path: tuple, t: Tensor) -> str:
        base = ".".join(str(p) for p in path) or "tensor"
        name, i = base, 1
        while name in tensors:  # keys containing "." can collide; never overwrite
            name, i = f"{base}~{i}", i + 1
        tensors[name] = t.detach().to("cpu")
        return name

    def encode(value: Any, path: tuple) -> Any:
        if isinstance(value, Tensor):
            return {_TAG_TENSOR: add_tensor(path, value)}
        if isinstance(value, np.ndarray):
            if value.dtype == object or value.dtype.kind in "USV":
                raise ValueError(
                    f"cannot store {_format_path(path)}: numpy arrays of dtype {value.dtype} are not supported"
                )
            try:
                t = torch.from_numpy(np.ascontiguousarray(value))
            except TypeError as e:
                raise ValueError(
                    f"cannot store {_format_path(path)}: numpy dtype {value.dtype} has no torch equivalent"
                ) from e
            return {_TAG_NDARRAY: add_tensor(path, t.clone()), "dtype": value.dtype.str}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            value = float(value)
            return value if math.isfinite(value) else {_TAG_FLOAT: repr(value)}
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, tuple):
            return {_TAG_TUPLE: [encode(v, path + (i,)) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, path + (i,)) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            keys = list(value.keys())
            for k in keys:
                if not (k is None or isinstance(k, (str, int, float))):
                    raise ValueError(
                        f"cannot store {_format_path(path)}: dict key {k!r} has type "
                        f"{type(k).__name__}; keys must be str, int, float, bool or None"
                    )
            if all(isinstance(k, str) for k in keys) and not _TAGS.intersection(keys):
                return {k: encode(value[k], path + (k,)) for k in keys}
            items = []
            for k in keys:
                ek = encode(k, path)  # scalars only, so the path is never used
                items.append([ek, encode(value[k], path + (k,))])
            return {_TAG_DICT: items}
        raise ValueError(
            f"cannot store {_format_path(path)}: unsupported type {type(value).__name__}; "
            f"supported are Tensor, numpy.ndarray, dict, list, tuple, int, float, str, "
            f"bool and None"
        )

    meta = encode(nested, ())
    return tensors, meta


def unflatten_state(tensors: Mapping[str, Tensor], meta: Any) -> Any:
    """Rebuild the nested state split by :func:`flatten_state`.

    Args:
        tensors: ``{name: Tensor}`` as returned by :func:`flatten_state`.
        meta: The JSON description returned by :func:`flatten_state` (or
            the same after a ``json.dumps`` / ``json.loads`` round trip).

    Returns:
        The nested state, with tuples, int dict keys, numpy arrays and
        non-finite floats restored.

    Raises:
        ValueError: If ``meta`` references a tensor missing from ``tensors``,
            if some tensor is not referenced by ``meta``, or if ``meta`` is
            malformed.
    """
    used: set[str] = set()

    def tensor(name: Any) -> Tensor:
        if not isinstance(name, str) or name not in tensors:
            raise ValueError(
                f"checkpoint meta references tensor {name!r}, which is not among the {len(tensors)} stored tensors"
            )
        used.add(name)
        return tensors[name]

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1 and _TAG_TENSOR in value:
            return tensor(value[_TAG_TENSOR])
        if set(value) == {_TAG_NDARRAY, "dtype"}:
            array = tensor(value[_TAG_NDARRAY]).numpy()
            return array.astype(np.dtype(value["dtype"]), copy=False)
        if len(value) == 1 and _TAG_TUPLE in value:
            return tuple(decode(v) for v in value[_TAG_TUPLE])
        if len(value) == 1 and _TAG_FLOAT in value:
            return float(value[_TAG_FLOAT])
        if len(value) == 1 and _TAG_DICT in value:
            items = value[_TAG_DICT]
            if not isinstance(items, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in items):
                raise ValueError(f"malformed checkpoint meta: {_TAG_DICT} entry {items!r}")
            return {decode(k): decode(v) for k, v in items}
        return {k: decode(v) for k, v in value.items()}

    nested = decode(meta)
    unused = sorted(set(tensors) - used)
    if unused:
        preview = ", ".join(unused[:5]) + (", ..." if len(unused) > 5 else "")
        raise ValueError(
            f"{len(unused)} stored tensor(s) are not referenced by the checkpoint meta "
            f"({preview}); the file was not written from flatten_state(), read it with "
            f"read_checkpoint()"
        )
    return nested


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every random number generator a training loop uses.

    Returns:
        dict: ``{"torch": Tensor, "cuda": list[Tensor], "numpy": tuple,
        "python": tuple}``; ``"cuda"`` is empty without CUDA. Storable with
        :func:`flatten_state` and restored by :func:`restore_rng_state`.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generators captured by :func:`capture_rng_state`.

    Args:
        state: The dict from :func:`capture_rng_state` (possibly after a
            checkpoint round trip). CUDA states are restored only when CUDA is
            available and the device count matches.

    Raises:
        ValueError: If a required key is missing.
    """
    missing = sorted({"torch", "numpy", "python"} - set(state))
    if missing:
        raise ValueError(f"RNG state lacks keys {missing}, got keys {sorted(state)}")
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(state["numpy"])
    python = state["python"]
    # random.setstate needs the inner state as a tuple, not a list.
    random.setstate(tuple(tuple(p) if isinstance(p, list) else p for p in python))


def save_checkpoint(path: PathLike, tensors: Mapping[str, Tensor], meta: Any) -> None:
    """Write tensors and JSON metadata to one safetensors file, atomically.

    The safetensors header holds ``meta`` as a JSON string, the format name and
    version, and a SHA-256 of the tensor payload (:func:`tensor_digest`) that
    :func:`read_checkpoint` verifies. To save nested state (state dicts, RNG
    states, counters) use ``save_checkpoint(path, *flatten_state(state))``.

    Args:
        path: Destination, conventionally ``*.safetensors``. Parent
            directories are created.
        tensors: ``{name: Tensor}``; tensors are detached and copied to the CPU.
        meta: Any JSON-serialisable value.

    Raises:
        ValueError: If ``meta`` is not JSON-serialisable or ``tensors`` holds
            a non-tensor value.
    """
    flat = prepare_tensors(tensors, "checkpoint tensor")
    try:
        meta_json = json.dumps(meta, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint meta for {str(path)!r} must be JSON-serialisable: {e}; use flatten_state() for nested state"
        ) from e
    metadata = {
        KEY_FORMAT: _FORMAT_CHECKPOINT,
        KEY_VERSION: str(CHECKPOINT_FORMAT_VERSION),
        _KEY_META: meta_json,
    }
    write_safetensors(path, flat, metadata)


def read_checkpoint(path: PathLike, device: str = "cpu") -> tuple[dict[str, Tensor], Any]:
    """Read a checkpoint written by :func:`save_checkpoint` without rebuilding it.

    Only the safetensors header (JSON) and raw tensor bytes are parsed; no
    code is ever executed.

    Args:
        path: Checkpoint file.
        device: Device for the returned tensors.

    Returns:
        tuple: ``(tensors, meta)`` exactly as passed to :func:`save_checkpoint`
        (``meta`` after a JSON round trip).

    Raises:
        ValueError: Naming ``path`` if it is missing, not a sppnet checkpoint
            (e.g. a pickle written by ``torch.save``), written by a newer format
            version, truncated, or fails its SHA-256 check.
    """
    path = Path(path)
    metadata = read_header(path)
    if metadata.get(KEY_FORMAT) != _FORMAT_CHECKPOINT:
        raise ValueError(
            f"{str(path)!r} is not a sppnet checkpoint (safe format required): it is a "
            f"safetensors file with format {metadata.get(KEY_FORMAT)!r}, expected "
            f"{_FORMAT_CHECKPOINT!r}"
        )
    version = metadata.get(KEY_VERSION, "")
    if not version.isdigit() or int(version) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r}; this sppnet reads "
            f"versions up to {CHECKPOINT_FORMAT_VERSION}"
        )
    tensors, metadata = load_verified(path, device, "checkpoint")
    try:
        meta = json.loads(metadata.get(_KEY_META, "null"))
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupted: meta is not JSON ({e})") from e
    return tensors, meta


def load_checkpoint(path: PathLike, device: str = "cpu") -> Any:
    """Load the nested state saved with ``save_checkpoint(path, *flatten_state(state))``.

    Args:
        path: Checkpoint file.
        device: Device for the tensors in the returned state.

    Returns:
        The nested state (see :func:`unflatten_state`).

    Raises:
        ValueError: As :func:`read_checkpoint`, and if the file's tensors and
            meta do not come from :func:`flatten_state`.
    """
    tensors, meta = read_checkpoint(path, device=device)
    try:
        return unflatten_state(tensors, meta)
    except ValueError as e:
        raise ValueError(f"checkpoint {str(path)!r}: {e}") from e


def load_torch_weights_only(path: PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Import an external ``torch.save`` file that holds only tensors and containers.

    Uses ``torch.load(weights_only=True)``, whose restricted unpickler refuses
    any class or function outside tensors, primitive types and containers, so
    loading never runs code from the file. Use it to import ``.pt`` / ``.pth``
    state dicts, then re-save with :func:`save_checkpoint`.

    Args:
        path: The ``.pt`` / ``.pth`` file.
        map_location: Where to put the tensors.

    Returns:
        What the file holds, typically ``dict[str, Tensor]``.

    Raises:
        ValueError: If the file is missing, is not a torch file, or contains
            code/objects beyond plain tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot load {str(path)!r}: not an existing file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {str(path)!r}: it contains code/objects beyond plain tensors ({first_line})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot load {str(path)!r}: not a readable torch file ({e})") from e
