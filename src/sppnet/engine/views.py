"""Test-time views of SPP-net classification (Sec. 3.1.2 - 3.1.4), scaled with ``size``.

For a crop side ``size`` (224 in the paper) and ``R = resize_side(size)`` (256):

* ``center``: resize the short side to ``R``, one ``size x size`` centre crop.
* ``ten``: the standard 10-view test: the four corners and the centre of the
  image resized to short side ``R``, plus their horizontal flips.
* ``full``: the whole image with its short side resized to ``R``, aspect ratio
  kept (Table 3's "full image view"); SPP networks only.
* ``multi``: multi-view testing ON THE FEATURE MAPS. The image is resized to
  short sides ``{224, 256, 300, 360, 448, 560} * size / 224``; for each scale the
  conv layers run ONCE (``model.forward_features`` on a batch of the image and
  its mirror image). Each view is a ``size x size`` window: centre, four corners
  and four mid-sides, on the image and on its mirror image (18 views; windows
  that coincide are counted once, so a non-square image has 3 distinct windows,
  6 views, at the smallest scale, where its short side equals ``size``). Each
  window is mapped onto conv5 with :func:`~sppnet.ops.map_boxes_to_features`
  (keep the cells whose centres lie inside the window, Appendix) and pooled with
  :func:`~sppnet.ops.roi_spatial_pyramid_pool`, then ``model.fc`` and
  ``model.classifier``. The two ``full`` views (image and mirror) are added:
  96 + 2 views for a non-square image, as in the paper; 5 * 18 + 2 + 2 = 94 for a
  square one.

Scores are softmax probabilities averaged over the views.

Small images are not an error: every view starts by resizing the image's short
side (up or down), so any picture with an aspect ratio up to
:data:`~sppnet.data.transforms.MAX_ASPECT` works. What can fail is a ``size``
below the network's minimum input, which is checked with a message naming both.

Flipped views of the multi-view test need the mirror image's own feature maps
(convolutions are not mirror-symmetric); we compute them in the same batched
``forward_features`` call, so conv layers run once per scale on two images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sppnet.data.images import pil_to_tensor, to_rgb
from sppnet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_boxes, normalize, resize_short_side, resize_side
from sppnet.ops import map_boxes_to_features, roi_spatial_pyramid_pool

__all__ = [
    "VIEWS",
    "MULTI_SCALES",
    "check_views",
    "check_size",
    "multi_view_scales",
    "multi_view_boxes",
    "MultiViewInput",
    "prepare_views",
    "score_views",
    "view_probabilities",
]

VIEWS: tuple[str, ...] = ("center", "ten", "full", "multi")
# SPP-net Sec. 3.1.4: multi-view testing on feature maps at six scales (short side).
MULTI_SCALES: tuple[int, ...] = (224, 256, 300, 360, 448, 560)


def check_views(views: str, model: nn.Module) -> str:
    """ValueError for an unknown view name or a view the model cannot run.

    The no-SPP baseline accepts one input size only, so it supports ``center``
    and ``ten``; ``full`` and ``multi`` need the pyramid.
    """
    if views not in VIEWS:
        raise ValueError(f"unknown views {views!r}; choose one of {', '.join(VIEWS)}")
    if views in ("full", "multi") and not getattr(model, "spp", False):
        raise ValueError(
            f"--views {views} needs an SPP model: the no-SPP baseline accepts only "
            f"{model.input_size}x{model.input_size} inputs; use --views center or ten"
        )
    return views


def check_size(model: nn.Module, size: int, what: str = "size") -> None:
    """ValueError if ``model`` cannot take ``size x size`` inputs."""
    if size < model.min_input_size:
        raise ValueError(
            f"{what}={size} is smaller than the minimum input of {model.name} "
            f"({model.min_input_size}x{model.min_input_size} pixels); use a larger --size"
        )
    if not model.spp and size != model.input_size:
        raise ValueError(
            f"the no-SPP {model.name} accepts only {model.input_size}x{model.input_size} inputs, got {what}={size}"
        )


def multi_view_scales(size: int) -> list[int]:
    """The paper's six multi-view scales scaled by ``size / 224`` (the first equals ``size``)."""
    return [int(round(s * size / 224)) for s in MULTI_SCALES]


