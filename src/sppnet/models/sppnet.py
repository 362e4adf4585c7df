"""The paper's networks (Table 1) with an SPP head or the no-SPP baseline head.

Every network is a conv backbone described by a list of layer specs (so its
stride, receptive-field offset, feature-map size and minimum input size are
computed, never typed in) plus a head:

* ``spp=True``: the spatial pyramid (default ``(6, 3, 2, 1)``) replaces pool5,
  then fc6-4096, fc7-4096 (ReLU, dropout 0.5) and the classifier. fc6's input
  width is ``channels * sum(n*n)`` from the pyramid. Any input at least
  ``min_input_size`` works.
* ``spp=False``: the baseline pools conv5 to 6x6 with a fixed window, then the
  same fc layers. It accepts exactly one input size (``input_size``).

Table 1 (filters x size, stride; map size for a 224 input):

==========  ==============================  =========================  ==========
model       conv1                           conv2                      conv3-5
==========  ==============================  =========================  ==========
zf5         96x7 s2 p1; LRN; pool 3 s2 (55) 256x5 s2 p1; LRN; pool 3   384,384,256 x3 (13)
convnet5    96x11 s4 p2; LRN (55)           256x5 p2; LRN; pool 3 s2   384x3; pool 3 s2; 384, 256 (13)
overfeat5   96x7 s2 p1; pool 3 s3; LRN (36) 256x5 p2; pool 2 s2 (18)   512 x3 (18)
overfeat7   as overfeat5                                               + conv6, conv7 512x3
==========  ==============================  =========================  ==========

Normalisation (``norm``): ``"lrn"`` is the paper's (LRN where Table 1 puts it);
``"bn"`` -- a beyond-the-paper variant -- drops the LRN layers and puts a
``BatchNorm2d`` after every conv, before its ReLU (Ioffe & Szegedy 2015; the
convs then have no bias); ``"none"`` drops the LRN layers. ``fc_norm=True``
puts a ``BatchNorm1d`` after fc6 and fc7, before their ReLU: the pyramid's
fc6 input is ``C5 * 50`` wide (12,800 for a 256-channel conv5), and in short
runs from scratch that layer is what stalls at chance without it.

Padding: chosen to give the table's map sizes. ZF-5's conv2 uses padding 1 so
that its map is the table's 27x27 (the released Caffe model uses 0 and gets
26x26; both end at 13x13 after the ceil-mode pool). Pools in ZF-5 use ceil
mode, as in the released Caffe model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sppnet.models._registry import register_model
from sppnet.models.geometry import feature_geometry
from sppnet.ops import SpatialPyramidPool
from sppnet.ops._bins import check_levels

__all__ = ["SPPNet", "Conv", "Pool", "LRN", "NORMS", "ZF5", "CONVNET5", "OVERFEAT5", "OVERFEAT7"]

#: Values of ``SPPNet(norm=...)``: the paper's LRN, batch norm after every conv, none.
NORMS: tuple[str, ...] = ("lrn", "bn", "none")


@dataclass(frozen=True)
class Conv:
    """A conv layer followed by ReLU."""

    out: int
    k: int
    s: int = 1
    p: int = 0


@dataclass(frozen=True)
class Pool:
    """A max-pooling layer."""

    k: int
    s: int
    p: int = 0
    ceil: bool = False


@dataclass(frozen=True)
class LRN:
    """Local response normalisation across channels (Caffe semantics)."""

    size: int = 5
    alpha: float = 1e-4
    beta: float = 0.75
    k: float = 1.0


class ChannelLRN(nn.LocalResponseNorm):
    """:class:`torch.nn.LocalResponseNorm` (same semantics, same attributes),
    computed as a sum of ``size`` channel-shifted squares.

    ``x / (k + alpha / size * sum_{c' in window(c)} x_{c'}^2) ** beta`` with the
    window ``[c - size // 2, c + (size - 1) // 2]`` cut at the ends, exactly as
    torch's. Torch builds the window sum with ``avg_pool3d`` over a padded 5-D
    copy, which was 60% of ZF-5's conv time on a CPU; the shifted adds (and,
    for ``beta = 0.75``, ``rsqrt`` instead of ``pow``) are 3-4x faster, and
    without autograd the peak is the input plus two maps.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            return super().forward(x)
        channels = x.shape[1]
        squares = x * x
        window = squares.clone()  # the centre term; no padded copy (a 1200 px image's conv1 is 184 MB)
        for shift in range(-(self.size // 2), (self.size - 1) // 2 + 1):
            if shift == 0 or abs(shift) >= channels:
                continue
            if shift > 0:  # channel c gains c + shift
                window[:, : channels - shift] += squares[:, shift:]
            else:
                window[:, -shift:] += squares[:, : channels + shift]
        del squares
        base = window.mul_(self.alpha / self.size).add_(self.k)
        grad = torch.is_grad_enabled() and x.requires_grad
        if self.beta == 0.75:
            inv = base.rsqrt_()
            if grad:
                return x * inv * inv.sqrt()
            return inv.sqrt().mul_(inv).mul_(x)  # in place: peak x + 2 maps
        return x / base.pow_(self.beta)


# SPP-net Table 1. LRN sizes: 3 in the released ZF-5, 5 (AlexNet's) elsewhere.
ZF5 = (
    Conv(96, 7, 2, 1), LRN(3, 5e-5), Pool(3, 2, ceil=True),
    Conv(256, 5, 2, 1), LRN(3, 5e-5), Pool(3, 2, ceil=True),
    Conv(384, 3, 1, 1), Conv(384, 3, 1, 1), Conv(256, 3, 1, 1),
)  # fmt: skip
CONVNET5 = (
    Conv(96, 11, 4, 2), LRN(),
    Conv(256, 5, 1, 2), LRN(), Pool(3, 2),
    Conv(384, 3, 1, 1), Pool(3, 2),
    Conv(384, 3, 1, 1), Conv(256, 3, 1, 1),
)  # fmt: skip
OVERFEAT5 = (
    Conv(96, 7, 2, 1), Pool(3, 3), LRN(),
    Conv(256, 5, 1, 2), Pool(2, 2),
    Conv(512, 3, 1, 1), Conv(512, 3, 1, 1), Conv(512, 3, 1, 1),
)  # fmt: skip
OVERFEAT7 = OVERFEAT5 + (Conv(512, 3, 1, 1), Conv(512, 3, 1, 1))


def _scale(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class SPPNet(nn.Module):
    """A Table 1 network with an SPP head (or the no-SPP baseline head).

    Args:
        layers: backbone layer specs (``Conv`` / ``Pool`` / ``LRN``), input first.
        num_classes: classifier outputs.
        spp: pyramid head (True) or the fixed 6x6 pool5 baseline (False).
        levels: pyramid levels (``spp=True``).
        width: channel multiplier for every conv layer (1.0 is the paper).
        fc_dim: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout after fc6 and fc7.
        input_size: the one input side the ``spp=False`` baseline accepts.
        norm: ``"lrn"`` (the paper), ``"bn"`` (``BatchNorm2d`` after every conv,
            before its ReLU, instead of LRN) or ``"none"`` (see the module docstring).
        fc_norm: ``BatchNorm1d`` after fc6 and fc7, before their ReLU.
        name: registry name, kept for checkpoints.

    Shapes: ``forward_features(x: Tensor[N, 3, H, W]) -> Tensor[N, C5, h, w]``;
    ``forward_head(maps) -> Tensor[N, num_classes]``; ``pool(maps) ->
    Tensor[N, C5 * sum(n*n)]``; ``fc(pooled) -> Tensor[N, fc_dim]`` (fc7).
    """

    def __init__(
        self,
        layers: Sequence[Conv | Pool | LRN],
        num_classes: int = 1000,
        spp: bool = True,
        levels: int | Sequence[int] = (6, 3, 2, 1),
        width: float = 1.0,
        fc_dim: int = 4096,
        dropout: float = 0.5,
        input_size: int = 224,
        norm: str = "lrn",
        fc_norm: bool = False,
        name: str = "custom",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a positive number, got {width}")
        if fc_dim < 1:
            raise ValueError(f"fc_dim must be >= 1, got {fc_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.name = name
        self.layer_specs = tuple(layers)
        self.spp = bool(spp)
        self.levels = check_levels(levels)
        self.width = float(width)
        self.num_classes = int(num_classes)
        self.fc_dim = int(fc_dim)
        self.dropout = float(dropout)
        self.norm = norm
        self.fc_norm = bool(fc_norm)

        modules: list[nn.Module] = []
        chans = 3
        for spec in self.layer_specs:
            if isinstance(spec, Conv):
                out = _scale(spec.out, width)
                if norm == "bn":
                    modules += [nn.Conv2d(chans, out, spec.k, spec.s, spec.p, bias=False), nn.BatchNorm2d(out)]
                else:
                    modules.append(nn.Conv2d(chans, out, spec.k, spec.s, spec.p))
                modules.append(nn.ReLU(inplace=True))
                chans = out
            elif isinstance(spec, Pool):
                modules.append(nn.MaxPool2d(spec.k, spec.s, spec.p, ceil_mode=spec.ceil))
            elif isinstance(spec, LRN):
                if norm == "lrn":
                    modules.append(ChannelLRN(spec.size, spec.alpha, spec.beta, spec.k))
            else:
                raise ValueError(f"unknown layer spec {spec!r}")
        self.features = nn.Sequential(*modules)
        self.feature_channels = chans
        self.geometry = feature_geometry(self.features)  # read off the modules (models/geometry.py)
        self.stride, self.offset = self.geometry.stride, self.geometry.offset
        self.min_input_size = self.geometry.min_input_size

        if self.spp:
            self.input_size = None
            self.pool: nn.Module = SpatialPyramidPool(self.levels, "max", "adaptive")
            pooled_dim = self.pool.output_dim(chans)
        else:
            self.input_size = int(input_size)
            a, _ = self.feature_size(self.input_size, self.input_size)
            if a < 6:
                raise ValueError(f"spp=False needs a conv5 map of at least 6x6; input_size={input_size} gives {a}x{a}")
            stride = a // 6  # pool5 as a fixed sliding window that gives exactly 6x6 bins
            self.pool = nn.Sequential(nn.MaxPool2d(a - 5 * stride, stride), nn.Flatten(1))
            pooled_dim = chans * 36
        self.pooled_dim = pooled_dim
        fc: list[nn.Module] = []
        for fan_in in (pooled_dim, fc_dim):  # fc6, fc7
            fc.append(nn.Linear(fan_in, fc_dim))
            if self.fc_norm:
                fc.append(nn.BatchNorm1d(fc_dim))
            fc += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.fc = nn.Sequential(*fc)  # fc6 is fc[0]; fc7 is fc[3], or fc[4] with fc_norm
        self.classifier = nn.Linear(fc_dim, num_classes)
        self._init_weights()

    # ---------------------------------------------------------------- geometry
    def feature_size(self, height: int, width: int) -> tuple[int, int]:
        """conv5 map size ``(h, w)`` for an input of ``height x width`` (0 if too small)."""
        return self.geometry.output_size(height, width)

    def config(self) -> dict:
        """Keyword arguments that rebuild this model with ``get_model(name, **config)``."""
        cfg = {
            "num_classes": self.num_classes,
            "spp": self.spp,
            "levels": list(self.levels),
            "width": self.width,
            "fc_dim": self.fc_dim,
            "dropout": self.dropout,
            "norm": self.norm,
            "fc_norm": self.fc_norm,
        }
        if not self.spp:
            cfg["input_size"] = self.input_size
        return cfg

    # ----------------------------------------------------------------- forward
    def check_input(self, x: Tensor) -> None:
        """ValueError for a wrong rank, channel count or an input too small / of the wrong size."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name} expects images as Tensor[N, 3, H, W], got {shape}")
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if not self.spp and (h, w) != (self.input_size, self.input_size):
            raise ValueError(
                f"{self.name} with spp=False accepts only {self.input_size}x{self.input_size} inputs, got {h}x{w}"
            )
        if min(h, w) < self.min_input_size:
            raise ValueError(
                f"{self.name} needs inputs of at least {self.min_input_size}x{self.min_input_size} pixels, got {h}x{w}"
            )

    def forward_features(self, x: Tensor) -> Tensor:
        """conv1-conv5: ``Tensor[N, 3, H, W] -> Tensor[N, C5, h, w]`` (run ONCE per image and scale).

        A ``conv_runner`` attribute (set by :func:`sppnet.engine.compile.compile_conv_layers`,
        a ``torch.compile`` of ``features`` sharing its parameters) runs the conv
        layers in their place; it is a plain attribute, never part of ``state_dict``,
        and tracing or exporting always uses ``features`` itself.
        """
        if not torch.jit.is_tracing() and not _exporting():
            self.check_input(x)
            runner = self.__dict__.get("conv_runner")
            if runner is not None:
                return runner(x)
        return self.features(x)

    def forward_head(self, maps: Tensor, pre_logits: bool = False) -> Tensor:
        """pool5 (pyramid) -> fc6 -> fc7 -> classifier; ``pre_logits`` returns fc7."""
        feats = self.fc(self.pool(maps))
        return feats if pre_logits else self.classifier(feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        head = f"spp levels={self.levels}" if self.spp else f"no-SPP input_size={self.input_size}"
        return (
            f"name={self.name!r}, {head}, width={self.width}, norm={self.norm!r}, fc_norm={self.fc_norm}, "
            f"stride={self.stride}, "
            f"offset={self.offset}, min_input_size={self.min_input_size}"
        )


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return torch.onnx.is_in_onnx_export() or bool(is_exporting is not None and is_exporting())


def _builder(name: str, layers: tuple):
    def build(**kwargs) -> SPPNet:
        return SPPNet(layers, name=name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name} from SPP-net Table 1; keyword arguments as in :class:`SPPNet`."
    return register_model(name)(build)


zf5 = _builder("zf5", ZF5)
convnet5 = _builder("convnet5", CONVNET5)
overfeat5 = _builder("overfeat5", OVERFEAT5)
overfeat7 = _builder("overfeat7", OVERFEAT7)
