"""The SPP-net object detector (SPP-net Sec. 4) and its R-CNN baseline.

One idea in one file (longer than most here on purpose): the step functions of
the pipeline and the :class:`SPPDetector` that chains them, in the order the
data flows, so that the module reads top to bottom like Sec. 4.

The detector reads like the algorithm; every step is a named function:

    proposals (selective search, ``data/proposals/``)
      -> feature_maps      conv1-conv5 ONCE per image and scale   [C, h_s, w_s] per scale
                           (over the image regions the windows' cells see: the same cells)
      -> assign_scales     per window, the scale whose scaled window area is closest to 224^2
                           (Sec. 4.2; or the released code's rule, :func:`assign_scales_released`)
      -> map_windows       window -> conv5 cells (Appendix), the backbone's own stride/offset
      -> pool_windows      spatial pyramid per window                      [K, C * sum(n*n)]
      -> fc7               fc6, fc7 of the backbone                         [K, fc_dim]
      -> class_scores      one linear SVM per class (or the softmax of fc8) [K, num_classes]
      -> select_detections per-class NMS at IoU 0.3 on the proposals, <= 100 per class
      -> regress_boxes     ridge regression on pool5, one per class, of the survivors

The last two steps follow the released test code (``spp_test.m``,
``bbox_regression/spp_test_svm_bbox_regressor.m``): NMS runs on the proposals'
boxes and scores, at most 100 detections of each class are kept, and the
survivors' boxes are then replaced by their regressed boxes (no second NMS).
``detect(nms_boxes="regressed")`` regresses every window first and runs the NMS
on the regressed boxes instead (Fast R-CNN's order); ``max_per_image`` adds a
cap over all classes.

``method="rcnn"`` replaces the first four steps by R-CNN's: every window is cropped
from the image with 16 pixels of context (R-CNN Appendix A) and warped to the
network's input size (:func:`warp_windows`), and the conv layers run on each
warped window; pooling of the fixed-size conv5 map, fc7, the scorers and the
regressors are shared. That is the baseline of the paper's speed claim
(Table 9): same backbone, same windows, same heads.

Validation. The public entry points (``detect``, ``score_windows``,
``window_pool5``, the step methods and functions) check their boxes once; the
pipeline behind them trusts its callers.

Conventions. Images are ``Tensor[3, H, W]`` floats in ``[0, 1]`` (as
``sppnet.data.pil_to_tensor`` makes them); the detector normalises them with its
``pixel_mean`` / ``pixel_std``. Boxes are ``(x1, y1, x2, y2)`` INCLUSIVE pixel
indices (Pascal VOC, 0-based): a box ``x1..x2`` covers the continuous interval
``[x1, x2 + 1)``, which is what :func:`map_windows` hands to
``map_boxes_to_features``. Labels are ``0..num_classes-1`` (foreground only);
the fine-tuned fc8 (``cls_score``) has ``num_classes + 1`` outputs with the
background at index 0.

Pyramid level order. fc6's input layout depends on the ORDER of the levels
(``ops/spp.py``: levels concatenated in the order given). The backbone trained
fc6 with its own order (``(6, 3, 2, 1)`` by default); the released detection
code pools with ``(1, 2, 3, 6)``. The detector pools with ``levels`` (default
``(1, 2, 3, 6)``) and, when the backbone was trained with another order of the
SAME levels, permutes fc6's input columns and the backbone's own pyramid once
(:func:`reorder_pyramid_levels`): the backbone computes exactly the same function
as before (its classifier outputs are unchanged) and its pyramid, fc6 and the
detector agree.

Memory bound. Windows go through pooling, fc6/fc7, scoring and regression in
chunks of ``chunk_size`` (SPP) or ``warp_chunk`` (R-CNN) windows, so the peak
does not grow with the number of windows. For one image it is about

    conv activations of the largest scale (conv1 output, 96 * width channels at half resolution)
  + the pyramid's range-max tables for one scale (<= 2 * 25 * C5 * h * w * 4 bytes)
  + chunk_size * (2 * C5 * sum(n*n) + 3 * fc_dim + (num_classes + 1) * 5) * 4 bytes,

e.g. the paper's ZF-5 on a 1,200 px image: ~0.2 GB + ~0.4 GB + ~0.15 GB with
``chunk_size = 1024``, whatever the number of windows (20,000 included).
Measured (``tests/test_detector.py``, slow): 20,000 windows on a 900 x 1,200
image at scale 1,200 (1,200 x 1,600 input, full-width ZF-5, fc 1,024) peak at
1.57 GB resident for the whole process with ``chunk_size`` 1,024 or 256, 2.9 GB
unchunked; the peak left is the conv layers' activations at that scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from sppnet.models.geometry import merge_cell_boxes
from sppnet.models.sppnet import SPPNet
from sppnet.ops import (
    SpatialPyramidPool,
    clip_boxes,
    decode_boxes,
    map_boxes_to_features,
    roi_spatial_pyramid_pool,
    select_detections,
    validate_boxes,
)
from sppnet.ops._bins import check_levels

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PAPER_SCALES",
    "PAPER_SINGLE_SCALE",
    "PAPER_TARGET_SIZE",
    "RCNN_CONTEXT_PADDING",
    "RELEASED_CODE_TARGET_SIZE",
    "SCALE_RULES",
    "SPPDetector",
    "Scale",
    "assign_scales",
    "assign_scales_released",
    "image_scales",
    "map_windows",
    "reorder_pyramid_levels",
    "warp_windows",
]

#: SPP-net Sec. 4.2: five scales (short side); the released code uses 874 for 864.
PAPER_SCALES = (480, 576, 688, 864, 1200)
#: SPP-net Sec. 4.2: the single-scale detector resizes min(w, h) to 688.
PAPER_SINGLE_SCALE = (688,)
#: Sec. 4.2: the scale whose scaled window area is closest to 224 x 224.
PAPER_TARGET_SIZE = 224
#: The released code's target side: 13 conv5 cells x stride 16 = 208 px (``spm_expected_scale.m``).
RELEASED_CODE_TARGET_SIZE = 13 * 16
#: R-CNN Appendix A (``rcnn_im_crop.m``): 16 px of context on each side of a 227 px warp,
#: as a fraction of the warp's side; other warp sizes keep the fraction (224 px: 15.8 px).
RCNN_CONTEXT_PADDING = 16 / 227
#: ``"area"``: Sec. 4.2, area closest to ``target_size ** 2`` (default); ``"released"``: the released code.
SCALE_RULES = ("area", "released")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SCORERS = ("svm", "softmax")
METHODS = ("spp", "rcnn")
NMS_BOXES = ("proposals", "regressed")


class Scale(NamedTuple):
    """One scale of an image: its resized size and the factors from the original."""

    height: int
    width: int
    fy: float  # resized height / original height
    fx: float  # resized width / original width


# ----------------------------------------------------------------------------- steps


def image_scales(height: int, width: int, scales: Sequence[int], min_size: int = 1) -> list[Scale]:
    """Sizes of an image resized so that its SHORT side equals each scale (Sec. 4.2).

    Args:
        height, width: the original image size in pixels.
        scales: short sides ``s`` (e.g. ``(688,)`` or :data:`PAPER_SCALES`).
        min_size: no side smaller than this (the backbone's ``min_input_size``).

    Returns:
        list[Scale]: per scale ``(H_s, W_s, fy, fx)`` with ``min(H_s, W_s) = s``
        (the long side rounded), ``fy = H_s / height`` and ``fx = W_s / width``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if len(scales) == 0 or any(int(s) < 1 for s in scales):
        raise ValueError(f"scales must be positive short sides, got {tuple(scales)}")
    out = []
    for s in scales:
        f = int(s) / min(height, width)
        h = max(int(min_size), round(height * f))
        w = max(int(min_size), round(width * f))
        out.append(Scale(h, w, h / height, w / width))
    return out


def resize_image(images: Tensor, height: int, width: int) -> Tensor:
    """``Tensor[N, C, H, W]`` resized to ``height x width``: bilinear, antialiased where it shrinks.

    Upscaled on both axes (the usual case for a small image at SPP-net's scales),
    the antialiased filter's support is the plain bilinear one's, one source
    pixel each side, so both give the same values (float rounding apart:
    1e-12 in float64) and the plain one is 2-5x faster on a CPU. Shrunk on
    either axis, the antialiased filter averages every source pixel it covers.
    """
    shrinks = height < images.shape[-2] or width < images.shape[-1]
    return F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinks)


