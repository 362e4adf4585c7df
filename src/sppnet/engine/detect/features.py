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
    the released code does); the cells the image's windows read, computed from
    the image regions they see (``SPPDetector.feature_maps``; 0 elsewhere).
    Flipping the conv5 map instead would be cheaper but wrong: conv
    filters are not mirror-symmetric, so conv5(flip(I)) != flip(conv5(I)). We
    pay one more conv pass per image and scale, once.
  - ``method="rcnn"``: pool5 of every warped window (and of its mirror image),
    the R-CNN counterpart of a cached conv5.

  Where the entries live (``--feature-cache``): ``disk``, one safetensors file
  per image (``sppnet.utils.save_cache``, atomic, with a checksum); ``memory``,
  every entry in RAM, nothing on disk; ``none``, nothing stored: each entry is
  recomputed by the frozen conv layers when it is read (the only choice for
  COCO-sized sets; the RAM budget below still keeps the most recent ones). The
  maps are stored as float32 or, with ``--cache-dtype float16``, in half the
  space (pooled in float32 after reading).
  Disk entries: one safetensors file per image (``sppnet.utils.save_cache``, atomic, with a
  checksum). The key mixes the image file's SHA-256, the conv weights, the
  normalisation, the scales / warp size (and R-CNN's warp context), the windows and a layout version: a stale or
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
from sppnet.engine.distributed import DistContext, fill_cache
from sppnet.models.detector import Scale, SPPDetector
from sppnet.ops import box_iou
from sppnet.utils import file_digest, load_cache, save_cache, tensor_digest

__all__ = [
    "CACHE_DTYPES",
    "CACHE_MODES",
    "FeatureCache",
    "WindowSet",
    "build_windows",
    "conv_digest",
    "flip_boxes",
    "format_bytes",
    "load_record_image",
]

#: Where a :class:`FeatureCache` keeps its entries, and the dtypes it stores them in.
CACHE_MODES: tuple[str, ...] = ("disk", "memory", "none")
CACHE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class WindowSet:
    """The windows of one training image.

    Attributes:
        boxes (Tensor[N, 4]): inclusive pixel boxes; rows ``0..G-1`` are the ground truth.
        overlaps (Tensor[N, K]): IoU of each window with the best ground truth of
            each class (0 where the image has none); difficult objects count.
        max_overlap (Tensor[N]): IoU with the best ground truth of any class (1 on ground-truth rows).
        gt_index (Tensor[N]): index of that ground truth (-1 without ground truth); a
            ground-truth row's is its own object, even where another box is identical.
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
        # Ground-truth rows keep their own object (roidb_from_voc.m: rec.class = gt_classes):
        # argmax would hand the second of two identical boxes the first one's label.
        gt_index[:g] = torch.arange(g)
        max_overlap[:g] = 1.0
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
        cache_dir: folder of the entries (``mode="disk"``).
        flips: also cache the horizontally flipped image.
        max_bytes: RAM kept for loaded entries (``disk`` and ``none``; ``memory`` keeps all).
        mode: ``disk``, ``memory`` or ``none`` (see the module docstring).
        dtype: ``float32`` or ``float16``: how the entries are stored.
    """

    VERSION = 2  # 2: SPP maps hold the cells the windows read (0 elsewhere)

    def __init__(
        self,
        detector: SPPDetector,
        records: Sequence[dict],
        windows: Sequence[WindowSet],
        cache_dir: str | os.PathLike,
        flips: bool = True,
        max_bytes: int = 2 << 30,
        mode: str = "disk",
        dtype: str = "float32",
    ) -> None:
        if mode not in CACHE_MODES:
            raise ValueError(f"feature cache mode must be one of {', '.join(CACHE_MODES)}, got {mode!r}")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"feature cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
        self.mode, self.dtype = mode, CACHE_DTYPES[dtype]
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
                **({"warp_context": d.warp_context} if d.method == "rcnn" else {}),
                "flips": self.flips,
                "version": self.VERSION,
            },
            sort_keys=True,
        )
        if self.dtype != torch.float32:  # float16 entries are other entries
            self._salt += f"|{self.dtype}"
        self._keys = {}
        self._lru.clear()
        self._bytes = 0

    def key(self, i: int) -> str:
        if not self._salt:
            self.refresh()
        if i not in self._keys:
            extra = self._salt
            # R-CNN's rows follow the windows; SPP computes the conv5 cells the windows read.
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
                boxes = self.windows[i].boxes
                if suffix:
                    boxes = flip_boxes(boxes, img.shape[-1])
                if d.method == "rcnn":
                    out["pool5" + suffix] = d.window_pool5(img, boxes.to(img.device)).to("cpu", self.dtype)
                else:  # the cells some window reads at some scale (the rest of the maps is 0)
                    maps, _ = d.feature_maps(img, boxes=boxes.to(img.device))
                    for k, m in enumerate(maps):
                        out[f"s{k}{suffix}"] = m.to("cpu", self.dtype).contiguous()
            return out
        finally:
            d.train(was_training)

    def use(self, detector: SPPDetector) -> FeatureCache:
        """Serve ``detector`` (the next stage's); entries in RAM stay while its conv layers are the same."""
        old, kept, size = self._salt, OrderedDict(self._lru), self._bytes
        self.detector = detector
        self.refresh()  # new keys; drops the RAM entries
        if old and self._salt == old:
            self._lru, self._bytes = kept, size
        return self

    def present(self, i: int) -> bool:
        """Entry ``i`` is stored (``disk``: its file; ``memory``: in RAM; ``none``: always)."""
        if self.mode == "disk":
            return self.path(i).is_file()
        return self.mode == "none" or i in self._lru

    def entry_bytes(self, i: int) -> int:
        """The size entry ``i`` takes (computed from the image size and the network, nothing is run)."""
        d, w = self.detector, self.windows[i]
        elt = torch.empty((), dtype=self.dtype).element_size()
        copies = 2 if self.flips else 1
        if d.method == "rcnn":
            return copies * len(w) * d.pooled_dim * elt
        chans = d.backbone.feature_channels
        cells = sum(h * ww for h, ww in (d.backbone.feature_size(s.height, s.width) for s in self.scales(i)))
        return copies * chans * cells * elt

    def estimate_bytes(self) -> int:
        """The size of every entry together: what ``disk`` writes and ``memory`` holds."""
        return sum(self.entry_bytes(i) for i in range(len(self.records)))

    def ensure(
        self,
        progress: Callable | None = None,
        should_stop: Callable[[], bool] | None = None,
        dist: DistContext | None = None,
    ) -> int:
        """Computes and stores every missing or stale entry; returns how many this process computed.

        ``none`` stores nothing (returns 0); ``memory`` fills this process's RAM;
        ``disk`` under ``torchrun`` (``dist``) writes each entry from exactly one
        process (:func:`~sppnet.engine.distributed.fill_cache`). Stops early
        (returning) when ``should_stop()`` turns True between images.
        """
        if self.mode == "none":
            return 0
        if self.mode == "disk" and dist is not None and dist.distributed:
            keys = [self.key(i) for i in range(len(self.records))]
            fill = fill_cache(
                keys,
                lambda i: self.path(i).is_file(),
                lambda i: self.get(i, store=True),
                dist,
                should_stop,
                (lambda it: progress(it, desc="conv features")) if progress is not None and dist.is_main else None,
            )
            return fill.built
        todo = [i for i in range(len(self.records)) if not self.present(i)]
        it = progress(todo, desc="conv features", total=len(todo)) if progress else todo
        done = 0
        for i in it:
            if self.get(i, store=True) is not None:
                done += 1
            if should_stop is not None and should_stop():
                break
        return done

    def complete(self) -> bool:
        return all(self.present(i) for i in range(len(self.records)))

    # ------------------------------------------------------------------- read
    def get(self, i: int, store: bool = True) -> dict[str, Tensor]:
        """Entry of image ``i``: from RAM, else from disk (verified), else computed (and stored)."""
        if i in self._lru:
            self._lru.move_to_end(i)
            return self._lru[i]
        key = self.key(i)
        entry = load_cache(self.path(i), key=key, version=self.VERSION) if self.mode == "disk" else None
        if entry is None:
            entry = self.compute(i)
            if store and self.mode == "disk":
                save_cache(self.path(i), entry, key=key, version=self.VERSION)
        entry = {k: _cells_last(t) if k.startswith("s") else t for k, t in entry.items()}
        size = sum(t.numel() * t.element_size() for t in entry.values())
        self._lru[i] = entry
        self._bytes += size
        while self.mode != "memory" and self._bytes > self.max_bytes and len(self._lru) > 1:
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
        if not requests:
            return torch.empty((0, d.pooled_dim), device=dev)
        # Every window of every request mapped onto its map in one pass (a fine-tuning batch
        # holds ~30 (image, flip) requests of a few windows each: per-request mapping cost
        # more than the pooling); then each request's windows pooled from its own maps.
        all_maps, boxes, fy, fx, height, width, scale_ids = [], [], [], [], [], [], []
        for i, index, flip, scale_index in requests:
            entry = self.get(i)
            scales = self.scales(i)
            suffix = "_flip" if flip else ""
            maps = [entry[f"s{k}{suffix}"] for k in range(len(scales))]  # [C5, h_s, w_s], moved when used
            b = self.windows[i].boxes[index]
            if flip:
                b = flip_boxes(b, self.windows[i].width)
            s = d.assign_scales(b, scales) if scale_index is None else torch.as_tensor(scale_index).long().cpu()
            per_scale = torch.tensor(  # float64: the factors exactly as map_windows uses them
                [[sc.fy, sc.fx, m.shape[-2], m.shape[-1]] for sc, m in zip(scales, maps)], dtype=torch.float64
            )
            rows = per_scale[s]  # [n, 4]: fy, fx, h, w of each window's scale
            all_maps.append(maps)
            boxes.append(b)
            fy.append(rows[:, 0])
            fx.append(rows[:, 1])
            height.append(rows[:, 2].long())
            width.append(rows[:, 3].long())
            scale_ids.append(s)
        cells = d.map_windows_rows(torch.cat(boxes), torch.cat(fy), torch.cat(fx), torch.cat(height), torch.cat(width))
        rois = torch.cat([torch.cat(scale_ids)[:, None], cells], dim=1)  # [N, 5]
        parts, start = [], 0
        for maps, s in zip(all_maps, scale_ids):
            parts.append(d.pool_windows(maps, rois[start : start + len(s)]))  # only the maps some window uses moved
            start += len(s)
        return torch.cat(parts)


def _cells_last(m: Tensor) -> Tensor:
    """``Tensor[C, h, w]`` with the channels of a cell adjacent in memory (a channels-last view).

    The window kernels read maps in that layout: a map kept so in RAM is pooled
    without a copy of the whole map per call (fine-tuning pools a few windows of
    each of ~30 maps a batch, where the copy had cost more than the pooling).
    """
    if m.dim() != 3 or m.permute(1, 2, 0).is_contiguous():
        return m
    return m.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def describe(windows: Sequence[WindowSet]) -> dict[str, Any]:
    """Counts for the log: images, windows, ground truth, foreground (IoU >= 0.5) windows."""
    return {
        "images": len(windows),
        "windows": sum(len(w) for w in windows),
        "objects": sum(int(w.is_gt.sum()) for w in windows),
        "foreground": sum(int((w.max_overlap >= 0.5).sum()) for w in windows),
    }


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
