"""torchvision's AlexNet, VGG-16 and ResNet-50 as SPP-net backbones, with their ImageNet weights.

The conv trunk is torchvision's own modules (built by ``torchvision.models`` with
``weights=None``, same names, so torchvision's state dicts load); the head is the
one of the Table 1 networks (:class:`~sppnet.models.SPPNet`): the pyramid (or the
fixed pool5 of the no-SPP baseline), fc6, fc7 and the classifier. The interface
is the same (``forward_features`` / ``forward_head``, ``pool``, ``fc``,
``classifier``, ``stride``, ``offset``, ``min_input_size``, ``feature_size``,
``config()``), so the classifier engine, every test view, the detector and the
exporters take these models as they take ``zf5``.

==========  ==================================  ======  ======  ======  ==========  =========
name        conv features                       C       stride  offset  min input   pool5 grid
==========  ==================================  ======  ======  ======  ==========  =========
alexnet     conv5 + ReLU (``features[:12]``)    256     16      15.5    31          6x6
vgg16       conv5_3 + ReLU (``features[:30]``)  512     16      8.0     16          7x7
resnet50    C4 = ``layer3`` (v1.5)              1024    16      0.5     1           7x7
==========  ==================================  ======  ======  ======  ==========  =========

(stride, offset and minimum input are read off the modules by
:func:`~sppnet.models.geometry.feature_geometry`, never typed; this table is what
it gives. The pool5 grid is the no-SPP head's, torchvision's own pool5 output at
224 px, so its fc6 takes torchvision's classifier weights.)

ResNet-50's head. Faster R-CNN's C4 variant pools each window to 14x14 on C4 and
runs the conv5 stage (``layer4``) and a global average pool on it. We do NOT do
that: SPP-net's pyramid turns a window into a flat vector (``C * sum(n*n)``), on
which ``layer4`` cannot run, and the rest of the project rests on that flat
vector (the detector pools thousands of windows from one map and runs fc6/fc7 on
them, ``compress_fc`` factorises fc6 / fc7, box regression reads pool5). So
``resnet50`` is C4 -> pyramid -> fc6 -> fc7 like the others, and torchvision's
``layer4`` and ``fc`` are dropped. The price: fc6 is wide (1024 * 50 = 51,200
inputs for the paper's levels); use a smaller ``fc_dim`` or fewer levels where
memory is short.

``width`` scales every conv layer's channels as in the Table 1 networks (for
fast tests); pretrained weights need ``width=1``. Random initialisation is
torchvision's: PyTorch's default for AlexNet, Kaiming (fan-out) for VGG and
ResNet convs, batch norms at 1 / 0; the head is N(0, 0.01) as in :class:`SPPNet`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from sppnet.models._registry import register_model
from sppnet.models.freeze import block_stages, conv_stages
from sppnet.models.geometry import feature_geometry
from sppnet.models.sppnet import SPPNet, _scale
from sppnet.models.weights import IMAGENET_MEAN, IMAGENET_STD, load_torchvision_weights, read_weights
from sppnet.ops import SpatialPyramidPool
from sppnet.ops._bins import check_levels

__all__ = ["TORCHVISION_BACKBONES", "TorchvisionSPPNet", "alexnet", "resnet50", "vgg16"]


def _alexnet_trunk(tv: nn.Module) -> nn.Sequential:
    return tv.features[:12]  # conv1 ... conv5 + ReLU; [12] is pool5, replaced by the pyramid


def _vgg16_trunk(tv: nn.Module) -> nn.Sequential:
    return tv.features[:30]  # conv1_1 ... conv5_3 + ReLU; [30] is pool5


def _resnet50_trunk(tv: nn.Module) -> nn.Sequential:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")  # C4; layer4 and fc dropped
    return nn.Sequential(OrderedDict((n, getattr(tv, n)) for n in names))


def _resnet_stages(features: nn.Sequential) -> dict[str, list[nn.Module]]:
    stem = [features.conv1, features.bn1, features.relu, features.maxpool]
    return {"conv1": stem, "layer1": [features.layer1], "layer2": [features.layer2], "layer3": [features.layer3]}


@dataclass(frozen=True)
class _Arch:
    """How one torchvision network becomes an SPP backbone."""

    trunk: Callable[[nn.Module], nn.Sequential]  # torchvision model -> conv trunk (torchvision's modules)
    trunk_prefix: str  # torchvision key of trunk key k: trunk_prefix + k
    stages: Callable[[nn.Sequential], dict[str, list[nn.Module]]]
    pool_grid: int  # the no-SPP pool5 output (torchvision's, at 224 px)
    fc: tuple[str, ...]  # torchvision's fc6, fc7 modules (-> our fc[0], fc[3]); () if none
    kaiming: bool  # torchvision re-initialises convs with kaiming_normal_(fan_out)


TORCHVISION_BACKBONES: dict[str, _Arch] = {
    "alexnet": _Arch(_alexnet_trunk, "features.", conv_stages, 6, ("classifier.1", "classifier.4"), False),
    "vgg16": _Arch(_vgg16_trunk, "features.", block_stages, 7, ("classifier.0", "classifier.3"), True),
    "resnet50": _Arch(_resnet50_trunk, "", _resnet_stages, 7, (), True),
}


def _on_meta(arch: str) -> nn.Module:
    """torchvision's full model with no storage (its layout and keys, nothing allocated or initialised)."""
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None)


