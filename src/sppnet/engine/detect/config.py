"""The settings of a detection run: one small config per stage, composed into :class:`DetectConfig`.

Each setting is declared once (:func:`~sppnet.engine.config.option`: default,
help, flag, range); ``sppnet detect train``'s flags are generated from these
declarations and the resolved config is saved as the run's ``config.json``,
nested like the classes::

    DetectConfig
      data, format, ann, split, strict        the training data
      method, scorer                          spp | rcnn, svm | softmax
      proposals   ProposalConfig              selective search (data/proposals.py)
      backbone    BackboneConfig              the network, its pretraining or --backbone
      features    FeaturesConfig              scales, size factor, pyramid levels
      finetune    FinetuneConfig              (finetune.py)
      svm         SVMConfig                   (svm.py)
      bbox        BoxRegressionConfig         (bbox_regression.py)
      test        TestConfig                  calibration split
      seed, workers, device, preset

The defaults ARE the ``small`` preset; :data:`PRESETS` holds each preset as a
partial override of them. ``config.json`` files of runs written before the
nesting (flat fields with ``ss_`` / ``ft_`` / ``svm_`` / ``bbox_`` prefixes)
load through :func:`from_flat`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from sppnet.data.proposals import SelectiveSearchParams
from sppnet.engine.config import Config, ConfigError, option
from sppnet.engine.detect.bbox_regression import BoxRegressionConfig
from sppnet.engine.detect.finetune import FinetuneConfig
from sppnet.engine.detect.svm import SVMConfig
from sppnet.models import list_models
from sppnet.models.detector import METHODS, SCORERS

__all__ = [
    "PRESETS",
    "BackboneConfig",
    "DetectConfig",
    "FeaturesConfig",
    "ProposalConfig",
    "TestConfig",
    "from_flat",
]


@dataclass
class ProposalConfig(Config):
    """Proposals: selective search, fast mode (R-CNN / SPP-net: about 2,000 windows per image)."""

    flag_prefix: ClassVar[str] = "ss-"

    mode: str = option("fast", choices=("fast", "quality", "single"), help="selective search strategy")
    resize_to: int | None = option(200, min=1, help="run on a copy of this short side; none: full resolution")
    base_k: int | None = option(100, min=1, help="k of the first graph segmentation; none: OpenCV's 150")
    inc_k: int = option(100, min=1, help="increment of k between segmentations")
    max_proposals: int = option(2000, flag="--max-proposals", min=1, help="selective search windows per image")

    def params(self, seed: int) -> SelectiveSearchParams:
        """The :class:`~sppnet.data.proposals.SelectiveSearchParams` (also the proposal cache's key)."""
        return SelectiveSearchParams(
            mode=self.mode,
            base_k=self.base_k,
            inc_k=self.inc_k,
            max_proposals=self.max_proposals,
            resize_to=self.resize_to,
            seed=seed,
        )


@dataclass
class BackboneConfig(Config):
    """Backbone: the network, pretrained as a classifier of windows or taken from --backbone."""

    flag_prefix: ClassVar[str] = "pretrain-"

    model: str = option("zf5", flag="--model", help="network (registry name)")
    width: float = option(0.25, flag="--width", min=0, min_open=True, help="channel multiplier (1.0 = Table 1)")
    fc_dim: int = option(512, flag="--fc-dim", min=1, help="width of fc6 / fc7 (paper 4096)")
    dropout: float = option(0.5, flag="--dropout", min=0, max=1, max_open=True, help="dropout after fc6 and fc7")
    checkpoint: str | None = option(
        None,
        flag="--backbone",
        path=True,
        metavar="RUN",
        help="classification run (sppnet classify train) or its model.safetensors; none: pretrain one on the "
        "training windows",
    )
    epochs: int = option(12, min=1, help="epochs of backbone pretraining")
    batch_size: int = option(16, flag="--pretrain-batch", min=1, help="pretraining batch size")
    lr: float = option(0.003, min=0, min_open=True, help="pretraining learning rate")
    crop_size: int | None = option(
        None, flag="--pretrain-size", min=1, help="pretraining crop side; none: 224 x --size"
    )
    background_per_image: int = option(
        1, flag="--background-per-image", min=0, help="background windows per image among the pretraining crops"
    )


@dataclass
class FeaturesConfig(Config):
    """Features: conv5 once per image and scale, a pyramid per window (SPP-net Sec. 4.2)."""

    scales: tuple[int, ...] = option(
        (688,),
        min=1,
        metavar="S",
        help="image short sides in the paper's pixels, times --size (paper: 688, or 480 576 688 864 1200)",
    )
    size_factor: float = option(
        0.5,
        flag="--size",
        min=0,
        min_open=True,
        help="multiplies every size: scales, the 224 px window target, warps, pretraining crops",
    )
    target_size: int = option(224, min=1, help="window side each window's scale is chosen for (Sec. 4.2: 224)")
    levels: tuple[int, ...] = option((1, 2, 3, 6), min=1, help="pyramid levels (released code: 1 2 3 6)")
    chunk_size: int = option(1024, flag="--chunk-size", min=1, help="windows pooled / scored at a time")


@dataclass
class TestConfig(Config):
    """Testing: the held-out split of the per-class score thresholds."""

    calibrate_split: str | None = option(
        "val",
        flag="--calibrate-split",
        metavar="SPLIT",
        help="held-out VOC split for the per-class score thresholds predict uses (skipped when missing or "
        "overlapping --split; none: skip)",
    )


TestConfig.__test__ = False  # not a pytest test class


@dataclass
class DetectConfig(Config):
    """Everything that defines a detection run (saved as ``config.json``); defaults: ``small``.

    Sizes (``features.scales``, ``features.target_size``, R-CNN's warp and the
    pretraining crops) are in the paper's pixels and multiplied by
    ``features.size_factor``.
    """

    data: str | None = option(
        None,
        path=True,
        help="Pascal VOC root (or COCO image folder with --format coco); none: the built-in shapes",
    )
    format: str = option("voc", choices=("voc", "coco"), help="layout of --data")
    ann: str | None = option(None, path=True, help="COCO annotation JSON (with --format coco)")
    split: str = option("train", help="VOC split to train on")
    strict: bool = option(False, help="stop at the first bad annotation or image")
    method: str = option("spp", choices=METHODS, help="spp, or the R-CNN baseline (warp every window)")
    scorer: str = option("svm", choices=SCORERS, help="per-class SVMs (paper) or fc8's softmax")
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BoxRegressionConfig = field(default_factory=BoxRegressionConfig)
    test: TestConfig = field(default_factory=TestConfig)
    seed: int = option(0, min=0, help="seeds proposals' ranking, the weights, sampling and dropout")
    workers: int = option(2, min=0, help="selective search worker processes")
    device: str = option("auto", flag=False, help="auto | cpu | cuda | cuda:N")
    preset: str = option("small", flag=False, help="the preset the values started from")

    @classmethod
    def from_preset(cls, preset: str = "small", overrides: dict[str, Any] | None = None, /, **more: Any):
        """The preset's values, then ``overrides`` (nested partial dicts or dotted keys), resolved.

        ``DetectConfig.from_preset("paper", {"finetune": {"lr": 1e-3}}, workers=0)``.
        """
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        return cls().with_overrides(PRESETS[preset]).with_overrides(overrides, **more, preset=preset).resolved()

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> DetectConfig:
        """A saved ``config.json`` (nested; or flat, as written before the nesting), resolved."""
        if _is_flat(d):
            d = from_flat(d)
        return super().from_dict(d, where).resolved()

    def check(self) -> None:
        if self.backbone.model not in list_models():
            raise ConfigError(
                f"unknown model {self.backbone.model!r} (--model); registered: {', '.join(list_models())}"
            )
        if self.format == "coco" and (self.data is None or self.ann is None):
            raise ConfigError("--format coco needs --data (image folder) and --ann (annotation JSON)")

    # derived sizes
    @property
    def image_scales(self) -> tuple[int, ...]:
        """The image short sides conv5 is computed at: ``features.scales`` x ``size_factor``."""
        return tuple(max(1, round(s * self.features.size_factor)) for s in self.features.scales)

    @property
    def window_target(self) -> float:
        return self.features.target_size * self.features.size_factor

    @property
    def crop_size(self) -> int:
        """The side of the backbone's pretraining crops."""
        return int(self.backbone.crop_size or round(self.features.target_size * self.features.size_factor))

    def selective_search(self) -> SelectiveSearchParams:
        return self.proposals.params(self.seed)


#: ``small`` (the defaults): 2 CPU cores, the built-in data (images of 200-400
#: px): ZF-5 at a quarter width, fc 512, every size halved (scale 344, target
#: window 112 px), selective search on a 200 px copy. Pretraining from scratch
#: at lr 0.01 sat on the initial loss plateau for the whole budget; lr 0.003
#: with batches of 16 left it after ~3 epochs. ``paper``: Table 1 width, fc
#: 4096, s = 688, 250k + 50k fine-tuning iterations at 1e-4 / 1e-5 (Sec. 4.1).
PRESETS: dict[str, dict[str, Any]] = {
    "small": {},
    "paper": {
        "proposals": {"resize_to": None, "base_k": None, "inc_k": 150},
        "backbone": {
            "width": 1.0,
            "fc_dim": 4096,
            "epochs": 30,
            "batch_size": 128,
            "lr": 0.01,
            "background_per_image": 2,
        },
        "features": {"size_factor": 1.0},
        "finetune": {"iterations": 300000, "lr": 1e-4, "lr_steps": (250000,)},
        "workers": 8,
    },
}


# ------------------------------------------------------- configs before nesting

#: Flat field of the runs written before the nesting -> its dotted path now.
_FLAT: dict[str, str] = {
    **{
        k: k
        for k in ("data", "format", "ann", "split", "strict", "method", "scorer", "seed", "workers", "device", "preset")
    },
    **{f"ss_{k}": f"proposals.{k}" for k in ("mode", "resize_to", "base_k", "inc_k")},
    "max_proposals": "proposals.max_proposals",
    **{k: f"backbone.{k}" for k in ("model", "width", "fc_dim", "dropout")},
    "backbone": "backbone.checkpoint",
    "pretrain_epochs": "backbone.epochs",
    "pretrain_batch": "backbone.batch_size",
    "pretrain_lr": "backbone.lr",
    "pretrain_size": "backbone.crop_size",
    "background_per_image": "backbone.background_per_image",
    **{k: f"features.{k}" for k in ("scales", "size_factor", "target_size", "levels", "chunk_size")},
    "finetune": "finetune.mode",
    "ft_batch": "finetune.batch_size",
    "checkpoint_every": "finetune.checkpoint_every",
    **{f"ft_{k}": f"finetune.{k}" for k in ("iterations", "lr", "lr_steps", "fg_fraction", "flip", "images_per_batch")},
    **{f"svm_{k}": f"svm.{k}" for k in ("C", "pos_weight", "epochs", "retrain_limit")},
    "bbox_regression": "bbox.enabled",
    "bbox_iou": "bbox.iou",
    "bbox_lambda": "bbox.lam",
    "calibrate_split": "test.calibrate_split",
}


def _is_flat(d: dict[str, Any]) -> bool:
    """Whether a saved config is of the flat form (``"finetune": "fc"``, ``"ft_lr": ...``)."""
    nested = {f.name for f in fields(DetectConfig)}
    return isinstance(d.get("finetune"), str) or any(k in _FLAT and k not in nested for k in d)


def from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """A flat ``config.json`` of a run written before the nesting, as today's nested dict.

    Raises:
        ConfigError: a key that neither form has.
    """
    unknown = sorted(set(d) - set(_FLAT))
    if unknown:
        raise ConfigError(f"unknown settings {unknown} in a flat (pre-nesting) detection config")
    nested: dict[str, Any] = {}
    for key, value in d.items():
        head, _, rest = _FLAT[key].partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[head] = value
    return nested


def _check_flat_table() -> None:
    """Every flat name maps to a setting that exists (import-time invariant)."""
    known = set(DetectConfig().flat())
    missing = sorted(v for v in _FLAT.values() if v not in known)
    assert not missing, missing


_check_flat_table()
