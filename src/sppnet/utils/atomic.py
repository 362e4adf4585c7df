"""Atomic file writes, and JSON written through them.

Every file this project writes goes through :func:`atomic_path`: the bytes are
written to a temporary file in the destination directory, flushed to disk and
then renamed over the destination with :func:`os.replace`. A process killed at
any moment leaves either the previous complete file or the new complete file
at ``path``, never a partial one (at worst a stale ``.<name>.tmp-*`` file
remains next to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "load_json", "save_json"]

PathLike = str | os.PathLike


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
                f"atomic write of {str(path)!r} failed: nothing was written to the temporary file {str(tmp)!r}"
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
        ValueError: If ``obj`` holds a value JSON cannot represent, naming its
            key path: an unsupported type, or a NaN / infinity (not JSON; write
            ``None`` for a missing number). Nothing is written then.
    """
    value = _to_jsonable(obj, "obj")
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError:
        found = _non_finite(value, "obj")
        if found is None:
            raise
        where, bad = found
        raise ValueError(
            f"cannot write JSON to {str(path)!r}: {where} is {bad!r}; NaN and infinity are not JSON "
            f"(write None for a missing number)"
        ) from None
    atomic_write_text(path, text + "\n")


def _non_finite(value: Any, where: str) -> tuple[str, float] | None:
    """``(key path, value)`` of the first NaN / infinity in a JSON-ready value, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, float) and not math.isfinite(k):
                return f"the key {k!r} of {where}", k
            found = _non_finite(v, f"{where}[{k!r}]")
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return None


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
