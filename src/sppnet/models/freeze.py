"""Freezing a backbone up to a named stage (``--freeze``).

SPP-net fine-tunes only the fc layers for detection (Sec. 4.1: "we only fine-tune
the fully-connected layers"); Fast R-CNN keeps VGG-16's conv1 and conv2 fixed.
:func:`freeze` covers both: ``upto="conv"`` freezes every conv layer,
``upto=<stage>`` the stages up to and including that one.

Stages, input first (:func:`feature_stages`):

* Table 1 networks and ``alexnet``: ``conv1`` ... ``conv5`` (``conv7`` for
  overfeat7), one per conv layer with the layers that follow it (:func:`conv_stages`);
* ``vgg16``: ``conv1`` ... ``conv5``, one per block of 3x3 convs, ending at its pool
  (:func:`block_stages`);
* ``resnet50``: torchvision's names, ``conv1`` (the stem with its pool),
  ``layer1``, ``layer2``, ``layer3``.

Frozen parameters get ``requires_grad = False``. A frozen batch norm also stops
updating its running statistics: it is swapped for :class:`FrozenBatchNorm2d`, a
``BatchNorm2d`` that stays in eval mode (same parameters and buffers, so state
dicts load either way).
"""

from __future__ import annotations

from torch import nn

__all__ = ["FrozenBatchNorm2d", "block_stages", "conv_stages", "feature_stages", "freeze"]


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that always normalises with its running statistics (``train()`` keeps it in eval)."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def conv_stages(features: nn.Sequential) -> dict[str, list[nn.Module]]:
    """``conv1``, ``conv2``, ...: each ``Conv2d`` with the layers up to the next one."""
    stages: dict[str, list[nn.Module]] = {}
    for m in features:
        if isinstance(m, nn.Conv2d):
            stages[f"conv{len(stages) + 1}"] = []
        if not stages:
            raise ValueError(f"features must start with a Conv2d, got {type(m).__name__}")
        stages[next(reversed(stages))].append(m)
    return stages


def block_stages(features: nn.Sequential) -> dict[str, list[nn.Module]]:
    """``conv1``, ``conv2``, ...: the layers between two max-pools (VGG's blocks), each ending at its pool."""
    stages: dict[str, list[nn.Module]] = {}
    start = True
    for m in features:
        if start:
            stages[f"conv{len(stages) + 1}"] = []
        stages[next(reversed(stages))].append(m)
        start = isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))
    return stages


def feature_stages(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The named stages of ``model``'s conv layers, input first (see the module docstring).

    Uses ``model.feature_stages()`` where the model defines it, else
    :func:`conv_stages` of ``model.features`` (the Table 1 networks).
    """
    if hasattr(model, "feature_stages"):
        return model.feature_stages()
    if not isinstance(getattr(model, "features", None), nn.Sequential):
        raise ValueError(f"cannot find the conv stages of a {type(model).__name__}: it has no .features Sequential")
    return conv_stages(model.features)


def freeze(model: nn.Module, upto: str | None = "conv") -> list[str]:
    """Freezes ``model``'s conv stages up to and including ``upto``, in place.

    Args:
        model: a network from ``sppnet.models`` (anything with ``.features`` or
            ``.feature_stages()``).
        upto: ``"conv"`` (every conv stage: SPP-net's detection fine-tuning),
            a stage name (``"conv2"``, ``"layer3"``; see :func:`feature_stages`),
            or ``None`` / ``"none"`` (nothing).

    Returns:
        The names of the frozen stages, input first.

    Raises:
        ValueError: if ``upto`` is not one of the model's stages.
    """
    stages = feature_stages(model)
    if upto is None or upto == "none":
        return []
    names = list(stages)
    if upto == "conv":
        frozen = names
    elif upto in stages:
        frozen = names[: names.index(upto) + 1]
    else:
        raise ValueError(f"freeze upto must be 'conv', 'none' or a stage of {_name(model)} ({names}), got {upto!r}")
    targets = {id(m) for name in frozen for top in stages[name] for m in top.modules()}
    for m in model.modules():
        if id(m) in targets:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    _freeze_batch_norms(model, targets)
    return frozen


def _name(model: nn.Module) -> str:
    return str(getattr(model, "name", type(model).__name__))


def _freeze_batch_norms(model: nn.Module, targets: set[int]) -> None:
    """Swaps each targeted ``BatchNorm2d`` for a :class:`FrozenBatchNorm2d` holding the same tensors."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if id(child) in targets and type(child) is nn.BatchNorm2d and child.track_running_stats:
                frozen = FrozenBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine)
                frozen = frozen.to(child.running_mean.device, child.running_mean.dtype)
                frozen.load_state_dict(child.state_dict())
                frozen.weight, frozen.bias = child.weight, child.bias  # the same (frozen) Parameters
                setattr(parent, name, frozen)
