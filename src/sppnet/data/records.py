"""Detection records shared by the VOC and COCO readers: building, loading, summarising.

A record is a plain dict (format in :mod:`sppnet.data.voc`): ``id``,
``image_path``, ``width``, ``height`` and the tensors ``boxes`` (``[G, 4]``
float32, ``(x1, y1, x2, y2)`` in 0-based inclusive pixels), ``labels`` (``[G]``
int64), ``difficult`` and ``truncated`` (``[G]`` bool). ``dataset[i]`` returns the
image and a copy of the record as its target.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from sppnet.data.images import SkipCounter, load_image, pil_to_tensor

__all__ = ["DetectionRecords", "Target", "describe_records", "load_sample", "make_record"]

Target = dict[str, Any]


def _empty_record_tensors() -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "difficult": torch.zeros((0,), dtype=torch.bool),
        "truncated": torch.zeros((0,), dtype=torch.bool),
    }


def make_record(
    image_id: Any,
    image_path: str | os.PathLike,
    width: int,
    height: int,
    objects: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """Builds one record (format in the module docstring) from checked objects.

    Args:
        objects: mappings with ``box`` (0-based inclusive), ``label`` (int),
            ``difficult`` and ``truncated`` (bool).
    """
    record: dict[str, Any] = {
        "id": image_id,
        "image_path": str(image_path),
        "width": int(width),
        "height": int(height),
    }
    if not objects:
        record.update(_empty_record_tensors())
        return record
    record["boxes"] = torch.tensor([list(o["box"]) for o in objects], dtype=torch.float32)  # [G, 4]
    record["labels"] = torch.tensor([o["label"] for o in objects], dtype=torch.int64)
    record["difficult"] = torch.tensor([bool(o["difficult"]) for o in objects], dtype=torch.bool)
    record["truncated"] = torch.tensor([bool(o["truncated"]) for o in objects], dtype=torch.bool)
    return record


def load_sample(
    record: Mapping[str, Any],
    transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None,
) -> tuple[torch.Tensor, Target]:
    """Loads the image of a record and builds its target (a copy of the record)."""
    img = load_image(record["image_path"])
    if img.size != (record["width"], record["height"]):
        raise ValueError(
            f"{record['image_path']}: image is {img.size[0]}x{img.size[1]} pixels but its "
            f"annotation says {record['width']}x{record['height']}"
        )
    image = pil_to_tensor(img)  # [3, H, W]
    target = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in record.items()}
    if transforms is not None:
        image, target = transforms(image, target)
    return image, target


def describe_records(
    name: str,
    records: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    skipped_images: SkipCounter,
    skipped_objects: SkipCounter,
    seen_images: int,
    seen_objects: int,
) -> str:
    """Multi-line summary shared by the detection data sets."""
    num_objects = sum(len(r["labels"]) for r in records)
    num_difficult = sum(int(r["difficult"].sum()) for r in records)
    per_class = Counter()
    for r in records:
        per_class.update(r["labels"].tolist())
    lines = [
        f"{name}: {len(records)} images, {num_objects} objects ({num_difficult} difficult), {len(class_names)} classes",
        "  per class: " + ", ".join(f"{c} {per_class[i]}" for i, c in enumerate(class_names)),
        "  " + skipped_images.summary(seen_images),
        "  " + skipped_objects.summary(seen_objects),
    ]
    return "\n".join(lines)


class DetectionRecords(Dataset):
    """What the VOC and COCO readers share once their records are built.

    A subclass fills ``records``, ``transforms``, ``class_names``, the skip
    counters ``skipped_images`` / ``skipped_objects`` and the counts
    ``_seen_images`` / ``_seen_objects``; its ``summary()`` names it and calls
    :meth:`_describe`.
    """

    records: list[dict[str, Any]]
    transforms: Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]] | None
    class_names: Sequence[str]
    skipped_images: SkipCounter
    skipped_objects: SkipCounter
    _seen_images: int
    _seen_objects: int

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        return load_sample(self.records[index], self.transforms)

    @property
    def num_classes(self) -> int:
        """Number of object classes (background not included)."""
        return len(self.class_names)

    def _describe(self, title: str) -> str:
        return describe_records(
            title,
            self.records,
            self.class_names,
            self.skipped_images,
            self.skipped_objects,
            self._seen_images,
            self._seen_objects,
        )