def _factors(scale_factors: Tensor | Sequence) -> Tensor:
    """``[S, 2]`` float64 ``(fy, fx)`` from Scales, ``[S]`` isotropic or ``[S, 2]`` factors."""
    if isinstance(scale_factors, Sequence) and scale_factors and isinstance(scale_factors[0], Scale):
        return torch.tensor([[s.fy, s.fx] for s in scale_factors], dtype=torch.float64)
    f = torch.as_tensor(scale_factors, dtype=torch.float64)
    if f.dim() == 1:
        f = f[:, None].expand(-1, 2)
    if f.dim() != 2 or f.shape[1] != 2 or f.shape[0] < 1 or not bool((f > 0).all()):
        raise ValueError(f"scale factors must be positive, one (fy, fx) per scale, got {f.tolist()}")
    return f


def assign_scales(boxes: Tensor, scale_factors: Tensor | Sequence, target_size: float = PAPER_TARGET_SIZE) -> Tensor:
    """Per window, the scale at which its area is closest to ``target_size ** 2`` (Sec. 4.2).

    Args:
        boxes (Tensor[K, 4]): ``(x1, y1, x2, y2)`` inclusive pixel indices in the
            ORIGINAL image (width ``x2 - x1 + 1``).
        scale_factors: ``list[Scale]``, or ``Tensor[S]`` (one factor per scale) or
            ``Tensor[S, 2]`` ``(fy, fx)``: original -> resized image.
        target_size: 224 in the paper, 208 (:data:`RELEASED_CODE_TARGET_SIZE`) in
            the released code.

    Returns:
        LongTensor[K]: the scale index of each window; on a tie the first scale wins.
    """
    validate_boxes(boxes)
    return _assign_by_area(boxes, _factors(scale_factors).to(boxes.device), target_size)


def _assign_by_area(boxes: Tensor, factors: Tensor, target_size: float) -> Tensor:
    b = boxes.to(torch.float64)
    areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # [K]
    scaled = areas[:, None] * (factors[:, 0] * factors[:, 1])[None, :]  # [K, S]
    # argmin returns the first minimum: the first (smallest) scale wins ties.
    return (scaled - float(target_size) ** 2).abs().argmin(dim=1)


def assign_scales_released(
    boxes: Tensor,
    short_sides: Sequence[int],
    image_min_side: int,
    target_size: float = RELEASED_CODE_TARGET_SIZE,
) -> Tensor:
    """The released code's scale rule (``spm_expected_scale.m``, ``spp_features_convX_to_poolX.m``).

    Per window, the short side at which its side ``sqrt(area)`` would be
    ``target_size``, rounded (MATLAB's ``round``: halves away from zero)::

        expected = round(target_size * image_min_side / sqrt(area))

    then the scale whose short side is nearest to it, ``argmin_s |s - expected|``
    (the first on ties). It measures the distance on the short side, linearly,
    where Sec. 4.2's rule (:func:`assign_scales`) measures it on the area: the two
    pick different scales for windows between two scales (about 2 % of
    selective-search windows with the five paper scales).

    Args:
        boxes (Tensor[K, 4]): inclusive pixel boxes in the original image.
        short_sides: the short side of the image at each scale (e.g. ``(480, 576, 688, 864, 1200)``).
        image_min_side: the original image's short side, ``min(H, W)``.
        target_size: 208 in the released code (:data:`RELEASED_CODE_TARGET_SIZE`).

    Returns:
        LongTensor[K]: the scale index of each window.
    """
    validate_boxes(boxes)
    if len(short_sides) == 0 or any(int(s) < 1 for s in short_sides) or int(image_min_side) < 1:
        raise ValueError(
            f"short sides and image_min_side must be positive, got {tuple(short_sides)} and {image_min_side}"
        )
    return _assign_released(boxes, short_sides, image_min_side, target_size)


