"""COCO-style detection data (one JSON file plus a folder of images), as VOC records.

The JSON holds ``images`` (``id``, ``file_name``, ``width``, ``height``),
``annotations`` (``image_id``, ``category_id``, ``bbox = [x, y, w, h]``,
``iscrowd``) and ``categories`` (``id``, ``name``).

Box convention. COCO boxes are continuous: ``[x, y, w, h]`` covers
``[x, x + w] x [y, y + h]`` in a frame where pixel ``i`` spans ``[i, i + 1)``. The
records use the VOC convention of :mod:`sppnet.data.voc` (0-based inclusive pixel
indices), so ``x1 = x``, ``y1 = y``, ``x2 = x + w - 1``, ``y2 = y + h - 1``; a box
thinner than one pixel (``w < 1``) becomes one pixel wide (``x2 = x1``). With
``w = x2 - x1 + 1`` the VOC-style width gives back COCO's ``w``.

Labels: categories sorted by ``id`` get labels ``0 .. K-1``; ``class_names[k]``
is the name and ``category_ids[k]`` the original id. Crowd annotations
(``iscrowd = 1``) are kept with ``difficult = True``, so VOC-style evaluation
neither counts nor penalises them; ``truncated`` is always False (COCO has no
such flag).

Damage: a malformed JSON file or ``categories`` list raises ``ValueError`` naming
the file. A ``file_name`` that would resolve outside the image folder is refused
(``ValueError``) whatever ``strict`` says. Bad images (missing fields, missing
file, duplicate id) and bad annotations (non-positive ``w``/``h``, box outside
its image by more than :data:`BOX_TOLERANCE` pixels, unknown image or category
id) are skipped with a warning and counted, or raise with ``strict=True``. Boxes
that overshoot the image by at most :data:`BOX_TOLERANCE` (rounding in many
exported COCO files) are clipped to it. Annotations of skipped images are
dropped with their image.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from sppnet.data.images import SkipCounter
from sppnet.data.safety import resolve_inside
from sppnet.data.voc import Target, describe_records, load_sample, make_record

__all__ = ["BOX_TOLERANCE", "COCODetection"]

#: Largest overshoot (pixels) of a COCO box past the image border that is clipped
#: rather than treated as "box outside image".
BOX_TOLERANCE = 1.0


class _Skip(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not JSON
    except FileNotFoundError:
        raise ValueError(f"annotation file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: {key!r} must be a list, got {data.get(key)!r:.60}")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    return data


def _read_categories(path: Path, categories: list[Any]) -> tuple[list[int], list[str]]:
    if not categories:
        raise ValueError(f"{path}: 'categories' is empty")
    by_id: dict[int, str] = {}
    for index, category in enumerate(categories):
        if (
            not isinstance(category, dict)
            or not _is_int(category.get("id"))
            or not isinstance(category.get("name"), str)
            or not category["name"].strip()
        ):
            raise ValueError(f"{path}: categories[{index}] needs an int 'id' and a non-blank 'name', got {category!r}")
        if category["id"] in by_id:
            raise ValueError(f"{path}: category id {category['id']} appears twice")
        by_id[category["id"]] = category["name"]
    ids = sorted(by_id)
    return ids, [by_id[i] for i in ids]


def _convert_box(bbox: Any, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` (continuous) -> ``(x1, y1, x2, y2)`` 0-based inclusive."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise _Skip("malformed annotation", f"bbox must be 4 finite numbers, got {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _Skip("invalid box", f"bbox [x, y, w, h] = {bbox} has a non-positive w or h")
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise _Skip("box outside image", f"bbox [x, y, w, h] = {bbox} lies outside the {width}x{height} image")
    # Clip the tolerated overshoot to the continuous frame [0, W] x [0, H].
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    # Continuous [x0, x1) -> inclusive pixel indices; at least one pixel wide.
    return x0, y0, max(x0, x1 - 1.0), max(y0, y1 - 1.0)


class COCODetection(Dataset):
    """COCO-format detection data set, records as in :class:`~sppnet.data.voc.VOCDetection`.

    Args:
        root: folder the ``file_name`` fields are relative to (subfolders with
            ``/`` are allowed, ``..`` and absolute paths are not).
        annotation_json: the COCO annotation file.
        strict: raise ``ValueError`` on the first bad image or annotation
            instead of skipping it.
        transforms: optional ``f(image, target) -> (image, target)``.

    Attributes:
        records (list[dict]): ``id`` (the COCO image id, int), ``image_path``,
            ``width``, ``height``, ``boxes`` Tensor[G, 4] float32 ``(x1, y1, x2, y2)``
            0-based inclusive, ``labels`` Tensor[G] int64, ``difficult`` (crowd)
            and ``truncated`` Tensor[G] bool.
        class_names (list[str]), category_ids (list[int]): per label.
        skipped_images, skipped_objects (SkipCounter).

    ``dataset[i]`` returns ``(image Tensor[3, H, W] float in [0, 1], target)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        annotation_json: str | os.PathLike,
        strict: bool = False,
        transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.annotation_json = Path(annotation_json)
        self.strict = strict
        self.transforms = transforms
        self.skipped_images = SkipCounter("images")
        self.skipped_objects = SkipCounter("objects")
        if not self.root.is_dir():
            raise ValueError(f"COCO image folder {self.root} does not exist")
        data = _read_json(self.annotation_json)
        self.category_ids, self.class_names = _read_categories(self.annotation_json, data["categories"])
        label_of = {cid: label for label, cid in enumerate(self.category_ids)}

        images: dict[int, dict[str, Any]] = {}  # image id -> record fields, file order
        dropped_ids: set[int] = set()
        for index, entry in enumerate(data["images"]):
            try:
                image_id, fields = self._read_image(entry, images)
            except _Skip as skip:
                image_id = entry.get("id") if isinstance(entry, dict) else None
                if _is_int(image_id) and image_id not in images:
                    dropped_ids.add(image_id)
                self._skip(self.skipped_images, skip, f"images[{index}]")
                continue
            images[image_id] = fields
        self._seen_images = len(data["images"])

        objects: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in images}
        self._seen_objects = 0
        for index, ann in enumerate(data.get("annotations", [])):
            if isinstance(ann, dict) and ann.get("image_id") in dropped_ids:
                continue  # dropped with its image
            self._seen_objects += 1
            try:
                if not isinstance(ann, dict):
                    raise _Skip("malformed annotation", f"not an object: {ann!r:.60}")
                image = images.get(ann.get("image_id"))
                if image is None:
                    raise _Skip("unknown image id", f"image_id {ann.get('image_id')!r} is not in 'images'")
                label = label_of.get(ann.get("category_id"))
                if label is None:
                    raise _Skip("unknown category", f"category_id {ann.get('category_id')!r} is not in 'categories'")
                crowd = ann.get("iscrowd", 0)
                if crowd not in (0, 1):
                    raise _Skip("malformed annotation", f"iscrowd must be 0 or 1, got {crowd!r}")
                box = _convert_box(ann.get("bbox"), image["width"], image["height"])
            except _Skip as skip:
                self._skip(self.skipped_objects, skip, f"annotations[{index}]")
                continue
            objects[ann["image_id"]].append({"box": box, "label": label, "difficult": bool(crowd), "truncated": False})

        self.records = [
            make_record(image_id, f["image_path"], f["width"], f["height"], objects[image_id])
            for image_id, f in images.items()
        ]
        if not self.records:
            raise ValueError(
                f"{self.annotation_json}: no usable images; {self.skipped_images.summary(self._seen_images)}"
            )

    def _skip(self, counter: SkipCounter, skip: _Skip, where: str) -> None:
        detail = f"{where}: {skip.detail}"
        if self.strict:
            raise ValueError(f"{self.annotation_json}: {detail}")
        counter.skip(self.annotation_json, skip.reason, detail)

    def _read_image(self, entry: Any, seen: dict[int, dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        if not isinstance(entry, dict):
            raise _Skip("malformed image", f"not an object: {entry!r:.60}")
        image_id, file_name = entry.get("id"), entry.get("file_name")
        width, height = entry.get("width"), entry.get("height")
        if not _is_int(image_id) or not isinstance(file_name, str):
            raise _Skip(
                "malformed image",
                f"needs an int 'id' and a str 'file_name', got id={image_id!r}, file_name={file_name!r}",
            )
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            raise _Skip("malformed image", f"width and height must be positive ints, got {width!r} x {height!r}")
        if image_id in seen:
            raise _Skip("duplicate id", f"image id {image_id} appears twice")
        # Unsafe names are refused (ValueError), whatever `strict` says.
        path = resolve_inside(self.root, file_name, what=f"file_name of image id {image_id}", allow_subdirs=True)
        if not path.is_file():
            raise _Skip("missing image", f"image file {path} not found")
        return image_id, {"image_path": path, "width": width, "height": height}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return load_sample(self.records[index], self.transforms)

    @property
    def num_classes(self) -> int:
        """Number of object classes (background not included)."""
        return len(self.class_names)

    def summary(self) -> str:
        """Images, objects, crowd (difficult) objects, per-class counts, skips."""
        return describe_records(
            f"COCODetection({self.annotation_json})",
            self.records,
            self.class_names,
            self.skipped_images,
            self.skipped_objects,
            self._seen_images,
            self._seen_objects,
        )

    def __repr__(self) -> str:
        return (
            f"COCODetection(root={str(self.root)!r}, annotation_json="
            f"{str(self.annotation_json)!r}, images={len(self)}, classes={self.num_classes})"
        )
