"""One linear SVM per class on fc7 features, with hard-negative mining (SPP-net Sec. 4.1).

As in R-CNN's ``rcnn_train.m`` (which SPP-net's release reuses):

* positives: the ground-truth boxes of the class (difficult ones left out,
  :func:`svm_positives`);
* negatives: windows whose IoU with every ground truth of the class is < 0.3
  (difficult objects count as ground truth here, so they are never negatives);
* features scaled so that their mean L2 norm is 20;
* liblinear, L2-regularised L1-loss (hinge) SVM, ``C = 1e-3``, positive loss
  weight 2, bias term with multiplier 10 (scikit-learn's ``LinearSVC`` runs
  the same liblinear solver: ``loss="hinge", dual=True, intercept_scaling=10``);
* mining: images are visited in order; a negative scoring above -1 (inside the
  margin) that is not cached yet is added to the class's cache; once
  ``retrain_limit`` new ones have accumulated the SVM is retrained and cached
  negatives scoring below -1.2 are evicted. The SVM starts at zero, so the first
  image adds all its negatives. After each pass over the images every class with
  new negatives is retrained.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from sppnet.engine.config import Config, option
from sppnet.engine.detect.features import WindowSet

__all__ = [
    "SVMConfig",
    "SVMResult",
    "feature_scale",
    "fit_linear_svm",
    "svm_positives",
    "train_svms",
    "train_window_svms",
]


@dataclass
class SVMConfig(Config):
    """SVMs: one linear SVM per class on fc7, hard-negative mining (R-CNN / SPP-net release)."""

    flag_prefix: ClassVar[str] = "svm-"

    C: float = option(1e-3, flag="--svm-c", min=0, min_open=True, help="SVM C (liblinear's -c)")
    pos_weight: float = option(2.0, min=0, min_open=True, help="loss weight of the positives (-w1)")
    bias_multiplier: float = option(10.0, min=0, help="liblinear's bias term (-B)")
    neg_iou: float = option(0.3, min=0, max=1, help="negatives: IoU below this with every object of the class")
    hard_threshold: float = option(-1.0001, help="a negative scoring above this is hard (inside the margin)")
    evict_threshold: float = option(-1.2, help="cached negatives scoring below this are evicted after a retrain")
    retrain_limit: int = option(2000, min=1, help="new hard negatives of a class that trigger a retrain")
    epochs: int = option(1, min=1, help="passes of hard-negative mining over the images")
    target_norm: float = option(20.0, min=0, min_open=True, help="features scaled to this mean L2 norm")
    max_iter: int = option(10000, min=1, help="liblinear iterations per fit")


@dataclass
class SVMResult:
    """Trained SVMs: score = ``feature_scale * x @ weight.T + bias``.

    ``negatives[c]``: ``LongTensor[M, 2]`` (image, window) of the cached hard
    negatives of class ``c`` at the end; ``positives[c]`` how many positives.
    """

    weight: Tensor  # [K, F]
    bias: Tensor  # [K]
    feature_scale: float
    negatives: list[Tensor] = field(default_factory=list)
    positives: list[int] = field(default_factory=list)
    retrains: int = 0


def fit_linear_svm(
    x: Tensor, y: Tensor, C: float, pos_weight: float, bias_multiplier: float, max_iter: int = 10000
) -> tuple[Tensor, float]:
    """liblinear's L2-regularised L1-loss SVM (``-s 3 -w1 pos_weight -c C -B bias_multiplier``).

    Args:
        x (Tensor[N, F]): scaled features.
        y (Tensor[N]): +1 / -1.

    Returns:
        ``(w Tensor[F], b)`` with decision ``x @ w + b``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    labels = y.numpy().astype(np.int64)
    if len(np.unique(labels)) < 2:
        # liblinear needs both classes; with one, the best hinge solution is a constant.
        return torch.zeros(x.shape[1]), (1.0 if labels.size and labels[0] > 0 else -1.0)
    svm = LinearSVC(
        penalty="l2",
        loss="hinge",
        dual=True,
        C=C,
        class_weight={1: pos_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=bias_multiplier,
        max_iter=max_iter,
        tol=1e-4,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        svm.fit(x.double().numpy(), labels)
    return torch.from_numpy(svm.coef_[0]).float(), float(svm.intercept_[0])


def feature_scale(samples: Tensor, target_norm: float = 20.0) -> float:
    """``target_norm / mean ||x||``: R-CNN's ``feat_norm_mean`` scaling."""
    mean = float(samples.norm(dim=1).mean()) if len(samples) else 0.0
    return target_norm / mean if mean > 0 else 1.0


def train_svms(
    num_images: int,
    features: Callable[[int], Tensor],
    overlaps: Sequence[Tensor],
    positives: Sequence[Tensor],
    num_classes: int,
    cfg: SVMConfig | None = None,
    progress: Callable | None = None,
    state: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> SVMResult:
    """Trains one SVM per class with hard-negative mining.

    Args:
        num_images: images to visit.
        features: ``features(i) -> Tensor[N_i, F]`` fc7 of every window of image ``i``.
        overlaps: per image ``Tensor[N_i, K]``, IoU of each window with the best
            ground truth of each class (difficult objects included).
        positives: per image ``LongTensor[N_i]``: the class of the window when it
            is a positive (a non-difficult ground-truth box), else -1.
        num_classes: ``K``.
        cfg: :class:`SVMConfig`.
        progress: ``progress(iterable, desc=, total=)`` wrapper (e.g. a tqdm bar).
        state: what ``on_epoch`` received last time, to resume after that epoch.
        on_epoch: called with a checkpointable dict after each completed epoch.

    Returns:
        :class:`SVMResult`.
    """
    cfg = cfg or SVMConfig()
    wrap = progress or (lambda it, **_: it)
    k = num_classes

    if state is None:
        # Positives and the feature scale, in one pass (R-CNN's get_positive_features).
        pos_feats: list[list[Tensor]] = [[] for _ in range(k)]
        norms = []
        for i in wrap(range(num_images), desc="SVM positives", total=num_images):
            feats = features(i)
            norms.append(feats.norm(dim=1))
            for c in positives[i][positives[i] >= 0].unique().tolist():
                pos_feats[c].append(feats[positives[i] == c])
        all_norms = torch.cat(norms) if norms else torch.zeros(0)
        scale = cfg.target_norm / float(all_norms.mean()) if len(all_norms) and float(all_norms.mean()) > 0 else 1.0
        pos = [torch.cat(p) * scale if p else torch.zeros((0, 0)) for p in pos_feats]
        dim = next((p.shape[1] for p in pos if p.numel()), None)
        if dim is None:
            dim = features(0).shape[1] if num_images else 0
        pos = [p if p.numel() else torch.zeros((0, dim)) for p in pos]
        weight, bias = torch.zeros(k, dim), torch.zeros(k)
        neg_keys = [torch.zeros((0, 2), dtype=torch.long) for _ in range(k)]
        neg_feats = [torch.zeros((0, dim)) for _ in range(k)]
        start_epoch, retrains = 0, 0
    else:
        scale = float(state["scale"])
        pos = list(state["pos"])
        weight, bias = state["weight"].clone(), state["bias"].clone()
        neg_keys, neg_feats = list(state["neg_keys"]), list(state["neg_feats"])
        start_epoch, retrains = int(state["epoch"]), int(state["retrains"])

    def retrain(c: int) -> None:
        nonlocal retrains
        x = torch.cat([pos[c], neg_feats[c]])
        y = torch.cat([torch.ones(len(pos[c])), -torch.ones(len(neg_feats[c]))])
        w, b = fit_linear_svm(x, y, cfg.C, cfg.pos_weight, cfg.bias_multiplier, cfg.max_iter)
        weight[c], bias[c] = w, b
        retrains += 1
        # Evict easy negatives (R-CNN: score < -1.2).
        keep = (neg_feats[c] @ w + b) >= cfg.evict_threshold
        neg_keys[c], neg_feats[c] = neg_keys[c][keep], neg_feats[c][keep]

    for epoch in range(start_epoch, cfg.epochs):
        pending = [0] * k
        for i in wrap(range(num_images), desc=f"SVM mining {epoch + 1}/{cfg.epochs}", total=num_images):
            feats = features(i) * scale  # [N, F]
            scores = feats @ weight.T + bias  # [N, K]
            for c in range(k):
                neg = overlaps[i][:, c] < cfg.neg_iou
                hard = (neg & (scores[:, c] > cfg.hard_threshold)).nonzero().squeeze(1)
                if len(hard) and len(neg_keys[c]):
                    cached = set(neg_keys[c][neg_keys[c][:, 0] == i, 1].tolist())
                    hard = hard[torch.tensor([int(j) not in cached for j in hard.tolist()], dtype=torch.bool)]
                if len(hard):
                    keys = torch.stack([torch.full_like(hard, i), hard], dim=1)
                    neg_keys[c] = torch.cat([neg_keys[c], keys])
                    neg_feats[c] = torch.cat([neg_feats[c], feats[hard]])
                    pending[c] += len(hard)
                if pending[c] >= cfg.retrain_limit or (epoch == 0 and i == 0 and pending[c]):
                    retrain(c)
                    pending[c] = 0
                    scores[:, c] = feats @ weight[c] + bias[c]
        for c in range(k):
            if pending[c]:
                retrain(c)
        if on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch + 1,
                    "scale": scale,
                    "pos": pos,
                    "weight": weight,
                    "bias": bias,
                    "neg_keys": neg_keys,
                    "neg_feats": neg_feats,
                    "retrains": retrains,
                }
            )
    return SVMResult(weight, bias, float(scale), neg_keys, [len(p) for p in pos], retrains)


def svm_positives(windows: Sequence[WindowSet]) -> list[Tensor]:
    """Per image ``LongTensor[N_i]``: the class of each window that is a positive, else -1.

    The positives are the non-difficult ground-truth boxes (``rcnn_train.m``).
    """
    return [torch.where(w.is_gt & ~w.difficult, w.label, torch.full_like(w.label, -1)) for w in windows]


def train_window_svms(
    features: Callable[[int], Tensor],
    windows: Sequence[WindowSet],
    num_classes: int,
    cfg: SVMConfig | None = None,
    progress: Callable | None = None,
    state: dict | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> SVMResult:
    """:func:`train_svms` on the training windows: positives from :func:`svm_positives`,
    negatives by their overlaps with each class's objects.

    Args:
        features: ``features(i) -> Tensor[N_i, F]`` of every window of image ``i``
            (fc7 for the detector's SVMs; Table 9 also trains them on pool5).
        windows: the training images' :class:`WindowSet`.
        num_classes, cfg, progress, state, on_epoch: as in :func:`train_svms`.
    """
    overlaps = [w.overlaps for w in windows]
    return train_svms(
        len(windows), features, overlaps, svm_positives(windows), num_classes, cfg, progress, state, on_epoch
    )
