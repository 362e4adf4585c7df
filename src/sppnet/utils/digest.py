"""SHA-256 digests of files and of tensor payloads (cache keys, checkpoint checksums)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sppnet.utils.atomic import PathLike

__all__ = ["file_digest", "tensor_digest"]


def file_digest(path_or_bytes: PathLike | bytes | bytearray | memoryview, extra: str = "") -> str:
    """SHA-256 hex digest of a file's bytes (or of a bytes object), for cache keys.

    With ``extra == ""`` the result equals ``sha256sum`` of the content. A
    non-empty ``extra`` (e.g. the JSON of the parameters that produced a
    cached result) is mixed in as ``sha256(sha256(content) || 0x00 || extra)``
    so that content and parameters can never be confused with each other.

    Args:
        path_or_bytes: A file path (``str`` or ``os.PathLike``) or the content
            itself (``bytes``, ``bytearray``, ``memoryview``).
        extra: Additional text to mix into the digest.

    Returns:
        str: 64 lowercase hex characters.

    Raises:
        ValueError: If the path does not exist or is not a file.
    """
    h = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        h.update(path_or_bytes)
    else:
        path = Path(path_or_bytes)
        if not path.is_file():
            raise ValueError(f"cannot hash {str(path)!r}: not an existing file")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    if not extra:
        return h.hexdigest()
    return hashlib.sha256(h.digest() + b"\x00" + extra.encode()).hexdigest()


def _tensor_bytes(t: Tensor) -> np.ndarray:
    """The raw bytes of a tensor as a flat uint8 array (no copy when possible)."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return t.view(torch.uint8).numpy()


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a dict of tensors.

    The digest does not depend on dict order (names are visited sorted), so it
    identifies the payload of a safetensors file independently of its layout.

    Args:
        tensors: ``{name: Tensor[...]}`` of any dtypes and devices.

    Returns:
        str: 64 lowercase hex characters.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        header = f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode()
        h.update(struct.pack("<Q", len(header)))
        h.update(header)
        h.update(_tensor_bytes(t))
    return h.hexdigest()
