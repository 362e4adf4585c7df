"""ImageNet weights for the torchvision backbones: a torchvision weights name or a local file.

``weights`` is one of

* ``None``: random initialisation (the default; nothing is read or downloaded);
* a torchvision weights name (``"IMAGENET1K_V1"``, ``"DEFAULT"``, or the full
  ``"VGG16_Weights.IMAGENET1K_V1"``), resolved with torchvision's weights API
  (``torchvision.models.get_model_weights``) and downloaded on request only, into
  torch's hub cache (``$TORCH_HOME/hub/checkpoints``), with its hash checked and
  ``weights_only=True``;
* a local file: a torchvision state dict (``.pth`` / ``.pt``, read with
  ``torch.load(weights_only=True)``, whose unpickler refuses anything but tensors
  and containers, so no code from the file runs) or a ``.safetensors`` file.

The file holds torchvision's OWN keys (``features.0.weight``, ``layer3.5.bn3.
running_var``, ``classifier.1.weight``); :func:`load_torchvision_weights` renames
them into the SPP model and refuses, naming the keys, a file that misses any conv
layer, holds a key torchvision's architecture does not have (a file for another
network) or a tensor of the wrong shape. Keys of the parts an SPP model drops
(ResNet's ``layer4`` and ``fc``, the 1000-way ``classifier.6``) are ignored.

fc6 / fc7: torchvision's AlexNet and VGG-16 classifiers take the 6x6 / 7x7
pool5 map. They are copied into the SPP model's ``fc`` when the shapes match,
i.e. ``fc_dim=4096`` and a pooled vector of the same length: the no-SPP head
(``spp=False``, ``input_size=224``) or a one-level pyramid ``levels=(6,)`` /
``(7,)``, whose bins on the 13x13 / 14x14 conv5 map of a 224 input are exactly
torchvision's pool5 windows. The four-level pyramid's fc6 is longer and starts
from random weights, as SPP-net's own fc6 does (Sec. 3.1 trains it on the
pyramid). ``model.weights_report`` says which parts were loaded.

Normalisation: a weights name brings its own mean / std (``weights.transforms()``,
e.g. VGG-16's ``IMAGENET1K_FEATURES`` differs from the usual ImageNet values);
files and random weights use the ImageNet mean / std of RGB images in [0, 1],
the normalisation every model in this project is trained with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from sppnet.models.detector import IMAGENET_MEAN, IMAGENET_STD
from sppnet.utils import load_torch_weights_only

__all__ = [
    "FILE_SUFFIXES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "expected_normalisation",
    "load_torchvision_weights",
    "read_weights",
]

FILE_SUFFIXES = (".pth", ".pt", ".safetensors")
_SHOW = 8  # keys named in an error message


def _is_file_spec(weights: str | os.PathLike) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return Path(weights).suffix in FILE_SUFFIXES or os.sep in weights or Path(weights).exists()


def _read_file(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        import safetensors.torch

        try:
            state = safetensors.torch.load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read {str(path)!r} as safetensors: {e}") from e
    else:
        state = load_torch_weights_only(path)  # ValueError for pickled code / objects
    if isinstance(state, Mapping) and len(state) == 1 and next(iter(state)) in ("state_dict", "model"):
        state = next(iter(state.values()))  # {"state_dict": {...}}, as training scripts save it
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{str(path)!r} does not hold a state dict (str -> Tensor), got a {type(state).__name__}")
    return dict(state)


def _resolve_name(arch: str, name: str):
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum.verify(name)
    except (KeyError, ValueError, TypeError):
        names = ", ".join(["DEFAULT", *(w.name for w in enum)])
        raise ValueError(
            f"weights={name!r} is neither a file ({'/'.join(FILE_SUFFIXES)}) nor a torchvision weights name "
            f"for {arch} ({names})"
        ) from None


def expected_normalisation(arch: str, weights: str | os.PathLike | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the ``weights`` of ``arch`` expect, without reading or downloading them.

    A torchvision weights name: its ``transforms()`` (metadata shipped with
    torchvision); a file or ``None``: the ImageNet statistics.

    Raises:
        ValueError: ``weights`` is neither a file nor a weights name of ``arch``.
    """
    if weights is None or _is_file_spec(weights):
        return IMAGENET_MEAN, IMAGENET_STD
    preset = _resolve_name(arch, str(weights)).transforms()
    return tuple(preset.mean), tuple(preset.std)