def _assign_released(boxes: Tensor, short_sides: Sequence[int], image_min_side: int, target_size: float) -> Tensor:
    b = boxes.to(torch.float64)
    areas = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)  # [K]
    expected = torch.floor(float(target_size) * int(image_min_side) / areas.sqrt() + 0.5)  # MATLAB round, > 0
    sides = torch.tensor([float(s) for s in short_sides], dtype=torch.float64, device=boxes.device)
    return (sides[None, :] - expected[:, None]).abs().argmin(dim=1)  # [K]; first minimum, like MATLAB's min


def map_windows(
    boxes: Tensor,
    scale: Scale | float | tuple[float, float],
    feature_size: tuple[int, int],
    stride: float,
    offset: float,
) -> Tensor:
    """Maps windows of the original image onto the conv5 map of one scale (Appendix).

    The inclusive box ``x1..x2`` is the continuous interval ``[x1, x2 + 1)``;
    scaled by the resize factors it is handed to ``map_boxes_to_features``, which
    keeps the cells whose receptive-field centres (``offset + stride * j``) lie
    inside the window and clamps to the map.

    Args:
        boxes (Tensor[K, 4]): inclusive pixel boxes in the original image.
        scale: a :class:`Scale`, one factor, or ``(fy, fx)``.
        feature_size: ``(h, w)`` of the conv5 map at that scale.
        stride, offset: the backbone's geometry (``SPPNet.stride`` / ``.offset``).

    Returns:
        LongTensor[K, 4]: inclusive conv5 cells ``(x1, y1, x2, y2)``.
    """
    if isinstance(scale, Scale):
        fy, fx = scale.fy, scale.fx
    elif isinstance(scale, (int, float)):
        fy = fx = float(scale)
    else:
        fy, fx = (float(v) for v in scale)
    b = boxes.to(torch.float64)
    continuous = torch.stack([b[:, 0] * fx, b[:, 1] * fy, (b[:, 2] + 1) * fx, (b[:, 3] + 1) * fy], dim=1)
    return map_boxes_to_features(continuous, stride, offset, feature_size)


def warp_windows(
    image: Tensor, boxes: Tensor, size: int, sampling_ratio: int = 0, context: float = RCNN_CONTEXT_PADDING
) -> Tensor:
    """R-CNN's warp with context padding: every window cropped and resized to ``size x size``, all at once.

    R-CNN Appendix A (``rcnn_im_crop.m``): the box is enlarged about its centre
    so that, once warped, it fills the middle ``size * (1 - 2 * context)`` pixels
    and ``p = context * size`` pixels of its surroundings frame it on each side
    (R-CNN: ``p = 16`` at ``size = 227``, the default fraction); outside the
    image is the mean, i.e. 0 in a normalised image: the warp samples the image
    extended by zeros, bilinearly. ``context=0`` warps the bare box (the image's
    border pixels extend it by half a pixel, roi_align's rule). Unlike
    ``rcnn_im_crop.m`` the enlarged box is not rounded to whole pixels.

    ``torchvision.ops.roi_align`` with ``aligned=True`` on the continuous
    (enlarged) window ``[x1, x2 + 1) x [y1, y2 + 1)``: with one sample per output
    pixel (``sampling_ratio=1``) that is exactly ``F.interpolate(crop, size,
    mode="bilinear", align_corners=False)`` of the crop whenever the window is at
    least ``size`` pixels on each side; the default (adaptive, ``0``) averages
    ``ceil(window / size)`` samples per output pixel and side, an anti-aliased
    warp.

    Args:
        image (Tensor[3, H, W]): the (normalised) image.
        boxes (Tensor[K, 4]): inclusive pixel boxes.
        size: output side (the network's input size).
        sampling_ratio: samples per output pixel and side; 0 = adaptive.
        context: context on each side as a fraction of ``size``, in ``[0, 0.5)``
            (:data:`RCNN_CONTEXT_PADDING`; 0: no context).

    Returns:
        Tensor[K, 3, size, size].
    """
    validate_boxes(boxes)
    if not 0.0 <= float(context) < 0.5:
        raise ValueError(f"context must be in [0, 0.5) (a fraction of the warp side), got {context}")
    return _warp(image, boxes, size, sampling_ratio, context)


def _warp(image: Tensor, boxes: Tensor, size: int, sampling_ratio: int, context: float) -> Tensor:
    b = boxes.to(image.dtype)
    lo, hi = b[:, :2], b[:, 2:] + 1  # [K, 2] each: the continuous window [x1, x2 + 1)
    if context:
        centre, half = (lo + hi) / 2, (hi - lo) / (2 * (1 - 2 * float(context)))  # the box fills 1 - 2 * context
        # One ring of zeros (the mean): roi_align repeats the border pixel for samples
        # up to half a pixel outside, which must read the mean instead.
        image = F.pad(image, (1, 1, 1, 1))
        lo, hi = centre - half + 1, centre + half + 1
    rois = torch.cat([b.new_zeros((len(b), 1)), lo, hi], dim=1)  # [K, 5]
    return torchvision.ops.roi_align(
        image[None], rois, (int(size), int(size)), spatial_scale=1.0, sampling_ratio=int(sampling_ratio), aligned=True
    )


