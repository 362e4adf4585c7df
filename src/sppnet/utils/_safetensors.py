"""The safetensors framing shared by checkpoints and caches.

Both are safetensors files whose ``__metadata__`` header (string -> string)
records a format name, a version and a SHA-256 of the tensor payload
(:func:`sppnet.utils.tensor_digest`), verified on every load. Only the JSON
header and raw tensor bytes are ever parsed: loading never executes code.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
from torch import Tensor

from sppnet.utils.atomic import PathLike, atomic_path
from sppnet.utils.digest import tensor_digest

# Keys in the safetensors ``__metadata__`` header (string -> string).
KEY_FORMAT = "sppnet.format"
KEY_VERSION = "sppnet.format_version"
KEY_SHA256 = "sppnet.sha256"

# safetensors files start with an 8-byte little-endian header length followed by
# a JSON object. The header is capped at 100 MB by the reference implementation.
_MAX_HEADER_BYTES = 100_000_000


def prepare_tensors(tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Detach, move to CPU, make contiguous and unshare tensors for safetensors."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"{what} names must be str, got {name!r} ({type(name).__name__})")
        if not isinstance(t, Tensor):
            raise ValueError(f"{what} {name!r} must be a Tensor, got {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        if t.numel() > 0:
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def write_safetensors(path: PathLike, flat: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Writes prepared tensors atomically, with ``metadata`` and the payload's SHA-256 in the header."""
    metadata = {**metadata, KEY_SHA256: tensor_digest(flat)}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata=metadata)


def read_header(path: Path) -> dict[str, str]:
    """Validate the framing of a safetensors file and return its ``__metadata__``.

    Raises ``ValueError`` saying whether the file is not safetensors at all
    (e.g. a pickle) or is a truncated / corrupted safetensors file.
    """
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        not_safe = (
            f"{str(path)!r} is not a sppnet checkpoint (safe format required: a safetensors "
            f"file written by sppnet.utils.save_checkpoint)"
        )
        if len(head) < 9:
            raise ValueError(f"{not_safe}; the file is only {size} bytes (truncated?)")
        if head[8:9] != b"{":
            # Zip (torch.save >= 1.6) or a pickle protocol 2+ opcode stream.
            if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
                raise ValueError(
                    f"{not_safe}; it looks like a pickle / torch.save file, which can execute "
                    f"code when loaded and is never opened here. Import plain weights with "
                    f"load_torch_weights_only()"
                )
            raise ValueError(f"{not_safe}; it does not start with a safetensors header")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise ValueError(
                f"checkpoint {str(path)!r} is corrupted or truncated: header claims "
                f"{header_len} bytes but the file has {size}"
            )
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {str(path)!r} is corrupted: unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"checkpoint {str(path)!r} is corrupted: header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"checkpoint {str(path)!r} is corrupted: __metadata__ is not an object")
    return metadata


def load_verified(path: Path, device: str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load all tensors of a framed safetensors file and verify the payload digest."""
    metadata = read_header(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError and friends: invalid offsets, short file
        raise ValueError(f"{what} {str(path)!r} is corrupted or truncated: {e}") from e
    expected = metadata.get(KEY_SHA256)
    if expected is None:
        raise ValueError(f"{what} {str(path)!r} has no payload checksum")
    actual = tensor_digest(tensors)
    if actual != expected:
        raise ValueError(
            f"{what} {str(path)!r} is corrupted: payload SHA-256 {actual[:16]}... does not "
            f"match the recorded {str(expected)[:16]}..."
        )
    if device != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata
