"""Bounding-box regression on pool5 features (SPP-net Sec. 4, after R-CNN Appendix C).

For each class, a ridge regression from the pooled conv5 features of a window
to the R-CNN deltas ``(dx, dy, dw, dh)`` (``ops.encode_boxes``) that move it onto
its ground truth. Training windows: IoU >= 0.5 with a ground truth of the class
(the released code's threshold; R-CNN used 0.6), ground-truth boxes included
(:func:`regression_samples`).

Features are scaled to a mean L2 norm of 20 as for the SVMs. The released code
uses lambda = 4000 for 12,800-d features (ZF-5). With features of mean norm 20,
each of ``D`` dimensions carries ``400 / D`` of squared norm on average, so the
data term of the normal equations shrinks as ``1 / D``; to regularise a
narrower network as strongly, ``default_lambda`` keeps ``lambda * D`` fixed:
``lambda = 4000 * 12800 / D`` (e.g. 16,000 for a 64-channel conv5, 3,200-d).
The intercept is not regularised (the features and targets are centred first).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sppnet.engine.config import Config, option
from sppnet.engine.detect.features import WindowSet
from sppnet.ops import encode_boxes

__all__ = [
    "PAPER_DIM",
    "PAPER_LAMBDA",
    "BoxRegressionConfig",
    "default_lambda",
    "fit_ridge",
    "regression_samples",
    "train_box_regressors",
]

PAPER_LAMBDA = 4000.0  # released SPP-net code
PAPER_DIM = 12800  # ZF-5 pool5 with the 50-bin pyramid


@dataclass
class BoxRegressionConfig(Config):
    """Box regression: ridge regression on pool5 (SPP-net Sec. 4, R-CNN Appendix C)."""

    flag_prefix: ClassVar[str] = "bbox-"

    enabled: bool = option(True, flag="--bbox-regression", help="train and apply the box regressors")
    iou: float = option(0.5, min=0, max=1, help="training windows: IoU >= this with a ground truth")
    lam: float | None = option(
        None, flag="--bbox-lambda", min=0, min_open=True, help="ridge penalty; none: 4000*12800/D"
    )
    target_norm: float = option(20.0, min=0, min_open=True, help="pool5 scaled to this mean L2 norm")


def default_lambda(dim: int) -> float:
    """``4000 * 12800 / dim``: the released code's lambda, scaled to the feature width."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return PAPER_LAMBDA * PAPER_DIM / dim


def fit_ridge(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Ridge regression with an unregularised intercept: ``min ||Xw + b - Y||^2 + lam ||w||^2``.

    Solved in float64 in the primal (``D <= N``) or the dual (``N < D``) form,
    whichever is smaller; both give the same ``w``.

    Args:
        x (Tensor[N, D]): inputs.
        y (Tensor[N, T]): targets.
        lam: the ridge penalty (> 0).

    Returns:
        ``(w Tensor[D, T], b Tensor[T])``.
    """
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f"need x [N, D] and y [N, T] with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    n, d = x.shape
    if n == 0:
        return x.new_zeros((d, y.shape[1])), y.new_zeros(y.shape[1])
    xd, yd = x.double(), y.double()
    mx, my = xd.mean(0), yd.mean(0)
    xc, yc = xd - mx, yd - my
    if d <= n:
        gram = xc.T @ xc + lam * torch.eye(d, dtype=torch.float64)  # [D, D]
        w = torch.linalg.solve(gram, xc.T @ yc)
    else:
        gram = xc @ xc.T + lam * torch.eye(n, dtype=torch.float64)  # [N, N]
        w = xc.T @ torch.linalg.solve(gram, yc)
    b = my - mx @ w
    return w.to(x.dtype), b.to(x.dtype)


def train_box_regressors(
    features: Sequence[Tensor], targets: Sequence[Tensor], feature_scale: float, lam: float | None = None
) -> tuple[Tensor, Tensor]:
    """One ridge regressor per class.

    Args:
        features: per class ``Tensor[N_c, D]`` pool5 of its training windows (unscaled).
        targets: per class ``Tensor[N_c, 4]`` deltas ``(dx, dy, dw, dh)``.
        feature_scale: multiplies the features (mean norm 20).
        lam: ridge penalty; ``None``: :func:`default_lambda`.

    Returns:
        ``(weight Tensor[K, D, 4], bias Tensor[K, 4])``; a class without
        training windows gets zeros (its boxes are left as they are).
    """
    if len(features) != len(targets):
        raise ValueError(f"need targets for every class, got {len(targets)} for {len(features)}")
    dim = next((f.shape[1] for f in features if f.dim() == 2), 0)
    lam = default_lambda(dim) if lam is None else float(lam)
    weight = torch.zeros(len(features), dim, 4)
    bias = torch.zeros(len(features), 4)
    for c, (x, t) in enumerate(zip(features, targets)):
        if len(x):
            weight[c], bias[c] = fit_ridge(x.float() * feature_scale, t.float(), lam)
    return weight, bias


def regression_samples(
    windows: Sequence[WindowSet],
    pool5: Callable[[int, Tensor], Tensor],
    num_classes: int,
    dim: int,
    iou: float = 0.5,
    progress: Callable | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """The training set of :func:`train_box_regressors`: every window with IoU >= ``iou``
    with a ground truth, as a sample of that ground truth's class.

    Args:
        windows: the training images' :class:`WindowSet`.
        pool5: ``pool5(i, index) -> Tensor[n, D]`` of windows ``index`` of image ``i``.
        num_classes: ``K``.
        dim: ``D``, for classes without samples.
        iou: the overlap threshold.
        progress: ``progress(iterable, desc=, total=)`` wrapper.

    Returns:
        ``(features, targets)``: per class ``Tensor[N_c, D]`` and ``Tensor[N_c, 4]``
        deltas ``(dx, dy, dw, dh)`` onto the ground truth (:func:`~sppnet.ops.encode_boxes`).
    """
    wrap = progress or (lambda it, **_: it)
    feats: list[list[Tensor]] = [[] for _ in range(num_classes)]
    targets: list[list[Tensor]] = [[] for _ in range(num_classes)]
    for i in wrap(range(len(windows)), desc="box regression", total=len(windows)):
        w = windows[i]
        idx = (w.max_overlap >= iou).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        x = pool5(i, idx).cpu()  # [n, D]
        deltas = encode_boxes(w.boxes[idx], w.gt_boxes[w.gt_index[idx]])  # [n, 4]
        for c in w.label[idx].unique().tolist():
            sel = w.label[idx] == c
            feats[c].append(x[sel])
            targets[c].append(deltas[sel])
    return (
        [torch.cat(f) if f else torch.zeros((0, dim)) for f in feats],
        [torch.cat(t) if t else torch.zeros((0, 4)) for t in targets],
    )
