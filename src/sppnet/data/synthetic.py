"""Built-in data sets: coloured shapes on textured backgrounds, generated from a seed.

No download is possible on the machines this project targets, so the paper's
experiments run on pictures drawn here, deterministically from a seed (numpy
``Generator`` per image, seeded by ``(seed, kind, split, index)``; same seed and
parameters give byte-identical files on the same Pillow version).

Classes (:data:`CLASSES`, label = position)::

    0 circle    1 square    2 triangle  3 cross
    4 star      5 ring      6 diamond   7 hexagon

The class is the *shape*: colours are random (and forced to differ from the
background under the object), so colour carries no label information. Shapes are
rotated by at most 15 degrees so a square never turns into a diamond. Backgrounds
mix a two-colour gradient, low-frequency blotches, optional stripes and pixel
noise; distractor lines and irregular blobs are drawn under the objects.

* :func:`make_classification_dataset`: an ImageFolder tree
  ``root/{train,val,test}/<class>/<class>_<index>.jpg``, one object per image.
  Image sides vary (``min_size..max_size``, aspect 0.6..1.7), the object's size
  is 15%..80% of the short side and its position is uniform, so full-image
  testing and scale matter (SPP-net Sec. 3.1).
* :func:`make_detection_dataset`: a Pascal VOC tree (``Annotations``,
  ``JPEGImages``, ``ImageSets/Main/{train,val,trainval,test}.txt``; see
  :mod:`sppnet.data.voc`), 1..``max_objects`` objects per image, sizes from 20 px
  to most of the image, stretched (w/h 0.5..2), little overlap (box IoU <= 0.3,
  at most 20% of the smaller shape hidden; larger shapes are painted first).
  ``truncated`` marks objects cut by the border; ``difficult`` marks low-contrast
  objects, objects less than 40% visible and objects under 12 px (about 5%).

Caching: data sets are written under :func:`default_data_root` (``$SPPNET_DATA``,
else ``~/.cache/sppnet``) unless ``root`` is given, with a stamp file holding the
generator version and all parameters; a call with matching stamp returns at
once, a mismatch regenerates. A non-empty folder without a stamp is never
overwritten. Generation writes into a temporary sibling folder and renames it,
so an interrupted run leaves no half data set behind.

The drawing itself (unit shapes, masks, backgrounds, clutter, colours) lives in
the private :mod:`sppnet.data._shapes`; this module composes pictures from it and
writes the data sets.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sppnet.data._shapes import (
    CLASSES,
    _background,
    _draw_clutter,
    _image_size,
    _iou,
    _paint,
    _rasterize,
    _shape_area,
    _tight_box,
    _too_much_overlap,
    shape_polygons,
)
from sppnet.data.safety import validate_class_names
from sppnet.data.voc import write_voc_annotation

__all__ = [
    "CLASSES",
    "DATA_ENV",
    "GENERATOR_VERSION",
    "default_data_root",
    "make_classification_dataset",
    "make_detection_dataset",
    "render_classification_image",
    "render_detection_image",
    "shape_polygons",
]

#: Environment variable naming the cache folder for generated data sets.
DATA_ENV = "SPPNET_DATA"
#: Bumped whenever the pictures a seed produces change; cached sets regenerate.
GENERATOR_VERSION = 1
STAMP_NAME = ".sppnet-synthetic.json"

_MAX_ROTATION = math.radians(15.0)  # keeps square and diamond apart
_CLASSIFICATION_SPLITS = ("train", "val", "test")
_DETECTION_SPLITS = ("train", "val", "test")


def default_data_root() -> Path:
    """``$SPPNET_DATA`` if set, else ``~/.cache/sppnet``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sppnet"


# ------------------------------------------------------------------- single images


