"""Safe persistence: atomic writes, checkpoints, JSON and on-disk caches.

Every file this project writes goes through :func:`atomic_path`: the bytes are
written to a temporary file in the destination directory, flushed to disk and
then renamed over the destination with :func:`os.replace`. A process killed at
any moment leaves either the previous complete file or the new complete file
at ``path``, never a partial one (at worst a stale ``.<name>.tmp-*`` file
remains next to it).

Checkpoints are `safetensors <https://github.com/huggingface/safetensors>`_
files and nothing else. Loading one never executes code: the header is JSON,
the payload is raw tensor bytes, and a SHA-256 of the payload (stored in the
header) is verified on load. Pickle files, including everything written by
``torch.save``, are refused by :func:`load_checkpoint`; external ``.pt`` state
dicts can be imported with :func:`load_torch_weights_only`, which only accepts
plain tensors and containers.

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

import contextlib
import dataclasses
import enum
import hashlib
import json
import math
import os
import pickle
import random
import secrets
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Union

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "file_digest",
    "flatten_state",
    "load_cache",
    "load_checkpoint",
    "load_json",
    "load_torch_weights_only",
    "read_checkpoint",
    "restore_rng_state",
    "save_cache",
    "save_checkpoint",
    "save_json",
    "tensor_digest",
    "unflatten_state",
]

PathLike = Union[str, os.PathLike]

#: Version of the checkpoint layout written by :func:`save_checkpoint`. Files
#: with a higher version are refused; lower versions are read as they were.
CHECKPOINT_FORMAT_VERSION = 1

_CACHE_FORMAT_VERSION = 1

# Keys in the safetensors ``__metadata__`` header (string -> string).
_KEY_FORMAT = "sppnet.format"
_KEY_VERSION = "sppnet.format_version"
_KEY_META = "sppnet.meta"
_KEY_SHA256 = "sppnet.sha256"
_KEY_CACHE_KEY = "sppnet.cache_key"
_KEY_CACHE_VERSION = "sppnet.cache_version"
_KEY_CACHE_KINDS = "sppnet.cache_kinds"
_FORMAT_CHECKPOINT = "sppnet-checkpoint"
_FORMAT_CACHE = "sppnet-cache"

# safetensors files start with an 8-byte little-endian header length followed by
# a JSON object. The header is capped at 100 MB by the reference implementation.
_MAX_HEADER_BYTES = 100_000_000

# Tags used by flatten_state to describe values JSON cannot hold directly.
_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_TUPLE = "__tuple__"
_TAG_DICT = "__dict__"
_TAG_FLOAT = "__float__"
_TAGS = frozenset({_TAG_TENSOR, _TAG_NDARRAY, _TAG_TUPLE, _TAG_DICT, _TAG_FLOAT})


# --------------------------------------------------------------------------- #
# Atomic writes
# --------------------------------------------------------------------------- #


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry (the rename) to disk where the OS allows it."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` atomically on success.

    The temporary file lives in the same directory as ``path`` (so the final
    :func:`os.replace` is a rename within one file system) and is named
    ``.<name>.tmp-<pid>-<random>``. The caller creates and writes it. When the
    ``with`` block exits normally the file is fsynced, renamed onto ``path``
    and the directory is fsynced. When the block raises, the temporary file is
    deleted and ``path`` is left untouched. Missing parent directories are
    created.

    Args:
        path: Final destination.

    Yields:
        Path: The temporary file to write.

    Raises:
        FileNotFoundError: If the block finished without creating the
            temporary file.

    Example:
        >>> with atomic_path("weights.safetensors") as tmp:  # doctest: +SKIP
        ...     safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic write of {str(path)!r} failed: nothing was written to the "
                f"temporary file {str(tmp)!r}"
            )
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # BaseException: also clean up on KeyboardInterrupt / SystemExit.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(directory)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: Destination file.
        data: Content (``bytes``, ``bytearray`` or ``memoryview``).
    """
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`).

    Args:
        path: Destination file.
        text: Content; newlines are written as given (no translation).
        encoding: Text encoding.
    """
    atomic_write_bytes(path, text.encode(encoding))


# --------------------------------------------------------------------------- #
# Digests
# --------------------------------------------------------------------------- #


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
    return hashlib.sha256(h.digest() + b"\x00" + extra.encode("utf-8")).hexdigest()


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
        header = f"{name}\x00{t.dtype}\x00{tuple(t.shape)}\x00".encode("utf-8")
        h.update(struct.pack("<Q", len(header)))
        h.update(header)
        h.update(_tensor_bytes(t))
    return h.hexdigest()


# --------------------------------------------------------------------------- #
# Nested state <-> (flat tensors, JSON meta)
# --------------------------------------------------------------------------- #


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
                    f"cannot store {_format_path(path)}: numpy arrays of dtype "
                    f"{value.dtype} are not supported"
                )
            try:
                t = torch.from_numpy(np.ascontiguousarray(value))
            except TypeError as e:
                raise ValueError(
                    f"cannot store {_format_path(path)}: numpy dtype {value.dtype} has no "
                    f"torch equivalent"
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
                f"checkpoint meta references tensor {name!r}, which is not among the "
                f"{len(tensors)} stored tensors"
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
            if not isinstance(items, list) or not all(
                isinstance(kv, list) and len(kv) == 2 for kv in items
            ):
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


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #


def _prepare_tensors(tensors: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
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
    flat = _prepare_tensors(tensors, "checkpoint tensor")
    try:
        meta_json = json.dumps(meta, sort_keys=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"checkpoint meta for {str(path)!r} must be JSON-serialisable: {e}; "
            f"use flatten_state() for nested state"
        ) from e
    metadata = {
        _KEY_FORMAT: _FORMAT_CHECKPOINT,
        _KEY_VERSION: str(CHECKPOINT_FORMAT_VERSION),
        _KEY_META: meta_json,
        _KEY_SHA256: tensor_digest(flat),
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata=metadata)


def _read_safetensors_header(path: Path) -> dict[str, str]:
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
            f"file written by sppnet.utils.io.save_checkpoint)"
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


def _load_verified(path: Path, device: str, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load all tensors of a framed safetensors file and verify the payload digest."""
    metadata = _read_safetensors_header(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError and friends: invalid offsets, short file
        raise ValueError(f"{what} {str(path)!r} is corrupted or truncated: {e}") from e
    expected = metadata.get(_KEY_SHA256)
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
    metadata = _read_safetensors_header(path)
    if metadata.get(_KEY_FORMAT) != _FORMAT_CHECKPOINT:
        raise ValueError(
            f"{str(path)!r} is not a sppnet checkpoint (safe format required): it is a "
            f"safetensors file with format {metadata.get(_KEY_FORMAT)!r}, expected "
            f"{_FORMAT_CHECKPOINT!r}"
        )
    version = metadata.get(_KEY_VERSION, "")
    if not version.isdigit() or int(version) > CHECKPOINT_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {str(path)!r} has format version {version!r}; this sppnet reads "
            f"versions up to {CHECKPOINT_FORMAT_VERSION}"
        )
    tensors, metadata = _load_verified(path, device, "checkpoint")
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
            f"refusing to load {str(path)!r}: it contains code/objects beyond plain tensors "
            f"({first_line})"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"cannot load {str(path)!r}: not a readable torch file ({e})") from e


# --------------------------------------------------------------------------- #
# JSON
# --------------------------------------------------------------------------- #


def _to_jsonable(obj: Any, where: str) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return _to_jsonable(obj.value, where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, os.PathLike):
                k = os.fspath(k)
            if not (k is None or isinstance(k, (str, int, float, bool))):
                raise ValueError(f"cannot write JSON: key {k!r} at {where} is not a scalar")
            out[k] = _to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj) if isinstance(obj, (set, frozenset)) else obj
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(items)]
    raise ValueError(f"cannot write JSON: {where} has unsupported type {type(obj).__name__}")


def save_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically.

    Dataclasses become dicts (recursively), paths become strings, tuples and
    sets become lists, enums their values, numpy scalars / arrays and tensors
    Python numbers / lists.

    Args:
        path: Destination file; parent directories are created.
        obj: The value to write.

    Raises:
        ValueError: If ``obj`` holds a value JSON cannot represent.
    """
    text = json.dumps(_to_jsonable(obj, "obj"), indent=2, ensure_ascii=False)
    atomic_write_text(path, text + "\n")


def load_json(path: PathLike) -> Any:
    """Read a JSON file.

    Args:
        path: The file.

    Returns:
        The parsed value.

    Raises:
        ValueError: Naming the file if it is missing or not valid JSON.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read JSON file {str(path)!r}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e}") from e


# --------------------------------------------------------------------------- #
# Caches
# --------------------------------------------------------------------------- #


def save_cache(
    path: PathLike, arrays: Mapping[str, np.ndarray | Tensor], key: str, version: int
) -> None:
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
            raise ValueError(
                f"cache array {name!r} must be a numpy.ndarray or Tensor, got {type(a).__name__}"
            )
    flat = _prepare_tensors(tensors, "cache array")
    metadata = {
        _KEY_FORMAT: _FORMAT_CACHE,
        _KEY_VERSION: str(_CACHE_FORMAT_VERSION),
        _KEY_CACHE_KEY: str(key),
        _KEY_CACHE_VERSION: str(int(version)),
        _KEY_CACHE_KINDS: json.dumps(kinds),
        _KEY_SHA256: tensor_digest(flat),
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata=metadata)


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
        metadata = _read_safetensors_header(path)
        valid = (
            metadata.get(_KEY_FORMAT) == _FORMAT_CACHE
            and metadata.get(_KEY_VERSION) == str(_CACHE_FORMAT_VERSION)
            and metadata.get(_KEY_CACHE_KEY) == str(key)
            and metadata.get(_KEY_CACHE_VERSION) == str(int(version))
        )
        if valid:
            tensors, metadata = _load_verified(path, "cpu", "cache file")
            kinds = json.loads(metadata.get(_KEY_CACHE_KINDS, "{}"))
            if set(kinds) != set(tensors):
                valid = False
    except (ValueError, OSError):
        valid = False
    if not valid:
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return {
        name: (t.numpy() if kinds[name] == "numpy" else t) for name, t in tensors.items()
    }