def _scale_channels(trunk: nn.Module, width: float) -> None:
    """Replaces every Conv2d / BatchNorm2d by one with ``_scale(channels, width)`` channels (RGB input kept)."""

    def scaled(c: int) -> int:
        return c if c == 3 else _scale(c, width)

    for parent in list(trunk.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, nn.Conv2d):
                new = nn.Conv2d(
                    scaled(m.in_channels),
                    scaled(m.out_channels),
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    m.dilation,
                    m.groups,
                    m.bias is not None,
                    device="meta",
                )
            elif isinstance(m, nn.BatchNorm2d):
                new = nn.BatchNorm2d(scaled(m.num_features), m.eps, m.momentum, device="meta")
            else:
                continue
            setattr(parent, name, new)


def _materialise(trunk: nn.Module, kaiming: bool) -> nn.Module:
    """Allocates a meta trunk on the CPU and initialises it as torchvision does."""
    trunk = trunk.to_empty(device="cpu")
    for m in trunk.modules():
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            m.reset_parameters()  # batch norm: weight 1, bias 0, running stats reset
        if kaiming and isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return trunk


class TorchvisionSPPNet(nn.Module):
    """A torchvision conv trunk with the SPP head (or the no-SPP baseline head) of :class:`SPPNet`.

    Args:
        arch: ``"alexnet"``, ``"vgg16"`` or ``"resnet50"``.
        num_classes: classifier outputs.
        spp: pyramid head (True) or a fixed pool5 to the arch's grid (6x6 / 7x7) (False).
        levels: pyramid levels (``spp=True``).
        width: channel multiplier of every conv layer (1.0 is torchvision's network).
        fc_dim: width of fc6 and fc7 (4096 in the paper and in torchvision).
        dropout: dropout after fc6 and fc7.
        input_size: the one input side the ``spp=False`` baseline accepts.
        weights: ``None`` (random), a torchvision weights name (``"IMAGENET1K_V1"``,
            downloaded on request) or a ``.pth`` / ``.safetensors`` torchvision state
            dict; see :mod:`sppnet.models.weights`.
        mean, std: the input normalisation (RGB in [0, 1]); default: what the
            weights expect, else the ImageNet statistics.

    Shapes: ``forward_features(x: Tensor[N, 3, H, W]) -> Tensor[N, C, h, w]`` (C4 for
    ResNet); ``forward_head(maps) -> Tensor[N, num_classes]``; ``pool(maps) ->
    Tensor[N, C * sum(n*n)]``; ``fc(pooled) -> Tensor[N, fc_dim]`` (fc7).
    """

    # The contract of the Table 1 networks, shared verbatim: input checks, conv
    # features once per image and scale, pool5 -> fc6 -> fc7 -> classifier.
    check_input = SPPNet.check_input
    forward_features = SPPNet.forward_features
    forward_head = SPPNet.forward_head
    forward = SPPNet.forward

    def __init__(
        self,
        arch: str,
        num_classes: int = 1000,
        spp: bool = True,
        levels: int | Sequence[int] = (6, 3, 2, 1),
        width: float = 1.0,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        input_size: int = 224,
        weights: str | os.PathLike | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if arch not in TORCHVISION_BACKBONES:
            raise ValueError(f"arch must be one of {', '.join(TORCHVISION_BACKBONES)}, got {arch!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a positive number, got {width}")
        if fc_dim < 1:
            raise ValueError(f"fc_dim must be >= 1, got {fc_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if weights is not None and width != 1.0:
            raise ValueError(f"pretrained weights need width=1.0 (torchvision's network), got width={width}")
        for what, v in (("mean", mean), ("std", std)):
            if v is not None and (len(v) != 3 or (what == "std" and min(v) <= 0)):
                raise ValueError(f"{what} must be three numbers (RGB){', all > 0' if what == 'std' else ''}, got {v}")
        self.name = arch
        self.arch = TORCHVISION_BACKBONES[arch]
        self.spp = bool(spp)
        self.levels = check_levels(levels)
        self.width = float(width)
        self.num_classes = int(num_classes)
        self.fc_dim = int(fc_dim)
        self.dropout = float(dropout)

        trunk = self.arch.trunk(_on_meta(arch))
        if self.width != 1.0:
            _scale_channels(trunk, self.width)
        self.geometry = feature_geometry(trunk)
        self.stride, self.offset = self.geometry.stride, self.geometry.offset
        self.min_input_size = self.geometry.min_input_size
        side = self.min_input_size
        chans = int(trunk(torch.empty(2, 3, side, side, device="meta")).shape[1])  # shape only, no compute
        self.features = _materialise(trunk, self.arch.kaiming)
        self.feature_channels = chans

        if self.spp:
            self.input_size = None
            self.pool: nn.Module = SpatialPyramidPool(self.levels, "max", "adaptive")
            pooled_dim = self.pool.output_dim(chans)
        else:
            grid = self.arch.pool_grid
            self.input_size = int(input_size)
            a, _ = self.feature_size(self.input_size, self.input_size)
            if a < grid:
                raise ValueError(
                    f"spp=False needs a conv map of at least {grid}x{grid}; input_size={input_size} gives {a}x{a}"
                )
            stride = a // grid  # pool5 as a fixed sliding window that gives exactly grid x grid bins
            self.pool = nn.Sequential(nn.MaxPool2d(a - (grid - 1) * stride, stride), nn.Flatten(1))
            pooled_dim = chans * grid * grid
        self.pooled_dim = pooled_dim
        self.fc = nn.Sequential(
            nn.Linear(pooled_dim, fc_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(fc_dim, fc_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(fc_dim, num_classes)
        for m in (*self.fc, self.classifier):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

        weights_mean = weights_std = None
        self.weights_report: dict | None = None
        if weights is not None:
            state, source, weights_mean, weights_std = read_weights(arch, weights)
            self.weights_report = self.load_torchvision_state_dict(state, source)
        self.mean = tuple(float(v) for v in (mean or weights_mean or IMAGENET_MEAN))
        self.std = tuple(float(v) for v in (std or weights_std or IMAGENET_STD))

    # ---------------------------------------------------------------- weights
    def load_torchvision_state_dict(self, state: dict, source: str = "state dict") -> dict:
        """Copies a torchvision ``state_dict()`` of this architecture into the trunk (and fc6 / fc7 if they fit).

        Returns:
            the report of :func:`~sppnet.models.weights.load_torchvision_weights`.

        Raises:
            ValueError: naming missing / unexpected keys or a shape that differs.
        """
        if self.width != 1.0:
            raise ValueError(f"torchvision weights need width=1.0, this {self.name} has width={self.width}")
        renames = {self.arch.trunk_prefix + k: f"features.{k}" for k in self.features.state_dict()}
        head = {f"{tv}.{p}": f"fc.{ours}.{p}" for tv, ours in zip(self.arch.fc, ("0", "3")) for p in ("weight", "bias")}
        known = set(_on_meta(self.name).state_dict())
        return load_torchvision_weights(self, state, renames, head, known, source)

    # --------------------------------------------------------------- geometry
    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """Conv map size ``(h, w)`` for an input of ``height x width`` (0 if too small)."""
        return self.geometry.output_size(height, width)

    def feature_stages(self) -> dict[str, list[nn.Module]]:
        """Named stages of the trunk, input first (for :func:`~sppnet.models.freeze.freeze`)."""
        return self.arch.stages(self.features)

    def config(self) -> dict:
        """Keyword arguments that rebuild this model with ``get_model(name, **config)``.

        The weights are not among them: they come from the checkpoint.
        """
        cfg = {
            "num_classes": self.num_classes,
            "spp": self.spp,
            "levels": list(self.levels),
            "width": self.width,
            "fc_dim": self.fc_dim,
            "dropout": self.dropout,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if not self.spp:
            cfg["input_size"] = self.input_size
        return cfg

    def extra_repr(self) -> str:
        head = f"spp levels={self.levels}" if self.spp else f"no-SPP input_size={self.input_size}"
        return (
            f"name={self.name!r}, {head}, width={self.width}, stride={self.stride}, "
            f"offset={self.offset}, min_input_size={self.min_input_size}"
        )


def _builder(arch: str):
    def build(**kwargs) -> TorchvisionSPPNet:
        return TorchvisionSPPNet(arch, **kwargs)

    build.__name__ = arch
    build.__doc__ = f"torchvision's {arch} as an SPP-net backbone; keyword arguments as in :class:`TorchvisionSPPNet`."
    return register_model(arch)(build)


alexnet = _builder("alexnet")
vgg16 = _builder("vgg16")
resnet50 = _builder("resnet50")