def render_classification_image(
    rng: np.random.Generator,
    class_name: str,
    min_size: int = 96,
    max_size: int = 256,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Draws one classification picture: one object of ``class_name``, fully inside.

    Args:
        rng: the picture's random generator.
        class_name: one of :data:`CLASSES`.
        min_size, max_size: bounds on both image sides (aspect 0.6..1.7).

    Returns:
        ``(image, box)``: the RGB image and the object's tight box
        ``(x1, y1, x2, y2)`` in 0-based inclusive pixels.
    """
    width, height = _image_size(rng, min_size, max_size, 0.6, 1.7, max_side=max_size)
    canvas = Image.fromarray(_background(rng, width, height))
    _draw_clutter(rng, canvas)
    short = min(width, height)
    size = rng.uniform(0.15, 0.80) * short  # the object's longer side
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    obj_w, obj_h = (size, size / aspect) if aspect >= 1.0 else (size * aspect, size)
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    # Half extents of the rotated box, so the whole object stays inside the image.
    ext_x = 0.5 * (abs(math.cos(angle)) * obj_w + abs(math.sin(angle)) * obj_h)
    ext_y = 0.5 * (abs(math.sin(angle)) * obj_w + abs(math.cos(angle)) * obj_h)
    cx = rng.uniform(ext_x, max(ext_x, width - 1 - ext_x))
    cy = rng.uniform(ext_y, max(ext_y, height - 1 - ext_y))
    mask = _rasterize(shape_polygons(class_name, cx, cy, obj_w, obj_h, angle), width, height)
    pixels = np.array(canvas)
    _paint(rng, pixels, mask)
    box = _tight_box(mask)
    assert box is not None, "an object of >= 15% of the short side is never empty"
    return Image.fromarray(pixels), box


def render_detection_image(
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
    min_short_side: int = 200,
    max_short_side: int = 400,
    max_objects: int = 5,
    min_object_size: float = 20.0,
) -> tuple[Image.Image, list[dict[str, Any]]]:
    """Draws one detection picture with 1..``max_objects`` objects.

    Args:
        rng: the picture's random generator.
        classes: shape names to draw from.
        min_short_side, max_short_side: bounds on the short side (aspect 0.7..1.5).
        max_objects: most objects per image (at least one is always placed).
        min_object_size: smallest object size ``sqrt(w * h)`` in pixels.

    Returns:
        ``(image, objects)``, large objects first (they are painted first). Each
        object is a dict with ``name`` (str); ``box`` ``(x1, y1, x2, y2)``, the
        0-based inclusive tight box of its pixels (occluded ones included);
        ``difficult``, ``truncated`` (bool); ``visible`` (float, fraction of the
        unclipped shape left visible); ``mask`` (bool ndarray [H, W], the shape's
        pixels inside the image).
    """
    width, height = _image_size(rng, min_short_side, max_short_side, 0.7, 1.5)
    canvas = Image.fromarray(_background(rng, width, height))
    _draw_clutter(rng, canvas)
    short = min(width, height)
    wanted = int(rng.integers(1, max_objects + 1))
    placed: list[dict[str, Any]] = []
    for _ in range(wanted):
        for _attempt in range(30):
            name = classes[int(rng.integers(len(classes)))]
            size = math.exp(rng.uniform(math.log(min_object_size), math.log(0.9 * short)))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # w / h
            obj_w = min(size * math.sqrt(aspect), 0.95 * width)
            obj_h = min(size / math.sqrt(aspect), 0.95 * height)
            angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
            may_cross_border = bool(placed) and rng.random() < 0.25  # first: fully inside
            if may_cross_border:
                cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            else:
                ext_x = 0.5 * (abs(math.cos(angle)) * obj_w + abs(math.sin(angle)) * obj_h)
                ext_y = 0.5 * (abs(math.sin(angle)) * obj_w + abs(math.cos(angle)) * obj_h)
                cx = rng.uniform(min(ext_x, width / 2), max(width / 2, width - 1 - ext_x))
                cy = rng.uniform(min(ext_y, height / 2), max(height / 2, height - 1 - ext_y))
            polygons = shape_polygons(name, cx, cy, obj_w, obj_h, angle)
            points = np.concatenate([p for p, _ in polygons])
            rough = (points[:, 0].min(), points[:, 1].min(), points[:, 0].max(), points[:, 1].max())
            if any(_iou(rough, other["box"]) > 0.3 for other in placed):
                continue
            mask = _rasterize(polygons, width, height)
            box = _tight_box(mask)
            if box is None or box[2] - box[0] < 5 or box[3] - box[1] < 5:
                continue
            if any(_iou(box, other["box"]) > 0.3 or _too_much_overlap(mask, box, other) for other in placed):
                continue
            truncated = bool(rough[0] < 0 or rough[1] < 0 or rough[2] > width - 1 or rough[3] > height - 1)
            placed.append(
                {
                    "name": name,
                    "box": box,
                    "mask": mask,
                    "truncated": truncated,
                    "area": _shape_area(polygons),
                    "low_contrast": rng.random() < 0.04,
                }
            )
            break

    placed.sort(key=lambda obj: -int(obj["mask"].sum()))  # paint large first, small on top
    pixels = np.array(canvas)
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the top object per pixel
    for index, obj in enumerate(placed):
        _paint(rng, pixels, obj["mask"], low_contrast=obj["low_contrast"])
        owner[obj["mask"]] = index
    objects = []
    for index, obj in enumerate(placed):
        visible = float((owner == index).sum()) / max(obj["area"], 1.0)
        x1, y1, x2, y2 = obj["box"]
        tiny = min(x2 - x1 + 1, y2 - y1 + 1) < 12
        objects.append(
            {
                "name": obj["name"],
                "box": obj["box"],
                "difficult": bool(obj["low_contrast"] or visible < 0.4 or tiny),
                "truncated": obj["truncated"],
                "visible": min(visible, 1.0),
                "mask": obj["mask"],
            }
        )
    return Image.fromarray(pixels), objects


# ------------------------------------------------------------------------- caching


def _image_rng(seed: int, *key: int) -> np.random.Generator:
    """Independent generator per picture, so any picture can be redrawn alone."""
    return np.random.default_rng([seed, *key])


def _read_stamp(root: Path) -> Any:
    try:
        return json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _cached(root: Path, stamp: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """Returns ``root`` if its stamp equals ``stamp``, else (re)builds it atomically."""
    stamp = json.loads(json.dumps(stamp))  # tuples -> lists, as read back from disk
    existing = _read_stamp(root)
    if existing == stamp:
        return root
    if root.exists():
        if not root.is_dir():
            raise ValueError(f"data set root {root} exists and is not a folder")
        if existing is None and any(root.iterdir()):
            raise ValueError(
                f"{root} is not empty and has no {STAMP_NAME} stamp, so it is not a generated "
                f"sppnet data set; refusing to overwrite it (choose another root)"
            )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if _read_stamp(root) == stamp:  # a concurrent twin finished first: keep it (it may be in use)
            shutil.rmtree(tmp, ignore_errors=True)
            return root
        if root.exists():
            shutil.rmtree(root)  # a stale generated set, or an empty folder
        try:
            os.replace(tmp, root)
        except OSError:
            if _read_stamp(root) != stamp:  # not a concurrent twin of ours
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _check_count(name: str, value: int, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


# -------------------------------------------------------------------- the data sets


def make_classification_dataset(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    train_per_class: int = 200,
    val_per_class: int = 50,
    test_per_class: int = 100,
    min_size: int = 96,
    max_size: int = 256,
) -> Path:
    """Generates (or finds cached) the shapes classification set in ImageFolder layout.

    Writes ``root/{train,val,test}/<class>/<class>_<index>.jpg`` for every class in
    :data:`CLASSES`; the defaults give 2,800 images (about 25 MB) in well under a
    minute. JPEG (quality 92), like ImageNet: the noisy textures make PNG files
    six times larger and slower to write.

    Args:
        root: target folder; ``None``: ``default_data_root() / "shapes-classification-seed<seed>"``.
        seed: everything follows from it.
        train_per_class, val_per_class, test_per_class: images per class and split.
        min_size, max_size: bounds on both image sides in pixels.

    Returns:
        The data set folder (read it with :class:`~sppnet.data.imagefolder.ImageFolderDataset`).

    Raises:
        ValueError: bad counts or sizes, or ``root`` is a non-empty folder that
            this function did not write.
    """
    _check_count("seed", seed)
    _check_count("train_per_class", train_per_class, 1)
    _check_count("val_per_class", val_per_class)
    _check_count("test_per_class", test_per_class)
    _check_count("min_size", min_size, 32)
    _check_count("max_size", max_size, min_size)
    if root is None:
        root = default_data_root() / f"shapes-classification-seed{seed}"
    root = Path(root)
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    stamp = {
        "generator": __name__,
        "kind": "classification",
        "version": GENERATOR_VERSION,
        "params": {"seed": seed, "classes": CLASSES, "per_class": counts, "min_size": min_size, "max_size": max_size},
    }

    def build(folder: Path) -> None:
        for split_index, split in enumerate(_CLASSIFICATION_SPLITS):
            for class_index, name in enumerate(CLASSES):
                class_dir = folder / split / name
                class_dir.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = _image_rng(seed, 1, split_index, class_index, i)
                    image, _ = render_classification_image(rng, name, min_size, max_size)
                    image.save(class_dir / f"{name}_{i:05d}.jpg", format="JPEG", quality=92)

    return _cached(root, stamp, build)


def make_detection_dataset(
    root: str | os.PathLike | None = None,
    seed: int = 0,
    num_train: int = 300,
    num_val: int = 100,
    num_test: int = 150,
    min_short_side: int = 200,
    max_short_side: int = 400,
    max_objects: int = 5,
    classes: Sequence[str] = CLASSES,
) -> Path:
    """Generates (or finds cached) the shapes detection set in Pascal VOC layout.

    Image ids are ``000001, 000002, ...`` (train, then val, then test);
    ``trainval.txt`` lists train and val. Boxes are tight around each object's
    pixels (VOC XML: 1-based inclusive). Read it with
    ``VOCDetection(root, split, classes=CLASSES)``: passing the class list keeps
    labels identical across splits even when a tiny split lacks a class.

    Args:
        root: target folder; ``None``: ``default_data_root() / "shapes-voc-seed<seed>"``.
        seed: everything follows from it.
        num_train, num_val, num_test: images per split.
        min_short_side, max_short_side: bounds on the image's short side (aspect 0.7..1.5).
        max_objects: most objects per image (1..max_objects, uniform).
        classes: the shapes to use (a subset of :data:`CLASSES`).

    Returns:
        The data set folder.

    Raises:
        ValueError: bad counts, sizes or classes, or ``root`` is a non-empty
            folder that this function did not write.
    """
    _check_count("seed", seed)
    _check_count("num_train", num_train, 1)
    _check_count("num_val", num_val)
    _check_count("num_test", num_test)
    _check_count("min_short_side", min_short_side, 64)
    _check_count("max_short_side", max_short_side, min_short_side)
    _check_count("max_objects", max_objects, 1)
    classes = validate_class_names(classes)
    unknown = [c for c in classes if c not in CLASSES]
    if unknown:
        raise ValueError(f"classes must be drawn from {CLASSES}, got unknown {unknown}")
    root = Path(root) if root is not None else default_data_root() / f"shapes-voc-seed{seed}"
    counts = {"train": num_train, "val": num_val, "test": num_test}
    stamp = {
        "generator": __name__,
        "kind": "detection",
        "version": GENERATOR_VERSION,
        "params": {
            "seed": seed,
            "classes": classes,
            "counts": counts,
            "min_short_side": min_short_side,
            "max_short_side": max_short_side,
            "max_objects": max_objects,
        },
    }

    def build(folder: Path) -> None:
        annotations, images = folder / "Annotations", folder / "JPEGImages"
        sets = folder / "ImageSets" / "Main"
        for path in (annotations, images, sets):
            path.mkdir(parents=True)
        ids: dict[str, list[str]] = {}
        number = 0
        for split in _DETECTION_SPLITS:
            ids[split] = []
            for _ in range(counts[split]):
                number += 1
                image_id = f"{number:06d}"
                rng = _image_rng(seed, 2, number)
                image, objects = render_detection_image(rng, classes, min_short_side, max_short_side, max_objects)
                image.save(images / f"{image_id}.jpg", format="JPEG", quality=92)
                write_voc_annotation(
                    annotations / f"{image_id}.xml",
                    f"{image_id}.jpg",
                    image.size,
                    objects,
                    database="sppnet synthetic shapes",
                )
                ids[split].append(image_id)
        ids["trainval"] = ids["train"] + ids["val"]
        for split, split_ids in ids.items():
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids), encoding="utf-8")

    return _cached(root, stamp, build)