def reorder_pyramid_levels(backbone: SPPNet, levels: Sequence[int]) -> None:
    """Makes ``backbone`` pool with ``levels`` without changing what it computes.

    fc6 reads the pyramid as blocks of ``C * n * n`` columns, one block per level
    in the pyramid's order. When ``levels`` is a permutation of the backbone's
    levels, the blocks of fc6's weight are permuted to match and the backbone's
    pyramid is replaced by one with the new order (in place).

    Raises:
        ValueError: if the backbone has no pyramid or ``levels`` are not the same levels.
    """
    levels = check_levels(levels)
    if not backbone.spp:
        raise ValueError(f"the detector needs an SPP backbone (spp=True); {backbone.name} has spp=False")
    old = tuple(backbone.levels)
    if sorted(levels) != sorted(old):
        raise ValueError(
            f"detector levels {levels} must be the backbone's pyramid levels {old} (in any order): "
            f"fc6 was trained on those bins"
        )
    if levels == old:
        return
    chans = backbone.feature_channels
    starts, off = {}, 0
    for n in old:
        starts.setdefault(n, []).append(off)
        off += chans * n * n
    used = {n: 0 for n in starts}
    perm = []
    for n in levels:
        s = starts[n][used[n]]
        used[n] += 1
        perm.append(torch.arange(s, s + chans * n * n))
    perm = torch.cat(perm)  # new column j reads old column perm[j]
    fc6 = backbone.fc[0]
    with torch.no_grad():
        fc6.weight.copy_(fc6.weight[:, perm])
    backbone.levels = levels
    backbone.pool = SpatialPyramidPool(levels, "max", "adaptive")


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, max(1, int(size)))]


# -------------------------------------------------------------------------- the model


