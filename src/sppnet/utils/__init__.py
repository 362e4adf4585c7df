"""Utilities shared by every layer: safe persistence, finite-or-stop checks, one writer per run folder.

* :mod:`sppnet.utils.atomic` -- atomic file writes, JSON.
* :mod:`sppnet.utils.digest` -- SHA-256 of files and tensor payloads.
* :mod:`sppnet.utils.checkpoint` -- nested state in safetensors checkpoints, RNG
  state, plain-tensor ``torch.load``.
* :mod:`sppnet.utils.cache` -- self-checking caches of derived arrays.
* :mod:`sppnet.utils.finite` -- non-finite losses, weights and JSON refused with a clear message.
* :mod:`sppnet.utils.runlock` -- an advisory lock: one writer per run folder.

Import from the package (``from sppnet.utils import save_json``), not from the files.
"""

from sppnet.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text, load_json, save_json
from sppnet.utils.cache import load_cache, save_cache
from sppnet.utils.checkpoint import (
    CHECKPOINT_FORMAT_VERSION,
    capture_rng_state,
    flatten_state,
    load_checkpoint,
    load_torch_weights_only,
    read_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)
from sppnet.utils.digest import file_digest, tensor_digest
from sppnet.utils.finite import (
    NonFiniteError,
    check_finite_tensors,
    check_json_finite,
    find_non_finite,
    finite_or_raise,
    non_finite_tensors,
)
from sppnet.utils.runlock import LOCK_NAME, RunLock, RunLockError, StaleLockWarning, read_lock_holder

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "LOCK_NAME",
    "NonFiniteError",
    "RunLock",
    "RunLockError",
    "StaleLockWarning",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "check_finite_tensors",
    "check_json_finite",
    "file_digest",
    "find_non_finite",
    "finite_or_raise",
    "flatten_state",
    "load_cache",
    "load_checkpoint",
    "load_json",
    "load_torch_weights_only",
    "non_finite_tensors",
    "read_checkpoint",
    "read_lock_holder",
    "restore_rng_state",
    "save_cache",
    "save_checkpoint",
    "save_json",
    "tensor_digest",
    "unflatten_state",
]
