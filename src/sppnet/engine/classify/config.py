"""The settings of a classification run: :class:`ClassifyConfig` and its presets.

Every setting is declared once, beside its field, with
:func:`~sppnet.engine.config.option` (default, help text, flag, valid range);
``sppnet classify train``'s flags are generated from these declarations
(:mod:`sppnet.cli._options`), so a value out of range (``--lr nan``,
``--dropout 1.5``) is refused where it is parsed, and the same checks run on
configs built in Python (:meth:`ClassifyConfig.resolved`).

The dataclass defaults ARE the ``small`` preset; :data:`PRESETS` holds each
preset as a partial override of them. Classification is one stage (train a
network on labelled images), so the config is flat; the detector's backbone
pretraining builds one of these from its own settings.

The resolved config is saved as ``config.json`` in the run folder and in the
``model.safetensors`` meta, so a run can be resumed and a model evaluated with
the settings it was trained with. Files written before these declarations
have the same flat keys and load unchanged; a key missing from an old file
takes today's default.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from sppnet.data.transforms import CROPS, IMAGENET_MEAN, IMAGENET_STD, small_size_for
from sppnet.engine.amp import AMP_CHOICES
from sppnet.engine.classify.schedules import LR_SCHEDULES, SCHEDULES
from sppnet.engine.compile import COMPILE_CHOICES
from sppnet.engine.config import Config, ConfigError, check_resume, merge_overrides, option
from sppnet.engine.limits import LimitsConfig
from sppnet.engine.views import VIEWS
from sppnet.models import get_model, list_models
from sppnet.models.freeze import feature_stages
from sppnet.models.sppnet import NORMS
from sppnet.models.torchvision_backbones import TORCHVISION_BACKBONES
from sppnet.models.weights import expected_normalisation

__all__ = [
    "MODEL_PRESETS",
    "PAPER_RECIPE",
    "PRESETS",
    "RESUME_MUTABLE",
    "ClassifyConfig",
    "check_freeze",
    "freeze_choices",
    "normalisation_for",
]


@functools.cache
def freeze_choices(model: str) -> tuple[str, ...]:
    """The values ``--freeze`` takes for the registered ``model``: ``none``, ``conv`` and its stages.

    The stage names do not depend on the widths, so they are read off a tiny copy of the network.
    """
    tiny = get_model(model, num_classes=1, levels=(1,), width=0.01, fc_dim=1)
    return ("none", "conv", *feature_stages(tiny))


def normalisation_for(model: str, weights: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of RGB images in [0, 1] a run of ``model`` from ``weights`` trains with.

    A torchvision weights name brings its own (``weights.transforms()``, read
    offline); files, random weights and the Table 1 networks use ImageNet's.

    Raises:
        ConfigError: ``weights`` is neither a file nor a torchvision weights name of ``model``.
    """
    if weights is None or model not in TORCHVISION_BACKBONES:
        return IMAGENET_MEAN, IMAGENET_STD
    try:
        return expected_normalisation(model, weights)
    except ValueError as e:
        raise ConfigError(f"--weights: {e}") from None


def check_freeze(model: str, freeze: str, flag: str = "--freeze") -> None:
    """ConfigError unless ``freeze`` is one of :func:`freeze_choices` of ``model`` (if registered)."""
    if model not in list_models():
        return  # reported by the config's own model check
    choices = freeze_choices(model)
    if freeze not in choices:
        raise ConfigError(f"{flag} {freeze!r} is not a stage of {model}; choose one of {', '.join(choices)}")


#: Settings a resumed run may change; every other one must match the saved config.
RESUME_MUTABLE: tuple[str, ...] = (
    "epochs",
    "time_budget",
    "workers",
    "cache_images",
    "device",
    "views",
    "compile",
) + tuple(f"limits.{f.name}" for f in dataclasses.fields(LimitsConfig))


