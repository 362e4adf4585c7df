"""The settings of a detection run: one small config per stage, composed into :class:`DetectConfig`.

Each setting is declared once (:func:`~sppnet.engine.config.option`: default,
help, flag, range); ``sppnet detect train``'s flags are generated from these
declarations and the resolved config is saved as the run's ``config.json``,
nested like the classes::

    DetectConfig
      data, format, ann, split, strict        the training data
      method, scorer                          spp | rcnn, svm | softmax
      proposals   ProposalConfig              selective search (data/proposals/)
      backbone    BackboneConfig              the network, its pretraining or --backbone
      features    FeaturesConfig              scales, size factor, pyramid levels
      finetune    FinetuneConfig              (finetune.py)
      svm         SVMConfig                   (svm.py)
      bbox        BoxRegressionConfig         (bbox_regression.py)
      test        TestConfig                  NMS order, detections kept, calibration split
      limits      LimitsConfig                image size limits (engine/limits.py)
      amp, compile, seed, workers, device, preset

The defaults ARE the ``small`` preset; :data:`PRESETS` holds each preset as a
partial override of them. ``config.json`` files of runs written before the
nesting (flat fields with ``ss_`` / ``ft_`` / ``svm_`` / ``bbox_`` prefixes)
load through :func:`from_flat`. Settings added since a run was saved take the
values that reproduce what it did (:data:`_ADDED_LATER`), not today's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from sppnet.data.proposals import SelectiveSearchParams
from sppnet.engine.amp import AMP_CHOICES
from sppnet.engine.classify.config import check_freeze, normalisation_for
from sppnet.engine.compile import COMPILE_CHOICES
from sppnet.engine.config import Config, ConfigError, merge_overrides, option
from sppnet.engine.detect.bbox_regression import BoxRegressionConfig
from sppnet.engine.detect.finetune import PRETRAINED_LR, FinetuneConfig
from sppnet.engine.detect.svm import SVMConfig
from sppnet.engine.limits import LimitsConfig
from sppnet.models import list_models
from sppnet.models.detector import METHODS, NMS_BOXES, RCNN_CONTEXT_PADDING, SCALE_RULES, SCORERS
from sppnet.models.torchvision_backbones import TORCHVISION_BACKBONES

#: ``BackboneConfig.crops``: the pretraining windows (:func:`~sppnet.engine.detect.backbone.window_crops`).
CROP_CHOICES = ("gt", "proposals")
PRETRAIN_RECIPES = ("auto", "modern", "paper")
#: The pretraining learning rate of each recipe when ``--pretrain-lr`` is not given.
PRETRAIN_LR = {"modern": 1e-3, "paper": 0.003}

__all__ = [
    "CROP_CHOICES",
    "PRETRAIN_LR",
    "PRETRAIN_RECIPES",
    "MODEL_PRESETS",
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
    # ImageNet weights of a torchvision backbone (models/weights.py): read once, by
    # the pretraining (which then starts from them); the run's files hold the rest.
    weights: str | None = option(
        None,
        flag="--weights",
        metavar="NAME|FILE",
        help="start from ImageNet weights (alexnet, vgg16, resnet50): a torchvision name such as IMAGENET1K_V1 "
        "(downloaded once into $TORCH_HOME) or a torchvision state dict (.pth / .safetensors); none: random",
    )
    freeze: str = option(
        "none",
        flag="--freeze",
        metavar="STAGE",
        help="conv layers kept fixed in pretraining and --finetune all: none, conv, or up to a stage (conv2, layer3)",
    )
    mean: tuple[float, ...] | None = option(
        None, flag="--mean", length=3, metavar="M", help="input mean per RGB channel; none: what --weights expect"
    )
    std: tuple[float, ...] | None = option(
        None, flag="--std", length=3, min=0, min_open=True, metavar="S", help="input std per RGB channel"
    )
    epochs: int = option(12, min=1, help="epochs of backbone pretraining")
    batch_size: int = option(16, flag="--pretrain-batch", min=1, help="pretraining batch size")
    # Small: auto. On objects-voc the paper's recipe (LRN, SGD) gave the better detector
    # (mAP 0.678 vs 0.628 with the batch-norm classification defaults, 0.639 with their
    # batch-norm statistics re-estimated on whole images), on digits-voc too (0.214 vs
    # 0.154); the batch-norm recipe is the fallback for windows on which SGD sits at the
    # initial loss plateau, as it did on digits-voc in an earlier session (benchmarks/README.md).
    recipe: str = option(
        "auto",
        choices=PRETRAIN_RECIPES,
        help="pretraining recipe: paper (LRN, SGD, the paper's crops; Sec. 3.1), modern (the classify defaults: "
        "batch norm after each conv and fc, AdamW, warm-up, random crops, colour jitter), or auto (paper, then "
        "modern if the paper's did not leave the initial loss plateau)",
    )
    lr: float | None = option(
        None, min=0, min_open=True, help="pretraining learning rate; none: the recipe's (paper 0.003, modern 1e-3)"
    )
    crop_size: int | None = option(
        None, flag="--pretrain-size", min=1, help="pretraining crop side; none: 224 x --size"
    )
    background_per_image: int = option(
        1,
        flag="--background-per-image",
        min=0,
        help="background windows per image among the pretraining crops (--pretrain-crops gt)",
    )
    crops: str = option(
        "proposals",
        choices=CROP_CHOICES,
        help="pretraining windows: gt (the objects, --background-per-image background windows per image) or "
        "proposals (R-CNN style: each object, up to --pretrain-per-object proposals of IoU >= 0.5 with it as its "
        "class, --pretrain-bg-ratio background windows per object crop)",
    )
    per_object: int = option(
        4, min=0, help="proposals of IoU >= 0.5 per object among the pretraining crops (--pretrain-crops proposals)"
    )
    bg_ratio: float = option(
        1.0, min=0, help="background crops per object crop of an image (--pretrain-crops proposals)"
    )

    def complete(self) -> BackboneConfig:
        """``mean`` / ``std`` from the weights when unset (a ``--backbone`` run brings its own)."""
        if self.checkpoint is not None or (self.mean is not None and self.std is not None):
            return self
        mean, std = normalisation_for(self.model, self.weights)
        return replace(self, mean=tuple(self.mean or mean), std=tuple(self.std or std))

    def check(self) -> None:
        check_freeze(self.model, self.freeze)
        if self.weights is not None and self.checkpoint is not None:
            raise ConfigError(
                f"--weights {self.weights} and --backbone {self.checkpoint}: the backbone run already holds its "
                f"weights; give one of them"
            )
        if self.weights is not None and self.model not in TORCHVISION_BACKBONES:
            raise ConfigError(
                f"--weights loads torchvision's ImageNet weights into {', '.join(TORCHVISION_BACKBONES)}; "
                f"{self.model} is a Table 1 network trained here (--weights none)"
            )
        if self.weights is not None and self.width != 1.0:
            raise ConfigError(f"--weights needs --width 1 (the network the weights were trained as), got {self.width}")


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
    auto_scale: bool = option(
        True,
        help="replace --scales by scales chosen from the training objects' sizes (Sec. 4.2's rule applied to "
        "the data, times --auto-scale-factors; chosen once, saved in config.json); an explicit --scales turns "
        "it off",
    )
    # Small: (1, 2). The chosen scale and twice it, each window pooled at the one where its area
    # is closest to the target (Sec. 4.2): objects smaller than the median get the cells they lack
    # at one scale. objects-voc mAP 0.688 -> 0.790 (1.5x: 0.760; 2/3, 1, 1.5: 0.783); see
    # benchmarks/README.md (issue 14).
    auto_scale_factors: tuple[float, ...] = option(
        (1.0, 2.0),
        min=0,
        min_open=True,
        metavar="F",
        help="--auto-scale: the image scales conv5 is computed at, as multiples of the scale chosen from the "
        "objects (1: that scale alone)",
    )
    target_size: int = option(224, min=1, help="window side each window's scale is chosen for (Sec. 4.2: 224)")
    levels: tuple[int, ...] = option((1, 2, 3, 6), min=1, help="pyramid levels (released code: 1 2 3 6)")
    chunk_size: int = option(1024, flag="--chunk-size", min=1, help="windows pooled / scored at a time")
    scale_rule: str = option(
        "area",
        choices=SCALE_RULES,
        help="a window's scale: area (Sec. 4.2: area closest to the target squared) or released "
        "(spm_expected_scale.m: short side nearest 208 * min side / sqrt(area); use with --target-size 208)",
    )
    warp_context: float = option(
        RCNN_CONTEXT_PADDING,
        min=0,
        max=0.5,
        max_open=True,
        help="R-CNN: context on each side of a warped window, a fraction of the warp side "
        "(R-CNN Appendix A: 16 px of 227); 0: the bare box",
    )
    cache: str = option(
        "disk",
        flag="--feature-cache",
        choices=("disk", "memory", "none"),
        help="where the training set's conv5 lives: disk (RUN/cache/features), memory (RAM only) or none "
        "(recomputed by the frozen conv layers whenever read: data sets too large to store)",
    )
    cache_dtype: str = option(
        "float32",
        flag="--cache-dtype",
        choices=("float32", "float16"),
        help="stored precision of the cached conv5 (float16: half the space; pooled in float32)",
    )

    def check(self) -> None:
        n, factors = len(set(self.auto_scale_factors)), " ".join(f"{f:g}" for f in self.auto_scale_factors)
        if self.auto_scale and len(self.scales) > 1 and len(self.scales) != n:
            raise ConfigError(
                f"--auto-scale chooses {n} scale(s) (--auto-scale-factors {factors}), --scales gives "
                f"{len(self.scales)} {list(self.scales)}; pass --no-auto-scale to use them"
            )


@dataclass
class TestConfig(Config):
    """Testing: per-class NMS and caps (``spp_test.m``), the held-out split of the score thresholds."""

    calibrate_split: str | None = option(
        "val",
        flag="--calibrate-split",
        metavar="SPLIT",
        help="held-out VOC split for the per-class score thresholds predict uses (skipped when missing or "
        "overlapping --split; none: skip)",
    )
    max_per_class: int | None = option(
        100, min=1, help="detections kept per class and image (spp_test.m: 100); none: no per-class cap"
    )
    max_per_image: int | None = option(
        None, min=1, help="detections kept per image over all classes, after the per-class cap; none: no cap"
    )
    nms_boxes: str = option(
        "proposals",
        choices=NMS_BOXES,
        help="NMS on the proposals, then regress the survivors (spp_test.m), or on the regressed boxes",
    )

    def detect_options(self) -> dict[str, Any]:
        """The keyword arguments of :meth:`~sppnet.models.detector.SPPDetector.detect` these settings give."""
        return {"max_per_class": self.max_per_class, "max_per_image": self.max_per_image, "nms_boxes": self.nms_boxes}


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
    amp: str = option(
        "none",
        choices=AMP_CHOICES,
        help="mixed precision on CUDA: bf16 / fp16 autocast for conv and fc (the pyramid exact in its input "
        "dtype); a no-op on the CPU",
    )
    compile: str = option(
        "none",
        choices=COMPILE_CHOICES,
        help="torch.compile the conv layers that compute conv5 (feature caching, fine-tuning all layers, "
        "calibration) in this mode, dynamic shapes; falls back to eager with a warning; none: eager",
    )
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    seed: int = option(0, min=0, help="seeds proposals' ranking, the weights, sampling and dropout")
    workers: int = option(2, min=0, help="selective search worker processes")
    device: str = option("auto", flag=False, help="auto | cpu | cuda | cuda:N")
    preset: str = option("small", flag=False, help="the preset the values started from")

    @classmethod
    def from_preset(cls, preset: str = "small", overrides: dict[str, Any] | None = None, /, **more: Any):
        """The preset's values (and :data:`MODEL_PRESETS` of its model), then ``overrides``
        (nested partial dicts or dotted keys), resolved.

        ``DetectConfig.from_preset("paper", {"finetune": {"lr": 1e-3}}, workers=0)``.
        """
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given = merge_overrides(overrides, more)
        features = given.get("features", {})
        if "scales" in features and "auto_scale" not in features:  # explicit scales: no auto scale
            given = merge_overrides(given, {"features": {"auto_scale": False}})
        model = given.get("backbone", {}).get("model") or PRESETS[preset].get("backbone", {}).get("model")
        per_model = MODEL_PRESETS.get(preset, {}).get(model or BackboneConfig.model, {})
        if given.get("backbone", {}).get("checkpoint") is not None:  # --backbone RUN holds the weights
            per_model = merge_overrides(per_model, {"backbone": {"weights": None}})
        return (
            cls()
            .with_overrides(PRESETS[preset])
            .with_overrides(per_model)
            .with_overrides(given, preset=preset)
            .resolved()
        )

    @classmethod
    def from_dict(cls, d: dict, where: str = "") -> DetectConfig:
        """A saved ``config.json`` (nested; or flat, as written before the nesting), resolved."""
        if _is_flat(d):
            d = from_flat(d)
        return super().from_dict(_with_settings_added_later(d), where).resolved()

    def complete(self) -> DetectConfig:
        """The nested configs completed; with ``--weights`` and no ``--ft-lr``, fine-tuning at
        :data:`~sppnet.engine.detect.finetune.PRETRAINED_LR`."""
        cfg = self
        if self.finetune.lr is None and self.backbone.weights is not None:
            # FC_LR (0.02) was measured on fc layers pretrained here from scratch; fc layers
            # that start from ImageNet keep the rate of the earlier default.
            cfg = replace(self, finetune=replace(self.finetune, lr=PRETRAINED_LR))
        return Config.complete(cfg)

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
#: with batches of 16 left it after ~3 epochs. Beyond the paper (issue 14,
#: ``benchmarks/det_proto.py`` on objects-voc, 120 / 100 images: mAP 0.453 with
#: scale 344 and ground-truth crops): the image scale chosen from the training
#: objects' sizes (``auto_scale``, 0.555), R-CNN-style pretraining crops
#: (``crops="proposals"``, 0.656) and 3000 fine-tuning iterations (0.672); later, conv5
#: at that scale and twice it (``auto_scale_factors``: 0.688 -> 0.790, benchmarks/README.md);
#: fc fine-tuning at lr 0.02 instead of 0.003 (:data:`~sppnet.engine.detect.finetune.FC_LR`:
#: +1 to +10 points on objects-voc, mnist-voc and the demo's two seeds).
#: ``paper``: Table 1 width, fc 4096, s = 688, the objects as the pretraining
#: crops, 250k + 50k fine-tuning iterations at 1e-4 / 1e-5 (Sec. 4.1).
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
            "recipe": "paper",
            "background_per_image": 2,
            "crops": "gt",
        },
        "features": {"size_factor": 1.0, "auto_scale": False},
        "finetune": {"iterations": 300000, "lr": 1e-4, "lr_steps": (250000,)},
        "workers": 8,
    },
}

#: Per-backbone overrides of a preset, applied after it when ``--model`` names
#: one of these: ``MODEL_PRESETS[preset][model]``. ``paper`` with a torchvision
#: backbone is SPP-net's detection recipe (Sec. 4.1) on ImageNet weights, the
#: setting of Fast R-CNN's SPPnet baseline as far as that paper gives it (VGG-16:
#: 63.1 mAP on VOC 2007 test, Table 1; its fine-tuning cannot update the conv
#: layers, Sec. 1.1; SVMs and box regression):
#:
#: * ``weights`` torchvision's ``IMAGENET1K_V1`` (downloaded once into
#:   ``$TORCH_HOME``; ``--weights FILE`` for a local copy), ``freeze="conv"``: the
#:   window pretraining trains fc6 / fc7 / fc8 only, 3 epochs at lr 0.001 (from
#:   ImageNet fc layers, not from scratch);
#: * ``levels``: one level of 6 x 6 (alexnet) / 7 x 7 (vgg16) bins. On a window of
#:   224 px these are torchvision's own pool5 windows, so fc6 / fc7 start from
#:   ImageNet as SPP-net's do (its fc layers were pretrained on ImageNet with the
#:   pyramid, which no torchvision file holds). ``--levels 1 2 3 6`` gives the
#:   four-level pyramid, whose fc6 is then learnt on the VOC windows alone.
#:   ResNet-50 has no fc6 / fc7 to load: it keeps the pyramid, with fc 1024;
#: * one scale, 688 (Sec. 4.2's single-scale setting). Fast R-CNN's SPPnet ran at
#:   the five scales of SPP-net (its Table 4 compares times at five scales;
#:   ``--scales 480 576 688 864 1200``); the conv5 cache of VOC 2007 trainval, flipped
#:   too, is about 50 GB for VGG-16 at 688 (float32, 512 x 43 x 57 per image and
#:   flip) and five times that at the five scales, more than a usual disk holds.
#:   ResNet-50's C4 has 1024 channels: its cache would be 100 GB, so it caches
#:   no flipped copies (``finetune.flip`` off, 50 GB);
#: * fine-tuning, SVMs and box regression as the ``paper`` preset (Sec. 4.1).
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "alexnet": {
            "backbone": {"model": "alexnet", "weights": "IMAGENET1K_V1", "freeze": "conv", "epochs": 3, "lr": 0.001},
            "features": {"levels": (6,)},
        },
        "vgg16": {
            "backbone": {"model": "vgg16", "weights": "IMAGENET1K_V1", "freeze": "conv", "epochs": 3, "lr": 0.001},
            "features": {"levels": (7,)},
        },
        "resnet50": {
            "backbone": {
                "model": "resnet50",
                "weights": "IMAGENET1K_V1",
                "freeze": "conv",
                "fc_dim": 1024,
                "epochs": 3,
                "lr": 0.001,
            },
            "finetune": {"flip": False},
        },
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


#: Settings added after runs were saved without them, with the values that reproduce
#: what those runs did: R-CNN's bare warp (the windows they were trained on), 100
#: detections per image over all classes and NMS on the regressed boxes, the
#: fixed ``scales`` (no ``auto_scale``; an auto scale was one scale) and the objects as the
#: pretraining crops.
#: A saved detector's own ``warp_context`` (model.py) is what it tests with.
_ADDED_LATER: dict[str, dict[str, Any]] = {
    "backbone": {"crops": "gt", "recipe": "paper"},
    "features": {"scale_rule": "area", "warp_context": 0.0, "auto_scale": False, "auto_scale_factors": (1.0,)},
    "test": {"max_per_class": None, "max_per_image": 100, "nms_boxes": "regressed"},
}


def _with_settings_added_later(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config with :data:`_ADDED_LATER`'s values for the settings it lacks."""
    d = dict(d)
    for section, values in _ADDED_LATER.items():
        saved = d.get(section)
        if saved is None or isinstance(saved, dict):
            d[section] = {**values, **(saved or {})}
    return d


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
