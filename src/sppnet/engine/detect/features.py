"""Training windows and cached features of the detection training set.

* :class:`WindowSet` / :func:`build_windows`: the windows of one training image
  (ground truth first, then proposals, as R-CNN / SPP-net train) with their
  overlaps with the ground truth.
* :class:`FeatureCache`: what the conv layers produce for each training image,
  computed once and kept on disk, so fine-tuning, SVM training and box
  regression never run a convolution again (SPP-net Sec. 4.1: "the conv5
  features of the training set are cached"):

  - ``method="spp"``: conv5 of the image at every scale, and of the image
    FLIPPED horizontally at every scale (fine-tuning flips its windows, as
    the released code does). Flipping the conv5 map instead would be cheaper but wrong: conv
    filters are not mirror-symmetric, so conv5(flip(I)) != flip(conv5(I)). We
    pay one more conv pass per image and scale, once.
  - ``method="rcnn"``: pool5 of every warped window (and of its mirror image),
    the R-CNN counterpart of a cached conv5.

  One safetensors file per image (``sppnet.utils.save_cache``, atomic, with a
  checksum). The key mixes the image file's SHA-256, the conv weights, the
  normalisation, the scales / warp size and a layout version: a stale or
  corrupt entry is rebuilt, never trusted. Loaded entries stay in RAM up to
  ``max_bytes`` (least recently used out first).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sppnet.data.images import load_image, pil_to_tensor
from sppnet.data.proposals import add_ground_truth
from sppnet.models.detector import Scale, SPPDetector
from sppnet.ops import box_iou
from sppnet.utils import file_digest, load_cache, save_cache, tensor_digest

__all__ = ["FeatureCache", "WindowSet", "build_windows", "conv_digest", "flip_boxes", "load_record_image"]


@dataclass
class WindowSet:
    """The windows of one training image.

    Attributes:
        boxes (Tensor[N, 4]): inclusive pixel boxes; rows ``0..G-1`` are the ground truth.
        overlaps (Tensor[N, K]): IoU of each window with the best ground truth of
            each class (0 where the image has none); difficult objects count.
        max_overlap (Tensor[N]): IoU with the best ground truth of any class.
        gt_index (Tensor[N]): index of that ground truth (-1 without ground truth).
        label (Tensor[N]): its class (-1 without ground truth).
        is_gt (Tensor[N] bool): the row is a ground-truth box.
        difficult (Tensor[N] bool): the row is a difficult ground-truth box.
        gt_boxes (Tensor[G, 4]), width, height: the image's objects and size.
    """

    boxes: Tensor
    overlaps: Tensor
    max_overlap: Tensor
    gt_index: Tensor
    label: Tensor
    is_gt: Tensor
    difficult: Tensor
    gt_boxes: Tensor
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.boxes)


def build_windows(proposals: np.ndarray | Tensor, record: dict, num_classes: int) -> WindowSet:
    """Ground-truth boxes plus proposals of one image, with their overlaps.

    Args:
        proposals: ``[P, 4]`` inclusive pixel boxes (selective search).
        record: a data set record (``boxes``, ``labels``, ``difficult``, ``width``, ``height``).
        num_classes: ``K`` foreground classes.
    """
    gt = record["boxes"].float().reshape(-1, 4)
    labels = record["labels"].long()
    boxes = torch.from_numpy(add_ground_truth(np.asarray(proposals, dtype=np.float32), gt.numpy()))  # [N, 4]
    n, g = len(boxes), len(gt)
    overlaps = torch.zeros((n, num_classes))
    max_overlap = torch.zeros(n)
    gt_index = torch.full((n,), -1, dtype=torch.long)
    label = torch.full((n,), -1, dtype=torch.long)
    if g:
        iou = box_iou(boxes, gt, inclusive=True)  # [N, G]
        max_overlap, gt_index = iou.max(dim=1)
        label = labels[gt_index]
        for c in labels.unique().tolist():
            overlaps[:, c] = iou[:, labels == c].max(dim=1).values
    is_gt = torch.zeros(n, dtype=torch.bool)
    is_gt[:g] = True
    difficult = torch.zeros(n, dtype=torch.bool)
    difficult[:g] = record["difficult"].bool()
    return WindowSet(
        boxes,
        overlaps,
        max_overlap.float(),
        gt_index,
        label,
        is_gt,
        difficult,
        gt,
        int(record["width"]),
        int(record["height"]),
    )


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Inclusive boxes of the horizontally flipped image: ``x' = W - 1 - x``."""
    return torch.stack([width - 1 - boxes[:, 2], boxes[:, 1], width - 1 - boxes[:, 0], boxes[:, 3]], dim=1)