class SPPDetector(nn.Module):
    """SPP-net's detector: conv5 once per image and scale, a pyramid per window.

    Args:
        backbone: an :class:`SPPNet` with ``spp=True`` (conv layers, pyramid, fc6, fc7).
        num_classes: foreground classes ``K``.
        levels: pyramid levels in pooling order (released code: ``(1, 2, 3, 6)``);
            the same levels as the backbone's (see :func:`reorder_pyramid_levels`).
        scales: image short sides (Sec. 4.2: ``(688,)`` or :data:`PAPER_SCALES`).
        target_size: window side targeted by :func:`assign_scales` (224; 208 in the code).
        scale_rule: ``"area"`` (default, Sec. 4.2: :func:`assign_scales`) or
            ``"released"`` (the released code: :func:`assign_scales_released`,
            which the release pairs with ``target_size=208``).
        method: ``"spp"`` or ``"rcnn"`` (warp every window, :func:`warp_windows`).
        warp_size: R-CNN's network input side (default ``target_size``).
        warp_context: R-CNN's context padding, a fraction of ``warp_size`` on
            each side (:data:`RCNN_CONTEXT_PADDING`, 16 px at 227; 0: the bare box).
        chunk_size: windows pooled and scored at a time (SPP); bounds memory.
        warp_chunk: windows warped and convolved at a time (R-CNN).
        pixel_mean, pixel_std: per-channel normalisation of ``[0, 1]`` images
            (what the backbone was trained with).

    Heads (all state, saved with ``state_dict``):
        ``cls_score``: fc8, ``Linear(fc_dim, K + 1)``, background = 0 (fine-tuning).
        ``svm_weight`` [K, fc_dim], ``svm_bias`` [K], ``svm_feature_scale``: SVM
        score = ``svm_feature_scale * fc7 @ svm_weight.T + svm_bias``.
        ``bbox_weight`` [K, D, 4], ``bbox_bias`` [K, 4], ``bbox_feature_scale``:
        deltas ``(dx, dy, dw, dh)`` = ``bbox_feature_scale * pool5 @ bbox_weight[c] + bbox_bias[c]``.
        ``trained_heads`` [2] bool: SVMs, box regressors trained.
    """

    def __init__(
        self,
        backbone: SPPNet,
        num_classes: int,
        levels: Sequence[int] = (1, 2, 3, 6),
        scales: Sequence[int] = PAPER_SINGLE_SCALE,
        target_size: float = PAPER_TARGET_SIZE,
        method: str = "spp",
        warp_size: int | None = None,
        chunk_size: int = 1024,
        warp_chunk: int = 64,
        pixel_mean: Sequence[float] = IMAGENET_MEAN,
        pixel_std: Sequence[float] = IMAGENET_STD,
        scale_rule: str = "area",
        warp_context: float = RCNN_CONTEXT_PADDING,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if len(scales) == 0 or any(int(s) < backbone.min_input_size for s in scales):
            raise ValueError(f"scales must be short sides >= {backbone.min_input_size}, got {tuple(scales)}")
        if chunk_size < 1 or warp_chunk < 1:
            raise ValueError(f"chunk sizes must be >= 1, got chunk_size={chunk_size}, warp_chunk={warp_chunk}")
        if scale_rule not in SCALE_RULES:
            raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
        if not 0.0 <= float(warp_context) < 0.5:
            raise ValueError(f"warp_context must be in [0, 0.5) (a fraction of the warp side), got {warp_context}")
        reorder_pyramid_levels(backbone, levels)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.levels = tuple(backbone.levels)
        self.scales = tuple(int(s) for s in scales)
        self.target_size = float(target_size)
        self.scale_rule = scale_rule
        self.method = method
        self.warp_context = float(warp_context)
        self.warp_size = round(float(target_size)) if warp_size is None else int(warp_size)
        if self.warp_size < backbone.min_input_size:
            raise ValueError(f"warp_size must be >= {backbone.min_input_size}, got {self.warp_size}")
        self.chunk_size = int(chunk_size)
        self.warp_chunk = int(warp_chunk)
        self.pooled_dim = backbone.pooled_dim
        self.fc_dim = backbone.fc_dim

        self.cls_score = nn.Linear(self.fc_dim, self.num_classes + 1)  # fc8, background = 0
        nn.init.normal_(self.cls_score.weight, 0.0, 0.01)
        nn.init.zeros_(self.cls_score.bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1))
        self.register_buffer("svm_weight", torch.zeros(self.num_classes, self.fc_dim))
        self.register_buffer("svm_bias", torch.zeros(self.num_classes))
        self.register_buffer("svm_feature_scale", torch.ones(()))
        self.register_buffer("bbox_weight", torch.zeros(self.num_classes, self.pooled_dim, 4))
        self.register_buffer("bbox_bias", torch.zeros(self.num_classes, 4))
        self.register_buffer("bbox_feature_scale", torch.ones(()))
        self.register_buffer("trained_heads", torch.zeros(2, dtype=torch.bool))  # [svm, bbox]

    # ------------------------------------------------------------------ geometry
    @property
    def stride(self) -> int:
        return self.backbone.stride

    @property
    def offset(self) -> float:
        return self.backbone.offset

    def config(self) -> dict:
        """Keyword arguments (besides ``backbone``) that rebuild this detector."""
        return {
            "num_classes": self.num_classes,
            "levels": list(self.levels),
            "scales": list(self.scales),
            "target_size": self.target_size,
            "method": self.method,
            "warp_size": self.warp_size,
            "chunk_size": self.chunk_size,
            "warp_chunk": self.warp_chunk,
            "pixel_mean": self.pixel_mean.flatten().tolist(),
            "pixel_std": self.pixel_std.flatten().tolist(),
            "scale_rule": self.scale_rule,
            "warp_context": self.warp_context,
        }

    # ----------------------------------------------------------- step by step
    def normalize(self, image: Tensor) -> Tensor:
        """``Tensor[3, H, W]`` in [0, 1] -> normalised with ``pixel_mean`` / ``pixel_std``."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"images must be Tensor[3, H, W], got shape {tuple(image.shape)}")
        return (image.to(self.pixel_mean.dtype) - self.pixel_mean) / self.pixel_std

    def conv5(self, x: Tensor) -> Tensor:
        """The backbone's conv layers on ``Tensor[N, 3, H, W]`` (images, crops or warped windows).

        Without autograd the input goes in channels-last: oneDNN's kernels for that
        layout ran the small preset's backbone 1.2-1.6x faster on a 2-core CPU,
        most for input sizes seen for the first time, which is what every image
        and crop of SPP-net is (benchmarks/README.md, "Convolving only where the
        windows read"); the maps come out channels-last, the layout the window
        kernels read.
        """
        if not torch.is_grad_enabled():
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_features(x)

    def image_scales(self, height: int, width: int) -> list[Scale]:
        """:func:`image_scales` with the detector's scales and the backbone's minimum size."""
        return image_scales(height, width, self.scales, self.backbone.min_input_size)

    def feature_maps(
        self,
        image: Tensor,
        scales: Sequence[Scale] | None = None,
        boxes: Tensor | None = None,
        scale_index: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Scale]]:
        """conv1-conv5 ONCE per scale of one normalised image (Sec. 4.2).

        With ``boxes``, only the conv5 cells those windows read are computed (in
        eval mode): at each scale the windows' cells are grouped into disjoint
        rectangles (:func:`~sppnet.models.geometry.merge_cell_boxes`), and each
        rectangle is computed from the crop of the resized image that holds its
        receptive field (``FeatureGeometry.input_span``), started at a multiple of
        the stride so that every layer's grid lines up with the whole image's.
        The cells the windows read are then exactly those of the whole-image map
        (the rest of each map is 0), at a fraction of the pixels where the windows
        cluster (few proposals on a plain ground); where the crops would cover as
        many pixels as the image, the whole image is convolved. A scale no window
        is assigned to is not convolved at all. In training mode the maps are
        always whole (batch norm's statistics would see other pixels).

        Args:
            image (Tensor[3, H, W]): normalised image (see :meth:`normalize`).
            scales: default :meth:`image_scales` of the image.
            boxes (Tensor[K, 4]): the windows that will be pooled (inclusive
                pixels, checked by the caller); None: whole maps.
            scale_index (LongTensor[K]): the scale each window is pooled at;
                None: every window at every scale (fine-tuning draws the scale).

        Returns:
            ``(maps, scales)``: ``maps[s]`` is ``Tensor[C5, h_s, w_s]``.
        """
        if scales is None:
            scales = self.image_scales(image.shape[-2], image.shape[-1])
        regions = boxes is not None and not self.backbone.training
        maps = []
        for s, sc in enumerate(scales):
            if regions:
                sel = boxes if scale_index is None else boxes[torch.as_tensor(scale_index).to(boxes.device) == s]
                if len(sel) == 0:  # no window reads this scale
                    h, w = self.backbone.feature_size(sc.height, sc.width)
                    maps.append(image.new_zeros((self.backbone.feature_channels, h, w)))
                    continue
            resized = resize_image(image[None], sc.height, sc.width)
            if regions:
                maps.append(self._window_cells(resized, sel, sc))
            else:
                maps.append(self.conv5(resized)[0])
        return maps, list(scales)

    def _window_cells(self, resized: Tensor, boxes: Tensor, sc: Scale) -> Tensor:
        """conv5 of ``resized`` (``Tensor[1, 3, H, W]``, scale ``sc``) at the cells ``boxes`` read.

        See :meth:`feature_maps`; the other cells are 0.
        """
        backbone, stride = self.backbone, self.stride
        height, width = resized.shape[-2:]
        h, w = backbone.feature_size(height, width)
        n = len(boxes)
        cells = self.map_windows_rows(
            boxes.cpu(),
            torch.full((n,), sc.fy, dtype=torch.float64),
            torch.full((n,), sc.fx, dtype=torch.float64),
            torch.full((n,), h, dtype=torch.long),
            torch.full((n,), w, dtype=torch.long),
        )
        rects, _ = merge_cell_boxes(cells, h, w)
        crops, pixels = [], 0
        for x1, y1, x2, y2 in rects.tolist():
            (left, right), (top, bottom) = backbone.geometry.input_span(x1, x2), backbone.geometry.input_span(y1, y2)
            left, top = max(0, left // stride * stride), max(0, top // stride * stride)
            right, bottom = min(width - 1, right), min(height - 1, bottom)
            crop_h, crop_w = backbone.feature_size(bottom - top + 1, right - left + 1)
            if crop_h <= y2 - top // stride or crop_w <= x2 - left // stride:
                crops = None  # the crop does not reach the cells (a geometry this rule does not cover)
                break
            crops.append((x1, y1, x2, y2, left, top, right, bottom))
            pixels += (bottom - top + 1) * (right - left + 1)
        if crops is None or pixels >= height * width:
            return self.conv5(resized)[0]
        out = resized.new_zeros((backbone.feature_channels, h, w))
        for x1, y1, x2, y2, left, top, right, bottom in crops:
            fmap = self.conv5(resized[:, :, top : bottom + 1, left : right + 1])[0]
            dx, dy = left // stride, top // stride
            out[:, y1 : y2 + 1, x1 : x2 + 1] = fmap[:, y1 - dy : y2 - dy + 1, x1 - dx : x2 - dx + 1]
        return out

    def assign_scales(self, boxes: Tensor, scales: Sequence[Scale]) -> Tensor:
        """The scale of each window by the detector's ``scale_rule`` and ``target_size``: ``LongTensor[K]``.

        ``scales`` are :meth:`image_scales` of one image (the released rule reads
        the image's short side and the short side at each scale from them).
        """
        validate_boxes(boxes)
        return self._assign_scales(boxes, scales)

    def _assign_scales(self, boxes: Tensor, scales: Sequence[Scale]) -> Tensor:
        if self.scale_rule == "released":
            sc = scales[0]
            image_min_side = min(round(sc.height / sc.fy), round(sc.width / sc.fx))
            short_sides = [min(s.height, s.width) for s in scales]
            return _assign_released(boxes, short_sides, image_min_side, self.target_size)
        return _assign_by_area(boxes, _factors(scales).to(boxes.device), self.target_size)

    def map_windows(
        self, boxes: Tensor, scales: Sequence[Scale], feature_sizes: Sequence[tuple[int, int]], scale_index: Tensor
    ) -> Tensor:
        """Windows -> ``rois`` ``LongTensor[K, 5]`` ``(scale_index, x1, y1, x2, y2)`` in conv5 cells."""
        scale_index = torch.as_tensor(scale_index, dtype=torch.long).cpu()
        per_scale = torch.tensor([[sc.fy, sc.fx] for sc in scales], dtype=torch.float64)  # [S, 2]
        sizes = torch.tensor([[int(h), int(w)] for h, w in feature_sizes], dtype=torch.long)  # [S, 2]
        factors, cells = per_scale[scale_index], sizes[scale_index]
        mapped = self.map_windows_rows(boxes.cpu(), factors[:, 0], factors[:, 1], cells[:, 0], cells[:, 1])
        return torch.cat([scale_index[:, None], mapped], dim=1).to(boxes.device)

    def map_windows_rows(self, boxes: Tensor, fy: Tensor, fx: Tensor, height: Tensor, width: Tensor) -> Tensor:
        """:func:`map_windows` with a scale and a map size per window, in one pass.

        Args:
            boxes (Tensor[K, 4]): inclusive pixel boxes in the original image.
            fy, fx (Tensor[K]): the resize factors of each window's scale.
            height, width (LongTensor[K]): the conv5 map size at that scale (cells are clamped to it).

        Returns:
            LongTensor[K, 4]: inclusive conv5 cells ``(x1, y1, x2, y2)``, as
            :func:`map_windows` gives them one scale at a time.
        """
        b = boxes.to(torch.float64)
        fy, fx = fy.to(torch.float64), fx.to(torch.float64)
        continuous = torch.stack([b[:, 0] * fx, b[:, 1] * fy, (b[:, 2] + 1) * fx, (b[:, 3] + 1) * fy], dim=1)
        cells = map_boxes_to_features(continuous, self.stride, self.offset)
        cells[:, 0::2] = torch.minimum(cells[:, 0::2].clamp(min=0), (width.long() - 1)[:, None])
        cells[:, 1::2] = torch.minimum(cells[:, 1::2].clamp(min=0), (height.long() - 1)[:, None])
        return cells

    def pool_windows(self, maps: Sequence[Tensor], rois: Tensor) -> Tensor:
        """The pyramid of every window on the map of its scale (``roi_spatial_pyramid_pool``).

        The maps may live elsewhere (a CPU feature cache) and in another float
        dtype: only the maps some window uses are moved, one at a time, to the
        detector's device and dtype (``pixel_mean``'s); so are the rois.

        Args:
            maps: ``Tensor[C5, h_s, w_s]`` per scale of one image.
            rois (LongTensor[K, 5]): ``(scale_index, x1, y1, x2, y2)`` inclusive
                cells (:meth:`map_windows`), on any device; any subset of the scales.

        Returns:
            Tensor[K, C5 * sum(n*n)]: pool5 features on the detector's device,
            rows in the order of ``rois``.
        """
        dev, dtype = self.pixel_mean.device, self.pixel_mean.dtype
        rois = rois.to(dev)
        out = torch.empty((len(rois), self.pooled_dim), device=dev, dtype=dtype)
        for s in torch.unique(rois[:, 0]).tolist():
            sel = (rois[:, 0] == s).nonzero().squeeze(1)
            fmap = maps[s].to(dev, dtype)  # [C5, h_s, w_s]
            out[sel] = roi_spatial_pyramid_pool(fmap[None], [rois[sel, 1:]], self.levels, "max")
        return out

    def warped_pool5(self, image: Tensor, boxes: Tensor) -> Tensor:
        """R-CNN: warp each window (with context) to ``warp_size``, run conv1-conv5 on it, pool its whole map.

        Args:
            image (Tensor[3, H, W]): normalised image.
            boxes (Tensor[K, 4]): inclusive pixel boxes.

        Returns:
            Tensor[K, C5 * sum(n*n)].
        """
        validate_boxes(boxes)
        return self._warped_pool5(image, boxes)

    def _warped_pool5(self, image: Tensor, boxes: Tensor) -> Tensor:
        crops = _warp(image, boxes, self.warp_size, 0, self.warp_context)  # [K, 3, S, S]
        return self.backbone.pool(self.conv5(crops))

    def fc7(self, pool5: Tensor) -> Tensor:
        """fc6 -> fc7 of the backbone: ``Tensor[K, D] -> Tensor[K, fc_dim]``."""
        return self.backbone.fc(pool5)

    def class_scores(self, fc7: Tensor, scorer: str = "svm") -> Tensor:
        """Per-class scores ``Tensor[K, num_classes]`` (foreground only).

        ``svm``: the linear SVMs on fc7 scaled by ``svm_feature_scale`` (Sec. 4.1);
        ``softmax``: the probabilities of fc8 with the background column dropped.
        """
        if scorer == "svm":
            if not bool(self.trained_heads[0]):
                raise ValueError("the SVMs of this detector are not trained; use scorer='softmax'")
            return (self.svm_feature_scale * fc7) @ self.svm_weight.T + self.svm_bias
        if scorer == "softmax":
            return torch.softmax(self.cls_score(fc7), dim=1)[:, 1:]
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")

    def regress_boxes(self, boxes: Tensor, pool5: Tensor, image_size: tuple[int, int]) -> Tensor:
        """Per-class box regression on pool5 (R-CNN Appendix C), clipped to the image.

        Args:
            boxes (Tensor[K, 4]): inclusive pixel boxes.
            pool5 (Tensor[K, D]): their pooled conv5 features.
            image_size: ``(H, W)``.

        Returns:
            Tensor[K, num_classes, 4]: one box per class (the input boxes, repeated,
            when the regressors are not trained).
        """
        if not bool(self.trained_heads[1]):
            return clip_boxes(boxes[:, None, :].expand(-1, self.num_classes, 4).to(pool5.dtype), image_size, True)
        x = self.bbox_feature_scale * pool5  # [K, D]
        deltas = torch.einsum("kd,cdj->kcj", x, self.bbox_weight) + self.bbox_bias  # [K, C, 4]
        return clip_boxes(decode_boxes(boxes.to(pool5.dtype), deltas), image_size, inclusive=True)

    def _pool5_chunks(self, image: Tensor, boxes: Tensor) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, end, pool5 Tensor[end - start, D])`` chunk by chunk: the one place SPP and R-CNN differ.

        SPP: conv5 once per scale, then the pyramid of ``chunk_size`` windows at
        a time; R-CNN: ``warp_chunk`` windows warped and convolved at a time.
        ``boxes`` are checked by the caller.
        """
        if self.method == "rcnn":
            for s, e in _chunks(len(boxes), self.warp_chunk):
                yield s, e, self._warped_pool5(image, boxes[s:e])
            return
        scales = self.image_scales(image.shape[-2], image.shape[-1])
        scale_index = self._assign_scales(boxes, scales)
        maps, _ = self.feature_maps(image, scales, boxes, scale_index)
        rois = self.map_windows(boxes, scales, [m.shape[-2:] for m in maps], scale_index)
        for s, e in _chunks(len(boxes), self.chunk_size):
            yield s, e, self.pool_windows(maps, rois[s:e])

    def window_pool5(self, image: Tensor, boxes: Tensor) -> Tensor:
        """pool5 of every window of one normalised image (SPP or R-CNN), chunked.

        Args:
            image (Tensor[3, H, W]): normalised image.
            boxes (Tensor[K, 4]): inclusive pixel boxes.

        Returns:
            Tensor[K, D].
        """
        validate_boxes(boxes)
        parts = [pool5 for _, _, pool5 in self._pool5_chunks(image, boxes)]
        return torch.cat(parts) if parts else image.new_zeros((0, self.pooled_dim))

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def score_windows(
        self, image: Tensor, boxes: Tensor, scorer: str = "svm", bbox_regression: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Scores and per-class boxes of every window of one image, in bounded memory.

        Args:
            image (Tensor[3, H, W]): image in ``[0, 1]``.
            boxes (Tensor[K, 4]): inclusive pixel boxes (proposals).

        Returns:
            ``(scores Tensor[K, num_classes], boxes Tensor[K, num_classes, 4])``:
            the regressed boxes (or the proposals, repeated, without regression).
        """
        validate_boxes(boxes)
        img = self.normalize(image.to(self.pixel_mean.device))
        return self._score_windows(img, boxes.to(img.device, torch.float32), scorer, bbox_regression)

    def _score_windows(self, img: Tensor, boxes: Tensor, scorer: str, bbox_regression: bool) -> tuple[Tensor, Tensor]:
        """:meth:`score_windows` of a normalised image and checked float32 boxes on its device."""
        height, width = img.shape[-2:]
        scores = img.new_empty((len(boxes), self.num_classes))
        out_boxes = img.new_empty((len(boxes), self.num_classes, 4))
        for s, e, pool5 in self._pool5_chunks(img, boxes):  # pool5: [e - s, D]
            scores[s:e] = self.class_scores(self.fc7(pool5), scorer)
            if bbox_regression:
                out_boxes[s:e] = self.regress_boxes(boxes[s:e], pool5, (height, width))
            else:
                out_boxes[s:e] = boxes[s:e, None, :]
        return scores, out_boxes

    @torch.no_grad()
    def detect(
        self,
        images: Sequence[Tensor],
        proposals: Sequence[Tensor],
        scorer: str = "svm",
        score_threshold: float | Sequence[float] | Tensor = float("-inf"),
        nms_threshold: float = 0.3,
        max_per_class: int | None = 100,
        max_per_image: int | None = None,
        bbox_regression: bool = True,
        nms_boxes: str = "proposals",
    ) -> list[dict[str, Tensor]]:
        """Detections of each image (Sec. 4.2 test, in the order of the released ``spp_test.m``).

        Every window is scored; per class, NMS at IoU 0.3 on the proposals'
        boxes and scores keeps at most ``max_per_class`` windows, whose boxes are
        then replaced by their regressed boxes
        (``bbox_regression/spp_test_svm_bbox_regressor.m``). The release also
        drops SVM scores <= -1.5 and keeps the best ``5 * num_images`` (100,000
        with box regression) per class over the whole test set; pass a
        ``score_threshold`` for the former.

        Args:
            images: ``Tensor[3, H, W]`` in [0, 1], one per image.
            proposals: ``Tensor[K_i, 4]`` inclusive pixel boxes, one per image.
            scorer: ``"svm"`` (the paper) or ``"softmax"`` (fc8).
            score_threshold: a detection needs a score above it (one value, or
                one per class, e.g. a run's calibrated ``thresholds.json``).
            nms_threshold: per-class NMS IoU (0.3).
            max_per_class: at most this many detections of each class per image
                (100, ``spp_test.m``); None: no per-class cap.
            max_per_image: at most this many over all classes (after the
                per-class cap); None (default): no total cap.
            bbox_regression: apply the box regressors (when trained).
            nms_boxes: ``"proposals"`` (default, the release: NMS on the
                proposals, then regress the survivors) or ``"regressed"`` (regress
                every window, then NMS on the regressed per-class boxes).

        Returns:
            One dict per image: ``boxes`` (Tensor[D, 4] inclusive pixels), ``scores``
            (Tensor[D]), ``labels`` (Tensor[D] int64 in ``0..num_classes-1``),
            sorted by decreasing score.
        """
        if len(images) != len(proposals):
            raise ValueError(f"need one proposal tensor per image, got {len(proposals)} for {len(images)} images")
        if nms_boxes not in NMS_BOXES:
            raise ValueError(f"nms_boxes must be one of {NMS_BOXES}, got {nms_boxes!r}")
        proposals = [torch.as_tensor(p) for p in proposals]
        for i, p in enumerate(proposals):
            validate_boxes(p, f"proposals[{i}]")
        dev = self.pixel_mean.device
        was_training = self.training
        self.eval()
        try:
            results = []
            for image, boxes in zip(images, proposals):
                img = self.normalize(image.to(dev))
                boxes = boxes.to(dev, torch.float32)
                scores, per_class = self._score_windows(img, boxes, scorer, bbox_regression)
                if nms_boxes == "proposals":
                    det = select_detections(
                        boxes, scores, score_threshold, nms_threshold, max_per_image, True, max_per_class
                    )
                    det["boxes"] = per_class[det["windows"], det["labels"]]  # the survivors, regressed
                else:
                    det = select_detections(
                        per_class, scores, score_threshold, nms_threshold, max_per_image, True, max_per_class
                    )
                results.append({k: det[k].cpu() for k in ("boxes", "scores", "labels")})
            return results
        finally:
            self.train(was_training)

    # ------------------------------------------------------------ compression
    @torch.no_grad()
    def compress_fc(self, rank: int | Sequence[int]) -> None:
        """Truncated SVD of fc6 and fc7 (Fast R-CNN Sec. 3.1), in place.

        Each ``Linear(u, v)`` with weight ``W = U S V^T`` becomes
        ``Linear(u, r, bias=False)`` (weight ``S_r V_r^T``) then ``Linear(r, v)``
        (weight ``U_r``, the original bias): ``u*v`` -> ``r*(u+v)`` multiply-adds.
        The state dict changes shape, so compress after loading weights.

        Args:
            rank: ``r`` for both layers, or ``(r6, r7)``.
        """
        ranks = (rank, rank) if isinstance(rank, int) else tuple(rank)
        if len(ranks) != 2 or any(int(r) < 1 for r in ranks):
            raise ValueError(f"rank must be a positive int or two of them, got {rank!r}")
        # fc6 and fc7 are the two Linear layers of backbone.fc (fc[0] and fc[3], or fc[4]
        # with a BatchNorm1d between); a compressed one is a Sequential of two
        slots = [i for i, m in enumerate(self.backbone.fc) if isinstance(m, (nn.Linear, nn.Sequential))]
        if len(slots) != 2:
            raise ValueError(f"backbone.fc must hold fc6 and fc7 (two Linear layers), got {self.backbone.fc}")
        for index, r in zip(slots, ranks):
            layer = self.backbone.fc[index]
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"fc layer {index} is already compressed")  # noqa: TRY004 (boundary error)
            r = min(int(r), min(layer.weight.shape))
            u, s, vh = torch.linalg.svd(layer.weight.double(), full_matrices=False)
            first = nn.Linear(layer.in_features, r, bias=False)
            second = nn.Linear(r, layer.out_features)
            first.weight.copy_((s[:r, None] * vh[:r]).to(layer.weight.dtype))
            second.weight.copy_(u[:, :r].to(layer.weight.dtype))
            second.bias.copy_(layer.bias)
            self.backbone.fc[index] = nn.Sequential(first, second).to(layer.weight.device)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, num_classes={self.num_classes}, levels={self.levels}, "
            f"scales={self.scales}, target_size={self.target_size:g}, scale_rule={self.scale_rule!r}, "
            f"chunk_size={self.chunk_size}"
        )