@dataclass
class ClassifyConfig(Config):
    """Everything that defines a classification run (saved as ``config.json``).

    Defaults are the ``small`` preset (sized for 2 CPU cores: the built-in set in
    about 2 minutes; see :data:`PRESETS` for what was measured). Build with
    :meth:`from_preset` to start from another preset and override single
    values; the help text of each field says what it means.
    """

    flag_prefix: ClassVar[str] = ""

    # ---- the network (Table 1) and its head (Sec. 2.3)
    # Small: Overfeat-5 at 1/8 of the paper's channels. Overfeat puts LRN after a
    # stride-6 pool, so it trains 1.6x faster than ZF-5 at the same width (LRN
    # costs as much as the convolutions in a narrow ZF-5), and width 1/8 learned
    # as fast per step as 1/4 at half the cost.
    model: str = option("overfeat5", help=f"network: {' | '.join(list_models())}")
    spp: bool = option(True, help="the pyramid head; --no-spp: the baseline with a fixed 6x6 pool5 (one input size)")
    levels: tuple[int, ...] = option((6, 3, 2, 1), min=1, sep=",", help="pyramid levels, n x n bins each (Sec. 2.3)")
    width: float = option(0.125, min=0, min_open=True, help="channel multiplier of every conv layer (1.0 = Table 1)")
    fc_dim: int = option(256, min=1, help="width of fc6 and fc7 (Table 1: 4096)")
    # Small: batch norm after every conv and after fc6 / fc7 (beyond the paper).
    # The pyramid's wide fc6 input (C x 50 values) is what stalls training: with
    # LRN and no fc norm the loss sits at ln(K) for many epochs (benchmarks/README.md).
    norm: str = option(
        "bn",
        choices=NORMS,
        help="after each conv of a Table 1 network: lrn (the paper, where Table 1 puts it), bn (batch norm), none",
    )
    fc_norm: bool = option(True, help="batch norm after fc6 and fc7, before their ReLU (beyond the paper)")
    # Small: dropout 0. With 0.5 the loss had not left ln(8) after 600 steps; runs
    # this short are under-fitted, not over-fitted.
    dropout: float = option(0.0, min=0, max=1, max_open=True, help="dropout after fc6 and fc7")
    # Small: He init. With N(0, 0.01) the loss sits at ln(K) for ~100 steps even
    # when memorising 64 images, with He et al.'s (2015) fan-in init ~20.
    init: str = option(
        "he", choices=("paper", "he"), help="fc6/fc7 init: paper N(0, 0.01), or he (fan-in normal, He et al. 2015)"
    )

    # ---- ImageNet weights of the torchvision backbones (models/weights.py), frozen layers (models/freeze.py)
    # Read once, when the run starts: a resumed run and a saved model take their
    # weights from the checkpoint, never from here.
    weights: str | None = option(
        None,
        metavar="NAME|FILE",
        help="start from ImageNet weights (alexnet, vgg16, resnet50): a torchvision name such as IMAGENET1K_V1 "
        "(downloaded once into $TORCH_HOME) or a torchvision state dict (.pth / .safetensors); none: random",
    )
    freeze: str = option(
        "none",
        metavar="STAGE",
        help="conv layers kept fixed: none, conv (all of them), or up to a stage (conv2, layer3; the model's)",
    )
    # The normalisation the run trains and tests with (RGB in [0, 1]); filled in
    # from the weights (what they expect, else ImageNet's) and saved.
    mean: tuple[float, ...] | None = option(
        None, length=3, metavar="M", help="input mean per RGB channel; none: what --weights expect (else ImageNet's)"
    )
    std: tuple[float, ...] | None = option(
        None, length=3, min=0, min_open=True, metavar="S", help="input std per RGB channel; none: what --weights expect"
    )

    # ---- input sizes (Sec. 2.3, 3.1)
    # Small: crops of 112, multi-size partner 90: conv5 maps of 9x9 and 7x7 on
    # Overfeat-5, the ratio of the paper's 13x13 / 10x10 and both larger than the
    # finest 6x6 level. (ZF-5 at 112/90 gives 6x6/5x5, at 128/103 7x7/6x6.)
    size: int = option(112, min=1, help="crop side (paper 224); images are first resized to short side size*256/224")
    small_size: int | None = option(
        None, min=1, help="second size of the multi / random schedules; none: round(size*180/224)"
    )
    schedule: str = option(
        "single",
        choices=SCHEDULES,
        help="single size, alternate size / small-size epochs (multi), or a random size per epoch",
    )

    # ---- optimisation (Sec. 3.1: SGD, "the learning rate is divided by 10 when the error plateaus")
    # Small: AdamW at lr 2e-3 (decoupled weight decay 0.05) after a one-epoch warm-up. With
    # SGD at 0.05 (and AdamW at 4e-3) the batch-norm Overfeat-5 never left chance on the
    # built-in shapes; AdamW at 1e-3-2e-3 left it within 3-6 epochs there and learnt the
    # objects set faster than SGD did (benchmarks/README.md, issue 13). Without the auxiliary
    # classifier (aux_weight) 2e-3 stalled at chance on the shapes; with it, 2e-3 beat 1e-3 on
    # shapes (0.886 -> 0.893), digits (0.575 -> 0.610), objects (0.981 -> 0.990) and
    # textures (0.936 -> 0.944, 0.928 -> 0.960 over two seeds), level on mnist and faces.
    # The torchvision backbones keep 1e-3 and no auxiliary classifier (MODEL_PRESETS).
    optimizer: str = option("adamw", choices=("sgd", "adamw"), help="sgd (momentum, the paper) or adamw")
    epochs: int = option(60, min=1, help="training epochs (an upper bound under the plateau rule)")
    time_budget: float | None = option(
        None, min=0, min_open=True, help="stop before an epoch that would end past this many seconds of training"
    )
    batch_size: int = option(32, min=1, help="global batch size (split over torchrun processes)")
    lr: float = option(2e-3, min=0, min_open=True, help="initial learning rate")
    momentum: float = option(0.9, min=0, max=1, max_open=True, help="SGD momentum")
    weight_decay: float = option(
        0.05, min=0, help="weight decay (sgd: on every weight; adamw: decoupled, on conv / fc weights only)"
    )
    warmup_epochs: float = option(1.0, min=0, help="linear learning-rate warm-up from 0 over this many epochs")
    # Small: plateau, the paper's rule. A cosine over the budget (beyond the paper) lost
    # to it on the built-in shapes at 120 s and at 360 s (benchmarks/README.md, issue 13).
    lr_schedule: str = option(
        "plateau",
        choices=LR_SCHEDULES,
        help="plateau: lr / 10 when validation top-1 stops improving, then stop; steps: lr / 10 at --lr-steps; "
        "cosine: a half cosine to 0 over --epochs, or over --time-budget when given",
    )
    patience: int = option(
        3,
        min=1,
        help="plateau: epochs without a better validation top-1 before lr / 10 (with --schedule multi or random: "
        "pairs of epochs)",
    )
    max_reductions: int = option(2, min=0, help="plateau: lr reductions; the next plateau ends training")
    lr_steps: tuple[int, ...] = option(
        (),
        min=0,
        nonempty=False,
        sep=",",
        help="steps: epochs (0-based) from which lr is divided by another 10; '' for none",
    )
    label_smoothing: float = option(0.0, min=0, max=1, max_open=True, help="label smoothing of the cross-entropy")
    # Small: 1. An auxiliary linear classifier on conv5's global max pool (the pyramid's 1x1
    # bin) gives the conv layers a class signal that does not pass through the 1,600-wide
    # pyramid and random fc6 (the seventeenth session's paired runs, 120 s each, test top-1
    # full image, without / with: shapes 0.793 -> 0.886, digits 0.490 -> 0.575, objects
    # 0.976 -> 0.981, mnist 0.973 -> 0.971, textures 0.960 -> 0.936 and 0.936 -> 0.928 over two
    # seeds; weight 0.3: shapes 0.834, textures 0.936; benchmarks/README.md). Dropped after
    # training: the saved network is the paper's.
    aux_weight: float = option(
        1.0,
        min=0,
        help="weight of the loss of an auxiliary linear classifier on conv5's global max pool (the pyramid's "
        "1x1 bin), trained beside the network and not saved with it (beyond the paper); 0: none",
    )

    # ---- augmentation (Sec. 3.1: crops, flips, colour altering)
    # Small: random-resized crops keep at least 60 % of the image (at 25 % a
    # small object is often cut out of the crop; 0.6 left chance two epochs
    # sooner than 0.35 on the built-in shapes).
    crop: str = option(
        "random", choices=CROPS, help="paper: five fixed crops; random: random-resized crops of the whole image"
    )
    crop_scale: float = option(
        0.6, min=0, max=1, min_open=True, help="random crops: smallest area fraction of the image (largest 1)"
    )
    # Small: 0.15. Against 0.3 (the sixteenth session's benchmark sets, 120 s each, one
    # thread per run, paired runs side by side; test top-1, full image): textures 0.912 ->
    # 0.960, shapes 0.736 -> 0.754, objects 0.976 both, digits 0.43 -> 0.42; no jitter
    # lost digits 15 points (0.28: its digits' colours carry no label), benchmarks/README.md.
    jitter: float = option(0.15, min=0, max=1, max_open=True, help="brightness / contrast / saturation jitter")
    alphastd: float = option(0.1, min=0, help="AlexNet PCA colour-noise strength (0 disables)")

    # ---- the run
    seed: int = option(0, min=0, help="seeds the weights, the data order, augmentation and dropout")
    workers: int = option(0, min=0, help="DataLoader worker processes per training process (turns the cache off)")
    cache_images: bool = option(
        True, help="keep decoded, resized images in memory across epochs (small data sets; needs --workers 0)"
    )
    device: str = option("auto", flag=False, help="auto | cpu | cuda | cuda:N (the CLI's --device)")
    amp: str = option(
        "none",
        choices=AMP_CHOICES,
        help="mixed precision on CUDA: bf16 / fp16 autocast for conv and fc (fp16 with loss scaling; the pyramid "
        "exact in its input dtype); a no-op on the CPU",
    )
    compile: str = option(
        "none",
        choices=COMPILE_CHOICES,
        help="torch.compile the conv layers (dynamic shapes, one graph for every input size) in this mode; "
        "falls back to eager with a warning if compiling fails; none: eager",
    )
    views: str = option("center", choices=VIEWS, help="test views of the per-epoch validation")
    preset: str = option("small", flag=False, help="the preset the values started from (informational)")
    data: str | None = option(
        None, path=True, help="ImageFolder root with train/<class>/* (and val/); none: the built-in shapes set"
    )
    limits: LimitsConfig = dataclasses.field(default_factory=LimitsConfig)

    @classmethod
    def from_preset(
        cls, preset: str = "small", overrides: Mapping[str, Any] | None = None, /, **more: Any
    ) -> ClassifyConfig:
        """The preset's values (and :data:`MODEL_PRESETS` of its model), then ``overrides``, resolved.

        ``overrides`` is taken as given; in ``more`` (keywords), ``None`` means
        "not set" and is skipped. Two settings follow others unless given: a new
        ``size`` resets ``small_size`` to 180/224 of it, and asking for
        ``workers`` turns ``cache_images`` off.

        Raises:
            ConfigError: an unknown preset or setting, or a value out of range.
        """
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        given = merge_overrides(overrides, {k: v for k, v in more.items() if v is not None})
        model = given.get("model", PRESETS[preset].get("model", cls.model))
        per_model = MODEL_PRESETS.get(preset, {}).get(model, {})
        follow: dict[str, Any] = {}
        if given.get("size") is not None and given.get("small_size") is None:
            follow["small_size"] = None  # 180/224 of the new size
        if given.get("workers") and given.get("cache_images") is None:
            follow["cache_images"] = False  # asking for workers means loading in them
        return (
            cls()
            .with_overrides(PRESETS[preset])
            .with_overrides(per_model)
            .with_overrides(merge_overrides(follow, given, {"preset": preset}))
            .resolved()
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "") -> ClassifyConfig:
        """A saved ``config.json``, resolved.

        A file written before the recipe settings of :data:`PAPER_RECIPE` existed
        trained with the paper's recipe; its missing keys take those values.
        """
        if isinstance(d, Mapping) and "lr_schedule" not in d:
            d = {**PAPER_RECIPE, **d}
        if isinstance(d, Mapping) and "aux_weight" not in d:
            d = {**d, "aux_weight": 0.0}  # saved before the auxiliary classifier existed: trained without it
        return super().from_dict(d, where).resolved()

    def complete(self) -> ClassifyConfig:
        """Tuples for the sequences, ``lr_steps`` sorted, ``small_size`` derived from ``size`` and
        ``mean`` / ``std`` from the weights (:func:`normalisation_for`) when unset."""
        changes: dict[str, Any] = {}
        for name in ("levels", "lr_steps"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                changes[name] = tuple(value)
        steps = changes.get("lr_steps")
        if steps is not None and all(isinstance(s, int) for s in steps):
            changes["lr_steps"] = tuple(sorted(steps))
        if self.small_size is None and isinstance(self.size, int) and not isinstance(self.size, bool):
            changes["small_size"] = small_size_for(self.size)
        if self.mean is None or self.std is None:
            mean, std = normalisation_for(self.model, self.weights)
            changes["mean"] = tuple(self.mean or mean)
            changes["std"] = tuple(self.std or std)
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """The checks that involve several settings (the declared ranges are checked before)."""
        if self.model not in list_models():
            raise ConfigError(f"unknown model {self.model!r} (--model); registered: {', '.join(list_models())}")
        check_freeze(self.model, self.freeze)
        if self.weights is not None and self.model not in TORCHVISION_BACKBONES:
            raise ConfigError(
                f"--weights loads torchvision's ImageNet weights into {', '.join(TORCHVISION_BACKBONES)}; "
                f"{self.model} is a Table 1 network trained here (--weights none)"
            )
        if self.weights is not None and self.width != 1.0:
            raise ConfigError(f"--weights needs --width 1 (the network the weights were trained as), got {self.width}")
        if self.small_size is not None and self.small_size > self.size:
            raise ConfigError(f"small_size ({self.small_size}) must not exceed size ({self.size})")
        if not self.spp and self.schedule != "single":
            raise ConfigError(
                f"schedule {self.schedule!r} trains at several input sizes, which needs the SPP head; "
                f"the no-SPP baseline accepts only {self.size}x{self.size} (use --schedule single)"
            )
        if self.cache_images and self.workers:
            raise ConfigError(
                f"cache_images keeps images in the training process, so it needs workers=0 (got {self.workers}); "
                f"turn the cache off to use DataLoader workers"
            )

    def check_resume(self, given: ClassifyConfig | None) -> ClassifyConfig:
        """This (saved) config with the settings a resumed run may change taken from ``given``.

        Raises:
            UserError: listing every other setting that differs.
        """
        return check_resume(self, given and given.resolved(), mutable=RESUME_MUTABLE, ignore=("preset",))

    def lr_at(self, epoch: int) -> float:
        """Learning rate of 0-based ``epoch``: ``lr / 10**(number of lr_steps <= epoch)``."""
        return self.lr * 0.1 ** sum(1 for s in self.lr_steps if epoch >= s)

    def model_kwargs(self, num_classes: int) -> dict[str, Any]:
        """Keyword arguments of :func:`sppnet.models.get_model` for this config."""
        kwargs: dict[str, Any] = {
            "num_classes": num_classes,
            "spp": self.spp,
            "levels": self.levels,
            "width": self.width,
            "fc_dim": self.fc_dim,
            "dropout": self.dropout,
        }
        if self.model not in TORCHVISION_BACKBONES:  # torchvision's networks keep their own normalisation layers
            kwargs.update(norm=self.norm, fc_norm=self.fc_norm)
        if not self.spp:
            kwargs["input_size"] = self.size
        return kwargs


#: The recipe settings where the ``small`` defaults leave the paper (Sec. 3.1:
#: LRN, SGD with weight decay 5e-4 on every weight, no warm-up, lr / 10 at fixed
#: epochs, the five crops, PCA colour noise only). The ``paper`` preset, configs
#: saved before these settings existed and the detector's backbone pretraining
#: use them.
PAPER_RECIPE: dict[str, Any] = {
    "norm": "lrn",
    "fc_norm": False,
    "optimizer": "sgd",
    "weight_decay": 5e-4,
    "warmup_epochs": 0.0,
    "lr_schedule": "steps",
    "crop": "paper",
    "jitter": 0.0,
    "aux_weight": 0.0,
}

#: Each preset as a partial override of the :class:`ClassifyConfig` defaults.
#:
#: ``small``: the defaults (the measurements behind them are beside the fields
#: and in benchmarks/README.md): batch norm after every conv and fc layer, AdamW
#: at lr 2e-3 (weight decay 0.05) after a one-epoch warm-up, the plateau rule
#: (lr / 10 after 3 epochs without a better validation top-1, twice, then stop)
#: within 60 epochs, random-resized crops of at least 60 % of the image with
#: colour jitter, and an auxiliary classifier on conv5's global max pool during training.
#: ``paper``: Table 1 ZF-5 at full width, 224/180, 70 epochs, batch 128,
#: dropout 0.5, lr 0.01 divided by 10 twice (the paper divides "when the error
#: plateaus", Sec. 3.1; we fix the epochs at 40 and 60), the models' N(0, 0.01)
#: fc init, :data:`PAPER_RECIPE`; images loaded by 8 DataLoader workers.
PRESETS: dict[str, dict[str, Any]] = {
    "small": {},
    "paper": {
        **PAPER_RECIPE,
        "model": "zf5",
        "width": 1.0,
        "fc_dim": 4096,
        "dropout": 0.5,
        "init": "paper",
        "size": 224,
        "small_size": 180,
        "epochs": 70,
        "batch_size": 128,
        "lr": 0.01,
        "lr_steps": (40, 60),
        "workers": 8,
        "cache_images": False,
    },
}


_IMAGENET_FINETUNE: dict[str, Any] = {
    "weights": "IMAGENET1K_V1",
    "epochs": 30,
    "batch_size": 64,
    "lr": 0.001,
    "lr_steps": (20,),
}

#: Per-backbone overrides of a preset, applied after it when the run's model is
#: one of these: ``MODEL_PRESETS[preset][model]``.
#:
#: ``paper`` with a torchvision backbone: fine-tuning its ImageNet weights
#: (torchvision's ``IMAGENET1K_V1``, downloaded once into ``$TORCH_HOME``; give
#: ``--weights FILE`` for a local copy or ``--weights none`` for random ones) on
#: the run's data: every layer trained (``--freeze conv`` for fc6/fc7 only), lr
#: 0.001 divided by 10 after 20 of 30 epochs, batches of 64 (VGG-16 at 224 px with
#: AMP: about 20 GB of GPU memory, estimated). fc6 of the four-level pyramid has
#: no ImageNet counterpart and starts from N(0, 0.01); ``--levels 6`` (alexnet) or
#: ``--levels 7`` (vgg16) takes torchvision's fc6 / fc7 as they are.
#:
#: ``small`` with a torchvision backbone: lr 1e-3 and no auxiliary classifier, the
#: values of the ``small`` defaults before the seventeenth session (the new ones
#: were measured on the Table 1 networks only).
MODEL_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {name: dict(_IMAGENET_FINETUNE) for name in ("alexnet", "vgg16", "resnet50")},
    "small": {name: {"lr": 1e-3, "aux_weight": 0.0} for name in ("alexnet", "vgg16", "resnet50")},
}