def load_record_image(record: dict) -> Tensor:
    """The record's image as ``Tensor[3, H, W]`` in [0, 1], checked against its annotation."""
    img = load_image(record["image_path"])
    if img.size != (record["width"], record["height"]):
        raise ValueError(
            f"{record['image_path']}: image is {img.size[0]}x{img.size[1]} pixels but its "
            f"annotation says {record['width']}x{record['height']}"
        )
    return pil_to_tensor(img)


def conv_digest(detector: SPPDetector) -> str:
    """Identifies what the cached features depend on: conv weights, normalisation, geometry."""
    state = {f"conv.{k}": v for k, v in detector.backbone.features.state_dict().items()}
    state["mean"], state["std"] = detector.pixel_mean, detector.pixel_std
    return tensor_digest(state)


class FeatureCache:
    """conv5 maps (SPP) or warped-window pool5 (R-CNN) of each training image, on disk.

    Args:
        detector: its conv layers, scales / warp size and normalisation define the features.
        records: the training images' records.
        windows: their :class:`WindowSet` (R-CNN caches one pool5 row per window).
        cache_dir: folder of the entries.
        flips: also cache the horizontally flipped image.
        max_bytes: RAM kept for loaded entries.
    """

    VERSION = 1

    def __init__(
        self,
        detector: SPPDetector,
        records: Sequence[dict],
        windows: Sequence[WindowSet],
        cache_dir: str | os.PathLike,
        flips: bool = True,
        max_bytes: int = 2 << 30,
    ) -> None:
        self.detector = detector
        self.records = list(records)
        self.windows = list(windows)
        self.cache_dir = Path(cache_dir)
        self.flips = bool(flips)
        self.max_bytes = int(max_bytes)
        self._lru: OrderedDict[int, dict[str, Tensor]] = OrderedDict()
        self._bytes = 0
        self._keys: dict[int, str] = {}
        self._salt = ""

    # -------------------------------------------------------------------- keys
    def refresh(self) -> None:
        """Recompute the keys (call after the conv weights change) and drop what is in RAM."""
        d = self.detector
        self._salt = json.dumps(
            {
                "conv": conv_digest(d),
                "method": d.method,
                "scales": list(d.scales),
                "warp": d.warp_size,
                "levels": list(d.levels),
                "flips": self.flips,
                "version": self.VERSION,
            },
            sort_keys=True,
        )
        self._keys = {}
        self._lru.clear()
        self._bytes = 0

    def key(self, i: int) -> str:
        if not self._salt:
            self.refresh()
        if i not in self._keys:
            extra = self._salt
            if self.detector.method == "rcnn":  # rows follow the windows
                extra += tensor_digest({"boxes": self.windows[i].boxes})
            self._keys[i] = file_digest(bytes.fromhex(file_digest(self.records[i]["image_path"])), extra=extra)
        return self._keys[i]

    def path(self, i: int) -> Path:
        key = self.key(i)
        return self.cache_dir / key[:2] / f"{key}.safetensors"

    # ----------------------------------------------------------------- compute
    @torch.no_grad()
    def compute(self, i: int) -> dict[str, Tensor]:
        """The features of image ``i`` (no cache): ``s{k}`` / ``s{k}_flip`` maps or ``pool5`` / ``pool5_flip``."""
        d = self.detector
        was_training = d.training
        d.eval()
        try:
            image = d.normalize(load_record_image(self.records[i]).to(d.pixel_mean.device))
            variants = [("", image)] + ([("_flip", image.flip(-1))] if self.flips else [])
            out: dict[str, Tensor] = {}
            for suffix, img in variants:
                if d.method == "rcnn":
                    boxes = self.windows[i].boxes
                    if suffix:
                        boxes = flip_boxes(boxes, img.shape[-1])
                    out["pool5" + suffix] = d.window_pool5(img, boxes.to(img.device)).cpu()
                else:
                    maps, _ = d.feature_maps(img)
                    for k, m in enumerate(maps):
                        out[f"s{k}{suffix}"] = m.cpu().contiguous()
            return out
        finally:
            d.train(was_training)

    def ensure(self, progress: Callable | None = None, should_stop: Callable[[], bool] | None = None) -> int:
        """Computes and stores every missing or stale entry; returns how many were computed.

        Stops early (returning) when ``should_stop()`` turns True between images.
        """
        todo = [i for i in range(len(self.records)) if not self.path(i).is_file()]
        it = progress(todo, desc="conv features", total=len(todo)) if progress else todo
        done = 0
        for i in it:
            if self.get(i, store=True) is not None:
                done += 1
            if should_stop is not None and should_stop():
                break
        return done

    def complete(self) -> bool:
        return all(self.path(i).is_file() for i in range(len(self.records)))

    # ------------------------------------------------------------------- read
    def get(self, i: int, store: bool = True) -> dict[str, Tensor]:
        """Entry of image ``i``: from RAM, else from disk (verified), else computed (and stored)."""
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        key = self.key(i)
        entry = load_cache(self.path(i), key=key, version=self.VERSION)
        if entry is None:
            entry = self.compute(i)
            if store:
                save_cache(self.path(i), entry, key=key, version=self.VERSION)
        size = sum(t.numel() * t.element_size() for t in entry.values())
        self._lru[i] = entry
        self._bytes += size
        while self._bytes > self.max_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self._bytes -= sum(t.numel() * t.element_size() for t in old.values())
        return entry

    def scales(self, i: int) -> list[Scale]:
        r = self.records[i]
        return self.detector.image_scales(int(r["height"]), int(r["width"]))

    def pool5(self, i: int, index: Tensor, flip: bool = False, scale_index: Tensor | None = None) -> Tensor:
        """pool5 features of windows ``index`` of image ``i`` from the cache.

        Args:
            index (LongTensor[n]): rows of ``windows[i]``.
            flip: the windows of the flipped image (mirrored boxes on its conv5).
            scale_index (LongTensor[n]): the scale of each window (SPP; fine-tuning
                draws it at random); ``None``: :meth:`SPPDetector.assign_scales`.

        Returns:
            Tensor[n, D] (float32, on the detector's device).
        """
        return self.pool5_many([(i, index, flip, scale_index)])

    def pool5_many(self, requests: Sequence[tuple[int, Tensor, bool, Tensor | None]]) -> Tensor:
        """:meth:`pool5` of several ``(image, index, flip, scale_index)`` requests, rows concatenated.

        SPP: each image's windows are pooled by :meth:`SPPDetector.pool_windows`
        from that image's cached maps as they are (no padded batch of every
        scale of every image).
        """
        d = self.detector
        dev = d.pixel_mean.device
        if any(flip and not self.flips for _, _, flip, _ in requests):
            raise ValueError("this feature cache holds no flipped images")
        if d.method == "rcnn":
            parts = [self.get(i)["pool5_flip" if flip else "pool5"][index] for i, index, flip, _ in requests]
            return torch.cat(parts).to(dev, torch.float32)
        parts = []
        for i, index, flip, scale_index in requests:
            entry = self.get(i)
            scales = self.scales(i)
            suffix = "_flip" if flip else ""
            maps = [entry[f"s{k}{suffix}"].to(dev, torch.float32) for k in range(len(scales))]  # [C5, h_s, w_s]
            boxes = self.windows[i].boxes[index]
            if flip:
                boxes = flip_boxes(boxes, self.windows[i].width)
            if scale_index is None:
                scale_index = d.assign_scales(boxes, scales)
            rois = d.map_windows(boxes, scales, [m.shape[-2:] for m in maps], scale_index)  # [n, 5]
            parts.append(d.pool_windows(maps, rois.to(dev)))  # [n, D]
        return torch.cat(parts) if parts else torch.empty((0, d.pooled_dim), device=dev)


def describe(windows: Sequence[WindowSet]) -> dict[str, Any]:
    """Counts for the log: images, windows, ground truth, foreground (IoU >= 0.5) windows."""
    return {
        "images": len(windows),
        "windows": sum(len(w) for w in windows),
        "objects": sum(int(w.is_gt.sum()) for w in windows),
        "foreground": sum(int((w.max_overlap >= 0.5).sum()) for w in windows),
    }
