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
from PIL import Image, ImageDraw

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

#: The shape classes; label ``i`` is ``CLASSES[i]``.
CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "star", "ring", "diamond", "hexagon",
)
#: Environment variable naming the cache folder for generated data sets.
DATA_ENV = "SPPNET_DATA"
#: Bumped whenever the pictures a seed produces change; cached sets regenerate.
GENERATOR_VERSION = 1
STAMP_NAME = ".sppnet-synthetic.json"

_MAX_ROTATION = math.radians(15.0)  # keeps square and diamond apart
_CLASSIFICATION_SPLITS = ("train", "val", "test")
_DETECTION_SPLITS = ("train", "val", "test")

Polygon = tuple[np.ndarray, bool]  # ([P, 2] float (x, y) points, True = fill / False = hole)


def default_data_root() -> Path:
    """``$SPPNET_DATA`` if set, else ``~/.cache/sppnet``."""
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sppnet"


# ---------------------------------------------------------------------------- shapes

def _regular(n: int, radius: float = 1.0, phase_deg: float = -90.0) -> np.ndarray:
    angles = np.radians(phase_deg + 360.0 * np.arange(n) / n)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [n, 2]


def _unit_shape(name: str) -> list[Polygon]:
    """The shape in the unit box ``[-1, 1]^2`` (image axes: y points down)."""
    if name == "circle":
        return [(_regular(48), True)]
    if name == "ring":
        return [(_regular(48), True), (_regular(48, 0.55), False)]
    if name == "square":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float), True)]
    if name == "diamond":
        return [(np.array([[0, -1], [1, 0], [0, 1], [-1, 0]], float), True)]
    if name == "triangle":
        return [(np.array([[0, -1], [1, 1], [-1, 1]], float), True)]
    if name == "hexagon":
        return [(_regular(6, phase_deg=0.0), True)]
    if name == "star":
        outer, inner = _regular(5), _regular(5, 0.42, phase_deg=-54.0)
        return [(np.stack([outer, inner], axis=1).reshape(10, 2), True)]  # alternate tips
    if name == "cross":
        a = 0.3  # half width of an arm
        return [(np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1],
                           [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]], float), True)]
    raise ValueError(f"unknown shape {name!r}; known shapes: {CLASSES}")