def multi_view_boxes(width: int, height: int, size: int) -> Tensor:
    """The distinct ``size x size`` windows of the multi-view test on a ``width x height`` image.

    Positions: centre, four corners, four mid-sides (x and y each in
    ``{0, (W - size) / 2, W - size}``), centre first; coinciding windows (a side
    equal to ``size``) are kept once. The set is its own mirror image, so the
    same boxes serve the flipped image.

    Returns:
        Tensor[K, 4] (float64): ``(x1, y1, x2, y2)`` continuous pixel coordinates,
        ``1 <= K <= 9``.
    """
    if width < size or height < size:
        raise ValueError(f"a {size}x{size} window does not fit a {width}x{height} image")
    xs = [(width - size) / 2, 0.0, float(width - size)]
    ys = [(height - size) / 2, 0.0, float(height - size)]
    boxes: list[tuple[float, float, float, float]] = []
    for y in ys:
        for x in xs:
            box = (x, y, x + size, y + size)
            if box not in boxes:
                boxes.append(box)
    return torch.tensor(boxes, dtype=torch.float64)


def _to_input(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    return normalize(pil_to_tensor(img), mean, std)


@dataclass
class MultiViewInput:
    """One image prepared for the multi-view test.

    Attributes:
        scales (list[Tensor[3, H_s, W_s]]): the normalised image at each scale.
        full (Tensor[3, H, W]): the normalised image at short side ``resize_side(size)``.
    """

    scales: list[Tensor]
    full: Tensor


def prepare_views(
    img: Image.Image,
    views: str,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor | MultiViewInput:
    """Image geometry of a view set (cheap, no model; runs in DataLoader workers).

    Returns:
        ``center``: Tensor[1, 3, size, size]; ``ten``: Tensor[10, 3, size, size]
        (five crops, then the same five flipped); ``full``: Tensor[1, 3, H, W]
        with ``min(H, W) = resize_side(size)``; ``multi``: a :class:`MultiViewInput`.
    """
    if views not in VIEWS:
        raise ValueError(f"unknown views {views!r}; choose one of {', '.join(VIEWS)}")
    if img.mode != "RGB":
        img = to_rgb(img)
    if views == "multi":
        scaled = [_to_input(resize_short_side(img, s), mean, std) for s in multi_view_scales(size)]
        full = _to_input(resize_short_side(img, resize_side(size)), mean, std)
        return MultiViewInput(scaled, full)
    img = resize_short_side(img, resize_side(size))
    if views == "full":
        return _to_input(img, mean, std).unsqueeze(0)
    boxes = crop_boxes(img.width, img.height, size)
    if views == "center":
        return _to_input(img.crop(boxes[4]), mean, std).unsqueeze(0)
    crops = torch.stack([_to_input(img.crop(b), mean, std) for b in boxes])  # [5, 3, s, s]
    return torch.cat([crops, crops.flip(-1)])  # [10, 3, s, s]


def _multi_view_logits(model: nn.Module, prepared: MultiViewInput, size: int) -> Tensor:
    """Logits of all multi views of one image, Tensor[V, num_classes]."""
    device = next(model.parameters()).device
    logits = []
    for x in prepared.scales:
        x = x.to(device)
        h_img, w_img = x.shape[-2:]
        maps = model.forward_features(torch.stack([x, x.flip(-1)]))  # [2, C, h, w]: conv ONCE per scale
        boxes = multi_view_boxes(int(w_img), int(h_img), size)  # [K, 4] pixels
        cells = map_boxes_to_features(boxes, model.stride, model.offset, tuple(maps.shape[-2:]))  # [K, 4]
        k = cells.shape[0]
        index = torch.arange(2).repeat_interleave(k).unsqueeze(1)  # [2K, 1]: image, then mirror
        rois = torch.cat([index, cells.repeat(2, 1)], dim=1).to(device)  # [2K, 5]
        pooled = roi_spatial_pyramid_pool(maps, rois, model.levels, "max")  # [2K, C * sum(n*n)]
        logits.append(model.classifier(model.fc(pooled)))
    full = prepared.full.to(device)
    logits.append(model(torch.stack([full, full.flip(-1)])))  # the two full-image views
    return torch.cat(logits)


@torch.no_grad()
def score_views(model: nn.Module, prepared: Tensor | MultiViewInput, size: int) -> Tensor:
    """Softmax probabilities of every view, Tensor[V, num_classes].

    Args:
        model: an ``SPPNet`` in eval mode.
        prepared: the output of :func:`prepare_views`.
        size: the crop / window side used to prepare it.
    """
    if isinstance(prepared, MultiViewInput):
        logits = _multi_view_logits(model, prepared, size)
    else:
        logits = model(prepared.to(next(model.parameters()).device))
    return F.softmax(logits.float(), dim=1)


@torch.no_grad()
def view_probabilities(
    model: nn.Module,
    img: Image.Image,
    views: str = "center",
    size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Tensor:
    """Class probabilities of one RGB image averaged over its views, Tensor[num_classes]."""
    check_views(views, model)
    check_size(model, size)
    return score_views(model, prepare_views(img, views, size, mean, std), size).mean(0)