def read_weights(
    arch: str, weights: str | os.PathLike
) -> tuple[dict[str, Tensor], str, tuple[float, ...] | None, tuple[float, ...] | None]:
    """Reads torchvision weights for ``arch`` (``"alexnet"``, ``"vgg16"``, ``"resnet50"``).

    Args:
        arch: the torchvision model name.
        weights: a torchvision weights name or a ``.pth`` / ``.pt`` / ``.safetensors`` path.

    Returns:
        ``(state, source, mean, std)``: torchvision's state dict, a description of
        where it came from, and the normalisation the weights expect (``None`` for
        a file, which does not say).

    Raises:
        ValueError: unknown weights name, missing or unreadable file, a pickle that
            holds code or objects, a file that is not a state dict.
    """
    if _is_file_spec(weights):
        path = Path(weights)
        return _read_file(path), str(path), None, None
    w = _resolve_name(arch, str(weights))
    # torchvision's own download (WeightsEnum.get_state_dict), with weights_only=True
    state = torch.hub.load_state_dict_from_url(w.url, progress=True, check_hash=True, weights_only=True)
    preset = w.transforms()
    return state, f"torchvision {type(w).__name__}.{w.name}", tuple(preset.mean), tuple(preset.std)


def _listing(keys: set[str] | list[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def load_torchvision_weights(
    model: nn.Module,
    state: Mapping[str, Tensor],
    renames: Mapping[str, str],
    head_renames: Mapping[str, str],
    known: set[str],
    source: str,
) -> dict:
    """Copies torchvision's ``state`` into ``model`` (an SPP model built around torchvision's modules).

    Args:
        model: the SPP model.
        state: torchvision's state dict.
        renames: torchvision key -> model key, for every conv-trunk tensor (all required
            but BN's ``num_batches_tracked``, which old torchvision files lack).
        head_renames: torchvision key -> model key of fc6 / fc7, copied only if all are
            present with the model's shapes.
        known: every key of torchvision's architecture (keys outside it are unexpected).
        source: where ``state`` came from, for messages.

    Returns:
        A report ``{"source", "loaded", "fc_loaded", "ignored"}``: the number of tensors
        copied, whether fc6 / fc7 were, and the torchvision keys that were not used.

    Raises:
        ValueError: naming the missing or unexpected keys, or a tensor whose shape differs.
    """
    target = model.state_dict()
    unexpected = set(state) - known
    missing = {k for k in renames if k not in state and not k.endswith("num_batches_tracked")}
    if unexpected or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        raise ValueError(
            f"{source} is not a torchvision {model.name} state dict ({'; '.join(parts)}); "
            f"was it saved from another architecture?"
        )
    for k, ours in renames.items():
        if k in state and tuple(state[k].shape) != tuple(target[ours].shape):
            raise ValueError(
                f"{source}: {k} has shape {tuple(state[k].shape)}, {model.name} needs {tuple(target[ours].shape)}"
            )
    copy = {ours: state[k] for k, ours in renames.items() if k in state}
    fc_loaded = bool(head_renames) and all(
        k in state and tuple(state[k].shape) == tuple(target[ours].shape) for k, ours in head_renames.items()
    )
    if fc_loaded:
        copy.update({ours: state[k] for k, ours in head_renames.items()})
    result = model.load_state_dict(copy, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    used = set(renames) | (set(head_renames) if fc_loaded else set())
    return {"source": source, "loaded": len(copy), "fc_loaded": fc_loaded, "ignored": sorted(set(state) - used)}
