"""Self-checking on-disk caches of derived arrays (features, proposals, ...).

A cache file is a safetensors file whose header records the key of the inputs,
the version of the producing code and a checksum of the payload. Caches are
rebuilt, never trusted: :func:`load_cache` returns ``None`` for (and deletes) a
file that does not match in every respect.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

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

__all__ = ["load_cache", "save_cache"]

_CACHE_FORMAT_VERSION = 1
_FORMAT_CACHE = "sppnet-cache"
_KEY_CACHE_KEY = "sppnet.cache_key"
_KEY_CACHE_VERSION = "sppnet.cache_version"
_KEY_CACHE_KINDS = "sppnet.cache_kinds"


def save_cache(path: PathLike, arrays: Mapping[str, np.ndarray | Tensor], key: str, version: int) -> None:
    """Store derived arrays (features, proposals, ...) in a self-checking cache file.

    The file is a safetensors file whose header records ``key`` (typically a
    :func:`file_digest` of the inputs and parameters), ``version`` (bump it
    when the producing code changes) and a SHA-256 of the payload. It is
    written atomically.

    Args:
        path: Cache file, conventionally ``<dir>/<key>.safetensors``.
        arrays: ``{name: numpy.ndarray | Tensor}``; each comes back from
            :func:`load_cache` as the same kind, dtype and shape.
        key: Identifies the inputs; :func:`load_cache` must be given the same.
        version: Cache layout version; :func:`load_cache` must be given the same.

    Raises:
        ValueError: If an array has an unsupported type or dtype.
    """
    kinds: dict[str, str] = {}
    tensors: dict[str, Tensor] = {}
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            if a.dtype == object or a.dtype.kind in "USV":
                raise ValueError(f"cache array {name!r} has unsupported dtype {a.dtype}")
            tensors[name] = torch.from_numpy(np.ascontiguousarray(a))
            kinds[name] = "numpy"
        elif isinstance(a, Tensor):
            tensors[name] = a
            kinds[name] = "torch"
        else:
            raise ValueError(f"cache array {name!r} must be a numpy.ndarray or Tensor, got {type(a).__name__}")
    flat = prepare_tensors(tensors, "cache array")
    metadata = {
        KEY_FORMAT: _FORMAT_CACHE,
        KEY_VERSION: str(_CACHE_FORMAT_VERSION),
        _KEY_CACHE_KEY: str(key),
        _KEY_CACHE_VERSION: str(int(version)),
        _KEY_CACHE_KINDS: json.dumps(kinds),
    }
    write_safetensors(path, flat, metadata)


def load_cache(path: PathLike, key: str, version: int) -> dict[str, np.ndarray | Tensor] | None:
    """Load a cache file written by :func:`save_cache` if, and only if, it is valid.

    Caches are rebuilt, never trusted: a file that is missing, not a cache,
    truncated, fails its checksum, or was written for another ``key`` or
    ``version`` yields ``None``; in all but the first case the file is deleted.

    Args:
        path: Cache file.
        key: Expected key.
        version: Expected version.

    Returns:
        ``{name: numpy.ndarray | Tensor}`` as saved, or ``None``.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        metadata = read_header(path)
        valid = (
            metadata.get(KEY_FORMAT) == _FORMAT_CACHE
            and metadata.get(KEY_VERSION) == str(_CACHE_FORMAT_VERSION)
            and metadata.get(_KEY_CACHE_KEY) == str(key)
            and metadata.get(_KEY_CACHE_VERSION) == str(int(version))
        )
        if valid:
            tensors, metadata = load_verified(path, "cpu", "cache file")
            kinds = json.loads(metadata.get(_KEY_CACHE_KINDS, "{}"))
            if set(kinds) != set(tensors):
                valid = False
    except (ValueError, OSError):
        valid = False
    if not valid:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return {name: (t.numpy() if kinds[name] == "numpy" else t) for name, t in tensors.items()}