def shape_polygons(name: str, cx: float, cy: float, width: float, height: float,
                   angle: float = 0.0) -> list[Polygon]:
    """Places a shape: scale the unit shape to ``width x height``, rotate, move.

    Args:
        name: one of :data:`CLASSES`.
        cx, cy: centre in pixels.
        width, height: size of the unrotated shape's box in pixels.
        angle: rotation in radians (clockwise on screen, y down).

    Returns:
        ``[(points [P, 2] (x, y), is_fill)]``: fill polygons and holes, drawn in order.
    """
    cos, sin = math.cos(angle), math.sin(angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    placed = []
    for points, fill in _unit_shape(name):
        scaled = points * np.array([width / 2.0, height / 2.0])  # [P, 2]
        placed.append((scaled @ rotation.T + np.array([cx, cy]), fill))
    return placed


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_area(polygons: Sequence[Polygon]) -> float:
    return sum(_polygon_area(p) * (1 if fill else -1) for p, fill in polygons)


def _rasterize(polygons: Sequence[Polygon], width: int, height: int) -> np.ndarray:
    """Bool mask [height, width] of the shape, clipped to the image."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in polygons:
        draw.polygon([tuple(p) for p in points.tolist()], fill=255 if fill else 0)
    return np.asarray(mask) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x1, y1, x2, y2)`` 0-based inclusive around the True pixels, None if none."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def _too_much_overlap(mask: np.ndarray, box: Sequence[int], other: dict[str, Any],
                      limit: float = 0.2) -> bool:
    """True if two shapes share more than ``limit`` of the smaller one's pixels."""
    ob = other["box"]
    x1, y1 = max(box[0], ob[0]), max(box[1], ob[1])
    x2, y2 = min(box[2], ob[2]), min(box[3], ob[3])
    if x2 < x1 or y2 < y1:
        return False
    window = (slice(y1, y2 + 1), slice(x1, x2 + 1))
    shared = int(np.count_nonzero(mask[window] & other["mask"][window]))
    smaller = min(int(np.count_nonzero(mask)), int(np.count_nonzero(other["mask"])))
    return shared > limit * smaller


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two 0-based inclusive boxes (VOC +1 widths)."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


# ------------------------------------------------------------------------ painting

def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Textured background, uint8 [height, width, 3]."""
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]  # [H, 1]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]  # [1, W]
    theta = rng.uniform(0.0, 2.0 * math.pi)
    ramp = math.cos(theta) * xs + math.sin(theta) * ys  # [H, W]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3))
    image = np.empty((3, height, width), dtype=np.float32)  # channel-first: long inner loops
    for c in range(3):
        image[c] = c0[c] + (c1[c] - c0[c]) * ramp  # two-colour gradient

    grid_h, grid_w = rng.integers(2, 8, size=2)
    coarse = rng.normal(128.0, rng.uniform(8.0, 40.0), size=(grid_h, grid_w, 3))
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    image += np.asarray(blotches, dtype=np.float32).transpose(2, 0, 1) - 128.0

    texture = rng.standard_normal((height, width), dtype=np.float32)  # grey pixel noise
    texture *= rng.uniform(1.0, 8.0)
    if rng.random() < 0.35:  # stripes, period 6..30 px
        phi = rng.uniform(0.0, math.pi)
        frequency = 2.0 * math.pi / rng.uniform(6.0, 30.0)
        along = (math.cos(phi) * np.arange(width, dtype=np.float32)[None, :]
                 + math.sin(phi) * np.arange(height, dtype=np.float32)[:, None])  # [H, W] px
        texture += rng.uniform(5.0, 25.0) * np.sin(frequency * along)
    image += texture[None]
    pixels = np.clip(image, 0.0, 255.0).astype(np.uint8)
    return np.ascontiguousarray(pixels.transpose(1, 2, 0))


def _draw_clutter(rng: np.random.Generator, canvas: Image.Image) -> None:
    """Distractor lines and irregular blobs (never one of the shape classes)."""
    width, height = canvas.size
    short = min(width, height)
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.integers(0, 6)):
        ends = rng.uniform(0.0, 1.0, size=4) * [width, height, width, height]
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.line(ends.tolist(), fill=colour, width=int(rng.integers(1, max(2, short // 60) + 1)))
    for _ in range(rng.integers(0, 4)):
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        radius = rng.uniform(0.02, 0.05) * short * rng.uniform(0.4, 1.0, size=n)
        centre = rng.uniform(0.0, 1.0, size=2) * [width, height]
        points = centre + radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        draw.polygon([tuple(p) for p in points.tolist()], fill=colour)


def _pick_colour(rng: np.random.Generator, under: np.ndarray, low_contrast: bool) -> np.ndarray:
    """Object colour against the mean colour ``under`` it: far from it, or (for
    deliberately difficult objects) 12..25 levels away."""
    mean = under.reshape(-1, 3).mean(axis=0)
    if low_contrast:
        direction = rng.normal(size=3)
        direction /= max(float(np.linalg.norm(direction)), 1e-6)
        return np.clip(mean + rng.uniform(12.0, 25.0) * direction, 0.0, 255.0)
    for _ in range(20):
        colour = rng.uniform(0.0, 255.0, size=3)
        if np.linalg.norm(colour - mean) >= 90.0:
            return colour
    return np.where(mean > 127.0, 20.0, 235.0)  # fallback: per channel far side


def _paint(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray,
           low_contrast: bool = False) -> None:
    """Paints a shaded, slightly noisy object of random colour into ``canvas`` where ``mask``."""
    ys, xs = np.nonzero(mask)
    colour = _pick_colour(rng, canvas[ys, xs].astype(np.float32), low_contrast)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    span = max(float(np.ptp(xs)) + float(np.ptp(ys)), 1.0)
    shade = (math.cos(theta) * (xs - xs.mean()) + math.sin(theta) * (ys - ys.mean())) / span
    strength = 0.0 if low_contrast else rng.uniform(0.0, 0.4)
    values = colour[None, :] * (1.0 + strength * shade[:, None])  # [P, 3]
    values += 3.0 * rng.standard_normal(values.shape, dtype=np.float32)
    canvas[ys, xs] = np.clip(values, 0.0, 255.0).astype(np.uint8)


def _image_size(rng: np.random.Generator, min_short: int, max_short: int,
                min_aspect: float, max_aspect: float,
                max_side: int | None = None) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(max_aspect)))  # w / h
    stretch = max(aspect, 1.0 / aspect)
    top = max_short if max_side is None else max(min_short, min(max_short, int(max_side / stretch)))
    short = int(rng.integers(min_short, top + 1))
    long = int(round(short * stretch))
    if max_side is not None:
        long = min(long, max_side)
    return (long, short) if aspect >= 1.0 else (short, long)


# ------------------------------------------------------------------- single images

def render_classification_image(
    rng: np.random.Generator, class_name: str, min_size: int = 96, max_size: int = 256,
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
            if any(_iou(box, other["box"]) > 0.3 or _too_much_overlap(mask, box, other)
                   for other in placed):
                continue
            truncated = bool(rough[0] < 0 or rough[1] < 0 or rough[2] > width - 1
                             or rough[3] > height - 1)
            placed.append({"name": name, "box": box, "mask": mask, "truncated": truncated,
                           "area": _shape_area(polygons), "low_contrast": rng.random() < 0.04})
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
        objects.append({
            "name": obj["name"],
            "box": obj["box"],
            "difficult": bool(obj["low_contrast"] or visible < 0.4 or tiny),
            "truncated": obj["truncated"],
            "visible": min(visible, 1.0),
            "mask": obj["mask"],
        })
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
                f"sppnet data set; refusing to overwrite it (choose another root)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        build(tmp)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n",
                                      encoding="utf-8")
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
    stamp = {"generator": __name__, "kind": "classification", "version": GENERATOR_VERSION,
             "params": {"seed": seed, "classes": CLASSES, "per_class": counts,
                        "min_size": min_size, "max_size": max_size}}

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
    stamp = {"generator": __name__, "kind": "detection", "version": GENERATOR_VERSION,
             "params": {"seed": seed, "classes": classes, "counts": counts,
                        "min_short_side": min_short_side, "max_short_side": max_short_side,
                        "max_objects": max_objects}}

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
                image, objects = render_detection_image(
                    rng, classes, min_short_side, max_short_side, max_objects)
                image.save(images / f"{image_id}.jpg", format="JPEG", quality=92)
                write_voc_annotation(annotations / f"{image_id}.xml", f"{image_id}.jpg",
                                     image.size, objects, database="sppnet synthetic shapes")
                ids[split].append(image_id)
        ids["trainval"] = ids["train"] + ids["val"]
        for split, split_ids in ids.items():
            (sets / f"{split}.txt").write_text("".join(f"{i}\n" for i in split_ids),
                                               encoding="utf-8")

    return _cached(root, stamp, build)
